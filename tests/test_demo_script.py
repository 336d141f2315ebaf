"""scripts/demo.sh stays runnable: valid bash, and its train.py / validate.py flags parse with the current CLIs.

(The full demo takes minutes; this catches flag drift in milliseconds. The demo's measured accuracy is in the
script header and the README.)
"""
import re
import shlex
import subprocess
from pathlib import Path

import validate
from naflex.train.cli import parse_args

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"
SUBST = {'"$DATA"': "demo_data", '"$DEVICE"': "cpu", '"${AMP[@]}"': "", '"$EPOCHS"': "15", '"$OUTPUT"': "output",
         '"$EXPERIMENT"': "demo-x", '"$RUN/last.pth"': "output/demo-x/last.pth",
         '"$RUN/validate.csv"': "output/demo-x/validate.csv"}


def _command_args(script: str, name: str) -> list:
    m = re.search(r'"\$PY" ' + re.escape(name) + r' (.*?)(?<!\\)\n', script, re.S)
    assert m, f"{name} call not found in demo.sh"
    text = m.group(1).replace("\\\n", " ")
    for k, v in SUBST.items():
        text = text.replace(k, v)
    assert "$" not in text, text
    return shlex.split(text)


def test_demo_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(DEMO)], check=True)


def test_demo_flags_parse():
    script = DEMO.read_text()
    args, _ = parse_args(_command_args(script, "train.py"))
    assert args.model == "naflexvit_tiny_test" and args.aa == "rand-m8-inc1-mstd1.0"
    assert args.mixup == 0.8 and args.cutmix == 1.0 and args.grayscale_prob == 0.1 and args.opt == "nadamw"
    vargs = validate.build_parser().parse_args(_command_args(script, "validate.py"))
    assert vargs.naflex_max_seq_len == [64, 144] and vargs.checkpoint.endswith("last.pth")
