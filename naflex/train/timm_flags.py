"""timm's command-line flags that do not apply to NaFlex training or evaluation here.

A user coming from timm types the flags they know. Each timm flag this project leaves out is still declared, hidden
from ``--help``, so that giving it stops with one line saying why it does not apply and what to use instead, never
as an "unrecognized argument". docs/training.md lists every timm flag with what it does here (tests keep the list
equal to the parsers).
"""
from __future__ import annotations

import argparse
from typing import Dict

_NO_FIXED_SIZE = ('NaFlex has no fixed image size or center crop: each image keeps its aspect ratio at the largest '
                  'patch grid that fits the sequence length; set it with --naflex-max-seq-len')
_FOLDERS_AND_SHARDS = ('only image folders and WebDataset tar shards (--dataset wds/NAME) are read here, not '
                       'torchvision or Hugging Face datasets')

# Every flag of timm's validate.py (1.0.31), in its order ('data' is the positional dataset root)
TIMM_VALIDATE_FLAGS = (
    'data', '--data-dir', '--dataset', '--split', '--num-samples', '--dataset-download', '--class-map', '--input-key',
    '--input-img-mode', '--target-key', '--dataset-trust-remote-code', '--model', '--pretrained', '--workers',
    '--batch-size', '--img-size', '--in-chans', '--input-size', '--use-train-size', '--crop-pct', '--crop-mode',
    '--crop-border-pixels', '--mean', '--std', '--interpolation', '--num-classes', '--gp', '--log-freq',
    '--checkpoint', '--num-gpu', '--test-pool', '--no-prefetcher', '--pin-mem', '--channels-last', '--device',
    '--amp', '--amp-dtype', '--model-dtype', '--tf-preprocessing', '--use-ema', '--fuser', '--fast-norm', '--reparam',
    '--model-kwargs', '--torchcompile-mode', '--torchscript', '--torchcompile', '--aot-autograd', '--results-file',
    '--results-format', '--real-labels', '--valid-labels', '--retry', '--seed', '--metrics-avg', '--naflex-loader',
    '--naflex-max-seq-len',
)

# timm's validate.py flags that do not apply, with the reason and what to use instead
VALIDATE_REFUSED: Dict[str, str] = {
    '--img-size': _NO_FIXED_SIZE,
    '--input-size': _NO_FIXED_SIZE,
    '--use-train-size': _NO_FIXED_SIZE,
    '--crop-pct': _NO_FIXED_SIZE,
    '--crop-mode': _NO_FIXED_SIZE,
    '--crop-border-pixels': _NO_FIXED_SIZE,
    '--test-pool': 'test-time pooling is for fixed-size CNN inputs; NaFlex scores every image at its own grid',
    '--tf-preprocessing': "TensorFlow's fixed-size Inception preprocessing does not apply to NaFlex's resize rule",
    '--in-chans': 'images are decoded to RGB here: the model takes 3 channels',
    '--input-img-mode': 'images are decoded to RGB here',
    '--num-samples': ('it sizes an iterable dataset; image folders and tar shards here know their size: a subset is '
                      'a split file (--split list.txt)'),
    '--dataset-download': _FOLDERS_AND_SHARDS,
    '--dataset-trust-remote-code': _FOLDERS_AND_SHARDS,
    '--input-key': _FOLDERS_AND_SHARDS + ' (tar shards: the image and .cls members, as timm reads them by default)',
    '--target-key': _FOLDERS_AND_SHARDS + ' (tar shards: the image and .cls members, as timm reads them by default)',
    '--num-gpu': 'DataParallel is not used: torchrun --nproc_per_node N validate.py scores every image once on N GPUs',
    '--no-prefetcher': 'the device prefetcher (uint8 batches normalized on the device) is always used; it does not '
                       'change the results',
    '--torchscript': 'the packed model is not scripted: use --torchcompile',
    '--aot-autograd': 'use --torchcompile (AOTAutograd is part of it)',
    '--fuser': 'TorchScript fusers apply to --torchscript, which is not supported: use --torchcompile',
    '--fast-norm': "timm's fast-norm layers are not used by this model (torch's LayerNorm under autocast)",
    '--real-labels': 'ImageNet ReaL scoring is not built: top-1/top-5 against the dataset\'s labels',
    '--valid-labels': 'scoring a label subset is not built: pass --class-map to fix the classes instead',
    '--metrics-avg': 'only top-1/top-5 accuracy and the loss are reported',
}


class Refused(argparse.Action):
    """A timm flag that does not apply here: giving it is a parser error naming the reason."""

    def __init__(self, option_strings, dest, reason: str = '', **kwargs):
        kwargs.setdefault('nargs', '*')  # takes whatever values were typed after it, and stops there
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is timm's flag but does not apply here: {self.reason}")


def refuse(parser: argparse.ArgumentParser, table: Dict[str, str]) -> None:
    """Declare each flag of ``table`` (flag -> reason) as ``Refused`` (hidden from --help)."""
    for flag, reason in table.items():
        parser.add_argument(flag, action=Refused, reason=reason)


def refused_flags(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """flag -> reason of the refused flags declared on ``parser``."""
    return {s: a.reason for a in parser._actions if isinstance(a, Refused) for s in a.option_strings}


def flag_table(parser: argparse.ArgumentParser, timm_flags) -> str:
    """Markdown rows ``| flag | here |`` for every flag of ``timm_flags``: its help on ``parser`` when honoured, the
    reason when refused (docs/training.md holds this table; a test keeps the two equal)."""
    refused = refused_flags(parser)
    helps = {s: a.help for a in parser._actions for s in (a.option_strings or [a.dest]) if a.help != argparse.SUPPRESS}
    rows = ['| flag | here |', '|---|---|']
    for flag in timm_flags:
        text = f'refused: {refused[flag]}' if flag in refused else f'honoured: {helps[flag]}'
        rows.append(f'| `{flag}` | {text.replace("|", "/")} |')
    return '\n'.join(rows)
