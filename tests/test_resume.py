"""Resume: a run stopped mid-stage and continued in a new process equals the uninterrupted run, bitwise."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import tiny_llava

SCRIPT = Path(__file__).resolve().parent / "resume_run.py"


def run(tmp_path, *args):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_resumed_run_repeats_decisions_and_parameters_bitwise(tmp_path):
    # 6 steps per epoch: steps 0-5 alignment, 6-11 instruction; stop mid-instruction at step 8
    whole = run(tmp_path, 0, 11, "--save", "whole.pt")
    first = run(tmp_path, 0, 8, "--save", "part.pt")
    rest = run(tmp_path, 8, 11, "--load", "part.pt", "--save", "resumed.pt")
    assert first + rest == whole
    assert {entry[2] for entry in whole} == {"alignment", "instruction"} and any(entry[4] for entry in whole)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    uninterrupted = torch.load(tmp_path / "whole.pt", weights_only=True)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert resumed["schedule"] == uninterrupted["schedule"]
    tiny_llava.build_model().load_state_dict(resumed["model"], strict=True)  # the original class loads it
