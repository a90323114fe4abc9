"""Settings: one typed object from `SLIME_*` environment variables and CLI flags.

This is the only module that reads the environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Lists come from the environment as comma-separated text (SLIME_API_KEY=k1,k2), not JSON.
StrList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIME_", extra="ignore")

    model: str | None = Field(None, description="checkpoint directory (none: the tiny demo checkpoint)")
    model_base: str | None = Field(None, description="base model directory of a LoRA checkpoint (SliME-Llama3-70B: "
                                   "Llama-3-70B-Instruct), merged in while loading")
    host: str = Field("127.0.0.1", description="bind address (0.0.0.0 in containers)")
    port: int = Field(8000, description="HTTP port")
    device: str = Field("auto", description="auto | cuda | cuda:N | cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    quantization: Literal["none", "8bit", "4bit"] = Field("none", description="bitsandbytes weights for the LLM")
    attention: Literal["auto", "sdpa", "flash_attention_2"] = Field(
        "auto", description="deprecated: use --attention-backend (flash_attention_2 is flash; sdpa keeps auto off "
        "flash)")
    attention_backend: Literal["auto", "cpu", "triton", "flash", "sdpa"] = Field(
        "auto", description="how the model attends, chosen once at load. auto: cpu (numba) for CPU float32; on CUDA "
        "flash (flash-attn's paged path, half precision, 256-position KV blocks: decode and prompt chunks) when "
        "flash-attn is installed, else triton; else sdpa (gathers each sequence's blocks into a padded copy); "
        "triton on the CPU needs TRITON_INTERPRET=1 (slow: for tests)")
    served_model_name: str | None = Field(None, description="model id in the API (default: directory name)")
    chat_template: Literal["auto", "vicuna_v1", "llama3"] = Field("auto", description="auto: llama3 if the tokenizer knows <|eot_id|>")
    allow_download: bool = Field(False, description="fetch a hub CLIP tower named by the checkpoint")
    cache_dir: Path = Field(Path.home() / ".cache" / "slime-serve", description="where the demo checkpoint is built")
    # engine
    max_batch_size: int = Field(64, ge=1, le=256, description="most sequences running (decoded together) at once")
    max_waiting_requests: int = Field(64, ge=0, description="queue bound; beyond it 429")
    max_model_len: int = Field(4096, ge=64, description="positions per sequence (prompt with image rows + output)")
    default_max_tokens: int = Field(256, ge=1, description="when a request gives none")
    max_tokens_cap: int = Field(4096, ge=1, description="largest max_tokens accepted")
    prefill_chunk: int = Field(512, ge=16, description="prompt positions per engine step")
    kv_cache_mb: int = Field(0, ge=0, description="KV-cache pool in MiB (0: auto: on CUDA 80 percent of the memory free "
                             "after loading; on the CPU 16 sequences of max-model-len, at most 4 GiB)")
    kv_block_size: int = Field(16, description="positions per KV-cache block (a power of two, 8 to 256; the flash "
                               "attention backend uses 256)")
    prefix_caching: bool = Field(True, description="reuse the KV blocks of prompt prefixes seen before "
                                 "(text, and images by content and kept tokens)")
    cuda_graphs: bool = Field(True, description="replay the decode step as CUDA graphs (CUDA, unquantized)")
    cuda_graph_capture: Literal["startup", "lazy"] = Field(
        "startup", description="startup: every batch and key-span bucket before serving; lazy: each at first use")
    compile: bool = Field(True, description="torch.compile the norms, RoPE and SiLU into fused kernels (CUDA)")
    engine_process: bool = Field(False, description="run the engine in its own process (HTTP and the model "
                                 "stop sharing one GIL)")
    vision_nice: int = Field(10, ge=0, le=19, description="niceness added to the vision thread (Linux; 0: none): "
                             "decode steps get the CPU before new requests' image encoding")
    vision_cache_mb: int = Field(256, ge=0, description="vision-feature cache size (0: off)")
    vision_queue_mb: int = Field(512, ge=0, description="encoded image features held by requests not yet started "
                                 "(cache hits included); beyond it the vision stage waits (0: no bound; on CUDA "
                                 "set aside before sizing the KV cache)")
    vision_batch_views: int = Field(32, ge=1, description="CLIP views per vision pass: the images of the requests "
                                    "queued together are encoded as one batch up to this many views (one request "
                                    "always goes whole)")
    fault_hook: str | None = Field(None, description="testing only: 'module:function' called as f(stage, requests) "
                                   "inside each engine stage; what it raises fails like a model error")
    # request limits
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request body limit (413)")
    max_images_per_request: int = Field(8, ge=0, description="images in one request")
    max_image_pixels: int = Field(64_000_000, ge=1, description="width x height, checked before decoding")
    max_messages: int = Field(256, ge=1, description="messages in one request")
    max_n: int = Field(8, ge=1, description="largest n")
    max_stop: int = Field(4, ge=0, description="stop strings per request")
    # image URLs (off: data: URLs only)
    allow_image_urls: bool = Field(False, description="fetch http(s) image URLs (SSRF-guarded)")
    image_url_domains: StrList = Field(default_factory=list, description="allow-list (empty: any public host)")
    image_url_timeout: float = Field(10.0, gt=0, description="seconds for all of a request's image URLs (fetched "
                                     "at once): lookups, connects and reads")
    image_url_workers: int = Field(32, ge=1, le=1024, description="image URLs fetched at once, over all requests "
                                   "(a pool apart from request preparation)")
    image_url_max_redirects: int = Field(3, ge=0, le=10, description="redirect hops, each re-checked")
    image_url_allow_private: bool = Field(False, description="testing only: lets private addresses through")
    # access
    api_key: StrList = Field(default_factory=list, description="Bearer keys (comma-separated in the env)")
    protect_metrics: bool = Field(False, description="require the API key on /metrics too")
    cors_origins: StrList = Field(default_factory=list, description="allowed browser origins (off when empty)")
    drain_timeout: float = Field(30.0, ge=0, description="seconds running requests get to finish on SIGTERM "
                                 "(0: cancel them at once)")
    log_format: Literal["text", "json"] = Field("text", description="text or one JSON object per line")
    log_level: str = Field("info", description="debug | info | warning | error")

    @property
    def model_id(self) -> str:
        """The model's name in the API: --served-model-name, else the checkpoint directory's name."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else "tiny-slime"

    def engine_config(self):
        """What the engine needs of these settings (server.engine.factory.EngineConfig)."""
        from .engine.build import EngineConfig, resolve_model_dir

        return EngineConfig(
            model=resolve_model_dir(self.model, self.cache_dir),
            model_base=Path(self.model_base) if self.model_base else None, device=self.device,
            dtype=None if self.dtype == "auto" else self.dtype, quantization=self.quantization,
            attention=self.attention, attention_backend=self.attention_backend, allow_download=self.allow_download, max_batch_size=self.max_batch_size,
            max_model_len=self.max_model_len, prefill_chunk=self.prefill_chunk, kv_cache_mb=self.kv_cache_mb,
            kv_block_size=self.kv_block_size, prefix_caching=self.prefix_caching, cuda_graphs=self.cuda_graphs,
            capture_all_graphs=self.cuda_graph_capture == "startup", compile=self.compile,
            vision_nice=self.vision_nice, vision_cache_mb=self.vision_cache_mb,
            vision_queue_mb=self.vision_queue_mb, vision_batch_views=self.vision_batch_views,
            engine_process=self.engine_process,
            fault_hook=self.fault_hook, log_format=self.log_format, log_level=self.log_level)

    @field_validator("kv_block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v not in (8, 16, 32, 64, 128, 256):
            raise ValueError("kv_block_size must be a power of two from 8 to 256")
        return v

    @model_validator(mode="after")
    def _chunk_in_blocks(self):
        if self.prefill_chunk % self.kv_block_size:
            raise ValueError(f"prefill_chunk ({self.prefill_chunk}) must be a multiple of kv_block_size "
                             f"({self.kv_block_size})")
        return self

    @field_validator("api_key", "image_url_domains", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v or []


def settings_parser(prog: str = "slime-serve", description: str = "OpenAI-compatible SliME server"
                    ) -> argparse.ArgumentParser:
    """A flag per setting (`--max-batch-size`, `--no-prefix-caching`, ...)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    for name, f in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = f.description or ""
        if name in ("api_key", "image_url_domains", "cors_origins"):
            ap.add_argument(flag, action="append", default=None, help=help_ or "repeatable")
        elif f.annotation is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            ap.add_argument(flag, default=None, help=help_)
    return ap


def settings_from(args: argparse.Namespace) -> Settings:
    """CLI flags override environment variables, which override defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    return Settings(**given)


def parse_args(argv: list[str] | None = None) -> Settings:
    return settings_from(settings_parser().parse_args(argv))
