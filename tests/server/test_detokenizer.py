import random

import pytest

from server.engine.detokenizer import IncrementalDetokenizer


def run(tok, ids, stop=None, tail=None):
    d = IncrementalDetokenizer(tok, stop, tail)
    out = [d.add(t) for t in ids]
    out.append(d.flush())
    return "".join(out), d


def pieces(tok, ids, stop=None, tail=None) -> list[str]:
    d = IncrementalDetokenizer(tok, stop, tail)
    return [d.add(t) for t in ids] + [d.flush()]


def full(tok, ids) -> str:
    """What the whole answer decodes to (the detokenizer drops the answer's leading whitespace)."""
    return tok.decode(ids, skip_special_tokens=True).lstrip()


class Units:
    """Random token sequences built from pieces whose full decode is well defined: text tokens,
    special tokens, characters of 1 to 4 UTF-8 bytes spelled as byte-fallback tokens (the tiny
    tokenizer has no CJK or emoji pieces, as a real one lacks rare characters), and runs of invalid
    bytes between two text tokens (the tokenizer decodes an invalid run to one U+FFFD per byte,
    so a run that touches a valid character's bytes has no single right answer)."""

    CHARS = "aZ~\u00e9\u00df\u0416\u05d0\u4e16\u754c\u3042\u20ac\U0001f600\U0001f9e1\U00010348"

    def __init__(self, tok, seed: int):
        self.tok = tok
        self.rng = random.Random(seed)
        names = tok.convert_ids_to_tokens(list(range(len(tok))))
        special = set(tok.all_special_ids)
        self.byte = {int(n[3:5], 16): i for i, n in enumerate(names) if len(n) == 6 and n.startswith("<0x")}
        assert len(self.byte) == 256
        self.text = [i for i, n in enumerate(names) if i not in special and not n.startswith("<0x")]
        self.special = sorted(special)

    def char(self) -> list[int]:
        return [self.byte[b] for b in self.rng.choice(self.CHARS).encode()]

    def garbage(self) -> list[int]:
        bad = self.rng.choice([[0xFF], [0x80], [0xE4, 0xB8], [0xF0, 0x9F, 0x98], [0xC3], [0xE4, 0xB8, 0xFF, 0x80, 0xC3]])
        return [self.rng.choice(self.text)] + [self.byte[b] for b in bad] + [self.rng.choice(self.text)]

    def sequence(self, n: int, *, garbage: bool = False, special: bool = True) -> list[int]:
        ids: list[int] = []
        kinds = ["text"] * 5 + ["char"] * 3 + ["special"] * special + ["garbage"] * garbage
        for _ in range(n):
            kind = self.rng.choice(kinds)
            if kind == "text":
                ids.append(self.rng.choice(self.text))
            elif kind == "char":
                ids += self.char()
            elif kind == "special":
                ids.append(self.rng.choice(self.special))
            else:
                ids += self.garbage()
        return ids


def test_incremental_equals_full_decode(tiny_lm):
    """Text tokens, special tokens and multi-byte characters from byte-fallback pieces: the pieces
    handed out add up to the full decode, and none holds half a character."""
    tok = tiny_lm.tokenizer
    units = Units(tok, 0)
    multibyte = 0
    for _ in range(300):
        ids = units.sequence(units.rng.randint(1, 25))
        out = pieces(tok, ids)
        assert "".join(out) == full(tok, ids), ids
        assert not any("\ufffd" in p for p in out), ids
        multibyte += any(ord(c) > 0x7FF for c in "".join(out))
    assert multibyte > 100  # the sequences really had 3- and 4-byte characters


def test_invalid_bytes_decode_as_the_full_sequence_does(tiny_lm):
    tok = tiny_lm.tokenizer
    units = Units(tok, 1)
    for _ in range(200):
        ids = units.sequence(units.rng.randint(1, 20), garbage=True)
        assert run(tok, ids)[0] == full(tok, ids), ids


def test_answer_after_a_prompt_tail_is_its_text_in_the_whole_conversation(tiny_lm):
    """Decoded after the prompt's last tokens, the answer is what it is in the whole text, its
    leading whitespace dropped (here the tail's first token keeps its leading space)."""
    tok = tiny_lm.tokenizer
    units = Units(tok, 2)
    for _ in range(100):
        tail = [units.rng.choice(units.text) for _ in range(4)]
        ids = units.sequence(units.rng.randint(1, 20), special=False)
        whole, prompt = tok.decode(tail + ids), tok.decode(tail)
        assert whole.startswith(prompt)
        assert run(tok, ids, tail=tail)[0] == whole[len(prompt):].lstrip(), (tail, ids)


