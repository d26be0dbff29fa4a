"""Models whose weights hold no data at sparsify: built on the meta device (or partitioned by ZeRO-3's zero.Init,
see test_deepspeed.py), captured and matched from their weights' shapes, bound at the first training forward.

A model built on meta, sparsified, then materialized (``to_empty``) and loaded trains exactly as ``sparsify`` on the
same model built directly: the same structure, the same decisions, the same losses and parameters at every step.

    python tests/test_sharded.py [family ...]     every family hf_models builds (or those named), built on meta and
                                                  matched, against the family built directly: ``same`` or why not
"""

import copy
import dataclasses
import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # as conftest.py does, run as a script
import hf_models  # noqa: E402
import tiny_llava  # noqa: E402
import stsc  # noqa: E402
from stsc import CaptureError, UnsupportedModelError, sparsify
from stsc.policy import parse_policy

POLICY = parse_policy("""
version: 1
stages:
  - {name: alignment, steps: 2, passes: {compress_visual_tokens: {method: random, keep_ratio: 0.5}}}
  - {name: instruction, steps: 3, passes: {skip_layers: {schedule: constant, alpha: 0.9, eps: 0.1}}}
""")


def tiny(batch=2, text_tokens=12):
    model = tiny_llava.build_model()
    return model, tiny_llava.example_inputs(model, batch=batch, text_tokens=text_tokens)


def on_meta(build):
    """``build()``'s model built on the meta device (a builder that runs its model to size the inputs cannot: the
    model is then built from its config), with the inputs of a real build."""
    direct, inputs = build()
    try:
        with torch.device("meta"):
            meta = build()[0]
    except (NotImplementedError, RuntimeError):  # e.g. Tensor.item() on meta
        with torch.device("meta"):
            torch.manual_seed(0)
            meta = type(direct)(direct.config).train()
    return direct, meta, inputs


def materialize(meta, direct) -> None:
    """What a meta-device init does after sharding: allocate, load the checkpoint, recompute the non-persistent
    buffers (copied here from the direct build, which computed them at construction)."""
    meta.to_empty(device="cpu")
    meta.load_state_dict(direct.state_dict())
    with torch.no_grad():
        for name, buffer in direct.named_buffers():
            meta.get_buffer(name).copy_(buffer)


def found(sparse, inputs):
    """What capture and match found (a ``SparseModel``'s, or a report), comparably whichever capture found it (export
    or the real-tensor trace): not graph nodes or the visual tensor's symbolic shape; the visual positions by what
    their program computes on ``inputs``."""
    report = sparse.report.model if hasattr(sparse, "report") else sparse
    boundary = report.boundary
    if boundary is not None:
        positions = boundary.positions(inputs).tolist() if callable(boundary.positions) else repr(boundary.positions)
        boundary = dataclasses.replace(boundary, positions=positions, merge_node=None, visual_tokens=None,
                                       visual_shape=None)
    return [(b.path, b.kind, b.feeds) for b in report.block_details], report.vision_blocks, boundary, report.support


def train(sparse, inputs, steps=5):
    """SGD through both stages; per step: (stage, loss, blocks skipped)."""
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    trace = []
    for step in range(steps):
        sparse.set_progress(step=step)
        loss = sparse(**inputs)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        skipper = sparse.runtimes.get("skip_layers")
        trace.append((sparse.stage, loss.item(), skipper.last_skipped if skipper else None))
    return trace


