"""The torch engine and the TensorRT-LLM engine both offer what the worker asks of an engine."""

from __future__ import annotations

import inspect

import pytest

from iserve.gpu_agent.engine import Engine
from iserve.gpu_agent.engine.protocol import InferenceEngine
from iserve.gpu_agent.engine.trtllm import TrtLlmEngine

MEMBERS = [n for n in vars(InferenceEngine) if not n.startswith("_")]


def test_the_protocol_names_what_the_worker_uses():
    assert sorted(MEMBERS) == [
        "close",
        "context_tokens",
        "generate",
        "graphs_captured",
        "kernels",
        "memory_bytes",
        "prefill_graph_tokens",
        "tokenizer",
    ]


@pytest.mark.parametrize("cls", [Engine, TrtLlmEngine])
def test_both_engines_have_every_member_of_the_protocol(cls):
    for name in MEMBERS:
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
    want = inspect.signature(InferenceEngine.generate).parameters
    got = inspect.signature(cls.generate).parameters
    assert list(got) == list(want)
