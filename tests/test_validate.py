"""validate.py and naflex.train.evaluate end to end on the generated demo images with a tiny model.

- per-image logits equal timm's NaFlex validate pipeline (timm eval transform + NaFlexCollator + timm model
  holding the same weights);
- packed and padded batches give the same metrics;
- torchrun with 2 gloo processes on an odd number of images counts each image exactly once;
- our / timm checkpoint formats (plain, training state, EMA, timm .pth with args, .safetensors) load;
- one-line errors, bad image files counted, results files and the sweep.
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import naflex
import validate
from loaders import ImageFolderDataset, make_eval_loader
from loaders.demo_data import make_demo_dataset
from naflex.train.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
MODEL = "naflexvit_tiny_test"


def timm_twin(model, name=MODEL):
    """timm's NaFlexVit with our variant's config (every shared NaFlexVitCfg field) and our weights."""
    import timm
    from timm.models.naflexvit import NaFlexVitCfg as TimmCfg

    timm_fields = {f.name for f in dataclasses.fields(TimmCfg)}
    kw = {k: v for k, v in dataclasses.asdict(naflex.get_config(name)).items() if k in timm_fields}
    tm = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, num_classes=model.num_classes, **kw)
    tm.load_state_dict(model.state_dict(), strict=True)
    return tm.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-class tiny model with non-trivial weights, saved as our training-state checkpoint."""
    torch.manual_seed(0)
    model = naflex.create_model(MODEL, num_classes=4)
    with torch.no_grad():  # bigger head so logits spread and top-1 is not a tie-break artefact
        model.head.weight.mul_(50)
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 1, "optimizer": {}}, path)
    return model.eval(), path


def _our_logits(model, split_dir, seq_len, packing, bs=5):
    ds = ImageFolderDataset(split_dir, "")
    loader = make_eval_loader(ds, max_seq_len=seq_len, batch_size=bs, patch_size=16, num_workers=0,
                              packing=packing)
    cfg = model.pretrained_cfg
    return evaluate(model, loader, "cpu", mean=cfg["mean"], std=cfg["std"], collect_logits=True)


def _timm_logits(model, split_dir, seq_len):
    """timm validate.py --naflex-loader: eval transform + NaFlexCollator (padded to L) + timm model."""
    from timm.data import ImageDataset, create_naflex_loader

    cfg = model.pretrained_cfg
    tds = ImageDataset(str(split_dir))
    tloader = create_naflex_loader(tds, patch_size=16, max_seq_len=seq_len, batch_size=5, is_training=False,
                                   interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                                   num_workers=0, use_prefetcher=False, device="cpu", pin_memory=False,
                                   persistent_workers=False)
    tm = timm_twin(model)
    logits, targets = [], []
    with torch.no_grad():
        for inputs, target in tloader:
            logits.append(tm(inputs))
            targets.append(target)
    return torch.cat(logits), torch.cat(targets)


@pytest.mark.parametrize("seq_len", [16, 64, 144])
def test_logits_match_timm_validate_pipeline(demo_dataset, tiny, seq_len):
    model, _ = tiny
    ours = _our_logits(model, demo_dataset / "val", seq_len, packing=True)
    ref, ref_t = _timm_logits(model, demo_dataset / "val", seq_len)
    assert ours["images"] == len(ref_t) == 16
    assert torch.equal(ours["targets"], ref_t)
    torch.testing.assert_close(ours["logits"], ref, atol=2e-4, rtol=1e-4)
    top1_ref = (ref.argmax(-1) == ref_t).float().mean().item() * 100
    assert ours["top1"] == pytest.approx(top1_ref)


