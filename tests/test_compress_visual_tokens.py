"""The Visual Token Compressor pass: selection methods, sequence consistency, training, eval."""

import copy
import subprocess
import sys

import pytest
import torch

import hf_models
import tiny_llava
from stsc import capture, match
from stsc.capture import forward_kwargs
from stsc.passes.compress_visual_tokens import (CompressVisualTokensConfig, apply, compress, uniform_indices)
from stsc.schedules import seeded_generator


def test_uniform_on_grid_hand_computed():
    assert uniform_indices(64, 16, (8, 8)) == [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]
    assert uniform_indices(64, 32, (8, 8)) == [r * 8 + c for r in range(8) for c in (1, 3, 5, 7)]
    assert uniform_indices(10, 3, None) == [1, 5, 8]


def test_random_draws_the_same_subset_in_another_process():
    code = ("import torch; from stsc.schedules import seeded_generator; "
            "print(torch.rand(2, 64, generator=seeded_generator(5, 9, 0)).argsort(-1)[:, :16].sort(-1).values.tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    features = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64, 1)
    kept = compress(features, CompressVisualTokensConfig(method="random", keep_ratio=0.25), None, 16,
                    seeded_generator(5, 9, 0))
    assert str(kept.squeeze(-1).long().sub(torch.tensor([[0], [64]])).tolist()) == other


def test_pool_takes_neighbourhood_means():
    features = torch.randn(3, 16, 5)
    pooled = compress(features, CompressVisualTokensConfig(method="pool", kernel=2), (4, 4), 4)
    grid = features.reshape(3, 4, 4, 5)
    expected = torch.stack([grid[:, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], dim=1)
    torch.testing.assert_close(pooled, expected)


def test_merge_averages_the_most_similar_tokens():
    base = torch.randn(1, 1, 8)
    features = torch.cat([base, base, -base, -base], dim=1)  # two pairs of identical tokens
    merged = compress(features, CompressVisualTokensConfig(method="merge", keep_ratio=0.5), None, 2)
    assert merged.shape == (1, 2, 8)
    torch.testing.assert_close(torch.sort(merged[0, :, 0]).values, torch.sort(torch.stack([base[0, 0, 0], -base[0, 0, 0]])).values)


def test_text_guided_keeps_tokens_most_similar_to_the_text():
    text = torch.eye(4)[:2]  # text embeddings along axes 0 and 1
    features = torch.eye(4).flip(0).unsqueeze(0)  # tokens along axes 3, 2, 1, 0
    kept = compress(features, CompressVisualTokensConfig(method="text_guided", keep_ratio=0.5), None, 2,
                    text_embeddings=[text])
    assert torch.equal(kept[0], torch.eye(4)[[1, 0]])  # tokens 2 and 3 of the image, in order


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
    if family == "gemma3" and method == "pool":  # its projector pools internally: no patch grid at the boundary
        with pytest.raises(ValueError, match="^method 'pool' needs the 2-D token grid, which the matcher could not "
                                             "derive$"):
            compressed(family, method=method)
        return
    model, dense, inputs, structure, compressor, info = compressed(family, method=method, keep_ratio=0.25)
    b = structure.boundary
    before = {k: v.clone() for k, v in inputs.items()}
    out, hidden = first_block_input(model, structure, inputs)
    n, k = b.tokens_per_image, compressor.kept
    assert k == n // 4
    text_len = inputs["input_ids"].shape[1]
    expected = text_len - (n - k) if b.kind == "scatter" else text_len + k  # one image per sample
    assert hidden.shape[1] == expected
    out["loss"].backward()
    projector = model.get_submodule(b.producer_module)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(torch.equal(inputs[key], before[key]) for key in inputs)  # caller's tensors untouched


def test_text_tokens_labels_and_masks_stay_aligned(tiny):
    model, _, inputs, structure, compressor, _ = compressed("tiny", keep_ratio=0.25)
    captured = {}
    model.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    model(**inputs)
    ids, labels, mask = captured["input_ids"], captured["labels"], captured["attention_mask"]
    placeholder = structure.boundary.placeholder_id
    assert ids.shape == (2, inputs["input_ids"].shape[1] - (64 - 16))
    assert int((ids == placeholder).sum(dim=1)[0]) == 16
    for row in range(2):
        text = inputs["input_ids"][row] != placeholder
        assert torch.equal(ids[row][ids[row] != placeholder], inputs["input_ids"][row][text])
        assert torch.equal(labels[row][ids[row] != placeholder], inputs["labels"][row][text])
        assert torch.equal(mask[row][ids[row] != placeholder], inputs["attention_mask"][row][text])
        assert bool((labels[row][ids[row] == placeholder] == -100).all())


@pytest.mark.parametrize("family", ["tiny", "llava", "paligemma", "gemma3"])
def test_eval_is_the_dense_model(family):
    model, dense, inputs, *_ = compressed(family, method="random", keep_ratio=0.25)
    model.eval(), dense.eval()
    with torch.no_grad():
        assert torch.equal(model(**forward_kwargs(model, inputs)[0])["logits"],
                           dense(**forward_kwargs(dense, inputs)[0])["logits"])


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
])
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError) as err:
        CompressVisualTokensConfig(**kwargs)
    assert str(err.value) == message


def test_projector_in_eval_mode_still_compresses_when_the_model_trains():
    """A frozen projector put in eval() must not desynchronize features from the shrunk sequence."""
    model, _, inputs, structure, compressor, _ = compressed("tiny", keep_ratio=0.25)
    projector = model.get_submodule(structure.boundary.producer_module)
    projector.eval()
    seen = []
    projector.register_forward_hook(lambda module, args, output: seen.append(output.shape))  # runs after ours
    model(**inputs)
    assert seen == [(2, 16, 64)]


def test_placeholder_run_that_is_not_whole_images_is_refused():
    model, _, inputs, *_ = compressed("tiny", keep_ratio=0.25)
    broken = dict(inputs, input_ids=inputs["input_ids"].clone())
    broken["input_ids"][:, 1:5] = 7  # 60 placeholders left where an image needs 64
    with pytest.raises(ValueError) as err:
        model(**broken)
    assert str(err.value) == "a run of 60 image placeholders (token 3) is not a whole number of images of 64 visual tokens"


def test_random_compression_resumes_with_the_same_draws():
    model, _, inputs, structure, compressor, _ = compressed("tiny", method="random", keep_ratio=0.25)
    outputs = []
    projector = model.get_submodule(structure.boundary.producer_module)
    projector.register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    compressor.set_progress(step=4)
    model(**inputs)
    state = compressor.state_dict()
    model(**inputs)
    compressor.load_state_dict(state)
    model(**inputs)
    assert torch.equal(outputs[1], outputs[2]) and not torch.equal(outputs[0], outputs[1])