def meta_tensors(value, seen=None) -> list[str]:
    """Where ``value`` (a report, a structure, a dict of inputs ...) holds a tensor on the meta device."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return ["tensor"] if value.is_meta else []
    if isinstance(value, torch.nn.Module):
        return [name for name, t in (*value.named_parameters(), *value.named_buffers()) if t.is_meta]
    if isinstance(value, dict):
        return [f"{k}.{w}" for k, v in value.items() for w in meta_tensors(v, seen)]
    if isinstance(value, (list, tuple)):
        return [f"[{i}].{w}" for i, v in enumerate(value) for w in meta_tensors(v, seen)]
    if hasattr(value, "__dict__") and type(value).__module__.startswith("stsc"):
        return meta_tensors(vars(value), seen)
    return []


@pytest.mark.parametrize("build", [tiny, hf_models.llava, pytest.param(hf_models.qwen2_vl, marks=pytest.mark.slow)],
                         ids=["tiny_llava", "hf-llava-export", "qwen2_vl-trace"])
def test_built_on_meta_then_loaded_trains_as_the_model_built_directly(build):
    direct, meta, inputs = on_meta(build)
    sparse = sparsify(meta, POLICY, inputs)
    reference = sparsify(direct, POLICY, inputs)
    assert found(sparse, inputs) == found(reference, inputs)
    assert not sparse.bound and sparse.report.stages == []
    assert "stages       not checked yet" in sparse.report.format()
    materialize(meta, direct)
    trace = train(sparse, inputs)
    assert sparse.bound and sparse.report.checked_on == "the first training batch"
    assert [s.passes for s in sparse.report.stages] == [s.passes for s in reference.report.stages]
    assert trace == train(reference, inputs)  # same stages, losses and skipped blocks, to the bit
    assert [t[0] for t in trace] == ["alignment"] * 2 + ["instruction"] * 3
    assert any(t[2] for t in trace[2:])  # blocks were skipped
    for (name, p), q in zip(meta.named_parameters(), direct.parameters()):
        assert torch.equal(p, q), name
    assert meta_tensors(sparse.report) == [] and meta_tensors(sparse._inputs) == []


def test_example_inputs_on_the_meta_device_too():
    direct, meta, inputs = on_meta(tiny)
    sparse = sparsify(meta, POLICY, {k: v.to("meta") if torch.is_tensor(v) else v for k, v in inputs.items()})
    boundary = sparse.report.model.boundary
    assert (boundary.kind, boundary.tokens_per_image, boundary.images) == ("scatter", 64, 2)  # from the static shape
    materialize(meta, direct)
    assert train(sparse, inputs) == train(sparsify(direct, POLICY, inputs), inputs)
    assert meta_tensors(sparse._inputs) == []  # the first training batch replaced the meta example


def test_the_first_batch_may_be_shaped_unlike_the_example():
    direct, meta, inputs = on_meta(lambda: tiny(batch=1))
    sparse = sparsify(meta, POLICY, inputs)
    materialize(meta, direct)
    batch = tiny(batch=3, text_tokens=20)[1]
    assert train(sparse, batch, steps=3) == train(sparsify(direct, POLICY, batch), batch, steps=3)


def test_a_pass_that_breaks_fails_at_the_first_training_forward_with_sparsifys_error():
    direct, meta, inputs = on_meta(hf_models.llava)
    sparse = sparsify(meta, POLICY, inputs)
    materialize(meta, direct)
    original = meta.model.language_model.forward

    def breaks_when_shortened(*args, **kwargs):
        if kwargs["inputs_embeds"].shape[1] != inputs["input_ids"].shape[1]:
            raise RuntimeError("shape '[2, 25, 64]' is invalid for input of size 1664")
        return original(*args, **kwargs)

    meta.model.language_model.forward = breaks_when_shortened
    sparse.set_progress(step=0)
    with pytest.raises(UnsupportedModelError) as err:
        sparse(**inputs)
    assert str(err.value).startswith(
        "stage 'alignment' (compress_visual_tokens): a training step on the first training batch failed: "
        "RuntimeError: shape '[2, 25, 64]' is invalid for input of size 1664 (found: compress_visual_tokens: "
        "boundary=scatter, visual_positions=eq(input_ids, 3), compacted_at=model.language_model, "
        "padding_removed=where attention_mask is 0, method=random, "
        "tokens_per_image=16, kept_per_image=8)")
    assert not sparse.bound and sparse.runtimes == {}


def test_training_before_the_weights_are_materialized_is_refused():
    _, meta, inputs = on_meta(tiny)
    sparse = sparsify(meta, POLICY, inputs)
    with pytest.raises(RuntimeError, match=r"^the model's weights are still on the meta device at its first training "
                                           r"forward: materialize them \(model.to_empty\(device=...\), then load the "
                                           r"weights\) before training$"):
        sparse(**inputs)


def test_a_model_without_data_needs_example_inputs():
    with torch.device("meta"):
        model = tiny_llava.build_model()
    with pytest.raises(ValueError, match=r"^sparsify\(\) of a model whose weights hold no data here \(on the meta "
                                         r"device, or partitioned by ZeRO-3\) needs example_inputs"):
        sparsify(model, POLICY)


def test_eval_before_the_first_training_forward_runs_the_dense_model():
    direct, meta, inputs = on_meta(tiny)
    sparse = sparsify(meta, POLICY, inputs)
    materialize(meta, direct)
    sparse.eval()
    with torch.no_grad():
        assert torch.equal(sparse(**inputs)["logits"], copy.deepcopy(direct).eval()(**inputs)["logits"])
    assert not sparse.bound


class _Offsets:
    """A helper object whose tensor is computed at first use, as HF Chameleon's vocabulary mapping computes its own."""

    @functools.cached_property
    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.long)


