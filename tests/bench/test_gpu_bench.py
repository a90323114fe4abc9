"""bench.gpu's decode loop, run on the CPU with the tiny checkpoint (the benchmark itself needs CUDA)."""

import pytest
import torch

from bench.gpu import decode_rate


@pytest.mark.parametrize("graphs", [False, True])
def test_decode_rate_runs_both_paths(tiny_lm, graphs):
    row = decode_rate(tiny_lm.model.llm, 3, graphs=graphs, context=50, steps=4, dtype=torch.float32)
    assert row["mode"] == ("graphs" if graphs else "eager") and row["batch"] == 3
    assert row["step_ms"] > 0 and row["tok_s"] == pytest.approx(3 / row["step_ms"] * 1e3)


def test_main_says_it_needs_a_gpu(capsys):
    from bench.gpu import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    assert main([]) == 2 and "needs a GPU" in capsys.readouterr().out
