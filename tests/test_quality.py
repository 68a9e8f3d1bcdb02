"""The quality policy (docs/quality.md): ``--quality`` parsing and its errors, the wire's bounds, the
pure admission, and the deployer's choice on a tiny model whose variants' quality was measured from its
real tensors: the default never picks a variant over the default budget, ``any`` reproduces the choice
without a policy, ``lossless`` picks only 16-bit, unpruned, 16-bit-KV configurations."""

from __future__ import annotations

import itertools

import msgspec
import pytest
import torch
from planner_factories import est, host

from iserve import quality
from iserve.deployer.planner import plan, plan_gpu_types
from iserve.deployer.units import GIB
from iserve.errors import BadRequest, Infeasible
from iserve.fingerprint import calibration
from iserve.messages import ConfigurationMap, Intent, QualityPolicy, QualityReport, VariantQuality, decode, encode

# ---------------------------------------------------------------------------------------------------
# parsing and the wire


@pytest.mark.parametrize(
    "text, want",
    [
        ("default", QualityPolicy()),
        ("", QualityPolicy()),
        ("lossless", QualityPolicy(mode="lossless")),
        ("ANY", QualityPolicy(mode="any")),
        ("max-kl=0.05", QualityPolicy(mode="budget", max_kl=0.05)),
        ("min-top1=0.9", QualityPolicy(mode="budget", min_top1=0.9)),
        ("max-kl=0.1, min-top1=0.8", QualityPolicy(mode="budget", max_kl=0.1, min_top1=0.8)),
    ],
)
def test_quality_flags_parse(text, want):
    assert quality.parse_policy(text) == want
    assert quality.parse_policy(quality.describe_policy(want)) == want


@pytest.mark.parametrize(
    "text, says",
    [
        ("max-kl=abc", "--quality max-kl='abc' needs a number"),
        ("min-top1=1.5", "out of range; give a fraction between 0 and 1"),
        ("max-kl=-1", "out of range; give 0 or more nats per token"),
        ("lossy", "is not a quality policy; use lossless, any, default"),
        ("max-kl", "is not a quality policy"),
    ],
)
def test_a_bad_quality_flag_says_what_to_write(text, says):
    with pytest.raises(BadRequest) as info:
        quality.parse_policy(text)
    assert info.value.code == "bad_request" and says in info.value.message


def test_the_wire_bounds_a_policy_and_keeps_older_intents_readable():
    bad = b'{"kind": "min-cost", "quality": {"mode": "budget", "min_top1": 1.5}}'
    with pytest.raises(msgspec.ValidationError, match="quality.min_top1"):
        msgspec.json.decode(bad, type=Intent)
    with pytest.raises(msgspec.ValidationError, match="quality.mode"):
        msgspec.json.decode(b'{"quality": {"mode": "lossy"}}', type=Intent)
    assert msgspec.json.decode(b'{"kind": "min-cost"}', type=Intent).quality == QualityPolicy()  # an older sender
    cmap = ConfigurationMap(model="m", gpu_type="g", gpu_memory_bytes=1, max_gpus=1, context_tokens=8)
    assert decode(encode(cmap), ConfigurationMap).quality is None
    with pytest.raises(BadRequest, match="needs max_kl and/or min_top1"):
        quality.admit([est()], None, QualityPolicy(mode="budget"))


# ---------------------------------------------------------------------------------------------------
# admission (pure)

REPORT = QualityReport(
    method="full",
    variants=[
        VariantQuality(weight_quant="int8", kl=0.002, top1=0.99),
        VariantQuality(weight_quant="int4", kl=0.05, top1=0.9),
    ],
)


