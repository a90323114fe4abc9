"""Structured outputs: a JSON schema (or any JSON object) as a grammar that masks the logits, so
that every sampled token keeps the text a prefix of a valid document and generation ends when
the document is complete. Built on llguidance (a Rust library vLLM also uses; no Python
dependencies); grammars are validated once and cached.

A spec is plain data that crosses processes: ("json_object", "") or ("json_schema", schema text).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

GrammarSpec = tuple[str, str]
MAX_SCHEMA_CHARS = 64 * 1024  # a larger schema is refused (compile time and memory grow with it)
# compact JSON: no free whitespace, which an unconstrained model would fill with noise
_DEFAULTS = {"whitespace_flexible": False}


_SHIFTS = torch.arange(32, dtype=torch.int32)  # bit j of a 32-bit word: token 32*w + j


class GrammarError(ValueError):
    """The schema cannot be compiled (invalid, or a keyword the grammar engine does not support)."""


class GrammarCompiler:
    """Validates specs for one tokenizer (thread-safe, LRU-cached) and makes per-sequence matchers.
    A spec is compiled once: a thread asking for one another thread is compiling waits for it.
    Compiling releases the GIL (llguidance's work is in Rust): it can run beside the engine."""

    def __init__(self, tokenizer, vocab_size: int, max_cached: int = 256):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self._cache: OrderedDict[GrammarSpec, object] = OrderedDict()  # spec -> a fresh matcher to copy
        self._max = max_cached
        self._lock = threading.Lock()
        self._compiling: dict[GrammarSpec, threading.Event] = {}
        self.compiled = 0  # specs compiled (not cache hits): what "once per process" is checked by

    def compile(self, spec: GrammarSpec):
        """A matcher at the start of the spec's grammar (cached; copy it, never advance it);
        raises GrammarError."""
        while True:
            with self._lock:
                hit = self._cache.get(spec)
                if hit is not None:
                    self._cache.move_to_end(spec)
                    return hit
                busy = self._compiling.get(spec)
                if busy is None:
                    self._compiling[spec] = threading.Event()
                    break
            busy.wait()  # then a hit, or (it failed) compile it here to raise the same error
        try:
            return self._compile(spec)
        finally:
            with self._lock:
                self._compiling.pop(spec).set()

    def _compile(self, spec: GrammarSpec):
        kind, text = spec
        if kind == "json_object":
            schema: object = {"type": "object"}
        elif kind == "json_schema":
            if len(text) > MAX_SCHEMA_CHARS:
                raise GrammarError(f"the schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS} are allowed")
            schema = json.loads(text)
        else:
            raise GrammarError(f"unknown grammar kind {kind!r}")
        try:
            grammar = self._ll.LLMatcher.grammar_from_json_schema(schema, defaults=_DEFAULTS)
            error = self._ll.LLMatcher.validate_grammar(grammar, self._tokenizer)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(str(e)[:500]) from None
        if error:
            raise GrammarError(error[:500])
        template = self._ll.LLMatcher(self._tokenizer, grammar)  # lexer and parser built once, here
        with self._lock:
            self.compiled += 1
            self._cache[spec] = template
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return template

    def matcher(self, spec: GrammarSpec) -> "Matcher":
        return Matcher(self.compile(spec).deep_copy())

    def warm_up(self) -> None:
        """Compile a grammar and mask one row with it: everything the first structured request
        would set up happens now, before serving."""
        logits = torch.zeros(1, self.vocab_size)
        apply_masks(logits, [self.matcher(("json_object", ""))])


_SHARED: dict[tuple[int, int], tuple[object, GrammarCompiler]] = {}
_SHARED_LOCK = threading.Lock()


def shared_compiler(tokenizer, vocab_size: int) -> GrammarCompiler:
    """This process's compiler for `tokenizer`: the API side (validating a request's schema) and
    the engine (its sequences' matchers) share it, so a schema is compiled once per process."""
    key = (id(tokenizer), vocab_size)
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is None or entry[0] is not tokenizer:
            entry = _SHARED[key] = (tokenizer, GrammarCompiler(tokenizer, vocab_size))
        return entry[1]


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of a contiguous int32 CPU bitmask `[B, ceil(V/32)]`: the tokens allowed next.
        Written by llguidance directly (its `llguidance.torch` helpers import torch.compile's
        machinery, seconds of import that would stall the engine thread at the first mask)."""
        words = bitmask[row]
        self._m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token: int) -> bool:
        return bool(self._m.consume_token(token)) and not self._m.is_error()

    @property
    def done(self) -> bool:
        return bool(self._m.is_stopped())


def apply_masks(logits: torch.Tensor, matchers: list[Matcher | None]) -> torch.Tensor:
    """logits `[B, V]` with each constrained row's disallowed tokens at -inf, in one batched op
    (unconstrained rows keep an all-allowed mask: untouched). Returns `logits` (modified in place)."""
    if all(m is None for m in matchers):
        return logits
    vocab = logits.shape[-1]
    # [B, ceil(V/32)] int32, all allowed; pinned where the words go on to a GPU
    bitmask = torch.full((len(matchers), -(-vocab // 32)), -1, dtype=torch.int32,
                         pin_memory=logits.device.type == "cuda")
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill(bitmask, i)
    # Unpacked with a few vectorised ops (llguidance's own CPU apply costs ~40 ms for 16 rows), on
    # the logits' device: only the packed words cross to a GPU (V/8 bytes a row).
    device = logits.device
    words = bitmask.to(device, non_blocking=True).unsqueeze(-1)  # [B, W, 1]
    bits = (words >> _SHIFTS.to(device)).bitwise_and_(1).view(len(matchers), -1)[:, :vocab]  # [B, V]
    return logits.masked_fill_(bits == 0, float("-inf"))


def schema_spec(schema: dict) -> GrammarSpec:
    """A JSON schema (a dict) as a spec, in a canonical spelling (equal schemas share a cache entry)."""
    return ("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))
