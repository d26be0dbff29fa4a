"""Padding goes with the dropped visual tokens: padded batches with several images per row and text-only rows, left
and right padding, on tiny HF families; the padding mask found by its values; what the runtime realised."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_models
import tiny_llava
from stsc import capture, match, sparsify
from stsc.capture import forward_kwargs
from stsc.layout import Image
from stsc.passes.compress_visual_tokens import CompressVisualTokensConfig, Plan, plan
from stsc.policy import parse_policy

ENTRY = "model.language_model"  # the decoder entry of every family in hf_models.PADDED_FAMILIES
QWEN_IMAGES = [[(1, 4, 4)], [(1, 4, 4), (1, 4, 8)], []]  # 4 tokens; 4 and 8 tokens; text only


def keep_policy(keep_ratio):
    return parse_policy("version: 1\nstages:\n  - {name: a, steps: 1, passes: {compress_visual_tokens: "
                        f"{{method: uniform, keep_ratio: {keep_ratio}}}}}}}\n")


def three_rows(family, side, length=None):
    """One image, two images, text only (qwen2_vl: images of 4, 4 + 8 tokens)."""
    images = QWEN_IMAGES if family == "qwen2_vl" else [1, 2, 0]
    return hf_models.padded_inputs(family, list(zip(images, [5, 3, 9])), side, length)


def decoder_length(sparse, inputs):
    """The sequence length the first decoder block receives, and the output of ``sparse``."""
    seen = []
    block = sparse.model.get_submodule(f"{ENTRY}.layers.0")
    handle = block.register_forward_pre_hook(lambda module, args, kw: seen.append(
        (args[0] if args else kw["hidden_states"]).shape[1]), with_kwargs=True)
    try:
        out = sparse(**inputs)
    finally:
        handle.remove()
    return seen[0], out


def odd_tokens_of_each_image(visual):
    """The positions uniform keep 0.5 keeps of each image here: tokens 1, 3, 5, ... of every run of visual positions
    (``floor((i + 0.5) * n / k)``; every image of these builds is a run of even length, or rows of even length)."""
    kept = torch.zeros_like(visual)
    for row in range(visual.shape[0]):
        rank = 0
        for position in range(visual.shape[1]):
            rank = rank + 1 if visual[row, position] else 0
            kept[row, position] = rank % 2 == 0 and rank > 0
    return kept


def row_by_row_loss(dense, inputs, keep):
    """The batch's loss computed by ``dense`` one row at a time, the row's decoder entry receiving only its ``keep``
    positions (no padding, no fill): hidden states, mask (2-D, or 4-D per layer type) and position ids selected by
    hand; the loss is the mean over the batch's labels, as the model's own."""
    batch, length = keep.shape
    total, count = 0.0, 0
    for row in range(batch):
        index = keep[row].nonzero().squeeze(-1)

        def pick(value, key=None):
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            if not isinstance(value, torch.Tensor):
                return value
            value = value[:, row:row + 1] if key == "position_ids" else value[row:row + 1]  # M-RoPE: [3, B, T]
            for dim in range(value.dim()):
                if value.shape[dim] == length:
                    value = value.index_select(dim, index)
            return value

        handle = dense.get_submodule(ENTRY).register_forward_pre_hook(
            lambda module, args, kw: (args, {k: pick(v, k) for k, v in kw.items()}), with_kwargs=True)
        try:
            logits = dense(**{**inputs, "labels": None}).logits[0]
        finally:
            handle.remove()
        labels = inputs["labels"][row, index]
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
        count += int((labels[1:] != -100).sum())
    return total / count


# --------------------------------------------------------------------------------------------- the plan
def test_plan_drops_padding_with_the_dropped_visual_tokens_hand_computed():
    """Row 0 left-padded by 2: pad pad text [4 visual] text; row 1 right-padded by 3: text [2 visual] pad pad pad;
    row 2 text only, left-padded by 4. Keep half of each image."""
    visual = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0], [0] * 8], dtype=torch.bool)
    real = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]).bool()
    images = [Image(0, (3, 4, 5, 6), None), Image(1, (1, 2), None)]
    p = plan(torch.zeros(3, 8, 1), visual, images, CompressVisualTokensConfig(keep_ratio=0.5), real=real)
    # row 0 keeps text 2, tokens 1 and 3 of its image (positions 4, 6), text 7: 4 positions, the longest row;
    # row 1 keeps 0, token 1 (position 2), 3, 4; row 2 its 4 text positions; shorter rows fill with position 7
    assert p.index.tolist() == [[2, 4, 6, 7], [0, 2, 3, 4], [4, 5, 6, 7]]
    assert p.lengths.tolist() == [4, 4, 4] and (p.tokens, p.kept) == (6, 3) and p.drops
    # each position takes the output of the last kept slot at or before it (slot 0 before the first)
    assert p.restore.tolist() == [[0, 0, 0, 0, 1, 1, 2, 3], [0, 0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 0, 1, 2, 3]]


def test_a_dense_forward_still_drops_padding_and_without_padding_changes_nothing():
    visual = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    real = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    dense = Plan.keep_all(visual, real)
    assert dense.index.tolist() == [[0, 1, 2], [1, 2, 3]] and dense.drops and dense.kept == dense.tokens == 4
    assert not Plan.keep_all(visual).drops and Plan.keep_all(visual).index.tolist() == [[0, 1, 2, 3]] * 2
    longest_unpadded = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert not Plan.keep_all(visual, longest_unpadded).drops  # as long as before: the entry runs on the batch as is


# ------------------------------------------------------------------------------------------ the matcher
class RenamedMask(nn.Module):
    """The example model with its padding mask passed as ``keep`` and an unused 0/1 input shaped like the tokens."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_llava.build_model()

    def forward(self, input_ids, pixel_values, keep, labels):
        return self.inner(input_ids, pixel_values, attention_mask=keep, labels=labels)


