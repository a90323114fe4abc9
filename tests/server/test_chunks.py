"""The hand-built per-token SSE chunk says exactly what the typed chunk model says."""

import json
import random

import pytest

from server.chat import ChunkWriter
from server.engine.types import Event
from server.protocol import ChatCompletionChunk, ChunkChoice, Delta, Usage

TEXTS = ["", "hello", ' "quoted" ', "line\nbreak\ttab\\slash", "naïve 日本語 🙂", "\u2028\u2029", "</s>", "\x00\x1f"]


@pytest.mark.parametrize("include_usage, continuous", [(False, False), (True, False), (True, True)])
def test_the_fast_content_chunk_equals_the_models_serialisation(include_usage, continuous):
    rng = random.Random(0)
    texts = TEXTS + ["".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 12))) for _ in range(50)]
    out = ChunkWriter("chatcmpl-x", 1700000000, "tiny-slime", include_usage=include_usage, continuous_usage=continuous)
    for i, text in enumerate(texts):
        out.count(i % 3, Event(text=text, prompt_tokens=7, completion_tokens=i // 3 + 1))
        fast = out.content(i % 3, text)
        typed = out.chunk([ChunkChoice(index=i % 3, delta=Delta(content=text), logprobs=None, finish_reason=None)])
        assert fast.startswith("data: ") and fast.endswith("\n\n")
        assert json.loads(fast[6:]) == json.loads(typed[6:])
        ChatCompletionChunk.model_validate_json(fast[6:])  # and it is a valid chunk


def test_usage_and_extension_fields_appear_only_when_asked():
    plain = json.loads(ChunkWriter("c", 1, "m", include_usage=False).chunk([])[6:])
    assert "usage" not in plain and "slime" not in plain and plain["object"] == "chat.completion.chunk"
    with_usage = ChunkWriter("c", 1, "m", include_usage=True)
    assert json.loads(with_usage.chunk([])[6:])["usage"] is None
    final = json.loads(with_usage.chunk([], Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))[6:])
    assert final["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    role = json.loads(with_usage.chunk([ChunkChoice(index=0, delta=Delta(role="assistant", content=""), logprobs=None,
                                                    finish_reason=None)])[6:])
    assert role["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}
    end = json.loads(with_usage.chunk([ChunkChoice(index=0, delta=Delta(), logprobs=None, finish_reason="stop")])[6:])
    assert end["choices"][0]["delta"] == {}
