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
