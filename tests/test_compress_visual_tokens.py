"""The Visual Token Compressor pass: what each method keeps, compaction at the decoder entry, training, eval."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hf_models
import tiny_llava
from stsc import capture, match
from stsc.capture import forward_kwargs
from stsc.layout import Image
from stsc.passes.compress_visual_tokens import (CompressVisualTokensConfig, apply, compact, compact_hidden, expand,
                                                plan, select, uniform_indices)
from stsc.schedules import seeded_generator


def test_uniform_on_grid_hand_computed():
    assert uniform_indices(64, 16, (8, 8)) == [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]
    assert uniform_indices(64, 32, (8, 8)) == [r * 8 + c for r in range(8) for c in (1, 3, 5, 7)]
    assert uniform_indices(10, 3, None) == [1, 5, 8]
    assert uniform_indices(4, 3, (2, 2)) == [0, 2, 3]  # no 3-token sub-grid of 2 x 2: evenly along the raster


def test_random_draws_the_same_subset_in_another_process():
    code = ("import torch; from stsc.schedules import seeded_generator; "
            "print(torch.rand(64, generator=seeded_generator(5, 9, 0)).argsort()[:16].sort().values.tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    groups = select(torch.randn(64, 8), CompressVisualTokensConfig(method="random", keep_ratio=0.25), None, 16,
                    seeded_generator(5, 9, 0))
    assert str([g[0] for g in groups]) == other


def test_pool_groups_are_grid_neighbourhoods():
    groups = select(torch.randn(16, 4), CompressVisualTokensConfig(method="pool", kernel=2), (4, 4), 4)
    assert groups == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_merge_groups_the_most_similar_tokens():
    base = torch.randn(8)
    features = torch.stack([base, base, -base, -base])  # two pairs of identical tokens
    groups = select(features, CompressVisualTokensConfig(method="merge", keep_ratio=0.5), None, 2)
    assert groups == [[0, 1], [2, 3]]


def test_text_guided_keeps_tokens_most_similar_to_the_text():
    text = torch.eye(4)[:2]  # text embeddings along axes 0 and 1
    features = torch.eye(4).flip(0)  # tokens along axes 3, 2, 1, 0
    groups = select(features, CompressVisualTokensConfig(method="text_guided", keep_ratio=0.5), None, 2, text=text)
    assert groups == [[2], [3]]


def test_plan_compacts_masks_positions_and_expands_back_hand_computed():
    """Row 0: text, a 4-token image, text; row 1: text and a 2-token image, text. Keep half of each image."""
    visual = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    images = [Image(0, (1, 2, 3, 4), None), Image(1, (3, 4), None)]
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1)
    p = plan(hidden, visual, images, CompressVisualTokensConfig(keep_ratio=0.5))
    # uniform keeps floor((i + 0.5) * n / k) of each image: tokens 1, 3 of row 0's image, token 1 of row 1's;
    # row 0 is one position shorter and repeats its last position
    assert p.index.tolist() == [[0, 2, 4, 5, 5], [0, 1, 2, 4, 5]]
    assert (p.tokens, p.kept) == (6, 3)
    assert compact_hidden(hidden, p).squeeze(-1).tolist() == [[0, 2, 4, 5, 5], [6, 7, 8, 10, 11]]
    mask4d = torch.arange(2 * 36).reshape(2, 1, 6, 6)  # rows and columns both follow
    assert torch.equal(compact(mask4d, p, 2, 6), torch.stack([mask4d[b][:, p.index[b]][:, :, p.index[b]]
                                                              for b in range(2)]))
    mrope = torch.arange(3 * 2 * 6).reshape(3, 2, 6)  # [3, B, T] positions keep their original values
    assert compact(mrope, p, 2, 6).tolist() == [[[r[b][i] for i in p.index[b].tolist()] for b in range(2)]
                                                for r in mrope.tolist()]
    rows = torch.arange(6).unsqueeze(-1)  # one row per visual token of the batch: the kept ones stay
    assert compact(rows, p, 2, 6).squeeze(-1).tolist() == [1, 3, 5]
    assert expand(compact_hidden(hidden, p), p, 2).squeeze(-1).tolist() == [[0, 0, 2, 2, 4, 5], [6, 7, 8, 8, 10, 11]]


def test_a_text_only_row_keeps_its_length_and_shorter_rows_repeat_their_last_position():
    visual = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    p = plan(torch.zeros(2, 5, 1), visual, [Image(0, (1, 2, 3, 4), None)], CompressVisualTokensConfig(keep_ratio=0.5))
    assert p.index.tolist() == [[0, 2, 4, 4, 4], [0, 1, 2, 3, 4]]


def test_averaging_methods_put_the_mean_in_the_first_members_slot():
    visual = torch.tensor([[0, 1, 1, 1, 1]], dtype=torch.bool)
    hidden = torch.tensor([[[9.], [1.], [2.], [3.], [4.]]])
    p = plan(hidden, visual, [Image(0, (1, 2, 3, 4), (2, 2))], CompressVisualTokensConfig(method="pool", kernel=2))
    assert p.index.tolist() == [[0, 1]]
    assert compact_hidden(hidden, p).squeeze(-1).tolist() == [[9.0, 2.5]]
    assert compact(hidden.reshape(5, 1)[1:], p, 1, 5).tolist() == [[2.5]]  # visual-aligned rows are averaged alike


# ------------------------------------------------------------------------------- on real models
def build(family):
    if family in ("tiny", "tiny_concat"):
        model = tiny_llava.build_model(merge="concat" if family == "tiny_concat" else "scatter")
        return model, tiny_llava.example_inputs(model)
    return hf_models.BUILDERS[family]()


def compressed(family, **config):
    model, inputs = build(family)
    dense = copy.deepcopy(model)
    structure = match(capture(model, inputs))
    compressor, info = apply(model, structure, CompressVisualTokensConfig(**config), inputs)
    return model, dense, inputs, structure, compressor, info


def first_block_input(model, structure, inputs):
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

    handle = model.get_submodule(structure.blocks[0].path).register_forward_pre_hook(record, with_kwargs=True)
    out = model(**forward_kwargs(model, inputs)[0])
    handle.remove()
    return out, seen["hidden"]


@pytest.mark.parametrize("family", ["tiny", "tiny_concat", "llava", "paligemma", "gemma3"])
@pytest.mark.parametrize("method", ["uniform", "random", "text_guided", "pool", "merge"])
def test_train_step_sequence_length_and_projector_gradient(family, method):
    model, dense, inputs, structure, compressor, info = compressed(family, method=method, keep_ratio=0.25)
    b = structure.boundary
    before = {k: v.clone() for k, v in inputs.items()}
    out, hidden = first_block_input(model, structure, inputs)
    n, k = b.tokens_per_image, info.details["kept_per_image"]
    assert k == n // 4
    dense_length = structure.hidden_shape[1]
    assert hidden.shape[1] == dense_length - (n - k)  # one image per sample
    assert out["logits"].shape[1] == dense(**forward_kwargs(dense, inputs)[0])["logits"].shape[1]  # expanded back
    out["loss"].backward()
    projector = model.get_submodule(b.producer_module)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(torch.equal(inputs[key], before[key]) for key in inputs)  # caller's tensors untouched


def test_loss_equals_the_model_run_on_a_hand_shortened_sequence():
    """The tiny model with the dropped placeholders removed from its inputs and its projector output cut to
    the kept tokens computes the very sequence stsc compacts: the losses agree."""
    model, dense, inputs, structure, compressor, info = compressed("tiny", keep_ratio=0.25)
    kept = uniform_indices(64, 16, (8, 8))
    placeholders = (inputs["input_ids"] == tiny_llava.IMAGE_TOKEN_ID).nonzero()[:, 1].reshape(2, 64)
    dropped = placeholders[:, [i for i in range(64) if i not in kept]]
    keep = torch.ones_like(inputs["input_ids"], dtype=torch.bool).scatter(1, dropped, False)
    shortened = {k: v[keep].reshape(2, -1) if k != "pixel_values" else v for k, v in inputs.items()}
    dense.projector.register_forward_hook(lambda module, args, output: output[:, kept])
    reference = dense(**shortened)["loss"]
    torch.testing.assert_close(model(**inputs)["loss"], reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["tiny", "llava", "paligemma", "gemma3", "qwen2_vl"])
def test_eval_is_the_dense_model(family):
    model, dense, inputs, *_ = compressed(family, method="random", keep_ratio=0.25)
    model.eval(), dense.eval()
    with torch.no_grad():
        assert torch.equal(model(**forward_kwargs(model, inputs)[0])["logits"],
                           dense(**forward_kwargs(dense, inputs)[0])["logits"])


def test_keep_everything_is_the_dense_model():
    model, dense, inputs, *_ = compressed("llava", keep_ratio=1.0)
    torch.testing.assert_close(model(**forward_kwargs(model, inputs)[0]).logits,
                               dense(**forward_kwargs(dense, inputs)[0]).logits, rtol=0, atol=0)


def cross_attention_inputs(model, inputs, layer):
    """Keys and their mask as the first cross-attention layer receives them, and the model output."""
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("keys", kwargs["cross_attention_states"])
        seen.setdefault("mask", kwargs["cross_attention_mask"])

    handle = model.get_submodule(layer).register_forward_pre_hook(record, with_kwargs=True)
    out = model(**forward_kwargs(model, inputs)[0])
    handle.remove()
    return out, seen["keys"], seen["mask"]


@pytest.mark.parametrize("method", ["uniform", "random"])
def test_cross_attention_keeps_keys_and_their_mask_aligned(method):
    model, dense, inputs, structure, compressor, info = compressed("mllama", method=method, keep_ratio=0.5)
    layer = "model.language_model.layers.1"  # the first cross-attention layer of the tiny Mllama
    _, dense_keys, dense_mask = cross_attention_inputs(dense, inputs, layer)
    out, keys, mask = cross_attention_inputs(model, inputs, layer)
    tiles, n, k = 2, compressor.tokens, compressor.kept
    assert (n, k) == (17, 8) and info.details["kept_per_row"] == 8  # a tile's 16 patches + class token
    assert keys.shape[-2:] == (k, dense_keys.shape[-1]) and mask.shape[-1] == tiles * k
    rows = dense_keys.reshape(-1, n, dense_keys.shape[-1])
    for row, kept_keys in enumerate(keys.reshape(-1, k, keys.shape[-1])):  # kept keys are rows of the dense keys
        distances = torch.cdist(kept_keys.detach(), rows[row].detach())
        assert bool((distances.min(dim=-1).values < 1e-6).all())
    out.loss.backward()
    projector = model.get_submodule(structure.boundary.producer_module)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    model.eval(), dense.eval()
    with torch.no_grad():
        assert torch.equal(model(**forward_kwargs(model, inputs)[0]).logits,
                           dense(**forward_kwargs(dense, inputs)[0]).logits)


def test_cross_attention_keep_everything_is_the_dense_model():
    model, dense, inputs, *_ = compressed("mllama", method="uniform", keep_ratio=1.0)
    torch.testing.assert_close(model(**forward_kwargs(model, inputs)[0]).logits,
                               dense(**forward_kwargs(dense, inputs)[0]).logits, rtol=0, atol=0)


def test_key_mask_selection_hand_computed():
    from stsc.passes.compress_visual_tokens import _select_keys

    mask = torch.arange(2 * 3 * 6).reshape(2, 1, 3, 6)  # batch 2, 3 queries, 2 rows x 3 keys per sample
    indices = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 0]])  # per (sample, row)
    expected = torch.stack([mask[0, ..., [0, 2, 4, 5]], mask[1, ..., [0, 1, 5, 3]]])
    assert torch.equal(_select_keys(mask, indices, 3), expected)


def test_cross_attention_refuses_averaging_methods():
    model, inputs = hf_models.mllama()
    with pytest.raises(ValueError) as err:
        apply(model, match(capture(model, inputs)), CompressVisualTokensConfig(method="pool"), inputs)
    assert str(err.value) == "method 'pool' is not supported for cross_attention merges; use uniform or random"


def test_pool_without_a_grid_is_refused():
    with pytest.raises(ValueError, match="^method 'pool' needs each image's 2-D token grid, and an image of 8 "
                                         "tokens has none the matcher could derive$"):
        compressed("blip2", method="pool")  # learned query tokens: no grid


def test_keep_ratio_below_one_token_is_refused(tiny):
    with pytest.raises(ValueError) as err:
        apply(tiny[0], match(capture(*tiny)), CompressVisualTokensConfig(keep_ratio=0.005), tiny[1])
    assert str(err.value) == ("keep_ratio 0.005 keeps 0 of 64 visual tokens per image; at least 1 must be kept "
                              "(keep_ratio >= 0.007812)")


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="crop"), "method must be one of uniform, random, text_guided, pool, merge, got 'crop'"),
    (dict(keep_ratio=0), "keep_ratio must be in (0, 1], got 0"),
    (dict(keep_ratio=1.5), "keep_ratio must be in (0, 1], got 1.5"),
    (dict(kernel=0), "kernel must be >= 1, got 0"),
    (dict(dense_fraction=1), "dense_fraction must be in [0, 1), got 1"),
    (dict(dense_fraction=-0.1), "dense_fraction must be in [0, 1), got -0.1"),
])
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError) as err:
        CompressVisualTokensConfig(**kwargs)
    assert str(err.value) == message


def test_a_call_without_the_inputs_the_positions_need_is_refused_clearly():
    model, _, inputs, *_ = compressed("tiny", keep_ratio=0.25)
    with pytest.raises(ValueError) as err:
        model(inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"})
    assert str(err.value) == ("the visual positions are computed from the model inputs input_ids; this call lacks "
                              "input_ids as keyword tensor arguments")


def test_random_compression_resumes_with_the_same_draws():
    model, _, inputs, structure, compressor, _ = compressed("tiny", method="random", keep_ratio=0.25)
    kept = []
    compressor.set_progress(step=4)
    for _ in range(2):
        model(**inputs)
        kept.append(compressor.last_plan.index)
    state = compressor.state_dict()
    model(**inputs)
    kept.append(compressor.last_plan.index)
    compressor.load_state_dict(state)
    model(**inputs)
    assert torch.equal(kept[2], compressor.last_plan.index) and not torch.equal(kept[0], kept[1])


def dense_draws(fraction: float, steps: int) -> list[bool]:
    """Which of ``steps`` forwards ``dense_fraction`` leaves dense: the first draw of each forward's generator."""
    return [float(torch.rand((), generator=seeded_generator(0, step, 0), dtype=torch.float64)) < fraction
            for step in range(steps)]


