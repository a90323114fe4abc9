"""Loading a checkpoint in the official layout onto a device, memory-frugally.

Modules are built on the meta device; each tensor is then read on its own (memory-mapped),
converted straight to the target dtype and device and assigned. No float32 copy of the whole
model ever exists on the way to bf16/fp16. A LoRA checkpoint (SliME-Llama3-70B) is read through
`lora.LoraSource`, which merges each adapted weight as it is read; with quantization, each
decoder layer is quantized as soon as it is loaded, so the full-precision LLM is never on the
device whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, TensorSource, weight_files
from . import execution
from .config import SliMEConfig, VisionConfig
from .fit import check_fits_on_device
from .lora import LoraSource, llm_linear_shapes, open_weights
from .modeling import SliMEForCausalLM
from .slicing import CLIP_NORM, ImageNorm
from .templates import detect_template

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VISION_PREFIX = "model.vision_tower.vision_tower."
# Keys official checkpoints carry that inference does not use.
_IGNORED_SUFFIXES = ("mm_projector.w_noise", "mm_projector.mean", "mm_projector.std", "rotary_emb.inv_freq",
                     "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias",
                     "vision_model.embeddings.position_ids")


@dataclass
class LoadOptions:
    device: str = "auto"  # auto | cuda | cpu | cuda:N
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    quantization: str = "none"  # none | 8bit | 4bit
    allow_download: bool = False
    attention: str = "auto"  # deprecated: flash_attention_2 = attention_backend flash (see `_backend_asked`)
    attention_backend: str = "auto"  # auto | cpu | triton | flash | sdpa (see `model.execution`)
    model_base: str | Path | None = None  # base model of a LoRA checkpoint (the reference's model_base)


@dataclass
class LoadedModel:
    model: SliMEForCausalLM
    tokenizer: Any
    cfg: SliMEConfig
    template: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    stats: dict[str, Any] = field(default_factory=dict)
    image_norm: ImageNorm = CLIP_NORM  # the tower's processor mean/std
    quantization: str = "none"  # none | 8bit | 4bit (LLM linears)

    @property
    def accepts_images(self) -> bool:
        return self.model.vision_tower is not None

    @property
    def eos_token_ids(self) -> list[int]:
        ids = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        if self.template == "llama3" and "<|eot_id|>" in vocab:
            ids.add(vocab["<|eot_id|>"])
        return sorted(ids)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was asked for but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _local_tower_dir(name: str | None, ckpt_dir: Path) -> Path | None:
    if not name:
        return None
    candidates = [Path(name)] if os.path.isabs(name) else [ckpt_dir / name, Path.cwd() / name]
    return next((c for c in candidates if (c / "config.json").exists()), None)


def resolve_vision_tower(name: str, ckpt_dir: Path, *, allow_download: bool) -> Path:
    """`mm_vision_tower` -> a local directory: relative to the checkpoint, then the working
    directory; a hub id only when downloads are allowed."""
    local = _local_tower_dir(name, ckpt_dir)
    if local is not None:
        return local
    candidates = [Path(name)] if os.path.isabs(name) else [ckpt_dir / name, Path.cwd() / name]
    if allow_download:
        from huggingface_hub import snapshot_download

        log.info("downloading vision tower %s", name)
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    raise CheckpointError(
        f"vision tower {name!r} (mm_vision_tower) is neither in the checkpoint's weights nor a local "
        f"directory (looked in {', '.join(str(c) for c in candidates)}). Download it with "
        f"`python -m weights.download` or allow downloads.")


def infer_vision_config(src: TensorSource, prefix: str) -> VisionConfig:
    """CLIP hyper-parameters from tensor shapes, for checkpoints that embed the tower without its config."""
    hidden = src.shape(prefix + "vision_model.embeddings.class_embedding")[0]
    patch = src.shape(prefix + "vision_model.embeddings.patch_embedding.weight")[-1]
    positions = src.shape(prefix + "vision_model.embeddings.position_embedding.weight")[0]
    layer_ids = {int(k[len(prefix + "vision_model.encoder.layers."):].split(".")[0])
                 for k in src.items_with_prefix(prefix + "vision_model.encoder.layers.")}
    inter = src.shape(prefix + "vision_model.encoder.layers.0.mlp.fc1.weight")[0]
    return VisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=len(layer_ids),
                        num_attention_heads=max(1, hidden // 64), patch_size=patch,
                        image_size=int(math.isqrt(positions - 1)) * patch)


def read_image_norm(dirs: list[Path]) -> ImageNorm:
    """mean/std from the first `preprocessor_config.json` (the tower's, as the reference's
    `CLIPImageProcessor.from_pretrained(mm_vision_tower)`), else CLIP's own."""
    for d in dirs:
        p = d / "preprocessor_config.json"
        if p.exists():
            data = json.loads(p.read_text(encoding="utf-8"))
            mean, std = data.get("image_mean"), data.get("image_std")
            if mean and std and len(mean) == 3 and len(std) == 3:
                return ImageNorm(tuple(float(x) for x in mean), tuple(float(x) for x in std))  # type: ignore[arg-type]
    return CLIP_NORM


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(attr, value)


