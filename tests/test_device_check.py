"""scripts/bench/device_check.sh: runs from the repository alone, the key numbers fit one call of 420 s, and the
CPU dry run's plumbing (data, a benchmark step, the summary) works end to end."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench" / "device_check.sh"
KEY_STEPS = ["data", "cuda_tests", "eager", "compiled", "loader", "e2e"]
ENV_S, KILL_GRACE_S, SUMMARY_S = 20, 5, 10  # env_info's allowance; `timeout -k 5`; summary + archive


def gpu_limits():
    """The GPU branch's per-step limits of the key set, in run order."""
    text = SCRIPT.read_text()
    return [int(x) for x in re.search(r"local L=\(([\d ]+)\)", text)[1].split()]


def test_key_steps_run_in_order_each_under_its_own_limit():
    text = SCRIPT.read_text()
    key = text[text.index('if [ "$SET" = key ]; then'):text.index("    else\n        # limits: data + 130")]
    names = ["data"] + re.findall(r"run_step (\w+) ", key)
    assert names == KEY_STEPS
    assert re.findall(r'"\$\{L\[(\d)\]\}"', key) == ["1", "2", "3", "4", "5"]  # each step its own limit


def test_key_numbers_fit_one_call_of_420s():
    """Even if every step runs to its limit, they all get their time and the call ends within 420 s."""
    text = SCRIPT.read_text()
    budget = int(re.search(r'BUDGET_S="\$\{BUDGET_S:-(\d+)\}"; REPEAT', text)[1])
    limits = gpu_limits()
    assert len(limits) == len(KEY_STEPS) and sum(limits) <= budget
    assert ENV_S + budget + KILL_GRACE_S + SUMMARY_S <= 420


def test_needs_nothing_prepared():
    """No hand-made folders, no timm checkout, no network: the data is generated, timm comes from its package."""
    text = SCRIPT.read_text()
    for gone in ("caltech_subset", "timm_scripts", "bench/wheels", "make_bench_subset", "../shared", "pip download"):
        assert gone not in text, gone
    assert "make_bench_data.py" in text and "bench_e2e.sh $D" in text
    e2e = (REPO / "scripts" / "bench" / "bench_e2e.sh").read_text()
    assert 'TIMM_TRAIN="$PWD/scripts/bench/timm_train.py"' in e2e


def test_scripts_describe_how_to_run_them_in_shell_terms():
    """No tracker numbers or remote-call syntax in the scripts: they say what to run in a shell."""
    scripts = [p for p in SCRIPT.parents[1].rglob("*") if p.suffix in (".sh", ".py", ".md")]
    assert SCRIPT in scripts
    for p in scripts:
        text = p.read_text()
        assert not re.search(r"(?i)\bissue #?\d+|\brun\(command=|\bcarry=\[|timeout_s=", text), p
    assert "timeout 430 bash scripts/bench/device_check.sh" in SCRIPT.read_text()


@pytest.mark.slow
def test_cpu_smoke_data_and_eager_steps(tmp_path):
    """The CPU dry run restricted to two steps: data is generated, the eager benchmark runs ours and timm's,
    the summary lists both steps ok and the train-step table, results land in OUT (~40 s)."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), RUN_ROOT=str(tmp_path / "runs"), ONLY="eager", PYTHON=sys.executable,
               IMAGES="16")
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert re.search(r"\| data \| ok \|", summary) and re.search(r"\| eager \| ok \|", summary), summary
    assert "| ours_packed eager |" in summary and "ratio ours_packed eager / timm_padded eager" in summary
    assert (out / "bench_model_eager.json").is_file() and (out / "results.tar.gz").is_file()
    assert len(list(out.iterdir())) <= 8
