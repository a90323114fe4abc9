"""LoRA checkpoints (SliME-Llama3-70B's layout): the tiny one, our merge against peft's
merge_and_unload, merge_lora's export, verify's diagnoses and the download of checkpoint + base."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError
from model.loading import LoadOptions, load_model
from model.lora import LoraSource
from tests.live import ROOT
from tests.tools import missing_tool
from weights.merge_lora import merge_lora
from weights.tiny_lora import TARGETS, make_tiny_lora
from weights.verify import verify

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def peft():
    try:
        import peft
    except ImportError:
        missing_tool("peft is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return peft


def _copy(src, dst, **config_changes):
    """A copy of a LoRA checkpoint with adapter_config.json edited."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _peft_merged(peft, lora, base) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(lora)).merge_and_unload().state_dict()


def test_tiny_lora_layout_is_the_reference_one_and_deterministic(tmp_path, tiny_lora):
    lora, base = tiny_lora
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], set(cfg["target_modules"])) == (8, 16, set(TARGETS))
    assert cfg["base_model_name_or_path"] == str(base)
    adapter = load_file(lora / ADAPTER)
    layers = json.loads((lora / "config.json").read_text())["num_hidden_layers"]
    assert len(adapter) == layers * len(TARGETS) * 2
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B trained, not peft's zeros
    trainables = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    assert all(k.startswith("base_model.model.model.") for k in trainables)
    assert any(".mm_projector." in k for k in trainables) and any(".sampler.post_qformer." in k for k in trainables)
    assert not any(k.endswith("pos_embed") for k in trainables)  # frozen in training, so not saved
    assert (base / "tokenizer.json").exists() and not (lora / "tokenizer.json").exists()

    again, again_base = make_tiny_lora(tmp_path / "again")
    assert again_base == tmp_path / "again-base"
    for rel in (ADAPTER, "config.json"):
        assert (again / rel).read_bytes() == (lora / rel).read_bytes()
    assert (again_base / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    again_trainables = torch.load(again / "non_lora_trainables.bin", weights_only=True)
    assert all(torch.equal(again_trainables[k], v) for k, v in trainables.items())


def test_the_tiny_base_is_the_tiny_checkpoints_llm(tmp_path, tiny_lora):
    from weights.make_tiny import make_tiny

    full = load_file(make_tiny(tmp_path / "full", template="llama3") / "model.safetensors")
    base = load_file(tiny_lora[1] / "model.safetensors")
    assert set(base) == {k for k in full if not k.startswith(("model.mm_projector.", "model.sampler."))}
    assert all(torch.equal(base[k], full[k]) for k in base)


def test_make_tiny_cli_writes_both(tmp_path):
    out = subprocess.run([sys.executable, "-m", "weights.make_tiny", "--lora", str(tmp_path / "l"), "--lora-base",
                          str(tmp_path / "b")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "l"), str(tmp_path / "b")]
    assert verify(tmp_path / "l", tmp_path / "b")["ok"]


def test_loaded_llm_equals_peft_merge_and_unload_bit_for_bit(peft, tiny_lora):
    """Exact equality, not a tolerance: in float32 both compute W + (B @ A) * (alpha / r) with the
    same operations in the same order on the same CPU kernels, so every bit must agree."""
    lora, base = tiny_lora
    ref = _peft_merged(peft, lora, base)
    lm = load_model(lora, LoadOptions(device="cpu", model_base=base))
    ours = lm.model.llm.state_dict()
    assert set(ours) == set(ref)
    different = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not different, different
    plain = load_file(base / "model.safetensors")
    merged = {k for k in ref if not torch.equal(ref[k], plain[k])}
    assert len(merged) == lm.stats["lora_merged_weights"] == 2 * 7  # every projection of both layers, nothing else
    # ... and the non-LoRA trainables, renamed as the reference renames them, are what was loaded
    trainables = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    names = {theirs: ours for ours, theirs in lm.model.checkpoint_names().items()}
    loaded = 0
    for key, value in trainables.items():
        key = key.removeprefix("base_model.model.")
        if key.endswith(("w_noise", "mean", "std")):  # training-only tensors inference never loads
            continue
        if key.endswith("w_gate"):  # the reference creates the gate in bfloat16 (see loading._load_weights)
            value = value.to(torch.bfloat16).float()
        assert torch.equal(lm.model.get_parameter(names[key]), value), key
        loaded += 1
    assert loaded == len(trainables) - 3


def _rank_4_q_proj(lora):
    """Cut every q_proj adapter to rank 4 (what rank_pattern {"q_proj": 4} trains)."""
    tensors = load_file(lora / ADAPTER)
    for k, v in tensors.items():
        if ".q_proj.lora_A" in k:
            tensors[k] = v[:4].contiguous()
        elif ".q_proj.lora_B" in k:
            tensors[k] = v[:, :4].contiguous()
    save_file(tensors, lora / ADAPTER, metadata={"format": "pt"})


@pytest.mark.parametrize("changes", [{"use_rslora": True},
                                     {"alpha_pattern": {"v_proj": 32, "mlp.down_proj": 4}},
                                     {"rank_pattern": {"q_proj": 4}},
                                     {"fan_in_fan_out": True}],
                         ids=["rslora", "alpha_pattern", "rank_pattern", "fan_in_fan_out"])
def test_adapter_options_merge_as_peft_merges_them(peft, tmp_path, tiny_lora, changes):
    lora, base = tiny_lora
    variant = _copy(lora, tmp_path / "variant", **changes)
    if "rank_pattern" in changes:
        _rank_4_q_proj(variant)
    ref = _peft_merged(peft, variant, base)
    with LoraSource(variant, base) as src, LoraSource(lora, base) as plain:
        assert all(torch.equal(src.get(k), ref[k]) for k in ref)
        changed = any(not torch.equal(src.get(k), plain.get(k)) for k in src.pairs)
    assert changed == ("fan_in_fan_out" not in changes)  # peft ignores fan_in_fan_out on Linear layers


@pytest.mark.parametrize("changes,named", [({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias='all'"),
                                           ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                           ({"peft_type": "IA3"}, "not LORA")])
def test_unsupported_adapter_options_are_refused_by_name(tmp_path, tiny_lora, changes, named):
    lora, base = tiny_lora
    variant = _copy(lora, tmp_path / "variant", **changes)
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(")):
        LoraSource(variant, base)
    assert any(named in p for p in verify(variant, base)["problems"])


def test_merged_export_loads_the_same_model(tmp_path, tiny_lora):
    lora, base = tiny_lora
    out = merge_lora(lora, base, tmp_path / "merged", shard_bytes=400_000)
    assert (out / "model.safetensors.index.json").exists()  # sharded: the whole model is never in one dict
    assert (out / "tokenizer.json").exists() and (out / "clip-vit-tiny-patch14-336" / "config.json").exists()
    assert not (out / "adapter_config.json").exists()
    assert verify(out)["ok"]
    a = load_model(lora, LoadOptions(device="cpu", model_base=base)).model.state_dict()
    b = load_model(out, LoadOptions(device="cpu")).model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="not empty"):
        merge_lora(lora, base, out)


def test_bfloat16_export_rounds_once_like_bfloat16_loading(tmp_path, tiny_lora):
    """The merge is done in float32 and rounded once, whether at export or at load time."""
    from weights.merge_lora import main

    lora, base = tiny_lora
    assert main(["--model", str(lora), "--model-base", str(base), "--out", str(tmp_path / "bf16"),
                 "--dtype", "bfloat16"]) == 0
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert stored["model.mm_projector.attn.pos_embed"].dtype == torch.float16
    a = load_model(lora, LoadOptions(device="cpu", dtype="bfloat16", model_base=base)).model.state_dict()
    b = load_model(tmp_path / "bf16", LoadOptions(device="cpu", dtype="bfloat16")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- verify -----------------------------------------------------------------------------------------

def test_verify_lora_without_and_with_its_base(tiny_dir, tiny_lora):
    lora, base = tiny_lora
    report = verify(lora)
    assert not report["ok"] and str(base) in report["problems"][0] and "--model-base" in report["problems"][0]
    out = subprocess.run([sys.executable, "-m", "weights.verify", str(lora), "--model-base", str(base)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    assert verify(lora, base)["lora"]["merged_weights"] == 14
    assert "not a LoRA checkpoint" in verify(tiny_dir, base)["problems"][0]


def _edit_adapter(lora, edit):
    tensors = load_file(lora / ADAPTER)
    edit(tensors)
    save_file(tensors, lora / ADAPTER, metadata={"format": "pt"})


def _wrong_lora_b(t):
    t["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"] = torch.zeros(3, 8)


def _stray_key(t):
    t["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] = torch.zeros(8)


def _drop_o_proj(t):
    del t["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"]
    del t["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"]


@pytest.mark.parametrize("breakage,expect", [
    ({"r": 4}, "disagree on shapes or rank (14)"),
    (_wrong_lora_b, "model.layers.1.mlp.up_proj: lora_A [8, 64], lora_B [3, 8]; base weight [176, 64]"),
    ({"target_modules": [t for t in TARGETS if t != "down_proj"]}, "unused adapter keys (4;"),
    (_stray_key, "unused adapter keys (1;"),
    (_drop_o_proj, "no weights for 1 targeted module(s) (a different base or a truncated adapter?): "
                   "model.layers.1.self_attn.o_proj.weight"),
], ids=["rank", "shape", "untargeted", "stray", "uncovered"])
def test_verify_names_what_breaks_a_lora_checkpoint(tmp_path, tiny_lora, breakage, expect):
    lora, base = tiny_lora
    broken = _copy(lora, tmp_path / "broken", **(breakage if isinstance(breakage, dict) else {}))
    if callable(breakage):
        _edit_adapter(broken, breakage)
    report = verify(broken, base)
    assert not report["ok"]
    assert any(expect in p for p in report["problems"]), report["problems"]
    with pytest.raises(CheckpointError, match="LoRA checkpoint"):
        load_model(broken, LoadOptions(device="cpu", model_base=base))


def test_verify_names_missing_non_lora_trainables(tmp_path, tiny_lora):
    lora, base = tiny_lora
    gone = _copy(lora, tmp_path / "gone")
    (gone / "non_lora_trainables.bin").unlink()
    report = verify(gone, base)
    assert any("non_lora_trainables.bin is missing" in p for p in report["problems"])
    assert "model.mm_projector.projection.0.weight" in report["missing"]
    partial = _copy(lora, tmp_path / "partial")
    trainables = torch.load(partial / "non_lora_trainables.bin", weights_only=True)
    del trainables["base_model.model.model.mm_projector.w_gate"]
    torch.save(trainables, partial / "non_lora_trainables.bin")
    report = verify(partial, base)
    assert report["missing"] == ["model.mm_projector.w_gate"]
    assert any("in neither the base model nor non_lora_trainables.bin" in p for p in report["problems"])
    with pytest.raises(CheckpointError, match=r"missing keys \(1\) \(in neither the base model nor "
                                              r"non_lora_trainables.bin\): model.mm_projector.w_gate"):
        load_model(partial, LoadOptions(device="cpu", model_base=base))


# -- download ---------------------------------------------------------------------------------------

def test_download_fetches_lora_checkpoint_its_tower_and_its_base(tmp_path, tiny_lora, monkeypatch, capsys):
    """The hub is replaced by local copies: the tool must ask for the checkpoint, its tower, then
    the known base of the official 70B LoRA (its adapter config names a training-machine path)."""
    import huggingface_hub

    from weights import download as dl

    lora, base = tiny_lora
    calls = []

    def fake_snapshot(repo_id, local_dir, **kw):
        calls.append((repo_id, kw.get("ignore_patterns")))
        src = {"yifanzhang114/SliME-llama3-70B": lora, "openai/clip-tiny": lora / "clip-vit-tiny-patch14-336",
               "meta-llama/Meta-Llama-3-70B-Instruct": base}[repo_id]
        shutil.copytree(src, local_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("clip-*"))
        if repo_id.startswith("yifanzhang114/"):
            cfg = json.loads((src / "config.json").read_text())
            cfg["mm_vision_tower"] = "openai/clip-tiny"
            (Path(local_dir) / "config.json").write_text(json.dumps(cfg))
            adapter = json.loads((src / "adapter_config.json").read_text())
            adapter["base_model_name_or_path"] = "/mnt/data/train/Meta-Llama-3-70B-Instruct"
            (Path(local_dir) / "adapter_config.json").write_text(json.dumps(adapter))
        return local_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: ["model.safetensors"])
    assert dl.main(["yifanzhang114/SliME-llama3-70B"]) == 0
    assert [c[0] for c in calls] == ["yifanzhang114/SliME-llama3-70B", "openai/clip-tiny",
                                     "meta-llama/Meta-Llama-3-70B-Instruct"]
    assert calls[2][1] == ["original/*"]  # not Meta's second copy of the weights
    path, base_path = (tmp_path / p for p in capsys.readouterr().out.split())
    assert base_path == tmp_path / "checkpoints" / "Meta-Llama-3-70B-Instruct"
    report = verify(path, base_path)
    assert report["ok"], report
    assert load_model(path, LoadOptions(device="cpu", model_base=base_path)).model.vision_tower is not None


def test_lora_base_repository_resolution(tiny_lora):
    from weights.download import lora_base_repo

    lora, _ = tiny_lora
    assert lora_base_repo(lora, "yifanzhang114/SliME-Llama3-70B") == "meta-llama/Meta-Llama-3-70B-Instruct"
    assert lora_base_repo(lora, "someone/else", base="org/base") == "org/base"
    with pytest.raises(ValueError, match="--base"):
        lora_base_repo(lora, "someone/else")  # the tiny adapter names a local path, not a hub id
