"""One request inside the engine (pure Python, no torch).

Who writes what: the scheduler alone writes the counters and blocks (`computed`, `output_ids`,
`blocks`, `block_keys`, `registered`, `order`, `preemptions`, `prefix_hit`); the runner fills in
what preparation finds (`prompt_len`, `embeds`, `position_keys`, `state`) once, before the
sequence is first scheduled; the output processor keeps its own state in `output`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .kv_blocks import PositionKey
from .types import EngineRequest


@dataclass(eq=False)  # identity: sequences are looked up in the scheduler's lists
class SequenceState:
    """One request in the engine, from intake to its end."""

    request: EngineRequest
    prompt_len: int = 0  # exact once prepared (image rows after selection)
    computed: int = 0  # positions whose K/V is in the cache
    embeds: Any = None  # `[T, D]` prompt embeddings of a prompt with images (None: text, embedded per chunk)
    output_ids: list[int] = field(default_factory=list)
    state: Any = None  # the runner's sampling and grammar state (runner.RunnerState); None until prepared
    output: Any = None  # the output processor's state (detokenizer, timing)
    blocks: list[int] = field(default_factory=list)  # block table: position p in blocks[p // block_size]
    position_keys: list[PositionKey] | None = None  # what each prompt position holds (see kv_blocks)
    block_keys: list[bytes] = field(default_factory=list)  # keys of the full blocks known so far
    registered: int = 0  # blocks[:registered] are keyed in the pool
    order: int = 0  # admission order: the newest are preempted first
    preemptions: int = 0
    prefix_hit: int = 0  # positions its first admission found in the prefix cache

    @property
    def prepared(self) -> bool:
        """Selection and prompt embedding done (prompt_len known)."""
        return self.state is not None

    @property
    def prompt_left(self) -> int:
        """Prompt positions still to prefill (an upper bound before it is prepared)."""
        return max(0, (self.prompt_len if self.prepared else self.request.max_prompt_tokens) - self.computed)

    @property
    def ready(self) -> int:
        """Positions that must be in the cache before the next token is sampled: the prompt, then
        each generated token but the last (which the next decode step feeds)."""
        return self.prompt_len + max(0, len(self.output_ids) - 1)

    @property
    def replaying(self) -> bool:
        """Decoding positions lost to preemption: this step feeds an earlier token again."""
        return self.computed < self.ready

    def token_at(self, position: int) -> int:
        """The generated token fed at `position` (>= prompt_len)."""
        return self.output_ids[position - self.prompt_len]

    def position_key(self, position: int, private: bool = False) -> PositionKey:
        """What was fed at `position`. Generated tokens are keyed apart from prompt tokens: decode
        computes their K/V, prefill a prompt's, and the two need not agree to the last bit.
        `private`: keyed for this sequence alone (its own K/V, found again after a preemption)."""
        if position >= self.prompt_len:
            token = self.token_at(position)
            return ("gen", self.request.request_id, token) if private else ("gen", token)
        return None if self.position_keys is None else self.position_keys[position]
