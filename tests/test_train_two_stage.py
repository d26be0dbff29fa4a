"""The CI-sized two-stage benchmark: the pipeline works (both runs train, STS really compresses and skips)."""

import json
import sys
from pathlib import Path

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


def test_quick_run_trains_both_runs_and_sts_compresses_and_skips(tmp_path):
    result = train_two_stage.main(["--quick", "--out", str(tmp_path), "--images", "96"])
    dense, sts = result["runs"]["dense"], result["runs"]["sts"]
    for run in (dense, sts):
        losses = [entry["loss"] for entry in run["log"]]
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # loss falls
    assert sts["per_stage"]["alignment"]["tokens"] < dense["per_stage"]["alignment"]["tokens"]  # compressed
    assert sts["per_stage"]["instruction"]["tokens"] == dense["per_stage"]["instruction"]["tokens"]
    assert sts["per_stage"]["instruction"]["layers"] < dense["per_stage"]["instruction"]["layers"]  # skipped
    assert sts["per_stage"]["alignment"]["layers"] == dense["per_stage"]["alignment"]["layers"]
    saved = json.loads((tmp_path / "two_stage.json").read_text())
    assert set(saved["summary"]) == {"accuracy_dense", "accuracy_sts", "retention", "speedup"}
    assert (tmp_path / "two_stage.png").read_bytes()[:4] == b"\x89PNG"
