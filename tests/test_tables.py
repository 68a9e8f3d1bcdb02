"""Every table the command line prints stays within 80 columns (a default terminal, a CI log), with
long names, ids and reasons folded rather than cut."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from test_control_batching import record

from iserve.fingerprint.comparison import Comparison, Point, validate_table
from iserve.loadgen.synthetic import synthetic_arch, synthetic_map
from iserve.messages import AutoscaleState, ExcludedConfig, GpuAssignment, GpuLoad, ModelRecord, QueueStats
from iserve.tables import (
    autoscale_table,
    deployments_table,
    estimates_table,
    excluded_table,
    gpus_table,
    models_table,
    queues_table,
)

WIDTH = 80
LONG = "llama-2-70b-chat-instruct-long-name"


def render(table) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=WIDTH, force_terminal=False, color_system=None).print(table)
    return out.getvalue().splitlines()


def gpus():
    return [
        GpuLoad(
            agent_id="agent-gpu-host-0042.example.internal",
            gpu_index=i,
            gpu_type="NVIDIA H100 80GB HBM3",
            total_bytes=80 * 2**30,
            used_bytes=10 * 2**30,
            free_bytes=70 * 2**30,
            busy_fraction=0.42,
            window_s=120,
            util_percent=97.0,
            simulated=True,
            workers=[f"w-{LONG}-{i}abcdef-1a2b", f"w-{LONG}-{i}fedcba-3c4d"],
        )
        for i in range(8)
    ]


def models():
    arch, weights = synthetic_arch("llama-2-70b")
    return [
        ModelRecord(
            name=LONG,
            path="/models/" + LONG,
            arch=arch,
            weights=weights,
            digest="x",
            status="failed",
            status_reason="no NVIDIA H100 80GB HBM3 GPU has 140.00 GiB free to profile its fingerprints; free memory",
            profiled_gpu_types=["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"],
        )
    ]


def deployments():
    many = [
        GpuAssignment(
            agent_id="agent-gpu-host-0042", gpu_index=i, first_layer=10 * i, num_layers=10, memory_bytes=2**34
        )
        for i in range(8)
    ]
    return [
        record(deployment_id=f"{LONG}-{i}1b2c3d4", model=LONG, gpus=many, status="failed", reason="worker exited " * 8)
        for i in range(3)
    ]


def queues(deps):
    return {
        d.deployment_id: QueueStats(
            deployment_id=d.deployment_id,
            model=d.model,
            worker_id=d.worker_id,
            queue_depth=12345,
            in_flight=64,
            completed=1234567,
            failed=3,
            ttft_ms_p50=12345.6,
            e2e_ms_p50=123456.7,
            max_batch=64,
            kv_blocks_used=40960,
            kv_blocks_total=40960,
        )
        for d in deps
    }


def comparisons():
    points = [Point("ttft", "p=1024", 1234.5678, 1200.0), Point("tpot", "p=1024,o=64", 12.3, 12.0)]
    return [
        Comparison(config="tp2-pp4-wint4-kvint8-p2of4", points=points, gpu_seconds=1234.5),
        Comparison(config="tp1-pp1-wfp16-kvfp16-pnone", note="not measured: CUDA out of memory " * 4),
    ]


def tables():
    cmap = synthetic_map("llama-2-70b", gpu_type="H100", max_gpus=8)
    excluded = [ExcludedConfig(config=e.config, reason="the engine cannot run " * 6) for e in cmap.estimates[:3]]
    deps = deployments()
    return {
        "gpus": gpus_table(gpus()),
        "models": models_table(models()),
        "estimates": estimates_table(
            cmap.estimates, prompt=512, output=128, title=f"{LONG} on NVIDIA H100 80GB HBM3 (context 4096)"
        ),
        "excluded": excluded_table(excluded),
        "deployments": deployments_table(deps),
        "queues": queues_table(deps, queues(deps)),
        "validate": validate_table(comparisons()),
        "autoscale": autoscale_table(
            [
                AutoscaleState(
                    model=LONG,
                    added=[f"{LONG}-as-0a1b2c", f"{LONG}-as-3d4e5f"],
                    draining=[f"{LONG}-as-3d4e5f"],
                    last_action="remove",
                    last_action_at=1000.0,
                    last_reason="low load for 6 evaluations, one fewer replica carries it " * 3,
                    replicas=12,
                )
            ],
            1234.0,
        ),
    }


@pytest.mark.parametrize("name", list(tables()))
def test_every_table_fits_80_columns(name):
    lines = render(tables()[name])
    assert lines, name
    too_long = [line for line in lines if len(line) > WIDTH]
    assert too_long == [], f"{name}: {len(too_long)} lines over {WIDTH} columns:\n" + "\n".join(too_long)


@pytest.mark.parametrize("name", list(tables()))
def test_nothing_is_cut_only_folded(name):
    t = tables()[name]
    text = "\n".join(render(t))
    assert "…" not in text  # rich marks a cut cell with an ellipsis
    for col in t.columns:
        if col.no_wrap:  # numbers: never folded, so each must be there whole, with its header
            assert all(str(cell) in text for cell in [col.header, *col._cells]), (name, col.header)
