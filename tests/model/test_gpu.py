"""GPU path (skipped without CUDA): the tiny checkpoint on the device, batched engine decode."""

import pytest
import torch

from model.generation import generate
from model.loading import LoadOptions, load_model
from model.sampling import SamplingParams
from model.templates import Message

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_checkpoint_generates_on_cuda(tiny_dir, tiny_lm, ironing, dtype):
    lm = load_model(tiny_dir, LoadOptions(device="cuda", dtype=dtype))
    assert not lm.model.llm.batch_invariant and lm.model.llm.lm_head.weight.is_cuda
    msgs = [Message("user", "What is unusual about this image?", 1)]
    gpu = generate(lm, msgs, [ironing], SamplingParams(max_tokens=6, temperature=0))
    cpu = generate(tiny_lm, msgs, [ironing], SamplingParams(max_tokens=6, temperature=0))
    assert gpu.images[0].grid == cpu.images[0].grid and len(gpu.token_ids) == 6
    if dtype == "float32":  # same selection and prompt in full precision
        assert gpu.images[0].local_kept == cpu.images[0].local_kept and gpu.prompt_tokens == cpu.prompt_tokens
