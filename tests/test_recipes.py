"""The recipes of docs/recipes.md run, and do what they say: LLaVA-1.5 with HF Trainer, Qwen2-VL with TRL's SFTTrainer
and LoRA, a plain Accelerate loop; bf16 autocast, gradient checkpointing, right-padded batches.

Decoder lengths are asserted as bounds that hold whether or not the compaction also removes padding: a row keeps
at most its padded length minus the visual tokens it drops."""

import torch

import recipe_accelerate
import recipe_llava15
import recipe_qwen2vl_trl

DROPPED_PER_LLAVA_IMAGE = 8  # 16 visual tokens, uniform keep 0.5


def assert_gradients_follow_the_skips(result, micro_batches=1):
    """At each optimizer step a decoder block has a gradient exactly when it ran in one of the step's micro-batches
    (a skipped block's parameters, adapters included, keep ``.grad = None``)."""
    assert len(result["gradients"]) * micro_batches == len(result["forwards"])
    for step, had_gradient in enumerate(result["gradients"]):
        forwards = result["forwards"][step * micro_batches:(step + 1) * micro_batches]
        assert had_gradient == [any(i in f["ran"] for f in forwards) for i in range(len(had_gradient))]


def test_llava15_recipe_trains_projector_then_language_model():
    result = recipe_llava15.main(["--batches", "3"])
    alignment, instruction = result["alignment"], result["instruction"]
    assert all(name.startswith("model.multi_modal_projector.") for name in alignment["trainable"])
    for entry in alignment["forwards"]:  # image-caption batches: every row drops 8 visual tokens
        assert entry["stage"] == "alignment" and entry["ran"] == [0, 1, 2]
        assert entry["decoder"] <= entry["padded"] - DROPPED_PER_LLAVA_IMAGE
        assert entry["autocast"] is torch.bfloat16
    assert alignment["gradients"] == [[False] * 3] * len(alignment["forwards"])  # the language model is frozen
    assert {f["stage"] for f in instruction["forwards"]} == {"instruction"}
    assert any(instruction["skipped"]) and all(f["decoder"] <= f["padded"] for f in instruction["forwards"])
    assert_gradients_follow_the_skips(instruction)
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in result.values())


def test_qwen2vl_trl_recipe_trains_lora_adapters_through_both_stages():
    result = recipe_qwen2vl_trl.main(["--rows", "12"])
    stages = [f["stage"] for f in result["forwards"]]
    assert stages == ["alignment"] * 3 + ["instruction"] * 3  # StscCallback moved the stage at epoch 1
    assert result["trainable"] and all("lora_" in name for name in result["trainable"])  # TRL's peft_config
    alignment = [f for f in result["forwards"] if f["stage"] == "alignment"]
    assert all(f["decoder"] <= f["padded"] for f in alignment)
    assert any(f["decoder"] < f["padded"] for f in alignment)  # TRL's fused LM head calls the backbone: compressed
    assert any(result["skipped"][3:])
    assert_gradients_follow_the_skips(result)
    assert all(f["autocast"] is torch.bfloat16 for f in result["forwards"])
    assert result["sparse"].is_gradient_checkpointing  # TRL enabled it, after sparsify


def test_accelerate_recipe_accumulates_micro_batches():
    result = recipe_accelerate.main(["--rows", "16", "--accumulation", "2"])
    per_stage = result["steps_per_epoch"] * result["accumulation"]
    assert [f["stage"] for f in result["forwards"]] == ["alignment"] * per_stage + ["instruction"] * per_stage
    alignment = result["forwards"][:per_stage]
    assert all(f["decoder"] <= f["padded"] for f in alignment) and any(f["decoder"] < f["padded"] for f in alignment)
    assert any(result["skipped"][per_stage:])
    assert_gradients_follow_the_skips(result, micro_batches=2)
    assert all(f["autocast"] is torch.bfloat16 for f in result["forwards"])
