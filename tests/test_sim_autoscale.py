"""The simulator runs the live deployer's load-aware planner and autoscaler: an intent's load sizes the
replicas, and under a load step the autoscaler adds a replica, then drains and removes it, with every
request answered (iserve.loadgen.sim_autoscale)."""

from __future__ import annotations

import random

import pytest

from iserve import quality
from iserve.deployer.autoscaler import Policy
from iserve.loadgen import metrics
from iserve.loadgen import simulator as sim
from iserve.loadgen.simspec import SimSpec
from iserve.loadgen.traces import TraceRequest
from iserve.messages import Intent


def _trace(phases: list[tuple[float, float]], seed: int = 1) -> list[TraceRequest]:
    """Poisson arrivals, ``(seconds, requests/s)`` one phase after the other; 300-token prompts, 60 out."""
    rng, out, t0 = random.Random(seed), [], 0.0
    for seconds, rate in phases:
        t = t0
        while (t := t + rng.expovariate(rate)) < t0 + seconds:
            out.append(TraceRequest(arrival_s=t, context_tokens=300, generated_tokens=60, index=len(out)))
        t0 += seconds
    return out


def _spec(trace, **kw) -> SimSpec:
    models = sim.resolve_models(["llama-2-7b"], maps_dir=None, gpu_type="A6000", max_gpus=4)
    base = dict(
        models=models,
        trace=trace,
        system="iserve",
        intent=Intent(kind="min-cost", prompt_tokens=300, output_tokens=60),
        gpus=4,
        deploy_every_s=0.0,
        window_s=10.0,
    )
    return SimSpec(**{**base, **kw})


def _one_alone_s() -> float:
    """Seconds one 300+60 request takes on the replica min-cost deploys, alone."""
    res = sim.simulate(_spec(_trace([(30.0, 0.02)])))
    return min(r.e2e_ms for r in res.requests) / 1000


@pytest.mark.parametrize("max_batch", [1, 4])
def test_an_intents_load_sizes_the_replicas_and_lowers_latency(max_batch):
    alone = _one_alone_s()
    rate = 2.5 * max_batch / alone  # more than one replica completes at its batch
    trace = _trace([(400.0, rate)])
    plain = sim.simulate(_spec(trace, max_batch=max_batch))
    loaded = sim.simulate(_spec(trace, max_batch=max_batch, intent_load=True))
    assert len(plain.choices["llama-2-7b"]) == 1
    assert len(loaded.choices["llama-2-7b"]) >= 2, loaded.deployments
    why = [e.why for e in loaded.deployments if e.status == "ready"][0]
    assert "replicas" in why
    m_plain, m_loaded = (metrics.run_metrics(r.as_run()) for r in (plain, loaded))
    assert m_loaded.mean_ms < 0.5 * m_plain.mean_ms
    assert m_loaded.ok == m_plain.ok == len(trace)


def test_the_autoscaler_adds_a_replica_under_a_load_step_and_removes_it_after():
    alone = _one_alone_s()
    trace = _trace([(60.0, 0.1 / alone), (240.0, 2.0 / alone), (600.0, 0.05 / alone)])
    policy = Policy(max_replicas=3, up_windows=2, down_windows=4, min_dwell_s=20.0)
    res = sim.simulate(_spec(trace, autoscale=policy, autoscale_interval_s=5.0))
    events = res.deployments
    ready = [e for e in events if e.status == "ready"]
    stopped = [e for e in events if e.status == "stopped"]
    assert len(ready) >= 2, [(e.t_s, e.status, e.why) for e in events]
    added = [e for e in ready if e.t_s > 0]
    assert 60.0 < added[0].t_s < 300.0  # during the step
    assert stopped and all(e.why.startswith("autoscaler: low load") for e in stopped)
    assert all(s.t_s > 300.0 for s in stopped)  # after the step
    assert {e.deployment_id for e in stopped} <= {e.deployment_id for e in added}  # never the first
    assert sum(r.status == "ok" for r in res.requests) == len(trace)  # every request answered
    # the same trace without the autoscaler: one replica, much slower during the step
    fixed = sim.simulate(_spec(trace))
    assert len([e for e in fixed.deployments if e.status == "ready"]) == 1
    during = lambda rs: [r.e2e_ms for r in rs if 60 <= r.arrival_s < 300]  # noqa: E731
    assert sum(during(res.requests)) < 0.7 * sum(during(fixed.requests))


def test_baselines_do_not_autoscale():
    trace = _trace([(120.0, 1.0)])
    res = sim.simulate(_spec(trace, system="max-tp", autoscale=Policy()))
    assert len([e for e in res.deployments if e.status == "ready"]) == 1


def test_a_scheduled_deployment_reclaims_the_gpus_the_autoscaler_took():
    """Opportunistic replicas give way: a model deployed later, with no room left, drains them and is
    deployed once they are gone, instead of failing."""
    alone = _one_alone_s()
    trace = _trace([(400.0, 3.0 / alone)])
    models = sim.resolve_models(["llama-2-7b:2"], maps_dir=None, gpu_type="A6000", max_gpus=2)
    policy = Policy(max_replicas=2, up_windows=1, down_windows=50, min_dwell_s=5.0)
    spec = _spec(
        trace, models=models, gpus=2, deploy_every_s=150.0, autoscale=policy, autoscale_interval_s=5.0
    )  # one fp16 replica (15.3 GiB) per 16 GiB GPU: the autoscaler's takes the second GPU, the second model needs it
    spec.gpu_memory_bytes = 16 * 2**30
    spec.intent = Intent(kind="min-memory", prompt_tokens=300, output_tokens=60, quality=quality.LOSSLESS)
    res = sim.simulate(spec)
    events = [(round(e.t_s), e.model, e.status, e.why[:60]) for e in res.deployments]
    assert not [e for e in events if e[2] == "failed"], events
    second = [e for e in res.deployments if e.status == "ready" and e.model.endswith("#2")]
    assert second and second[0].t_s >= 150.0, events
    reclaimed = [e for e in res.deployments if e.status == "stopped" and "reclaimed" in e.why]
    assert reclaimed, events
