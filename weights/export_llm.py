"""Export the LLM half of a SliME checkpoint as a plain Llama checkpoint (for side-by-side
benchmarks against text-only servers), with a chat template equal to ours.

    python -m weights.export_llm SRC OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from model.templates import VICUNA_SYSTEM

VICUNA_JINJA = (
    "{%- set ns = namespace(system='" + VICUNA_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- for m in messages if m.role == 'system' %}{% set ns.system = m.content %}{% endfor -%}"
    "{{ bos_token }}{{ ns.system + ' ' }}"
    "{%- for m in messages %}{% if m.role == 'user' %}USER: {{ m.content }} "
    "{% elif m.role == 'assistant' %}ASSISTANT: {{ m.content }}</s>{% endif %}{% endfor -%}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
LLAMA3_JINJA = (
    "{{ bos_token }}{%- for m in messages %}"
    "{% if m.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "<|eot_conversation|>{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "attention_bias",
              "mlp_bias", "hidden_act")


def export_llm(src: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    from model.checkpoint import TensorSource, weight_files

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    llama = {k: cfg[k] for k in LLAMA_KEYS if k in cfg}
    llama.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"})
    (out / "config.json").write_text(json.dumps(llama, indent=2))
    with TensorSource(weight_files(src)) as ts:
        tensors = {k: ts.get(k).contiguous() for k in ts.keys()
                   if k.startswith(("model.embed_tokens", "model.layers.", "model.norm", "lm_head"))}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    is_llama3 = (src / "tokenizer.json").exists() and "<|eot_id|>" in (src / "tokenizer.json").read_text()
    tok_cfg["chat_template"] = LLAMA3_JINJA if is_llama3 else VICUNA_JINJA
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights.export_llm", description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    print(export_llm(args.src, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
