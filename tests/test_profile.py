"""`stsc profile`: the measures, the model left as it was, the proposal and its policy, the command."""

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

import hf_models
import tiny_llava
from stsc import UnsupportedModelError
from stsc.capture import forward_kwargs
from stsc.cli import main
from stsc.loader import ModelFileError, load_model_and_batches
from stsc.passes.compress_visual_tokens import METHODS
from stsc.passes.skip_layers import SkipLayersConfig
from stsc.policy import parse_policy
from stsc.profile import BlockProfile, TokenPoint, hidden_change, neighbour_similarity, profile
from stsc.profile_output import compare
from stsc.proposal import choose_alpha, choose_compression, fit_eps, skip_estimate
from stsc.schedules import draw_skips, layer_probabilities

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_llava.py"


def own_loss(model, batch, seed=0):
    """The model's own training-mode loss on ``batch`` (with gradients, as a training step computes it)."""
    model.train()
    torch.manual_seed(seed)
    return model(**forward_kwargs(model, batch)[0])["loss"].item()


def state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            torch.get_rng_state())


def tiny():
    model = tiny_llava.build_model()
    return model, tiny_llava.example_inputs(model)


def llava_with_dropout():
    """Tiny HF LLaVA whose attention drops 20 %: equal losses then need equal RNG states."""
    model, inputs = hf_models.llava()
    for layer in model.model.language_model.layers:
        layer.self_attn.attention_dropout = 0.2
    return model, inputs


CASES = {  # family -> (builder, profile arguments)
    "tiny": (tiny, {}),
    "llava": (llava_with_dropout, {"methods": ("uniform", "merge"), "samples": 2}),
    "paligemma": (hf_models.paligemma, {"methods": ("uniform", "pool"), "samples": 2}),
}


@pytest.fixture(scope="module", params=[f if f == "tiny" else pytest.param(f, marks=pytest.mark.slow) for f in CASES])
def profiled(request):
    builder, kwargs = CASES[request.param]
    model, inputs = builder()
    model.eval()  # profiling trains; the flags must come back as they were, mixed ones included
    next(model.children()).train()
    torch.manual_seed(1234)
    before = state(model)
    result = profile(model, [inputs], **kwargs)
    return model, inputs, before, state(model), result


def test_model_is_left_as_it_was(profiled):
    model, _, (params, modes, rng), (params_after, modes_after, rng_after), _ = profiled
    assert modes_after == modes and not all(modes) and any(modes)
    assert params_after.keys() == params.keys()
    assert all(torch.equal(params[k], params_after[k]) for k in params)
    assert torch.equal(rng, rng_after)
    assert all(p.grad is None for p in model.parameters())


def test_dense_loss_is_the_models_own_loss_and_keep_ratio_one_changes_nothing(profiled):
    model, inputs, _, _, result = profiled
    assert result.dense_losses == [own_loss(model, inputs)]
    ones = [p for p in result.tokens.points if p.keep_ratio == 1.0 or p.kernel == 1]
    assert {p.method for p in ones} == {p.method for p in result.tokens.points}
    assert all(p.loss_increase == 0.0 and p.kept_fraction == 1.0 for p in ones)
    assert all(p.loss_increase != 0.0 for p in result.tokens.points if p.kept_fraction < 1)


def test_every_block_and_setting_is_measured(profiled):
    _, _, _, _, result = profiled
    assert result.tokens.not_measured == []
    assert all(b.change > 0 and b.skip_increase is not None for b in result.blocks)
    tokens = result.tokens.tokens_per_image
    assert len(result.tokens.neighbour_similarity) == 2  # two images in the batch
    assert all(-1 <= s <= 1 for s in result.tokens.neighbour_similarity)
    uniform = {p.keep_ratio: p.kept_fraction for p in result.tokens.curve("uniform")}
    assert uniform == {r: round(tokens * r) / tokens for r in (1.0, 0.75, 0.5, 0.25, 0.125)}


def test_proposed_policy_loads_with_stsc_validate(profiled, tmp_path, capsys):
    _, _, _, _, result = profiled
    path = tmp_path / "policy.yaml"
    path.write_text(result.proposal.yaml())
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: valid, version 1, seed 0, 2 stage(s)")
    alignment, instruction = result.proposal.policy.stages
    skip = instruction.pass_config("skip_layers")
    assert (skip.alpha, skip.eps) == (result.proposal.skipping["alpha"], result.proposal.skipping["eps"])
    assert skip.alpha * (1 + skip.eps) <= 1
    point = result.proposal.compression
    assert point["loss_increase"] <= result.proposal.budget == 0.01 * result.dense_loss
    assert alignment.pass_config("compress_visual_tokens").method == point["method"]


