import json
import shutil
import subprocess
import sys

import pytest
import torch

from model.images import load_image
from model.loading import CheckpointError, LoadOptions, load_model
from model.sampling import SamplingParams
from model.templates import Message
from tests.live import ROOT, photo
from weights.make_tiny import make_tiny


def _greedy(lm, image, n=8):
    from model.generation import generate

    return generate(lm, [Message("user", "What is unusual about this image?", 1)], [image],
                    SamplingParams(max_tokens=n, temperature=0))


@pytest.mark.parametrize("fmt,tower", [("sharded", "separate"), ("bin", "separate"), ("safetensors", "embedded")])
def test_every_layout_loads_the_same_model(tmp_path, tiny_lm, ironing, fmt, tower):
    path = make_tiny(tmp_path / fmt, fmt=fmt, tower=tower)
    lm = load_model(path, LoadOptions(device="cpu"))
    a, b = _greedy(lm, ironing), _greedy(tiny_lm, ironing)
    assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens


def test_relative_tower_resolves_against_working_directory(tmp_path, monkeypatch, tiny_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    shutil.move(str(ckpt / "clip-vit-tiny-patch14-336"), str(tmp_path / "towers"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_vision_tower"] = "towers"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vision tower"):
        load_model(ckpt, LoadOptions(device="cpu"))
    monkeypatch.chdir(tmp_path)
    assert load_model(ckpt, LoadOptions(device="cpu")).model.vision_tower is not None


def test_hub_tower_is_not_downloaded_without_permission(tmp_path, tiny_dir, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt, ignore=shutil.ignore_patterns("clip-*"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    import huggingface_hub

    def fail(*a, **k):
        raise AssertionError("no download may happen")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match="weights.download"):
        load_model(ckpt, LoadOptions(device="cpu"))


def test_bad_weights_name_missing_unexpected_and_misshaped_keys(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "bad"
    shutil.copytree(tiny_dir, ckpt)
    sd = load_file(ckpt / "model.safetensors")
    del sd["model.norm.weight"]
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    sd["model.something_else"] = torch.zeros(1)
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt, LoadOptions(device="cpu"))
    msg = str(e.value)
    assert "missing keys (1): model.norm.weight" in msg
    assert "unexpected keys (1): model.something_else" in msg
    assert "model.layers.0.mlp.up_proj.weight: checkpoint [3, 3]" in msg


def test_llava_projector_checkpoint_loads_and_generates(tmp_path, ironing):
    path = make_tiny(tmp_path / "llava", projector="mlp2x_gelu")
    lm = load_model(path, LoadOptions(device="cpu"))
    r = _greedy(lm, ironing, n=4)
    assert r.images[0].local_tokens == 0 and r.images[0].global_tokens == 576
    assert len(r.token_ids) == 4


def test_bfloat16_load_keeps_pos_embed_in_float16(tiny_dir):
    lm = load_model(tiny_dir, LoadOptions(device="cpu", dtype="bfloat16"))
    assert lm.model.llm.lm_head.weight.dtype == torch.bfloat16
    assert lm.model.post_qformer.pos_embed.dtype == torch.float16


def test_greedy_output_depends_on_image_and_selector_keeps_strict_subset(tiny_lm, ironing, waterview):
    a, b = _greedy(tiny_lm, ironing), _greedy(tiny_lm, waterview)
    assert a.token_ids != b.token_ids
    for r in (a, b):
        img = r.images[0]
        assert 0 < img.local_kept < img.local_tokens
        assert r.prompt_tokens > img.global_tokens + 1 + img.local_kept


def test_cli_json(tiny_dir, tiny_lm, ironing):
    out = subprocess.run([sys.executable, "-m", "model.cli", "--model", str(tiny_dir), "--image",
                          str(photo("extreme_ironing.jpg")), "--prompt", "What is unusual about this image?",
                          "--max-new-tokens", "8", "--json", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    ref = _greedy(tiny_lm, ironing)
    assert data["token_ids"] == ref.token_ids
    assert data["prompt_tokens"] == ref.prompt_tokens
    img = data["images"][0]
    assert img["grid"] == [2, 1] and img["views"] == 3 and img["global_tokens"] == 576
    assert img["local_tokens"] == 288 and img["local_kept"] == ref.images[0].local_kept
    assert data["text"] == ref.text and data["finish_reason"] == ref.finish_reason == "length"
    # prompt positions = the prompt's text tokens + the image's rows (global, one separator, kept local)
    from model.generation import prepare_prompt

    ids, _ = prepare_prompt(tiny_lm, [Message("user", "What is unusual about this image?", 1)], [])
    assert ids.count(-200) == 1
    assert data["prompt_tokens"] == len(ids) - 1 + img["global_tokens"] + 1 + img["local_kept"]


def test_cli_reports_unusable_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "model.cli", "--model", str(tmp_path), "--prompt", "hi"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "config.json" in out.stderr


def test_llama3_checkpoint_stops_at_eot(tiny_llama3_dir, ironing):
    from tests.forced_eos import expected_stop, force_eos

    lm = load_model(tiny_llama3_dir, LoadOptions(device="cpu"))
    assert lm.template == "llama3"
    eot = lm.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in lm.eos_token_ids
    free = _greedy(lm, ironing, n=6)
    assert free.prompt_tokens > 576 and free.finish_reason == "length" and len(free.token_ids) == 6
    # The model now emits <|eot_id|> where it would emit its third token: generation ends there.
    force_eos(lm, eot, free.token_ids[2])
    want = expected_stop(free.token_ids, free.token_ids[2], eot)
    r = _greedy(lm, ironing, n=6)
    assert r.token_ids == want and len(want) <= 3
    assert r.finish_reason == "stop"
    assert r.text == lm.tokenizer.decode(want[:-1], skip_special_tokens=True).strip()
    assert "eot" not in r.text


def test_image_modes_are_converted(tmp_path):
    from PIL import Image

    base = Image.new("RGB", (40, 30), (200, 100, 50))
    for mode in ("P", "RGBA", "L", "CMYK", "I;16", "LA", "1"):
        img = base.convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30), 40000)
        path = tmp_path / f"x_{mode.replace(';', '')}.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
        img.save(path)
        out = load_image(path)
        assert out.mode == "RGB" and out.size == (40, 30)
    assert load_image(tmp_path / "x_I16.tiff").getpixel((0, 0))[0] == round(40000 * 255 / 65535)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (20, 40)


def test_the_deprecated_attention_option_maps_to_a_backend(tiny_dir, caplog):
    lm = load_model(tiny_dir, LoadOptions(device="cpu", attention="sdpa"))
    assert lm.model.llm.attention_backend == "cpu"  # the CPU's auto choice: flash was never in it
    assert "--attention is deprecated" in caplog.text
    with pytest.raises(CheckpointError, match="flash attention backend needs a CUDA device"):
        load_model(tiny_dir, LoadOptions(device="cpu", attention="flash_attention_2"))
    with pytest.raises(CheckpointError, match="not --attention-backend triton"):
        load_model(tiny_dir, LoadOptions(device="cpu", attention="flash_attention_2", attention_backend="triton"))
    with pytest.raises(CheckpointError, match="contradicts --attention-backend flash"):
        load_model(tiny_dir, LoadOptions(device="cpu", attention="sdpa", attention_backend="flash"))
    with pytest.raises(CheckpointError, match="unknown attention"):
        load_model(tiny_dir, LoadOptions(device="cpu", attention="xformers"))


def test_tower_preprocessor_config_sets_normalisation(tmp_path, tiny_dir, ironing):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    pre = ckpt / "clip-vit-tiny-patch14-336" / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    assert data["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    data["image_mean"], data["image_std"] = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    pre.write_text(json.dumps(data))
    lm = load_model(ckpt, LoadOptions(device="cpu"))
    assert lm.image_norm.mean == (0.5, 0.5, 0.5)
    from model.processor import prepare_image

    px = prepare_image(ironing.resize((50, 40)), lm.cfg, norm=lm.image_norm).pixels
    assert px.min() >= -2.0 - 1e-6 and px.max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25 for x in [0, 1]


def test_gate_weights_keep_the_references_bfloat16_precision(tiny_dir, tiny_lm):
    """The reference creates w_gate as bfloat16, so a float32 checkpoint value is rounded on load."""
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.mm_projector.w_gate")
    assert stored.dtype == torch.float32 and not torch.equal(stored, stored.bfloat16().float())
    loaded = tiny_lm.model.mm_projector.w_gate
    assert loaded.dtype == torch.float32 and torch.equal(loaded, stored.bfloat16().float())


def test_embedded_tower_takes_hyperparameters_from_the_named_tower_config(tmp_path, ironing):
    """Heads cannot be read from shapes: with the tower's config.json beside, it is used."""
    path = make_tiny(tmp_path / "emb", tower="embedded")
    tower = tmp_path / "emb" / "clip-vit-tiny-patch14-336"
    tower.mkdir()
    from weights.tiny_parts import VISION

    (tower / "config.json").write_text(json.dumps({**VISION, "num_attention_heads": 4}))
    lm = load_model(path, LoadOptions(device="cpu"))
    assert lm.model.vision_tower.layers[0].self_attn.num_heads == 4
    shutil.rmtree(tower)
    assert load_model(path, LoadOptions(device="cpu")).model.vision_tower.layers[0].self_attn.num_heads == 2
