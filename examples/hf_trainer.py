"""Train a tiny Hugging Face LLaVA with ``Trainer`` and the ``sts`` preset, through both stages.

Synthetic data (random images, a placeholder run per image, random text to learn), a few steps per
epoch: epoch 0 is the alignment stage (visual tokens compressed), epoch 1 the instruction stage
(decoder blocks skipped), as the callback moves the schedule from the trainer's state.

    python examples/hf_trainer.py [--epochs 2 --samples 16]
    torchrun --nproc_per_node 2 examples/hf_trainer.py --deepspeed ds_config.json   # DeepSpeed ZeRO

Needs transformers (``pip install -e ".[test]"``). With ``--deepspeed``, the callback attaches
:mod:`stsc.integrations.deepspeed` to the engine the Trainer builds. The training arguments come first, as in
LLaVA's ``train.py``: with a ZeRO-3 config the model is then built under ``deepspeed.zero.Init`` (each rank holding
only its partition of every weight), ``sparsify`` matches it from its weights' shapes, and the passes bind at the
first training forward, through the engine's parameter fetch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_models  # noqa: E402

import stsc  # noqa: E402
from stsc.integrations.hf import StscCallback  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--policy", default="sts")
    parser.add_argument("--deepspeed", help="a DeepSpeed config (JSON file), passed to TrainingArguments")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=4,
                                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                                     use_cpu=True, seed=0, disable_tqdm=True, deepspeed=args.deepspeed)
        model, batch = hf_models.llava(batch=args.samples)  # under zero.Init with a ZeRO-3 config (see above)
        dataset = [{key: value[i] for key, value in batch.items()} for i in range(args.samples)]
        example = {key: value[:2] for key, value in batch.items()}
        sparse = stsc.sparsify(model, args.policy, example)
        callback = StscCallback(sparse)
        trainer = Trainer(model=sparse, args=training, train_dataset=dataset, callbacks=[callback])
        result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for (step, stage), loss in zip(callback.stages[1:], losses):
        print(f"step {step + 1:>3}  stage {stage or 'dense':<12} loss {loss:.4f}")
    print(f"trained {trainer.state.global_step} steps in {result.metrics['train_runtime']:.1f} s; "
          f"stages seen: {sorted({stage for _, stage in callback.stages[1:] if stage})}")
    return {"losses": losses, "stages": callback.stages[1:], "model": model, "sparse": sparse}


if __name__ == "__main__":
    main()