def test_check_draws_the_proposed_schedules_patterns_at_the_stage_start(profiled):
    _, _, _, _, result = profiled
    check, policy = result.proposal.check, result.proposal.policy
    skip = policy.stages[1].pass_config("skip_layers")
    probabilities = layer_probabilities(skip.skip_schedule(), len(result.blocks), 0.0)
    assert check["patterns"] == [draw_skips(probabilities, policy.seed, step, 0, skip.min_kept)
                                 for step in range(check["samples"])]  # one batch: one forward per step
    assert check["layers"] is not None and check["both"] is not None


# ------------------------------------------------------------------------------ redundant models
def identity_blocks(model):
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.o_proj.weight.zero_()
            layer.down_proj.weight.zero_()
    return model


def test_identity_blocks_are_fully_redundant_and_get_the_largest_alpha():
    model, inputs = tiny()
    result = profile(identity_blocks(model), [inputs], methods=["uniform"], samples=2)
    assert [(b.change, b.skip_increase) for b in result.blocks] == [(0.0, 0.0)] * 4
    assert result.proposal.skipping == {"alpha": 1.0, "eps": 0.0, "estimate": 0.0, "fit": (0.0, 0.0)}
    assert result.proposal.check["layers"] == 0.0
    assert result.proposal.policy.stages[1].pass_config("skip_layers").alpha == 1.0


def test_model_without_a_vision_boundary_gets_the_layer_profile_and_says_why_not_the_tokens():
    model, inputs = hf_models.llama_text_only()
    result = profile(model, [inputs], samples=1)
    assert result.tokens.points == [] and result.tokens.neighbour_similarity == []
    assert result.tokens.not_measured == [
        "neighbour similarity: the visual positions of the merged sequence are unknown",
        "compression: not supported: no vision boundary found: the model has no floating-point input (pixels) "
        "besides tokens"]
    assert all(b.change > 0 and b.skip_increase is not None for b in result.blocks)
    assert result.proposal.notes[0] == "compress_visual_tokens left out: visual-token compression was not measured"
    assert [s["passes"] for s in result.proposal.stages] == [
        {}, {"skip_layers": {"schedule": "sts", "alpha": result.proposal.skipping["alpha"],
                             "eps": result.proposal.skipping["eps"]}}]
    assert "compression: not supported: no vision boundary found" in result.format()


@pytest.mark.slow
def test_cross_attention_model_measures_its_keys_and_says_which_methods_it_cannot_use():
    model, inputs = hf_models.mllama()
    result = profile(model, [inputs], methods=["uniform", "merge"], keep_ratios=[1.0, 0.5], samples=1)
    assert result.dense_losses == [own_loss(model, inputs)]
    assert [(p.method, p.keep_ratio, p.kept_fraction) for p in result.tokens.points] == [
        ("uniform", 1.0, 1.0), ("uniform", 0.5, 8 / 17)]  # 17 keys per tile (16 patches and a class token)
    assert result.tokens.points[0].loss_increase == 0.0 != result.tokens.points[1].loss_increase
    assert result.tokens.not_measured == [
        "merge: method 'merge' is not supported for cross_attention merges; use uniform or random"]
    assert len(result.tokens.neighbour_similarity) == 4  # 2 samples x 2 tiles
    assert "nearest-neighbour cosine per row of keys (tile)" in result.format()


def test_no_decoder_blocks_is_unsupported():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    with pytest.raises(UnsupportedModelError, match="^profile needs decoder blocks: no decoder blocks found"):
        profile(model, [{"input": torch.randint(0, 10, (2, 5))}])


def test_bad_arguments():
    model, inputs = tiny()
    with pytest.raises(ValueError, match="^profile needs at least one batch$"):
        profile(model, [])
    with pytest.raises(ValueError, match="^methods must be some of uniform, random, text_guided, pool, merge, got "
                                         "tome$"):
        profile(model, [inputs], methods=["tome"])
    with pytest.raises(ValueError, match=r"^keep ratios must be in \(0, 1\], got \[0.0\]$"):
        profile(model, [inputs], keep_ratios=[0])


