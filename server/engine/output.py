"""Turns sampled tokens into events: detokenising, stop strings, grammar advance, finish
reasons and the per-token numbers (TTFT, inter-token latency) of the engine's stats.

The engine hands it each step's new tokens (`StepUpdate.tokens`, after the scheduler applied the
step); it emits one `Event` per token and says which sequences finished. It never frees blocks:
the engine tells the scheduler."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .detokenizer import IncrementalDetokenizer
from .sequence import SequenceState
from .step import NewToken
from .stopping import finish_reason
from .types import EngineError, EngineStats, ErrorKind, Event, FinishedRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Emit = Callable[[str, Event], None]


@dataclass
class OutputState:
    """The output side of one sequence."""

    detok: IncrementalDetokenizer
    first_token_time: float | None = None
    last_token_time: float | None = None


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos: set[int], max_model_len: int, emit: Emit):
        self.tokenizer = tokenizer
        self.eos = eos
        self.max_model_len = max_model_len
        self.emit = emit

    def start(self, seq: SequenceState) -> None:
        """A prepared sequence's detokenizer (primed with the prompt's last tokens)."""
        req = seq.request
        seq.output = OutputState(IncrementalDetokenizer(self.tokenizer, req.params.stop,
                                                        [t for t in req.input_ids[-4:] if t >= 0]))

    def process(self, tokens: list[NewToken], stats: EngineStats
                ) -> tuple[list[tuple[SequenceState, str]], list[tuple[SequenceState, EngineError]]]:
        """Each new token's event -> (finished sequences with their finish reason, sequences whose
        output handling failed). A failure (e.g. detokenising) is that sequence's alone."""
        finished, failed = [], []
        for new in tokens:
            try:
                finish = self._token(new, stats)
            except Exception:  # noqa: BLE001 - this sequence only
                log.exception("handling the output failed for %s", new.seq.request.request_id)
                stage = "prefill" if new.first else "decoding"
                failed.append((new.seq, EngineError(ErrorKind.MODEL_ERROR, f"model error during {stage}")))
                continue
            if finish:
                finished.append((new.seq, finish))
        return finished, failed

    def _token(self, new: NewToken, stats: EngineStats) -> str | None:
        seq, token, now = new.seq, new.token, time.monotonic()
        req, out = seq.request, seq.output
        if out.first_token_time is None:
            out.first_token_time = now
            stats.ttft.append(now - req.arrival)
        elif out.last_token_time is not None:
            stats.itl.append(now - out.last_token_time)
        out.last_token_time = now
        grammar_done = self._advance_grammar(seq, token)
        # a complete document ends with the grammar's stop token (EOS), also under ignore_eos
        stop_token = (not req.params.ignore_eos and token in self.eos) or (grammar_done and token in self.eos)
        detok = out.detok
        text = "" if stop_token else detok.add(token)
        generated = len(seq.output_ids)
        finish = finish_reason(stop_token=stop_token or grammar_done, stop_string=detok.stopped, generated=generated,
                               max_tokens=req.params.max_tokens, length=seq.prompt_len + generated,
                               max_model_len=self.max_model_len)
        if finish:
            text += detok.flush()
        self.emit(req.request_id, Event(token_ids=[token], text=text, logprobs=[new.info] if new.info else [],
                                        finish_reason=finish, prompt_tokens=seq.prompt_len,
                                        completion_tokens=generated, images=seq.state.images if new.first else None))
        return finish

    @staticmethod
    def _advance_grammar(seq: SequenceState, token: int) -> bool:
        """Feed a sampled token to the sequence's grammar; True once the document is complete."""
        matcher = seq.state.matcher
        if matcher is None:
            return False
        if not matcher.accept(token):
            raise RuntimeError(f"token {token} broke the grammar it was sampled under")
        return matcher.done

    @staticmethod
    def finished(seq: SequenceState, finish: str, stats: EngineStats, status: str = "ok") -> None:
        """The request's end, in the stats."""
        e2e = time.monotonic() - seq.request.arrival if status == "ok" else None
        stats.finished.append(FinishedRequest(status, finish, seq.prompt_len, len(seq.output_ids), e2e))
