"""Real tokenizers for the tiny checkpoint, trained here on a fixed, generated corpus.

`vicuna_v1`: a sentencepiece BPE model with byte fallback and Llama's special ids (<unk> 0,
<s> 1, </s> 2, bytes <0x00>..<0xFF> from 3), saved as `tokenizer.model` like Vicuna's.
`llama3`: a byte-level BPE `tokenizer.json` with Llama 3's header and turn tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_SENTENCES = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "What is unusual about this image?", "Describe the image in detail.", "What color is the car?",
    "How many people are in the picture?", "Is there a boat on the water?", "Read the text on the sign.",
    "A man is ironing clothes on the back of a yellow taxi in a busy street.",
    "The lake is calm and a wooden pier leads to the water under a cloudy sky.",
    "Mountains rise behind the trees; the light of the evening is soft and warm.",
]
_WORDS = ("the a an of to and in on at with by for from is are was were be this that these those "
          "image picture photo photograph scene view left right top bottom middle center corner "
          "man woman child people person dog cat car taxi bus street road city building house window "
          "door sky cloud sun water lake river sea boat pier tree forest mountain hill grass flower "
          "red green blue yellow white black gray brown orange purple pink color colour bright dark "
          "small large big tall short long wide narrow old new young busy calm quiet loud happy "
          "what where when why how which who many much some any all every each one two three four five "
          "six seven eight nine ten hundred thousand number text sign word letter read write say tell "
          "describe explain answer question detail unusual interesting funny strange normal usual "
          "standing sitting walking running driving ironing holding looking wearing carrying "
          "shirt clothes hat shoes table chair board iron background foreground light shadow "
          "assistant user chat helpful polite detailed artificial intelligence curious yes no not "
          "there here it its he she they we you I my your our their his her").split()
_PUNCT = [",", ".", "?", "!", ";", ":", "'", '"', "(", ")", "-", "/", "%", "$", "#", "&", "*", "+", "=", "<", ">"]


def corpus(seed: int = 0, num_lines: int = 6000) -> list[str]:
    """A deterministic English-like corpus with digits, punctuation, newlines and template words."""
    rng = random.Random(seed)
    lines = list(_SENTENCES) * 20
    lines += ["USER: " + s + " ASSISTANT:" for s in _SENTENCES]
    for _ in range(num_lines):
        n = rng.randint(4, 18)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 20000)))
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), rng.choice(_PUNCT))
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line.capitalize()
        lines.append(line + rng.choice([".", "?", "!", ",", ""]))
    return lines


def build_sentencepiece(out_dir: Path, *, vocab_size: int = 1200, seed: int = 0) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed)), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False,
        max_sentencepiece_length=16, shuffle_input_sentence=False)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 2048, "padding_side": "right"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|reserved_special_token_0|>"]


def build_llama3(out_dir: Path, *, vocab_size: int = 1200, seed: int = 0) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(LLAMA3_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True, "model_max_length": 8192,
              "add_bos_token": True}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
