"""The example scripts run: a plain PyTorch loop and Hugging Face Trainer, both through the sts preset."""

import torch

import hf_trainer
import train_loop


def test_plain_loop_goes_through_both_stages():
    log = train_loop.main(["--epochs", "2", "--steps-per-epoch", "3"])
    assert [entry["stage"] for entry in log] == ["alignment"] * 3 + ["instruction"] * 3
    assert [entry["sequence"] for entry in log] == [45] * 3 + [77] * 3
    assert log[-1]["loss"] < log[0]["loss"]


def test_hf_trainer_example_moves_the_stage_from_trainer_state():
    sequences = []
    original = hf_trainer.hf_models.llava

    def llava_with_probe(**kwargs):
        model, batch = original(**kwargs)
        model.model.language_model.norm.register_forward_hook(  # after the blocks, any of which may be skipped
            lambda module, args, output: sequences.append(args[0].shape[1]) if module.training else None)
        return model, batch

    hf_trainer.hf_models.llava = llava_with_probe
    try:
        result = hf_trainer.main(["--epochs", "2", "--samples", "16"])
    finally:
        hf_trainer.hf_models.llava = original
    assert [stage for _, stage in result["stages"]] == ["alignment"] * 4 + ["instruction"] * 4
    # the 8 training forwards (capture ran before): 1 + 16 placeholders + 8 text tokens, and alignment keeps
    # 8 of the 16 visual tokens
    assert sequences[-8:] == [17] * 4 + [25] * 4
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0]
