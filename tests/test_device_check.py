"""scripts/bench/device_check.sh's plan: the four key numbers first, and a budget that always reaches them."""
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "device_check.sh"
KEY_STEPS = ["cuda_tests", "eager", "compiled_ours", "compiled_timm"]
ENV_S, KILL_GRACE_S = 30, 15  # the env step's allowance; `timeout -k 15` after a step's limit


def gpu_steps():
    """[(name, limit_s, min_s)] of the GPU branch, in run order."""
    text = SCRIPT.read_text()
    branch = text[text.index('if [ "$MODE" = gpu ]; then\n        BM='):text.index("    else\n        BM=")]
    return [(m[1], int(m[2]), int(m[3])) for m in re.finditer(r"run_step (\w+) (\d+) (\d+) ", branch)]


def test_key_numbers_come_first_then_end_to_end():
    names = [name for name, _, _ in gpu_steps()]
    assert names[:5] == KEY_STEPS + ["e2e"]


def test_budget_reaches_compiled_timm_and_ends_within_540s():
    text = SCRIPT.read_text()
    budget = int(re.search(r'BUDGET_S="\$\{BUDGET_S:-(\d+)\}"; REPEAT', text)[1])
    steps = dict((name, (limit, low)) for name, limit, low in gpu_steps())
    before = ENV_S + sum(steps[s][0] for s in KEY_STEPS[:-1]) + KILL_GRACE_S
    assert budget - before >= steps["compiled_timm"][1]  # even if each earlier step runs to its limit
    assert budget + KILL_GRACE_S + 10 <= 540  # a step ended at the budget, then the summary and archive


def test_scripts_describe_how_to_run_them_in_shell_terms():
    """No tracker numbers or remote-call syntax in the scripts: they say what to run in a shell."""
    scripts = [p for p in SCRIPT.parents[1].rglob("*") if p.suffix in (".sh", ".py", ".md")]
    assert SCRIPT in scripts
    for p in scripts:
        text = p.read_text()
        assert not re.search(r"(?i)\bissue #?\d+|\brun\(command=|\bcarry=\[|timeout_s=", text), p
    assert "timeout 540 bash scripts/bench/device_check.sh" in SCRIPT.read_text()
