"""Any MLLM: dynamic resolution, image rows between text, mixed decoder stacks, grid-shaped and multi-point
visual features, second embedding tables, mask-positioned placeholders; failures at sparsify, not at step N."""

import copy

import pytest
import torch
import torch.nn.functional as F

import hf_models
from stsc import UnsupportedModelError, inspect, sparsify
from stsc.capture import forward_kwargs
from stsc.policy import parse_policy

ACCEPTANCE = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "mistral3"]


def decoder_lengths(sparse, kwargs, steps, optimizer):
    """Train ``steps`` steps; the sequence length the first decoder block saw in each."""
    lengths = []  # read where the decoder entry receives the (compacted) sequence: a skipped block runs no hook
    entry = sparse.model.get_submodule(sparse.report.model.boundary.decoder_entry)
    handle = entry.register_forward_pre_hook(
        lambda module, args, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    for _ in range(steps):
        sparse.set_progress(epoch=sparse.progress, step=sparse.step + 1)
        optimizer.zero_grad(set_to_none=True)
        loss = sparse(**kwargs).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    handle.remove()
    return lengths


def removed_per_row(model, inputs, keep_ratio=0.5):
    """Positions a row loses: each image keeps round(N * keep_ratio) of its N tokens (the builders put one
    image in each row)."""
    tokens = model.stsc_expected.tokens_per_image
    tokens = tokens if isinstance(tokens, list) else [tokens] * inputs["input_ids"].shape[0]
    return [n - round(n * keep_ratio) for n in tokens]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["sts", "vtc"])
@pytest.mark.parametrize("family", ACCEPTANCE)
def test_trains_through_both_stages_and_eval_is_dense(family, policy):
    model, inputs = hf_models.BUILDERS[family]()
    kwargs = forward_kwargs(model, inputs)[0]
    dense = copy.deepcopy(model)
    sparse = sparsify(model, policy, inputs, steps_per_epoch=3)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=1e-2)
    length = inputs["input_ids"].shape[1]
    assert decoder_lengths(sparse, kwargs, 2, optimizer) == [length - max(removed_per_row(model, inputs))] * 2
    sparse.set_progress(epoch=1.0, step=3)
    assert decoder_lengths(sparse, kwargs, 3, optimizer) == [length] * 3
    dense.load_state_dict(sparse.state_dict())
    sparse.eval(), dense.eval()
    with torch.no_grad():
        assert torch.equal(sparse(**kwargs).logits, dense(**kwargs).logits)


# Kept tokens of each image under uniform keep 0.5, by hand: floor((i + 0.5) * n / k) on the image's grid.
KEPT = {
    "qwen2_vl": [1, 3],  # a 2 x 2 grid (image_grid_thw 4 x 4 patches, merged 2 x 2): 2 rows x 1 column
    "qwen2_5_vl": [1, 3],
    "llava_onevision": list(range(1, 36, 2)),  # 36 tokens (base tile + rows with newlines), no grid: 18 of 36
    "mistral3": list(range(1, 16, 2)),  # a 4 x 4 grid laid out as rows between break tokens: 4 rows x 2 columns
    "qwen2_audio": list(range(1, 16, 2)),  # a clip of 16 audio tokens, no grid: an even spread in time, 8 of 16
    "glm_image": list(range(1, 16, 2)),  # VQ codes of a 4 x 4 grid written into the ids: 4 rows x 2 columns
}


@pytest.mark.parametrize("family", ACCEPTANCE + [pytest.param(family, marks=pytest.mark.slow)
                                                 for family in ("qwen2_audio", "glm_image")])
