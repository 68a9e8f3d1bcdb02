"""The wire's vocabularies and bounds: the decoder refuses unknown words and out-of-range numbers with
the path of the bad value, a service answers them with a coded error and keeps serving, and the
flags' choices come from the same aliases."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import get_args

import msgspec
import pytest

from iserve import bus, errors, subjects
from iserve.deployer.config import DeployerConfig
from iserve.deployer.config import parse as deployer_parse
from iserve.deployer.ranking import validate_intent
from iserve.deployer.service import DeployerService
from iserve.loadgen.config import build_parser as loadgen_parser
from iserve.messages import (
    COST_MODELS,
    INTENT_KINDS,
    PLACEMENT_POLICIES,
    ConfigEstimate,
    DeploymentList,
    DeployRequest,
    ErrorCode,
    ErrorReply,
    InferRequest,
    Intent,
    IntentKind,
    ListDeployments,
    ProfileJob,
    decode,
    encode,
    values,
)
from iserve.service import Service
from iserve.settings import ServiceConfig, add_flags, from_args, option

INFER = b'"type":"infer_request","request_id":"r","model":"m","prompt":"hi"'


@pytest.mark.parametrize(
    ("payload", "kind", "error"),
    [
        (b'{%s,"max_tokens":-1}' % INFER, InferRequest, "Expected `int` >= 1 - at `$.max_tokens`"),
        (b'{%s,"max_tokens":0}' % INFER, InferRequest, "Expected `int` >= 1 - at `$.max_tokens`"),
        (b'{%s,"top_p":0}' % INFER, InferRequest, "Expected `float` > 0.0 - at `$.top_p`"),
        (b'{%s,"top_p":1.5}' % INFER, InferRequest, "Expected `float` <= 1.0 - at `$.top_p`"),
        (b'{%s,"temperature":-0.1}' % INFER, InferRequest, "Expected `float` >= 0.0 - at `$.temperature`"),
        (b'{%s,"timeout_s":0}' % INFER, InferRequest, "Expected `float` > 0.0 - at `$.timeout_s`"),
        (
            b'{"model":"m","intent":{"kind":"fastest"}}',
            DeployRequest,
            "Invalid enum value 'fastest' - at `$.intent.kind`",
        ),
        (
            b'{"model":"m","intent":{"cost_model":"euros"}}',
            DeployRequest,
            "Invalid enum value 'euros' - at `$.intent.cost_model`",
        ),
        (b'{"model":"m","intent":{"slo_ms":-5}}', DeployRequest, "Expected `float` >= 0.0 - at `$.intent.slo_ms`"),
        (
            b'{"model":"m","intent":{"prompt_tokens":0}}',
            DeployRequest,
            "Expected `int` >= 1 - at `$.intent.prompt_tokens`",
        ),
        (b'{"model":"m","placement":"random"}', DeployRequest, "Invalid enum value 'random' - at `$.placement`"),
        (b'{"model":"m","context_tokens":-1}', DeployRequest, "Expected `int` >= 0 - at `$.context_tokens`"),
        (
            b'{"job_id":"j","model":"m","fingerprint_paths":[],"gpu_index":0,"variants":[{"weight_quant":"fp8"}]}',
            ProfileJob,
            "Invalid enum value 'fp8' - at `$.variants[0].weight_quant`",
        ),
        (
            b'{"job_id":"j","model":"m","fingerprint_paths":[],"gpu_index":0,"prompt_lengths":[16,0]}',
            ProfileJob,
            "Expected `int` >= 1 - at `$.prompt_lengths[1]`",
        ),
        (b'{"config":{"tp":0}}', ConfigEstimate, "Expected `int` >= 1 - at `$.config.tp`"),
    ],
)
def test_the_decoder_refuses_bad_values_with_their_path(payload, kind, error):
    with pytest.raises(msgspec.ValidationError) as info:
        decode(payload, kind)
    assert str(info.value) == error


def test_the_wire_strings_are_unchanged():
    # the original fields keep their names and order; fields appended later follow them
    assert encode(Intent()).startswith(
        b'{"kind":"min-cost","cost_model":"mem-x-latency","slo_ms":null,"budget":null,'
        b'"prompt_tokens":512,"output_tokens":128,'
        # appended (quality, docs/quality.md), then the expected load (docs/deployment.md#load)
        b'"quality":{"mode":"default","max_kl":null,"min_top1":null},'
        b'"rate":0.0,"slo_percentile":95.0,"output_cv2":1.0}'
    )
    req = decode(
        b'{"model":"m","placement":"least-loaded","intent":{"kind":"latency-slo","slo_ms":200}}', DeployRequest
    )
    assert (req.placement, req.intent.kind, req.intent.slo_ms) == ("least-loaded", "latency-slo", 200.0)
    assert decode(b'{"model":"m","placement":""}', DeployRequest).placement == ""


def test_vocabularies_are_listed_from_their_aliases():
    assert INTENT_KINDS == get_args(IntentKind) == values(IntentKind)
    assert INTENT_KINDS == ("min-latency", "min-cost", "min-memory", "min-gpu-hours", "latency-slo", "cost-budget")
    assert COST_MODELS == ("mem-x-latency", "memory", "gpu-hours")
    assert PLACEMENT_POLICIES == ("hybrid", "least-loaded", "packing")
    # every error class has a code of the vocabulary, and every code a class
    assert set(errors._BY_CODE) == set(values(ErrorCode))


def test_a_bad_request_reply_carries_the_decoders_message():
    try:
        decode(b'{%s,"max_tokens":-1}' % INFER, InferRequest)
    except msgspec.ValidationError as e:
        reply = bus.bad_request_reply(InferRequest, subjects.INFER, e)
    assert reply.code == "bad_request"
    assert reply.message.startswith(
        f"malformed InferRequest on {subjects.INFER}: Expected `int` >= 1 - at `$.max_tokens`"
    )


def test_flag_choices_come_from_the_aliases():
    def choices(parser: argparse.ArgumentParser, name: str):
        return next(a.choices for a in parser._actions if name in a.option_strings)

    p = argparse.ArgumentParser()
    add_flags(p, DeployerConfig)
    assert tuple(choices(p, "--placement")) == PLACEMENT_POLICIES
    lg = loadgen_parser()
    assert tuple(choices(lg, "--intent")) == INTENT_KINDS
    assert tuple(choices(lg, "--cost-model")) == COST_MODELS
    assert tuple(choices(lg, "--placement")) == ("", *PLACEMENT_POLICIES)


def test_config_fields_generate_flags_with_env_twins(monkeypatch):
    @dataclass
    class Demo(ServiceConfig):
        window_s: float = option(2.0, help="a window")
        names: list[str] = option(["a"], type=lambda t: t.split(","), help="names")
        level: int = option(3, flag="--depth", env="DEMO_DEPTH", help="depth")

    monkeypatch.setenv("ISERVE_WINDOW_S", "4.5")
    monkeypatch.setenv("DEMO_DEPTH", "7")
    p = argparse.ArgumentParser()
    add_flags(p, Demo)
    cfg = from_args(Demo, p.parse_args(["--names", "x,y"]))
    assert (cfg.window_s, cfg.names, cfg.level, cfg.nats_url) == (4.5, ["x", "y"], 7, "nats://127.0.0.1:4222")
    assert Demo().names == ["a"] and Demo().names is not Demo().names
    assert "[env ISERVE_WINDOW_S; default 2.0]" in p.format_help()
    assert deployer_parse([]).placement == "hybrid"


async def test_a_service_answers_a_bad_value_with_a_coded_error_and_keeps_serving(nats_server, nc):
    conn = await bus.connect(nats_server.url, "deployer")
    svc = DeployerService(DeployerConfig(nats_url=nats_server.url, log_level="warning", log_json=True), conn)
    await svc.start()
    try:
        for payload, path in (
            (
                b'{"type":"deploy_request","model":"m","intent":{"kind":"fastest"}}',
                "Invalid enum value 'fastest' - at `$.intent.kind`",
            ),
            (
                b'{"type":"deploy_request","model":"m","intent":{"output_tokens":-3}}',
                "Expected `int` >= 1 - at `$.intent.output_tokens`",
            ),
        ):
            resp = await nc.request(subjects.DEPLOY_REQUEST, payload, timeout=5)
            reply = decode(resp.data, ErrorReply)
            assert reply.code == "bad_request"
            assert reply.message == (
                f"malformed DeployRequest on {subjects.DEPLOY_REQUEST}: {path}; "
                "send a message that matches iserve.messages."
            )
        with pytest.raises(errors.BadRequest, match=r"at `\$.placement`"):
            await bus.request(
                nc,
                subjects.DEPLOY_REQUEST,
                DeployRequest(model="m", placement="random"),  # type: ignore[arg-type]
                DeploymentList,
            )
        assert await bus.request(nc, subjects.DEPLOYMENT_LIST, ListDeployments(), DeploymentList) == DeploymentList()
    finally:
        await svc.close()
        await conn.drain()


def test_an_intent_ignores_the_slo_and_budget_of_other_kinds():
    """0 means "not set" to loadgen and the CLI; only latency-slo / cost-budget check them."""
    intent = decode(b'{"kind":"min-cost","slo_ms":0.0,"budget":0}', Intent)
    assert (intent.slo_ms, intent.budget) == (0.0, 0.0)
    with pytest.raises(errors.BadRequest, match="slo_ms"):
        validate_intent(Intent(kind="latency-slo", slo_ms=0.0))


async def test_a_bucket_listing_skips_an_entry_that_no_longer_decodes(nc):
    kv = await bus.TypedKV.open(nc, "iserve_test_decode", Intent)
    await kv.put("good", Intent(kind="min-latency"))
    await kv.kv.put("old", b'{"kind":"min-latency","prompt_tokens":0}')  # a bound added after it was written
    assert await kv.values() == [Intent(kind="min-latency")]
    with pytest.raises(msgspec.ValidationError):
        await kv.get("old")


async def test_closing_a_service_stops_it_then_cancels_its_tasks(nc):
    events: list[str] = []

    class Looping(Service):
        async def started(self) -> None:
            self.loop = self.spawn(asyncio.sleep(3600))

        async def stopping(self) -> None:
            events.append("stopping, loop running" if not self.loop.done() else "stopping, loop done")

    svc = Looping(nc)
    await svc.start()
    await svc.close()
    assert events == ["stopping, loop running"] and svc.loop.cancelled()


def test_every_error_code_has_its_exception_and_back():
    import typing

    from iserve import errors, messages

    assert set(errors._BY_CODE) == set(typing.get_args(messages.ErrorCode))
    for code, cls in errors._BY_CODE.items():
        back = errors.from_reply(cls("x").to_reply())
        assert type(back) is cls and back.code == code
