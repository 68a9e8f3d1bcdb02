"""What the deployer sends an agent to start a deployment's worker, and what that worker will hold:
pure functions of the deployment record (its durable state is all a relaunch needs)."""

from __future__ import annotations

import uuid

from iserve.messages import DeploymentRecord, LaunchWorker, StageSpec


def new_worker_id(deployment_id: str) -> str:
    """A fresh worker id: every launch of a deployment gets its own."""
    return f"w-{deployment_id}-{uuid.uuid4().hex[:4]}"


def launch_of(dep: DeploymentRecord) -> LaunchWorker:
    """What the agent needs to start ``dep``'s worker: all of it is in the record."""
    return LaunchWorker(
        worker_id=dep.worker_id,
        deployment_id=dep.deployment_id,
        model=dep.model,
        model_path=dep.model_path,
        config=dep.config,
        stages=[
            StageSpec(
                gpu_index=g.gpu_index, first_layer=g.first_layer, num_layers=g.num_layers, memory_bytes=g.memory_bytes
            )
            for g in dep.gpus
        ],
        context_tokens=dep.context_tokens,
        max_batch=dep.max_batch,
        kv_tokens=dep.kv_tokens,
    )


def reserved_by(dep: DeploymentRecord) -> dict[tuple[str, int], int]:
    """The bytes ``dep``'s worker will hold on each (agent, GPU), until the agent reports them."""
    return {(g.agent_id, g.gpu_index): g.memory_bytes for g in dep.gpus}