def test_loss_equals_a_hand_built_reference_with_known_kept_positions(family):
    """The dense model run on the sequence compacted by hand (inputs_embeds, mask and position ids gathered at the
    kept positions where they enter the language model), scored against the labels gathered the same way: every
    text token and its label stay, in order. GLM-Image writes its image's VQ codes into the token ids before the
    lookup: the lookup of the merged ids is the merge, and the kept positions are looked-up codes."""
    model, inputs = hf_models.BUILDERS[family]()
    kwargs = forward_kwargs(model, inputs)[0]
    reference_model = copy.deepcopy(model)
    policy = parse_policy("version: 1\nstages:\n  - {name: a, steps: 1, passes: {compress_visual_tokens: "
                          "{method: uniform, keep_ratio: 0.5}}}\n")
    loss = sparsify(model, policy, inputs)(**kwargs).loss

    visual = inputs["input_ids"] == model.stsc_expected.placeholder_id
    keep = ~visual
    for row in range(visual.shape[0]):
        positions = visual[row].nonzero().squeeze(-1)
        keep[row, positions[KEPT[family]]] = True
    index = torch.stack([row.nonzero().squeeze(-1) for row in keep])  # equal lengths: one image per row

    def compact(module, args, kw):
        kw = dict(kw)
        kw["inputs_embeds"] = kw["inputs_embeds"].gather(1, index[..., None].expand(-1, -1, kw["inputs_embeds"].shape[-1]))
        kw["attention_mask"] = kw["attention_mask"].gather(1, index)
        if kw.get("position_ids") is not None:  # M-RoPE [3, B, T]
            kw["position_ids"] = kw["position_ids"].gather(2, index.expand(kw["position_ids"].shape[0], -1, -1))
        return args, kw

    reference_model.model.language_model.register_forward_pre_hook(compact, with_kwargs=True)
    logits = reference_model(**{**kwargs, "labels": None}).logits
    labels = inputs["labels"].gather(1, index)
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- the structures
def test_dynamic_resolution_images_of_different_sizes():
    """Per-image token counts set by image_grid_thw: a list, grids from the metadata, each image compressed alone."""
    model, inputs = hf_models.BUILDERS["qwen2_vl_mixed"]()
    sparse = sparsify(model, "vtc", inputs)
    b = sparse.report.model.boundary
    assert b.tokens_per_image == [4, 8] and b.image_grids(inputs) == [(2, 2), (2, 4)]
    sparse(**forward_kwargs(model, inputs)[0]).loss.backward()
    plan = sparse.runtimes["compress_visual_tokens"].last_plan
    assert (plan.tokens, plan.kept) == (12, 6)
    assert plan.length == inputs["input_ids"].shape[1] - 2  # the row with 8 tokens loses 4, the other 2 (padded)


def test_image_rows_between_break_tokens_are_one_image_on_its_grid():
    model, inputs = hf_models.BUILDERS["mistral3"]()
    b = inspect(model, inputs).boundary
    assert b.rows_layout and b.tokens_per_image == 16 and b.images == 2


def test_a_block_kind_seen_once_at_the_end_of_the_stack_is_kept():
    model, inputs = hf_models.BUILDERS["lfm2_vl"]()  # short-convolution layers, then one attention layer
    report = inspect(model, inputs)
    assert report.blocks == model.stsc_expected.blocks and [b.kind for b in report.block_details] == [0, 0, 0, 1]


def test_mixture_of_experts_and_no_rope_layers_in_one_stack():
    model, inputs = hf_models.BUILDERS["llama4"]()
    report = inspect(model, inputs)
    assert report.blocks == model.stsc_expected.blocks and report.block_kinds == 2


def test_grid_shaped_projector_output():
    model, inputs = hf_models.BUILDERS["aya_vision"]()  # the projector returns [images, 4, 4, D]
    sparse = sparsify(model, "vtc", inputs)
    assert sparse.report.model.boundary.grid == (4, 4)
    sparse(**forward_kwargs(model, inputs)[0]).loss.backward()
    assert sparse.runtimes["compress_visual_tokens"].last_plan.kept == 16


def test_visual_features_added_again_inside_the_decoder_follow_the_kept_tokens():
    """DeepStack: features of every visual token are added to the hidden states after the first layers."""
    model, inputs = hf_models.BUILDERS["qwen3_vl"]()
    sparse = sparsify(model, "vtc", inputs)
    assert sparse.report.model.blocks == model.stsc_expected.blocks
    seen = []
    model.model.language_model.layers[1].register_forward_pre_hook(
        lambda module, args, kw: seen.append((args[0] if args else kw["hidden_states"]).shape), with_kwargs=True)
    sparse(**forward_kwargs(model, inputs)[0]).loss.backward()
    assert seen[0][1] == inputs["input_ids"].shape[1] - 2  # 4 visual tokens -> 2 per image


def test_a_second_embedding_table_does_not_hide_the_token_input():
    model, inputs = hf_models.BUILDERS["ovis2"]()  # visual words looked up in their own table with soft weights
    report = inspect(model, inputs)
    assert report.token_input == "input_ids" and report.blocks == model.stsc_expected.blocks


def test_placeholders_positioned_by_a_mask_input():
    model, inputs = hf_models.BUILDERS["kosmos2"]()  # distinct ids at the image positions, a mask input marks them
    sparse = sparsify(model, "vtc", inputs)
    assert sparse.report.model.boundary.positions.inputs == ("image_embeds_position_mask",)
    sparse(**forward_kwargs(model, inputs)[0]).loss.backward()
    assert sparse.runtimes["compress_visual_tokens"].last_plan.kept == 8