class _TinyWithLazyValue(tiny_llava.TinyLlava):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.offsets = _Offsets()

    def forward(self, input_ids, pixel_values, attention_mask=None, labels=None):
        return super().forward(input_ids, pixel_values + self.offsets.zero, attention_mask, labels)


def test_what_the_capture_computes_lazily_on_the_model_is_not_kept():
    """The trace computes a lazily cached value with its own (fake) tensors; kept, it would break the real forward."""
    def build():
        torch.manual_seed(0)
        model = _TinyWithLazyValue(tiny_llava.TinyLlavaConfig())
        return model, tiny_llava.example_inputs(model)

    direct, meta, inputs = on_meta(build)
    sparse = sparsify(meta, POLICY, inputs)
    assert "zero" not in vars(meta.offsets)
    materialize(meta, direct)
    assert train(sparse, inputs, steps=3) == train(sparsify(direct, POLICY, inputs), inputs, steps=3)


# one family per way images enter the sequence (hf_models' sections), export and trace paths
FAMILIES = ["llava", "blip2", "chameleon", "kosmos2", "llava_next_mixed", "qwen2_5_vl_mixed", "glm4v", "mistral3",
            "fuyu", "llama4", "lfm2_vl", "gemma3n", "mllama",
            "qwen2_audio",  # its audio mask is an arange made on the weights' device
            "granite_docling",  # its visual positions are moved to the weights' device
            "step3p7"]  # its vision grid is a torch.tensor made on the weights' device; float32 experts (grouped_mm)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_structure_from_shapes_equals_the_structure_with_weights(family):
    direct, meta, inputs = on_meta(hf_models.BUILDERS[family])
    assert found(stsc.inspect(meta, inputs), inputs) == found(stsc.inspect(direct, inputs), inputs)


@pytest.mark.slow
@pytest.mark.parametrize("family, why", [
    ("emu3", "the real-tensor trace failed: NotImplementedError: Cannot copy out of meta tensor; no data!"),  # image
    # token ids are codebook indices: computed from the weights
])
def test_a_model_that_computes_shapes_from_its_weights_values_cannot_be_matched_from_shapes(family, why):
    _, meta, inputs = on_meta(hf_models.BUILDERS[family])
    with pytest.raises(CaptureError) as err:
        sparsify(meta, POLICY, inputs)
    assert why in str(err.value)
    assert str(err.value).endswith("the weights hold no data here, so the model was captured from their shapes alone: "
                                   "it cannot compute from their values anything that decides its shapes or control "
                                   "flow")


@pytest.mark.slow
def test_llava_1_5_7b_and_qwen2_5_vl_72b_shapes_on_meta_are_matched():
    """benchmarks/meta_scale.py, each config in its own process: the published shapes, built on meta, sparsified."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import meta_scale

    rows = {row["config"]: row for row in meta_scale.main([])}
    assert {name: (row["capture"], row["blocks"], row["boundary"], row["tokens_per_image"], row["decoder_entry"])
            for name, row in rows.items()} == {"llava-1.5-7b": ("export", 32, "scatter", 576, "model.language_model"),
                                               "qwen2.5-vl-72b": ("trace", 80, "scatter", 64, "model.language_model")}
    assert all(row["support"] == {"compress_visual_tokens": "ok", "skip_layers": "ok"} for row in rows.values())
    assert rows["qwen2.5-vl-72b"]["params_b"] > 72


if __name__ == "__main__":
    for name in sys.argv[1:] or hf_models.BUILDERS:
        try:
            direct, meta, inputs = on_meta(hf_models.BUILDERS[name])
            same = found(stsc.inspect(meta, inputs), inputs) == found(stsc.inspect(direct, inputs), inputs)
            print(f"{name:28s} {'same' if same else 'DIFFERENT'}", flush=True)
        except (CaptureError, UnsupportedModelError) as error:
            print(f"{name:28s} {type(error).__name__}: {str(error)[:160]}", flush=True)