def test_admission_by_policy():
    fp16, int8, int4, pruned = est(), est(wq="int8"), est(wq="int4"), est(pr="2:4")
    everything = [fp16, int8, int4, pruned]

    def kept(policy: QualityPolicy, report=REPORT):
        return [e.config.key() for e in quality.admit(everything, report, policy)[0]]

    assert kept(quality.ANY) == [e.config.key() for e in everything]
    assert kept(quality.LOSSLESS) == [fp16.config.key()]
    assert kept(quality.DEFAULT) == [fp16.config.key(), int8.config.key()]  # int4 over, 2:4 not measured
    assert kept(quality.parse_policy("max-kl=0.1")) == [fp16.config.key(), int8.config.key(), int4.config.key()]
    assert kept(quality.parse_policy("min-top1=0.95")) == [fp16.config.key(), int8.config.key()]
    assert kept(quality.DEFAULT, None) == [fp16.config.key()]  # nothing measured: lossless only
    failed = QualityReport(method="full", error="the quality measurement failed: boom", variants=REPORT.variants)
    assert kept(quality.DEFAULT, failed) == [fp16.config.key()]

    _, out = quality.admit(everything, REPORT, quality.DEFAULT)
    why = {r.config: r.reason for r in out}
    assert why[int4.config.key()].startswith("quality: int4 weights measured KL 0.05 nats/token, top-1 agreement 90.0%")
    assert "over the default quality budget (KL <= 0.01, top-1 >= 95%)" in why[int4.config.key()]
    assert why[pruned.config.key()] == (
        "quality: 2:4 pruning is lossy and its quality cost was not measured, so only --quality any admits it"
    )
    _, out = quality.admit([int8], REPORT, quality.LOSSLESS)
    assert "--quality lossless admits no lossy knob" in out[0].reason


def test_the_choice_note_names_the_lossy_knob_and_its_cost():
    note, cost = quality.choice_note(est(wq="int8", kv="int8").config, REPORT)
    assert (
        note == "lossy (int8 weights and int8 KV cache); its quality cost was not measured (admitted by --quality any)"
    )
    assert cost is None
    note, cost = quality.choice_note(est(wq="int8").config, REPORT)
    assert note == "lossy (int8 weights): measured KL 0.002 nats/token, top-1 agreement 99.0% (full method)"
    assert cost == REPORT.variants[0]
    assert quality.choice_note(est().config, REPORT) == ("lossless: 16-bit weights, unpruned, 16-bit KV cache", None)


# ---------------------------------------------------------------------------------------------------
# the deployer on a tiny model with measured quality

WEIGHT = {"fp16": (16, 10.0), "int8": (9, 7.0), "int4": (5, 5.0)}  # GiB, TPOT ms
PRUNE = {"none": (1.0, 1.0), "2:4": (0.6, 0.8), "structured": (0.75, 0.7)}
KV = {"fp16": (0, 1.0), "int8": (-1, 0.95)}


def _estimates() -> list:
    """Every configuration of a 32-layer model where each lossy knob is smaller and faster, so that an
    unconstrained intent always prefers one."""
    out = []
    for (w, (gib, tpot)), (p, (pm, pt)), (kv, (km, kt)), tp in itertools.product(
        WEIGHT.items(), PRUNE.items(), KV.items(), (1, 2)
    ):
        total = (gib * pm + km + 2) * GIB
        out.append(est(tp, 1, w, kv, p, layer_bytes=int(total / 32 / tp), tpot=tpot * pt * kt / (0.8 * tp), ttft=20))
    return out


@pytest.fixture(scope="module")
def measured(tiny_model) -> QualityReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return calibration.measure(tiny_model, method="full", prompts=3, tokens=24)
    finally:
        torch.set_num_threads(threads)


INTENTS = [
    Intent(kind="min-latency"),
    Intent(kind="min-cost"),
    Intent(kind="min-memory"),
    Intent(kind="min-gpu-hours"),
    Intent(kind="latency-slo", slo_ms=5000.0),
]


