"""LLaVA-1.5's two-stage recipe with stsc, on a tiny HF LLaVA: HF Trainer, bf16, gradient checkpointing, batches
grouped by modality.

    python examples/recipe_llava15.py [--batches 6]

As LLaVA's ``train.py`` does it: gradient checkpointing is enabled on the model first, then the model is wrapped
(here by ``sparsify``), then the Trainer is built (``bf16=True``, ``gradient_checkpointing=True``, reentrant as
LLaVA's pinned transformers had it). Each stage is its own run of one epoch, as in LLaVA's ``pretrain.sh`` and
``finetune.sh``:

1. feature alignment (image-caption pairs): only the projector trains; the ``vtc`` preset's alignment stage
   compresses the visual tokens (keep half) where they enter the decoder;
2. visual instruction tuning (an instruction mix with text-only rows): the projector and the language model train;
   the ``lds`` preset's instruction stage skips decoder blocks on its schedule. Batches are grouped by modality
   (``--group_by_modality_length``): a batch holds image rows or text-only rows, each right-padded.

``StscCallback`` moves each stage's schedule with the Trainer's progress. On CPU, ``bf16=True`` runs the forward
under CPU autocast (bf16), weights in fp32. Needs transformers (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_models  # noqa: E402
import recipe_common  # noqa: E402

import stsc  # noqa: E402
from stsc.integrations.hf import StscCallback  # noqa: E402

BATCH = 4
REENTRANT = {"use_reentrant": True}


class ModalityGroupedSampler(torch.utils.data.Sampler):
    """LLaVA's ``group_by_modality_length``: image rows and text-only rows are batched apart. Each modality's rows
    are shuffled and cut into batches, and the batches are shuffled; a modality's last, short batch is dropped here
    (LLaVA lets it mix with the other modality's)."""

    def __init__(self, has_image: list[bool], batch_size: int, seed: int = 0):
        self.has_image, self.batch_size, self.seed, self.epoch = has_image, batch_size, seed, 0

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        batches = []
        for modality in (True, False):
            rows = [i for i, image in enumerate(self.has_image) if image == modality]
            rng.shuffle(rows)
            batches += [rows[i:i + self.batch_size] for i in range(0, len(rows) - self.batch_size + 1, self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        self.epoch += 1
        return iter([i for batch in self.batches() for i in batch])

    def __len__(self) -> int:
        return sum(map(len, self.batches()))


class LlavaTrainer(Trainer):
    """The Trainer with LLaVA's modality-grouped sampler."""

    def _get_train_sampler(self, train_dataset=None):
        return ModalityGroupedSampler([row.get("pixel_values") is not None for row in self.train_dataset], BATCH)


class RecordGradients(TrainerCallback):
    def __init__(self, log: recipe_common.StepLog):
        self.log = log

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.log.record_gradients()


def run_stage(model, policy: str, stage: str, rows: list[dict], out: str) -> dict:
    """One stage as its own run: ``sparsify`` (the model's checkpointing is already on), the Trainer, the callback."""
    collator = recipe_common.Collator()
    example = collator([row for row in rows if row.get("pixel_values") is not None][:BATCH])
    sparse = stsc.sparsify(model, policy, example, stage=stage)
    log = recipe_common.StepLog(sparse)
    args = TrainingArguments(output_dir=out, num_train_epochs=1, per_device_train_batch_size=BATCH, learning_rate=2e-3,
                             bf16=True, gradient_checkpointing=True, gradient_checkpointing_kwargs=REENTRANT,
                             use_cpu=True, remove_unused_columns=False, logging_steps=1, save_strategy="no",
                             report_to=[], disable_tqdm=True, seed=0)
    trainer = LlavaTrainer(model=sparse, args=args, train_dataset=rows, data_collator=collator,
                           callbacks=[StscCallback(sparse), RecordGradients(log)])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    log.print_steps(losses)
    log.remove()
    sparse.unwrap()  # the stage is over: the model is dense again, with its trained weights
    return {"forwards": log.forwards, "skipped": log.skipped(), "gradients": log.gradients, "losses": losses,
            "trainable": {name for name, p in model.named_parameters() if p.requires_grad}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6, help="batches per stage")
    args = parser.parse_args(argv)

    model, _ = hf_models.llava()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=REENTRANT)  # before wrapping, as in train.py
    log = {}
    with tempfile.TemporaryDirectory() as out:
        recipe_common.freeze_all_but(model, "model.multi_modal_projector.")  # stage 1: the projector only
        captions = recipe_common.llava_rows(images=args.batches * BATCH, text_only=0, seed=0)
        log["alignment"] = run_stage(model, "vtc", "alignment", captions, out)
        recipe_common.freeze_all_but(model, "model.multi_modal_projector.", "model.language_model.", "lm_head.")
        text_only = max(args.batches // 3, 1)  # a third of the batches text only
        mix = recipe_common.llava_rows(images=(args.batches - text_only) * BATCH, text_only=text_only * BATCH, seed=1)
        log["instruction"] = run_stage(model, "lds", "instruction", mix, out)
    return log


if __name__ == "__main__":
    main()
