"""scripts/bench/profile_loader.py: its stage-by-stage copy of our pipeline computes exactly what the loader computes
(so its per-stage times describe the real loader), and the script runs end to end on a tiny folder.
NaViT arXiv:2307.06304 / SigLIP 2 arXiv:2502.14786 NaFlex data pipeline."""
import importlib.util
import json
import random
from pathlib import Path

import torch

from augment.mixup import MixupConfig
from augment.policy import AugConfig, ImageAugment
from loaders.dataset import ImageFolderDataset
from loaders.pipeline import TrainSampleBuilder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "profile_loader.py"


def _load():
    spec = importlib.util.spec_from_file_location("profile_loader", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_staged_sample_equals_train_sample_builder(demo_dataset):
    pl = _load()
    ds = ImageFolderDataset(demo_dataset, "train")
    clock = pl._ResizeClock()
    try:
        for cfg in (AugConfig(aa="rand-m8-inc1-mstd1.0", grayscale_prob=0.5),
                    AugConfig(grayscale_prob=0.3, interpolation="bicubic")):  # colour-jitter path, no RA
            builder, augment = TrainSampleBuilder(cfg), ImageAugment(cfg)
            timer = pl.StageTimer()
            for i in range(len(ds)):
                L = (16, 32, 64)[i % 3]
                ref = builder(ds.path(i), L, 8, random.Random(f"k/{i}"))
                got = pl.our_sample(ds.path(i), L, 8, augment, random.Random(f"k/{i}"), timer, clock)
                assert torch.equal(got, ref), ds.path(i)
            assert timer.s["RRC resize"] > 0 and timer.s["decode (JPEG draft)"] > 0
    finally:
        clock.restore()
    from PIL import Image
    assert Image.Image.resize is clock._orig  # the timing shim is removed


def test_staged_step_equals_step_dataset(demo_dataset):
    """Batch stages (MixUp/CutMix + pack) with the per-slot RNGs give the loader's exact step."""
    import loaders
    pl = _load()
    aug = AugConfig(aa="rand-m8-inc1-mstd1.0", grayscale_prob=0.1)
    ld = loaders.create_train_loader(demo_dataset, "train", seq_lens=(16, 32), batch_size=4, patch_size=8,
                                     num_workers=0, seed=3, aug=aug, mixup=MixupConfig(num_classes=0))
    step = ld.schedule.step(0, 0)
    ref, _ = ld.step_dataset[(0, 0)]
    timer = pl.StageTimer()
    clock = pl._ResizeClock()
    try:
        samples = [ld.dataset[i] for i in step.indices.tolist()]
        tokens = pl.our_step(samples, step.seq_len, 8, ImageAugment(aug), ld.step_dataset.mixup, 3, 0, timer, clock)
    finally:
        clock.restore()
    assert tokens == int(ref["seq_lens"].sum())
    assert {"MixUp/CutMix", "patchify + collate (pack)"} <= set(timer.s)


def test_main_runs_both_pipelines(demo_dataset, tmp_path, capsys):
    pl = _load()
    out = tmp_path / "p.json"
    res = pl.main(["--data-dir", str(demo_dataset), "--naflex-train-seq-lens", "16", "32", "-b", "4",
                   "--patch-size", "8", "--cycles", "1", "--fraction", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| ours: stage | ms/image | % |" in text and "| timm: stage | ms/image | % |" in text
    saved = json.loads(out.read_text())
    for kind in ("ours", "timm"):
        rec = saved["pipelines"][kind]
        assert rec["images"] > 0 and rec["valid_tokens"] > 0 and rec["whole_call_ms_per_image"] > 0
        assert all(v >= 0 for v in rec["stages_s"].values())
    from loaders.schedule import batch_size_for
    assert res["pipelines"]["ours"]["images"] == sum(max(2, batch_size_for(L, 4 * 32)) for L in (16, 32))
