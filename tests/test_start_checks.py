"""What train.py and validate.py check before a run starts: every flag and input is checked first, a mistake is
one line (exit 2) and leaves nothing on disk, an existing run is never overwritten, and only a file that cannot
be read or decoded is ever called a bad image.

Tiny model (naflexvit_tiny_test), generated images (tests/conftest.py ``demo_dataset``), CPU.
"""
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import train
import validate

MODEL = 'naflexvit_tiny_test'
TINY = ['--model', MODEL, '--device', 'cpu', '-j', '0', '-b', '4', '--epochs', '1', '--warmup-epochs', '0',
        '--naflex-train-seq-lens', '32', '64', '--naflex-max-seq-len', '64']


def _argv(data, out, *extra, experiment='e'):
    return ['--data-dir', str(data), *TINY, '--output', str(out), '--experiment', experiment, *extra]


def _one_line_error(main, argv, capsys, code=2, prog='train.py'):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'{prog}: error: '), err
    return err[0]


def _copy(demo_dataset, tmp_path) -> Path:
    data = tmp_path / 'data'
    shutil.copytree(demo_dataset, data)
    return data


# --- the run folder: never overwritten, never outside --output, never left behind by a mistake ---------------

def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_existing_experiment_is_refused_not_overwritten(demo_dataset, tmp_path, capsys):
    train.main(_argv(demo_dataset, tmp_path, experiment='done'))
    run = tmp_path / 'done'
    before = _snapshot(run)
    assert {'last.pth', 'model_best.pth', 'summary.csv', 'args.yaml'} <= set(before)
    msg = _one_line_error(train.main, _argv(demo_dataset, tmp_path, '--lr', '0.5', experiment='done'), capsys)
    assert f'{run} already holds a run' in msg and '--resume auto' in msg and 'another --experiment' in msg
    assert _snapshot(run) == before  # not one byte of the finished run changed (train.log included)
    # a checkpoint of another run does not make this folder continue it either
    other = tmp_path / 'elsewhere.pth'
    shutil.copy(run / 'last.pth', other)
    assert 'already holds a run' in _one_line_error(
        train.main, _argv(demo_dataset, tmp_path, '--resume', str(other), experiment='done'), capsys)
    assert _snapshot(run) == before


def test_resume_of_a_finished_run_has_nothing_to_train(demo_dataset, tmp_path, capsys):
    """Exit 0 with a line saying how to train on; the finished run is not touched (train.log included)."""
    train.main(_argv(demo_dataset, tmp_path, experiment='done'))
    run = tmp_path / 'done'
    before = _snapshot(run)
    capsys.readouterr()
    assert train.main(_argv(demo_dataset, tmp_path, '--resume', 'auto', experiment='done')) == []
    out, err = capsys.readouterr()
    assert (f'nothing to train: --resume {run / "last.pth"} continues at epoch 1, and the schedule ends after 1 epoch '
            '(--epochs 1); nothing is written. To train longer, raise --epochs (now 1) and resume again') in out
    assert 'training epochs' not in out and not err
    assert _snapshot(run) == before
    assert 'nothing to train: --start-epoch 3, and the schedule ends after 2 epochs (--epochs 1 with the warm-up ' \
        'prefix, cycles and cool-down); nothing is written. Lower --start-epoch or raise --epochs' in _log_of(
            train.main, _argv(demo_dataset, tmp_path / 'new', '--start-epoch', '3', '--cooldown-epochs', '1'), capsys)
    assert not (tmp_path / 'new').exists()


def _log_of(main, argv, capsys) -> str:
    capsys.readouterr()
    main(argv)
    return capsys.readouterr().out


def test_generated_run_name_gets_a_suffix(tmp_path, monkeypatch):
    """Without --experiment the folder is date-model; a clash gets timm's -1, -2 suffix instead of reuse."""
    from datetime import datetime

    from naflex.train import build
    from naflex.train.cli import config_from_args, parse_args
    from naflex.train.distributed import DistInfo

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 2, 10, 0, 0)

    monkeypatch.setattr(build, 'datetime', Frozen)
    cfg = config_from_args(parse_args(['--data-dir', 'x', '--model', MODEL, '--output', str(tmp_path)])[0])
    first = tmp_path / f'20261202-100000-{MODEL}'
    single = DistInfo()
    assert build.run_dir(cfg, single) == first and not first.exists()  # the path only: not created yet
    first.mkdir()
    assert build.run_dir(cfg, single) == first  # an empty folder holds no run: used as it is
    (first / 'args.yaml').write_text('lr: 1\n')
    assert build.run_dir(cfg, single) == tmp_path / f'{first.name}-1'


