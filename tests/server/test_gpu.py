"""The real server on a CUDA device (skipped without one): streams decoded through CUDA graphs
give what eager decoding gives, and the graphs show in /metrics."""

import concurrent.futures

import pytest
import torch

from server.settings import Settings

from .conftest import LiveServer, data_url, image_message

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _answers(tiny_dir, ironing, cuda_graphs: bool) -> tuple[list[str], float]:
    import openai

    srv = LiveServer(Settings(model=str(tiny_dir), device="cuda", dtype="float32", max_batch_size=8,
                              cuda_graphs=cuda_graphs)).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        image = data_url(ironing.resize((500, 350)), "JPEG")

        def ask(i: int) -> str:
            msg = image_message(f"Question {i}: what is here?", image) if i % 2 else \
                {"role": "user", "content": f"Tell me a story number {i}."}
            stream = client.chat.completions.create(model=tiny_dir.name, messages=[msg], max_tokens=24 + 4 * i,
                                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        return answers, srv.metric("slime_decode_cuda_graphs")
    finally:
        srv.stop()


def test_streams_through_decode_graphs_match_eager(tiny_dir, ironing):
    graphed, graphs = _answers(tiny_dir, ironing, True)
    eager, none = _answers(tiny_dir, ironing, False)
    assert graphs >= 2 and none == 0
    assert all(graphed) and graphed == eager