def test_the_padding_mask_is_found_by_its_values_and_use_not_its_name():
    model = RenamedMask()
    inputs = tiny_llava.example_inputs(model.inner)
    inputs["keep"] = inputs.pop("attention_mask")
    assert match(capture(model, inputs)).boundary.padding_input == "keep"


@pytest.mark.parametrize("family", ["paligemma", pytest.param("gemma3", marks=pytest.mark.slow),
                                    pytest.param("qwen2_vl", marks=pytest.mark.slow)])
def test_token_type_inputs_are_not_taken_for_the_padding_mask(family):
    """PaliGemma's token_type_ids are 0 on the image; Gemma3's and Qwen2-VL's type inputs are 0 on both sides of it."""
    model, inputs = hf_models.BUILDERS[family]()
    assert match(capture(model, inputs)).boundary.padding_input == "attention_mask"


def test_no_padding_mask_found_is_said():
    model = tiny_llava.build_model()
    inputs = tiny_llava.example_inputs(model)
    inputs["attention_mask"][0, 3] = 0  # a zero inside a row: not padding
    structure = match(capture(model, inputs))
    assert structure.boundary.padding_input is None
    assert ("padding mask: none found; looked for an integer 0/1 model input shaped like the token input, 1 at every "
            "visual position, zeros only at one end of a row; padding stays in the compacted sequence"
            in structure.notes)


# ---------------------------------------------------------------------------------------- on HF families
@pytest.mark.parametrize("family", [f if f in ("llava", "qwen2_vl") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in hf_models.PADDED_FAMILIES])
def test_left_padded_rows_with_two_images_and_text_only(family):
    """3 rows, left padded: one image, two images, text only. The decoder sequence is the longest row's kept
    positions (shorter than the padded length by that row's padding and dropped tokens); the loss equals the
    dense model run row by row on each row's kept positions; eval is the dense model."""
    model, example = hf_models.BUILDERS[family]()
    dense = copy.deepcopy(model)
    inputs = three_rows(family, "left")
    sparse = sparsify(model, keep_policy(0.5), example)
    assert sparse.report.stages[0].passes[0]["details"]["padding_removed"] == "where attention_mask is 0"
    visual = inputs["input_ids"] == model.stsc_expected.placeholder_id
    real, padded_length = inputs["attention_mask"].bool(), inputs["input_ids"].shape[1]
    dropped = visual.sum(dim=1) // 2  # uniform keep 0.5 halves every image (each has an even token count)
    padding = (~real).sum(dim=1)
    expected = int((real.sum(dim=1) - dropped).max())
    assert expected == padded_length - int((padding + dropped).min()) < padded_length - int(dropped.min())

    length, out = decoder_length(sparse, inputs)
    assert length == expected == sparse.runtimes["compress_visual_tokens"].last_plan.length
    assert out.logits.shape[:2] == inputs["input_ids"].shape  # expanded back to the caller's padded batch
    keep = real & (~visual | odd_tokens_of_each_image(visual))
    torch.testing.assert_close(out.loss, row_by_row_loss(dense, inputs, keep), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.get_submodule(sparse.report.model.boundary.producer_module)
               .parameters())
    sparse.eval(), dense.eval()
    with torch.no_grad():
        assert torch.equal(sparse(**inputs).logits, dense(**inputs).logits)


@pytest.mark.parametrize("family, side", [("llava", "left"),
                                          pytest.param("qwen2_vl", "right", marks=pytest.mark.slow),
                                          pytest.param("gemma3", "left", marks=pytest.mark.slow),
                                          pytest.param("mistral3", "right", marks=pytest.mark.slow)])
