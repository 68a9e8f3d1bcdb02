"""The TensorRT-LLM backend's selection and argument mapping, against a stand-in ``tensorrt_llm``
module (TensorRT-LLM is not installed where these tests run)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from iserve.errors import UnsupportedModel
from iserve.gpu_agent.engine import trtllm
from iserve.messages import Configuration
from iserve.modelmaker import make_checkpoint


class QuantAlgo:
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    INT8 = "INT8"


@dataclass
class QuantConfig:
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class _Seq:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Out:
    outputs: list[_Seq]


@dataclass
class FakeLLM:
    """Streams ``max_tokens`` tokens 100, 101, ... two at a time, like a streaming RequestOutput."""

    kwargs: dict
    calls: list = field(default_factory=list)
    shut: bool = False

    async def _stream(self, ids, params):
        toks = []
        for t in range(params.max_tokens):
            toks.append(100 + t)
            if len(toks) % 2 == 0 or t == params.max_tokens - 1:
                yield _Out([_Seq(list(toks), "length" if t == params.max_tokens - 1 else None)])

    def generate_async(self, ids, params, streaming=False):
        assert streaming
        self.calls.append((list(ids), params))
        return self._stream(ids, params)

    def shutdown(self):
        self.shut = True


@pytest.fixture
def fake_trt(monkeypatch):
    mod = types.ModuleType("tensorrt_llm")
    api = types.ModuleType("tensorrt_llm.llmapi")
    api.QuantAlgo, api.QuantConfig = QuantAlgo, QuantConfig
    mod.llmapi, mod.SamplingParams = api, SamplingParams
    mod.LLM = lambda **kw: FakeLLM(kw)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", mod)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", api)
    monkeypatch.delenv(trtllm.ENV, raising=False)
    return mod


def test_selection(fake_trt, monkeypatch):
    assert trtllm.available()
    assert trtllm.use_trtllm(Configuration(tp=2, weight_quant="int4"))
    assert not trtllm.use_trtllm(Configuration(pruning="2:4"))  # the LLM API has no pruning knob: torch runs it
    assert not trtllm.use_trtllm(Configuration(), env={"ISERVE_ENGINE": "torch"})
    with pytest.raises(UnsupportedModel, match="structured"):
        trtllm.use_trtllm(Configuration(pruning="structured"), env={"ISERVE_ENGINE": "trtllm"})
    with pytest.raises(UnsupportedModel):
        trtllm.use_trtllm(Configuration(), env={"ISERVE_ENGINE": "vllm"})
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails
    assert not trtllm.available() and not trtllm.use_trtllm(Configuration())
    with pytest.raises(UnsupportedModel, match="does not import"):
        trtllm.use_trtllm(Configuration(), env={"ISERVE_ENGINE": "trtllm"})


def test_llm_kwargs_mapping(fake_trt):
    kw = trtllm.llm_kwargs("/m", Configuration(tp=4, pp=2), 4096)
    assert kw == dict(model="/m", tensor_parallel_size=4, pipeline_parallel_size=2, max_seq_len=4096, max_batch_size=1)
    kw = trtllm.llm_kwargs("/m", Configuration(weight_quant="int8", kv_quant="int8"), 2048)
    assert kw["quant_config"] == QuantConfig(quant_algo="W8A16", kv_cache_quant_algo="INT8")
    kw = trtllm.llm_kwargs("/m", Configuration(weight_quant="int4"), 2048)
    assert kw["quant_config"] == QuantConfig(quant_algo="W4A16")
    with pytest.raises(UnsupportedModel):
        trtllm.llm_kwargs("/m", Configuration(pruning="2:4"), 2048)


def test_engine_streams_through_the_worker_interface(fake_trt, tmp_path):
    path = make_checkpoint(tmp_path / "m", num_layers=1)
    eng = trtllm.TrtLlmEngine.load(path, Configuration(tp=2), 64)
    assert eng._llm.kwargs["tensor_parallel_size"] == 2 and eng.context_tokens == 64
    seen = []
    res = eng.generate([1, 5, 6], max_tokens=5, temperature=0.7, top_p=0.9, seed=3, on_token=seen.append)
    assert res.tokens == seen == [100, 101, 102, 103, 104] and res.finish_reason == "length"
    assert res.ttft_ms > 0 and len(res.step_ms) == 4
    _, params = eng._llm.calls[-1]
    assert (params.temperature, params.top_p, params.seed, params.max_tokens) == (0.7, 0.9, 3, 5)
    greedy = eng.sampling_params(8, 0.0, 1.0, None, True)
    assert greedy.top_k == 1 and greedy.ignore_eos
    stop = eng.generate([1], max_tokens=10, should_stop=lambda: True)
    assert stop.finish_reason == "cancelled" and stop.tokens == [100, 101]
    assert eng.memory_bytes() == [0, 0]
    eng.close()
    assert eng._llm.shut
