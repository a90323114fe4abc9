"""The decode attention backend is chosen once at load, and every backend decodes the tiny
checkpoint to the same greedy tokens (Triton through its interpreter on the CPU)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from model.execution import Execution, choose
from model.loading import LoadOptions, load_model
from tests.model.greedy import greedy_tokens
from tests.tools import missing_tool

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's kernels on CPU tensors


def test_auto_picks_the_fastest_backend_available():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose("auto", cpu, torch.float32) == Execution("cpu", auto=True, batch_invariant=True, pack=True, fuse=True)
    assert choose("auto", cpu, torch.bfloat16) == Execution("sdpa", auto=True, fuse=True)
    assert choose("auto", cpu, torch.float32, "8bit") == Execution("sdpa", auto=True)
    from model import paged_attention_flash, paged_attention_triton

    if not paged_attention_flash.available():  # (with flash-attn: tests/model/test_attention_flash.py)
        assert choose("auto", cuda, torch.bfloat16) == Execution(
            "triton" if paged_attention_triton.available() else "sdpa", auto=True, fuse=True, cuda_graphs=True)
    assert choose("sdpa", cuda, torch.bfloat16) == Execution("sdpa", fuse=True, cuda_graphs=True)
    assert choose("sdpa", cuda, torch.bfloat16, "4bit") == Execution("sdpa")  # no graphs over bitsandbytes
    # the Triton kernel's rows follow the batch's shape: batch invariance goes with it
    assert not choose("triton", cpu, torch.float32).batch_invariant
    with pytest.raises(ValueError, match="unknown attention backend"):
        choose("xformers", cpu, torch.float32)


def test_the_cpu_backend_refuses_what_it_cannot_run(tiny_dir):
    from model.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="float32"):
        load_model(tiny_dir, LoadOptions(device="cpu", dtype="bfloat16", attention_backend="cpu"))


def test_every_backend_decodes_the_same_greedy_tokens(tiny_dir):
    from model import paged_attention_triton

    if not paged_attention_triton.available():
        missing_tool("triton is not installed (pip install triton)")
    prompts = [[1] + [(7 * i + 3 * j) % 200 + 5 for j in range(5 + 9 * i)] for i in range(4)]
    got = {}
    for backend in ("cpu", "triton", "sdpa"):
        lm = load_model(tiny_dir, LoadOptions(device="cpu", attention_backend=backend))
        assert lm.model.llm.attention_backend == backend
        assert lm.model.llm.batch_invariant == (backend != "triton")
        got[backend], _ = greedy_tokens(lm, prompts, steps=12, max_len=256)
    assert got["triton"] == got["cpu"] == got["sdpa"]


def test_the_triton_backend_serves_through_the_engine(tiny_dir):
    """`--attention-backend triton --device cpu` end to end: the engine's batched, paged decode."""
    import asyncio

    from model import paged_attention_triton
    from model.sampling import SamplingParams
    from server.engine.client import Engine
    from server.engine.runner import ModelRunner
    from server.engine.types import EngineRequest

    if not paged_attention_triton.available():
        missing_tool("triton is not installed (pip install triton)")
    prompts = [[1] + [(5 * i + j) % 200 + 5 for j in range(10 + 20 * i)] for i in range(3)]

    def serve(backend):
        lm = load_model(tiny_dir, LoadOptions(device="cpu", attention_backend=backend))
        engine = Engine(ModelRunner(lm, max_batch_size=4, max_model_len=256))
        with engine:
            async def main():
                streams = [engine.submit(EngineRequest(f"r{i}", p, [], SamplingParams(max_tokens=8, temperature=0,
                                                                                     ignore_eos=True), len(p)))
                           for i, p in enumerate(prompts)]

                async def collect(stream):
                    return [t async for ev in stream for t in ev.token_ids]

                return await asyncio.gather(*(collect(s) for s in streams))

            return asyncio.run(main())

    assert serve("triton") == serve("cpu")


def test_a_triton_kernel_failing_its_warm_up_falls_back_to_sdpa_when_chosen_by_auto(tiny_dir, monkeypatch):
    """No GPU has run the kernel yet: where `auto` picked it and it fails, the server still starts."""
    from model import paged_attention_triton
    from server.engine.runner import ModelRunner

    lm = load_model(tiny_dir, LoadOptions(device="cpu", attention_backend="sdpa"))
    lm.model.llm.set_attention_backend("sdpa")
    monkeypatch.setattr(paged_attention_triton, "available", lambda: True)
    lm.model.llm.set_attention_backend("triton")
    lm.model.llm.execution = replace(lm.model.llm.execution, auto=True)

    def broken(*a, **k):
        raise RuntimeError("simulated: the kernel does not compile for this device")

    monkeypatch.setattr(paged_attention_triton, "paged_decode", broken)
    runner = ModelRunner(lm, max_batch_size=2, max_model_len=128)
    runner.warm_up()
    assert lm.model.llm.attention_backend == "sdpa"
    lm.model.llm.set_attention_backend("triton")
    lm.model.llm.execution = replace(lm.model.llm.execution, auto=False)  # asked for by name: the operator's to see
    with pytest.raises(RuntimeError, match="simulated"):
        ModelRunner(lm, max_batch_size=2, max_model_len=128).warm_up()