def test_only_padding_removed_gives_the_dense_padded_loss(family, side):
    """Nothing visual dropped (keep_ratio 1), every row padded (to a fixed length, as ``max_length`` collators do):
    the decoder sees the longest row's real positions, and the loss equals the dense padded model's to 1e-5 (left
    padding renumbers the positions of a decoder that numbers them itself: RoPE sees only their differences)."""
    model, example = hf_models.BUILDERS[family]()
    dense = copy.deepcopy(model)
    inputs = three_rows(family, side, length=48)
    sparse = sparsify(model, keep_policy(1.0), example)
    length, out = decoder_length(sparse, inputs)
    assert length == int(inputs["attention_mask"].sum(dim=1).max()) < 48
    torch.testing.assert_close(out.loss, dense(**inputs).loss, rtol=1e-5, atol=1e-5)


def test_qwen2_vl_right_padded_images_of_different_sizes():
    """A 64-token image and short text, a 4-token image and long text, right padded to 77: the decoder sees the
    rows' kept positions (77 - 32 and 66 - 2: 64), not 77 - 2 = 75 as when padding was kept."""
    model, example = hf_models.qwen2_vl()
    dense = copy.deepcopy(model)
    inputs = hf_models.padded_inputs("qwen2_vl", [([(1, 16, 16)], 10), ([(1, 4, 4)], 59)], "right")
    assert inputs["input_ids"].shape[1] == 77 and inputs["attention_mask"].sum(dim=1).tolist() == [77, 66]
    sparse = sparsify(model, keep_policy(0.5), example)
    length, out = decoder_length(sparse, inputs)
    assert length == 64
    visual = inputs["input_ids"] == 5
    keep = inputs["attention_mask"].bool() & (~visual | odd_tokens_of_each_image(visual))
    torch.testing.assert_close(out.loss, row_by_row_loss(dense, inputs, keep), rtol=1e-5, atol=1e-5)
    realised = sparse.runtimes["compress_visual_tokens"].realised()
    assert (realised.forwards, realised.padded, realised.seen, realised.kept) == (1, 2 * 77, 2 * 64, 45 + 64)


def test_a_batch_without_a_padding_mask_keeps_its_padding_as_before():
    model, example = hf_models.llava()
    inputs = three_rows("llava", "right")
    inputs.pop("attention_mask")
    sparse = sparsify(model, keep_policy(0.5), example)
    length, _ = decoder_length(sparse, inputs)
    assert length == inputs["input_ids"].shape[1]  # the text-only row drops nothing: the batch stays as long
    realised = sparse.runtimes["compress_visual_tokens"].realised()
    assert realised.seen == realised.padded == 3 * length


def test_realised_positions_add_up_over_forwards(tiny):
    """The example: 77 positions, row 1 right-padded by 2; keep 0.25 drops 48 of each row's 64 visual tokens."""
    sparse = sparsify(copy.deepcopy(tiny[0]), keep_policy(0.25), tiny[1])
    for _ in range(3):
        sparse(**tiny[1])
    realised = sparse.runtimes["compress_visual_tokens"].realised()
    assert (realised.forwards, realised.padded, realised.seen, realised.kept) == (3, 3 * 2 * 77, 3 * 2 * 29,
                                                                                   3 * (29 + 27))
    assert realised.format() == ("decoder positions over 3 training forwards: 174 of 462 padded (37.7 %); rows' kept "
                                 "positions 168 (seen / kept 1.036)")


def test_a_padding_mask_over_visual_positions_is_refused(tiny):
    sparse = sparsify(copy.deepcopy(tiny[0]), keep_policy(0.25), tiny[1])
    inputs = {**tiny[1], "attention_mask": tiny[1]["attention_mask"].clone()}
    inputs["attention_mask"][0, :10] = 0  # bos and 9 placeholders
    with pytest.raises(ValueError, match="^compress_visual_tokens: the padding mask 'attention_mask' marks visual "
                                         "positions as padding$"):
        sparse(**inputs)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["blip2", "smolvlm", "kosmos2", "llava_next_mixed", "qwen2_5_vl", "glm4v", "fuyu",
                                    "lfm2_vl", "gemma3n"])
def test_padding_found_and_removed_on_more_families(family):
    """The family's example with its last 3 positions padding in every row, nothing visual dropped: the decoder sees
    3 positions fewer and the loss is the dense padded model's (one family per way images enter the sequence)."""
    model, example = hf_models.BUILDERS[family]()
    dense = copy.deepcopy(model)
    inputs = {**example, "attention_mask": example["attention_mask"].clone(), "labels": example["labels"].clone()}
    inputs["attention_mask"][:, -3:] = 0
    inputs["labels"][:, -3:] = -100
    sparse = sparsify(model, keep_policy(1.0), example)
    assert sparse.report.model.boundary.padding_input == "attention_mask"
    loss = sparse(**forward_kwargs(model, inputs)[0]).loss
    assert sparse.runtimes["compress_visual_tokens"].last_plan.length == inputs["input_ids"].shape[1] - 3
    torch.testing.assert_close(loss, dense(**forward_kwargs(dense, inputs)[0]).loss, rtol=1e-5, atol=1e-5)
