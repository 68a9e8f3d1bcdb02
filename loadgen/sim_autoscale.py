"""iServe's autoscaler in the trace simulator: the deployer's own pure decisions
(:func:`iserve.deployer.autoscaler.decide`) evaluated every ``interval_s`` on what the simulated
scheduler and GPUs show, acting as the live loop does (``deployer/autoscale_loop.py``).

Per deployed model, each evaluation builds the :class:`~iserve.deployer.autoscaler.ModelView` the live
loop builds from the scheduler's reports: each replica's waiting and running requests and slots, the
p95 end-to-end latency of the requests completed since the previous evaluation, the GPU load of the
serving replicas over the interval and the GPUs a replica of the model's configuration would fit on.

* **add**: one more replica of the configuration of the model's first deployment, placed by the
  system's own planner on the spare GPUs (``autoscaler.spare_gpus``: free, not serving the model,
  not busy; the map cut to that configuration, no load in the intent: one replica);
* **remove**: the replica stops taking requests (it drains: what it holds runs to the end); at the
  first evaluation that finds it empty its memory is freed and it is gone ("stopped");
* a scheduled deployment that does not fit reclaims the GPUs: every added replica drains, and the
  deployment is made at the first evaluation after they are gone (``reclaim``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from iserve.deployer.autoscaler import ModelView, Policy, ReplicaView, decide, spare_gpus
from iserve.errors import IServeError
from iserve.messages import AutoscaleState, GpuAssignment
from iserve.stats import percentile

from .records import DeploymentEvent


class SimAutoscaler:
    """``sim``: the :class:`~iserve.loadgen.simulation.Simulation` it runs in (not imported: the
    simulation imports this module); it reads its replicas, queues and GPUs and launches through it."""

    def __init__(self, sim: Any, policy: Policy, interval_s: float):
        if interval_s <= 0:
            raise ValueError(f"the autoscaler's interval must be positive, not {interval_s}")
        self.sim, self.policy, self.interval_s = sim, policy, interval_s
        self.next_at = interval_s
        self.states: dict[str, AutoscaleState] = {}
        self.added: dict[str, list[GpuAssignment]] = {}  # replicas it added -> their GPUs (to free them)
        self.draining: dict[str, str] = {}  # replica -> why it is drained
        self._seen = 0  # requests recorded before the previous evaluation
        self.actions: list[tuple[float, str, str, str]] = []  # (time, model, action, reason)
        self.pending: list[str] = []  # scheduled deployments waiting for added replicas to drain

    def evaluate(self, now: float) -> None:
        self.next_at = now + self.interval_s
        sim = self.sim
        fresh = sim.requests[self._seen :]
        self._seen = len(sim.requests)
        self._stop_drained(now)
        if self.pending and not self.draining:  # the room reclaimed: deploy what waited for it
            waiting, self.pending = self.pending, []
            for model in waiting:
                sim._deploy(model, now)
        for model in dict.fromkeys(d.model for d in sim.deps.values()):
            e2e = [r.e2e_ms for r in fresh if r.model == model and r.status == "ok"]
            view = self._view(model, now, percentile(e2e, 95) if e2e else 0.0)
            state = self.states.get(model) or AutoscaleState(model=model)
            d = decide(view, state, self.policy, now)
            self.states[model] = d.state
            if d.action == "add" and not self.pending:  # a scheduled deployment comes first
                self._add(model, now, d.reason)
            elif d.action == "remove":
                self._drain(d.deployment_id, now, d.reason)

    def reclaim(self, model: str, now: float) -> bool:
        """A scheduled deployment of ``model`` did not fit: drain every replica the autoscaler added (they
        are opportunistic) and deploy it once they are gone. False when there are none to drain."""
        victims = [d for d in self.added if d not in self.draining]
        if not victims and not self.draining:
            return False
        for dep_id in victims:
            self._drain(dep_id, now, f"its GPUs are reclaimed for the deployment of {model}")
        self.pending.append(model)
        return True

    def _spare(self, model: str, now: float) -> list:
        """The GPUs a new replica of ``model`` may take (the live autoscaler's ``spare_gpus``)."""
        sim = self.sim
        tmpl = self._template(model)
        taken = {(sim.g[k].agent, sim.g[k].index) for d in sim.deps.values() if d.model == model for k in d.gpus}
        gpus = sim.gpu_states(now)
        return spare_gpus(gpus, sim.spec.gpu_type, tmpl.total_bytes // len(tmpl.gpus), taken, self.policy.spare_load)

    def _template(self, model: str):
        return next(d for d in self.sim.deps.values() if d.model == model and d.id not in self.added)

    def _view(self, model: str, now: float, p95_ms: float) -> ModelView:
        sim = self.sim
        tmpl = self._template(model)
        reps = [sim.queues.replicas[d.id] for d in sim.deps.values() if d.model == model]
        deps = {d.id: d for d in sim.deps.values() if d.model == model}
        serving = [r for r in reps if not r.draining]
        window = self.interval_s
        gpus = {k for r in serving for k in deps[r.deployment_id].gpus}
        load = sum(sim.g[k].busy_between(now - window, now) / window for k in gpus) / len(gpus) if gpus else 0.0
        intent = sim.intent_for(model)
        return ModelView(
            model=model,
            replicas=tuple(
                ReplicaView(
                    deployment_id=r.deployment_id,
                    serving=not r.draining,
                    outstanding=len(r.queue) + len(r.running),
                    slots=r.slots,
                    added=r.deployment_id in self.added,
                )
                for r in reps
            ),
            service_ms=tmpl.est.latency_ms(intent.prompt_tokens, intent.output_tokens),
            slo_ms=intent.slo_ms or 0.0,
            queue_depth=sum(len(r.queue) for r in serving),
            in_flight=sum(len(r.running) for r in serving),
            e2e_p95_ms=p95_ms,
            gpu_load=min(1.0, load),
            free_gpus=len(self._spare(model, now)),
            gpus_per_replica=len(tmpl.gpus),
        )

    def _add(self, model: str, now: float, why: str) -> None:
        sim = self.sim
        tmpl = self._template(model)
        cmap = sim.maps[model]
        one = msgspec.structs.replace(cmap, estimates=[e for e in cmap.estimates if e.config == tmpl.est.config])
        intent = msgspec.structs.replace(sim.intent_for(model), rate=0.0)
        try:
            d = sim.system.decide(model, one, intent, self._spare(model, now))[0]
        except IServeError as e:
            self.actions.append((now, model, "hold", f"{why}; adding failed: {e.message}"))
            return
        dep_id = sim._launch(model, d, now, 0.0, cmap.context_tokens)  # idle: the next arrivals join it
        self.added[dep_id] = list(d.assignments)
        self.actions.append((now, model, "add", why))

    def _drain(self, dep_id: str, now: float, why: str) -> None:
        self.sim.queues.replicas[dep_id].draining = True
        self.draining[dep_id] = why
        self.actions.append((now, self.sim.deps[dep_id].model, "remove", why))

    def _stop_drained(self, now: float) -> None:
        sim = self.sim
        for dep_id in [d for d in self.draining if not sim.queues.replicas[d].queue]:
            dep = sim.deps[dep_id]
            if sim.queues.replicas[dep_id].running or dep.req is not None or (dep.batch and dep.batch.busy):
                continue
            for a in self.added.pop(dep_id):
                g = sim.g[sim.gpu_at[(a.agent_id, a.gpu_index)]]
                g.free += a.memory_bytes
                g.deps -= 1
            sim.queues.remove_replica(dep_id)
            del sim.deps[dep_id]
            reason = self.draining.pop(dep_id)
            sim.dep_events.append(
                DeploymentEvent(
                    t_s=now,
                    model=dep.model,
                    deployment_id=dep_id,
                    config=dep.config,
                    status="stopped",
                    gpu_type=sim.spec.gpu_type,
                    why=f"autoscaler: {reason}",
                )
            )