def _backend_asked(opts: LoadOptions) -> tuple[str, bool]:
    """`--attention-backend` with the deprecated `--attention` folded in -> (choice, flash allowed):
    flash_attention_2 asks for the flash backend; sdpa keeps flash-attn out of an `auto` choice."""
    if opts.attention not in ("auto", "sdpa", "flash_attention_2"):
        raise CheckpointError(f"unknown attention {opts.attention!r} (auto, sdpa, flash_attention_2)")
    if opts.attention == "auto":
        return opts.attention_backend, True
    log.warning("--attention is deprecated: use --attention-backend (flash_attention_2 is flash)")
    if opts.attention == "flash_attention_2":
        if opts.attention_backend not in ("auto", "flash"):
            raise CheckpointError(f"--attention flash_attention_2 asks for the flash attention backend, "
                                  f"not --attention-backend {opts.attention_backend}")
        return "flash", True
    if opts.attention_backend == "flash":
        raise CheckpointError("--attention sdpa keeps flash-attn out: it contradicts --attention-backend flash")
    return opts.attention_backend, False


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json and warns that `llava_llama` is not a transformers model type.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(previous)


def load_model(path: str | Path, options: LoadOptions | None = None) -> LoadedModel:
    """Load a SliME / LLaVA checkpoint directory. Raises `CheckpointError` with every missing,
    unexpected and mis-shaped key when the weights do not fit the config."""
    opts = options or LoadOptions()
    t0 = time.perf_counter()
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    cfg = SliMEConfig.from_file(path)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    main = open_weights(path, opts.model_base, merge_device=device if device.type == "cuda" else None)
    sources: dict[str, TensorSource | LoraSource] = {"": main}
    vision_cfg = cfg.vision
    tower_prefix = VISION_PREFIX
    tower_src = main
    norm_dirs = [path]
    if cfg.is_multimodal:
        has_tower = any(True for _ in main.items_with_prefix(VISION_PREFIX))
        if not has_tower:
            assert cfg.mm_vision_tower is not None
            tower_dir = resolve_vision_tower(cfg.mm_vision_tower, path, allow_download=opts.allow_download)
            tower_src = TensorSource(weight_files(tower_dir))
            sources["tower"] = tower_src
            tower_prefix = ""
            with open(tower_dir / "config.json", encoding="utf-8") as f:
                vision_cfg = VisionConfig.from_dict(json.load(f))
            norm_dirs.insert(0, tower_dir)
        elif vision_cfg is None:
            # Weights in the checkpoint; the hyper-parameters (heads!) and the processor settings
            # still come from the tower `mm_vision_tower` names when it is on disk, as in the
            # reference; shapes are the fallback.
            local = _local_tower_dir(cfg.mm_vision_tower, path)
            if local is not None:
                with open(local / "config.json", encoding="utf-8") as f:
                    vision_cfg = VisionConfig.from_dict(json.load(f))
                norm_dirs.insert(0, local)
            else:
                vision_cfg = infer_vision_config(main, VISION_PREFIX)
    try:
        with torch.device("meta"):
            model = SliMEForCausalLM(cfg, vision_cfg)
        if isinstance(main, LoraSource):
            main.add_fresh_pos_embeds(model)
            problems = main.problems(llm_linear_shapes(model))
            if problems:
                raise CheckpointError(f"LoRA checkpoint {path} with base {opts.model_base}: " + " | ".join(problems))
        check_fits_on_device(model, dtype, opts.quantization, device)
        _load_weights(model, cfg, main, tower_src, tower_prefix, device=device, dtype=dtype,
                      quantization=opts.quantization)
    finally:
        for s in sources.values():
            s.close()
    model.eval()
    choice, flash_allowed = _backend_asked(opts)
    try:
        model.llm.configure(execution.choose(choice, device, dtype, opts.quantization, flash_allowed))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    tokenizer = load_tokenizer(_tokenizer_dir(path, main))
    template = detect_template(tokenizer.get_vocab())
    stats = {"load_seconds": time.perf_counter() - t0,
             "parameters": sum(p.numel() for p in model.parameters())}
    if isinstance(main, LoraSource):
        stats["lora_merged_weights"] = len(main.pairs)
    return LoadedModel(model, tokenizer, cfg, template, path, device, dtype, stats, read_image_norm(norm_dirs),
                       opts.quantization)


