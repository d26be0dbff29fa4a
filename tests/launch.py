"""Run a script on 2 CPU ranks (gloo) with ``torchrun``; the engine tests' launcher."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "train_worker.py"


def torchrun(script: Path, *args: str, timeout: int = 150) -> subprocess.CompletedProcess:
    """``script`` on 2 ranks; a hang fails (the worker also dumps its stacks and exits after 100 s)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # DeepSpeed on the CPU, whatever the machine has
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def train(engine: str, *args: str) -> str:
    """Run the training worker under ``engine``; return rank 0's output, after checking that it passed."""
    result = torchrun(WORKER, "--engine", engine, *args)
    assert result.returncode == 0 and "RESULT ok" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def train_with_forced_skips(engine: str, *args: str) -> str:
    """``train``, then check that the worker's forced skip pattern reached the last step: the instruction
    stage's micro-batches skipped blocks 0, 1 and 2 as forced, on every engine alike."""
    output = train(engine, *args)
    assert "step 5 stage instruction skipped [[0, 1, 2], [0, 1, 2]]" in output
    return output
