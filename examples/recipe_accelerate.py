"""A plain Accelerate training loop with stsc: a tiny HF LLaVA through both stages of ``sts``, bf16 mixed precision,
gradient accumulation.

    python examples/recipe_accelerate.py [--epochs 2 --accumulation 2]          # or: accelerate launch ...

``sparsify`` first, then ``accelerator.prepare`` (it wraps the ``SparseModel``'s forward in autocast on a bf16 run,
and in DDP on several processes: see docs/training.md, "DDP", for ``stsc.integrations.ddp.attach``). The schedule
moves once per optimizer step, ``set_progress(step=...)`` with ``steps_per_epoch``; every micro-batch of a step
draws its own decisions, and a block skipped in all of them keeps ``.grad = None``. Batches are right-padded rows
of one image or text only, mixed. On CPU, ``mixed_precision="bf16"`` runs under CPU autocast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_models  # noqa: E402
import recipe_common  # noqa: E402

import stsc  # noqa: E402

BATCH = 4


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--rows", type=int, default=24)
    args = parser.parse_args(argv)

    accelerator = Accelerator(mixed_precision="bf16", cpu=True, gradient_accumulation_steps=args.accumulation)
    model, _ = hf_models.llava()
    rows = recipe_common.llava_rows(images=args.rows - args.rows // 4, text_only=args.rows // 4, seed=2)
    collator = recipe_common.Collator()
    loader = torch.utils.data.DataLoader(rows, batch_size=BATCH, shuffle=True, collate_fn=collator,
                                         generator=torch.Generator().manual_seed(0))
    steps_per_epoch = len(loader) // args.accumulation
    sparse = stsc.sparsify(model, "sts", collator(rows[:BATCH]), steps_per_epoch=steps_per_epoch)
    log = recipe_common.StepLog(sparse)
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
    prepared, optimizer, loader = accelerator.prepare(sparse, optimizer, loader)
    step, losses = 0, []
    for _ in range(args.epochs):
        for batch in loader:
            with accelerator.accumulate(prepared):
                sparse.set_progress(step=step)  # picks the stage and moves the schedule; micro-batches draw anew
                loss = prepared(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    log.record_gradients()
                    step += 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    for entry, skipped, loss in zip(log.forwards, log.skipped(), losses):
        print(f"{entry['stage']:<12} padded {entry['padded']:>3}  decoder {entry['decoder']:>3}  skipped {skipped}  "
              f"loss {loss:.4f}")
    return {"forwards": log.forwards, "skipped": log.skipped(), "gradients": log.gradients, "losses": losses,
            "steps_per_epoch": steps_per_epoch, "accumulation": args.accumulation}


if __name__ == "__main__":
    main()
