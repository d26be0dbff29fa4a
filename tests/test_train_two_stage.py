"""The CI-sized two-stage benchmark: the LLaVA recipe's pipeline works (every policy trains, compression and
skipping happen, the encoder stays frozen, alignment trains the projector alone), and its outputs are written."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_two_stage  # noqa: E402


def test_task_is_deterministic_and_split_by_image():
    first = train_two_stage.make_batches("instruction", 8, 4, seed=3, tokens_per_image=4)
    again = train_two_stage.make_batches("instruction", 8, 4, seed=3, tokens_per_image=4)
    held_out = train_two_stage.make_batches("instruction", 8, 4, seed=1000, tokens_per_image=4)
    for a, b in zip(first, again):
        assert all(a[key].equal(b[key]) for key in a)
    assert not first[0]["pixel_values"].equal(held_out[0]["pixel_values"])
    words = [train_two_stage.WORDS[i] for i in first[0]["input_ids"][0].tolist()]
    assert words[:1 + 4] == ["<bos>"] + ["<image>"] * 4 and "answer" in words and "<eos>" in words
    answer = [train_two_stage.WORDS[i] for i in first[0]["labels"][0].tolist() if i != -100]
    assert answer[-1] == "<eos>" and 2 <= len(answer) <= 3
    text_only = train_two_stage.make_batches("alignment", 4, 4, seed=3, tokens_per_image=0)[0]["input_ids"]
    assert train_two_stage.VOCAB["<image>"] not in text_only.tolist()[0]


def test_quadrant_labels_name_each_quadrants_colour_and_shape():
    scene = train_two_stage.Scene([("blue", "square", ("top", "right")), ("red", "circle", ("bottom", "left"))])
    assert train_two_stage.quadrant_labels(scene).tolist() == [[0, 0], [3, 2], [1, 1], [0, 0]]


def test_step_flops_put_the_decoder_first_as_in_llava():
    model = train_two_stage.build_model(type("Args", (), {"hidden": 128, "layers": 8})())
    for name, shares in train_two_stage.flop_report(model, sequence=79).items():
        for stage, parts in shares.items():
            assert sum(parts.values()) == pytest.approx(1.0)
            assert parts["decoder"] > 0.9 and parts["vision encoder"] < 0.05, (name, stage)
        assert shares["instruction"]["decoder"] > shares["alignment"]["decoder"]  # weight gradients too


def _run(evals, seconds=None):
    """A run's result as train_seed gives it: ``evals`` as (wall-clock, accuracy) pairs, one stage."""
    seconds = seconds or evals[-1][0]
    return {"accuracy": evals[-1][1], "seconds": seconds, "evals": [{"seconds": t, "accuracy": a} for t, a in evals],
            "stages": {"instruction": {"seconds": seconds, "tokens": 100, "layers": 8, "steps": 4}}}


def test_time_to_accuracy_is_read_from_the_first_evaluation_reaching_each_target():
    dense = _run([(10, 0.5), (20, 0.8), (30, 0.79)])  # final 0.79, first reached at 20 s
    fast = _run([(5, 0.6), (10, 0.785), (15, 0.795)])  # 0.79 at 15 s; 0.99 * 0.79 = 0.7821 at 10 s
    never = _run([(5, 0.6), (10, 0.7), (15, 0.78)])
    figures = train_two_stage.seed_figures({"dense": dense, "fast": fast, "never": never})
    assert figures["dense"]["to accuracy"] == {"dense": 1.0, "0.99 dense": 1.0}
    assert figures["fast"]["to accuracy"] == {"dense": pytest.approx(20 / 15), "0.99 dense": pytest.approx(20 / 10)}
    assert figures["fast"]["reached_at"] == 15 and figures["fast"]["speedup"] == 2.0
    assert figures["never"]["to accuracy"] == {"dense": None, "0.99 dense": None}


def test_mean_curve_time_to_accuracy_averages_the_seeds_curves():
    seeds = [{"dense": _run([(10, 0.70), (20, 0.80)]), "fast": _run([(5, 0.76), (10, 0.79)])},
             {"dense": _run([(12, 0.74), (22, 0.76)]), "fast": _run([(7, 0.70), (12, 0.79)])}]
    # per seed, fast misses dense's 0.80 in the first seed; the mean curves: dense 0.72 then 0.78 (at 21 s),
    # fast 0.73 then 0.79 (at 11 s)
    per_seed = [train_two_stage.seed_figures(runs) for runs in seeds]
    assert [f["fast"]["to accuracy"]["dense"] for f in per_seed] == [None, pytest.approx(22 / 12)]
    mean = train_two_stage.mean_curve_speedups(seeds)
    assert mean == {"dense": 1.0, "fast": pytest.approx(21 / 11)}
    summary = train_two_stage.summarize(per_seed, mean)
    assert summary["fast"]["to accuracy"]["dense"] == {"per_seed": [None, pytest.approx(22 / 12)], "reached": 1,
                                                        "mean": None}
    assert summary["fast"]["to accuracy"]["dense, mean curve"] == pytest.approx(21 / 11)


