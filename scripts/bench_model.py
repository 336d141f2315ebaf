#!/usr/bin/env python3
"""Train-step throughput: our NaFlexViT (packed and padded input) vs timm's naflexvit (padded), same weights.

Command (GPU, the documented config: NaFlexViT-B/16, L per step from 128/256/576/784/1024, token budget
-b 64 x max(L) = 65,536 tokens per step, bf16 autocast, NAdamW, drop-path 0.2):
    python scripts/bench_model.py --device cuda --model naflexvit_base_patch16_gap --steps 30 [--compile]
CPU smoke check (tiny model, small budget):
    python scripts/bench_model.py --device cpu --model naflexvit_tiny_test -b 16 --seq-lens 64 128 256 \
        --steps 12 --rounds 3
Runtime: GPU ~2-4 min (3 variants x (warmup + steps), longer with --compile); CPU smoke ~40 s.

Every variant runs the same step schedule on the same synthetic batches (images with random aspect ratios whose
patch grids fill the step's sequence length like timm's NaFlex transforms do), so the comparison isolates the
model step: packing (NaViT arXiv:2307.06304) against timm's padding to L with a dense attention mask.
Valid tokens = real image patches (no padding, no prefix tokens). TFLOP/s counts useful work only: linear
layers on valid + prefix tokens and per-image attention, x3 for forward + backward. MFU divides it by the
GPU's dense bf16 peak (table below, or --peak-tflops).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
VARIANTS = ("ours_packed", "ours_padded", "timm_padded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train-step throughput of our model (packed/padded) vs timm's.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="naflexvit_base_patch16_gap")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (at least one per sequence length)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="token budget is b x max(seq-lens)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 576, 784, 1024])
    p.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="autocast dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--drop-path", type=float, default=0.2)
    p.add_argument("--attn-backend", default="auto", help="our attention backend for packed input")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by GPU name)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleave the variants over this many rounds (for noisy, shared machines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def step_schedule(seq_lens, budget, steps, seed):
    """(L, batch) per step: L uniform from the list, batch = floor(budget / L / 8) * 8 (>= 1), like timm."""
    rng = random.Random(seed)
    out = []
    for i in range(steps):
        L = seq_lens[i % len(seq_lens)] if i < len(seq_lens) else rng.choice(seq_lens)
        out.append((L, max(1, budget // L // 8 * 8)))
    return out


def image_grids(L, batch, rng):
    """Patch grids (h, w) with aspect in [3/4, 4/3] that fill L as the largest grid that fits."""
    grids = []
    for _ in range(batch):
        a = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h = max(1, int(math.sqrt(L * a)))
        w = max(1, min(L // h, int(round(h / a)) + 1))
        while h * w > L:
            w -= 1
        grids.append((h, w))
    return grids


def make_batches(grids, L, patch_dim, num_classes, device, seed):
    """Same images as a packed dict (ours) and a padded dict (timm's layout), plus int targets."""
    g = torch.Generator().manual_seed(seed)
    coords, lens = [], []
    for h, w in grids:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords.append(torch.stack([yy.flatten(), xx.flatten()], -1))
        lens.append(h * w)
    T, B = sum(lens), len(grids)
    patches_TD = torch.randn(T, patch_dim, generator=g)
    coord_T2 = torch.cat(coords)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(seq_lens, 0)
    packed = {"patches": patches_TD.to(device), "patch_coord": coord_T2.to(device), "seq_lens": seq_lens.to(device),
              "cu_seqlens": cu.to(device), "max_seqlen": max(lens),
              "grid_sizes": torch.tensor(grids, dtype=torch.int32).to(device)}
    p_BND = torch.zeros(B, L, patch_dim)
    c_BN2 = torch.zeros(B, L, 2, dtype=torch.long)
    v_BN = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lens):
        p_BND[i, :n] = patches_TD[cu[i]:cu[i + 1]]
        c_BN2[i, :n] = coord_T2[cu[i]:cu[i + 1]]
        v_BN[i, :n] = True
    padded = {"patches": p_BND.to(device), "patch_coord": c_BN2.to(device), "patch_valid": v_BN.to(device)}
    target = torch.randint(0, num_classes, (B,), generator=g).to(device)
    return packed, padded, target, T


def timm_twin(model, name, drop_path):
    """timm's naflexvit with our variant's config (every shared NaFlexVitCfg field) holding our weights."""
    import dataclasses

    import timm
    from timm.models.naflexvit import NaFlexVitCfg as TimmCfg

    import naflex

    timm_fields = {f.name for f in dataclasses.fields(TimmCfg)}
    kw = {k: v for k, v in dataclasses.asdict(naflex.get_config(name)).items() if k in timm_fields}
    kw["drop_path_rate"] = drop_path
    tm = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, num_classes=model.num_classes, **kw)
    tm.load_state_dict(model.state_dict(), strict=True)
    return tm


def flops_per_step(model, grids, num_prefix):
    """Useful training FLOPs: 3 x forward (linears on real tokens + per-image attention)."""
    linear_macs_per_token = sum(m.in_features * m.out_features for m in model.modules()
                                if isinstance(m, torch.nn.Linear))
    D, depth = model.embed_dim, len(model.blocks)
    fwd = 0
    for h, w in grids:
        n = h * w + num_prefix
        fwd += 2 * n * linear_macs_per_token + depth * 4 * n * n * D
    return 3 * fwd


