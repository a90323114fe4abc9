"""GPU path: a SliME-7B-shaped model with random weights built directly on the GPU (no download),
measured against the memory-bandwidth roofline. One run, a short table at the end.

    python -m bench.gpu [--dtype bfloat16] [--batches 1,8,32,64] [--steps 64]

CLIP ViT-L/14-336 shapes, a Vicuna-7B-shaped Llama, the real projector and sampler shapes.
Measures decode tokens/s per batch size, TTFT of a 1344 x 1008 image request, peak memory, and
batch-1 decode time against weight bytes / the bandwidth of a large device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def slime_7b_config():
    from model.config import SliMEConfig, VisionConfig

    cfg = SliMEConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
                      mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024,
                      mm_projector_type="gated", mm_patch_merge_type="spatial", image_aspect_ratio="anyres",
                      mm_resampler_type="cosine", separator_id=29892)
    return cfg, VisionConfig()


def build(device: torch.device, dtype: torch.dtype):
    from model.modeling import SliMEForCausalLM
    from model.resampler import sincos_pos_embed_2d

    cfg, vcfg = slime_7b_config()
    with torch.device("meta"):
        model = SliMEForCausalLM(cfg, vcfg)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                grid = int(p.shape[0] ** 0.5)
                p.data = torch.from_numpy(sincos_pos_embed_2d(p.shape[1], grid)).half().to(device)
            elif p.dim() >= 2:
                p.data = (torch.randn(p.shape, device=device, dtype=torch.float32) * p.shape[-1] ** -0.5).to(dtype)
            else:
                p.data = torch.ones(p.shape, device=device, dtype=dtype)
    return model.eval(), cfg


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * nbytes * n / (time.perf_counter() - t0)  # read + write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024, help="positions already in each sequence's cache")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 2
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    from model.slicing import preprocess

    model, cfg = build(device, dtype)
    llm = model.llm
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters())
    bw = copy_bandwidth(device)
    rows = []
    batches = [int(x) for x in args.batches.split(",")]
    for b in batches:
        cache = llm.new_cache(num_slots=b, max_len=args.context + args.steps + 8, dtype=dtype, device=device)
        emb = torch.randn(b, cfg.hidden_size, device=device, dtype=dtype)
        positions = [args.context] * b
        for _ in range(3):
            llm.logits(llm.decode(emb, positions, cache))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            llm.logits(llm.decode(emb, [args.context + i] * b, cache)).argmax(-1)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        rows.append({"batch": b, "step_ms": dt * 1e3, "tok_s": b / dt})
        del cache
        torch.cuda.empty_cache()
    # TTFT: a 1344 x 1008 image plus a short question, end to end on the device
    from PIL import Image

    img = Image.new("RGB", (1344, 1008), (120, 80, 200))
    ids = list(range(1, 40)) + [-200] + list(range(40, 60))
    cache = llm.new_cache(num_slots=1, max_len=4096, dtype=dtype, device=device)
    ttfts = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pixels, grid = preprocess(img)
        feats = model.encode_images([torch.from_numpy(pixels)], [grid])
        embeds, _ = model.embed_prompt(ids, feats)
        hidden = llm.prefill(embeds, cache, slot=0, start=0)
        int(llm.logits(hidden).argmax())
        ttfts.append(time.perf_counter() - t0)
    ttft = sorted(ttfts[1:])[len(ttfts[1:]) // 2]
    roofline_ms = weight_bytes / bw * 1e3
    b1 = rows[0]["step_ms"]
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows, "ttft_s": ttft,
                      "weight_gb": weight_bytes / 1e9, "copy_bw_gbs": bw / 1e9,
                      "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}))
    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}, context {args.context}")
    print("| batch | step ms | tokens/s |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']:.2f} | {r['tok_s']:.0f} |")
    print(f"batch-1 roofline {roofline_ms:.2f} ms ({weight_bytes / 1e9:.1f} GB at {bw / 1e9:.0f} GB/s): "
          f"{roofline_ms / b1 * 100:.0f}% of roofline")
    if 32 in batches:
        print(f"batch 32 vs batch 1 throughput: x{next(r for r in rows if r['batch'] == 32)['tok_s'] / rows[0]['tok_s']:.1f}")
    print(f"TTFT 1344 x 1008 image: {ttft * 1e3:.0f} ms; peak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