def test_blocks_whose_keys_and_values_later_blocks_read_are_never_skipped():
    model, inputs = hf_models.BUILDERS["gemma3n"]()  # layers 2 and 3 reuse the keys and values of layers 0 and 1
    sparse = sparsify(model, "lds", inputs)
    details = sparse.report.stages[1].passes[0]["details"]
    assert details["skippable"] == model.stsc_expected.blocks[2:]
    assert list(details["not_skippable"]) == model.stsc_expected.blocks[:2]


@pytest.mark.slow
def test_an_action_expert_reading_each_layers_keys_and_values_skips_that_layer_with_it():
    """PI0: the decoder runs the prefix (images, text), then the action expert's layer i attends to the decoder's keys
    and values of layer i. The expert is not taken for the decoder; a skipped decoder layer skips its partner too; the
    first decoder layer always runs (the expert sizes its attention by its cache entry)."""
    model, inputs = hf_models.BUILDERS["pi0"]()
    experts = [f"model.dit.layers.{i}" for i in range(3)]
    sparse = sparsify(model, "lds", inputs)
    assert sparse.report.model.blocks == model.stsc_expected.blocks
    assert [b.partners for b in sparse.report.model.block_details] == [(path,) for path in experts]
    details = sparse.report.stages[1].passes[0]["details"]
    assert details["skippable"] == model.stsc_expected.blocks[1:]
    assert list(details["not_skippable"]) == model.stsc_expected.blocks[:1]
    ran = []
    for path in model.stsc_expected.blocks + experts:
        sparse.model.get_submodule(path).register_forward_hook(lambda *_, path=path: ran.append(path))
    sparse.set_progress(epoch=1.0, step=1)
    sparse.runtimes["skip_layers"].force([1])
    kwargs = forward_kwargs(sparse.model, inputs)[0]
    sparse(**kwargs)  # the stage's first call installs its passes (binding the blocks runs the model) first
    ran.clear()
    sparse(**kwargs).loss.backward()
    assert ran == [model.stsc_expected.blocks[0], model.stsc_expected.blocks[2], experts[0], experts[2]]


def test_token_ids_rewritten_before_the_lookup_are_still_the_token_input():
    """Gemma4 replaces the image ids by the pad id before the lookup and indexes a per-layer table with them too."""
    model, inputs = hf_models.BUILDERS["gemma4"]()
    report = inspect(model, inputs)
    assert report.token_input == "input_ids" and report.boundary.token_embedding == "model.language_model.embed_tokens"
    assert report.blocks == model.stsc_expected.blocks and report.boundary.tokens_per_image == 16
    assert report.support == {"compress_visual_tokens": "ok", "skip_layers": "ok"}


def test_features_added_onto_the_placeholder_embeddings_views_of_one_picture():
    """Molmo2 adds pooled features onto the patch embeddings (``x[mask] + features`` written back): the write is the
    merge, the features its visual tokens. Each picture is a low- and a high-resolution view, rows ended by column
    tokens: each view is compressed on its own grid, the report says which positions make one picture."""
    model, inputs = hf_models.BUILDERS["molmo2"]()
    sparse = sparsify(model, "vtc", inputs)
    b = sparse.report.model.boundary
    assert (b.kind, b.placeholder_id, b.decoder_entry) == ("scatter", 123, "model.language_model")
    assert b.tokens_per_image == [16, 32, 16, 32] and b.rows_layout
    assert b.picture_views == [(0, 2, 58, 2), (1, 2, 58, 2)]
    assert "pictures        2 pictures of 2 views each (views opened by different markers): row 0 positions 2-58, " \
           "row 1 positions 2-58" in sparse.report.model.format()
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.01)
    assert decoder_lengths(sparse, forward_kwargs(model, inputs)[0], 1, optimizer) == [inputs["input_ids"].shape[1] - 24]
    assert sparse.runtimes["compress_visual_tokens"].last_plan.kept == 48


