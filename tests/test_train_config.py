"""train.py's configuration surface: frozen flag list, timm defaults, -c YAML defaults, one-line errors."""
import pytest
import yaml

import train
from naflex.train.cli import ConfigError, build_parser, config_from_args, parse_args

# Changing the CLI is a deliberate act: update this list (and the README) in the same commit.
FROZEN_FLAGS = [
    '--aa', '--amp', '--amp-dtype', '--attn-backend', '--aug-repeats', '--bad-file-limit', '--batch-size',
    '--bce-loss', '--bce-pos-weight', '--bce-sum', '--bce-target-thresh', '--channels-last', '--checkpoint-hist',
    '--class-map', '--clip-grad', '--clip-mode', '--color-jitter', '--color-jitter-prob', '--config',
    '--cooldown-epochs', '--cutmix', '--data-dir', '--dataset', '--decay-epochs', '--decay-milestones',
    '--decay-rate', '--device', '--device-aug', '--dr', '--drop', '--drop-path', '--epochs', '--eval-metric',
    '--exif-orientation', '--experiment', '--gaussian-blur-prob', '--gp', '--grad-accum-steps', '--grad-checkpointing',
    '--grayscale-prob', '--head-init-bias', '--head-init-scale', '--help', '--hflip', '--initial-checkpoint',
    '--input-img-mode', '--input-key', '--interpolation', '--layer-decay', '--layer-decay-min-scale',
    '--layer-decay-no-opt-scale', '--local-rank', '--local_rank', '--log-interval', '--log-wandb', '--lr',
    '--lr-base', '--lr-base-scale', '--lr-base-size', '--lr-cycle-decay', '--lr-cycle-limit', '--lr-cycle-mul',
    '--lr-decay-fn', '--lr-k-decay', '--lr-noise', '--lr-noise-pct', '--lr-noise-std', '--lr-stable-timescale',
    '--mean', '--min-lr', '--mixup', '--mixup-off-epoch', '--mixup-prob', '--mixup-switch-prob', '--model',
    '--model-dtype', '--model-ema', '--model-ema-decay', '--model-ema-warmup', '--model-kwargs', '--momentum',
    '--naflex-loader', '--naflex-loss-scale', '--naflex-max-seq-len', '--naflex-patch-size-probs',
    '--naflex-patch-sizes', '--naflex-train-seq-lens', '--no-aug', '--no-ddp-bb', '--no-jpeg-draft',
    '--no-naflex-packing', '--no-resume-opt', '--num-classes', '--opt', '--opt-betas', '--opt-eps', '--opt-kwargs',
    '--output', '--patch-drop-rate', '--patience-epochs', '--pin-mem', '--pretrained', '--pretrained-path',
    '--ratio', '--recount',
    '--recovery-interval', '--remode', '--reprob', '--resume', '--scale', '--sched', '--sched-on-updates', '--seed',
    '--smoothing', '--start-epoch', '--std', '--synchronize-step', '--target-key', '--torchcompile',
    '--torchcompile-mode', '--train-interpolation', '--train-num-samples', '--train-split', '--val-interval',
    '--val-num-samples', '--val-split', '--validation-batch-size', '--vflip', '--wandb-project',
    '--wandb-resume-id', '--wandb-tags', '--warmup-epochs', '--warmup-lr', '--warmup-prefix', '--weight-decay',
    '--wds-shuffle-buffer', '--workers',
]

CARD = ('--data-dir /data/imagenet/ --amp --amp-dtype bfloat16 --model naflexvit_base_patch16_gap --naflex-loader '
        '-b 64 --opt nadamw --lr 3e-4 --warmup-lr 0 --sched-on-updates --aa rand-m8-inc1-mstd1.0 --weight-decay .1 '
        '--grayscale-prob .1 --drop-path 0.2 --reprob 0 --mixup 0.8 --cutmix 1.0 --remode pixel -j 8').split()


def test_flag_list_is_frozen():
    """The flags train.py honours (timm's refused ones are listed in naflex.train.timm_flags)."""
    from naflex.train.timm_flags import Refused
    flags = sorted(s for a in build_parser()._actions if not isinstance(a, Refused)
                   for s in a.option_strings if s.startswith('--'))
    assert flags == sorted(FROZEN_FLAGS)


def test_every_default_declared_once():
    dests = [a.dest for a in build_parser()._actions]
    assert len(dests) == len(set(dests))