def test_a_failing_evaluation_worker_is_reported_not_waited_for():
    args = argparse.Namespace(hidden=32, layers=1, eval_images=50)
    evaluator = train_two_stage.Evaluator(args)
    evaluator.submit(torch.nn.Linear(2, 2), {"accuracy": None})  # not the model's weights: loading them fails
    with pytest.raises(RuntimeError, match=r"^the evaluation worker exited \(code 1\)$"):
        evaluator.collect(wait=True)


def test_untimed_work_runs_with_its_own_threads():
    before = torch.get_num_threads()
    with train_two_stage.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run, recording each run's weights as it enters each stage."""
    out = tmp_path_factory.mktemp("two_stage")
    at_entry = {"alignment": {}, "instruction": {}}
    enter = train_two_stage.Run.enter

    def recording_enter(self, stage, lr, steps):
        at_entry[stage][self.name] = {k: v.clone() for k, v in self.sparse.model.state_dict().items()}
        enter(self, stage, lr, steps)

    train_two_stage.Run.enter = recording_enter
    try:
        result = train_two_stage.main(["--quick", "--out", str(out)])
    finally:
        train_two_stage.Run.enter = enter
    return out, result, at_entry


@pytest.mark.slow
def test_quick_run_trains_every_policy_and_the_sparse_ones_compress_and_skip(quick):
    out, result, _ = quick
    runs = result["seeds"][0]["runs"]
    assert list(runs) == ["dense", "sts", "profile", "sts_fast"]
    for run in runs.values():
        assert [e["stage"] for e in run["log"]] == ["alignment"] * 4 + ["instruction"] * 4
        assert len(run["evals"]) >= 2 and all(0 <= e["accuracy"] <= 1 for e in run["evals"])  # every one filled in
    stages = {name: run["stages"] for name, run in runs.items()}
    dense = stages["dense"]
    assert stages["sts"]["alignment"]["tokens"] < dense["alignment"]["tokens"]  # compressed
    assert stages["sts"]["alignment"]["layers"] == dense["alignment"]["layers"]
    assert stages["sts"]["instruction"]["layers"] < dense["instruction"]["layers"]  # skipped
    assert stages["sts"]["instruction"]["tokens"] == dense["instruction"]["tokens"]
    assert stages["sts_fast"]["alignment"]["tokens"] < stages["sts"]["alignment"]["tokens"]  # keep 0.125 < 0.5
    assert stages["sts_fast"]["instruction"]["tokens"] < dense["instruction"]["tokens"]  # both stages compress
    assert stages["sts_fast"]["instruction"]["layers"] < dense["instruction"]["layers"]
    proposed = result["seeds"][0]["profiles"]["alignment start"].proposal.policy
    assert [s.name for s in proposed.stages] == ["alignment", "instruction"]


@pytest.mark.slow
def test_the_encoder_is_frozen_and_alignment_trains_the_projector_alone(quick):
    _, result, at_entry = quick
    pretrained = torch.load(result["pretrained"]["cache"], weights_only=True)["state"]
    for name, model in result["seeds"][0]["models"].items():
        state = model.state_dict()
        start, before = at_entry["alignment"][name], at_entry["instruction"][name]
        for key, value in state.items():
            if key.startswith("vision."):
                assert value.equal(pretrained[key]), key  # never trained
            elif key.startswith(("decoder.", "lm_head.")):
                assert before[key].equal(pretrained[key]), key  # alignment left the decoder alone
        assert not state["decoder.layers.0.q_proj.weight"].equal(before["decoder.layers.0.q_proj.weight"])  # instruction
        assert not before["projector.fc1.weight"].equal(start["projector.fc1.weight"])  # alignment
        assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())


@pytest.mark.slow
def test_quick_run_writes_the_result_json_and_plot(quick):
    out, result, _ = quick
    assert set(result["result"]) == {"accuracy_dense", "accuracy_sts", "retention", "speedup", "best_policy",
                                     "best_retention", "best_speedup"}
    assert result["result"]["best_policy"] in ("sts", "profile", "sts_fast")
    saved = json.loads((out / "two_stage.json").read_text())
    assert saved["result"]["best_policy"] == result["result"]["best_policy"]
    assert set(saved["summary"]["sts_fast"]["to accuracy"]) == {"dense", "0.99 dense", "dense, mean curve"}
    assert set(saved["profiles"]) == {"alignment start", "alignment end (dense)", "instruction start (dense)",
                                      "instruction start (sts)", "instruction end (dense)", "instruction end (sts)"}
    assert (out / "two_stage.png").read_bytes()[:4] == b"\x89PNG"
