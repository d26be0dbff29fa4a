"""A plain PyTorch training loop with stsc: the bundled tiny LLaVA through both stages of ``sts``.

    python examples/train_loop.py [--policy sts --epochs 2 --steps-per-epoch 4]

The only stsc lines are ``sparsify`` (once) and ``set_progress`` (each optimizer step); saving and
resuming are ``state_dict`` plus ``schedule_state``, shown at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_llava  # noqa: E402

import stsc  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="sts")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    args = parser.parse_args(argv)

    model = tiny_llava.build_model()
    batch = tiny_llava.example_inputs(model, batch=4)
    sparse = stsc.sparsify(model, args.policy, batch, steps_per_epoch=args.steps_per_epoch)
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
    log = []
    for step in range(args.epochs * args.steps_per_epoch):
        sparse.set_progress(step=step)  # epoch = step / steps_per_epoch picks the stage and moves the schedule
        optimizer.zero_grad(set_to_none=True)
        output = sparse(**batch)
        output["loss"].backward()
        optimizer.step()
        skipper, compressor = sparse.runtimes.get("skip_layers"), sparse.runtimes.get("compress_visual_tokens")
        sequence = compressor.last_plan.length if compressor else batch["input_ids"].shape[1]  # what the decoder saw
        log.append({"step": step, "stage": sparse.stage, "loss": output["loss"].item(),
                    "sequence": sequence, "skipped": skipper.last_skipped if skipper else []})
        print(f"step {step:>3}  stage {sparse.stage:<12} sequence {log[-1]['sequence']:>3}  "
              f"skipped {log[-1]['skipped']}  loss {log[-1]['loss']:.4f}")
    checkpoint = {"model": sparse.state_dict(), "schedule": sparse.schedule_state()}  # torch.save(checkpoint, ...)
    tiny_llava.build_model().load_state_dict(checkpoint["model"])  # loads into the original class
    return log


if __name__ == "__main__":
    main()
