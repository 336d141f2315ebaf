#!/usr/bin/env python3
"""Train-step throughput: our NaFlexViT (packed and padded input) vs timm's naflexvit (padded), same weights.

Command (GPU, the documented config: NaFlexViT-B/16, L per step from 128/256/576/784/1024, token budget
-b 64 x max(L) = 65,536 tokens per step, bf16 autocast, NAdamW, drop-path 0.2):
    python scripts/bench/bench_model.py --device cuda --model naflexvit_base_patch16_gap --steps 30 [--compile]
CPU smoke check (tiny model, small budget):
    python scripts/bench/bench_model.py --device cpu --model naflexvit_tiny_test -b 16 --seq-lens 64 128 256 \
        --steps 12 --rounds 3
Runtime: GPU ~2-4 min (3 variants x (warmup + steps), longer with --compile); CPU smoke ~40 s.

Options beyond the basics: --compile-dynamic auto|true|false|none (auto: dynamic=True for our variants, torch's
default automatic-dynamic for timm's and vit_plain, as timm's train.py compiles), --compile-mode (e.g.
max-autotune-no-cudagraphs), --variants ... vit_plain (timm VisionTransformer, same depth/width, unmasked
sequences of exactly L tokens: the no-mask upper bound), --profile (torch.profiler top-15 table of a few
ours_packed steps), --timm-opt timm|naflex (timm's variant steps timm's NAdamW, as timm's train.py, by default).
Optimizers: ours and vit_plain use naflex.train.optim.create_optimizer (what train.py builds: NAdamW, foreach on CUDA,
no weight decay on 1-d/pos-embed params).
Compile figures per variant (JSON and printout): first_call_s (wall time of the first step of each sequence
length, synced; includes compilation), compile_s (time inside torch.compile's compile events, dynamo frames and
lazily compiled backward graphs, from torch._dynamo's compile callbacks), dynamo_compiles (frames compiled),
recompiles (compiles of an already compiled frame), graphs (unique FX graphs, torch._dynamo counters),
timed_compiles (compiles during the timed steps: should be 0, else the timed figure includes compile time).
Peak memory (CUDA): this variant's own peak (shared batches + its model/optimizer state + its step activations),
also with --rounds > 1 where the other variants stay resident.

Every variant runs the same step schedule on the same synthetic batches (images with random aspect ratios whose
patch grids fill the step's sequence length like timm's NaFlex transforms do), so the comparison isolates the
model step: packing (NaViT arXiv:2307.06304) against timm's padding to L with a dense attention mask.
Valid tokens = real image patches (no padding, no prefix tokens). TFLOP/s counts useful work only: linear
layers on valid + prefix tokens and per-image attention, x3 for forward + backward. MFU divides it by the
GPU's dense bf16 peak (table below, or --peak-tflops).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
VARIANTS = ("ours_packed", "ours_padded", "timm_padded")
OPTIONAL_VARIANTS = ("vit_plain",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train-step throughput of our model (packed/padded) vs timm's.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="naflexvit_base_patch16_gap")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (at least one per sequence length)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--compile-dynamic", default="auto", choices=("auto", "true", "false", "none"),
                   help="torch.compile(dynamic=...): auto = True for ours, None (automatic dynamic) for timm/vit_plain")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler top-15 table of ours_packed steps")
    p.add_argument("--timm-opt", default="timm", choices=("timm", "naflex"),
                   help="optimizer of timm_padded: timm's NAdamW (as timm's train.py) or ours")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="token budget is b x max(seq-lens)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 576, 784, 1024])
    p.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="autocast dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--drop-path", type=float, default=0.2)
    p.add_argument("--attn-backend", default="auto", help="our attention backend for packed input")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + OPTIONAL_VARIANTS)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by GPU name)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleave the variants over this many rounds (for noisy, shared machines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    return p.parse_args(argv)


def step_schedule(seq_lens, budget, steps, seed):
    """(L, batch) per step: L uniform from the list, batch = floor(budget / L / 8) * 8 (>= 1), the loader's rule."""
    from loaders.schedule import batch_size_for
    rng = random.Random(seed)
    out = []
    for i in range(steps):
        L = seq_lens[i % len(seq_lens)] if i < len(seq_lens) else rng.choice(seq_lens)
        out.append((L, batch_size_for(L, budget)))
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


