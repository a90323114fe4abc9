import random

from server.engine.detokenizer import IncrementalDetokenizer


def run(tok, ids, stop=None, tail=None):
    d = IncrementalDetokenizer(tok, stop, tail)
    out = [d.add(t) for t in ids]
    out.append(d.flush())
    return "".join(out), d


def test_incremental_equals_full_decode(tiny_lm):
    """For any mix of text pieces (invalid UTF-8 from byte tokens has no single right answer)."""
    tok = tiny_lm.tokenizer
    rng = random.Random(0)
    text_ids = [i for i in range(3, len(tok)) if not tok.convert_ids_to_tokens(i).startswith("<0x")]
    for _ in range(200):
        ids = [rng.choice(text_ids) for _ in range(rng.randint(1, 30))]
        text, _ = run(tok, ids)
        assert text == tok.decode(ids, skip_special_tokens=True).lstrip()


def test_multibyte_characters_are_never_split(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("héllo 世界 ok", add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "héllo 世界 ok"


def test_stop_string_split_across_tokens_is_held_back(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("the red car is here", add_special_tokens=False).input_ids
    text, d = run(tok, ids, stop=["car is"])
    assert text == "the red " and d.stopped


def test_byte_fallback_garbage_never_raises(tiny_lm):
    tok = tiny_lm.tokenizer
    byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xE4, 0xB8, 0xFF, 0x80, 0xC3)]
    text, _ = run(tok, byte_ids * 3)
    assert isinstance(text, str)
