"""The grammar layer alone: masks, matchers, errors."""

import json

import pytest
import torch

from model.grammar import MAX_SCHEMA_CHARS, GrammarCompiler, GrammarError, apply_masks, schema_spec
from model.loading import load_tokenizer

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 5}},
          "required": ["n", "s"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    return GrammarCompiler(load_tokenizer(tiny_dir), cfg["vocab_size"])


def test_masks_equal_llguidance_own_and_leave_unconstrained_rows_alone(compiler):
    import llguidance.torch as lt

    g = torch.Generator().manual_seed(0)
    matchers = [compiler.matcher(schema_spec(SCHEMA)) if i % 2 else None for i in range(6)]
    for _ in range(30):
        logits = torch.randn(6, compiler.vocab_size, generator=g)
        ref = logits.clone()
        bitmask = lt.allocate_token_bitmask(6, compiler.vocab_size)
        for i, m in enumerate(matchers):
            if m is not None:
                m.fill(bitmask, i)
        lt.apply_token_bitmask_inplace(ref, bitmask)
        got = apply_masks(logits.clone(), matchers)
        assert torch.equal(got, ref)
        assert torch.equal(got[0::2], logits[0::2])  # unconstrained rows untouched
        for i, m in enumerate(matchers):
            if m is not None and not m.done:
                assert m.accept(int(got[i].argmax()))


def test_a_greedy_walk_under_the_mask_writes_a_valid_document(compiler, tiny_dir):
    import jsonschema

    tok = load_tokenizer(tiny_dir)
    m = compiler.matcher(schema_spec(SCHEMA))
    g = torch.Generator().manual_seed(1)
    ids = []
    for _ in range(100):
        logits = apply_masks(torch.randn(1, compiler.vocab_size, generator=g), [m])
        t = int(logits[0].argmax())
        assert m.accept(t)
        ids.append(t)
        if m.done:  # the token that completes the document ("}") is part of it; an EOS is not
            break
    assert m.done
    jsonschema.validate(json.loads(tok.decode([t for t in ids if t != tok.eos_token_id])), SCHEMA)


def test_bad_and_oversized_schemas_are_grammar_errors(compiler):
    with pytest.raises(GrammarError, match="strin"):
        compiler.compile(schema_spec({"type": "strin"}))
    with pytest.raises(GrammarError, match="at most"):
        compiler.compile(("json_schema", json.dumps({"description": "x" * MAX_SCHEMA_CHARS})))


def test_a_compiled_grammar_is_cached(compiler):
    spec = schema_spec({"type": "object", "properties": {"k": {"type": "boolean"}}})
    assert compiler.compile(spec) is compiler.compile(spec)


def test_the_documented_keywords_compile(compiler):
    schema = {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number", "minimum": 0}},
                               "required": ["x"]}},
              "type": "object",
              "properties": {"p": {"$ref": "#/$defs/pt"}, "k": {"const": "v"}, "e": {"enum": [1, 2]},
                             "a": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
                             "o": {"anyOf": [{"type": "string", "pattern": "^a+$", "minLength": 1},
                                             {"type": "null"}]}},
              "required": ["p", "k", "e", "a", "o"], "additionalProperties": False}
    compiler.compile(schema_spec(schema))
    compiler.compile(("json_object", ""))


FIRST_MASK = r"""
import json, sys, time
import torch
from model.grammar import GrammarCompiler, apply_masks
from model.loading import load_tokenizer
d = sys.argv[1]
vocab = json.loads(open(d + "/config.json").read())["vocab_size"]
compiler = GrammarCompiler(load_tokenizer(d), vocab)
m = compiler.matcher(("json_object", ""))
t0 = time.perf_counter()
apply_masks(torch.zeros(2, vocab), [m, None])
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "imported": [n for n in ("llguidance.torch", "torch._inductor") if n in sys.modules]}))
"""


def test_the_first_mask_in_a_fresh_process_imports_no_compiler_machinery(tiny_dir):
    """llguidance's torch helpers import torch.compile's machinery (2.5 s, GIL held): the engine
    thread froze every stream at the first structured request."""
    import subprocess
    import sys

    from tests.live import ROOT

    out = subprocess.run([sys.executable, "-c", FIRST_MASK, str(tiny_dir)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["imported"] == []
    assert got["seconds"] < 0.25, got


def test_a_spec_asked_for_by_many_threads_at_once_is_compiled_once(compiler):
    import threading

    spec = schema_spec({**SCHEMA, "title": "concurrent"})
    before = compiler.compiled
    barrier = threading.Barrier(8)
    got = []

    def ask():
        barrier.wait()
        got.append(compiler.compile(spec))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert compiler.compiled == before + 1 and len(got) == 8 and all(g is got[0] for g in got)
    bad = ("json_schema", json.dumps({"type": "object", "properties": {"x": {"type": "nonsense"}}}))
    for _ in range(2):  # a failure is not cached as a success: each asker hears it
        with pytest.raises(GrammarError):
            compiler.compile(bad)


def test_one_shared_compiler_per_tokenizer_in_a_process(tiny_dir):
    from model.grammar import shared_compiler

    cfg = json.loads((tiny_dir / "config.json").read_text())
    tok = load_tokenizer(tiny_dir)
    assert shared_compiler(tok, cfg["vocab_size"]) is shared_compiler(tok, cfg["vocab_size"])
    assert shared_compiler(load_tokenizer(tiny_dir), cfg["vocab_size"]) is not shared_compiler(tok, cfg["vocab_size"])