def make_step(variant, model, batches, device, amp_dtype, compile_model):
    """One training step (forward, label-smoothed CE, backward, NAdamW) of ``model`` on the batch of length L."""
    model.train()
    opt = torch.optim.NAdam(model.parameters(), lr=3e-4, weight_decay=0.1, decoupled_weight_decay=True,
                            foreach=device.type == "cuda")
    fwd = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    key = "packed" if variant == "ours_packed" else "padded"

    def step(L):
        b = batches[L]
        with autocast:
            logits = fwd(b[key])
            loss = F.cross_entropy(logits.float(), b["target"], label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_steps(step, steps, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for L, _ in steps:
        step(L)
    sync()
    return time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    import naflex

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    amp_name = args.amp_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    amp_dtype = getattr(torch, amp_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ours = naflex.create_model(args.model, drop_path_rate=args.drop_path)
    P = ours.patch_size
    budget = args.batch_size * max(args.seq_lens)
    schedule = step_schedule(args.seq_lens, budget, max(args.warmup, len(args.seq_lens)) + args.steps, args.seed)
    args.warmup = max(args.warmup, len(args.seq_lens))
    rng = random.Random(args.seed)
    batches = {}
    for L in sorted(set(L for L, _ in schedule)):
        bs = max(1, budget // L // 8 * 8)
        grids = image_grids(L, bs, rng)
        packed, padded, target, T = make_batches(grids, L, P * P * 3, ours.num_classes, device, args.seed + L)
        batches[L] = {"packed": packed, "padded": padded, "target": target, "num_images": bs, "valid_tokens": T,
                      "flops": flops_per_step(ours, grids, getattr(ours, "num_prefix_tokens", 0))}
    peak = args.peak_tflops
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    print(f"# {args.model} on {gpu}, torch {torch.__version__}, {amp_name}, budget {budget} tokens/step, "
          f"L in {args.seq_lens}, {args.steps} timed steps, compile={args.compile}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    def build(variant):
        if variant == "timm_padded":
            model = timm_twin(ours, args.model, args.drop_path)
        else:
            model = naflex.create_model(args.model, drop_path_rate=args.drop_path)
            model.load_state_dict(ours.state_dict())
            if variant == "ours_packed" and hasattr(model, "set_attn_backend"):
                model.set_attn_backend(args.attn_backend)
        return make_step(variant, model.to(device), batches, device, amp_dtype, args.compile)

    warmup, timed = schedule[:args.warmup], schedule[args.warmup:]
    # rounds == 1: one variant after the other (each alone in memory: peak memory is its own).
    # rounds > 1: all variants resident, the timed steps split into rounds that the variants run in turn (the
    # same steps for each), so load changes on a shared machine hit every variant alike; no peak memory then.
    chunks = [timed[i::args.rounds] for i in range(args.rounds)]
    stats = {v: {"warmup_s": 0.0, "time_s": 0.0, "images": 0, "tokens": 0, "flops": 0}
             for v in args.variants}
    steps_fn = {}

    def timed_chunk(v, chunk):
        dt = run_steps(steps_fn[v], chunk, device)
        st = stats[v]
        imgs = sum(batches[L]["num_images"] for L, _ in chunk)
        toks = sum(batches[L]["valid_tokens"] for L, _ in chunk)
        st["time_s"] += dt
        st["images"] += imgs
        st["tokens"] += toks
        st["flops"] += sum(batches[L]["flops"] for L, _ in chunk)

    for v in args.variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        steps_fn[v] = build(v)
        stats[v]["warmup_s"] = run_steps(steps_fn[v], warmup, device)
        if args.rounds == 1:
            timed_chunk(v, timed)
            if device.type == "cuda":
                stats[v]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            del steps_fn[v]
    for chunk in (chunks if args.rounds > 1 else []):
        for v in args.variants:
            timed_chunk(v, chunk)

    results = []
    for v in args.variants:
        st = stats[v]
        r = {"variant": v, "steps": len(timed), "time_s": st["time_s"], "warmup_s": st["warmup_s"],
             "images_per_s": st["images"] / st["time_s"], "valid_tokens_per_s": st["tokens"] / st["time_s"],
             "tflops": st["flops"] / st["time_s"] / 1e12}
        if "peak_mem_gib" in st:
            r["peak_mem_gib"] = st["peak_mem_gib"]
        if peak and device.type == "cuda":
            r["mfu"] = r["tflops"] / peak
        results.append(r)
        extra = (f"  {r['tflops']:.1f} TFLOP/s" + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
                 + (f"  peak mem {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else "")
                 if device.type == "cuda" else "")
        print(f"{v:12s} {r['images_per_s']:9.1f} img/s {r['valid_tokens_per_s']:11.0f} valid tok/s"
              f"  (warmup {r['warmup_s']:.1f}s){extra}", flush=True)
    ref = next((r for r in results if r["variant"] == "timm_padded"), None)
    if ref:
        for r in results:
            if r is not ref:
                print(f"ratio {r['variant']} / timm_padded: {r['valid_tokens_per_s'] / ref['valid_tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": gpu, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
