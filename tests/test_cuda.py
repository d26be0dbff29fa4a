"""The CUDA path (marker ``cuda``): both passes in both lowerings train on the GPU when there is one, and on the CPU
otherwise at the same small size: float32 and bfloat16, compiled, and with as many host syncs per training step
whatever the number of decoder blocks. ``benchmarks/device_check.sh`` runs them on a GPU (``pytest -m cuda``)."""

import copy
from pathlib import Path

import pytest
import torch

import tiny_llava
from stsc import SparseModel, sparsify, transform
from stsc.policy import parse_policy
from stsc.syncs import count_syncs

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# compresses (uniform, half the visual tokens) and skips blocks (a forced pattern below), in one stage
POLICY = parse_policy("version: 1\nstages:\n  - {name: both, epochs: 1, passes: {compress_visual_tokens: "
                      "{keep_ratio: 0.5}, skip_layers: {schedule: constant, alpha: 0.5}}}\n", "test_cuda")


def build(layers=2, dtype=torch.float32):
    """The example on the device in ``dtype``, and a batch there (2 images)."""
    with torch.device(DEVICE):
        model = tiny_llava.build_model(layers=layers).to(dtype)
    inputs = tiny_llava.example_inputs(model)
    return model, {k: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}


def lower(lowering, model, inputs):
    return sparsify(model, POLICY, inputs) if lowering == "modules" else transform(model, POLICY, inputs)["both"]


def skipper(lowered):
    """What forces and reports the skip pattern: the module lowering's runtime, or the graph lowering's stage."""
    return lowered.runtimes["skip_layers"] if isinstance(lowered, SparseModel) else lowered


def train_step(lowered, model, inputs, skipped, call=None, optimizer=None):
    """One training step of ``lowered`` (run as ``call``, default itself) with ``skipped`` blocks forced; the loss."""
    lowered.set_progress(step=1, epoch=0.0)
    skipper(lowered).force(skipped)
    model.zero_grad(set_to_none=True)
    loss = (lowered if call is None else call)(**inputs)["loss"]
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()


def close(actual, expected, tolerance):
    """Equal up to ``tolerance`` of the expected tensor's largest magnitude."""
    return (actual.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max() + 1e-6


@pytest.mark.parametrize("lowering", ["modules", pytest.param("graph", marks=pytest.mark.slow)])  # graph: 2 exports
def test_a_training_step_makes_as_many_host_syncs_with_2_and_6_blocks(lowering):
    """Skip decisions and compaction make no sync per block: the step's syncs (on a GPU, or what would sync there,
    counted on the CPU) are the compaction plan's, once per step, and the model's own merge's, and as many with 6
    blocks as with 2. The lowered
    model is a root (its buffers on the device), as if it had been moved there after the lowering: the graph
    lowering's skip flags stay on the host all the same. (On a GPU, benchmarks/sync_count.py compares the count
    with CUDA's sync debug mode.)"""
    counts = {}
    for layers in (2, 6):
        model, inputs = build(layers)
        run = lower(lowering, model, inputs)
        train_step(run, model, inputs, [1])  # a warm-up step
        with count_syncs(run, inputs) as count:
            train_step(run, model, inputs, [1])
        assert skipper(run).last_skipped == [1]
        counts[layers] = count
    assert counts[2].by_location() == counts[6].by_location(), (counts[2].summary(), counts[6].summary())
    places = {s.where if s.where.startswith("backward") else Path(s.where.split(":")[0]).name for s in counts[6].syncs}
    # the plan's (and the graph op's check), and the model's own: the backward of its merge (masked_scatter)
    assert places <= {"layout.py", "compress_visual_tokens.py", "ops.py", "backward: MaskedScatterBackward0"}, places
    assert counts[6].total > 0 and not any(s.kind == "cond" for s in counts[6].syncs)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.slow), torch.bfloat16],
                         ids=["float32", "bfloat16"])  # float32 on the CPU: test_graph_lowering has it too
def test_both_lowerings_train_alike_on_the_device(dtype):
    """The same forced skip pattern and compression: the same loss and gradients from both lowerings, in the model's
    dtype, and three AdamW steps on one batch lower the loss."""
    model, inputs = build(dtype=dtype)
    reference = copy.deepcopy(model)
    graph, modules = lower("graph", model, inputs), lower("modules", reference, inputs)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    graph_loss = train_step(graph, model, inputs, [0])
    module_loss = train_step(modules, reference, inputs, [0])
    assert graph_loss.dtype == dtype and torch.isfinite(graph_loss)
    assert close(graph_loss, module_loss, tolerance)
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        assert (param.grad is None) == (expected.grad is None), name  # skipped blocks: None in both
        if param.grad is not None:
            assert param.grad.dtype == dtype and param.grad.device.type == DEVICE.type
            assert close(param.grad, expected.grad, tolerance), name
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = [train_step(graph, model, inputs, [1], optimizer=optimizer) for _ in range(3)]
    assert losses[-1] < losses[0], losses


@pytest.mark.slow  # inductor compiles: left out of the default run, run by CI's slow run and by the device check
@pytest.mark.parametrize("lowering", ["modules", "graph"])
def test_a_compiled_step_equals_the_eager_step(lowering):
    """torch.compile (inductor) of each lowering: ``sparse.compile()`` plus ``torch.compile(sparse)`` for the module
    lowering, ``graph.compile()`` for the graph lowering; two steps with different skip patterns each give the eager
    loss and gradients."""
    model, inputs = build()
    reference = copy.deepcopy(model)
    compiled, eager = lower(lowering, model, inputs), lower(lowering, reference, inputs)
    torch._dynamo.reset()
    compiled.compile()
    call = torch.compile(compiled) if lowering == "modules" else compiled
    for skipped in ([1], [0]):
        loss = train_step(compiled, model, inputs, skipped, call=call)
        expected = train_step(eager, reference, inputs, skipped)
        assert close(loss, expected, 1e-4)
        for (name, param), other in zip(model.named_parameters(), reference.parameters()):
            assert (param.grad is None) == (other.grad is None), name
            if param.grad is not None:
                assert close(param.grad, other.grad, 1e-3), name
    torch._dynamo.reset()
