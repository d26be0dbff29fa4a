"""DDP on 2 CPU ranks through a compressing and a skipping stage: parameters equal a single process's.

With ``stsc.integrations.ddp.attach`` DDP needs no ``find_unused_parameters``; both ways a block
skipped in every micro-batch of a step keeps ``.grad = None`` (SGD's momentum and weight decay leave
it alone), and one skipped in a micro-batch gets the gradient of the other.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import stsc
import stsc.integrations.ddp
from launch import WORKER, torchrun, train_with_forced_skips


@pytest.mark.slow
@pytest.mark.parametrize("engine, options", [("ddp", []), ("ddp", ["--local-accumulation"]),
                                             ("ddp-find-unused", ["--local-accumulation"])],
                         ids=["attach", "attach-no-sync", "find-unused-no-sync"])
def test_every_step_equals_the_single_process_reference(engine, options):
    train_with_forced_skips(engine, *options)


@pytest.mark.slow
def test_the_reference_check_catches_ranks_with_different_seeds():
    result = torchrun(WORKER, "--engine", "ddp", "--break-seed")
    assert result.returncode != 0
    assert "MISMATCH step 0: parameters differ from the single-process reference" in result.stdout


def test_attach_refuses_find_unused_parameters_and_a_ddp_of_another_module(tiny, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sparse = stsc.sparsify(copy.deepcopy(tiny[0]), "sts", tiny[1])
        with pytest.raises(ValueError, match=r"^attach\(\) replaces find_unused_parameters=True: build "
                                             r"DistributedDataParallel\(sparse\) without it$"):
            stsc.integrations.ddp.attach(DistributedDataParallel(sparse, find_unused_parameters=True), sparse)
        with pytest.raises(ValueError, match=r"^attach\(ddp, sparse\): ddp must wrap sparse itself "
                                             r"\(DistributedDataParallel\(sparse\)\)$"):
            stsc.integrations.ddp.attach(DistributedDataParallel(sparse.model), sparse)
        assert sparse.integration is None
    finally:
        dist.destroy_process_group()