@pytest.mark.parametrize('name', ['../escape', 'a/b', '..', 'a\\b', '/abs/run'])
def test_experiment_is_a_folder_name(demo_dataset, tmp_path, name, capsys):
    msg = _one_line_error(train.main, _argv(demo_dataset, tmp_path / 'out', experiment=name), capsys)
    assert 'must be a folder name without path separators' in msg
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'escape').exists()


@pytest.mark.parametrize('extra, message', [
    (['--num-classes', '3'], '--num-classes 3 is below the 4 class folders'),
    (['--initial-checkpoint', '/nonexistent/w.pth'], 'weights file not found'),
    (['--resume', '/nonexistent/last.pth'], 'no such checkpoint'),
    (['--attn-backend', 'varlen'], 'varlen needs a CUDA device'),
    (['--aa', 'rand-mfoo'], 'RandAugment'),
    (['--train-split', 'list.txt'], 'split file'),
    (['--model-kwargs', 'patch_size=0'], '--model-kwargs patch_size must be >= 1, got 0'),
    (['--model-kwargs', 'num_heads=0'], '--model-kwargs num_heads must be >= 1, got 0'),
])
def test_mistakes_leave_no_run_folder(demo_dataset, tmp_path, extra, message, capsys):
    assert message in _one_line_error(train.main, _argv(demo_dataset, tmp_path / 'out', *extra), capsys)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('extra, message', [
    (['-b', '128', '--naflex-max-seq-len', '100000'],
     '--naflex-max-seq-len 100000: an evaluation step of -vb 128 images x 100000 tokens = 12,800,000 tokens (every '
     'image is resized to fill the length: about 5060 x 5060 px at patch 16) needs more than 219.7 GiB for '
     'naflexvit_base_patch16_gap, and the RAM has 80.0 GiB; lower --naflex-max-seq-len (the model card evaluates at '
     '576), or -vb (it defaults to -b; above 46 it cannot fit)'),
    (['-b', '64', '--amp', '--amp-dtype', 'bfloat16', '--naflex-train-seq-lens', '128', '8192', '100000'],
     '--naflex-train-seq-lens 128 8192 100000: a training step of -b 64 x longest sequence 100000 = 6,400,000 tokens '
     'needs more than 457.8 GiB for naflexvit_base_patch16_gap (the activations its blocks keep for the backward '
     'pass), and the RAM has 80.0 GiB; lower -b (above 11 it cannot fit), or drop 100000 from '
     '--naflex-train-seq-lens'),
    (['-b', '64', '--naflex-train-seq-lens', '16384'], 'lower -b (above 34 it cannot fit), drop 16384 from '
                                                       '--naflex-train-seq-lens, or add --grad-checkpointing'),
])
def test_a_step_too_large_for_the_device_is_refused_up_front(demo_dataset, tmp_path, monkeypatch, extra, message,
                                                              capsys):
    """A lower bound of the step's memory (naflex.train.memory) above the device's: one line before the data is
    read, rather than a run that fails at its first evaluation. The machine is taken to have 80 GiB."""
    import naflex.train.memory
    monkeypatch.setattr(naflex.train.memory, 'device_memory', lambda device: 80 << 30)
    msg = _one_line_error(train.main, _argv('/nonexistent/data', tmp_path / 'out', '--model',
                                            'naflexvit_base_patch16_gap', *extra), capsys)
    assert msg.startswith('train.py: error: --naflex') and msg.endswith(message)
    assert not (tmp_path / 'out').exists()


