"""Run by ``torchrun --nproc_per_node 2``: train the bundled example under DDP or FSDP2 with the sts preset.

Each rank trains on its own batch. After every step the ranks exchange their skip decisions and a
checksum of every gradient (DDP) or parameter (FSDP2), and rank 0 checks that they agree. Exits 1
with ``MISMATCH ...`` on the first disagreement; rank 0 prints ``RESULT ok ...`` at the end.

    torchrun --nproc_per_node 2 tests/distributed/train_worker.py [--fsdp] [--steps 8] [--break-seed]

``--break-seed`` gives rank 1 a different policy seed (the bug every rank-consistency check must catch).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import tiny_llava  # noqa: E402

import stsc  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402

POLICY = """
version: 1
seed: {seed}
stages:
  - {{name: alignment, steps: {half}, passes: {{compress_visual_tokens: {{method: random, keep_ratio: 0.5}}}}}}
  - {{name: instruction, steps: {half}, passes: {{skip_layers: {{schedule: constant, alpha: 0.5, eps: 0.5}}}}}}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--break-seed", action="store_true")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(90, exit=True)  # a hung rank prints where it hangs, and exits
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = tiny_llava.build_model()
    batch = tiny_llava.example_inputs(model, batch=2)
    batch["pixel_values"] = batch["pixel_values"] + rank  # each rank sees other data
    seed = 1 if args.break_seed and rank == 1 else 0
    sparse = stsc.sparsify(model, parse_policy(POLICY.format(seed=seed, half=args.steps // 2)), batch)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in sparse.report.model.blocks:
            fully_shard(model.get_submodule(block))
        fully_shard(model)
        trained = sparse
    else:
        # blocks skipped in a step have no gradient: DDP must be told that parameters may go unused
        trained = torch.nn.parallel.DistributedDataParallel(sparse, find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    patterns = set()
    for step in range(args.steps):
        sparse.set_progress(step=step)
        optimizer.zero_grad(set_to_none=True)
        loss = trained(**batch)["loss"]
        loss.backward()
        skipper = sparse.runtimes.get("skip_layers")
        decisions = (sparse.stage, skipper.last_skipped if skipper else None)
        sums = [(p.grad if not args.fsdp else p).detach().double().sum().item() if p.grad is not None or args.fsdp
                else None for p in model.parameters()]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"decisions": decisions, "sums": sums, "loss": loss.item()})
        optimizer.step()
        if rank == 0:
            if any(g["decisions"] != gathered[0]["decisions"] for g in gathered):
                print(f"MISMATCH step {step}: skip decisions differ between ranks: "
                      f"{[g['decisions'] for g in gathered]}", flush=True)
                leave(1)
            if not args.fsdp and any(g["sums"] != gathered[0]["sums"] for g in gathered):
                print(f"MISMATCH step {step}: gradients differ between ranks", flush=True)
                leave(1)
            if not all(math.isfinite(g["loss"]) for g in gathered):
                print(f"MISMATCH step {step}: loss not finite: {[g['loss'] for g in gathered]}", flush=True)
                leave(1)
        patterns.add(str(decisions))
    if rank == 0:
        print(f"RESULT ok mode={'fsdp2' if args.fsdp else 'ddp'} steps={args.steps} patterns={len(patterns)}",
              flush=True)
    dist.barrier()
    dist.destroy_process_group()
    leave(0)


def leave(code: int) -> None:
    """Exit now, before the DDP objects are freed: freeing them can block on a native gloo thread
    (seen here in about 1 run in 10), which would hang a finished run."""
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
