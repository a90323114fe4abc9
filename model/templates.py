"""Conversation templates (spec section 8): messages -> prompt pieces with image slots.

A prompt is a list of text pieces and `IMAGE` markers, never a string with "<image>" in it, so a
user who types "<image>" gets those characters tokenised as text, not an image slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

Role = Literal["system", "user", "assistant"]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("vicuna_v1", "llama3")


class _Image:
    """Marker for one image's placeholder inside a prompt."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = _Image()
Piece = Union[str, _Image]


@dataclass(frozen=True)
class Message:
    """One chat turn. `num_images` images go at the start of the text, in order."""

    role: Role
    text: str
    num_images: int = 0


def _merge_turns(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """Split off the system text and merge consecutive turns of one role (OpenAI allows them)."""
    system: str | None = None
    turns: list[Message] = []
    for m in messages:
        if m.role == "system":
            if m.num_images:
                raise ValueError("a system message cannot carry images")
            system = m.text if system is None else system + "\n" + m.text
            continue
        if turns and turns[-1].role == m.role:
            prev = turns[-1]
            if m.num_images:  # images must sit at the start of a user message: keep them apart
                turns.append(m)
                continue
            turns[-1] = Message(prev.role, prev.text + "\n" + m.text, prev.num_images)
        else:
            turns.append(m)
    return system, turns


def _user_body(m: Message) -> list[Piece]:
    pieces: list[Piece] = []
    for _ in range(m.num_images):
        pieces += [IMAGE, "\n"]
    pieces.append(m.text)
    return pieces


def build_prompt(messages: Sequence[Message], template: str) -> list[Piece]:
    """Messages ending with a user turn -> prompt pieces ending with the open assistant turn."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
    system, turns = _merge_turns(messages)
    if not turns or turns[-1].role != "user":
        raise ValueError("the last message must come from the user")
    for t in turns:
        if t.role == "assistant" and t.num_images:
            raise ValueError("assistant messages cannot carry images")
    pieces: list[Piece] = []
    if template == "vicuna_v1":
        # SeparatorStyle.TWO: "{system} USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:"
        pieces.append((VICUNA_SYSTEM if system is None else system) + " ")
        for t in turns:
            if t.role == "user":
                pieces += ["USER: ", *_user_body(t), " "]
            else:
                pieces += ["ASSISTANT: " + t.text + "</s>"]
        pieces.append("ASSISTANT:")
    else:
        # The reference's LLAMA_3 style has no system turn; a user-given one uses Llama 3's own.
        if system is not None:
            pieces.append(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
        for t in turns:
            if t.role == "user":
                pieces += ["<|start_header_id|>user<|end_header_id|>\n\n", *_user_body(t), "<|eot_id|>"]
            else:
                # The reference closes finished assistant turns with its sep2 text.
                pieces.append(f"<|start_header_id|>assistant<|end_header_id|>\n\n{t.text}<|eot_id|><|eot_conversation|>")
        pieces.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return _join_text(pieces)


def _join_text(pieces: list[Piece]) -> list[Piece]:
    """Concatenate adjacent strings so that each text run is tokenised as one piece."""
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] = out[-1] + p
        else:
            out.append(p)
    return out


def render(pieces: Sequence[Piece]) -> str:
    """The prompt as the reference's string (with "<image>" marking slots), for display and tests."""
    return "".join("<image>" if p is IMAGE else p for p in pieces)  # type: ignore[misc]


def detect_template(vocab: dict[str, int] | Sequence[str]) -> str:
    """`llama3` when the tokenizer knows `<|eot_id|>`, else `vicuna_v1`."""
    return "llama3" if "<|eot_id|>" in vocab else "vicuna_v1"
