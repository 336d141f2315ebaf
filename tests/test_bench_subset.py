"""scripts/bench/make_bench_subset.py: the timm checkout is an argument, and without one the error says how to
get it before anything is copied."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
import make_bench_subset  # noqa: E402


def test_missing_checkout_says_how_to_get_one(demo_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        make_bench_subset.main([str(tmp_path / "nowhere"), "--src", str(demo_dataset),
                                "--bench-dir", str(tmp_path / "bench"), "--no-timm-wheel"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "git clone" in err and "github.com/huggingface/pytorch-image-models" in err
    assert "outside this repository" in err and "--no-timm-scripts" in err
    assert not (tmp_path / "bench").exists()  # stopped before copying


def test_checkout_as_argument(demo_dataset, tmp_path, capsys):
    checkout = tmp_path / "pytorch-image-models"
    (checkout / "timm").mkdir(parents=True)
    for name in ("train.py", "validate.py"):
        (checkout / name).write_text(f"# timm's {name}\n")
    (checkout / "timm" / "version.py").write_text("__version__ = '1.0.29.dev0'\n")
    bench = tmp_path / "bench"
    make_bench_subset.main([str(checkout), "--src", str(demo_dataset), "--bench-dir", str(bench), "--no-timm-wheel"])
    assert (bench / "timm_scripts" / "train.py").read_text() == "# timm's train.py\n"
    assert (bench / "timm_scripts" / "validate.py").is_file()
    assert sorted(p.name for p in (bench / "caltech_subset" / "train").iterdir()) == sorted(
        p.name for p in (demo_dataset / "train").iterdir())
    out = capsys.readouterr()
    assert "timm 1.0.29.dev0, not 1.0.31" in out.err and "limit 64 MiB" in out.out
