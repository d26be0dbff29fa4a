"""A training forward may start at the model's backbone (TRL's fused LM head calls it directly): the passes read
their inputs and draw their decisions there, once per forward however many of the modules around the decoder
run."""

import hf_models
from stsc import sparsify


def block_lengths(model, paths):
    """Per decoder block, the sequence lengths it received (a skipped block runs no hook)."""
    seen = {path: [] for path in paths}
    for path in paths:
        model.get_submodule(path).register_forward_pre_hook(
            lambda module, args, path=path: seen[path].append(args[0].shape[1]))
    return seen


def test_a_forward_may_start_at_the_backbone_and_counts_once():
    model, inputs = hf_models.llava()
    backbone_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    length = inputs["input_ids"].shape[1]
    sparse = sparsify(model, "sts", inputs, steps_per_epoch=1)
    blocks = sparse.report.model.blocks
    seen = block_lengths(model, blocks)
    compressor = sparse.runtimes["compress_visual_tokens"]
    hidden = model.model(**backbone_inputs).last_hidden_state  # what TRL's fused LM head calls
    assert [seen[path] for path in blocks] == [[length - 8]] * 3  # 16 visual tokens per row, 8 kept
    assert hidden.shape[1] == length  # expanded back: aligned with the caller's labels
    assert compressor.clock.micro_step == 1
    sparse(**inputs)  # the model's forward runs the backbone inside it: one forward, one draw
    assert compressor.clock.micro_step == 2 and [seen[path] for path in blocks] == [[length - 8] * 2] * 3

    sparse.set_progress(epoch=1.0, step=1)
    skipper = sparse.runtimes["skip_layers"]
    skipper.force([0, 2])
    for value in seen.values():
        value.clear()
    model.model(**backbone_inputs)
    assert skipper.last_skipped == [0, 2] and [len(seen[path]) for path in blocks] == [0, 1, 0]
