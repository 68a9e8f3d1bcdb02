"""The report (loadgen/report.py): metrics computed from run directories, report.md with the
figures' tables, non-empty PNGs, and the sweep end to end."""

from __future__ import annotations

import math

import pytest

from iserve.loadgen import metrics, report
from iserve.loadgen import simulator as sim
from iserve.loadgen.oracle import oracle_search
from iserve.loadgen.records import DeploymentEvent, RequestRecord, Run, RunMeta, load_run
from iserve.loadgen.simspec import SimSpec
from iserve.loadgen.simulation import Simulation
from iserve.messages import Intent

GIB = 1 << 30


def _run(requests, deployments, duration=100.0, intent=None) -> Run:
    meta = RunMeta(
        kind="live",
        trace="code",
        rate=0.4,
        interval_s=60,
        aggregate=1,
        duration_s=duration,
        intent=intent or Intent(kind="min-cost"),
        models=["a", "b"],
    )
    return Run(path=report.Path("x"), meta=meta, requests=requests, deployments=deployments)


def test_metrics_are_computed_from_the_records():
    deps = [
        DeploymentEvent(
            t_s=0.0,
            model="a",
            deployment_id="a/1",
            config="tp2-pp1",
            gpus=["h/0:32", "h/1:32"],
            total_bytes=20 * GIB,
            status="ready",
        ),
        DeploymentEvent(
            t_s=50.0,
            model="b",
            deployment_id="b/1",
            config="tp1-pp1",
            gpus=["h/1:40"],
            total_bytes=10 * GIB,
            status="ready",
        ),
    ]
    reqs = [
        RequestRecord(
            request_id="0",
            model="a",
            deployment_id="a/1",
            arrival_s=1.0,
            end_s=3.0,
            e2e_ms=2000.0,
            output_tokens=10,
            slo_ms=3000.0,
            slo_met=True,
        ),
        RequestRecord(
            request_id="1",
            model="b",
            deployment_id="b/1",
            arrival_s=60.0,
            end_s=64.0,
            e2e_ms=4000.0,
            output_tokens=20,
            slo_ms=3000.0,
            slo_met=False,
        ),
        RequestRecord(
            request_id="2",
            model="b",
            arrival_s=10.0,
            end_s=10.0,
            status="error",
            error_code="not_deployed",
            slo_ms=3000.0,
            slo_met=False,
        ),
    ]
    m = metrics.run_metrics(_run(reqs, deps))
    assert (m.requests, m.ok, m.failed) == (3, 2, 1)
    assert m.gpus_used == 2
    assert m.gpu_seconds == pytest.approx(100.0 + 100.0)  # GPU 0 from 0, GPU 1 from 0 (a) to the end at 100 s
    assert m.gpu_throughput == pytest.approx(2 / 200.0)
    assert m.token_throughput == pytest.approx(30 / 200.0)
    assert m.cluster_throughput == pytest.approx(2 / 100.0)
    assert m.memory_gib == pytest.approx(30.0)
    assert m.cost_gib_s == pytest.approx((20 * 2.0 + 10 * 4.0) / 2)
    assert m.gpu_hours == pytest.approx((2 * 2.0 + 1 * 4.0) / 3600)
    assert m.slo_attainment == pytest.approx(1 / 3)
    assert m.p50_ms == pytest.approx(3000.0) and m.mean_ms == pytest.approx(3000.0)
    assert m.models_deployed == 2 and m.configs == {"a": ["tp2-pp1"], "b": ["tp1-pp1"]}
    # the objective follows the intent
    run = _run(reqs, deps)
    assert metrics.objective(run, Intent(kind="min-cost")) == (1, pytest.approx(40.0))  # mean GiB x s
    assert metrics.objective(run, Intent(kind="min-memory")) == (1, pytest.approx(30.0))
    assert metrics.objective(run, Intent(kind="min-latency")) == (1, pytest.approx(3000.0))
    assert metrics.objective(run, Intent(kind="min-cost", cost_model="memory"))[1] == pytest.approx(15.0)
    assert metrics.objective(run, Intent(kind="latency-slo", slo_ms=1.0)) == (0, pytest.approx(2 / 3))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A small set of simulated runs covering Fig. 11, 13, 14 and 16."""
    root = tmp_path_factory.mktemp("runs")
    models = sim.resolve_models(["llama-2-13b", "llama-2-7b:2"], maps_dir=None, gpu_type="A6000", max_gpus=4)
    many = sim.resolve_models(["llama-2-7b:8", "gpt-j-6b:6"], maps_dir=None, gpu_type="A6000", max_gpus=4)
    base = dict(gpus=4, deploy_every_s=60.0, trace_label="code", sample_s=30.0)
    for rate in (0.1, 0.2):
        tr = sim.build_trace("code", rate=rate, duration_s=300)
        for system in ("iserve", "max-tp", "alpaserve"):
            for kind, slo, exp in [
                ("min-latency", 0.0, "fig11"),
                ("min-memory", 0.0, "fig13"),
                ("latency-slo", 2.5, "fig14"),
                ("latency-slo", 7.5, "fig14"),
            ]:
                s = SimSpec(
                    models=models,
                    trace=tr,
                    system=system,
                    rate=rate,
                    slo_scale=slo,
                    intent=Intent(kind=kind, prompt_tokens=1024, output_tokens=13),
                    notes=f"experiment={exp}",
                    **base,
                )
                Simulation(s).run().write(root / f"{exp}-{rate}-{kind}-{slo}-{system}")
        s = SimSpec(
            models=models,
            trace=tr,
            system="oracle",
            rate=rate,
            intent=Intent(kind="min-latency", prompt_tokens=1024, output_tokens=13),
            notes="experiment=fig11",
            **base,
        )
        oracle_search(s, candidates=2, max_evals=2).result.write(root / f"fig11-{rate}-oracle")
    tr = sim.build_trace("conv", rate=0.1, duration_s=300)
    for kind in ("min-latency", "min-memory"):
        for system in ("iserve", "max-pp"):
            s = SimSpec(
                models=many,
                trace=tr,
                system=system,
                rate=0.1,
                deploy_batch=2,
                intent=Intent(kind=kind, prompt_tokens=512, output_tokens=128),
                **{**base, "trace_label": "conv"},
            )
            Simulation(s).run().write(root / f"scaling-{kind}-{system}")
    return root


def test_report_has_every_table_and_non_empty_pngs(runs_dir, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(runs_dir), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for heading in ("Fig. 11", "Fig. 13", "Fig. 14", "Fig. 16", "against the oracle"):
        assert heading in text
    for png in ("fig11.png", "fig13.png", "fig14.png", "fig16.png"):
        assert (out / png).stat().st_size > 10_000
        assert f"]({png})" in text
    assert "| trace | rate | system | requests | failed | p50 |" in text
    assert "oracle (static, trace known)" in text and "max-TP policy" in text and "AlpaServe policy" in text
    assert "| SLO | trace | rate | system | attainment |" in text
    assert "models deployed" in text
    # every latency number in the Fig. 11 table is a computed one
    iserve = metrics.run_metrics(load_run(next(runs_dir.glob("fig11-0.2-min-latency-0.0-iserve"))))
    assert report._ms(iserve.p50_ms) in text


def test_fig16_counts_models_deployed(runs_dir):
    ms = [metrics.run_metrics(load_run(p)) for p in report.find_runs([runs_dir]) if "scaling" in p.name]
    assert ms and all(m.experiment == "fig16" for m in ms)
    assert all(m.models_requested == 14 and 1 <= m.models_deployed <= 14 for m in ms)
    assert all(m.cluster_throughput > 0 for m in ms)


def test_report_rejects_a_folder_without_runs(tmp_path):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_sweep_runs_the_simulator_and_writes_the_report(tmp_path):
    out = tmp_path / "sweep"
    rc = report.main(
        [
            "sweep",
            "--out",
            str(out),
            "--experiments",
            "fig11",
            "fig14",
            "--traces",
            "code",
            "--rates",
            "0.2",
            "--systems",
            "iserve",
            "max-pp",
            "--oracle",
            "--oracle-evals",
            "2",
            "--oracle-candidates",
            "2",
            "--duration-s",
            "300",
            "--workers",
            "1",
            "--slo-scales",
            "5",
            "--models",
            "llama-2-7b:2",
            "--gpus",
            "4",
            "--deploy-every-s",
            "60",
        ]
    )
    assert rc == 0
    runs = report.find_runs([out / "runs"])
    assert len(runs) == 3 + 3  # iserve, max-pp and the oracle, for each experiment
    text = (out / "report.md").read_text()
    assert "Simulated sweep: 6 runs" in text and "Fig. 11" in text and "Fig. 14" in text
    assert (out / "fig11.png").stat().st_size > 0 and (out / "fig14.png").stat().st_size > 0
    m = [metrics.run_metrics(load_run(p)) for p in runs]
    assert {x.system for x in m} == {"iserve", "max-pp", "oracle"}
    assert all(not math.isnan(x.p50_ms) for x in m)


def test_per_baseline_summary_averages_over_loads(runs_dir, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(runs_dir), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## iServe against each system, averaged over loads" in text
    ms = [metrics.run_metrics(load_run(p)) for p in report.find_runs([runs_dir])]
    rows = [line.split(" | ") for line in report._per_baseline(ms).splitlines()[2:]]
    fig11_tp = next(r for r in rows if r[0] == "| fig11" and r[2] == "max-TP policy")
    pairs = [
        (m, o)
        for m in ms
        for o in ms
        if m.experiment == o.experiment == "fig11"
        and m.system == "iserve"
        and o.system == "max-tp"
        and m.rate == o.rate
    ]
    assert fig11_tp[3] == str(len(pairs)) == "2"
    same = [(a, b) for a, b in pairs if a.failed == 0 and b.failed == 0]
    assert fig11_tp[6] == str(len(same)) and same
    want = sum((a.mean_ms - b.mean_ms) / b.mean_ms for a, b in same) / len(same)
    assert fig11_tp[7] == f"{want:+.1%}"
    assert any(r[2] == "all baselines" for r in rows) and any(r[2].startswith("oracle") for r in rows)
    # SLO attainment and Fig. 16's cluster throughput are ratios
    assert all(r[7].endswith("x") or r[7] == "-" for r in rows if r[0] in ("| fig14", "| fig16"))
    assert report._change(2.0, 4.0, False) == pytest.approx(-0.5) and report._change(2.0, 4.0, True) == 0.5
    assert math.isnan(report._change(1.0, 0.0, True))


def test_sweep_writes_runs_elsewhere_and_records_the_command(tmp_path):
    out, runs = tmp_path / "report", tmp_path / "scratch"
    rc = report.main(
        [
            "sweep",
            "--out",
            str(out),
            "--runs",
            str(runs),
            "--experiments",
            "fig11",
            "--traces",
            "code",
            "--rates",
            "0.2",
            "--systems",
            "iserve",
            "max-tp",
            "--duration-s",
            "120",
            "--workers",
            "1",
            "--models",
            "llama-2-7b",
            "--gpus",
            "2",
        ]
    )
    assert rc == 0
    assert len(report.find_runs([runs])) == 2 and not (out / "runs").exists()
    text = (out / "report.md").read_text()
    assert "each run replays the first 120 s" in text
    assert f"Command: `iserve report sweep --out {out} --runs {runs} --experiments fig11" in text


def test_sweep_runs_fig10_placement_policies_and_both_serving_modes(tmp_path):
    """Fig. 10: iServe alone under each placement policy through a fluctuating Poisson load, models
    deployed one by one; ``--modes 1 4``: every experiment in the paper's mode and batched, each with
    its own section and figure, never compared across modes."""
    out = tmp_path / "sweep"
    rc = report.main(
        ["sweep", "--out", str(out), "--experiments", "fig10", "fig11", "--traces", "code", "--rates", "0.2"]
        + ["--systems", "iserve", "max-tp", "--duration-s", "120", "--workers", "1", "--models", "llama-2-7b"]
        + ["--gpus", "4", "--modes", "1", "4", "--fig10-models", "llama-2-7b:3", "--fig10-every-s", "40"]
        + ["--fig10-duration-s", "150", "--fig10-rate", "1.5", "--fig10-thetas", "0.5"]
    )
    assert rc == 0
    ms = [metrics.run_metrics(load_run(p)) for p in report.find_runs([out / "runs"])]
    fig10 = [m for m in ms if m.experiment == "fig10"]
    assert sorted((m.placement, m.max_batch) for m in fig10) == [
        ("hybrid 0.5", 1),
        ("hybrid 0.5", 4),
        ("least-loaded", 1),
        ("least-loaded", 4),
        ("packing", 1),
        ("packing", 4),
    ]
    assert all(m.system == "iserve" and m.trace == "fluctuating" and m.models_deployed == 3 for m in fig10)
    by = {(m.placement, m.max_batch): m for m in fig10}
    assert by[("packing", 1)].gpus_used <= by[("least-loaded", 1)].gpus_used  # packing spreads least
    assert sorted((m.system, m.max_batch) for m in ms if m.experiment == "fig11") == [
        ("iserve", 1),
        ("iserve", 4),
        ("max-tp", 1),
        ("max-tp", 4),
    ]
    text = (out / "report.md").read_text()
    assert "## Fig. 10: placement policies under a fluctuating load\n" in text
    assert "## Fig. 11: minimise latency (continuous batching, max_batch 4)" in text
    for png in ("fig10.png", "fig10-b4.png", "fig11.png", "fig11-b4.png"):
        assert (out / png).stat().st_size > 0


def test_fluctuating_trace_swings_around_its_mean_rate():
    from iserve.loadgen.fluctuating import fluctuating_trace

    t = fluctuating_trace(3600.0, 2.0, seed=4, period_s=600.0, swing=0.8)
    assert t == fluctuating_trace(3600.0, 2.0, seed=4, period_s=600.0, swing=0.8)  # seeded
    assert abs(len(t) / 3600.0 - 2.0) < 0.15  # the mean rate over whole periods
    peak = sum(1 for r in t if 100 <= r.arrival_s % 600 < 200)  # around the sine's top (t = 150 s)
    valley = sum(1 for r in t if 400 <= r.arrival_s % 600 < 500)  # around its bottom (t = 450 s)
    assert peak > 4 * valley
    assert all(a.arrival_s < b.arrival_s for a, b in zip(t, t[1:])) and all(r.generated_tokens >= 0 for r in t)
    with pytest.raises(ValueError, match="swing"):
        fluctuating_trace(60.0, 1.0, swing=1.5)


def test_sweep_plans_the_smaller_and_mixed_model_figures():
    """Fig. 12 (smaller models, min-latency) and Fig. 24 (a mix, every intent) on their own model lists."""
    from iserve.loadgen import sweep

    args = sweep.parser().parse_args(
        ["--out", "/tmp/x", "--experiments", "fig12", "fig24", "--traces", "code", "--rates", "0.4"]
        + ["--systems", "iserve", "max-tp"]
    )
    jobs = sweep.plan_jobs(args)
    fig12 = [j for j in jobs if j.experiment == "fig12"]
    fig24 = [j for j in jobs if j.experiment == "fig24"]
    assert {j.models for j in fig12} == {tuple(sweep.SMALL_MODELS)} and {j.intent for j in fig12} == {"min-latency"}
    assert {j.models for j in fig24} == {tuple(sweep.MIXED_MODELS)}
    assert {j.intent for j in fig24} == {"min-latency", "min-cost", "min-memory", "min-gpu-hours"}
    assert len(fig24) == 4 * 2 and len({j.out for j in jobs}) == len(jobs)


def test_the_intents_table_shows_the_quality_cost_of_each_choice():
    def dep(model, config, quality=""):
        return [
            DeploymentEvent(
                t_s=0.0,
                model=model,
                deployment_id=f"{model}/1",
                config=config,
                gpus=["h/0:4"],
                total_bytes=GIB,
                status=status,
                quality=quality if status == "launching" else "",
            )  # fmt: skip
            for status in ("launching", "ready")
        ]

    lossless = metrics.run_metrics(_run([], dep("a", "tp1-pp1-wfp16-kvfp16-pnone", "lossless")))
    measured = metrics.run_metrics(
        _run(
            [], dep("a", "tp1-pp1-wint8-kvfp16-pnone", "KL 0.002, top-1 99.0%") + dep("b", "tp1-pp1-wint4-kvfp16-pnone")
        )
    )
    assert measured.quality == {"tp1-pp1-wint8-kvfp16-pnone": "KL 0.002, top-1 99.0%", "tp1-pp1-wint4-kvfp16-pnone": ""}
    rows = report._fig13_table([lossless, measured]).splitlines()
    assert rows[0].endswith("| configurations | quality cost |")
    assert rows[2].endswith("| lossless |")
    assert rows[3].endswith(
        "| tp1-pp1-wint4-kvfp16-pnone: not measured; tp1-pp1-wint8-kvfp16-pnone: KL 0.002, top-1 99.0% |"
    )