def plain_vit(model, name, drop_path):
    """timm VisionTransformer with our variant's depth/width/heads/prefix tokens/pooling (no masks, own weights)."""
    from timm.models.vision_transformer import VisionTransformer

    import naflex

    c = naflex.get_config(name)
    return VisionTransformer(
        img_size=(c.patch_size * c.pos_embed_grid_size[0], c.patch_size * c.pos_embed_grid_size[1]),
        patch_size=c.patch_size, num_classes=model.num_classes, embed_dim=c.embed_dim, depth=c.depth,
        num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm,
        init_values=c.init_values, class_token=c.class_token, reg_tokens=c.reg_tokens, no_embed_class=True,
        global_pool="avg" if c.global_pool in ("avg", "gap") else "token", fc_norm=c.fc_norm,
        final_norm=c.final_norm, dynamic_img_size=True, drop_path_rate=drop_path)


def square_grid(L):
    """(h, w) with h * w == L, h the largest divisor of L not above sqrt(L) (256 -> 16x16, 128 -> 8x16)."""
    h = max(d for d in range(1, int(math.isqrt(L)) + 1) if L % d == 0)
    return h, L // h


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


def make_optimizer(variant, model, timm_opt):
    """What each side's train.py builds: naflex.train.optim.create_optimizer (ours), timm's NAdamW (timm's)."""
    if variant == "timm_padded" and timm_opt == "timm":
        from timm.optim import create_optimizer_v2
        return create_optimizer_v2(model, opt="nadamw", lr=3e-4, weight_decay=0.1)
    from naflex.train.config import OptimConfig
    from naflex.train.optim import create_optimizer
    return create_optimizer(model, OptimConfig(opt="nadamw", lr=3e-4, weight_decay=0.1))


def compile_kwargs(variant, args):
    dyn = {"true": True, "false": False, "none": None}.get(args.compile_dynamic)
    if args.compile_dynamic == "auto":
        dyn = True if variant.startswith("ours") else None
    return {"dynamic": dyn, "mode": args.compile_mode}


