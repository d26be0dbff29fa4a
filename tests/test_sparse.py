"""sparsify(model, policy): shared parameters, stages, eval = dense, checkpoints, resume, compile."""

import copy

import pytest
import torch

import hf_models
import tiny_llava
from stsc import UnsupportedModelError, inspect, sparsify
from stsc.capture import forward_kwargs
from stsc.policy import PolicyError, parse_policy


def fresh():
    model = tiny_llava.build_model()
    return model, tiny_llava.example_inputs(model)


def test_dense_policy_gives_identical_outputs_and_gradients():
    model, inputs = fresh()
    reference = copy.deepcopy(model)
    sparse = sparsify(model, "dense", inputs)
    for progress in (0.0, 1.5):
        sparse.set_progress(epoch=progress)
        out, ref = sparse(**inputs), reference(**inputs)
        assert torch.equal(out["logits"], ref["logits"])
        out["loss"].backward()
        ref["loss"].backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_shares_the_callers_parameters_and_state_dict_keys():
    model, inputs = fresh()
    keys = list(model.state_dict())
    sparse = sparsify(model, "sts", inputs)
    assert sparse.model is model
    assert list(sparse.state_dict()) == keys
    assert {id(p) for p in sparse.parameters()} == {id(p) for p in model.parameters()}
    assert sparse.config is model.config  # attributes fall through to the model


def test_progress_selects_the_stage_and_its_passes():
    model, inputs = fresh()
    sparse = sparsify(model, "sts", inputs)
    sequence = inputs["input_ids"].shape[1]
    assert sparse.stage == "alignment" and list(sparse.runtimes) == ["compress_visual_tokens"]
    sparse(**inputs)
    assert sparse.runtimes["compress_visual_tokens"].last_plan.length == sequence - (64 - 32)  # 64 -> 32 tokens
    sparse.set_progress(epoch=1.0, step=3)
    assert sparse.stage == "instruction" and list(sparse.runtimes) == ["skip_layers"]
    assert sparse(**inputs)["logits"].shape[1] == sequence
    assert sparse.runtimes["skip_layers"].probabilities()[-1] == pytest.approx(0.75)  # start of the stage
    with pytest.warns(UserWarning, match="past the end of the last stage 'instruction' \\(2\\): the model runs dense"):
        sparse.set_progress(epoch=2.0)
    assert sparse.stage is None and sparse.runtimes == {}


def test_explicit_stage_counts_progress_from_its_start():
    model, inputs = fresh()
    sparse = sparsify(model, "sts", inputs, stage="instruction")
    assert sparse.stage == "instruction"
    sparse.set_progress(epoch=0.5)
    assert sparse.runtimes["skip_layers"].probabilities()[-1] == pytest.approx(0.75 * 0.25)
    assert [s.name for s in sparse.report.stages] == ["instruction"]


def test_unknown_stage_name_is_a_policy_error():
    model, inputs = fresh()
    with pytest.raises(PolicyError, match=r"sts\.yaml: no stage named 'pretrain'; stages: alignment, instruction$"):
        sparsify(model, "sts", inputs, stage="pretrain")


def test_steps_per_epoch_lets_steps_alone_move_an_epoch_policy():
    model, inputs = fresh()
    sparse = sparsify(model, "sts", inputs, steps_per_epoch=10)
    sparse.set_progress(step=15)
    assert sparse.stage == "instruction" and sparse.runtimes["skip_layers"].progress == pytest.approx(0.5)


@pytest.mark.parametrize("stage", ["alignment", "instruction"])
def test_eval_is_the_dense_model(stage):
    model, inputs = fresh()
    dense = copy.deepcopy(model).eval()
    sparse = sparsify(model, "sts", inputs, stage=stage).eval()
    assert torch.equal(sparse(**inputs)["logits"], dense(**inputs)["logits"])


def test_captures_at_the_first_call_without_example_inputs():
    model, inputs = fresh()
    sparse = sparsify(model, "sts")
    assert sparse.report is None
    with pytest.raises(TypeError, match="needs keyword arguments only"):
        sparse(inputs["input_ids"])
    sparse(**inputs)
    assert sparse.runtimes["compress_visual_tokens"].last_plan.length == inputs["input_ids"].shape[1] - 32
    assert sparse.report.model.blocks == [f"decoder.layers.{i}" for i in range(4)]


def test_report_states_expected_savings():
    model, inputs = fresh()
    alignment, instruction = sparsify(model, "sts", inputs).report.stages
    assert (alignment.sequence, alignment.sequence_after, alignment.layers_run) == (77, 45, 1.0)
    assert instruction.layers_run == pytest.approx(1 - 0.5 / 3, abs=1e-4)
    assert instruction.decoder_flops_saved == pytest.approx(0.5 / 3, abs=1e-4)
    assert alignment.passes[0]["details"]["kept_per_image"] == 32


