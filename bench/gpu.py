"""GPU path: a SliME-7B-shaped model with random weights built directly on the GPU (no download),
measured against the memory-bandwidth roofline. One run, a short table at the end.

    python -m bench.gpu [--dtype bfloat16] [--batches 1,8,32,64] [--steps 64]

CLIP ViT-L/14-336 shapes, a Vicuna-7B-shaped Llama, the real projector and sampler shapes.
Measures decode tokens/s per batch size (eager, CUDA graphs, and CUDA graphs with compiled
pointwise kernels: what the server runs), TTFT of a 1344 x 1008 image request, peak memory, and
batch-1 decode time against the roofline: the weight bytes one step reads (all LLM weights but the embedding table, which is gathered) divided
by the bandwidth of a large device-to-device copy measured in the same run.
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
    from model import execution
    from model.modeling import SliMEForCausalLM
    from model.local_compressor import sincos_pos_embed_2d

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
    model.llm.configure(execution.choose("sdpa", device, dtype))  # as the loader does (fused projections)
    return model.eval(), cfg


# eager: kernel by kernel from Python; graphs: the server's CUDA graphs with eager pointwise ops;
# compiled: graphs with the pointwise ops compiled (the server's default on CUDA)
MODES = ("eager", "graphs", "compiled")


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
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
    return 2 * nbytes * n / (time.perf_counter() - t0)


@torch.inference_mode()
def decode_rate(llm, batch: int, *, graphs: bool, context: int, steps: int, dtype: torch.dtype,
                mode: str | None = None) -> dict:
    """Greedy decode steps at `batch` sequences of `context` cached positions, each step ending in
    a host read of the tokens as the engine's does."""
    from model.decode_graphs import DecodeGraphs

    device = llm.lm_head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # the CPU: tests only
    max_len = context + steps + 16
    cache = llm.new_cache(num_slots=batch, max_len=max_len, dtype=dtype, device=device)
    tables = [cache.slot_table(i) for i in range(batch)]
    ids = [1] * batch
    if graphs:
        graph_step = DecodeGraphs(llm, cache, max_batch=batch, max_len=max_len)

        def step(ids, positions):
            return graph_step(ids, positions, tables)
    else:
        def step(ids, positions):
            return llm.logits(llm.decode(llm.embed(torch.tensor(ids, device=device)), positions, cache, tables))
    sync()
    t0 = time.perf_counter()
    ids = step(ids, [context] * batch).argmax(-1).tolist()  # with graphs: the capture (and compiling)
    first = time.perf_counter() - t0
    for i in range(1, 3):  # warm-up
        ids = step(ids, [context + i] * batch).argmax(-1).tolist()
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        ids = step(ids, [context + 3 + i] * batch).argmax(-1).tolist()
    dt = (time.perf_counter() - t0) / steps
    return {"mode": mode or ("graphs" if graphs else "eager"), "batch": batch, "step_ms": dt * 1e3, "tok_s": batch / dt,
            "first_step_ms": first * 1e3}


@torch.inference_mode()
def image_ttft(model, llm, dtype: torch.dtype, runs: int = 4) -> float:
    """Median seconds from a 1344 x 1008 image plus a question to the first token, on the device."""
    from PIL import Image

    from model.slicing import preprocess

    device = llm.lm_head.weight.device
    img = Image.new("RGB", (1344, 1008), (120, 80, 200))
    ids = list(range(1, 40)) + [-200] + list(range(40, 60))
    cache = llm.new_cache(num_slots=1, max_len=4096, dtype=dtype, device=device)
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pixels, grid = preprocess(img)
        feats = model.encode_images([torch.from_numpy(pixels)], [grid])
        embeds, _ = model.embed_prompt(ids, feats)
        hidden = llm.prefill(embeds, cache, slot=0, start=0)
        int(llm.logits(hidden).argmax())
        times.append(time.perf_counter() - t0)
    rest = sorted(times[1:])  # the first run pays for lazy initialisation
    return rest[len(rest) // 2]


@torch.inference_mode()
def kernel_profile(llm, context: int, dtype: torch.dtype, steps: int = 5) -> tuple[float, str]:
    """Batch-1 decode without graphs under torch.profiler: the GPU's kernel time per step (what a
    replayed graph cannot go below) and a table of the kernels that take it."""
    from torch.profiler import ProfilerActivity, profile

    device = llm.lm_head.weight.device
    cache = llm.new_cache(num_slots=1, max_len=context + steps + 8, dtype=dtype, device=device)
    emb = llm.embed(torch.tensor([1], device=device))
    llm.logits(llm.decode(emb, [context], cache))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            llm.logits(llm.decode(emb, [context + 1 + i], cache))
        torch.cuda.synchronize()
    events = prof.key_averages()
    total_us = sum(e.self_device_time_total for e in events) / steps
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / steps
    table = events.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60)
    return total_us / 1e3, f"{kernels:.0f} device ops per step\n{table}"


