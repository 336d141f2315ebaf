#!/usr/bin/env python3
"""Train-step throughput: our NaFlexViT (packed and padded input) vs timm's naflexvit (padded), same weights.

Command (GPU, the documented config: NaFlexViT-B/16, L per step from 128/256/576/784/1024, token budget
-b 64 x max(L) = 65,536 tokens per step, bf16 autocast, NAdamW, drop-path 0.2):
    python scripts/bench/bench_model.py --device cuda --model naflexvit_base_patch16_gap --steps 30 [--compile]
CPU smoke check (tiny model, small budget):
    python scripts/bench/bench_model.py --device cpu --model naflexvit_tiny_test -b 16 --seq-lens 64 128 256 \
        --steps 12 --rounds 3
Runtime: GPU ~2-4 min (3 variants x (warmup + steps), longer with --compile); CPU smoke ~40 s.

What is timed is the library's training step on the library's batches, so the figure is what train.py runs:
- the step is ``naflex.train.engine.Trainer``: ``backward`` (forward under autocast, ``classification_loss``
  with label smoothing 0.1, the ``--naflex-loss-scale linear`` weight of the step's batch size) then ``update``
  (optimizer step, zero_grad). Every variant goes through it; only the model differs: each steps timm's NAdamW,
  ours and vit_plain as naflex.train.optim builds it for train.py, timm's variant from create_optimizer_v2 as timm's
  train.py calls it (the same optimizer and parameter groups; --timm-opt naflex builds timm's through ours too);
- the per-step (L, batch size) list is the train loader's ``loaders.SeqLenSchedule`` (one L drawn per step, the
  token budget's floor(budget / L / 8) * 8 images); warm-up runs one step of each L first, so compiles happen
  before timing;
- the batches are synthetic uint8 images (random aspect ratios, grids from ``augment.geometry.fit_grid_to_seq``
  as the train transforms pick them) packed by ``loaders.packing.pack`` (ours) and padded to L by
  ``loaders.packing.pad`` (timm's layout), moved and normalised by ``loaders.DevicePrefetcher`` once per L.
So the comparison isolates the model step: packing (NaViT arXiv:2307.06304) against timm's padding to L with a
dense attention mask.

Options beyond the basics: --compile-dynamic auto|true|false|none (auto: dynamic=True for our variants, torch's
default automatic-dynamic for timm's and vit_plain, as timm's train.py compiles), --compile-mode (e.g.
max-autotune-no-cudagraphs), --variants ... vit_plain (timm VisionTransformer, same depth/width, unmasked
sequences of exactly L tokens: the no-mask upper bound), --profile (torch.profiler top-15 table of a few
ours_packed steps), --attn-backend (our packed attention backend).
Compile figures per variant (JSON and printout): first_call_s (wall time of the first step of each sequence
length, synced; includes compilation), compile_s (time inside torch.compile's compile events, dynamo frames and
lazily compiled backward graphs, from torch._dynamo's compile callbacks), dynamo_compiles (frames compiled),
recompiles (compiles of an already compiled frame), graphs (unique FX graphs, torch._dynamo counters),
timed_compiles (compiles during the timed steps: should be 0, else the timed figure includes compile time).
Peak memory (CUDA): this variant's own peak (shared batches + its model/optimizer state + its step activations),
also with --rounds > 1 where the other variants stay resident.
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
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
VARIANTS = ("ours_packed", "ours_padded", "timm_padded")
OPTIONAL_VARIANTS = ("vit_plain",)
INPUT_OF = {"ours_packed": "packed", "ours_padded": "padded", "timm_padded": "padded", "vit_plain": "image"}
SMOOTHING = 0.1  # train.py's --smoothing default


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
                   help="how timm_padded's NAdamW is built: create_optimizer_v2 (timm's train.py) or our train.py's")
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


# ---------------------------------------------------------------------------------------------- steps and batches
def bench_schedule(seq_lens, tokens_per_batch: int, num_warmup: int, num_timed: int, seed: int):
    """(warm-up, timed) lists of (L, images per step) from the train loader's schedule.

    The timed steps are the first ``num_timed`` full steps of ``loaders.SeqLenSchedule`` over a virtual dataset
    just large enough (the epoch's short last step is left out); warm-up runs one step of each L, then schedule
    steps up to ``num_warmup``, so every shape has compiled before timing starts."""
    from loaders.schedule import SeqLenSchedule, batch_size_for

    most_images = batch_size_for(min(seq_lens), tokens_per_batch)
    schedule = SeqLenSchedule((num_timed + 1) * most_images, seq_lens, tokens_per_batch, seed=seed)
    full = [(s.seq_len, len(s.indices)) for s in schedule.steps(0)
            if len(s.indices) == batch_size_for(s.seq_len, tokens_per_batch)]
    each_length = [(L, batch_size_for(L, tokens_per_batch)) for L in sorted(set(seq_lens))]
    warmup = (each_length + full)[:max(num_warmup, len(each_length))]
    return warmup, full[:num_timed]


def synthetic_images(L: int, num_images: int, patch_size: int, gen: torch.Generator, rng: random.Random):
    """uint8 HWC images of random aspect ratio in [3/4, 4/3], each resized (in effect) to the grid the train
    transforms would pick for L: ``fit_grid_to_seq``, the largest aspect-keeping grid of at most L patches."""
    from augment.geometry import fit_grid_to_seq

    images = []
    for _ in range(num_images):
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        gh, gw = fit_grid_to_seq(round(300 * aspect), 300, patch_size, L)
        images.append(torch.randint(0, 256, (gh * patch_size, gw * patch_size, 3), dtype=torch.uint8, generator=gen))
    return images


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


def host_batches(L: int, num_images: int, model, num_classes: int, seed: int, with_plain: bool) -> Dict:
    """One step's CPU batches at length L: the same images packed (ours) and padded to L (timm's layout), uint8
    as the loader emits them; with_plain adds images of exactly L patches for the unmasked ViT."""
    from loaders.packing import pack, pad

    P = model.patch_size
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    images = synthetic_images(L, num_images, P, gen, rng)
    grids = [(x.shape[0] // P, x.shape[1] // P) for x in images]
    out = {"packed": pack(images, P, seq_len=L), "padded": pad(images, P, seq_len=L),
           "target": torch.randint(0, num_classes, (num_images,), generator=gen),
           "figures": (num_images, sum(h * w for h, w in grids), flops_per_step(model, grids, model.num_prefix_tokens))}
    if with_plain:
        h, w = square_grid(L)
        shape = (num_images, h * P, w * P, 3)
        out["image"] = {"patches": torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)}
        out["plain_figures"] = (num_images, num_images * L, flops_per_step(model, [(h, w)] * num_images,
                                                                             model.num_prefix_tokens))
    return out


def device_batches(host: Dict, device, mean, std) -> Dict:
    """The step's batches on the device, normalised by the training prefetcher (loaders.DevicePrefetcher), with
    the loader's bad-file list removed as the trainer does; the plain ViT's HWC images become [B, 3, H, W]."""
    from loaders import DevicePrefetcher
    from naflex.model import batch as B

    keys = [k for k in ("packed", "padded", "image") if k in host]
    moved = DevicePrefetcher([(host[k], host["target"]) for k in keys], device, mean, std)
    out = {k: x for k, (x, _) in zip(keys, moved)}
    for x in out.values():
        B.pop_bad_files(x)
    if "image" in out:
        out["image"] = out["image"]["patches"].permute(0, 3, 1, 2).contiguous()
    out["target"] = host["target"].to(device)
    return out


# ------------------------------------------------------------------------------------------------ models and step
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


def make_optimizer(variant, model, timm_opt):
    """What each side's train.py builds: naflex.train.optim.create_optimizer (ours), create_optimizer_v2 (timm's)."""
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


def make_trainer(variant, model, device, amp_name: str, args):
    """The library's Trainer around ``model`` (compiled when asked), with train.py's loss settings."""
    from naflex.train.config import TrainConfig
    from naflex.train.engine import Trainer

    model.train()
    optimizer = make_optimizer(variant, model, args.timm_opt)
    fwd = torch.compile(model, **compile_kwargs(variant, args)) if args.compile else model
    amp = amp_name != "float32"
    cfg = TrainConfig(device=str(device), amp=amp, amp_dtype=amp_name if amp else TrainConfig.amp_dtype,
                      smoothing=SMOOTHING, loss_scale="linear")
    cfg.validate()
    return Trainer(fwd, optimizer, cfg, batch_size_reference=args.batch_size, device=device)


def make_step(trainer, batches: Dict, key: str):
    """step(L): one training step of ``trainer`` on the batch of length L (a whole update: no accumulation)."""
    from naflex.train.engine import TrainState

    state = TrainState()

    def step(L):
        b = batches[L]
        trainer.backward(b[key], b["target"], micro_steps=1, update=True)
        trainer.update(state)
    step.trainer, step.state = trainer, state
    return step


# ------------------------------------------------------------------------------------------------ instrumentation
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


# ------------------------------------------------------------------------------------------------------ the bench
class Bench:
    """Every variant over the same schedule and batches; per-variant timing, memory and compile figures."""

    def __init__(self, args):
        import naflex

        self.args = args
        self.device = device = torch.device(args.device)
        torch.manual_seed(args.seed)
        self.amp_name = args.amp_dtype or ("bfloat16" if device.type == "cuda" else "float32")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        self.ours = naflex.create_model(args.model, drop_path_rate=args.drop_path)
        self.budget = args.batch_size * max(args.seq_lens)
        self.warmup, self.timed = bench_schedule(args.seq_lens, self.budget, args.warmup, args.steps, args.seed)
        norm = naflex.data_config(self.ours)
        self.batches = {}
        for L, num_images in sorted(set(self.warmup + self.timed)):
            host = host_batches(L, num_images, self.ours, self.ours.num_classes, args.seed + L,
                                "vit_plain" in args.variants)
            self.batches[L] = dict(device_batches(host, device, norm["mean"], norm["std"]),
                                   figures=host["figures"], plain_figures=host.get("plain_figures"))
        self.cuda = device.type == "cuda"
        self.gpu = torch.cuda.get_device_name(device) if self.cuda else "cpu"
        self.peak = args.peak_tflops or (next((v for k, v in PEAK_BF16_TFLOPS.items() if k in self.gpu), None)
                                         if self.cuda else None)
        self.watch = None
        if args.compile:
            from naflex.train.compiling import CompileWatch  # train.py's --torchcompile report counts the same way
            self.watch = CompileWatch()
        self.steps_fn, self.resident = {}, {}
        self.shared = self.mem()
        self.stats = {v: {"warmup_s": 0.0, "time_s": 0.0, "images": 0, "tokens": 0, "flops": 0, "peak": 0,
                          "compile": {}, "timed_compiles": 0} for v in args.variants}

    def header(self) -> str:
        a = self.args
        cmode = f", dynamic={a.compile_dynamic}, mode={a.compile_mode}" if a.compile else ""
        return (f"# {a.model} on {self.gpu}, torch {torch.__version__}, {self.amp_name}, budget {self.budget} "
                f"tokens/step, L in {a.seq_lens}, {a.steps} timed steps, compile={a.compile}{cmode}, "
                f"{time.strftime('%Y-%m-%d %H:%M')}")

    def mem(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def build(self, variant):
        import naflex

        a = self.args
        if variant == "timm_padded":
            model = timm_twin(self.ours, a.model, a.drop_path)
        elif variant == "vit_plain":
            model = plain_vit(self.ours, a.model, a.drop_path)
        else:
            model = naflex.create_model(a.model, drop_path_rate=a.drop_path)
            model.load_state_dict(self.ours.state_dict())
            if variant == "ours_packed":
                model.set_attn_backend(a.attn_backend)
        trainer = make_trainer(variant, model.to(self.device), self.device, self.amp_name, a)
        return make_step(trainer, self.batches, INPUT_OF[variant])

    def peak_during(self, fn, own: int):
        """fn()'s result and the peak bytes of this variant while it ran (own: its resident bytes before)."""
        if not self.cuda:
            return fn(), 0
        before = self.mem()
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        return out, self.shared + own + torch.cuda.max_memory_allocated(self.device) - before

    def warm_up(self, v) -> None:
        """Build the variant and run the warm-up steps (the first step of each L synced and timed)."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        base, mark, per_step = self.mem(), self.watch.mark() if self.watch else None, []

        def build_and_warm():
            self.steps_fn[v] = self.build(v)
            return run_steps(self.steps_fn[v], self.warmup, self.device, per_step)
        st = self.stats[v]
        st["warmup_s"], st["peak"] = self.peak_during(build_and_warm, 0)
        self.resident[v] = self.mem() - base
        first = {}
        for L, t in per_step:
            first.setdefault(L, t)
        st["first_call_s"] = {str(L): round(t, 3) for L, t in first.items()}
        if self.watch:
            st["compile"] = self.watch.since(mark)

    def time_steps(self, v, steps) -> None:
        mark = self.watch.mark() if self.watch else None
        dt, pk = self.peak_during(lambda: run_steps(self.steps_fn[v], steps, self.device), self.resident[v])
        st = self.stats[v]
        st["peak"] = max(st["peak"], pk)
        if self.watch:
            d = self.watch.since(mark)
            st["timed_compiles"] += d["dynamo_compiles"] + d["backward_compiles"]
        for L, _ in steps:
            b = self.batches[L]
            images, tokens, flops = b["plain_figures"] if v == "vit_plain" else b["figures"]
            st["images"] += images
            st["tokens"] += tokens
            st["flops"] += flops
        st["time_s"] += dt

    def profile(self, v) -> None:
        if not (self.args.profile and v == "ours_packed"):
            return
        first = {}
        for L, b in self.timed + self.warmup:
            first.setdefault(L, (L, b))
        table = profile_table(self.steps_fn[v], list(first.values()), self.device)
        self.stats[v]["profile"] = table
        print(f"# torch.profiler, ours_packed, {len(first)} steps (one per L):\n{table}", flush=True)

    def run(self) -> None:
        """rounds == 1: one variant after the other (each alone in memory). rounds > 1: all variants resident,
        the timed steps split into rounds that the variants run in turn (the same steps for each), so load changes
        on a shared machine hit every variant alike."""
        rounds = self.args.rounds
        for v in self.args.variants:
            self.warm_up(v)
            if rounds == 1:
                self.time_steps(v, self.timed)
                self.profile(v)
                del self.steps_fn[v]
                if self.args.compile:
                    torch._dynamo.reset()  # the next variant compiles from scratch (clean per-variant counts)
                    self.watch.register()
        if rounds > 1:
            for chunk in (self.timed[i::rounds] for i in range(rounds)):
                for v in self.args.variants:
                    self.time_steps(v, chunk)
            if "ours_packed" in self.steps_fn:
                self.profile("ours_packed")
        if self.watch:
            self.watch.close()

    def result(self, v) -> Dict:
        """The JSON record of one variant (the fields scripts/bench/device_check.sh reads)."""
        st, a = self.stats[v], self.args
        r = {"variant": v, "steps": len(self.timed), "time_s": st["time_s"], "warmup_s": st["warmup_s"],
             "images_per_s": st["images"] / st["time_s"], "valid_tokens_per_s": st["tokens"] / st["time_s"],
             "tflops": st["flops"] / st["time_s"] / 1e12, "first_call_s": st["first_call_s"],
             "first_calls_total_s": sum(st["first_call_s"].values())}
        if a.compile:
            r.update(st["compile"], timed_compiles=st["timed_compiles"],
                     compile_dynamic=compile_kwargs(v, a)["dynamic"], compile_mode=a.compile_mode)
        if self.cuda:
            r["peak_mem_gib"] = st["peak"] / 2 ** 30
            if self.peak:
                r["mfu"] = r["tflops"] / self.peak
        if "profile" in st:
            r["profile"] = st["profile"]
        return r


def report_line(r: Dict) -> str:
    extra = ""
    if "peak_mem_gib" in r:
        extra = (f"  {r['tflops']:.1f} TFLOP/s" + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
                 + f"  peak mem {r['peak_mem_gib']:.1f} GiB")
    if "compile_s" in r:
        extra += (f"  compile {r['compile_s']:.1f}s, {r['dynamo_compiles']} frames, {r['recompiles']} recompiles, "
                  f"{r['graphs']} graphs, {r['timed_compiles']} in timed steps")
    return (f"{r['variant']:12s} {r['images_per_s']:9.1f} img/s {r['valid_tokens_per_s']:11.0f} valid tok/s"
            f"  (warmup {r['warmup_s']:.1f}s, first calls {r['first_calls_total_s']:.1f}s){extra}")


def ratio_lines(results: List[Dict]) -> List[str]:
    ref = next((r for r in results if r["variant"] == "timm_padded"), None)
    if ref is None:
        return []
    return [f"ratio {r['variant']} / timm_padded: {r['valid_tokens_per_s'] / ref['valid_tokens_per_s']:.2f}x"
            for r in results if r is not ref]


def main(argv=None):
    args = parse_args(argv)
    bench = Bench(args)
    print(bench.header(), flush=True)
    bench.run()
    results = [bench.result(v) for v in args.variants]
    for line in [report_line(r) for r in results] + ratio_lines(results):
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": bench.gpu, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