def test_exif_rotated_files_score_like_timm(tiny, tmp_path, monkeypatch):
    """timm applies no EXIF orientation: by default neither do we, so rotated files get timm's logits;
    validate.py --exif-orientation turns them upright (other logits)."""
    import numpy as np
    from PIL import Image

    import loaders
    model, ckpt = tiny
    rng = np.random.default_rng(0)
    for i, tag in enumerate((6, 8, 3, 6)):
        d = tmp_path / "val" / f"c{i}"  # the model's 4 classes, one rotated file each
        d.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        exif[0x0112] = tag
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 90, 3), dtype=np.uint8)).save(d / f"{i}.jpg", exif=exif)
    ours = _our_logits(model, tmp_path / "val", 64, packing=True)
    ref, _ = _timm_logits(model, tmp_path / "val", 64)
    torch.testing.assert_close(ours["logits"], ref, atol=2e-4, rtol=1e-4)
    ds = ImageFolderDataset(tmp_path / "val", "")
    upright = evaluate(model, make_eval_loader(ds, max_seq_len=64, batch_size=5, patch_size=16, num_workers=0,
                                              exif_orientation=True), "cpu", mean=model.pretrained_cfg["mean"],
                       std=model.pretrained_cfg["std"], collect_logits=True)
    assert not torch.allclose(upright["logits"], ref, atol=1e-2)
    seen = []
    real = loaders.make_eval_loader
    monkeypatch.setattr(loaders, "make_eval_loader",
                        lambda *a, **k: seen.append(k["exif_orientation"]) or real(*a, **k))
    base = ["--data-dir", str(tmp_path), "--model", MODEL, "--checkpoint", str(ckpt), "-j", "0",
            "--naflex-max-seq-len", "64"]
    validate.main(base)
    validate.main(base + ["--exif-orientation"])
    assert seen == [False, True]


def test_packed_equals_padded(demo_dataset, tiny):
    model, _ = tiny
    packed = _our_logits(model, demo_dataset / "val", 64, packing=True)
    padded = _our_logits(model, demo_dataset / "val", 64, packing=False)
    torch.testing.assert_close(packed["logits"], padded["logits"], atol=1e-4, rtol=1e-4)
    for k in ("top1", "top5", "images", "valid_tokens"):
        assert packed[k] == padded[k], k
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)


def test_cli_results_files_and_sweep(demo_dataset, tiny, tmp_path, capsys):
    _, ckpt = tiny
    base = ["--data-dir", str(demo_dataset), "--model", MODEL, "--checkpoint", str(ckpt), "-j", "0", "-b", "7",
            "--naflex-loader"]
    rows = validate.main(base + ["--naflex-max-seq-len", "16", "64", "16", "--results-file", str(tmp_path / "r.csv")])
    out = capsys.readouterr().out
    assert [r["seq_len"] for r in rows] == [16, 64]  # a repeated length is scored once
    assert [r["ema"] for r in rows] == [False, False]  # --use-ema is recorded with each row
    assert "seq_len    16: top1" in out and "valid tok/s" in out
    text = (tmp_path / "r.csv").read_text().splitlines()
    assert text[0].startswith("model,checkpoint,ema,seq_len,top1,top5,loss,images")
    assert "date" in text[0] and len(text) == 3 and str(ckpt) in text[1]
    # matplotlib is a dependency: several lengths always give the sweep picture next to the results file
    assert f"plot written to {tmp_path / 'r.png'}" in out
    with Image.open(tmp_path / "r.png") as png:
        assert png.format == "PNG" and png.width > 300
    rows_json = validate.main(base + ["--naflex-max-seq-len", "64", "--results-file", str(tmp_path / "r.json"),
                                      "--padded"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved[0]["seq_len"] == 64 and saved[0]["packed"] is False and saved[0]["model"] == MODEL
    assert saved[0]["top1"] == rows[1]["top1"] and saved[0]["images"] == 16 == rows_json[0]["images"]


def test_checkpoint_formats_and_ema(demo_dataset, tiny, tmp_path):
    from safetensors.torch import save_file

    model, ckpt = tiny
    other = naflex.create_model(MODEL, num_classes=4)
    sd = model.state_dict()
    # our training state with EMA weights = model, plain weights = another model
    torch.save({"state_dict": other.state_dict(), "state_dict_ema": sd}, tmp_path / "ema.pth")
    # timm's train.py checkpoint: args Namespace, DDP prefixes
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "args": argparse.Namespace(lr=1.0),
                "arch": MODEL}, tmp_path / "timm.pth.tar")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    torch.save(sd, tmp_path / "plain.pth")
    base = ["--data-dir", str(demo_dataset), "--model", MODEL, "-j", "0", "--naflex-max-seq-len", "36"]
    ref = validate.main(base + ["--checkpoint", str(ckpt)])[0]
    for extra in (["--checkpoint", str(tmp_path / "ema.pth"), "--use-ema"],
                  ["--checkpoint", str(tmp_path / "timm.pth.tar")],
                  ["--checkpoint", str(tmp_path / "model.safetensors")],
                  ["--checkpoint", str(tmp_path / "plain.pth"), "--num-classes", "4"]):
        r = validate.main(base + extra)[0]
        assert (r["top1"], r["loss"]) == (ref["top1"], ref["loss"]), extra
    no_ema = validate.main(base + ["--checkpoint", str(tmp_path / "ema.pth")])[0]
    assert no_ema["loss"] != ref["loss"]
    assert validate.main(base + ["--checkpoint", str(tmp_path / "ema.pth"), "--use-ema"])[0]["ema"] is True


