"""FSDP2 on 2 CPU ranks: parameters equal a single process's, and skipped blocks move no bytes."""

import json

import pytest

from launch import ROOT, torchrun, train_with_forced_skips

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("options", [[], ["--local-accumulation"]], ids=["reduce-each", "no-sync"])
def test_every_step_equals_the_single_process_reference(options):
    train_with_forced_skips("fsdp2", *options)


def test_a_skipped_block_is_neither_all_gathered_nor_reduce_scattered():
    result = torchrun(ROOT / "benchmarks" / "distributed.py", "fsdp2", "--quick")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    steps = [json.loads(line[len("STEP "):]) for line in result.stdout.splitlines() if line.startswith("STEP ")]
    assert len(steps) == 6 and min(step["blocks_run"] for step in steps) < 1  # the schedule skipped some blocks
    for step in steps:  # the blocks are alike: bytes are exactly proportional to the blocks run
        assert step["sts_bytes"] == step["dense_bytes"] * step["blocks_run"], step
    assert "worst_step_excess=0.0000" in result.stdout