def test_checkpoint_mid_stage_loads_into_the_original_class_and_resume_repeats_the_skips(tmp_path):
    def run(sparse, optimizer, steps):
        skipped = []
        for step in steps:
            sparse.set_progress(epoch=1 + step / 10, step=step)
            optimizer.zero_grad()
            sparse(**inputs)["loss"].backward()
            optimizer.step()
            skipped.append(sparse.runtimes["skip_layers"].last_skipped)
        return skipped

    model, inputs = fresh()
    sparse = sparsify(model, "sts", inputs)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.01)
    run(sparse, optimizer, range(3))
    torch.save({"model": sparse.state_dict(), "schedule": sparse.schedule_state()}, tmp_path / "ckpt.pt")
    uninterrupted = run(sparse, optimizer, range(3, 8))

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    original = tiny_llava.TinyLlava(tiny_llava.TinyLlavaConfig())
    original.load_state_dict(checkpoint["model"], strict=True)
    resumed = sparsify(original, "sts", inputs)
    resumed.load_schedule_state(checkpoint["schedule"])
    assert resumed.stage == "instruction"
    assert run(resumed, torch.optim.SGD(resumed.parameters(), lr=0.01), range(3, 8)) == uninterrupted
    assert any(uninterrupted)


def test_a_pass_that_cannot_apply_fails_at_sparsify_with_the_reason():
    model, inputs = hf_models.llama_text_only()
    with pytest.raises(UnsupportedModelError, match="^stage 'alignment', pass compress_visual_tokens: no vision "
                                                    "boundary found: the model has no floating-point input"):
        sparsify(model, "sts", inputs)
    assert sparsify(model, "lds", inputs, stage="instruction").report.stages[0].passes[0]["matched"] == 3


@pytest.mark.parametrize("family", ["llava", "paligemma", "gemma3", "idefics3", "mllama"])
def test_hf_families_train_through_both_stages(family):
    model, inputs = hf_models.BUILDERS[family]()
    sparse = sparsify(model, "sts", inputs)
    kwargs = forward_kwargs(model, inputs)[0]
    for epoch in (0.0, 1.0):
        sparse.set_progress(epoch=epoch, step=int(epoch))
        sparse.zero_grad()
        loss = sparse(**kwargs).loss
        loss.backward()
        assert torch.isfinite(loss)
        projector = list(model.get_submodule(sparse.report.model.boundary.producer_module).parameters())
        assert projector and all(p.grad is not None for p in projector)
    assert sparse.stage == "instruction"


@pytest.mark.slow
def test_compiled_sparse_model_recompiles_only_per_stage():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, inputs = fresh()
    policy = parse_policy("version: 1\nstages:\n"
                          "  - {name: a, steps: 4, passes: {compress_visual_tokens: {keep_ratio: 0.5}}}\n"
                          "  - {name: b, steps: 40, passes: {skip_layers: {schedule: constant, alpha: 0.5, eps: 0}}}\n")
    sparse = sparsify(model, policy, inputs)
    sparse.compile()
    compiled = torch.compile(sparse)
    counters.clear()
    graphs, patterns = {}, set()
    for step in range(44):
        sparse.set_progress(step=step)
        compiled(**inputs)["loss"].backward()
        if sparse.stage == "b":
            patterns.add(tuple(sparse.runtimes["skip_layers"].last_skipped))
        graphs.setdefault(sparse.stage, counters["stats"]["unique_graphs"])  # after the stage's first step
    assert len(patterns) >= 8  # p = 0.5 for every block
    assert counters["stats"]["unique_graphs"] == graphs["b"]  # no recompile after each stage's first step
    torch._dynamo.reset()


def test_schedule_state_loaded_before_the_first_call_applies_at_capture():
    model, inputs = fresh()
    sparse = sparsify(model, "sts", inputs)
    sparse.set_progress(epoch=1.5, step=7)
    state = sparse.schedule_state()
    lazy = sparsify(tiny_llava.build_model(), "sts")
    lazy.load_schedule_state(state)
    lazy(**inputs)
    assert lazy.stage == "instruction" and lazy.runtimes["skip_layers"].progress == pytest.approx(0.5)
    assert lazy.step == 7


def test_a_model_sparsified_twice_is_refused_until_unwrapped():
    model, inputs = fresh()
    sparse = sparsify(model, "sts", inputs, steps_per_epoch=2)
    message = ("this model is already sparsified: its passes are installed on it; call sparsify() once on the original "
               "model (sparse.unwrap() removes the passes and returns it)")
    for again in (lambda: sparsify(model, "sts", inputs), lambda: sparsify(sparse, "sts", inputs),
                  lambda: inspect(model, inputs)):
        with pytest.raises(UnsupportedModelError) as err:
            again()
        assert str(err.value) == message
    never_captured = sparsify(model, "sts")  # refused at its first call; unwrapping it leaves the first one's mark
    never_captured.unwrap()
    with pytest.raises(UnsupportedModelError, match="already sparsified"):
        inspect(model, inputs)
    assert sparsify(sparse.unwrap(), "sts", inputs, steps_per_epoch=2).report.model.blocks
