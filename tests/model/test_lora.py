"""Serving a LoRA checkpoint (SliME-Llama3-70B's layout): `--model-base` from the flag to the loader,
the same tokens as its merged export over real HTTP, 4-bit after the merge, the missing-base error,
and the weights-fit check that runs before loading on a GPU."""

import httpx
import pytest
import torch

from model.checkpoint import CheckpointError
from model.config import SliMEConfig, VisionConfig
from model.fit import check_fits, weight_bytes
from model.loading import LoadOptions, load_model
from server.settings import Settings, parse_args
from tests.live import LiveServer, data_url, image_message


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_lora):
    from weights.merge_lora import merge_lora

    return merge_lora(*tiny_lora, tmp_path_factory.mktemp("merged") / "tiny-merged")


def test_lora_without_base_names_the_base_it_needs(tiny_lora, tiny_dir, capsys):
    from model.cli import main

    lora, base = tiny_lora
    with pytest.raises(CheckpointError) as e:
        load_model(lora, LoadOptions(device="cpu"))
    assert f"names '{base}'" in str(e.value) and "--model-base" in str(e.value) and "merge_lora" in str(e.value)
    assert main(["--model", str(lora), "--prompt", "hi", "--device", "cpu"]) == 1
    assert "is a LoRA checkpoint: it needs its base model" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is not a LoRA checkpoint"):
        load_model(tiny_dir, LoadOptions(device="cpu", model_base=base))


def test_model_base_setting_reaches_the_engine_config(tiny_lora, monkeypatch):
    lora, base = tiny_lora
    config = parse_args(["--model", str(lora), "--model-base", str(base)]).engine_config()
    assert (config.model, config.model_base) == (lora, base)
    monkeypatch.setenv("SLIME_MODEL_BASE", str(base))
    assert Settings(model=str(lora)).engine_config().model_base == base
    monkeypatch.delenv("SLIME_MODEL_BASE")
    assert Settings().engine_config().model_base is None


def _answers(settings: Settings, image_url: str) -> list[tuple[str, dict]]:
    with LiveServer(settings) as server:
        out = []
        for message in ({"role": "user", "content": "Describe a quiet harbour."},
                        image_message("What is unusual about this image?", image_url)):
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
                "model": settings.model_id, "messages": [message], "max_tokens": 12, "temperature": 0,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            body = r.json()
            out.append((body["choices"][0]["message"]["content"], body["usage"]))
        return out


def test_lora_serves_the_tokens_of_its_merged_export(tiny_lora, merged, ironing):
    """Real HTTP servers, greedy: one on the LoRA checkpoint with --model-base, one on its merged
    export. Same text and the same prompt length (image rows included) for a text and an image
    request."""
    lora, base = tiny_lora
    url = data_url(ironing.resize((300, 200)))
    a = _answers(Settings(model=str(lora), model_base=str(base), device="cpu", served_model_name="m"), url)
    b = _answers(Settings(model=str(merged), device="cpu", served_model_name="m"), url)
    assert a == b
    assert all(len(text) > 0 for text, _ in a)
    assert a[1][1]["prompt_tokens"] > a[0][1]["prompt_tokens"] + 576  # the image's rows were in the prompt


def test_lora_deltas_change_the_answers(tmp_path, tiny_lora, ironing):
    """The adapter matters: with lora_B zeroed (peft's initial state) the same request decodes
    to other tokens, so equal tokens above are not equal by accident."""
    import shutil

    from safetensors.torch import load_file, save_file

    from model.generation import generate
    from model.sampling import SamplingParams
    from model.templates import Message

    lora, base = tiny_lora
    zero = tmp_path / "zero"
    shutil.copytree(lora, zero)
    tensors = load_file(lora / "adapter_model.safetensors")
    tensors = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, zero / "adapter_model.safetensors", metadata={"format": "pt"})
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    runs = [generate(load_model(d, LoadOptions(device="cpu", model_base=base)),
                     [Message("user", "What is unusual about this image?", 1)], [ironing], params).token_ids
            for d in (lora, zero)]
    assert runs[0] != runs[1]


def test_4bit_quantizes_the_merged_weights(tiny_lora, merged):
    """Quantization comes after the merge: the LoRA checkpoint in 4-bit holds exactly the
    quantized weights of its merged export in 4-bit (layer by layer, as it is loaded)."""
    from tests.tools import missing_tool

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        missing_tool("bitsandbytes (the `quant` extra) is not installed")
    lora, base = tiny_lora
    a = load_model(lora, LoadOptions(device="cpu", quantization="4bit", model_base=base)).model.llm
    b = load_model(merged, LoadOptions(device="cpu", quantization="4bit")).model.llm
    for la, lb in zip(a.model.layers, b.model.layers):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            qa, qb = la.get_submodule(name), lb.get_submodule(name)
            assert type(qa).__name__ == "Linear4bit"
            assert torch.equal(qa.weight.data, qb.weight.data)
            assert torch.equal(qa.weight.quant_state.absmax, qb.weight.quant_state.absmax)


LLAMA3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0, mm_vision_tower="clip",
                  mm_hidden_size=1024, mm_projector_type="gated", mm_resampler_type="cosine")


def test_weights_fit_check_for_the_70b():
    from model.modeling import SliMEForCausalLM

    with torch.device("meta"):
        model = SliMEForCausalLM(SliMEConfig.from_dict(LLAMA3_70B), VisionConfig())
    bf16, nf4 = weight_bytes(model, torch.bfloat16), weight_bytes(model, torch.bfloat16, "4bit")
    assert 139e9 < bf16 < 144e9 and 38e9 < nf4 < 42e9  # README's memory table
    with pytest.raises(CheckpointError) as e:
        check_fits(model, torch.bfloat16, "none", free=79e9, total=80e9, device="cuda:0")
    msg = str(e.value)
    assert "need about 142 GB (bfloat16)" in msg and "79 GB free of 80 GB" in msg
    assert "--quantization 4bit (about 40 GB)" in msg and "not supported yet" in msg
    check_fits(model, torch.bfloat16, "4bit", free=79e9, total=80e9, device="cuda:0")
    with pytest.raises(CheckpointError, match="more free memory") as e:
        check_fits(model, torch.bfloat16, "4bit", free=30e9, total=40e9, device="cuda:0")
    assert "--quantization" not in str(e.value)
