"""The realistic-mix benchmark: its samples follow the stated mix, grouped batches hold one modality sorted by length,
the ideal is computed from the batch, and a --quick run measures every copy (the padding-removed one at the ideal)."""

import sys
from pathlib import Path

import pytest

import hf_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import realistic_mix  # noqa: E402


def test_the_samples_follow_the_mix():
    samples = realistic_mix.draw_samples(2000, seed=0)
    images = [len(grids) for grids, _ in samples]
    assert 0.08 < images.count(0) / 2000 < 0.12 and 0.12 < sum(n > 1 for n in images) / 2000 < 0.18
    counts = [t * h * w // 4 for grids, _ in samples for t, h, w in grids]
    assert min(counts) == 16 and max(counts) == 256  # 8 x 8 to 32 x 32 patches, 2 x 2 merged
    texts = sorted(text for _, text in samples)
    assert texts[0] >= 8 and texts[-1] <= 320 and 40 <= texts[1000] <= 56  # median 48


def test_grouped_batches_hold_one_modality_sorted_by_length_within_a_megabatch():
    samples = realistic_mix.draw_samples(64, seed=1)
    batches = realistic_mix.grouped_batches(samples, 4, seed=1)
    assert sorted(map(id, (s for b in batches for s in b))) == sorted(map(id, samples))  # each sample once
    assert all(len({bool(grids) for grids, _ in batch}) == 1 for batch in batches)
    assert all(realistic_mix.tokens(a) >= realistic_mix.tokens(b) for batch in batches for a, b in zip(batch, batch[1:]))
    mixed = realistic_mix.mixed_batches(samples, 4)
    assert [s for b in mixed for s in b] == samples


def test_the_ideal_is_the_longest_rows_real_positions_less_its_dropped_tokens():
    rows = [([(1, 8, 8)], 10), ([(1, 8, 16), (1, 8, 8)], 3), ([], 40)]  # 16 tokens; 32 + 16; text only
    inputs = hf_models.padded_inputs("qwen2_vl", rows, "right")
    assert inputs["attention_mask"].sum(dim=1).tolist() == [1 + 18 + 10, 1 + 34 + 18 + 3, 1 + 40]
    # keep 0.5 drops 8, 16 + 8 and 0: rows of 21, 32 and 41 positions
    assert realistic_mix.ideal_positions(rows, inputs, 0.5) == 3 * 41


@pytest.mark.slow
def test_quick_run_measures_every_copy():
    results = realistic_mix.main(["--quick"])
    for batching in ("mixed", "grouped"):
        r = results[batching]
        assert r["positions_after"] == r["ideal"] <= r["positions_before"] <= r["positions_dense"] == r["padded"]
        assert r["rows"] <= r["ideal"] and r["flops_ideal"] < r["flops_dense"]
        assert all(r[f"seconds_{name}"] > 0 for name in ("dense", "before", "after"))
