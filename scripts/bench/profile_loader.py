#!/usr/bin/env python3
"""Where the NaFlex train loader's CPU time goes, per image and per stage: ours and timm 1.0.31's, same images.

Command (the documented augmentations; ~15-25 s on 2 shared cores with the defaults):
    python scripts/bench/profile_loader.py --data-dir ../shared/data/caltech101 \
        --aa rand-m8-inc1-mstd1.0 --grayscale-prob .1 --mixup 0.8 --cutmix 1.0 -b 64 \
        --naflex-train-seq-lens 128 256 576 784 1024
    (those are the defaults: ``python scripts/bench/profile_loader.py`` alone does the same; --json FILE saves the
    table; train.py's augmentation flags apply, e.g. ``--no-jpeg-draft``; ``--only ours`` skips timm)
Runtime: ~15-25 s with caltech101 (3 cycles x 5 sequence lengths, 1/4 of each step's images = 768 images per
pipeline, plus the untimed cross-check); ``--cycles 1 --fraction 0.03`` takes ~5 s; ``--repeats N`` runs each
pipeline N times and shows the least disturbed pass (for shared machines).

What it does: one process, one thread (like one DataLoader worker), no workers. Times are this thread's CPU time
(``--clock cpu``, the default: other load on a shared machine barely moves them) or wall time (``--clock wall``).
Steps follow the training schedule's shape (each sequence length L in turn, batch = floor(b x max(L) / L / 8) * 8,
of which ``--fraction`` is processed, so small-L steps keep their larger share of images). Ours runs the loader's
own code: a ``loaders.train_loader.StepDataset`` over these steps, with an ``augment.stages.StageTimer`` as its
stage hook, so every row below is timed inside the real pipeline (loaders.pipeline, loaders.decode, augment.policy,
MixUp/CutMix, packing); tests/test_profile_loader.py checks that the timed steps equal untimed ones. The cross-check
then runs the same steps untimed: its ms/image against the sum of the stages shows what the hooks and the time
between stages cost. timm's pipeline is timed on the same (path, L) pairs: PIL decode + convert('RGB') (timm's
ImageDataset), each transform of timm's NaFlex train transform (create_transform(naflex=True, use_prefetcher=True),
as create_naflex_loader builds it), NaFlexMixup, Patchify, NaFlexCollator. Not included: DataLoader IPC (worker ->
main process), pinning, the device copy.

--device-aug: "ours" is the worker side of that path (read, header, draws, decoding only what the device cannot
take, the step's parameter tensors; loaders.device_worker), and the device side (loaders.device_step) of the first
``--device-steps`` steps is then timed on this CPU (ops with no device version, such as blur, left out and named).

Stage notes. Ours decodes with JPEG draft (reduced DCT) unless --no-jpeg-draft and crops+resizes in one Pillow call
('decode' and 'crop + resize' are its two halves). Ours patchifies while packing (one copy into the batch buffer),
so patchify and collate are one row. timm's RandAugment may raise on Posterize(0 bits) with Pillow >= 12: such
samples are dropped, as timm's loader does, and counted.
NaViT arXiv:2307.06304 (packing), SigLIP 2 arXiv:2502.14786 (NaFlex).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from augment.config import RA_INTERPOLATIONS  # noqa: E402
from augment.stages import StageTimer  # noqa: E402
from loaders.dataset import ImageFolderDataset  # noqa: E402
from loaders.schedule import Step, batch_size_for  # noqa: E402
from loaders.train_loader import StepDataset  # noqa: E402
from naflex.train.cli import build_parser, config_from_args  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "caltech101"
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
DOCUMENTED = dict(aa="rand-m8-inc1-mstd1.0", grayscale_prob=0.1, mixup=0.8, cutmix=1.0, batch_size=64, reprob=0.0)


class PlannedSchedule:
    """The profiler's steps in the shape StepDataset reads from a SeqLenSchedule (``step``, ``num_steps``,
    ``rank``): epoch 0, rank 0, one patch size."""

    def __init__(self, steps, patch_size):
        self.steps = [Step(L, patch_size, np.asarray(idx, dtype=np.int64)) for L, idx in steps]
        self.rank = 0

    @property
    def num_steps(self):
        return len(self.steps)

    def step(self, epoch, step):
        return self.steps[step]


def our_steps(ds, steps, P, aug_cfg, mix_cfg, seed, timer=None):
    """Run our StepDataset over ``steps`` (with ``timer`` as its stage hook; the worker side only with
    ``--device-aug``); returns the valid tokens."""
    step_ds = StepDataset(ds, PlannedSchedule(steps, P), aug_cfg, mix_cfg, packing=True, seed=seed, timer=timer,
                          device_aug=aug_cfg.device_aug)
    return sum(int(step_ds[(0, s)][0]["seq_lens"].sum()) for s in range(len(steps)))


def device_side(ds, steps, P, aug_cfg, mix_cfg, args):
    """--device-aug: the device side (loaders.device_step) of the first ``--device-steps`` steps on this machine's
    CPU, wall time per batch; ops with no device version (RandAugment's GaussianBlur, blur) are left out and named."""
    from loaders.device_step import DEVICE_RA_OPS, DeviceAugmenter
    step_ds = StepDataset(ds, PlannedSchedule(steps, P), aug_cfg, mix_cfg, packing=True, seed=args.seed,
                          device_aug=True)
    augmenter, times, images, tokens, left_out = DeviceAugmenter("cpu"), [], 0, 0, set()
    for s in range(min(args.device_steps, len(steps))):
        inputs, _ = step_ds[(0, s)]
        plan = inputs["device_aug_plan"]
        left_out |= {name for name in plan.ra_ops if name not in DEVICE_RA_OPS}
        plan.ra_ops = [name for name in plan.ra_ops if name in DEVICE_RA_OPS]
        plan.any_blur = False
        t0 = time.perf_counter()
        augmenter(inputs)
        times.append(time.perf_counter() - t0)
        images += inputs["seq_lens"].numel()
        tokens += plan.num_tokens
    missing = sorted(left_out) + (["Gaussian blur"] if aug_cfg.gaussian_blur_prob > 0 else [])
    rec = {"steps": len(times), "images": images, "tokens": tokens, "ms_per_batch": 1e3 * sum(times) / len(times),
           "ms_per_image": 1e3 * sum(times) / images, "left_out": missing, "threads": torch.get_num_threads()}
    print(f"\ndevice side on this CPU ({rec['threads']} thread, wall time): {rec['ms_per_batch']:.0f} ms/batch over "
          f"{len(times)} steps ({images / len(times):.0f} images, {tokens / len(times):.0f} tokens per batch), "
          f"{rec['ms_per_image']:.1f} ms/image; left out (no device version): {', '.join(missing) or 'nothing'}")
    return rec


class TimmPipeline:
    """timm 1.0.31's NaFlex train pipeline (create_naflex_loader's pieces), one stage at a time."""

    def __init__(self, args, seq_lens, P, num_classes):
        from timm.data import create_transform
        from timm.data.naflex_dataset import NaFlexCollator
        from timm.data.naflex_mixup import NaFlexMixup
        from timm.data.naflex_transforms import Patchify

        self.tf = {L: create_transform(
            is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
            color_jitter=args.color_jitter, grayscale_prob=args.grayscale_prob, auto_augment=args.aa,
            interpolation=args.train_interpolation, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount, use_prefetcher=True, naflex=True, patch_size=P,
            max_seq_len=L).transforms for L in seq_lens}
        self.collate = {L: NaFlexCollator(L) for L in seq_lens}
        self.patchify = Patchify(patch_size=P, flatten_patches=True, channels_last=True)
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = NaFlexMixup(num_classes=num_classes, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                                     switch_prob=args.mixup_switch_prob, prob=args.mixup_prob,
                                     label_smoothing=args.smoothing)
        self.dropped = 0

    @staticmethod
    def stage_name(t):
        names = {"RandomResizedCropToSequence": "RRC to sequence (crop + resize)",
                 "RandomHorizontalFlip": "flip", "RandAugment": "RandAugment", "RandomGrayscale": "jitter/grayscale",
                 "ColorJitter": "jitter/grayscale", "MaybePILToTensor": "to uint8 tensor"}
        return names.get(type(t).__name__, type(t).__name__)

    def sample(self, path, L, timer):
        with timer("decode (full) + convert RGB"), open(path, "rb") as f:
            img = Image.open(f)
            img = img.convert("RGB")
        for t in self.tf[L]:
            try:
                with timer(self.stage_name(t)):
                    img = t(img)
            except Exception:  # timm's wrapper warns and skips the sample
                self.dropped += 1
                return None
        return img

    def step(self, samples, L, timer):
        imgs, targets = [], []
        for path, target in samples:
            x = self.sample(path, L, timer)
            if x is not None:
                imgs.append(x)
                targets.append(target)
        with timer("MixUp/CutMix"):
            tg = torch.tensor(targets, dtype=torch.int64)
            if self.mixup is not None:
                imgs, tg = self.mixup(imgs, tg)
        with timer("patchify"):
            patches = [self.patchify(x) for x in imgs]
        with timer("collate (pad to L, float32)"):
            batch, _ = self.collate[L](list(zip(patches, tg)))
        return int(batch["patch_valid"].sum())


def plan_steps(num_images, seq_lens, batch_size, cycles, fraction, seed):
    """[(L, [dataset indices])]: each L in turn, ``fraction`` of the step's real batch, seeded random images."""
    rng = random.Random(seed)
    order = list(range(num_images))
    rng.shuffle(order)
    budget = batch_size * max(seq_lens)
    steps, pos = [], 0
    for _ in range(cycles):
        for L in seq_lens:
            n = max(2, int(round(batch_size_for(L, budget) * fraction)))
            idx = [order[(pos + i) % num_images] for i in range(n)]
            pos += n
            steps.append((L, idx))
    return steps


def table(name, timer, n_img, tokens, run_s):
    total = sum(timer.seconds.values())
    rows = [f"| {name}: stage | ms/image | % |", "|---|---:|---:|"]
    for k, v in timer.seconds.items():
        rows.append(f"| {k} | {1e3 * v / n_img:.2f} | {100 * v / total:.1f} |")
    rows.append(f"| **total (sum of stages)** | **{1e3 * total / n_img:.2f}** | 100 |")
    rows.append(f"\n{name}: {n_img} images, {tokens / n_img:.0f} valid tokens/image, {n_img / total:.0f} img/s and "
                f"{tokens / total / 1e3:.1f}k valid tokens/s per core (whole run {run_s:.1f}s incl. timing overhead)")
    return "\n".join(rows)


def build_args(argv):
    p = build_parser(("dataset", "aug", "naflex", "run"), prog="profile_loader.py")
    p.description = __doc__.split("\n")[0]
    p.set_defaults(data_dir=str(DEFAULT_DATA), **DOCUMENTED)
    p.add_argument("--cycles", type=int, default=3, help="passes over the sequence-length list")
    p.add_argument("--fraction", type=float, default=0.25, help="share of each step's images processed")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--ra-interpolation", choices=RA_INTERPOLATIONS, default=None,
                   help="Rotate/Shear resampling (AugConfig.ra_interpolation; default: the config's)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu", help="thread CPU time or wall time")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per pipeline; the least disturbed is shown")
    p.add_argument("--only", choices=("ours", "timm"), default=None)
    p.add_argument("--no-check", action="store_true", help="skip the untimed cross-check")
    p.add_argument("--json", default="", help="write stage seconds and counts to this file")
    p.add_argument("--device-steps", type=int, default=2,
                   help="--device-aug: steps whose device side is timed on this CPU (0: none)")
    return p, p.parse_args(argv)


