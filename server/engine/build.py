"""Building an engine from an `EngineConfig`: load the checkpoint, build the runner and the engine,
warm up. The API process (through `factory`) and the engine process both import this module;
it imports neither of them and knows nothing of HTTP."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from .client import Engine, StatsObserver
from .engine import EngineCore
from .inbox import Sink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model: Path  # checkpoint directory (resolved: see `resolve_model_dir`)
    model_base: Path | None = None  # base model of a LoRA checkpoint
    device: str = "auto"
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on the CPU
    quantization: str = "none"
    attention: str = "auto"
    attention_backend: str = "auto"
    allow_download: bool = False
    max_batch_size: int = 64
    max_model_len: int = 4096
    prefill_chunk: int = 512
    kv_cache_mb: int = 0  # 0: sized by the runner (see runner.kv_cache_blocks)
    kv_block_size: int = 16
    prefix_caching: bool = True
    cuda_graphs: bool = True
    capture_all_graphs: bool = True
    compile: bool = True
    vision_nice: int = 0
    vision_cache_mb: int = 256
    vision_queue_mb: int = 512
    vision_batch_views: int = 32
    engine_process: bool = False
    fault_hook: str | None = None  # tests: 'module:function', see executor.StepExecutor
    log_format: str = "text"
    log_level: str = "info"


def resolve_model_dir(model: str | None, cache_dir: Path) -> Path:
    """The checkpoint to serve: `model`, or the tiny demo checkpoint (built once under cache_dir)."""
    if model:
        return Path(model)
    path = cache_dir / "tiny-slime"
    if not (path / "config.json").exists():
        from weights.make_tiny import make_tiny

        log.info("creating the tiny demo checkpoint at %s (its answers are random words)", path)
        make_tiny(path)
    return path


def _import_object(spec: str):
    """'package.module:name' -> the object."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_engine(config: EngineConfig, on_stats: StatsObserver | None = None, sink: Sink | None = None) -> EngineCore:
    """Load the model, build the runner and the engine (not started), warm up. With `sink` the
    bare core, whose events and stats go there (the engine process); else the in-process client."""
    from model.loading import LoadOptions, load_model

    from .runner import ModelRunner

    lm = load_model(config.model, LoadOptions(device=config.device, dtype=config.dtype, model_base=config.model_base,
                                              quantization=config.quantization,
                                              allow_download=config.allow_download, attention=config.attention,
                                              attention_backend=config.attention_backend))
    runner = ModelRunner(lm, max_batch_size=config.max_batch_size, max_model_len=config.max_model_len,
                         kv_cache_bytes=config.kv_cache_mb << 20 if config.kv_cache_mb else None,
                         block_size=config.kv_block_size,
                         vision_cache_bytes=config.vision_cache_mb * 1024 * 1024, cuda_graphs=config.cuda_graphs,
                         capture_all_graphs=config.capture_all_graphs, compile_pointwise=config.compile,
                         vision_queue_bytes=config.vision_queue_mb << 20)
    options = dict(prefill_chunk=config.prefill_chunk, prefix_caching=config.prefix_caching,
                   vision_nice=config.vision_nice, vision_queue_bytes=config.vision_queue_mb << 20,
                   vision_batch_views=config.vision_batch_views,
                   fault_hook=_import_object(config.fault_hook) if config.fault_hook else None)
    engine = EngineCore(runner, sink=sink, compile_grammars=True, **options) if sink is not None \
        else Engine(runner, on_stats=on_stats, **options)
    runner.warm_up()
    log.info("model %s loaded in %.1fs", config.model, lm.stats["load_seconds"])
    return engine


def configure_engine_logging(config: EngineConfig) -> None:
    from ..logs import configure_logging

    configure_logging(config)
