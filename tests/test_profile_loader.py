"""Stage hooks in the real train pipeline (augment.stages) and scripts/bench/profile_loader.py, which times through
them: a timed step is bit-identical to an untimed one, every stage reports, and the profiler runs the loader's own
StepDataset. NaViT arXiv:2307.06304 / SigLIP 2 arXiv:2502.14786 NaFlex data pipeline."""
import json

import pytest
import torch

import loaders
from augment.mixup import MixupConfig
from augment.policy import AugConfig
from augment.stages import StageTimer, stage
from loaders.train_loader import StepDataset
from repo_scripts import load_script

SAMPLE_STAGES = ['read + header', 'RRC params', 'decode', 'crop + resize', 'flip', 'RandAugment', 'jitter/grayscale']
STEP_STAGES = ['MixUp/CutMix', 'to uint8 tensor', 'random erasing', 'pack']


def _load():
    return load_script("scripts/bench/profile_loader.py")


def _loader(root, aug):
    return loaders.create_train_loader(root, "train", seq_lens=(16, 32, 64), batch_size=4, patch_size=8,
                                       num_workers=0, seed=3, aug=aug, mixup=MixupConfig(num_classes=0))


@pytest.mark.parametrize("aug", [
    AugConfig(aa="rand-m8-inc1-mstd1.0", grayscale_prob=0.5, reprob=0.5, vflip=0.5),
    AugConfig(grayscale_prob=0.3, interpolation="bicubic", reprob=0.5),  # colour-jitter path, no RandAugment
], ids=["randaugment", "jitter"])
def test_timed_steps_equal_untimed_steps(demo_dataset, aug):
    ld = _loader(demo_dataset, aug)
    untimed = ld.step_dataset
    assert untimed.timer is None and untimed.builder.augment.timer is None  # off unless asked for
    timer = StageTimer()
    timed = StepDataset(ld.dataset, ld.schedule, aug, untimed.mixup, packing=True, seed=3, timer=timer)
    num_images = 0
    for k in range(len(ld)):
        (ref, ref_t), (got, got_t) = untimed[(0, k)], timed[(0, k)]
        assert ref.keys() == got.keys() and torch.equal(ref_t, got_t)
        for key, v in ref.items():
            assert torch.equal(v, got[key]) if isinstance(v, torch.Tensor) else v == got[key], key
        num_images += len(ld.schedule.step(0, k).indices)
    expected = [s for s in SAMPLE_STAGES if s != 'RandAugment' or aug.aa] + STEP_STAGES
    assert list(timer.seconds) == expected and all(v > 0 for v in timer.seconds.values())
    per_sample = {s: num_images for s in SAMPLE_STAGES} | {'to uint8 tensor': num_images}
    per_step = {'MixUp/CutMix': len(ld), 'pack': len(ld)}
    for name, calls in timer.calls.items():
        if name in per_sample or name in per_step:
            assert calls == {**per_sample, **per_step}[name], name
        else:
            assert name == 'random erasing' and 0 < calls <= num_images  # only for the images it erases


def test_untimed_stage_is_one_shared_no_op():
    assert stage(None, 'decode') is stage(None, 'flip')
    with stage(None, 'decode'):
        pass


def test_profiler_runs_the_loaders_step_dataset(demo_dataset):
    """Given the loader's own steps, the profiler's StepDataset gives the loader's tokens (it is the same code)."""
    pl = _load()
    aug = AugConfig(aa="rand-m8-inc1-mstd1.0", grayscale_prob=0.1)
    ld = _loader(demo_dataset, aug)
    steps = [(s.seq_len, s.indices.tolist()) for s in ld.schedule.steps(0)]
    timer = StageTimer()
    tokens = pl.our_steps(ld.dataset, steps, 8, aug, ld.step_dataset.mixup, 3, timer)
    assert tokens == sum(int(x["seq_lens"].sum()) for x, _ in ld)
    assert set(SAMPLE_STAGES) <= set(timer.seconds)


def test_main_runs_both_pipelines(demo_dataset, tmp_path, capsys):
    pl = _load()
    out = tmp_path / "p.json"
    res = pl.main(["--data-dir", str(demo_dataset), "--naflex-train-seq-lens", "16", "32", "-b", "4",
                   "--patch-size", "8", "--cycles", "1", "--fraction", "1", "--no-jpeg-draft", "--repeats", "2",
                   "--json", str(out)])
    text = capsys.readouterr().out
    assert "| ours: stage | ms/image | % |" in text and "| timm: stage | ms/image | % |" in text
    assert "jpeg draft False" in text
    saved = json.loads(out.read_text())
    for kind in ("ours", "timm"):
        rec = saved["pipelines"][kind]
        assert rec["images"] > 0 and rec["valid_tokens"] > 0 and rec["untimed_ms_per_image"] > 0
        assert len(rec["runs_ms_per_image"]) == 2
        assert all(v >= 0 for v in rec["stages_s"].values())
    assert set(SAMPLE_STAGES) <= set(saved["pipelines"]["ours"]["stages_s"])
    from loaders.schedule import batch_size_for
    assert res["pipelines"]["ours"]["images"] == sum(max(2, batch_size_for(L, 4 * 32)) for L in (16, 32))