@pytest.mark.parametrize("family", ["tiny", "mllama"])
def test_dense_fraction_leaves_the_drawn_forwards_dense(family):
    """Forwards drawn dense keep every visual token and give the dense model's loss exactly; the others compress."""
    model, dense, inputs, structure, compressor, _ = compressed(family, method="random", keep_ratio=0.25,
                                                               dense_fraction=0.5)
    drawn = dense_draws(0.5, 8)
    assert 0 < sum(drawn) < 8  # both kinds of forward among these 8 steps
    for step, is_dense in enumerate(drawn):
        compressor.set_progress(step=step)
        loss = model(**forward_kwargs(model, inputs)[0])["loss"]
        kept, tokens = compressor.last_kept()
        assert (kept == tokens) == is_dense, step
        if is_dense:
            assert torch.equal(loss, dense(**forward_kwargs(dense, inputs)[0])["loss"])


def test_dense_fraction_shortens_the_expected_sequence_and_the_trial_step_still_compresses(tiny):
    import stsc
    from stsc.policy import parse_policy

    def expected(fraction):
        text = ("version: 1\nstages:\n  - name: a\n    epochs: 1\n    passes:\n      compress_visual_tokens: "
                f"{{keep_ratio: 0.25, dense_fraction: {fraction}}}\n")
        return stsc.sparsify(copy.deepcopy(tiny[0]), parse_policy(text), tiny[1]).report.stages[0]

    dense_length = expected(0).sequence
    assert expected(0).sequence_after == dense_length - 48  # 64 -> 16 visual tokens
    assert expected(0.25).sequence_after == dense_length - 0.75 * 48
    assert expected(0.99).passes[0]["matched"] == 1  # the trial step compressed although 99 % of steps are dense