def header_line(args, seq_lens, steps, n_total, aug_cfg):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import PIL
    return (f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} ({cpu}, {os.cpu_count()} cpus), python "
            f"{platform.python_version()}, torch {torch.__version__}, Pillow {PIL.__version__}; {args.data_dir} "
            f"[{args.train_split}], L {seq_lens}, -b {args.batch_size}, aa {args.aa}, grayscale {args.grayscale_prob}, "
            f"mixup {args.mixup}/cutmix {args.cutmix}, reprob {args.reprob}, jpeg draft {aug_cfg.draft}, "
            f"ra interpolation {aug_cfg.ra_interpolation}, device aug {aug_cfg.device_aug}; {len(steps)} steps, "
            f"{n_total} images per pipeline, "
            f"1 thread, {args.clock} time")


def timed_run(kind, ds, steps, P, aug_cfg, mix_cfg, args, seq_lens):
    """One timed pass of one pipeline: (record with stage seconds, images, valid tokens, run time; its timer)."""
    clock = CLOCKS[args.clock]
    timer = StageTimer(clock)
    t0 = clock()
    dropped = 0
    if kind == "ours":
        tokens, n_img = our_steps(ds, steps, P, aug_cfg, mix_cfg, args.seed, timer), sum(len(i) for _, i in steps)
    else:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        tp = TimmPipeline(args, seq_lens, P, ds.num_classes)
        tokens = sum(tp.step([ds[i] for i in idx], L, timer) for L, idx in steps)
        dropped = tp.dropped
        n_img = sum(len(i) for _, i in steps) - dropped
    rec = {"stages_s": dict(timer.seconds), "images": n_img, "valid_tokens": tokens, "run_s": clock() - t0,
           "clock": args.clock, "dropped": dropped}
    return rec, timer


