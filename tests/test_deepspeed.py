"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks through a compressing and a skipping stage.

With ``stsc.integrations.deepspeed.attach`` every step's parameters equal a single process's, with
gradient accumulation 2 and with the optimizer offloaded to the CPU, and with the model built under
``deepspeed.zero.Init`` (matched from its weights' shapes, bound at the first training forward). Under AdamW the
reference counts every optimizer step for every parameter (ZeRO's one step count per flat partition, the
documented difference); without that the runs differ from step 3 on, after blocks skipped in step 2 run again.
"""

import ast
import copy
import json
import math

import pytest
import torch

import stsc
import stsc.integrations.deepspeed
from launch import ROOT, WORKER, torchrun, train, train_with_forced_skips


@pytest.mark.slow
@pytest.mark.parametrize("engine, options", [
    ("zero2", []), ("zero3", []), ("zero2", ["--offload"]), ("zero3", ["--offload"]),
    ("zero3", ["--optimizer", "adamw", "--offload"]),
], ids=["zero2", "zero3", "zero2-offload", "zero3-offload", "zero3-adamw-offload"])
def test_every_step_equals_the_single_process_reference(engine, options):
    train_with_forced_skips(engine, *options)


@pytest.mark.slow
def test_without_attach_training_is_refused_naming_the_fix():
    result = torchrun(WORKER, "--engine", "zero3", "--no-attach")
    assert result.returncode != 0
    assert ("RuntimeError: this model trains under DeepSpeed ZeRO, whose optimizer would step the blocks that "
            "skip_layers skips with stale or zero gradients: call stsc.integrations.deepspeed.attach(engine, sparse) "
            "after deepspeed.initialize (with the Hugging Face Trainer, StscCallback does it)") in result.stderr


@pytest.mark.slow
def test_zero_init_model_matched_from_shapes_trains_as_the_single_process_reference():
    output = train_with_forced_skips("zero3", "--init", "zero")
    assert "sparsify: checked_on=None collectives=0" in output  # matched from shapes: nothing gathered, no bind yet


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])  # dynamic resolution (traced), cross-attention (exported)
def test_hf_family_built_under_zero_init_trains_through_both_stages(family):
    result = torchrun(ROOT / "tests" / "distributed" / "zero_init_family.py", family)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-5000:]
    run = json.loads(lines[0][len("RESULT "):])
    assert run["checked_on"] is None  # matched from shapes at sparsify; bound at the first training forward
    assert run["stages"] == ["alignment"] * 2 + ["instruction"] * 2
    assert all(math.isfinite(loss) for loss in run["losses"])
    assert all(run["skipped"][2:])  # blocks were skipped in the instruction stage


@pytest.mark.slow
def test_hf_trainer_with_zero3_builds_under_zero_init_attaches_through_the_callback_and_skips():
    output = train("hf-zero3")
    assert "integration=deepspeed" in output  # else the first training forward would have been refused
    assert "checked_on='the first training batch'" in output  # the model was built partitioned (zero.Init)
    losses = ast.literal_eval(output.split("losses=")[1].split(" stages=")[0])
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    assert f"stages={['alignment'] * 4 + ['instruction'] * 4}" in output
    blocks_run = ast.literal_eval(output.split("blocks_run=")[1].split("\n")[0])
    assert blocks_run[-8:] == [3, 3, 3, 3] + [2, 1, 3, 3]  # 3 decoder blocks; the sts schedule skips in the second stage


def test_attach_refuses_an_optimizer_that_is_not_zero(tiny):
    sparse = stsc.sparsify(copy.deepcopy(tiny[0]), "sts", tiny[1])
    with pytest.raises(ValueError, match=r"^attach\(\) is for DeepSpeed ZeRO stages 1-3, and SGD has no ZeRO optimizer "
                                         r"\(its optimizer is a SGD\); without ZeRO, use DistributedDataParallel and "
                                         r"stsc.integrations.ddp$"):
        stsc.integrations.deepspeed.attach(torch.optim.SGD(sparse.parameters(), lr=0.1), sparse)
