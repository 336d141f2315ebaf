#!/usr/bin/env python3
"""Evaluate a NaFlexViT checkpoint at one or more sequence lengths: the sweep and its results (the flags:
naflex.train.eval_cli; the weights, model and dataset: naflex.train.eval_build; the loop: naflex.train.evaluate).

    python validate.py --data-dir /imagenet --model naflexvit_base_patch16_gap.e300_s576_in1k \\
        --naflex-max-seq-len 256 576 1024 --amp --amp-dtype bfloat16 --results-file out.csv

With no ``--checkpoint`` the model's published weights are scored, as timm's validate.py does (timm's
``hf-hub:timm/NAME.TAG`` names work too). Class indices are timm's (natural order of the class folders); a checkpoint
of ours records its class names, and the dataset is read in that order (by name), so a folder whose classes sort
otherwise still scores right.
Images keep their native aspect ratio and are resized to the largest patch grid that fits each sequence
length (NaFlex eval rule, SigLIP 2 arXiv:2502.14786; NaViT arXiv:2307.06304), exactly like timm's
``validate.py --naflex-loader --naflex-max-seq-len L``, so timm checkpoints score what timm reports. Batches
are packed (no padding) by default; ``--padded`` uses timm's padded layout and gives the same metrics.
Under ``torchrun`` each rank evaluates its own shard and every image is counted exactly once.
Accepts our checkpoints (plain, EMA via --use-ema, training-state files) and timm's .pth/.safetensors. Reads
image folders and WebDataset tar shards (``--dataset wds/NAME``, timm's layout; loaders.shards), streamed from a
URL, bucket or ``file://`` folder as ``--data-dir`` (loaders.stream: every sample scored once across ranks).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path



def build_parser():
    """validate.py's parser (naflex.train.eval_cli; imported here, not at import time: importing this file is cheap)."""
    from naflex.train.eval_cli import build_parser as parser
    return parser()


def check_args(args) -> None:
    from naflex.train.eval_cli import check_args as check
    check(args)


def __getattr__(name):
    if name == "ValidateError":  # validate.ValidateError, without importing the project at import time
        from naflex.train.eval_cli import ValidateError
        return ValidateError
    raise AttributeError(name)

__all__ = ["build_parser", "check_args", "main"]


def run(args) -> list[dict]:
    """Score one model at every --naflex-max-seq-len: a results row each (a length given twice is scored once)."""
    import torch

    from loaders import DevicePrefetcher, make_eval_loader
    from naflex.train.evaluate import evaluate

    from naflex.train.eval_build import prepare
    model, dataset, (name, checkpoint), dist, norm = prepare(args)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None

    def evaluate_at(seq_len: int, batch_size: int) -> dict:
        loader = make_eval_loader(
            dataset, max_seq_len=seq_len, batch_size=batch_size, patch_size=norm["patch_size"],
            num_workers=args.workers, rank=dist.rank, world_size=dist.world_size, packing=not args.padded,
            interpolation=norm["interpolation"], exif_orientation=args.exif_orientation,
            pin_memory=args.pin_mem or dist.device.type == "cuda", num_samples=args.num_samples)
        batches = DevicePrefetcher(loader, dist.device, norm["mean"], norm["std"], dtype=norm["dtype"])
        return evaluate(model, batches, dist.device, amp_dtype=amp_dtype, world_size=dist.world_size,
                        log_interval=args.log_freq)

    rows = []
    for seq_len in dict.fromkeys(args.naflex_max_seq_len):
        m = _with_retry(evaluate_at, seq_len, args.batch_size, args.retry)
        for path in m["bad_file_paths"]:
            print(f"bad image file (skipped): {path}", file=sys.stderr)
        rows.append({
            "model": name, "checkpoint": checkpoint, "ema": bool(args.use_ema), "seq_len": seq_len,
            "top1": round(m["top1"], 4), "top5": round(m["top5"], 4), "loss": round(m["loss"], 5),
            "images": m["images"], "bad_files": m["bad_files"],
            "images_per_s": round(m["images_per_s"], 2), "valid_tokens_per_s": round(m["valid_tokens_per_s"], 1),
            "packed": not args.padded, "amp": args.amp_dtype if args.amp else "float32",
            "device": dist.device.type, "world_size": dist.world_size,
            "date": datetime.datetime.now().isoformat(timespec="seconds")})
        if dist.rank == 0:
            r = rows[-1]
            print(f"seq_len {seq_len:5d}: top1 {r['top1']:7.3f}  top5 {r['top5']:7.3f}  loss {r['loss']:.4f}  "
                  f"images {r['images']}  bad files {r['bad_files']}  {r['images_per_s']:.1f} img/s  "
                  f"{r['valid_tokens_per_s']:.0f} valid tok/s", flush=True)
    return rows


