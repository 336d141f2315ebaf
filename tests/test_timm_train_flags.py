"""timm train.py flags with timm's meaning: repeated augmentation, epoch length, --no-aug, jitter and blur
probabilities, head initialization, weight dtype, eval interpolation and subset, the positional data root."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

import loaders
import train
from augment.config import AugConfig
from augment.policy import ImageAugment
from loaders.pipeline import TrainSampleBuilder, eval_sample
from loaders.schedule import SeqLenSchedule
from naflex.train.cli import ConfigError, parse_config

TINY = ('--model naflexvit_tiny_test -b 4 -j 0 --device cpu --epochs 1 --warmup-epochs 0 '
        '--naflex-train-seq-lens 32 64 --naflex-max-seq-len 64 --log-interval 1').split()


def test_aug_repeats_sends_each_copy_to_another_rank_and_keeps_the_epoch_length():
    n, R, W = 40, 3, 4
    ranks = [SeqLenSchedule(n, (16,), 64, rank=r, world_size=W, repeats=R) for r in range(W)]
    per_rank = [list(zip(*[a.tolist() for a in s.epoch_indices(0)])) for s in ranks]
    assert all(len(p) == n // W for p in per_rank)  # the epoch keeps its length
    slots = [p[k] for k in range(n // W) for p in per_rank]  # the global stream, slot by slot
    for j in range(0, len(slots) - R + 1, R):  # R copies in a row, numbered 0..R-1, on R different ranks
        assert len({i for i, _ in slots[j:j + R]}) == 1 and [c for _, c in slots[j:j + R]] == list(range(R))
    assert len({i for i, _ in slots}) == -(-n // R)  # n / R distinct images per epoch
    steps = [st for s in ranks for st in s.steps(0)]
    assert sum(len(st.indices) for st in steps) == n


def test_train_num_samples_sets_the_epoch_length():
    short = SeqLenSchedule(50, (16,), 64, epoch_samples=20)
    idx0, copies0 = short.epoch_indices(0)
    idx1, _ = short.epoch_indices(1)
    assert len(idx0) == 20 and len(set(idx0.tolist())) == 20 and not copies0.any()
    assert set(idx0.tolist()) != set(idx1.tolist())  # another subset each epoch
    assert sum(len(st.indices) for st in short.steps(0)) == 20
    long_idx, long_copies = SeqLenSchedule(10, (16,), 64, epoch_samples=25).epoch_indices(0)
    assert sorted(np.bincount(long_idx).tolist()) == [2] * 5 + [3] * 5  # wraps around the shuffled order
    assert len(set(zip(long_idx.tolist(), long_copies.tolist()))) == 25  # each copy draws its own augmentation


def _image(tmp_path, size=(70, 45)):
    rng = np.random.default_rng(0)
    path = tmp_path / 'img.png'
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def test_no_aug_trains_on_the_eval_resize(tmp_path):
    path = _image(tmp_path)
    cfg = AugConfig(no_aug=True, interpolation='bicubic', aa='rand-m9-mstd0.5', reprob=1.0, hflip=1.0,
                    grayscale_prob=1.0, draft=False)
    builder = TrainSampleBuilder(cfg)
    out = [builder(path, 32, 8, random.Random(s)) for s in range(3)]
    expected = eval_sample(path, 32, 8, 'bicubic')
    assert all(torch.equal(o, expected) for o in out)
    assert builder.augment.erasing is None


def test_color_jitter_prob_and_gaussian_blur_prob(tmp_path):
    img = Image.open(_image(tmp_path)).convert('RGB')
    plain = ImageAugment(AugConfig(hflip=0, color_jitter=0))
    never = ImageAugment(AugConfig(hflip=0, color_jitter=0.4, color_jitter_prob=0.0))
    always = ImageAugment(AugConfig(hflip=0, color_jitter=0.4, color_jitter_prob=1.0))
    blur = ImageAugment(AugConfig(hflip=0, color_jitter=0, gaussian_blur_prob=1.0))
    arr = np.asarray
    assert np.array_equal(arr(never(img, random.Random(1))), arr(plain(img, random.Random(1))))
    assert not np.array_equal(arr(always(img, random.Random(1))), arr(img))
    blurred = arr(blur(img, random.Random(1))).astype(float)
    assert blurred.std() < arr(img).astype(float).std()  # noise image: blur lowers the variance


def test_val_num_samples_scores_the_first_images(demo_dataset):
    ds = loaders.open_dataset(demo_dataset, 'val')
    ld = loaders.make_eval_loader(ds, num_samples=5, batch_size=2, patch_size=16, num_workers=0)
    assert sum(int(t.shape[0]) for _, t in ld) == 5
    paths = [ld.dataset.dataset.path(i) for i in range(ld.dataset.lo, ld.dataset.hi)]
    assert paths == [ds.path(i) for i in range(5)]


def test_positional_data_root_and_flag_checks(demo_dataset):
    args, cfg = parse_config([str(demo_dataset)] + TINY)
    assert cfg.data.root == str(demo_dataset)
    with pytest.raises(ConfigError, match='--model-dtype bfloat16 with --amp: autocast needs float32'):
        parse_config(['--data-dir', str(demo_dataset), '--amp', '--model-dtype', 'bfloat16'] + TINY)
    with pytest.raises(ConfigError, match='--input-img-mode L: images are decoded to RGB'):
        parse_config(['--data-dir', str(demo_dataset), '--input-img-mode', 'L'] + TINY)
    with pytest.raises(ConfigError, match='--wandb-resume-id continues a wandb run: it goes with --resume'):
        parse_config(['--data-dir', str(demo_dataset), '--wandb-resume-id', 'abc'] + TINY)


class _Capture:
    def after_update(self, engine, state):
        self.engine = engine

    def after_epoch(self, state):
        return False


def test_head_init_model_dtype_and_interpolation_in_a_run(demo_dataset, tmp_path, caplog):
    """One short run: --head-init-scale 0 --head-init-bias 0.5 start the classifier at (0, 0.5); the bfloat16 weights
    train without autocast; --interpolation sets the eval resize."""
    from naflex.train import build
    args, cfg = parse_config(['--data-dir', str(demo_dataset), '--head-init-scale', '0', '--head-init-bias', '0.5',
                              '--interpolation', 'bilinear'] + TINY)
    model = build.build_model(cfg, 4)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.all(model.head.bias == 0.5)
    assert build.resolve_data_config(cfg, model).eval.interpolation == 'bilinear'
    hooks = _Capture()
    caplog.set_level('INFO', logger='train')
    train.main(['--data-dir', str(demo_dataset), '--val-split', 'val', '--model-dtype', 'bfloat16',
                '--train-num-samples', '8', '--val-num-samples', '6', '--output', str(tmp_path), '--experiment', 'bf16']
               + TINY, hooks=hooks)
    params = list(hooks.engine.module.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert '--model-dtype bfloat16: weights, gradients and optimizer state in bfloat16' in caplog.text
    assert 'epochs of 8 samples drawn from the 24' in caplog.text
    ckpt = torch.load(tmp_path / 'bf16' / 'last.pth', map_location='cpu', weights_only=True)
    assert ckpt['state_dict']['head.weight'].dtype == torch.bfloat16


def test_input_and_target_keys_name_shard_members_only(demo_dataset):
    """--input-key / --target-key (timm's) choose a tar shard's image and label members (tests/test_shards.py); on an
    image folder, whose labels are its class folders, they are one line."""
    from naflex.train import build
    _, cfg = parse_config(['--data-dir', str(demo_dataset), '--target-key', 'label'] + TINY)
    with pytest.raises(build.UserError, match='--target-key name members of tar shards; an image folder has none'):
        build.open_datasets(cfg)
