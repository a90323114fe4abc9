import pytest
import torch

from model.loading import LoadOptions, load_model
from tests.tools import missing_tool

try:
    import bitsandbytes as bnb  # noqa: F401 - the `quant` extra; the tests below need it
except ImportError:
    missing_tool("bitsandbytes (the `quant` extra) is not installed")


def _logits(lm, embeds):
    cache = lm.model.llm.new_cache(num_slots=1, max_len=16, dtype=torch.float32, device="cpu")
    return lm.model.llm.logits(lm.model.llm.prefill(embeds, cache, slot=0, start=0))


@pytest.mark.parametrize("mode,cls,min_corr", [("8bit", "Linear8bitLt", 0.999), ("4bit", "Linear4bit", 0.95)])
def test_cpu_quantized_llm_tracks_full_precision(tiny_dir, tiny_lm, mode, cls, min_corr):
    lm = load_model(tiny_dir, LoadOptions(device="cpu", quantization=mode))
    layer = lm.model.llm.model.layers[0]
    assert type(layer.mlp.up_proj).__name__ == cls and type(layer.self_attn.q_proj).__name__ == cls
    assert type(lm.model.llm.lm_head) is torch.nn.Linear  # the head stays in full precision
    torch.manual_seed(0)
    emb = torch.randn(6, lm.cfg.hidden_size)
    a, b = _logits(tiny_lm, emb), _logits(lm, emb)
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > min_corr
