"""What one engine step is made of: the scheduler's plan, what the executor returns for it, and
what applying it changed (plain dataclasses, no torch).

schedule() -> StepPlan -> executor.execute(plan) -> StepOutput -> scheduler.update_from_output(
plan, output) -> StepUpdate -> the output processor."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import SequenceState
from .types import EngineError, TokenLogprob


@dataclass
class PromptChunk:
    """Prompt positions [start, end) of `seq`, whose blocks are reserved."""

    seq: SequenceState
    start: int
    end: int
    first: bool = False  # the sequence's first prompt work (fault injection's "prefill" stage)
    # the prompt's last chunk, for a sequence with no token yet: its logits give the first
    samples: bool = False
    # other choices of the same request, waiting: once the prompt is in, each samples its first
    # token from the same last logits and decodes on the prompt's blocks (copy on write)
    forks: list[SequenceState] = field(default_factory=list)


@dataclass
class StepPlan:
    """One step: prompt chunks (in order), then one batched decode of `decodes` (each feeds the
    token at position `computed`, into its block table), after copying `copies` (src, dst)."""

    chunks: list[PromptChunk]
    decodes: list[SequenceState]
    copies: list[tuple[int, int]] = field(default_factory=list)
    started: list[SequenceState] = field(default_factory=list)  # admitted or forked for the first time (queue time ends)

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.decodes


Sampled = tuple[int, TokenLogprob | None]


@dataclass
class ChunkOutput:
    first: Sampled | None = None  # the first token, when the chunk samples
    forks: list[Sampled | EngineError] = field(default_factory=list)  # one per chunk.forks
    error: EngineError | None = None


@dataclass
class DecodeOutput:
    ran: bool = False  # the forward wrote this position's K/V
    token: int | None = None  # None: nothing sampled (replaying, failed, or to decode again next step)
    info: TokenLogprob | None = None
    error: EngineError | None = None


@dataclass
class StepOutput:
    chunks: list[ChunkOutput]  # one per plan.chunks, in order
    decodes: list[DecodeOutput]  # one per plan.decodes, in order


@dataclass
class NewToken:
    seq: SequenceState
    token: int
    info: TokenLogprob | None
    first: bool  # the sequence's first token (its images' reports go with it)


@dataclass
class StepUpdate:
    """What a step changed: tokens to process, sequences that failed (already out of the batch)."""

    tokens: list[NewToken] = field(default_factory=list)
    failed: list[tuple[SequenceState, EngineError]] = field(default_factory=list)
