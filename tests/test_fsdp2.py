"""FSDP2 on 2 CPU ranks through a compressing and a skipping stage: parameters equal a single process's."""

import pytest

from launch import train

pytestmark = pytest.mark.slow


def test_every_step_equals_the_single_process_reference():
    output = train("fsdp2")
    assert "step 5 stage instruction skipped [[0, 1, 2], [0, 1, 2]]" in output
