"""Mixed precision through both stages of ``sts``: bf16 weights, fp32 weights under bf16 autocast (CPU autocast),
and fp16 autocast with a gradient scaler make the same decisions (stage, decoder length, skipped blocks) as fp32."""

import functools

import pytest
import torch

import hf_models
from stsc import sparsify

STEPS = 3  # per stage: the instruction stage's schedule skips blocks in its first step, none after


@functools.cache
def train(family: str, precision: str) -> dict:
    """``2 * STEPS`` AdamW steps through ``sts``; per step the stage, the decoder length, the blocks skipped and the
    loss; and whether a block skipped in a whole step kept its weights."""
    model, inputs = hf_models.BUILDERS[family]()
    if precision == "bf16":
        model.to(torch.bfloat16)
    sparse = sparsify(model, "sts", inputs, steps_per_epoch=STEPS)
    lengths = []
    entry = model.get_submodule(sparse.report.model.boundary.decoder_entry)
    entry.register_forward_pre_hook(lambda m, a, k: lengths.append(k["inputs_embeds"].shape[1]) if m.training else None,
                                    with_kwargs=True)
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if precision == "fp16" else None
    dtype = {"autocast": torch.bfloat16, "fp16": torch.float16}.get(precision)
    log, untouched = [], []
    for step in range(2 * STEPS):
        sparse.set_progress(step=step)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = sparse(**inputs).loss
        skipper = sparse.runtimes.get("skip_layers")
        skipped = skipper.last_skipped if skipper else []
        before = {i: [p.detach().clone() for p in model.get_submodule(sparse.report.model.blocks[i]).parameters()]
                  for i in skipped}
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        untouched += [all(torch.equal(p, q) for p, q in zip(model.get_submodule(sparse.report.model.blocks[i])
                                                            .parameters(), before[i])) for i in skipped]
        assert torch.isfinite(loss)
        log.append((sparse.stage, lengths[-1], skipped, loss.item()))
    sparse.eval()
    with torch.no_grad():
        sparse_logits = sparse(**inputs).logits
        dense_logits = sparse.unwrap()(**inputs).logits
    return {"log": log, "untouched": untouched, "eval_equals_dense": torch.equal(sparse_logits, dense_logits),
            "dtypes": {p.dtype for p in model.parameters()}}


def assert_same_decisions(family, precision, loss_tolerance):
    reference, mixed = train(family, "fp32"), train(family, precision)
    decisions = [entry[:3] for entry in reference["log"]]
    assert decisions == [entry[:3] for entry in mixed["log"]]
    assert [stage for stage, *_ in decisions] == ["alignment"] * STEPS + ["instruction"] * STEPS
    full = hf_models.BUILDERS[family]()[1]["input_ids"].shape[1]
    assert all(length < full for stage, length, _ in decisions if stage == "alignment")  # savings unchanged
    assert any(skipped for *_, skipped in decisions)
    assert mixed["untouched"] and all(mixed["untouched"])  # skipped blocks: no gradient, AdamW left them alone
    assert mixed["eval_equals_dense"]
    assert mixed["dtypes"] == ({torch.bfloat16} if precision == "bf16" else {torch.float32})
    first, last = reference["log"][0][3], mixed["log"][0][3]
    assert abs(first - last) < loss_tolerance


def test_bf16_weights_make_the_same_decisions_as_fp32():
    assert_same_decisions("llava", "bf16", loss_tolerance=0.05)


@pytest.mark.slow
def test_bf16_autocast_makes_the_same_decisions_as_fp32():
    """Also run by every recipe (Trainer's and TRL's ``bf16=True``, Accelerate's ``mixed_precision="bf16"``)."""
    assert_same_decisions("llava", "autocast", loss_tolerance=0.05)


def test_fp16_autocast_with_a_grad_scaler():
    """The scaler unscales only the gradients that exist: a skipped block's stay None and its weights unchanged."""
    assert_same_decisions("llava", "fp16", loss_tolerance=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "autocast"])
@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_bf16_on_more_families(family, precision):
    assert_same_decisions(family, precision, loss_tolerance=0.05)