# ------------------------------------------------------------------------------------- the measures
def test_hidden_change_is_one_minus_cosine_and_exactly_zero_for_the_identity():
    h = torch.randn(2, 5, 16)
    assert hidden_change(h, h) == 0.0
    assert hidden_change(h, 3 * h) == pytest.approx(0.0, abs=1e-12)  # scale does not matter
    assert hidden_change(h, -h) == pytest.approx(2.0)
    other = torch.randn(2, 5, 16)
    expected = (1 - torch.nn.functional.cosine_similarity(h.double(), other.double(), dim=-1)).mean().item()
    assert hidden_change(h, other) == pytest.approx(expected, abs=1e-12)


def test_neighbour_similarity_hand_computed():
    tokens = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    root = 2 ** -0.5
    assert neighbour_similarity(tokens) == pytest.approx((root + root + root + 0.0) / 4)
    assert neighbour_similarity(torch.tensor([[1.0, 2.0], [2.0, 4.0]])) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- the proposal
def block(index, change, skip_increase, kind=0):
    return BlockProfile(index, f"layers.{index}", kind, change, skip_increase)


def test_eps_mirrors_the_relative_depth_slope_of_the_change():
    # change 0.3, 0.2, 0.1 at x = -1, 0, 1: line a = 0.2, b = -0.1, so eps = 0.5
    assert fit_eps({0: 0.3, 1: 0.2, 2: 0.1}, 3) == (0.5, pytest.approx((0.2, -0.1)))
    assert fit_eps({0: 0.1, 1: 0.2, 2: 0.3}, 3)[0] == 0.0  # growing with depth: the schedule cannot follow
    assert fit_eps({0: 0.9, 1: 0.1, 2: 0.0}, 3)[0] == 1.0  # clipped
    assert fit_eps({0: 0.0, 1: 0.0}, 2) == (0.0, (0.0, 0.0))  # nothing changes anywhere
    assert fit_eps({1: 0.4}, 3) == (0.0, None)


def test_alpha_is_the_largest_whose_first_order_estimate_fits_the_budget():
    blocks = [block(0, 0.3, 0.04), block(1, 0.2, 0.02), block(2, 0.1, -0.01)]
    base = SkipLayersConfig(alpha=0.0, eps=0.5)
    # p_l(0) = alpha * (0.5, 1.0, 1.5); estimate = alpha * (0.5 * 0.04 + 1.0 * 0.02 + 0) = 0.04 * alpha
    assert skip_estimate(SkipLayersConfig(alpha=0.5, eps=0.5), blocks) == pytest.approx(0.02)
    assert choose_alpha(base, blocks, budget=0.02).alpha == 0.5
    assert choose_alpha(base, blocks, budget=0.0101).alpha == 0.25  # 0.2525, rounded down
    assert choose_alpha(base, blocks, budget=1.0).alpha == 0.66  # capped: alpha * (1 + eps) <= 1
    assert choose_alpha(base, blocks, budget=0.0003) is None  # below 0.01
    unskippable = [block(0, 0.3, None), block(1, 0.2, None)]
    assert choose_alpha(base, unskippable, budget=1.0) is None
    assert choose_alpha(SkipLayersConfig(alpha=0.0, eps=0.0, never_skip_first=1), blocks, 0.02).alpha == 1.0


def test_compression_keeps_the_fewest_tokens_within_the_budget():
    points = [TokenPoint("uniform", 1.0, None, 1.0, 0.0), TokenPoint("uniform", 0.5, None, 0.5, 0.01),
              TokenPoint("uniform", 0.25, None, 0.25, 0.05), TokenPoint("merge", 0.5, None, 0.5, 0.005),
              TokenPoint("pool", None, 2, 0.25, 0.02)]
    assert choose_compression(points, 0.02) == points[4]
    assert choose_compression(points, 0.01) == points[3]
    assert choose_compression(points, 0.001) is None


# ---------------------------------------------------------------------------------------- the command
@pytest.mark.slow
def test_command_writes_the_table_the_json_the_picture_and_the_policy(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["profile", str(EXAMPLE), "--out", str(out), "--methods", "uniform,pool", "--samples", "2"]) == 0
    captured = capsys.readouterr()
    assert "stsc: profile [1/" in captured.err and "] dense forward" in captured.err
    assert re.search(r"^    uniform +\+0 +[-+]", captured.out, re.M)
    assert "    0      decoder.layers.0" in captured.out
    assert captured.out.strip().endswith(f"wrote {out}/profile.json, {out}/policy.yaml, {out}/profile.png")
    data = json.loads((out / "profile.json").read_text())
    assert [b["path"] for b in data["blocks"]] == [f"decoder.layers.{i}" for i in range(4)]
    assert data["dense_losses"] == [own_loss(*tiny())]
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "policy.yaml").read_text()
    assert text.startswith("# Proposed by `stsc profile`: tolerance 0.01 of the dense loss")
    assert parse_policy(text).to_dict() == parse_policy(data["proposal"]["yaml"]).to_dict()
    assert main(["validate", str(out / "policy.yaml")]) == 0