def make_step(variant, model, batches, device, amp_dtype, args):
    """One training step (forward, label-smoothed CE, backward, NAdamW) of ``model`` on the batch of length L."""
    model.train()
    opt = make_optimizer(variant, model, args.timm_opt)
    fwd = torch.compile(model, **compile_kwargs(variant, args)) if args.compile else model
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    key = {"ours_packed": "packed", "vit_plain": "image"}.get(variant, "padded")

    def step(L):
        b = batches[L]
        with autocast:
            logits = fwd(b[key])
            loss = F.cross_entropy(logits.float(), b["target"], label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


class CompileWatch:
    """Counts and times torch.compile's compile events (dynamo frames, lazily compiled backward graphs) via
    torch._dynamo's compile callbacks; ``unique_graphs`` from torch._dynamo.utils.counters."""

    def __init__(self):
        self.events = []  # (trigger name, compile id, seconds)
        self._t0 = 0.0
        self.register()

    def register(self):
        """(Re)install the callbacks: torch._dynamo.reset() clears them."""
        from torch._dynamo.callback import callback_handler
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def close(self):
        from torch._dynamo.callback import callback_handler
        for lst, fn in ((callback_handler.start_callbacks, self._start), (callback_handler.end_callbacks, self._end)):
            if fn in lst:
                lst.remove(fn)

    def _start(self, cb):
        self._t0 = time.perf_counter()

    def _end(self, cb):
        self.events.append((cb.callback_trigger.name, str(cb.compile_id), time.perf_counter() - self._t0))

    def mark(self):
        from torch._dynamo.utils import counters
        return len(self.events), counters["stats"]["unique_graphs"]

    def since(self, mark):
        from torch._dynamo.utils import counters
        ev = self.events[mark[0]:]
        dyn = [cid for trig, cid, _ in ev if trig == "DYNAMO"]
        # compile id "frame/n[_attempt]": n > 0 is a recompile of an already compiled frame
        rec = sum(1 for cid in dyn if cid.split("/")[-1].split("_")[0].isdigit()
                  and int(cid.split("/")[-1].split("_")[0]) > 0)
        return {"compile_s": sum(t for *_, t in ev), "dynamo_compiles": len(dyn), "recompiles": rec,
                "backward_compiles": sum(1 for trig, *_ in ev if trig == "LAZY_BACKWARD"),
                "graphs": counters["stats"]["unique_graphs"] - mark[1]}


def run_steps(step, steps, device, per_step=None) -> float:
    """Run the steps; total seconds (synced at both ends). ``per_step``: a list that gets (L, seconds) per step,
    synced after each (warm-up only: the sync costs time)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for L, _ in steps:
        t = time.perf_counter()
        step(L)
        if per_step is not None:
            sync()
            per_step.append((L, time.perf_counter() - t))
    sync()
    return time.perf_counter() - t0


def profile_table(step, steps, device, row_limit=15) -> str:
    """torch.profiler table of the steps, sorted by self device time on CUDA (kernels), self CPU time on CPU."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run_steps(step, steps, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


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
    num_prefix = getattr(ours, "num_prefix_tokens", 0)
    batches = {}
    for L in sorted(set(L for L, _ in schedule)):
        bs = max(1, budget // L // 8 * 8)
        grids = image_grids(L, bs, rng)
        packed, padded, target, T = make_batches(grids, L, P * P * 3, ours.num_classes, device, args.seed + L)
        batches[L] = {"packed": packed, "padded": padded, "target": target, "num_images": bs, "valid_tokens": T,
                      "flops": flops_per_step(ours, grids, num_prefix)}
        if "vit_plain" in args.variants:  # same images count, every image exactly L tokens, no mask
            h, w = square_grid(L)
            g = torch.Generator().manual_seed(args.seed + L)
            batches[L]["image"] = torch.randn(bs, 3, h * P, w * P, generator=g).to(device)
            batches[L]["plain"] = {"num_images": bs, "valid_tokens": bs * L,
                                   "flops": flops_per_step(ours, [(h, w)] * bs, num_prefix)}
    peak = args.peak_tflops
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    cmode = (f", dynamic={args.compile_dynamic}, mode={args.compile_mode}" if args.compile else "")
    print(f"# {args.model} on {gpu}, torch {torch.__version__}, {amp_name}, budget {budget} tokens/step, "
          f"L in {args.seq_lens}, {args.steps} timed steps, compile={args.compile}{cmode}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)

    def build(variant):
        if variant == "timm_padded":
            model = timm_twin(ours, args.model, args.drop_path)
        elif variant == "vit_plain":
            model = plain_vit(ours, args.model, args.drop_path)
        else:
            model = naflex.create_model(args.model, drop_path_rate=args.drop_path)
            model.load_state_dict(ours.state_dict())
            if variant == "ours_packed" and hasattr(model, "set_attn_backend"):
                model.set_attn_backend(args.attn_backend)
        return make_step(variant, model.to(device), batches, device, amp_dtype, args)

    def figures(v, L):
        b = batches[L]["plain"] if v == "vit_plain" else batches[L]
        return b["num_images"], b["valid_tokens"], b["flops"]

    cuda = device.type == "cuda"
    mem = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    watch = CompileWatch() if args.compile else None
    warmup, timed = schedule[:args.warmup], schedule[args.warmup:]
    # rounds == 1: one variant after the other (each alone in memory).
    # rounds > 1: all variants resident, the timed steps split into rounds that the variants run in turn (the
    # same steps for each), so load changes on a shared machine hit every variant alike. Peak memory is the
    # variant's own either way: shared (batches) + its resident state + the step's peak above what was allocated.
    chunks = [timed[i::args.rounds] for i in range(args.rounds)]
    stats = {v: {"warmup_s": 0.0, "time_s": 0.0, "images": 0, "tokens": 0, "flops": 0, "peak": 0,
                 "compile": {}, "timed_compiles": 0} for v in args.variants}
    steps_fn, resident = {}, {}
    shared = mem()

    def peak_during(fn, own):
        """fn()'s result and the peak bytes of this variant while it ran (own: its resident bytes before)."""
        if not cuda:
            return fn(), 0
        a0 = mem()
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        return out, shared + own + torch.cuda.max_memory_allocated(device) - a0

    def timed_chunk(v, chunk):
        m = watch.mark() if watch else None
        dt, pk = peak_during(lambda: run_steps(steps_fn[v], chunk, device), resident[v])
        st = stats[v]
        st["peak"] = max(st["peak"], pk)
        if watch:
            d = watch.since(m)
            st["timed_compiles"] += d["dynamo_compiles"] + d["backward_compiles"]
        for L, _ in chunk:
            n, t, f = figures(v, L)
            st["images"] += n
            st["tokens"] += t
            st["flops"] += f
        st["time_s"] += dt

    def maybe_profile(v):
        if args.profile and v == "ours_packed":
            first = {}
            for L, b in timed + warmup:
                first.setdefault(L, (L, b))
            table = profile_table(steps_fn[v], list(first.values()), device)
            stats[v]["profile"] = table
            print(f"# torch.profiler, ours_packed, {len(first)} steps (one per L):\n{table}", flush=True)

    for v in args.variants:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        base = mem()
        m = watch.mark() if watch else None
        per_step = []

        def build_and_warm():
            steps_fn[v] = build(v)
            return run_steps(steps_fn[v], warmup, device, per_step)
        stats[v]["warmup_s"], pk = peak_during(build_and_warm, 0)
        resident[v] = mem() - base
        stats[v]["peak"] = pk
        first = {}
        for L, t in per_step:
            first.setdefault(L, t)
        stats[v]["first_call_s"] = {str(L): round(t, 3) for L, t in first.items()}
        if watch:
            stats[v]["compile"] = watch.since(m)
        if args.rounds == 1:
            timed_chunk(v, timed)
            maybe_profile(v)
            del steps_fn[v]
            if args.compile:
                torch._dynamo.reset()  # the next variant compiles from scratch (clean per-variant counts)
                watch.register()
    for chunk in (chunks if args.rounds > 1 else []):
        for v in args.variants:
            timed_chunk(v, chunk)
    if args.rounds > 1 and "ours_packed" in steps_fn:
        maybe_profile("ours_packed")

    results = []
    for v in args.variants:
        st = stats[v]
        r = {"variant": v, "steps": len(timed), "time_s": st["time_s"], "warmup_s": st["warmup_s"],
             "images_per_s": st["images"] / st["time_s"], "valid_tokens_per_s": st["tokens"] / st["time_s"],
             "tflops": st["flops"] / st["time_s"] / 1e12, "first_call_s": st["first_call_s"],
             "first_calls_total_s": sum(st["first_call_s"].values())}
        if args.compile:
            r.update(st["compile"], timed_compiles=st["timed_compiles"],
                     compile_dynamic=compile_kwargs(v, args)["dynamic"], compile_mode=args.compile_mode)
        if cuda:
            r["peak_mem_gib"] = st["peak"] / 2 ** 30
        if peak and cuda:
            r["mfu"] = r["tflops"] / peak
        if "profile" in st:
            r["profile"] = st["profile"]
        results.append(r)
        extra = (f"  {r['tflops']:.1f} TFLOP/s" + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
                 + f"  peak mem {r['peak_mem_gib']:.1f} GiB" if cuda else "")
        comp = (f"  compile {r['compile_s']:.1f}s, {r['dynamo_compiles']} frames, {r['recompiles']} recompiles, "
                f"{r['graphs']} graphs, {r['timed_compiles']} in timed steps" if args.compile else "")
        print(f"{v:12s} {r['images_per_s']:9.1f} img/s {r['valid_tokens_per_s']:11.0f} valid tok/s"
              f"  (warmup {r['warmup_s']:.1f}s, first calls {r['first_calls_total_s']:.1f}s){extra}{comp}",
              flush=True)
    ref = next((r for r in results if r["variant"] == "timm_padded"), None)
    if ref:
        for r in results:
            if r is not ref:
                print(f"ratio {r['variant']} / timm_padded: {r['valid_tokens_per_s'] / ref['valid_tokens_per_s']:.2f}x")
    if watch:
        watch.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": gpu, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