@pytest.mark.parametrize("intent", INTENTS, ids=lambda i: i.kind)
def test_a_tiny_model_deploys_within_its_measured_budget(measured, intent):
    assert not measured.error and len(measured.variants) == 17
    cmap = ConfigurationMap(
        model="tiny", gpu_type="H100", gpu_memory_bytes=80 * GIB, max_gpus=2, context_tokens=2048,
        estimates=_estimates(), quality=measured,
    )  # fmt: skip
    gpus = host("a", [80, 80])

    def choose(policy: QualityPolicy):
        q = msgspec.structs.replace(intent, quality=policy)
        return plan_gpu_types({"H100": cmap}, q, gpus, policy="hybrid", theta=0.5, stale_s=5).decision

    # default: the choice is lossless or measured within the default budget, and not lossless when a
    # measured variant is within it and better for the intent
    d = choose(quality.DEFAULT)
    cost = quality.cost_of(d.estimate.config, measured)
    assert quality.is_lossless(d.estimate.config) or (
        cost is not None and cost.kl <= quality.DEFAULT_MAX_KL and cost.top1 >= quality.DEFAULT_MIN_TOP1
    )
    within = [v for v in measured.variants if v.kl <= quality.DEFAULT_MAX_KL and v.top1 >= quality.DEFAULT_MIN_TOP1]
    assert within, "the tiny model's int8 weights / int8 KV are expected within the default budget"
    assert not quality.is_lossless(d.estimate.config)
    for r in d.filtered:
        if r.reason.startswith("quality:"):
            assert "over the default quality budget" in r.reason
    # any: today's choice, exactly as the planner makes it without a policy
    assert choose(quality.ANY) == plan(cmap.estimates, intent, gpus, policy="hybrid", theta=0.5)
    # lossless: 16-bit weights, unpruned, 16-bit KV only
    d = choose(quality.LOSSLESS)
    c = d.estimate.config
    assert (c.weight_quant, c.kv_quant, c.pruning) == ("fp16", "fp16", "none")
    assert sum(r.reason.startswith("quality:") for r in d.filtered) == len(cmap.estimates) - 2


def test_measured_costs_rank_the_knobs_as_expected(measured):
    by = {v.key(): v for v in measured.variants}
    assert by["wfp16-kvint8-pnone"].kl < by["wint8-kvfp16-pnone"].kl < by["wint4-kvfp16-pnone"].kl
    assert by["wint4-kvfp16-pnone"].kl < by["wfp16-kvfp16-p24"].kl
    assert all(0.0 <= v.top1 <= 1.0 and v.kl >= 0 and v.ppl_ratio == 0.0 for v in measured.variants)  # no tokenizer


def test_unmeasured_variants_only_pass_with_any():
    cmap = ConfigurationMap(
        model="m", gpu_type="H100", gpu_memory_bytes=80 * GIB, max_gpus=1, context_tokens=2048,
        estimates=[est(wq="int4", layer_bytes=GIB // 2)],
    )  # fmt: skip
    gpus = host("a", [80])
    with pytest.raises(Infeasible) as info:
        plan_gpu_types({"H100": cmap}, Intent(), gpus, policy="hybrid", theta=0.5, stale_s=5)
    assert "the quality policy (default) rules out all 1 configurations" in info.value.message
    assert "quality cost was not measured" in info.value.message and "pass --quality any" in info.value.message
    d = plan_gpu_types({"H100": cmap}, Intent(quality=quality.ANY), gpus, policy="hybrid", theta=0.5, stale_s=5)
    assert d.decision.estimate.config.weight_quant == "int4"
    # a pinned lossy configuration is the user's explicit choice: only an explicit --quality overrides it
    key = cmap.estimates[0].config.key()
    assert plan_gpu_types({"H100": cmap}, Intent(), gpus, policy="hybrid", theta=0.5, stale_s=5, config=key)
    with pytest.raises(Infeasible, match="lossless"):
        plan_gpu_types(
            {"H100": cmap}, Intent(quality=quality.LOSSLESS), gpus, policy="hybrid", theta=0.5, stale_s=5, config=key
        )


def test_deploy_refuses_a_bad_quality_flag_before_connecting(capsys, monkeypatch):
    from iserve import cli

    monkeypatch.setenv("ISERVE_NATS_URL", "nats://127.0.0.1:1")  # nothing listens: a connection would fail
    with pytest.raises(SystemExit) as info:
        cli.main(["deploy", "m", "--quality", "max-kl=abc"])
    said = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "[bad_request] --quality max-kl='abc' needs a number" in said