@pytest.mark.slow
def test_features_added_before_several_layers_are_gathered_at_the_kept_tokens():
    """Granite4Vision zeroes the image embeddings and adds features of several vision layers at the image positions
    before decoder layers 0 to 5. Compacted where the language model receives them, the loss equals the dense model
    run on a hand-compacted sequence whose added features are gathered at the kept tokens."""
    model, inputs = hf_models.BUILDERS["granite4_vision"]()
    kwargs = forward_kwargs(model, inputs)[0]
    reference_model = copy.deepcopy(model)
    policy = parse_policy("version: 1\nstages:\n  - {name: a, steps: 1, passes: {compress_visual_tokens: "
                          "{method: uniform, keep_ratio: 0.5}}}\n")
    sparse = sparsify(model, policy, inputs)
    assert sparse.report.model.boundary.decoder_entry == "model.language_model"
    loss = sparse(**kwargs).loss

    visual = inputs["input_ids"] == model.stsc_expected.placeholder_id
    keep, kept_ranks = ~visual, []
    for row in range(visual.shape[0]):
        positions = visual[row].nonzero().squeeze(-1)
        keep[row, positions[1::2]] = True  # uniform keep 0.5 of 36 tokens without a grid: floor((i + 0.5) * 2)
        kept_ranks += [row * len(positions) + i for i in range(1, len(positions), 2)]
    index = torch.stack([row.nonzero().squeeze(-1) for row in keep])
    added = []

    def compact(module, args, kw):
        kw = dict(kw)
        kw["inputs_embeds"] = kw["inputs_embeds"].gather(1, index[..., None].expand(-1, -1, 64))
        kw["attention_mask"] = kw["attention_mask"].gather(1, index)
        kw["vision_mask"] = kw["vision_mask"].gather(1, index[..., None])
        added.extend(kw["deepstack_features"])
        kw["deepstack_features"] = {layer: features[kept_ranks] for layer, features in kw["deepstack_features"].items()}
        return args, kw

    reference_model.model.language_model.register_forward_pre_hook(compact, with_kwargs=True)
    logits = reference_model(**{**kwargs, "labels": None}).logits
    labels = inputs["labels"].gather(1, index)
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert sorted(added) == list(range(6))  # features added before every layer
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_features_added_onto_every_position_refuse_compression_and_still_skip_layers():
    """Voxtral Realtime adds one audio frame onto every token embedding (no placeholders): no position holds audio
    alone, so compression is refused at sparsify with that reason; layer skipping trains (the skipped blocks get no
    gradient) and eval is the dense model."""
    model, inputs = hf_models.BUILDERS["voxtral_realtime"]()
    kwargs = forward_kwargs(model, inputs)[0]
    dense = copy.deepcopy(model).eval()
    with pytest.raises(UnsupportedModelError, match=r"^stage 'alignment', pass compress_visual_tokens: .*\(add_\): "
                       r"visual positions: the visual features are added onto every position of the merged sequence "
                       r"\(both \[2, 16, 64\]\): no position holds visual tokens alone$"):
        sparsify(model, "sts", inputs)
    sparse = sparsify(model, "lds", inputs, steps_per_epoch=2)
    sparse.set_progress(epoch=1.0, step=2)
    skipper = sparse.runtimes["skip_layers"]
    skipper.force([0, 1])
    sparse(**kwargs).loss.backward()
    assert skipper.last_skipped == [0, 1]
    layers = model.model.language_model.layers
    assert [any(p.grad is not None for p in layer.parameters()) for layer in layers] == [False, False, True]
    skipper.force(None)
    dense.load_state_dict(sparse.state_dict())
    with torch.no_grad():
        assert torch.equal(sparse.eval()(**kwargs).logits, dense(**kwargs).logits)


# ------------------------------------------------------------------------------------ fail early
def test_a_model_that_breaks_in_a_training_step_is_refused_at_sparsify():
    model, inputs = hf_models.BUILDERS["llava"]()
    original = model.model.language_model.forward

    def breaks_when_shortened(*args, **kwargs):  # e.g. a decoder that insists on its full sequence length
        if kwargs["inputs_embeds"].shape[1] != inputs["input_ids"].shape[1]:
            raise RuntimeError("shape '[2, 25, 64]' is invalid for input of size 1664")
        return original(*args, **kwargs)

    model.model.language_model.forward = breaks_when_shortened
    with pytest.raises(UnsupportedModelError) as err:
        sparsify(model, "sts", inputs)
    assert str(err.value).startswith(
        "stage 'alignment' (compress_visual_tokens): a training step on the example inputs failed: RuntimeError: "
        "shape '[2, 25, 64]' is invalid for input of size 1664 (found: compress_visual_tokens: boundary=scatter, "
        "visual_positions=eq(input_ids, 3), compacted_at=model.language_model, padding_removed=where attention_mask is "
        "0, method=uniform, tokens_per_image=16, "
        "kept_per_image=8)")


def test_sparsify_leaves_the_model_as_it_was():
    model, inputs = hf_models.BUILDERS["llava"]()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    sparsify(model, "sts", inputs)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in model.parameters())