def test_multibyte_characters_are_never_split(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("héllo 世界 ok", add_special_tokens=False).input_ids
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte-fallback pieces
    d = IncrementalDetokenizer(tok)
    out = [d.add(t) for t in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in out)
    assert "".join(out) == "héllo 世界 ok"
    # a character's text comes out with the token that completes it, not later
    ends = [i for i, t in enumerate(ids) if tok.decode(ids[:i + 1]).endswith("界")]
    assert out[ends[0]].endswith("界")


def test_stop_string_split_across_tokens_is_held_back(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("the red car is here", add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tok, ["car is"])
    out = [d.add(t) for t in ids]
    assert "".join(out) == "the red " and d.stopped
    assert d.flush() == "" and d.add(ids[0]) == ""  # nothing more once stopped


@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_cut_the_text_at_their_first_occurrence(tiny_lm, seed):
    """A stop string taken from the answer (so it spans tokens and characters at random places)
    ends it right before its first occurrence; nothing of it, or after it, is ever handed out.
    A stop string that never occurs changes nothing, but a partial match is held back only until
    it stops matching."""
    tok = tiny_lm.tokenizer
    units = Units(tok, 10 + seed)
    rng = units.rng
    stopped = 0
    for _ in range(150):
        ids = units.sequence(rng.randint(2, 25))
        text = full(tok, ids)
        if len(text) < 3:
            continue
        a = rng.randrange(len(text) - 1)
        stop = text[a:a + rng.randint(1, 6)]
        never = stop + "\u2603"  # the stop string plus a character no sequence contains
        out, d = run(tok, ids, stop=[never, stop])
        assert out == text[:text.find(stop)] and d.stopped, (ids, stop)
        out, d = run(tok, ids, stop=[never])
        assert out == text and not d.stopped
        stopped += 1
    assert stopped > 100


def test_the_earliest_of_several_stop_strings_wins_whatever_their_order(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("the red car is here", add_special_tokens=False).input_ids
    assert run(tok, ids, stop=["d car", "car"])[0] == "the re"
    assert run(tok, ids, stop=["car", "d car"])[0] == "the re"  # "car" completes with "d car", which begins first


def test_flush_releases_a_held_back_partial_stop(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("the red car", add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tok, ["car is"])
    out = "".join(d.add(t) for t in ids)
    assert out == "the red " and not d.stopped  # "car" may begin the stop string
    assert d.flush() == "car"


def test_byte_fallback_garbage_never_raises(tiny_lm):
    tok = tiny_lm.tokenizer
    byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xE4, 0xB8, 0xFF, 0x80, 0xC3)]
    out = pieces(tok, byte_ids * 3)
    assert out[:-1] == [""] * 15  # each byte run so far is incomplete: nothing to show yet
    assert out[-1] == "\ufffd" * 15 == tok.decode(byte_ids * 3)  # at the end: what a full decode gives
    words = tok("then words", add_special_tokens=False).input_ids
    assert run(tok, byte_ids * 3 + words)[0] == "\ufffd" * 15 + " then words"


def test_nothing_past_the_earliest_stop_is_ever_sent_with_overlapping_stop_strings(tiny_lm):
    # A stop string's held-back tail must not shrink because another stop string held back less:
    # with ["bx", "abz"], "...ab" must hold back "ab" (not only "b"), or "a" leaks before "abz" ends.
    tok = tiny_lm.tokenizer
    rng = random.Random(5)
    stops = ["bx", "abz"]
    # a token per character: the piece itself where the vocabulary has it, else its byte token
    char_ids = {ch: (tok.convert_tokens_to_ids("\u2581" if ch == " " else ch)
                     if ("\u2581" if ch == " " else ch) in tok.get_vocab() else tok.convert_tokens_to_ids(f"<0x{ord(ch):02X}>"))
                for ch in "abxz "}
    for _ in range(200):
        text = "".join(rng.choice("abxz ") for _ in range(rng.randrange(3, 14)))
        ids = [char_ids[ch] for ch in text]  # one character a step
        whole = full(tok, ids)
        cut = min([whole.find(s) for s in stops if s in whole] or [len(whole)])
        got, _ = run(tok, ids, stop=stops)
        assert got == whole[:cut], (text, got, whole[:cut])