def _with_retry(evaluate_at, seq_len: int, batch_size: int, retry: bool) -> dict:
    """``evaluate_at(seq_len, batch_size)``; with --retry, out of device memory halves the batch and tries again
    (timm's --retry), down to one image."""
    import torch

    from naflex.train.eval_cli import ValidateError

    while True:
        try:
            return evaluate_at(seq_len, batch_size)
        except torch.OutOfMemoryError:
            if not retry or batch_size == 1:
                raise ValidateError(f"out of device memory at sequence length {seq_len} with -b {batch_size}: lower "
                                    "-b" + ("" if retry else " (or pass --retry)")) from None
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            print(f"out of device memory at sequence length {seq_len}: retrying with -b {batch_size}")


def report(args, rows: list[dict], sweep: bool) -> None:
    """The results file and, for one model at several sequence lengths, the plot of top-1 against length."""
    from naflex.train.eval_results import plot_results, write_results

    if args.results_file:
        print(f"results written to {write_results(rows, args.results_file, args.results_format)}")
    if sweep and len(rows) > 1:
        plot_path = args.plot or (str(Path(args.results_file).with_suffix(".png")) if args.results_file else "")
        if plot_path:
            print(f"plot written to {plot_results(rows, plot_path)}")
        else:
            print("pass --plot FILE.png or --results-file to save a top-1 vs sequence length plot")


def _primary() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun's rank; 0 without torchrun


def run_all(args) -> list[dict]:
    """One run, or every run of a bulk validation (``bulk_runs``): one results file, rows by top-1 as timm sorts
    them. A run that fails is one error line and the others go on; all failing is the last one's error."""
    from naflex.train.eval_build import bulk_runs
    from naflex.train.eval_cli import ValidateError

    runs = bulk_runs(args)
    if not runs:
        rows = run(args)
        if _primary():
            report(args, rows, sweep=True)
        return rows
    print(f"bulk validation of {len(runs)} runs: " + ", ".join(c or m for m, c in runs))
    rows, failed = [], []
    for model, checkpoint in runs:
        try:
            rows += run(argparse.Namespace(**{**vars(args), "model": model, "checkpoint": checkpoint}))
        except ValidateError as e:
            print(f"validate.py: error ({checkpoint or model}): {e}", file=sys.stderr)
            failed.append(e)
    if not rows:
        raise failed[-1]
    rows.sort(key=lambda r: r["top1"], reverse=True)
    if _primary():
        report(args, rows, sweep=False)
    return rows


def main(argv=None) -> list[dict]:
    from loaders.stream_io import DataSourceError
    from naflex.train.eval_cli import ValidateError
    from naflex.train.evaluate import NoImagesEvaluated

    try:
        return run_all(build_parser().parse_args(argv))
    except ValidateError as e:
        print(f"validate.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except (NoImagesEvaluated, DataSourceError) as e:  # no metrics: every file undecodable, or the stream gone
        print(f"validate.py: error: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from naflex.train.distributed import cleanup
            cleanup()


if __name__ == "__main__":
    main()