def test_loader_flags_are_config_flags():
    """A tool's subset of train.py's flags (the loader benchmarks) is the same flags, and every flag's default
    is its config field's default: the dataclasses are the one place defaults are declared."""
    from naflex.train.cli import config_from_args
    ours = {a.dest: a for a in build_parser()._actions}
    subset = build_parser(groups=('dataset', 'aug', 'naflex', 'run'))
    for a in subset._actions:
        assert (a.option_strings, a.default, a.nargs) == (ours[a.dest].option_strings, ours[a.dest].default,
                                                          ours[a.dest].nargs), a.dest
    parser = build_parser()
    cfg = config_from_args(parser.parse_args([]), parser)
    cli_only = {('mixup', 'mixup_alpha'), ('mixup', 'cutmix_alpha'), ('eval', 'batch_size'),
                ('run', 'resume_opt'), ('loader', 'packing'), ('eval', 'packing'), ('loader', 'pin_memory'),
                ('eval', 'pin_memory'), ('train', 'broadcast_buffers')}
    # (those are the flags whose CLI default means 'off' / 'same as another flag')
    from naflex.train.config import Config
    defaults = Config()
    for (section, field), flag in parser.flag_of.items():
        if (section, field) in cli_only or section == 'mixup':
            continue
        assert getattr(getattr(cfg, section), field) == getattr(getattr(defaults, section), field), flag


def test_card_command_and_timm_defaults():
    args, text = parse_args(CARD)
    assert (args.opt, args.lr, args.warmup_lr, args.sched_on_updates, args.batch_size) == ('nadamw', 3e-4, 0, True, 64)
    assert (args.amp, args.amp_dtype, args.mixup, args.cutmix, args.workers) == (True, 'bfloat16', 0.8, 1.0, 8)
    # flags the card leaves to timm's defaults
    assert (args.epochs, args.warmup_epochs, args.sched, args.min_lr, args.smoothing) == (300, 5, 'cosine', 0, 0.1)
    assert (args.naflex_max_seq_len, args.checkpoint_hist, args.seed, args.log_interval) == (576, 10, 42, 50)
    assert args.naflex_train_seq_lens == [128, 256, 576, 784, 1024] and args.naflex_loss_scale == 'linear'
    assert (args.model_ema_decay, args.cooldown_epochs, args.eval_metric) == (0.9998, 0, 'top1')
    # timm's optimizer, schedule and loss flags it leaves to their defaults
    assert (args.opt_eps, args.opt_betas, args.momentum, args.opt_kwargs) == (None, None, 0.9, {})
    assert args.clip_mode == 'norm'
    assert (args.layer_decay, args.layer_decay_min_scale, args.layer_decay_no_opt_scale) == (None, 0, None)
    assert (args.decay_milestones, args.decay_rate, args.patience_epochs, args.start_epoch) == ([90, 180, 270], 0.1,
                                                                                                  10, None)
    assert (args.lr_noise, args.lr_noise_pct, args.lr_noise_std) == (None, 0.67, 1.0)
    assert (args.lr_cycle_mul, args.lr_cycle_decay, args.lr_cycle_limit, args.lr_k_decay) == (1.0, 0.5, 1, 1.0)
    assert (args.bce_loss, args.bce_sum, args.bce_target_thresh, args.bce_pos_weight) == (False, False, None, None)
    # timm 1.0.31's factory: None = 90 epochs for step (timm 1.0.29's train.py default), 0.2 of the schedule for wsd
    assert (args.decay_epochs, args.lr_decay_fn, args.lr_stable_timescale) == (None, None, None)
    assert yaml.safe_load(text)['opt'] == 'nadamw'


def test_yaml_config_sets_defaults_cli_wins(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('epochs: 7\nlr: 0.001\nnaflex-train-seq-lens: [64, 128]\nmodel_ema: true\n')
    args, _ = parse_args(['-c', str(cfg), '--data-dir', 'x', '--lr', '0.002'])
    assert (args.epochs, args.lr, args.naflex_train_seq_lens, args.model_ema) == (7, 0.002, [64, 128], True)


@pytest.mark.parametrize('content,match', [
    ('epoch: 7\n', 'unknown keys: epoch'),
    ('- 1\n- 2\n', 'mapping'),
    ('a: [1\n', 'not valid YAML'),
])
def test_bad_yaml(tmp_path, content, match):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=match):
        parse_args(['-c', str(cfg), '--data-dir', 'x'])