def profile(kind, ds, steps, P, aug_cfg, mix_cfg, args, seq_lens):
    """``--repeats`` timed passes; the one with the least total (least disturbed by other load) is reported, with
    the untimed cross-check."""
    runs = [timed_run(kind, ds, steps, P, aug_cfg, mix_cfg, args, seq_lens) for _ in range(args.repeats)]
    totals = [sum(r["stages_s"].values()) / r["images"] * 1e3 for r, _ in runs]
    rec, timer = runs[totals.index(min(totals))]
    rec["runs_ms_per_image"] = totals
    print("\n" + table(kind, timer, rec["images"], rec["valid_tokens"], rec["run_s"]), flush=True)
    if len(runs) > 1:
        print(f"{kind}: best of {len(runs)} passes (sums of stages: {', '.join(f'{t:.2f}' for t in totals)} ms/image)")
    if rec["dropped"]:
        print(f"timm dropped {rec['dropped']} samples (transform raised; timm's loader skips them)")
    if not args.no_check:
        rec["untimed_ms_per_image"] = untimed(kind, steps, ds, P, aug_cfg, mix_cfg, args, seq_lens)
        what = "whole steps" if kind == "ours" else "the per-sample transform (no batch stages)"
        stages_ms = 1e3 * sum(v for k, v in timer.seconds.items() if kind == "ours" or k not in TIMM_BATCH_STAGES)
        print(f"{kind}: {what} run untimed: {rec['untimed_ms_per_image']:.2f} ms/image (the same stages timed "
              f"above: {stages_ms / rec['images']:.2f})", flush=True)
    return rec


