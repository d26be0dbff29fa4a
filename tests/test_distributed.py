"""torchrun --nproc_per_node 2 on CPU (gloo): every rank skips the same blocks, gradients agree, nothing hangs."""

import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "distributed" / "train_worker.py"


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)  # a hang fails the test


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_ranks_agree_on_every_step(mode):
    result = torchrun("--steps", "8", *(["--fsdp"] if mode == "fsdp2" else []))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"RESULT ok mode={mode} steps=8 patterns=" in result.stdout
    assert int(result.stdout.split("patterns=")[1].split()[0]) >= 3  # a dense-free mix of stages and skip patterns


def test_the_check_catches_ranks_with_different_seeds():
    result = torchrun("--steps", "8", "--break-seed")
    assert result.returncode != 0
    assert "MISMATCH step 4: skip decisions differ between ranks" in result.stdout