@pytest.mark.parametrize('extra,match', [
    (['--resume', 'a.pth', '--initial-checkpoint', 'b.pth'], '--resume restores the full training state'),
    (['--min-lr', '1e-2'], '--min-lr 0.01 is above --lr 0.0003'),
    (['--opt', 'lamb2'], '--opt lamb2 is not a timm optimizer; valid: adabelief,'),
    (['--opt', 'adamw', '--opt-kwargs', 'lr=1'], '--opt-kwargs lr: set with --lr'),
    (['--opt', 'adamw', '--opt-kwargs', 'nesterov=True'], "--opt adamw rejects these settings: AdamW.__init__() got an "
                                                          "unexpected keyword argument 'nesterov'"),
    (['--opt', 'adahessian'], '--opt adahessian needs a second backward pass'),
    (['--opt', 'bnbadamw'], '--opt bnbadamw needs the bitsandbytes package'),
    (['--sched', 'bogus'], "invalid choice: 'bogus' (choose from 'cosine', 'tanh', 'step', 'multistep', 'plateau'"),
    (['--sched', 'plateau', '--sched-on-updates'], '--sched-on-updates does not apply to --sched plateau'),
    (['--bce-sum'], '--bce-sum has no effect without --bce-loss'),
    (['--naflex-patch-size-probs', '0.5', '0.5'], 'needs --naflex-patch-sizes'),
    (['--opt-betas', '0.9'], '--opt-betas takes 2 values for nadamw, got 1'),
    (['--device', 'tpu'], "use 'cuda' or 'cpu'"),
    (['--bad-file-limit', '1.5'], '--bad-file-limit must be in [0, 1]: the share of decode attempts that may fail'),
    (['--bad-file-limit', 'nan'], '--bad-file-limit must be in [0, 1]'),
    (['--attn-backend', 'foo'], "invalid choice: 'foo'"),
    (['--patch-drop-rate', '1'], '--patch-drop-rate must be in [0, 1)'),
    (['--model-kwargs', 'patch_drop_rate=0.1'], 'patch_drop_rate: set with --patch-drop-rate'),
    (['--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
])
def test_contradictory_flags_one_line(extra, match, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(CARD + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('train.py: error:') and match in err


def test_patch_drop_rate_reaches_the_model_like_drop_path():
    """--patch-drop-rate sets the model's patch_drop_rate (as --drop-path sets drop_path_rate); unset, the model's
    default stays."""
    import naflex
    cfg = config_from_args(parse_args(['--data-dir', 'd', '--model', 'naflexvit_tiny_test', '--patch-drop-rate',
                                       '0.25'])[0])
    model = naflex.create_model(cfg.model.name, **cfg.model.overrides(5))
    assert model.patch_drop_rate == 0.25 and model.cfg.patch_drop_rate == 0.25
    cfg = config_from_args(parse_args(['--data-dir', 'd', '--model', 'naflexvit_tiny_test'])[0])
    assert 'patch_drop_rate' not in cfg.model.overrides(5)


def _main_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('train.py: error:'), err
    return err[0]


def _tiny(data, tmp_path, *extra):
    return ['--data-dir', str(data), '--model', 'naflexvit_tiny_test', '--device', 'cpu', '-j', '0',
            '--output', str(tmp_path), '--experiment', 'e', *extra]


def test_missing_and_empty_data_dir(tmp_path, capsys):
    assert 'does not exist' in _main_error(_tiny(tmp_path / 'nope', tmp_path / 'out'), capsys)
    assert not (tmp_path / 'out').exists()  # a failed start leaves no empty run folder behind
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    assert 'no training images' in _main_error(_tiny(tmp_path / 'empty', tmp_path), capsys)


def test_class_folders_differ(demo_dataset, tmp_path, capsys):
    import shutil
    data = tmp_path / 'd'
    shutil.copytree(demo_dataset, data)
    victim = sorted((data / 'val').iterdir())[0]
    victim.rename(victim.with_name('zz_extra'))
    msg = _main_error(_tiny(data, tmp_path), capsys)
    assert 'class folders differ' in msg and 'holds 1 folder of no training class (zz_extra)' in msg
    assert 'add the missing folders (empty ones will do) and remove the others, or pass --class-map FILE' in msg


def test_unknown_model(demo_dataset, tmp_path, capsys):
    msg = _main_error(_tiny(demo_dataset, tmp_path, '--model', 'resnet50'), capsys)
    assert "unknown model 'resnet50'" in msg and 'naflexvit_tiny_test' in msg


def test_too_few_classes(demo_dataset, tmp_path, capsys):
    assert '--num-classes 3 is below the 4 class folders' in _main_error(
        _tiny(demo_dataset, tmp_path, '--num-classes', '3'), capsys)


def test_cuda_asked_but_absent(demo_dataset, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip('has CUDA')
    msg = _main_error(_tiny(demo_dataset, tmp_path, '--device', 'cuda'), capsys)
    assert 'no CUDA device' in msg and '--device cpu' in msg


def test_resume_auto_needs_experiment(demo_dataset, capsys):
    msg = _main_error(['--data-dir', str(demo_dataset), '--device', 'cpu', '--resume', 'auto'], capsys)
    assert '--experiment' in msg


def test_out_of_memory_advice(demo_dataset, tmp_path, capsys):
    import torch

    class Boom:
        def after_update(self, engine, state):
            raise torch.OutOfMemoryError('CUDA out of memory')

    with pytest.raises(SystemExit) as exc:
        train.main(_tiny(demo_dataset, tmp_path, '-b', '2', '--naflex-train-seq-lens', '16', '--epochs', '1'),
                   hooks=Boom())
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'out of GPU memory with -b 2 x longest sequence 16 = 32 tokens per step' in err[0]
    assert 'lower -b (e.g. -b 1)' in err[0] and 'drop 16 from --naflex-train-seq-lens' in err[0]


def test_out_of_memory_in_evaluation_names_the_eval_flags(demo_dataset, tmp_path, monkeypatch, capsys):
    import torch

    import naflex.train.evaluate

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory')

    monkeypatch.setattr(naflex.train.evaluate, 'evaluate', boom)
    with pytest.raises(SystemExit) as exc:
        train.main(_tiny(demo_dataset, tmp_path, '-b', '2', '-vb', '6', '--naflex-train-seq-lens', '16',
                         '--naflex-max-seq-len', '32', '--epochs', '1'))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['train.py: error: out of GPU memory in evaluation with -vb 6 x --naflex-max-seq-len 32 = 192 tokens '
                   'per step: lower -vb (e.g. -vb 3; it defaults to -b) or --naflex-max-seq-len']


def test_schedule_settings_timm_rejects(demo_dataset, tmp_path, capsys):
    """What timm's factory rejects is one error line: checked with the flags for a schedule stepped per epoch, once
    the run knows its updates per epoch for one stepped per update (nothing written either way)."""
    with pytest.raises(ConfigError, match='--sched wsd: wsd schedule requires 0 < decay_epochs <= epochs - '):
        parse_args(['--data-dir', 'x', '--sched', 'wsd', '--decay-epochs', '400'])
    with pytest.raises(ConfigError, match=r"--sched wsd: Invalid decay_fn \(bogus\)"):
        parse_args(['--data-dir', 'x', '--sched', 'wsd', '--lr-decay-fn', 'bogus'])
    msg = _main_error(_tiny(demo_dataset, tmp_path / 'out', '--sched', 'wsd', '--sched-on-updates', '--epochs', '3',
                            '--warmup-epochs', '1', '--decay-epochs', '0.01', '-b', '4'), capsys)
    assert '--sched wsd: wsd schedule requires 0 < decay_epochs' in msg and 'updates per epoch)' in msg
    assert not (tmp_path / 'out').exists()


def test_saved_args_yaml_reloads_as_config(tmp_path):
    """A run's args.yaml is a valid -c file that reproduces the same configuration."""
    args, text = parse_args(CARD + ['--epochs', '9'])
    path = tmp_path / 'args.yaml'
    path.write_text(text)
    again, _ = parse_args(['-c', str(path)])
    assert vars(again) == dict(vars(args), config=str(path))


def test_docs_list_every_timm_train_flag_as_the_parser_treats_it():
    """docs/training.md's table of timm's train.py flags is the parser's: every timm flag is declared here,
    honoured or refused with its reason, and the table says which."""
    from pathlib import Path
    from naflex.train.timm_flags import TIMM_TRAIN_FLAGS, flag_table
    parser = build_parser()
    declared = {s for a in parser._actions for s in (a.option_strings or [a.dest])}
    assert not [f for f in TIMM_TRAIN_FLAGS if f not in declared]
    docs = (Path(__file__).resolve().parents[1] / 'docs' / 'training.md').read_text()
    start = docs.index('<!-- train.py flags: generated by naflex.train.timm_flags.flag_table -->\n')
    end = docs.index('\n<!-- end of train.py flags -->')
    assert docs[docs.index('\n', start) + 1:end] == flag_table(parser, TIMM_TRAIN_FLAGS)


@pytest.mark.parametrize('flag', ['--sync-bn', '--kd-model-name resnet50', '--img-size 224', '--tta 2'])
def test_refused_timm_flag_is_one_line_with_the_reason(flag):
    with pytest.raises(ConfigError, match=r"is timm's flag but does not apply here: \S"):
        parse_args(['--data-dir', 'x'] + flag.split())
