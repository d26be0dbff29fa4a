"""Bad input everywhere a user touches it gets one clear message (model files and policies: test_cli, test_policy)."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tiny_llava
from stsc import UnsupportedModelError, sparsify
from stsc.policy import parse_policy

ROOT = Path(__file__).resolve().parents[1]


def test_example_inputs_that_do_not_run_the_model(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent("""\
        import torch
        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(4, 4)
            def forward(self, x):
                return self.linear(x)
        def build_model():
            return Model()
        def example_inputs():
            return {"x": torch.zeros(2, 3)}
    """))
    result = subprocess.run([sys.executable, "-m", "stsc.cli", "transform", str(path), "sts"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"stsc: error: {path}: the model does not run on example_inputs(): RuntimeError: mat1 and mat2 shapes "
        f"cannot be multiplied (2x3 and 4x4) (at {path}:7)")


def policy(passes: str):
    return parse_policy(f"version: 1\nstages:\n  - {{name: s, epochs: 1, passes: {passes}}}\n", "p.yaml")


@pytest.mark.parametrize("passes, message", [
    ("{compress_visual_tokens: {keep_ratio: 0.001}}",
     "stage 's', pass compress_visual_tokens: keep_ratio 0.001 keeps 0 of 64 visual tokens per image; at least 1 "
     "must be kept (keep_ratio >= 0.007812)"),
    ("{skip_layers: {min_kept: 5}}", "stage 's', pass skip_layers: min_kept 5 is more than the 4 decoder blocks"),
    ("{skip_layers: {never_skip_first: 2, never_skip_last: 2}}",
     "stage 's', pass skip_layers: no decoder block can be skipped: 4 blocks, never_skip_first=2, never_skip_last=2, "
     "skip_kinds=None, 4 with a skippable output, alpha=0.5"),
    ("{skip_layers: {skip_kinds: [1]}}",
     "stage 's', pass skip_layers: no decoder block can be skipped: 4 blocks, never_skip_first=0, never_skip_last=0, "
     "skip_kinds=(1,), 0 with a skippable output, alpha=0.5"),
])
def test_pass_parameters_the_model_cannot_satisfy(tiny, passes, message):
    model = tiny_llava.build_model()
    with pytest.raises(UnsupportedModelError) as info:
        sparsify(model, policy(passes), tiny[1])
    assert str(info.value) == message
    assert not any("forward" in module.__dict__ for module in model.modules())  # nothing left installed
    assert not model._forward_pre_hooks and not model.projector._forward_hooks


def test_a_skip_schedule_that_would_skip_every_layer_is_refused_or_capped():
    with pytest.raises(Exception, match=re.escape("p.yaml:3: stage 's'.passes.skip_layers: alpha * (1 + eps) must be "
                                                  "in [0, 1] so that every skip probability is valid, got alpha=1.0, "
                                                  "eps=0.5 (1.5)")):
        policy("{skip_layers: {alpha: 1.0, eps: 0.5}}")
    sparse = sparsify(tiny_llava.build_model(), policy("{skip_layers: {schedule: constant, alpha: 1.0, eps: 0}}"),
                      tiny_llava.example_inputs())
    assert sparse.report.stages[0].passes[0]["details"]["at_most_skipped_per_step"] == 3
    for step in range(5):
        sparse.set_progress(step=step)
        sparse(**tiny_llava.example_inputs())
        assert sparse.runtimes["skip_layers"].last_skipped == [1, 2, 3]  # min_kept 1: the first block runs


def test_untrusted_formats_are_never_loaded_unsafely():
    """Checkpoints are read with weights_only=True and YAML with a SafeLoader, everywhere in the repository."""
    for path in [*ROOT.glob("stsc/**/*.py"), *ROOT.glob("passes/*.py"), *ROOT.glob("examples/*.py"),
                 *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/**/*.py")]:
        source = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, f"{path}: {call}"
        for call in re.findall(r"yaml\.(?:load|unsafe_load|full_load)\([^)]*\)", source):
            assert "Loader=_LineLoader" in call, f"{path}: {call}"
