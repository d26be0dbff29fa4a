"""FSDP2 on 2 CPU ranks: parameters equal a single process's, and skipped blocks move no bytes, with the model built
whole or on the meta device (sparsified from its weights' shapes, then sharded, materialized and loaded)."""

import json

import pytest

from launch import ROOT, torchrun, train_with_forced_skips

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("options", [[], ["--local-accumulation"], ["--init", "meta"]],
                         ids=["reduce-each", "no-sync", "meta-init"])
def test_every_step_equals_the_single_process_reference(options):
    output = train_with_forced_skips("fsdp2", *options)
    if "meta" in options:
        assert "sparsify: checked_on=None collectives=0" in output  # matched from shapes; bound at the first forward


@pytest.mark.parametrize("options", [[], ["--meta-init"]], ids=["whole", "meta-init"])
def test_a_skipped_block_is_neither_all_gathered_nor_reduce_scattered(options):
    result = torchrun(ROOT / "benchmarks" / "distributed.py", "fsdp2", "--quick", *options)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    steps = [json.loads(line[len("STEP "):]) for line in result.stdout.splitlines() if line.startswith("STEP ")]
    assert len(steps) == 6 and min(step["blocks_run"] for step in steps) < 1  # the schedule skipped some blocks
    for step in steps:  # the blocks are alike: bytes are exactly proportional to the blocks run
        assert step["sts_bytes"] == step["dense_bytes"] * step["blocks_run"], step
    assert "worst_step_excess=0.0000" in result.stdout