def test_the_model_card_step_fits_an_80_gib_gpu():
    """The lower bound refuses only what cannot fit: the card's flags (-b 64 x 1024 tokens, eval at 576) pass."""
    from naflex.train.cli import parse_config
    from naflex.train.memory import step_memory_problem
    card = ['--data-dir', 'x', '--amp', '--amp-dtype', 'bfloat16', '--model', 'naflexvit_base_patch16_gap', '-b', '64']
    assert step_memory_problem(parse_config(card)[1], 80 << 30, 'cuda:0') is None
    assert step_memory_problem(parse_config(card + ['--naflex-max-seq-len', '4096'])[1], 80 << 30, 'cuda:0') is None
    assert 'activations its blocks keep' in step_memory_problem(
        parse_config(card + ['--naflex-train-seq-lens', '128', '65536'])[1], 80 << 30, 'cuda:0')


def test_train_log_starts_with_the_lines_logged_before_the_folder_existed(demo_dataset, tmp_path):
    train.main(_argv(demo_dataset, tmp_path, '--epochs', '1'))
    log = (tmp_path / 'e' / 'train.log').read_text().splitlines()
    assert '--num-classes 4: the classes found' in log[0]
    model = next(i for i, line in enumerate(log) if 'naflexvit_tiny_test: ' in line)
    (output,) = [i for i, line in enumerate(log) if f'device cpu, output {tmp_path / "e"}' in line]
    assert model < output  # said once the folder exists, after the lines that checked the inputs


