from model.config import IMAGE_TOKEN_INDEX
from model.processor import tokenize_prompt
from model.templates import IMAGE, Message, build_prompt, detect_template, render

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def test_vicuna_single_turn_with_image():
    p = build_prompt([Message("user", "What is this?", 1)], "vicuna_v1")
    assert render(p) == SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"


def test_vicuna_two_turns():
    p = build_prompt([Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2")], "vicuna_v1")
    assert render(p) == SYSTEM + " USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"


def test_vicuna_system_override():
    p = build_prompt([Message("system", "Be brief."), Message("user", "hi")], "vicuna_v1")
    assert render(p) == "Be brief. USER: hi ASSISTANT:"


def test_llama3_turns():
    p = build_prompt([Message("user", "What?", 1)], "llama3")
    assert render(p) == ("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    p = build_prompt([Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2")], "llama3")
    assert render(p) == ("<|start_header_id|>user<|end_header_id|>\n\nq1<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|><|eot_conversation|>"
                         "<|start_header_id|>user<|end_header_id|>\n\nq2<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_several_images_in_order():
    p = build_prompt([Message("user", "compare", 2)], "vicuna_v1")
    assert render(p).endswith("USER: <image>\n<image>\ncompare ASSISTANT:")
    assert sum(1 for x in p if x is IMAGE) == 2


def test_typed_image_tag_is_text(tiny_lm):
    p = build_prompt([Message("user", "<image> is a tag")], "vicuna_v1")
    ids = tokenize_prompt(tiny_lm.tokenizer, p)
    assert IMAGE_TOKEN_INDEX not in ids


def test_tokenisation_around_image_matches_reference_pattern(tiny_lm):
    tok = tiny_lm.tokenizer
    p = build_prompt([Message("user", "What is unusual?", 1)], "vicuna_v1")
    ids = tokenize_prompt(tok, p)
    i = ids.index(IMAGE_TOKEN_INDEX)
    space, newline = tok.convert_tokens_to_ids("\u2581"), tok.convert_tokens_to_ids("<0x0A>")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[i - 1] == space and ids[i + 1:i + 3] == [space, newline]
    # the reference: each chunk tokenised on its own, BOS dropped from all but the first
    text = render(p)
    a, b = text.split("<image>")
    assert ids == tok(a).input_ids + [IMAGE_TOKEN_INDEX] + tok(b).input_ids[1:]


def test_detect_template(tiny_lm, tiny_llama3_dir):
    from model.loading import load_tokenizer

    assert detect_template(tiny_lm.tokenizer.get_vocab()) == "vicuna_v1"
    assert detect_template(load_tokenizer(tiny_llama3_dir).get_vocab()) == "llama3"
