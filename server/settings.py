"""Settings: one typed object from `SLIME_*` environment variables and CLI flags.

This is the only module that reads the environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIME_", extra="ignore")

    model: str | None = Field(None, description="checkpoint directory (none: the tiny demo checkpoint)")
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    served_model_name: str | None = None
    chat_template: Literal["auto", "vicuna_v1", "llama3"] = "auto"
    allow_download: bool = False
    cache_dir: Path = Path.home() / ".cache" / "slime-serve"
    # engine
    max_batch_size: int = Field(16, ge=1, le=256)
    max_waiting_requests: int = Field(64, ge=0)
    max_model_len: int = Field(4096, ge=64)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_cap: int = Field(4096, ge=1)
    prefill_chunk: int = Field(512, ge=16)
    vision_cache_mb: int = Field(256, ge=0)
    # request limits
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(8, ge=0)
    max_image_pixels: int = Field(64_000_000, ge=1)
    max_messages: int = Field(256, ge=1)
    max_n: int = Field(8, ge=1)
    max_stop: int = Field(4, ge=0)
    # image URLs (off: data: URLs only)
    allow_image_urls: bool = False
    image_url_domains: list[str] = Field(default_factory=list, description="allow-list (empty: any public host)")
    image_url_timeout: float = Field(10.0, gt=0)
    image_url_max_redirects: int = Field(3, ge=0, le=10)
    image_url_allow_private: bool = Field(False, description="testing only: lets private addresses through")
    # access
    api_key: list[str] = Field(default_factory=list)
    protect_metrics: bool = Field(False, description="require the API key on /metrics too")
    cors_origins: list[str] = Field(default_factory=list)
    drain_timeout: float = Field(30.0, ge=0, description="seconds running requests get to finish on SIGTERM")
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"

    @field_validator("api_key", "image_url_domains", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, v):
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v or []


def parse_args(argv: list[str] | None = None) -> Settings:
    """CLI flags override environment variables, which override defaults."""
    fields = Settings.model_fields
    ap = argparse.ArgumentParser(prog="slime-serve", description="OpenAI-compatible SliME server")
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = f.description or ""
        if name in ("api_key", "image_url_domains", "cors_origins"):
            ap.add_argument(flag, action="append", default=None, help=help_ or "repeatable")
        elif f.annotation is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            ap.add_argument(flag, default=None, help=help_)
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**given)
