import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from tests.live import ROOT
from weights.make_tiny import make_tiny
from weights.verify import verify


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_make_tiny_is_deterministic(tmp_path, tiny_dir):
    again = make_tiny(tmp_path / "again")
    assert _digest(again) == _digest(tiny_dir)
    assert (again / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    other = make_tiny(tmp_path / "other", seed=5)
    assert _digest(other) != _digest(tiny_dir)


def test_tiny_layout_is_official(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "gated"
    assert cfg["mm_hidden_size"] == 128 and cfg["mm_resampler_type"] == "cosine"
    assert cfg["seperator"] < cfg["vocab_size"]
    tower = json.loads((tiny_dir / cfg["mm_vision_tower"] / "config.json").read_text())
    assert (tower["image_size"] // tower["patch_size"]) ** 2 == 576


def test_verify_ok_and_broken(tmp_path, tiny_dir):
    report = verify(tiny_dir)
    assert report["ok"], report
    assert report["parameters"]["llm"] > 0
    out = subprocess.run([sys.executable, "-m", "weights.verify", str(tiny_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    report = verify(broken)
    assert not report["ok"] and any("layers.2" in k for k in report["missing"])
    out = subprocess.run([sys.executable, "-m", "weights.verify", str(broken)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "UNUSABLE" in out.stdout


def test_download_fetches_checkpoint_then_its_tower(tmp_path, tiny_dir, monkeypatch):
    """The hub is replaced by a local copy: the tool must ask for the checkpoint, then the tower."""
    import huggingface_hub

    from weights import download as dl

    calls = []

    def fake_snapshot(repo_id, local_dir, **kw):
        calls.append(repo_id)
        src = tiny_dir if repo_id == "org/SliME-tiny" else tiny_dir / "clip-vit-tiny-patch14-336"
        shutil.copytree(src, local_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("clip-*"))
        if repo_id == "org/SliME-tiny":
            cfg = json.loads((src / "config.json").read_text())
            cfg["mm_vision_tower"] = "openai/clip-tiny"
            (tmp_path / "out").mkdir(exist_ok=True)
            with open(f"{local_dir}/config.json", "w") as f:
                json.dump(cfg, f)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: ["model.safetensors"])
    path = dl.download("org/SliME-tiny", tmp_path / "out")
    assert calls == ["org/SliME-tiny", "openai/clip-tiny"]
    assert verify(path)["ok"]
    from model.loading import LoadOptions, load_model

    assert load_model(path, LoadOptions(device="cpu")).model.vision_tower is not None


@pytest.mark.parametrize("size,params", [("small", (18e6, 24e6))])
def test_benchmark_sizes_load_and_serve_a_request(tmp_path, size, params):
    from model.generation import generate
    from model.loading import LoadOptions, load_model
    from model.sampling import SamplingParams
    from model.templates import Message
    from weights.make_tiny import make_tiny
    from weights.tiny_parts import SIZES

    path = make_tiny(tmp_path / size, size=size)
    lm = load_model(path, LoadOptions(device="cpu"))
    cfg = SIZES[size]
    assert (lm.cfg.hidden_size, lm.cfg.num_hidden_layers, lm.cfg.num_key_value_heads) == (
        cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"])
    layers = sum(p.numel() for n, p in lm.model.llm.named_parameters() if ".layers." in n)
    assert params[0] < layers < params[1]
    out = generate(lm, [Message("user", "hi")], [], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3
