"""Train the bundled example with the sts preset for steps [start, stop), optionally resuming from and
saving to a checkpoint; print the skip decisions and the sequence lengths. Run as a process by
test_resume.py, so an interrupted run really is a new process.

    python tests/resume_run.py START STOP [--load ckpt.pt] [--save ckpt.pt]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_llava  # noqa: E402

import stsc  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402

POLICY = parse_policy("""
version: 1
stages:
  - {name: alignment, epochs: 1, passes: {compress_visual_tokens: {method: random, keep_ratio: 0.5}}}
  - {name: instruction, epochs: 1, passes: {skip_layers: {alpha: 0.5, eps: 0.5}}}
""", "resume_run")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("start", type=int)
    parser.add_argument("stop", type=int)
    parser.add_argument("--load")
    parser.add_argument("--save")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = tiny_llava.build_model()
    batch = tiny_llava.example_inputs(model, batch=2)
    sparse = stsc.sparsify(model, POLICY, batch, steps_per_epoch=6)
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=1e-3)
    if args.load:
        checkpoint = torch.load(args.load, weights_only=True)
        sparse.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        sparse.load_schedule_state(checkpoint["schedule"])
    log = []
    for step in range(args.start, args.stop):
        sparse.set_progress(step=step)
        for micro in range(2):  # two micro-batches per optimizer step
            output = sparse(**batch)
            (output["loss"] / 2).backward()
            skipper = sparse.runtimes.get("skip_layers")
            log.append([step, micro, sparse.stage, output["logits"].shape[1], skipper.last_skipped if skipper else None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if args.save:
        torch.save({"model": sparse.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": sparse.schedule_state()}, args.save)
    print(json.dumps(log))


if __name__ == "__main__":
    main()
