"""When a sequence stops (a pure function of its state after a new token)."""

from __future__ import annotations


def finish_reason(*, stop_token: bool, stop_string: bool, generated: int, max_tokens: int, length: int,
                  max_model_len: int) -> str | None:
    """stop_token: the token is an EOS (and EOS is not ignored); stop_string: the detokeniser
    matched a stop string; generated: tokens so far, this one included; length: prompt +
    generated positions. -> "stop", "length" or None (go on)."""
    if stop_token or stop_string:
        return "stop"
    if generated >= max_tokens or length >= max_model_len:
        return "length"
    return None
