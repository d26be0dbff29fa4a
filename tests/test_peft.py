"""PEFT LoRA with sparsify, in either order: before (``sparsify(get_peft_model(model))``) or after
(``get_peft_model(sparsify(model))``, what TRL's ``SFTTrainer(peft_config=...)`` does): the base stays frozen, only
the adapters train, and the adapters of a skipped block get no gradient."""

import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

import hf_models
from stsc import sparsify

SKIPPED = [0, 2]


def lora(model):
    torch.manual_seed(1)  # both orders draw the same adapter weights (random A and B: every gradient is non-zero)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))


@functools.cache
def train(family: str, order: str) -> dict:
    """One step per stage of ``sts`` (instruction: ``SKIPPED`` forced); gradients by ``state_dict`` key (the same
    keys in both orders)."""
    model, inputs = hf_models.BUILDERS[family]()
    if order == "before":
        top = sparse = sparsify(lora(model), "sts", inputs, steps_per_epoch=1)
    else:
        sparse = sparsify(model, "sts", inputs, steps_per_epoch=1)
        top = lora(sparse)
    params = {key: value for key, value in top.state_dict(keep_vars=True).items() if isinstance(value, nn.Parameter)}
    result = {"blocks": sparse.report.model.blocks, "adapters": get_peft_model_state_dict(top).keys()}
    for stage, epoch in (("alignment", 0.0), ("instruction", 1.0)):
        sparse.set_progress(epoch=epoch, step=int(epoch))
        if stage == "instruction":
            sparse.runtimes["skip_layers"].force(SKIPPED)
        top.zero_grad(set_to_none=True)
        loss = top(**inputs).loss
        loss.backward()
        result[stage] = {"loss": loss.detach(), "grads": {key: p.grad for key, p in params.items()},
                         "trainable": {key for key, p in params.items() if p.requires_grad}}
    return result


def test_lora_before_sparsify_trains_only_the_adapters_of_blocks_that_ran():
    result = train("llava", "before")
    for stage in ("alignment", "instruction"):
        grads, trainable = result[stage]["grads"], result[stage]["trainable"]
        assert trainable and all("lora_" in key for key in trainable)  # the base is frozen
        assert all(grad is None for key, grad in grads.items() if key not in trainable)
    grads = result["instruction"]["grads"]
    for index, block in enumerate(result["blocks"]):  # paths in the PEFT model: its state_dict keys start with them
        adapters = [key for key in grads if key.startswith(f"{block}.") and "lora_" in key]
        assert len(adapters) == 4  # q_proj and v_proj, A and B
        if index in SKIPPED:
            assert all(grads[key] is None for key in adapters)
        else:
            assert all(grads[key] is not None and grads[key].abs().sum() > 0 for key in adapters)
    assert all(result["alignment"]["grads"][key] is not None for key in result["alignment"]["trainable"])


def test_lora_after_sparsify_trains_the_same_as_before():
    before, after = train("llava", "before"), train("llava", "after")
    assert before["adapters"] == after["adapters"]  # the saved adapter has the same keys: it loads either way
    for stage in ("alignment", "instruction"):
        torch.testing.assert_close(after[stage]["loss"], before[stage]["loss"], atol=1e-6, rtol=0)
        assert after[stage]["trainable"] == before[stage]["trainable"]
        for key, grad in before[stage]["grads"].items():
            assert (grad is None) == (after[stage]["grads"][key] is None), key
            if grad is not None:
                torch.testing.assert_close(after[stage]["grads"][key], grad, atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_lora_both_orders_on_more_families(family):
    before, after = train(family, "before"), train(family, "after")
    for stage in ("alignment", "instruction"):
        torch.testing.assert_close(after[stage]["loss"], before[stage]["loss"], atol=1e-6, rtol=0)
    grads = before["instruction"]["grads"]
    skipped = [key for key in grads if "lora_" in key and any(
        key.startswith(f"{path}.") for path in [before["blocks"][i] for i in SKIPPED])]
    assert skipped and all(grads[key] is None for key in skipped)