def test_refused_input_names_no_output_folder(demo_dataset, tmp_path, capsys):
    """The 'device ..., output DIR' line comes once DIR exists: a refused start never reads as if it was made."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(_argv(demo_dataset, tmp_path / 'out', '--num-classes', '3'))
    out, err = capsys.readouterr()
    assert '--num-classes 3 is below' in err and 'output' not in out and not (tmp_path / 'out').exists()


# --- datasets -------------------------------------------------------------------------------------------------

def test_empty_validation_split_is_an_error_not_a_zero_score(demo_dataset, tmp_path, capsys):
    data = _copy(demo_dataset, tmp_path)
    for f in (data / 'val').rglob('*.jpg'):
        f.unlink()  # class folders stay, with no file in them
    msg = _one_line_error(train.main, _argv(data, tmp_path / 'out'), capsys)
    assert "split 'validation' holds no images (4 class folders, all empty)" in msg
    assert '--val-split ""' in msg and not (tmp_path / 'out').exists()


def test_training_classes_missing_from_validation_say_what_to_do(demo_dataset, tmp_path, capsys):
    data = _copy(demo_dataset, tmp_path)
    shutil.rmtree(data / 'val' / '03_cross')
    msg = _one_line_error(train.main, _argv(data, tmp_path / 'out'), capsys)
    assert msg == (f"train.py: error: class folders differ between 'train' and 'validation', so their labels would not "
                   f"match: {data / 'val'} lacks 1 training class (03_cross); add the missing folders (empty ones will "
                   f"do), or pass --class-map FILE naming the training classes one a line (`ls {data / 'train'} > "
                   f'classes.txt`), or --val-split "" to train without evaluation')
    assert not (tmp_path / 'out').exists()
    (tmp_path / 'classes.txt').write_text(''.join(f'{p.name}\n' for p in sorted((data / 'train').iterdir())))
    train.main(_argv(data, tmp_path / 'out', '--class-map', str(tmp_path / 'classes.txt')))  # the advice works
    assert (tmp_path / 'out' / 'e' / 'model_best.pth').exists()


def test_empty_train_class_is_named_in_a_warning(demo_dataset, tmp_path, caplog):
    from naflex.train import build
    from naflex.train.cli import config_from_args, parse_args
    data = _copy(demo_dataset, tmp_path)
    for f in (data / 'train' / '02_triangle').iterdir():
        f.unlink()
    cfg = config_from_args(parse_args(['--data-dir', str(data), '--model', MODEL])[0])
    with caplog.at_level('WARNING', logger='train'):
        build.open_datasets(cfg)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert "1 of 4 class folders in split 'train' hold no images: 02_triangle" in warning
    assert "their 4 images in 'validation' count as errors" in warning


def test_eval_over_no_decodable_image_is_an_error(demo_dataset, tmp_path, capsys):
    root = tmp_path / 'data'
    for c in ('a', 'b'):
        (root / 'val' / c).mkdir(parents=True)
        (root / 'val' / c / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    torch.manual_seed(0)
    torch.save(__import__('naflex').create_model(MODEL, num_classes=2).state_dict(), tmp_path / 'two.pth')
    msg = _one_line_error(validate.main, ['--data-dir', str(root), '--model', MODEL, '--checkpoint',
                                          str(tmp_path / 'two.pth'), '-j', '0', '--naflex-max-seq-len', '16'], capsys,
                          code=1, prog='validate.py')
    assert 'evaluated no image: all 2 files failed to decode' in msg and 'broken.jpg' in msg


def _write_list(path: Path, root: Path, split: str):
    path.write_text(''.join(f'{p.relative_to(root / split)}\n' for p in sorted((root / split).rglob('*.jpg'))))


def test_text_list_split_that_matches_no_folder(demo_dataset, tmp_path, capsys):
    data = _copy(demo_dataset, tmp_path)
    _write_list(data / 'train_list.txt', data, 'train')  # entries relative to train/, the list in the root
    msg = _one_line_error(train.main, _argv(data, tmp_path / 'out', '--train-split', 'train_list.txt'), capsys)
    assert f"split file {data / 'train_list.txt'}: its first entry" in msg and f'is in none of {data}, ' in msg
    assert f"it is in {data / 'train'}: prefix the entries with 'train/'" in msg
    assert not (tmp_path / 'out').exists()


def test_text_list_split_with_missing_files(demo_dataset, tmp_path):
    from loaders import ImageFolderDataset
    data = _copy(demo_dataset, tmp_path)
    _write_list(data / 'train' / 'list.txt', data, 'train')
    with open(data / 'train' / 'list.txt', 'a') as f:
        f.write('00_disk/gone.jpg\n01_square/also_gone.jpg\n')
    with pytest.raises(FileNotFoundError, match=f"2 of 26 listed files are not in {data / 'train'}, e.g. "
                                                "00_disk/gone.jpg, 01_square/also_gone.jpg"):
        ImageFolderDataset(data, 'train/list.txt')
    (data / 'train' / 'list.txt').write_text('00_disk/train_00_00000.jpg\n')  # a complete list still works
    assert len(ImageFolderDataset(data, 'train/list.txt')) == 1


# --- augmentation specs and the bad-image boundary ---------------------------------------------------------------

@pytest.mark.parametrize('spec, message', [
    ('bogus-string', "a RandAugment spec starts with 'rand-'"),
    ('rand-mfoo-zz3', "bad RandAugment section 'mfoo'"),
    ('augmix-m5', "AugMix 'augmix-...' policies are not implemented"),
    ('rand-m1.5', "RandAugment section 'm1.5' in 'rand-m1.5': m takes an integer"),
    ('rand-m9-tfoo', "unknown RandAugment op set 'foo'"),
])
def test_bad_aa_spec_is_one_line_listing_the_supported_specs(demo_dataset, tmp_path, spec, message, capsys):
    msg = _one_line_error(train.main, _argv(demo_dataset, tmp_path / 'out', '--aa', spec), capsys)
    assert msg.startswith(f"train.py: error: --aa '{spec}': ") and message in msg
    assert "supported: RandAugment specs 'rand-<section>-...'" in msg and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('extra, message', [
    (['--train-interpolation', 'lanczoz'], "--train-interpolation 'lanczoz' is not one of random, bilinear"),
    (['--remode', 'pixels'], "--remode 'pixels' is not one of pixel, rand, const"),
    (['--vflip', '1.5'], '--vflip must be a probability in [0, 1]'),
    (['--scale', '0.5', '0.1'], '--scale takes two values 0 < min <= max'),
])
def test_augmentation_values_checked_before_the_run(demo_dataset, tmp_path, extra, message, capsys):
    assert message in _one_line_error(train.main, _argv(demo_dataset, tmp_path / 'out', *extra), capsys)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('extra, message', [
    (['--torchcompile', 'foo', '--torchcompile-mode', 'bogus'], '--torchcompile foo is not a torch.compile backend; '
                                                                'valid: '),
    (['--torchcompile', 'foo', '--torchcompile-mode', 'bogus'], '--torchcompile-mode bogus is not a torch.compile '
                                                                'mode; valid: default, '),
    (['--torchcompile-mode', 'max-autotune'], '--torchcompile-mode has no effect without --torchcompile'),
    (['--seed', '-1'], '--seed must be in [0, 2**32)'),
    (['--opt', 'adamw', '--opt-betas', '0.9', '1.5'], '--opt-betas takes values in [0, 1)'),
    (['--momentum', '-1'], '--momentum must be >= 0'),
    (['--std', '0', '0', '0'], '--std must be > 0'),
])
def test_values_torch_rejects_late_are_checked_first(demo_dataset, tmp_path, extra, message, capsys):
    """Values torch.compile, the optimizers or the seeding would reject only once the run is under way."""
    assert message in _one_line_error(train.main, _argv(demo_dataset, tmp_path / 'out', *extra), capsys)
    assert not (tmp_path / 'out').exists()


def test_only_unreadable_files_are_bad_images(demo_dataset, monkeypatch):
    """A mistake in a setting or in the augmentation code propagates; it is never counted as corrupt images."""
    from augment import AugConfig
    from loaders import ImageFolderDataset, SeqLenSchedule
    from loaders.eval_loader import EvalImages
    from loaders.train_loader import StepDataset

    ds = ImageFolderDataset(demo_dataset, 'train')
    schedule = SeqLenSchedule(len(ds), (64,), 4 * 64, seed=0, rank=0, world_size=1, patch_sizes=[16])
    typo = StepDataset(ds, schedule, AugConfig(interpolation='lanczoz'), None, packing=True, seed=0)
    with pytest.raises(ValueError, match="unknown interpolation 'lanczoz'"):
        typo[(0, 0)]
    with pytest.raises(ValueError, match="unknown interpolation 'bicubik'"):
        EvalImages(ds, 64, 16, 'bicubik', False)[0]

    import augment.policy

    def broken(self, img, draws):
        raise ZeroDivisionError('a bug in an augmentation')

    monkeypatch.setattr(augment.policy.ImageAugment, 'apply', broken)
    with pytest.raises(ZeroDivisionError):
        StepDataset(ds, schedule, AugConfig(), None, packing=True, seed=0)[(0, 0)]


def test_library_loader_checks_the_augmentation(demo_dataset):
    from augment import AugConfig
    from loaders import create_train_loader
    with pytest.raises(ValueError, match="interpolation 'lanczoz' is not one of"):
        create_train_loader(demo_dataset, 'train', aug=AugConfig(interpolation='lanczoz'), seq_lens=(64,),
                            batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="interpolation 'random' is not one of"):
        from loaders import create_eval_loader
        create_eval_loader(demo_dataset, 'val', interpolation='random', num_workers=0)


# --- attention backends ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('extra, message', [
    (['--attn-backend', 'varlen'], '--attn-backend varlen needs a CUDA device and fp16/bf16 attention '
                                   '(--amp --amp-dtype bfloat16); backends that work on the CPU for training: '
                                   'auto, sdpa_dense, sdpa_padded'),
    (['--attn-backend', 'varlen', '--amp', '--amp-dtype', 'bfloat16'], 'varlen needs a CUDA device'),
    (['--attn-backend', 'varlen', '--device', 'cuda'], 'backends that work on CUDA in float32: auto, sdpa_dense, '
                                                      'sdpa_padded, flex'),
    (['--attn-backend', 'flex'], 'FlexAttention has no backward pass on the CPU'),
    (['--attn-backend', 'flex', '--device', 'cuda', '-b', '64', '--naflex-train-seq-lens', '1024'],
     '--attn-backend flex without --torchcompile runs eagerly and materialises a T x T score matrix per head: '
     'T = 65536 tokens per step x 4 heads = 64 GiB per layer'),
    (['--attn-backend', 'sdpa_dense', '--no-naflex-packing'], '--attn-backend sdpa_dense applies to packed batches: '
                                                              '--no-naflex-packing pads them'),
])
def test_attention_backend_checked_against_device_precision_and_layout(demo_dataset, tmp_path, extra, message,
                                                                      capsys):
    assert message in _one_line_error(train.main, _argv(demo_dataset, tmp_path / 'out', *extra), capsys)
    assert not (tmp_path / 'out').exists()


def test_compiled_flex_on_cuda_passes_the_check():
    from naflex.train.cli import parse_args
    parse_args(['--data-dir', 'x', '--model', MODEL, '--attn-backend', 'flex', '--torchcompile', '-b', '64',
                '--naflex-train-seq-lens', '1024'])  # no error: compiled FlexAttention never builds T x T


# --- validate.py ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('extra, message', [
    (['--naflex-max-seq-len', '0'], '--naflex-max-seq-len must be > 0'),
    (['--naflex-max-seq-len', '64', '-5', '0'], '--naflex-max-seq-len must be > 0'),
    (['-b', '0'], '-b/--batch-size must be >= 1'),
    (['-j', '-1'], '-j/--workers must be >= 0'),
    (['--num-classes', '0'], '--num-classes must be >= 1'),
    (['--device', 'tpu'], "--device tpu: use 'cuda' or 'cpu'"),
    (['--attn-backend', 'varlen', '--device', 'cpu'], '--attn-backend varlen needs a CUDA device and fp16/bf16 '
                                                      'attention (--amp --amp-dtype bfloat16); backends that work on '
                                                      'the CPU: auto, sdpa_dense, sdpa_padded, flex'),
    (['--attn-backend', 'flex', '-b', '256', '--naflex-max-seq-len', '576'], 'T = 147456 tokens per step'),
    (['--attn-backend', 'flex', '--padded'], '--attn-backend flex applies to packed batches: --padded pads them'),
    (['--model-kwargs', 'patch_size=0'], '--model-kwargs patch_size must be >= 1, got 0'),
])
def test_validate_checks_flags_before_reading_data(extra, message, capsys):
    # the dataset folder does not exist: a flag problem must be reported first, before anything is read
    msg = _one_line_error(validate.main, ['--data-dir', '/nonexistent/data', '--model', MODEL, *extra], capsys,
                          prog='validate.py')
    assert message in msg
    if message.startswith('--naflex'):
        assert msg.count('--naflex-max-seq-len must be > 0') == 1


def test_validate_checks_where_results_go_before_evaluating(tmp_path, capsys):
    (tmp_path / 'a_file').write_text('x')
    base = ['--data-dir', '/nonexistent/data', '--model', MODEL]
    assert f'--results-file {tmp_path}: is a folder' in _one_line_error(
        validate.main, base + ['--results-file', str(tmp_path)], capsys, prog='validate.py')
    assert f'--plot {tmp_path}/a_file/p.png: cannot be created: {tmp_path}/a_file is not a writable folder' in \
        _one_line_error(validate.main, base + ['--plot', f'{tmp_path}/a_file/p.png'], capsys, prog='validate.py')


def test_validate_split_not_found_is_not_mistaken_for_class_folders(demo_dataset, tmp_path, capsys):
    ckpt = str(_tiny_checkpoint(tmp_path / 'tiny.pth'))
    msg = _one_line_error(validate.main, ['--data-dir', str(demo_dataset), '--split', 'valx', '--model', MODEL,
                                          '--checkpoint', ckpt], capsys, prog='validate.py')
    assert f"split 'valx' not found under {demo_dataset} (it holds train, val: pass --split NAME)" in msg
    # a root that holds the class folders themselves is still used as it is
    row = validate.main(['--data-dir', str(demo_dataset / 'val'), '--model', MODEL, '-j', '0', '--checkpoint', ckpt,
                         '--naflex-max-seq-len', '16'])[0]
    assert row['images'] == 16


def _tiny_checkpoint(path, **meta):
    torch.manual_seed(0)
    model = __import__('naflex').create_model(MODEL, num_classes=4)
    torch.save(dict(meta, state_dict=model.state_dict()), path)
    return path


@pytest.mark.parametrize('meta', [{'arch': MODEL}, {'args': {'model': MODEL}}])
def test_validate_takes_the_model_name_from_the_checkpoint(demo_dataset, tmp_path, meta, capsys):
    ckpt = _tiny_checkpoint(tmp_path / 'c.pth', **meta)
    base = ['--data-dir', str(demo_dataset), '--checkpoint', str(ckpt), '-j', '0', '--naflex-max-seq-len', '32']
    row = validate.main(base)[0]
    assert row['model'] == MODEL and row['images'] == 16
    assert f'note: model {MODEL} (the name stored in {ckpt}' in capsys.readouterr().out
    assert validate.main(base + ['--model', MODEL])[0]['top1'] == row['top1']


def test_validate_without_a_stored_name_says_which_model_it_used(demo_dataset, tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / 'c.pth')  # plain state dict: no name in it
    with pytest.raises(SystemExit):
        validate.main(['--data-dir', str(demo_dataset), '--checkpoint', str(ckpt), '-j', '0'])
    out, err = capsys.readouterr()
    assert 'note: model naflexvit_base_patch16_gap (the default; pass --model to choose another)' in out
    assert 'does not fit the model naflexvit_base_patch16_gap' in err
    torch.save({'state_dict': torch.load(ckpt)['state_dict'], 'arch': 'no_such_model'}, ckpt)
    msg = _one_line_error(validate.main, ['--data-dir', str(demo_dataset), '--checkpoint', str(ckpt), '-j', '0'],
                          capsys, prog='validate.py')
    assert "unknown model 'no_such_model'" in msg and f'(the name stored in {ckpt})' in msg


# --- defaults and --help ------------------------------------------------------------------------------------------

def test_train_and_validate_defaults_agree():
    from naflex.train.cli import build_parser
    t = build_parser().parse_args([])
    v = validate.build_parser().parse_args([])
    assert v.amp_dtype == t.amp_dtype == 'float16'  # timm's train.py and validate.py default
    assert v.split == t.val_split == 'validation'  # 'val' and the other aliases are found for both
    assert v.naflex_max_seq_len == [t.naflex_max_seq_len] and v.workers == t.workers


@pytest.mark.parametrize('prog', ['train', 'validate'])
def test_help_shows_each_default_once_and_only_real_ones(prog):
    from naflex.train.cli import build_parser
    text = (build_parser() if prog == 'train' else validate.build_parser()).format_help()
    options = [' '.join(o.split()) for o in re.split(r'\n(?=  -)', text.split('options:', 1)[1])]
    assert len(options) > 20
    for option in options:
        assert option.count('(default') <= 1, option
        assert not re.search(r'\(default: (None|False|)\)', option), option


def test_class_order_of_a_run_and_of_a_resumed_one(demo_dataset, tmp_path):
    """A run's classes are in timm's order (or --class-map's); a resumed run keeps the order its checkpoint
    records, and a checkpoint written before checkpoints recorded names keeps sorted() order. A --class-map that
    disagrees with the resumed run is refused."""
    from naflex.train import build
    from naflex.train.cli import config_from_args, parse_args
    names = ['Apple', 'b9', 'b10', 'banana']  # timm's order; sorted() has b10 before b9
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        (data / split).mkdir(parents=True)
        for old, new in zip(sorted(os.listdir(demo_dataset / split)), names):
            os.symlink(demo_dataset / split / old, data / split / new)

    def classes(*flags, resume=None):
        cfg = config_from_args(parse_args(['--data-dir', str(data), '--val-split', 'val', *flags])[0])
        train_ds, val_ds = build.open_datasets(cfg, resume)
        assert val_ds.classes == train_ds.classes
        return train_ds.classes

    assert classes() == names
    assert classes(resume={'version': 2, 'train_state': {}}) == sorted(names)
    recorded = ['banana', 'Apple', 'b10', 'b9']
    assert classes(resume={'version': 3, 'train_state': {}, 'class_names': recorded}) == recorded
    (tmp_path / 'map.txt').write_text('b10\nApple\nb9\nbanana\n')
    assert classes('--class-map', str(tmp_path / 'map.txt')) == ['b10', 'Apple', 'b9', 'banana']
    with pytest.raises(build.UserError, match='orders the classes differently from the run being resumed'):
        classes('--class-map', str(tmp_path / 'map.txt'), resume={'class_names': recorded})