def test_use_ema_without_ema_weights_is_one_line(demo_dataset, tiny, capsys):
    _, ckpt = tiny  # plain weights only
    with pytest.raises(SystemExit):
        validate.main(["--data-dir", str(demo_dataset), "--model", MODEL, "-j", "0", "--use-ema",
                       "--checkpoint", str(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no EMA weights" in err[0]


@pytest.mark.parametrize("extra, message", [
    (["--model", "naflexvit_nope"], "unknown model 'naflexvit_nope'; valid: "),
    (["--checkpoint", "/nonexistent/x.pth"], "checkpoint file not found: /nonexistent/x.pth"),
    (["--checkpoint", "CKPT", "--num-classes", "10"], "class-count mismatch: --num-classes 10 but CKPT has a 4-class "
                                                      "head"),
    (["--data-dir", "/nonexistent/data"], "dataset folder not found: /nonexistent/data"),
    (["--pretrained"], "naflexvit_tiny_test has no published weights (those that do: "),
    ([], "naflexvit_tiny_test has no published weights (those that do: "),  # timm: no checkpoint = published weights
    (["--model", "hf-hub:other/naflexvit_tiny_test"], "hf-hub:other/naflexvit_tiny_test: of the Hugging Face Hub only "
                                                      "the timm/ repositories of "),
])
def test_one_line_errors(demo_dataset, tiny, extra, message, capsys):
    extra = [str(tiny[1]) if e == "CKPT" else e for e in extra]
    message = message.replace("CKPT", str(tiny[1]))
    args = ["--data-dir", str(demo_dataset), "--model", MODEL, "-j", "0", "--naflex-max-seq-len", "16"] + extra
    with pytest.raises(SystemExit) as e:
        validate.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("validate.py: error: ") and message in err[0]


def test_cuda_asked_but_absent_is_one_neutral_line(demo_dataset, tiny, capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    _, ckpt = tiny
    with pytest.raises(SystemExit):
        validate.main(["--data-dir", str(demo_dataset), "--model", MODEL, "-j", "0", "--checkpoint", str(ckpt),
                       "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "pass --device cpu to run on the CPU" in err[0]


def test_checkpoint_class_mismatch(demo_dataset, tmp_path, capsys):
    torch.save({"state_dict": naflex.create_model(MODEL, num_classes=7).state_dict()}, tmp_path / "c7.pth")
    with pytest.raises(SystemExit):
        validate.main(["--data-dir", str(demo_dataset), "--model", MODEL, "-j", "0",
                       "--checkpoint", str(tmp_path / "c7.pth")])
    err = capsys.readouterr().err
    assert "class-count mismatch: the dataset has 4 classes but the model has 7 outputs" in err


def test_bad_files_reported_and_counted(demo_dataset, tiny, tmp_path, capsys):
    _, ckpt = tiny
    root = tmp_path / "data"
    shutil.copytree(demo_dataset / "val", root / "val")
    (root / "val" / "01_square" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "val" / "02_triangle" / "zz_empty.jpg").write_bytes(b"")
    r = validate.main(["--data-dir", str(root), "--model", MODEL, "--checkpoint", str(ckpt), "-j", "0",
                       "-b", "4", "--naflex-max-seq-len", "16"])[0]
    assert r["images"] == 16 and r["bad_files"] == 2
    err = capsys.readouterr().err
    assert "zz_broken.jpg" in err and "zz_empty.jpg" in err


def test_torchrun_two_gloo_processes_odd_images(tiny, tmp_path):
    _, ckpt = tiny
    root = make_demo_dataset(tmp_path / "odd", num_classes=4, per_class=0, val_per_class=3, seed=3,
                             min_size=24, max_size=80)
    (root / "val" / "03_cross" / "val_03_00002.jpg").unlink()  # 11 images: shards of 5 and 6
    args = ["--data-dir", str(root), "--model", MODEL, "--checkpoint", str(ckpt), "-j", "0", "-b", "2",
            "--device", "cpu", "--naflex-max-seq-len", "36"]
    single = validate.main(args)[0]
    assert single["images"] == 11
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "validate.py")] + args + ["--results-file", str(tmp_path / "dist.json")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    (row,) = json.loads((tmp_path / "dist.json").read_text())
    assert row["world_size"] == 2 and row["images"] == 11
    assert row["top1"] == single["top1"] and row["top5"] == single["top5"]
    assert row["loss"] == pytest.approx(single["loss"], abs=1e-4)


def _renamed_split(demo_dataset, root, names, split="val"):
    """The demo split with its class folders renamed to ``names`` (in the demo's class order; symlinks)."""
    (root / split).mkdir(parents=True)
    for old, new in zip(sorted(os.listdir(demo_dataset / split)), names):
        os.symlink(demo_dataset / split / old, root / split / new)
    return root


# timm's (natural) order keeps these as listed; sorted() swaps b9 and b10
NAMES = ["Apple", "b9", "b10", "banana"]


def _with_head_order(state, order):
    """The same model with its classifier rows in another class order: row i becomes the class ``order[i]``."""
    out = dict(state)
    out["head.weight"], out["head.bias"] = state["head.weight"][order], state["head.bias"][order]
    return out


def test_checkpoint_class_names_map_by_name(demo_dataset, tiny, tmp_path, capsys):
    """A checkpoint records its class names; validate.py reads the dataset in that order, so the same model with
    its classes in another order (a class map, or an older checkpoint's sorted() order) scores the same. Without
    the names it would be scored against permuted labels."""
    model, _ = tiny
    data = _renamed_split(demo_dataset, tmp_path / "data", NAMES)
    sd = model.state_dict()
    order = [3, 1, 0, 2]
    ckpts = {
        "natural": {"state_dict": sd, "class_names": NAMES, "version": 3, "train_state": {}},
        "recorded": {"state_dict": _with_head_order(sd, order), "class_names": [NAMES[i] for i in order],
                     "version": 3, "train_state": {}},
        "legacy_sorted": {"state_dict": _with_head_order(sd, [NAMES.index(n) for n in sorted(NAMES)]),
                          "version": 2, "train_state": {}},
        "unnamed": {"state_dict": _with_head_order(sd, order)},  # timm's or a plain file: timm's order
    }
    rows = {}
    for key, ckpt in ckpts.items():
        torch.save(ckpt, tmp_path / f"{key}.pth")
        rows[key] = validate.main(["--data-dir", str(data), "--model", MODEL, "-j", "0", "--naflex-max-seq-len",
                                   "36", "--checkpoint", str(tmp_path / f"{key}.pth")])[0]
    ref = (rows["natural"]["top1"], rows["natural"]["loss"])
    assert (rows["recorded"]["top1"], rows["recorded"]["loss"]) == ref
    assert (rows["legacy_sorted"]["top1"], rows["legacy_sorted"]["loss"]) == ref
    assert rows["unnamed"]["loss"] != ref[1]
    assert "written before checkpoints recorded class names, with classes in sorted() order" in capsys.readouterr().out
    # --class-map (timm's file) says the order where the checkpoint does not
    (tmp_path / "map.txt").write_text("".join(NAMES[i] + "\n" for i in order))
    mapped = validate.main(["--data-dir", str(data), "--model", MODEL, "-j", "0", "--naflex-max-seq-len", "36",
                            "--checkpoint", str(tmp_path / "unnamed.pth"), "--class-map", str(tmp_path / "map.txt")])
    assert (mapped[0]["top1"], mapped[0]["loss"]) == ref


def test_class_folder_unknown_to_the_checkpoint_is_one_line(demo_dataset, tiny, tmp_path, capsys):
    data = _renamed_split(demo_dataset, tmp_path / "data", ["Apple", "b9", "b10", "kiwi"])
    torch.save({"state_dict": tiny[0].state_dict(), "class_names": NAMES}, tmp_path / "c.pth")
    with pytest.raises(SystemExit):
        validate.main(["--data-dir", str(data), "--model", MODEL, "-j", "0", "--checkpoint", str(tmp_path / "c.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 class folders of the dataset are not among the 4 classes" in err[0] and "kiwi" in err[0]


def test_bulk_validation_of_a_checkpoint_folder(demo_dataset, tiny, tmp_path, capsys):
    """--checkpoint FOLDER, as timm's validate.py: every *.pth / *.pth.tar in it with --model, one results file,
    rows by top-1; a file that does not load is one error line and the others go on."""
    model, ckpt = tiny
    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copy(ckpt, folder / "epoch-10.pth")
    torch.manual_seed(5)
    torch.save({"state_dict": naflex.create_model(MODEL, num_classes=4).state_dict()}, folder / "epoch-2.pth.tar")
    (folder / "broken.pth").write_bytes(b"not a checkpoint")
    (folder / "notes.txt").write_text("not a checkpoint either")
    out = tmp_path / "bulk.csv"
    rows = validate.main(["--data-dir", str(demo_dataset), "--model", MODEL, "-j", "0", "--naflex-max-seq-len", "36",
                          "--checkpoint", str(folder), "--results-file", str(out)])
    assert sorted(Path(r["checkpoint"]).name for r in rows) == ["epoch-10.pth", "epoch-2.pth.tar"]
    assert [r["top1"] for r in rows] == sorted((r["top1"] for r in rows), reverse=True)
    assert len(out.read_text().strip().splitlines()) == 3  # header + one row per checkpoint
    captured = capsys.readouterr()
    assert "bulk validation of 3 runs:" in captured.out and captured.out.index("epoch-2.pth.tar") < captured.out.index(
        "epoch-10.pth")  # natural order
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"validate.py: error ({folder / 'broken.pth'}): ")


@pytest.mark.parametrize("extra, message", [
    (["--img-size", "224"], "--img-size is timm's flag but does not apply here: NaFlex has no fixed image size"),
    (["--num-gpu", "2"], "--num-gpu is timm's flag but does not apply here: DataParallel is not used: torchrun"),
    (["--tf-preprocessing"], "--tf-preprocessing is timm's flag but does not apply here"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag (see validate.py --help)"),
    (["--model-dtype", "bfloat16", "--amp"], "--model-dtype bfloat16 with --amp: autocast runs float32 weights"),
])
def test_timm_flags_that_do_not_apply_are_one_line(demo_dataset, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        validate.main(["--data-dir", str(demo_dataset), "--model", MODEL, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_timm_eval_flags_have_timms_meaning(demo_dataset, tiny):
    """--model-dtype (weights and inputs in that dtype), --gp, --mean/--std and --interpolation change what is
    scored; --channels-last, --reparam, --pin-mem, --seed are accepted with timm's meaning (no effect here)."""
    _, ckpt = tiny
    base = ["--data-dir", str(demo_dataset), "--model", MODEL, "-j", "0", "--naflex-max-seq-len", "36",
            "--checkpoint", str(ckpt)]
    ref = validate.main(base)[0]
    same = validate.main(base + ["--channels-last", "--reparam", "--pin-mem", "--seed", "7"])[0]
    assert (same["top1"], same["loss"]) == (ref["top1"], ref["loss"])
    bf16 = validate.main(base + ["--model-dtype", "bfloat16"])[0]
    assert bf16["loss"] != ref["loss"] and abs(bf16["loss"] - ref["loss"]) < 0.05 * abs(ref["loss"]) + 0.05
    for extra in (["--gp", "max"], ["--mean", "0.4", "0.4", "0.4"], ["--interpolation", "nearest"]):
        assert validate.main(base + extra)[0]["loss"] != ref["loss"], extra
    assert ref["images"] == 16 and validate.main(base + ["--num-samples", "5"])[0]["images"] == 5


def test_retry_halves_the_batch_on_out_of_memory():
    calls = []

    def evaluate_at(seq_len, batch_size):
        calls.append(batch_size)
        if batch_size > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"top1": 1.0}

    assert validate._with_retry(evaluate_at, 576, 64, retry=True) == {"top1": 1.0} and calls == [64, 32, 16, 8]
    with pytest.raises(validate.ValidateError, match="out of device memory at sequence length 576 with -b 64: "
                                                     "lower -b .or pass --retry."):
        validate._with_retry(evaluate_at, 576, 64, retry=False)


def test_docs_list_every_timm_validate_flag_as_the_parser_treats_it():
    """docs/training.md's table of timm's validate.py flags is the parser's: every timm flag is declared here,
    honoured or refused with its reason, and the table says which."""
    from naflex.train.timm_flags import TIMM_VALIDATE_FLAGS, flag_table
    parser = validate.build_parser()
    declared = {s for a in parser._actions for s in (a.option_strings or [a.dest])}
    assert not [f for f in TIMM_VALIDATE_FLAGS if f not in declared]
    docs = (REPO / "docs" / "training.md").read_text()
    start = docs.index("<!-- validate.py flags: generated by naflex.train.timm_flags.flag_table -->\n")
    end = docs.index("\n<!-- end of validate.py flags -->")
    assert docs[docs.index("\n", start) + 1:end] == flag_table(parser, TIMM_VALIDATE_FLAGS)
