"""validate.py's command line: timm's validate.py flags (those that do not apply are refused with the reason, see
naflex.train.timm_flags), their defaults read from the config dataclasses train.py uses, and ``check_args``, which
checks every value with train.py's rules before anything is read."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


class ValidateError(Exception):
    """A user-facing problem reported as one line (bad path, unknown model, class mismatch, ...)."""


class _Parser(argparse.ArgumentParser):
    """Flag mistakes are one line, like every other validate.py error."""

    def error(self, message):
        raise ValidateError(f"{message} (see validate.py --help)")


def build_parser() -> argparse.ArgumentParser:
    # Defaults come from the same config dataclasses as train.py's, so the two CLIs agree.
    from loaders.config import DatasetConfig, EvalLoaderConfig
    from naflex.model import DEFAULT_MODEL
    from naflex.train.cli import ParseKwargs
    from naflex.train.timm_flags import VALIDATE_REFUSED, refuse
    ev, split = EvalLoaderConfig(), DatasetConfig.val_split
    p = _Parser(description="Evaluate a NaFlexViT model at one or more sequence lengths.")
    p.add_argument("data", nargs="?", default=None, help="dataset root (same as --data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="dataset root holding <split>/<class>/*.jpg, or tar shards (a URL, bucket or file:// folder "
                        "of them is streamed)")
    p.add_argument("--split", default=split,
                   help=f"split folder under the root (default: {split}, like train.py's --val-split; 'val', "
                        "'valid', 'eval' are found too, and a root that holds the class folders is used as it is), "
                        "or a split of tar shards (a name in _info.json or NAME-validation-{00..63}.tar)")
    p.add_argument("--dataset", default="", metavar="TYPE/NAME",
                   help="'wds/NAME': WebDataset tar shards + _info.json in --data-dir (found without it too); "
                        "'hfds/NAME' ('hfids/NAME': streamed): a Hugging Face dataset; default: image folder")
    p.add_argument("--model", "-m", default=None,
                   help=f"model name (naflex.list_models()), optionally NAME.TAG, hf-hub:timm/NAME.TAG or "
                        f"local-dir:PATH (a save_for_hf folder, its weights by default) (default: the "
                        f"name the checkpoint stores, else {DEFAULT_MODEL}); as timm, 'all', a wildcard pattern, a "
                        "comma list or a file of names validates each with its published weights")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                   help="model config fields (default: those the checkpoint records), e.g. embed_dim=192 depth=6")
    p.add_argument("--checkpoint", default="",
                   help="our checkpoint (plain/EMA/training state) or a timm .pth/.safetensors, or a folder: each "
                        "*.pth / *.pth.tar in it (default: the model's published weights, as timm)")
    p.add_argument("--pretrained", action="store_true",
                   help="the model's published weights (Hugging Face Hub, cached; HF_HUB_OFFLINE=1 reads the cache "
                        "only); the default without --checkpoint, as in timm")
    p.add_argument("--input-key", default=None, metavar="EXTS",
                   help="tar shards: the image member, e.g. 'jpg;png;webp' (the first a sample has; default: any "
                        "image)")
    p.add_argument("--target-key", default=None, metavar="FIELD",
                   help="tar shards: the label, a field of the sample's .json (a.b for a nested one; default: its "
                        ".cls, or _info.json's alt_label)")
    p.add_argument("--class-map", default="", metavar="FILE",
                   help="class names in index order (timm's .txt / .pkl; default: the names the checkpoint records, "
                        "else timm's folder order)")
    p.add_argument("--use-ema", action="store_true", help="load the EMA weights ('state_dict_ema') of a checkpoint")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: the checkpoint's, else the dataset's)")
    p.add_argument("--naflex-max-seq-len", type=int, nargs="+", default=[ev.max_seq_len],
                   help=f"one or more sequence lengths to evaluate at (default: {ev.max_seq_len})")
    p.add_argument("--naflex-loader", action="store_true", help="accepted for timm compatibility (always NaFlex)")
    p.add_argument("--padded", action="store_true", help="timm's padded batches instead of packed ones")
    p.add_argument("--exif-orientation", action="store_true",
                   help="turn images upright by their EXIF orientation tag (default: no, like timm)")
    p.add_argument("-b", "--batch-size", type=int, default=ev.batch_size,
                   help=f"images per batch (default: {ev.batch_size})")
    p.add_argument("-j", "--workers", type=int, default=ev.num_workers,
                   help=f"data loader workers (default: {ev.num_workers})")
    _run_flags(p)
    refuse(p, VALIDATE_REFUSED)  # timm's flags that do not apply: one line each, with the reason
    return p


def _run_flags(p: argparse.ArgumentParser) -> None:
    """Precision, device, compilation, preprocessing overrides and the results output."""
    from naflex.model import ATTN_BACKENDS
    from naflex.train.config import AMP_DTYPES, TrainConfig
    amp_dtype = TrainConfig.amp_dtype
    p.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    p.add_argument("--amp-dtype", default=amp_dtype, choices=AMP_DTYPES,
                   help=f"autocast dtype (default: {amp_dtype}, as in train.py and timm; the model card uses bfloat16)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--attn-backend", default="auto", choices=ATTN_BACKENDS,
                   help="attention backend for packed batches (default: auto)")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile the model")
    p.add_argument("--torchcompile-mode", default=None, help="torch.compile mode")
    p.add_argument("--model-dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weights and inputs in this dtype (as timm; float32 with --amp)")
    p.add_argument("--gp", default=None, help="global pool type of the model (default: the model's)")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="normalization mean (default: the model's)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="normalization std (default: the model's)")
    p.add_argument("--interpolation", default="", choices=("", "bilinear", "bicubic", "nearest", "lanczos", "box",
                                                           "hamming"),
                   help="resize interpolation (default: the model's)")
    p.add_argument("--pin-mem", action="store_true", help="pin host batches (always on with CUDA here)")
    p.add_argument("--retry", action="store_true", help="on out-of-memory, retry with half the batch size (as timm)")
    p.add_argument("--seed", type=int, default=42, help="random seed (evaluation draws nothing at random)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format of 4-D weights (NaFlexViT has none: no effect)")
    p.add_argument("--reparam", action="store_true", help="re-parameterize the model (timm's; none in NaFlexViT)")
    p.add_argument("--results-file", default="", help="write results to .csv or .json (by extension)")
    p.add_argument("--results-format", default=None, choices=("csv", "json"), help="override the file format")
    p.add_argument("--plot", default="", help="PNG of top-1 vs sequence length (default: next to --results-file)")
    p.add_argument("--log-freq", type=int, default=0, help="print progress every N batches (default: off)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="score the first N images of the split (default: all)")


_FLAGS = {"num_samples": "--num-samples", "max_seq_len": "--naflex-max-seq-len", "batch_size": "-b/--batch-size",
          "num_workers": "-j/--workers",
          "name": "--model", "num_classes": "--num-classes", "attn_backend": "--attn-backend", "device": "--device",
          "amp": "--amp", "amp_dtype": "--amp-dtype", "packing": "--padded", "torchcompile": "--torchcompile",
          "torchcompile_mode": "--torchcompile-mode", "global_pool": "--gp", "std": "--std", "kwargs": "--model-kwargs"}


def check_args(args) -> None:
    """Every flag value, with train.py's rules (the config dataclasses' ``validate``), before anything is read."""
    from loaders.config import EvalLoaderConfig
    from naflex.model import DEFAULT_MODEL
    from naflex.train.config import ModelConfig, TrainConfig

    parts = [EvalLoaderConfig(max_seq_len=L, batch_size=args.batch_size, num_workers=args.workers,
                              num_samples=args.num_samples) for L in args.naflex_max_seq_len]
    parts.append(TrainConfig(device=args.device or "cpu", amp=args.amp, amp_dtype=args.amp_dtype))
    parts.append(ModelConfig(name=args.model or DEFAULT_MODEL, num_classes=args.num_classes, kwargs=args.model_kwargs,
                             attn_backend=args.attn_backend, torchcompile=args.torchcompile,
                             torchcompile_mode=args.torchcompile_mode, global_pool=args.gp,
                             std=tuple(args.std) if args.std else None))
    problems = []
    for part in parts:
        try:
            part.validate(lambda field: _FLAGS.get(field, field))
        except ValueError as e:
            problems.append(str(e))
    if args.log_freq < 0:
        problems.append("--log-freq must be >= 0")
    if args.model_dtype not in (None, "float32") and args.amp:
        problems.append(f"--model-dtype {args.model_dtype} with --amp: autocast runs float32 weights (as timm)")
    if not (args.data_dir or args.data or args.dataset.lower().startswith(("hfds/", "hfids/"))):
        problems.append("no dataset given: pass --data-dir DIR")
    for flag, path in (("--results-file", args.results_file), ("--plot", args.plot)):
        problems += [f"{flag} {path}: {why}" for why in [_cannot_write(path)] if path and why]
    if problems:
        raise ValidateError("; ".join(dict.fromkeys(problems)))  # one sequence length's problem once


def _cannot_write(path: str) -> str:
    """Why ``path`` cannot be written (checked up front: the results come after the whole evaluation), or ''."""
    target = Path(path)
    if target.is_dir():
        return "is a folder"
    folder = next((p for p in target.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot be created: {folder} is not a writable folder"
    return ""


def check_attention(args, model: str, device: str) -> None:
    """The attention backend fits the device, precision, layout and batch size (train.py's rule)."""
    import naflex
    from naflex.train.config import attention_problems

    problems = attention_problems(
        args.attn_backend, device=device, amp=args.amp, packing=not args.padded, compiled=bool(args.torchcompile),
        training=False, tokens_per_step=args.batch_size * max(args.naflex_max_seq_len),
        num_heads=naflex.get_config(model).num_heads, flag=_FLAGS.get)
    if problems:
        raise ValidateError("; ".join(problems))
