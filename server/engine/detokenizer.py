"""Incremental detokenisation with stop strings that never leak, even split across tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens (so the cost per token is constant), emits text only
    when it is complete (no U+FFFD from a half multi-byte character), and holds back any tail that
    could be the start of a stop string.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None,
                 prompt_tail: list[int] | None = None):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        # Start the window with the last prompt tokens so that sentencepiece's leading-space
        # handling of the first generated token is right.
        self.ids: list[int] = list(prompt_tail or [])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of `text` already handed out
        self.stopped = False
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset], cached
        # The Rust backend decodes faster than the Python wrapper, with the same text.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = backend.decode if backend is not None else None
        self._started = False  # leading whitespace of the answer is dropped, as the reference strips it

    def _decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast(ids, skip_special_tokens=True)
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that can be shown now."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self._advance(final=False)
        return self._release()

    def _advance(self, final: bool) -> None:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        prefix = self._prefix_text
        full = self._decode(self.ids[self.prefix_offset:])
        # An incomplete multi-byte character decodes to U+FFFD: wait for its next byte, unless
        # generation ended (then the text is what a full decode gives).
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            new = full[len(prefix):]
            if not self._started:
                new = new.lstrip()
                self._started = bool(new)
            self.text += new
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._prefix_text = None

    def _release(self, final: bool = False) -> str:
        # the earliest match wins, whatever the stop strings' order (two can complete in one step)
        hits = [at for s in self.stop if (at := self.text.find(s, max(0, self.emitted - len(s) + 1))) != -1]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            final = True
        end = len(self.text)
        if not final:
            for s in self.stop:  # hold back a tail that may begin a stop string
                for k in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def flush(self) -> str:
        """At the end of generation: release what was held back."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._release(final=True)
