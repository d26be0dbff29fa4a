"""DDP on 2 CPU ranks through a compressing and a skipping stage: parameters equal a single process's.

With ``stsc.integrations.ddp.attach`` DDP needs no ``find_unused_parameters``; both ways a block
skipped in every micro-batch of a step keeps ``.grad = None`` (SGD's momentum and weight decay leave
it alone), and one skipped in a micro-batch gets the gradient of the other.
"""

import pytest

from launch import WORKER, torchrun, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("engine", ["ddp", "ddp-find-unused"])
def test_every_step_equals_the_single_process_reference(engine):
    output = train(engine)
    assert "step 5 stage instruction skipped [[0, 1, 2], [0, 1, 2]]" in output


def test_the_reference_check_catches_ranks_with_different_seeds():
    result = torchrun(WORKER, "--engine", "ddp", "--break-seed")
    assert result.returncode != 0
    assert "MISMATCH step 0: parameters differ from the single-process reference" in result.stdout
