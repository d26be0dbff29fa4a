"""Qwen2-VL fine-tuning with TRL's SFTTrainer, LoRA and stsc, on a tiny HF Qwen2-VL.

    python examples/recipe_qwen2vl_trl.py [--rows 24 --epochs 2]

TRL's vision-language SFT recipe (``sft_vlm.py``: ``--bf16 --gradient_checkpointing --use_peft``) with a collator
of our own: rows hold images of different sizes (dynamic resolution: 4, 8 or 16 visual tokens each, from
``image_grid_thw``) or no image, batches mix them, right-padded. The order: ``sparsify`` the model, then hand the
``SparseModel`` to ``SFTTrainer`` with ``peft_config``: TRL applies LoRA to it (``get_peft_model``), so only the
adapters train, and enables gradient checkpointing (after ``sparsify``: any order works). The ``sts`` preset's two
stages follow the Trainer's epochs through ``StscCallback``: epoch 0 compresses visual tokens, epoch 1 skips decoder
blocks. TRL computes its loss with a fused LM head that calls the model's backbone directly; stsc's passes see that
call as the forward. On CPU, ``bf16=True`` runs under CPU autocast. Needs ``pip install -e ".[test]"`` (trl, peft).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_models  # noqa: E402
import recipe_common  # noqa: E402

import stsc  # noqa: E402
from stsc.integrations.hf import StscCallback  # noqa: E402

BATCH = 4


class RecordGradients(TrainerCallback):
    def __init__(self, log: recipe_common.StepLog):
        self.log = log

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.log.record_gradients()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)

    model, _ = hf_models.qwen2_vl()
    rows = recipe_common.qwen2_vl_rows(args.rows, seed=0)
    collator = recipe_common.Collator(token_types=recipe_common.QWEN_IMAGE)
    example = collator([row for row in rows if row.get("pixel_values") is not None][:BATCH])
    sparse = stsc.sparsify(model, "sts", example)
    log = recipe_common.StepLog(sparse)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=BATCH,
                           learning_rate=1e-3, bf16=True, gradient_checkpointing=True, use_cpu=True,
                           max_length=None, remove_unused_columns=False,  # the collator reads every column
                           dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized already
                           logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        trainer = SFTTrainer(model=sparse, args=config, train_dataset=Dataset.from_list(rows), data_collator=collator,
                             processing_class=recipe_common.tokenizer(), peft_config=lora,
                             callbacks=[StscCallback(sparse), RecordGradients(log)])
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    log.print_steps(losses)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    return {"forwards": log.forwards, "skipped": log.skipped(), "gradients": log.gradients, "losses": losses,
            "trainable": trainable, "trainer": trainer, "sparse": sparse}


if __name__ == "__main__":
    main()