def _tokenizer_dir(path: Path, main: TensorSource | LoraSource) -> Path:
    """The reference reads a LoRA checkpoint's tokenizer from its base model (falling back on the
    checkpoint's own when the base has none)."""
    if isinstance(main, LoraSource) and any((main.base_dir / n).exists() for n in TOKENIZER_FILES):
        return main.base_dir
    return path


def _load_weights(model: SliMEForCausalLM, cfg: SliMEConfig, main: TensorSource | LoraSource,
                  tower: TensorSource | LoraSource, tower_prefix: str, *, device: torch.device, dtype: torch.dtype,
                  quantization: str = "none") -> None:
    quantizer = None
    if quantization != "none":
        from .quantization import LayerQuantizer

        quantizer = LayerQuantizer(model, quantization, compute_dtype=dtype, device=device)
    names = model.checkpoint_names()
    expected = dict(model.named_parameters())
    missing: list[str] = []
    misshaped: list[str] = []
    used: set[str] = set()
    for ours, theirs in names.items():
        src = main
        key = theirs
        if theirs.startswith(VISION_PREFIX) and tower is not main:
            src, key = tower, tower_prefix + theirs[len(VISION_PREFIX):]
        if key not in src and ours == "llm.lm_head.weight" and cfg.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        if key not in src:
            missing.append(key)
            continue
        if src is main:
            used.add(key)
        want = tuple(expected[ours].shape)
        got = src.shape(key)
        if got != want:
            misshaped.append(f"{key}: checkpoint {list(got)}, model {list(want)}")
            continue
        tensor = src.get(key)
        # Parameters the reference creates with an explicit dtype keep that dtype's precision
        # whatever the model's: Resampler.pos_embed float16, the gate's w_gate bfloat16.
        if ours.endswith("pos_embed"):
            tensor = tensor.to(device=device, dtype=torch.float16)
        elif ours.endswith("mm_projector.w_gate"):
            tensor = tensor.to(torch.bfloat16).to(device=device, dtype=dtype)
        else:
            staged = quantizer is not None and quantizer.stages(ours)
            tensor = tensor.to(device=torch.device("cpu") if staged else device, dtype=dtype)
        _set_tensor(model, ours, tensor)
        if quantizer is not None:
            quantizer.loaded(ours)
    unexpected = [k for k in main.keys() if k not in used and not _ignorable(k, model)]
    if missing or misshaped or unexpected:
        parts = []
        if missing:
            where = getattr(main, "origin", "")  # a LoraSource says where it looked
            parts.append(f"missing keys ({len(missing)}){where}: {', '.join(missing[:20])}"
                         f"{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {'; '.join(misshaped[:20])}")
        raise CheckpointError("checkpoint does not match its config: " + " | ".join(parts))
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"parameters left unloaded: {', '.join(still_meta)}")


def _ignorable(key: str, model: SliMEForCausalLM) -> bool:
    if key.endswith(_IGNORED_SUFFIXES):
        return True
    if key.startswith(VISION_PREFIX + "vision_model.encoder.layers.") and model.vision_tower is not None:
        layer = int(key[len(VISION_PREFIX + "vision_model.encoder.layers."):].split(".")[0])
        return layer >= model.vision_tower.num_layers_used  # layers after the selected one never run
    return key.startswith("model.vision_tower.") and model.vision_tower is not None and "text_model" in key
