"""timm's command-line flags, and those that do not apply to NaFlex training or evaluation here.

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
_FOLDERS_AND_SHARDS = ("it is for torchvision's datasets (torch/NAME), which are not read here: image folders, "
                       'WebDataset tar shards (--dataset wds/NAME) and Hugging Face datasets (--dataset hfds/NAME, a '
                       'Hub id that datasets fetches into its cache itself, or a local folder) are')

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

# Every flag of timm's train.py (1.0.31: 172), in its order, by its longest name ('data': the positional root)
TIMM_TRAIN_FLAGS = (
    'data', '--data-dir', '--dataset', '--train-split', '--val-split', '--train-num-samples', '--val-num-samples',
    '--dataset-download', '--class-map', '--input-img-mode', '--input-key', '--target-key',
    '--dataset-trust-remote-code', '--model', '--pretrained', '--pretrained-path', '--initial-checkpoint', '--resume',
    '--no-resume-opt', '--num-classes', '--gp', '--img-size', '--in-chans', '--input-size', '--crop-pct', '--mean',
    '--std', '--interpolation', '--batch-size', '--validation-batch-size', '--channels-last', '--fuser',
    '--grad-accum-steps', '--grad-checkpointing', '--fast-norm', '--model-kwargs', '--head-init-scale',
    '--head-init-bias', '--torchcompile-mode', '--torchscript', '--torchcompile', '--device', '--amp', '--amp-dtype',
    '--model-dtype', '--no-ddp-bb', '--synchronize-step', '--local_rank', '--device-modules', '--opt', '--opt-eps',
    '--opt-betas', '--momentum', '--weight-decay', '--clip-grad', '--clip-mode', '--layer-decay',
    '--layer-decay-min-scale', '--layer-decay-no-opt-scale', '--opt-kwargs', '--sched', '--sched-on-updates', '--lr',
    '--lr-base', '--lr-base-size', '--lr-base-scale', '--lr-noise', '--lr-noise-pct', '--lr-noise-std',
    '--lr-cycle-mul', '--lr-cycle-decay', '--lr-cycle-limit', '--lr-k-decay', '--warmup-lr', '--min-lr', '--epochs',
    '--epoch-repeats', '--start-epoch', '--decay-milestones', '--decay-epochs', '--warmup-epochs', '--warmup-prefix',
    '--cooldown-epochs', '--patience-epochs', '--decay-rate', '--no-aug', '--train-crop-mode', '--scale', '--ratio',
    '--hflip', '--vflip', '--color-jitter', '--color-jitter-prob', '--grayscale-prob', '--gaussian-blur-prob', '--aa',
    '--aug-repeats', '--aug-splits', '--jsd-loss', '--bce-loss', '--bce-sum', '--bce-target-thresh',
    '--bce-pos-weight', '--reprob', '--remode', '--recount', '--resplit', '--mixup', '--cutmix', '--cutmix-minmax',
    '--mixup-prob', '--mixup-switch-prob', '--mixup-mode', '--mixup-off-epoch', '--smoothing',
    '--train-interpolation', '--drop', '--drop-connect', '--drop-path', '--drop-block', '--bn-momentum', '--bn-eps',
    '--sync-bn', '--dist-bn', '--split-bn', '--model-ema', '--model-ema-force-cpu', '--model-ema-decay',
    '--model-ema-warmup', '--seed', '--worker-seeding', '--log-interval', '--val-interval', '--recovery-interval',
    '--checkpoint-hist', '--workers', '--save-images', '--pin-mem', '--no-prefetcher', '--output', '--experiment',
    '--eval-metric', '--tta', '--use-multi-epochs-loader', '--log-wandb', '--wandb-project', '--wandb-tags',
    '--wandb-resume-id', '--train-img-sizes', '--train-batch-sizes', '--train-size-probs', '--train-size-schedule',
    '--train-size-schedule-spread', '--train-size-random-mix', '--train-steps-per-epoch',
    '--variable-batch-loss-scale', '--naflex-loader', '--naflex-train-seq-lens', '--naflex-max-seq-len',
    '--naflex-patch-sizes', '--naflex-patch-size-probs', '--naflex-loss-scale', '--naflex-patchify-channels-first',
    '--kd-model-name', '--kd-distill-type', '--kd-loss-type', '--distill-loss-weight', '--task-loss-weight',
    '--kd-temperature', '--kd-student-feature-dim', '--kd-teacher-feature-dim', '--kd-token-distill-type',
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
    '--dataset-download': _FOLDERS_AND_SHARDS,
    '--dataset-trust-remote-code': _FOLDERS_AND_SHARDS,
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


_NO_BATCHNORM = 'the model has no BatchNorm layers (LayerNorm only)'
_FIXED_SIZE_SCHEDULE = ("timm's multi-resolution schedule for fixed-size models; NaFlex varies the sequence length "
                        "per step instead: --naflex-train-seq-lens")
_NO_DISTILLATION = 'knowledge distillation is not built here'
_STEPS_FROM_BUDGET = ('steps per epoch follow from the token budget (-b x the longest sequence length); set the '
                      'samples per epoch with --train-num-samples')
_NO_AUGMIX_SPLITS = "AugMix-style augmentation splits are not built here (timm's NaFlex loader refuses them too)"

# timm's train.py flags that do not apply, with the reason and what to use instead
TRAIN_REFUSED: Dict[str, str] = {
    **{f: VALIDATE_REFUSED[f] for f in ('--img-size', '--input-size', '--crop-pct', '--in-chans', '--dataset-download',
                                        '--dataset-trust-remote-code', '--fuser',
                                        '--fast-norm', '--torchscript', '--no-prefetcher')},
    '--device-modules': 'only CUDA and CPU devices are supported (no out-of-tree device modules)',
    '--epoch-repeats': 'set the epoch length with --train-num-samples N (N samples per epoch)',
    '--train-crop-mode': ('NaFlex training crops are random-resized crops fitted to the step\'s sequence length '
                          '(--scale, --ratio); the other crop modes are for fixed-size inputs'),
    '--aug-splits': _NO_AUGMIX_SPLITS,
    '--jsd-loss': _NO_AUGMIX_SPLITS,
    '--resplit': _NO_AUGMIX_SPLITS,
    '--cutmix-minmax': "CutMix boxes are drawn from --cutmix's Beta distribution (timm's NaFlex MixUp drops this flag)",
    '--mixup-mode': "MixUp/CutMix mix whole batches ('batch' mode; timm's NaFlex MixUp drops this flag)",
    '--drop-connect': 'use --drop-path (timm keeps --drop-connect as its old name for EfficientNet models)',
    '--drop-block': 'DropBlock is for convolutional feature maps; use --drop-path or --drop',
    '--bn-momentum': _NO_BATCHNORM,
    '--bn-eps': _NO_BATCHNORM,
    '--sync-bn': _NO_BATCHNORM,
    '--dist-bn': _NO_BATCHNORM,
    '--split-bn': _NO_BATCHNORM,
    '--model-ema-force-cpu': 'the EMA weights stay on the training device (timm\'s ModelEmaV3 ignores the flag too)',
    '--worker-seeding': ('every random draw is seeded from (--seed, epoch, image), whatever the worker: there is no '
                         'per-worker seed to choose'),
    '--save-images': 'not built here: scripts/bench/profile_loader.py shows what the loader produces',
    '--tta': 'test-time augmentation is not built: evaluation scores each image once at --naflex-max-seq-len',
    '--use-multi-epochs-loader': 'the loader workers already live for the whole run (persistent workers)',
    '--train-img-sizes': _FIXED_SIZE_SCHEDULE,
    '--train-batch-sizes': _FIXED_SIZE_SCHEDULE,
    '--train-size-probs': _FIXED_SIZE_SCHEDULE,
    '--train-size-schedule': _FIXED_SIZE_SCHEDULE,
    '--train-size-schedule-spread': _FIXED_SIZE_SCHEDULE,
    '--train-size-random-mix': _FIXED_SIZE_SCHEDULE,
    '--train-steps-per-epoch': _STEPS_FROM_BUDGET,
    '--train-batches-per-epoch': _STEPS_FROM_BUDGET,
    '--variable-batch-loss-scale': "use --naflex-loss-scale (linear, sqrt or none), the NaFlex loader's loss scale",
    '--naflex-patchify-channels-first': ("patches are flattened (y, x, channel) as the published weights expect; "
                                         "another order would need other weights"),
    **{f: _NO_DISTILLATION for f in ('--kd-model-name', '--kd-distill-type', '--kd-loss-type', '--distill-loss-weight',
                                     '--task-loss-weight', '--kd-temperature', '--kd-student-feature-dim',
                                     '--kd-teacher-feature-dim', '--kd-token-distill-type')},
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
