"""The oracle: the best static configuration per model with the whole trace known, found by
coordinate descent over simulated runs (docs/simulator.md#the-oracle)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import msgspec

from iserve.messages import Configuration, ConfigurationMap

from .metrics import objective
from .policies import oracle_candidates
from .simspec import SimResult, SimSpec
from .simulation import Simulation


@dataclass
class OracleResult:
    """The oracle's best run, its fixed configuration per model, the objective of iServe's own
    choices and of the best, and how many simulations the search spent."""

    result: SimResult
    choices: dict[str, Configuration]
    start_objective: tuple
    objective: tuple
    evaluations: int
    history: list[str]


def _fixed_choices(res: SimResult, maps: dict[str, ConfigurationMap]) -> dict[str, Configuration]:
    out = {}
    for model, keys in res.choices.items():
        if keys:
            out[model] = next(e.config for e in maps[model].estimates if e.config.key() == keys[0])
    return out


def oracle_search(spec: SimSpec, *, candidates: int = 6, max_evals: int = 40) -> OracleResult:
    """The best static configuration per model with the whole trace known: coordinate descent from
    iServe's choices, each candidate simulated on the full trace, at most ``max_evals`` simulations
    after the first."""
    start = Simulation(_with(spec, system="iserve", forced={})).run()
    maps = dict(spec.models)
    choice = _fixed_choices(start, maps)
    best_res = start
    best_obj = objective(start.as_run(), spec.intent)
    start_obj = best_obj
    cands = {m: oracle_candidates(maps[m].estimates, spec.intent, candidates) for m, _ in spec.models}
    evals, history = 0, []
    depth = max((len(c) for c in cands.values()), default=0)
    improved = True
    while improved and evals < max_evals:
        improved = False
        # round-robin over the models by candidate rank, so a small budget reaches every model
        for k in range(depth):
            for model, _ in spec.models:
                if evals >= max_evals or k >= len(cands[model]):
                    continue
                cfg = cands[model][k]
                if choice.get(model) == cfg:
                    continue
                trial = dict(choice)
                trial[model] = cfg
                res = Simulation(_with(spec, system="static", forced=trial)).run()
                evals += 1
                obj = objective(res.as_run(), spec.intent)
                if obj < best_obj:
                    history.append(
                        f"{model}: {choice[model].key() if model in choice else 'none'} -> {cfg.key()} "
                        f"({_fmt_obj(best_obj)} -> {_fmt_obj(obj)})"
                    )
                    choice, best_obj, best_res, improved = trial, obj, res, True
    note = (
        f"oracle: coordinate descent from iServe's choices over {sum(len(c) for c in cands.values())} candidates, "
        f"{evals} simulations; objective {_fmt_obj(start_obj)} -> {_fmt_obj(best_obj)}; fixed "
        + ", ".join(f"{m}={c.key()}" for m, c in choice.items())
    )
    best_res.meta = msgspec.structs.replace(
        best_res.meta, system="oracle", notes=(spec.notes + "; " if spec.notes else "") + note
    )
    return OracleResult(
        result=best_res,
        choices=choice,
        start_objective=start_obj,
        objective=best_obj,
        evaluations=evals,
        history=history,
    )


def _with(spec: SimSpec, **changes) -> SimSpec:
    return replace(spec, **changes)


def _fmt_obj(obj: tuple) -> str:
    failed, metric = obj
    return f"{metric:.4g}" + (f" with {failed} failed" if failed else "")
