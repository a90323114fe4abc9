"""The real server on a CUDA device (skipped without one): concurrent streams decode through CUDA
graphs captured at start-up (and with `--no-cuda-graphs` without them), every one to its length,
and the graphs show in /metrics.

Token-for-token agreement of graphs and eager decoding is checked in tests/model/test_gpu.py, step
by step on the same batch. Across two servers it cannot be: GPU decoding is not batch-invariant,
concurrent requests meet in batches that depend on timing, and the random tiny model's logits are
flat enough for a last-bit difference to change a greedy token (seen on an H200 at token ~5 of an
image request in 3 of 5 runs).
"""

import concurrent.futures

import pytest
import torch

from server.settings import Settings

from .conftest import LiveServer, data_url, image_message

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _answers(tiny_dir, ironing, cuda_graphs: bool, engine_process: bool = False) -> tuple[list[tuple[str, int]], float]:
    import openai

    srv = LiveServer(Settings(model=str(tiny_dir), device="cuda", dtype="float32", max_batch_size=8,
                              cuda_graphs=cuda_graphs, engine_process=engine_process)).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        image = data_url(ironing.resize((500, 350)), "JPEG")

        def ask(i: int) -> tuple[str, int]:
            msg = image_message(f"Question {i}: what is here?", image) if i % 2 else \
                {"role": "user", "content": f"Tell me a story number {i}."}
            stream = client.chat.completions.create(model=tiny_dir.name, messages=[msg], max_tokens=24 + 4 * i,
                                                    temperature=0, stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True})
            text, tokens = "", 0
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            assert tokens == 24 + 4 * i
            return text, tokens

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        return answers, srv.metric("slime_decode_cuda_graphs")
    finally:
        srv.stop()


def test_streams_decode_through_graphs_captured_at_start_up(tiny_dir, ironing):
    graphed, graphs = _answers(tiny_dir, ironing, True)
    eager, none = _answers(tiny_dir, ironing, False)
    assert graphs == 4 * 16 and none == 0  # captured at start-up: batch buckets 1-8 x key spans to 4,096
    for (g, g_tokens), (e, e_tokens) in zip(graphed, eager):
        assert g and e and g_tokens == e_tokens


def test_the_engine_process_serves_on_cuda(tiny_dir, ironing):
    """`--engine-process` on a GPU: CUDA initialised in a spawned process, graphs captured there."""
    answers, graphs = _answers(tiny_dir, ironing, True, engine_process=True)
    assert graphs == 4 * 16 and all(text for text, _ in answers)
