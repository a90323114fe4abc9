"""One-shot CLI: `python -m model.cli --model DIR [--image PATH]... --prompt TEXT [--json]`.

With `--json` the last line of stdout is one JSON object: text, token_ids (generated, no prompt),
prompt_tokens (positions fed to the LLM, image rows included) and per-image grid/view/token counts.
"""

from __future__ import annotations

import argparse
import json
import sys

from .images import load_image
from .loading import CheckpointError, LoadOptions, load_model
from .sampling import SamplingParams
from .templates import TEMPLATES, Message


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.cli", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--model-base", default=None, help="base model directory of a LoRA checkpoint")
    ap.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--template", choices=["auto", *TEMPLATES], default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "triton", "flash", "sdpa"])
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash_attention_2"],
                    help="deprecated: use --attention-backend (flash_attention_2 is flash)")
    ap.add_argument("--allow-download", action="store_true", help="fetch a hub vision tower if needed")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    from .generation import generate

    try:
        lm = load_model(args.model, LoadOptions(device=args.device, dtype=args.dtype, model_base=args.model_base,
                                                quantization=args.quantization, allow_download=args.allow_download,
                                                attention=args.attention, attention_backend=args.attention_backend))
        images = [load_image(p) for p in args.image]
    except (CheckpointError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    template = None if args.template == "auto" else args.template
    result = generate(lm, [Message("user", args.prompt, num_images=len(images))], images, params, template=template)
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
                          "finish_reason": result.finish_reason,
                          "images": [{"grid": list(r.grid) if r.grid else None, "views": r.views,
                                      "global_tokens": r.global_tokens, "local_tokens": r.local_tokens,
                                      "local_kept": r.local_kept} for r in result.images]}))
    else:
        print(result.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