@torch.inference_mode()
def capture_all(llm, dtype: torch.dtype, slots: int = 16, max_len: int = 4096) -> dict:
    """What `--cuda-graph-capture startup` costs a server of batch `slots` and `max_len`: seconds
    and memory."""
    from model.decode_graphs import DecodeGraphs

    cache = llm.new_cache(num_slots=slots, max_len=max_len, dtype=dtype, device=llm.lm_head.weight.device)
    graphs = DecodeGraphs(llm, cache, max_batch=slots, max_len=max_len)
    graphs([0], [3], [cache.slot_table(0)])  # the server's warm-up: the first capture (and any compiling), not timed
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    t0 = time.perf_counter()
    n = graphs.capture_all()
    torch.cuda.synchronize()
    return {"graphs": n, "buckets": graphs.buckets, "seconds": time.perf_counter() - t0,
            "gb": (torch.cuda.memory_reserved() - before) / 1e9}


@torch.inference_mode()
def backend_sweep(llm, cfg, *, backends: list[str], batches: list[int], contexts: list[int], steps: int,
                  dtype: torch.dtype, weight_bytes: int, kv_bytes: int, bw: float) -> list[dict]:
    """Decode tokens/s per attention backend x batch x context (CUDA graphs with compiled pointwise
    kernels, as the server runs), each with the bandwidth it achieved: the bytes a step must read
    (the weights, and every sequence's K/V) over its time, against the measured copy bandwidth.
    Combinations whose cache would not fit in 60% of the free memory are skipped."""
    rows = []
    llm.compile_pointwise(True)
    for backend in backends:
        llm.set_attention_backend(backend)
        for context in contexts:
            for b in batches:
                if b * (context + steps + 16) * kv_bytes > 0.6 * torch.cuda.mem_get_info()[0]:
                    rows.append({"backend": backend, "batch": b, "context": context, "skipped": "memory"})
                    continue
                r = decode_rate(llm, b, graphs=True, context=context, steps=steps, dtype=dtype, mode="compiled")
                read = weight_bytes + b * (context + 3 + steps // 2) * kv_bytes
                r.update(backend=backend, context=context, achieved_gbs=read / (r["step_ms"] / 1e3) / 1e9,
                         of_copy_bw=read / (r["step_ms"] / 1e3) / bw)
                rows.append(r)
                print(json.dumps(r), flush=True)
                torch.cuda.empty_cache()
    llm.set_attention_backend("sdpa")
    return rows


@torch.inference_mode()
def vision_batching(model, requests: int = 16, batch_views: int = 32) -> dict:
    """16 image requests (1344 x 1008: 7 views each) arriving together: when each one's features
    are ready, encoded one request at a time vs in passes of up to `batch_views` views (the vision
    stage's `--vision-batch-views`). Median and last, in seconds."""
    from PIL import Image

    from model.slicing import preprocess

    pixels, grid = preprocess(Image.new("RGB", (1344, 1008), (120, 80, 200)))
    views = pixels.shape[0]
    batch = [torch.from_numpy(pixels)] * requests
    model.encode_images(batch[:2], [grid] * 2)  # lazy initialisation
    out = {}
    for name, per_pass in (("alone", 1), ("batched", max(1, batch_views // views))):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ready = []
        for i in range(0, requests, per_pass):
            model.encode_images(batch[i:i + per_pass], [grid] * len(batch[i:i + per_pass]))
            torch.cuda.synchronize()
            ready += [time.perf_counter() - t0] * len(batch[i:i + per_pass])
        out[name] = {"median_s": sorted(ready)[len(ready) // 2], "last_s": ready[-1], "per_pass": per_pass}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024, help="positions already in each sequence's cache")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--profile", action="store_true", help="also profile the kernels of a batch-1 step")
    ap.add_argument("--modes", default=",".join(MODES), help="which of eager, graphs, compiled to run")
    ap.add_argument("--backends", default="", help="also sweep these decode attention backends (e.g. triton,sdpa) "
                    "over --batches x --contexts")
    ap.add_argument("--contexts", default="512,2048,8192", help="cached positions per sequence for --backends")
    ap.add_argument("--vision", action="store_true", help="also time 16 image requests' vision stage, alone vs batched")
    ap.add_argument("--capture-all", action="store_true",
                    help="also time capturing every decode graph a 16-slot, 4,096-position server needs")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 2
    from model.kv_cache import KVCache

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    model, cfg = build(device, dtype)
    llm = model.llm
    # bytes one decode step must read: every LLM weight but the embedding table (one row gathered)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in llm.named_parameters() if "embed_tokens" not in n)
    kv_bytes = KVCache.bytes_per_token(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                       head_dim=cfg.dim_head, dtype=dtype)
    bw = copy_bandwidth(device)
    batches = [int(x) for x in args.batches.split(",")]
    rows = []
    modes = [m for m in MODES if m in args.modes.split(",")]
    for mode in modes:
        llm.compile_pointwise(mode == "compiled")
        for b in batches:
            rows.append(decode_rate(llm, b, graphs=mode != "eager", context=args.context, steps=args.steps,
                                    dtype=dtype, mode=mode))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()  # that run's cache and graphs are gone
    sweep = []
    if args.backends:
        sweep = backend_sweep(llm, cfg, backends=args.backends.split(","), batches=batches,
                              contexts=[int(c) for c in args.contexts.split(",")], steps=args.steps, dtype=dtype,
                              weight_bytes=weight_bytes, kv_bytes=kv_bytes, bw=bw)
    vision = vision_batching(model) if args.vision else None
    # profiled with the last mode's kernels (compiled, by default), before they are dropped
    kernel_ms, kernel_table = kernel_profile(llm, args.context, dtype) if args.profile else (None, "")
    captured = capture_all(llm, dtype) if args.capture_all else None
    llm.compile_pointwise(False)
    ttft = image_ttft(model, llm, dtype)
    name = torch.cuda.get_device_name()
    peak = torch.cuda.max_memory_allocated() / 1e9
    roofline_ms = weight_bytes / bw * 1e3
    kv_ms = kv_bytes * (args.context + args.steps) / bw * 1e3  # batch 1's cache read, for reference
    result = {"device": name, "dtype": args.dtype, "context": args.context, "rows": rows, "ttft_s": ttft,
              "weight_gb": weight_bytes / 1e9, "copy_bw_gbs": bw / 1e9, "roofline_ms": roofline_ms,
              "peak_mem_gb": peak, "batch1_kernel_ms": kernel_ms, "capture_all": captured, "backends": sweep,
              "vision_batching": vision}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    by = {(r["mode"], r["batch"]): r for r in rows}
    print(f"\n{name}, {args.dtype}, {args.context} cached positions per sequence, {args.steps} steps")
    print("| batch | " + " | ".join(f"{m} ms/step | {m} tokens/s" for m in modes) + " |")
    print("|---|" + "---|---|" * len(modes))
    for b in batches:
        print(f"| {b} | " + " | ".join(f"{by[(m, b)]['step_ms']:.2f} | {by[(m, b)]['tok_s']:.0f}" for m in modes) + " |")
    print(f"roofline: {weight_bytes / 1e9:.2f} GB of weights at {bw / 1e9:.0f} GB/s = {roofline_ms:.2f} ms "
          f"(+{kv_ms:.2f} ms for batch 1's KV cache)")
    for mode in modes:
        b1 = by[(mode, batches[0])]["step_ms"]
        line = f"{mode}: batch {batches[0]} at {roofline_ms / b1 * 100:.0f}% of the weight roofline"
        if 32 in batches:
            line += f"; batch 32 = x{by[(mode, 32)]['tok_s'] / by[(mode, batches[0])]['tok_s']:.1f} batch {batches[0]}'s tokens/s"
        print(line)
    if kernel_ms is not None:
        print(kernel_table)
        print(f"batch 1: {kernel_ms:.2f} ms of kernel time per step (the floor for a replayed graph)")
    if captured:
        print(f"capture_all: {captured['graphs']} decode graphs (batch buckets {captured['buckets']}, key spans up "
              f"to 4,096) in {captured['seconds']:.1f} s, {captured['gb']:.2f} GB of graph memory")
    if sweep:
        print("\n| backend | context | batch | ms/step | tokens/s | achieved GB/s | of copy bandwidth |")
        print("|---|---|---|---|---|---|---|")
        for r in sweep:
            if "skipped" in r:
                print(f"| {r['backend']} | {r['context']} | {r['batch']} | skipped ({r['skipped']}) | | | |")
            else:
                print(f"| {r['backend']} | {r['context']} | {r['batch']} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | "
                      f"{r['achieved_gbs']:.0f} | {r['of_copy_bw'] * 100:.0f}% |")
    if vision:
        a, b = vision["alone"], vision["batched"]
        print(f"vision stage, 16 image requests at once: median ready {a['median_s'] * 1e3:.0f} ms alone, "
              f"{b['median_s'] * 1e3:.0f} ms batched ({b['per_pass']} requests a pass); last {a['last_s'] * 1e3:.0f} "
              f"vs {b['last_s'] * 1e3:.0f} ms")
    print(f"TTFT 1344 x 1008 image: {ttft * 1e3:.0f} ms; peak memory {peak:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