def test_command_usage_errors(capsys):
    assert main(["profile", str(EXAMPLE), "--methods", "uniform,tome"]) == 2
    assert capsys.readouterr().err.strip() == f"stsc: error: methods must be some of {', '.join(METHODS)}, got tome"
    assert main(["profile", str(EXAMPLE), "--tolerance", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "stsc: error: tolerance must be >= 0 (a fraction of the dense loss), got -1.0"
    assert main(["profile", str(EXAMPLE), "--samples", "0"]) == 2
    assert capsys.readouterr().err.strip() == "stsc: error: samples must be >= 1, got 0"
    assert main(["profile", str(EXAMPLE), "--policy", "stss"]) == 2
    assert capsys.readouterr().err.strip().startswith("stsc: error: stss: no such policy file or preset; presets: ")


# ---------------------------------------------------------------------------------- batches() in model files
MODEL_FILE = """
    import sys
    sys.path.insert(0, {examples!r})
    import tiny_llava

    def build_model():
        return tiny_llava.build_model()

    def example_inputs(model):
        return tiny_llava.example_inputs(model)

    def batches(model):
        for text_tokens in (12, 6):
            yield tiny_llava.example_inputs(model, text_tokens=text_tokens)
"""


@pytest.mark.slow
def test_model_file_batches_are_profiled_and_averaged(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(MODEL_FILE.format(examples=str(ROOT / "examples"))))
    model, inputs, batches = load_model_and_batches(path)
    assert [b["input_ids"].shape[1] for b in batches] == [77, 71]
    settings = dict(methods=["uniform"], keep_ratios=[1.0, 0.5], samples=1)
    result = profile(model, batches, inputs, **settings)
    assert result.batches == 2
    assert result.dense_losses == [own_loss(model, batch) for batch in batches]
    singles = [profile(model, [batch], inputs, **settings) for batch in batches]
    assert result.tokens.neighbour_similarity == [s for single in singles for s in single.tokens.neighbour_similarity]
    half = [single.tokens.points[1].loss_increase for single in singles]
    assert result.tokens.points[1].loss_increase == pytest.approx(sum(half) / 2, abs=1e-12)
    for index, block in enumerate(result.blocks):
        assert block.change == pytest.approx(sum(s.blocks[index].change for s in singles) / 2, abs=1e-12)
        assert block.skip_increase == pytest.approx(sum(s.blocks[index].skip_increase for s in singles) / 2, abs=1e-12)
    table = compare({"12 text tokens": singles[0], "6 text tokens": singles[1]}).splitlines()
    assert table[0] == " " * 26 + "  12 text tokens   6 text tokens"
    assert table[1] == f"{'dense_loss':<26}" + "".join(f"{s.dense_loss:>16.4g}" for s in singles)
    assert table[3] == f"{'uniform keep 0.5':<26}" + "".join(f"{h:>16.4g}" for h in half)
    assert [row[:26].rstrip() for row in table[1:]] == list(singles[0].summary())


@pytest.mark.parametrize("source, message", [
    ("def batches():\n    yield [1]\n", "{path}: batches()[0] is list, expected a dict of forward keyword arguments"),
    ("def batches():\n    return []\n", "{path}: batches() yielded no batch"),
    ("def batches():\n    yield {{'input': torch.zeros(1, 2)}}\n    raise OSError('disk')\n",
     "{path}:8: batches() failed: OSError: disk"),
    ("batches = 3\n", "{path}: batches is int, expected a function yielding dicts of forward keyword arguments"),
    ("def batches():\n    yield {{'input': torch.zeros(1, 3)}}\n", "{path}: the model does not run on batches()[0]: "),
])
def test_bad_batches_give_one_line_errors(tmp_path, source, message):
    path = tmp_path / "model.py"
    path.write_text("import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n"
                    "def example_inputs():\n    return {'input': torch.zeros(1, 2)}\n" + source.format())
    with pytest.raises(ModelFileError) as error:
        load_model_and_batches(path)
    assert str(error.value).startswith(message.format(path=path))