def main(argv=None):
    p, args = build_args(argv)
    torch.set_num_threads(1)  # like one DataLoader worker
    ds = ImageFolderDataset(args.data_dir, args.train_split)
    P, seq_lens = args.patch_size, list(args.naflex_train_seq_lens)
    steps = plan_steps(len(ds), seq_lens, args.batch_size, args.cycles, args.fraction, args.seed)
    cfg = config_from_args(args, p)
    aug_cfg = dataclasses.replace(cfg.aug, ra_interpolation=args.ra_interpolation or cfg.aug.ra_interpolation)
    mix_cfg = None if cfg.mixup is None else dataclasses.replace(cfg.mixup, num_classes=ds.num_classes)
    header = header_line(args, seq_lens, steps, sum(len(i) for _, i in steps), aug_cfg)
    print(header, flush=True)
    out = {"header": header, "pipelines": {}}
    for _, idx in steps:  # page cache: neither pipeline pays the first read from disk
        for i in idx:
            with open(ds.path(i), "rb") as f:
                f.read()
    for kind in [args.only] if args.only else ["ours", "timm"]:
        out["pipelines"][kind] = profile(kind, ds, steps, P, aug_cfg, mix_cfg, args, seq_lens)
    if aug_cfg.device_aug and args.device_steps > 0 and args.only != "timm":
        out["device_side"] = device_side(ds, steps, P, aug_cfg, mix_cfg, args)
    if len(out["pipelines"]) == 2:
        o, t = out["pipelines"]["ours"], out["pipelines"]["timm"]
        ours_ms = 1e3 * sum(o["stages_s"].values()) / o["images"]
        timm_ms = 1e3 * sum(t["stages_s"].values()) / t["images"]
        o_tok = o["valid_tokens"] / sum(o["stages_s"].values())
        t_tok = t["valid_tokens"] / sum(t["stages_s"].values())
        print(f"\nours/timm: {timm_ms / ours_ms:.2f}x less CPU per image, {o_tok / t_tok:.2f}x valid tokens per "
              f"CPU-second; at this rate one core feeds {o_tok / 1e3:.0f}k (ours) / {t_tok / 1e3:.0f}k (timm) "
              f"valid tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


TIMM_BATCH_STAGES = ("MixUp/CutMix", "patchify", "collate (pad to L, float32)")


def untimed(kind, steps, ds, P, aug_cfg, mix_cfg, args, seq_lens):
    """ms/image of the same work without stage timers: our whole steps, or timm's composed per-sample transform."""
    n, clock = sum(len(i) for _, i in steps), CLOCKS[args.clock]
    if kind == "ours":
        t0 = clock()
        our_steps(ds, steps, P, aug_cfg, mix_cfg, args.seed)
        return 1e3 * (clock() - t0) / n
    from torchvision.transforms import Compose
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tp = TimmPipeline(args, seq_lens, P, ds.num_classes)
    done, t = 0, 0.0
    for L, idx in steps:
        tf = Compose(tp.tf[L])
        for i in idx:
            t0 = clock()
            try:
                with open(ds.path(i), "rb") as f:
                    tf(Image.open(f).convert("RGB"))
            except Exception:
                continue
            t += clock() - t0
            done += 1
    return 1e3 * t / max(1, done)


if __name__ == "__main__":
    main()
