"""Gradient checkpointing enabled before ``sparsify`` (LLaVA's train.py order) or after it (what HF Trainer does):
the same loss and gradients as the model without checkpointing, in both stages of ``sts``, and a skipped block does
no recompute work."""

import functools

import pytest
import torch
from torch import nn

import hf_models
from stsc import inspect, sparsify
from stsc.capture import REGION_OPS, inline_regions, module_paths, op_name

SKIPPED = [0, 2]  # of the builds' 3 decoder blocks, forced in the instruction stage


@functools.cache
def run(family: str, checkpointing: str | None, order: str = "before") -> dict:
    """One training forward and backward in each stage of ``sts`` (alignment: visual tokens compressed;
    instruction: blocks ``SKIPPED`` skipped). ``checkpointing``: None, "reentrant" or "non_reentrant", enabled
    before or after ``sparsify``. Returns per stage the loss, every gradient, the decoder length, and per decoder
    block how many calls its submodules ran in the forward and in the backward (a recompute)."""
    model, inputs = hf_models.BUILDERS[family]()

    def enable():
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})

    if order == "before":
        enable()
    sparse = sparsify(model, "sts", inputs, steps_per_epoch=1)
    if order == "after":
        enable()
    blocks = [model.get_submodule(path) for path in sparse.report.model.blocks]
    phase, calls = ["forward"], [{"forward": 0, "backward": 0} for _ in blocks]
    for index, block in enumerate(blocks):
        for module in block.modules():  # the block's own hooks run once per call: its submodules run in the recompute
            if module is not block:
                module.register_forward_hook(lambda *_, i=index: calls[i].__setitem__(phase[0], calls[i][phase[0]] + 1))
    lengths = []
    entry = model.get_submodule(sparse.report.model.boundary.decoder_entry)
    entry.register_forward_pre_hook(lambda m, a, k: lengths.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
    results = {"blocks": sparse.report.model.blocks}
    for stage, epoch in (("alignment", 0.0), ("instruction", 1.0)):
        sparse.set_progress(epoch=epoch, step=int(epoch))
        assert sparse.stage == stage
        if stage == "instruction":
            sparse.runtimes["skip_layers"].force(SKIPPED)
        for counts in calls:
            counts.update(forward=0, backward=0)
        model.zero_grad(set_to_none=True)
        phase[0] = "forward"
        loss = sparse(**inputs).loss
        phase[0] = "backward"
        loss.backward()
        results[stage] = {"loss": loss.detach(), "length": lengths[-1], "calls": [dict(c) for c in calls],
                          "grads": {name: p.grad for name, p in model.named_parameters()}}
    return results


def assert_same_training(family, checkpointing, order="before"):
    reference, checkpointed = run(family, None), run(family, checkpointing, order)
    full = hf_models.BUILDERS[family]()[1]["input_ids"].shape[1]
    assert reference["alignment"]["length"] < full  # the alignment stage compressed
    for stage in ("alignment", "instruction"):
        expected, got = reference[stage], checkpointed[stage]
        assert got["length"] == expected["length"]
        torch.testing.assert_close(got["loss"], expected["loss"], atol=1e-5, rtol=0)
        assert expected["grads"].keys() == got["grads"].keys()
        for name, grad in expected["grads"].items():
            assert (grad is None) == (got["grads"][name] is None), name
            if grad is not None:
                torch.testing.assert_close(got["grads"][name], grad, atol=1e-5, rtol=0, msg=name)
        assert all(c["backward"] == 0 for c in expected["calls"])  # without checkpointing nothing runs again
        for index, counts in enumerate(got["calls"]):
            if stage == "instruction" and index in SKIPPED:
                assert counts == {"forward": 0, "backward": 0}  # a skipped block is not recomputed either
            else:
                assert counts["forward"] > 0 and counts["backward"] > 0  # checkpointing is on: it recomputes
    skipped_params = [name for name in checkpointed["instruction"]["grads"]
                      if any(name.startswith(checkpointed["blocks"][i] + ".") for i in SKIPPED)]
    assert skipped_params and all(checkpointed["instruction"]["grads"][name] is None for name in skipped_params)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_checkpointing_enabled_before_sparsify_trains_like_the_model_without(checkpointing):
    """HF LLaVA, captured by torch.export: a reentrant checkpoint runs the block under no_grad, which export records
    as a wrap_with_set_grad_enabled region the capture inlines (it used to hide the blocks from the matcher)."""
    assert_same_training("llava", checkpointing)


@pytest.mark.slow
def test_checkpointing_enabled_after_sparsify_trains_like_the_model_without():
    assert_same_training("llava", "non_reentrant", order="after")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma", "gemma3"])
def test_checkpointing_before_sparsify_on_more_families(family, checkpointing):
    """Qwen2-VL is captured by the real-tensor trace, PaliGemma and Gemma3 by torch.export."""
    assert_same_training(family, checkpointing)


class NoGradInside(nn.Module):
    """A model that runs part of its forward under torch.no_grad() and, nested in it, torch.autocast."""

    def __init__(self):
        super().__init__()
        self.frozen, self.head = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            y = self.frozen(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.frozen(y) * 2
        return self.head(y.float() + x)


def test_capture_inlines_the_regions_export_wraps_code_in():
    exported = torch.export.export(NoGradInside(), (torch.randn(2, 4),), strict=False)
    assert "wrap_with_set_grad_enabled" in [op_name(n) for n in exported.graph_module.graph.nodes]
    flat, aliases = inline_regions(exported.graph_module)
    nodes = [n for n in flat.graph.nodes if n.op == "call_function"]
    assert not {op_name(n) for n in nodes} & REGION_OPS and all(n.op != "get_attr" for n in flat.graph.nodes)
    assert [module_paths(n) for n in nodes if op_name(n) == "linear"] == [("frozen",), ("frozen",), ("head",)]
    mul = next(n for n in nodes if op_name(n) == "mul")
    assert list(aliases.values()) == [mul.name]  # the region's result is the nested region's product


def test_capture_inlines_a_checkpoint_dynamo_tags():
    """Dynamo (capture's last resort) records a non-reentrant checkpoint as tag_activation_checkpoint, its options
    as keyword arguments."""
    layer, head = nn.Linear(4, 4), nn.Linear(4, 4)
    graphs = []
    model = torch.compile(lambda x: head(torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)),
                          backend=lambda gm, example: graphs.append(gm) or gm.forward)
    model(torch.randn(2, 4, requires_grad=True))
    assert [op_name(n) for n in graphs[0].graph.nodes if n.op == "call_function"][0] == "tag_activation_checkpoint"
    flat, _ = inline_regions(graphs[0])
    assert [op_name(n) for n in flat.graph.nodes if n.op == "call_function"] == ["linear", "linear"]


def structure(report) -> tuple:
    b = report.boundary
    return (report.blocks, report.vision_blocks, b.kind, b.tokens_per_image, b.decoder_entry, b.grid,
            b.producer_module, getattr(b.positions, "code", repr(b.positions)))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(hf_models.BUILDERS))
def test_reentrant_checkpointing_leaves_the_matched_structure_unchanged(family):
    """Every family: the blocks and boundary found with reentrant checkpointing on equal those found without it
    (checked by hand for non-reentrant too: it leaves the captured graphs as they are)."""
    model, inputs = hf_models.BUILDERS[family]()
    if not model.supports_gradient_checkpointing:
        pytest.skip(f"{type(model).__name__} does not support activation checkpointing")
    expected = structure(inspect(model, inputs))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    try:
        model(**inputs)
    except Exception as error:  # PI0: checkpointing turns off the cache its action expert reads
        pytest.skip(f"{type(model).__name__} does not run with activation checkpointing on: {error}")
    assert structure(inspect(model, inputs)) == expected
