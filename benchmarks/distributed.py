"""Distributed engines with skipped blocks, measured on 2 CPU ranks (gloo), dense baseline in the same run.

    torchrun --nproc_per_node 2 benchmarks/distributed.py fsdp2 [--steps 40 --layers 8 --hidden 256 --quick --meta-init]
    torchrun --nproc_per_node 2 benchmarks/distributed.py ddp [--steps 40 --layers 8 --hidden 256 --quick]

Copies of the bundled example (same initialization, the decoder enlarged) train on the same batches,
their steps alternating so that machine noise hits all alike; the skipping copies follow the paper's
schedule (``sts``, alpha, eps) over a simulated stage spanning the measured steps.

``fsdp2``: ``fully_shard`` per decoder block, then the model. Custom all-gather and reduce-scatter
comms on every block count the bytes each step moves for the decoder blocks (all-gather: the
gathered output; reduce-scatter: the reduced input), dense vs skipping, beside the fraction of blocks
the skipping copy ran. One JSON line per step (``STEP {...}``), a table, and
``RESULT bytes_ratio=... blocks_run=... worst_step_excess=...`` (excess: bytes ratio minus fraction run).
``--meta-init``: every copy is built on the meta device, sparsified (matched from its weights' shapes), sharded,
materialized (``to_empty``) and loaded with the same weights (:func:`materialize`), the torchtitan order.

``ddp``: step time (forward, backward, SGD step) of ``DistributedDataParallel`` on a dense copy, and on
two skipping copies making the same decisions: one with ``find_unused_parameters=True``, one without it
and with ``stsc.integrations.ddp.attach``. ``RESULT find_unused_ms=... attach_ms=... ratio=...``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_llava  # noqa: E402

import stsc  # noqa: E402
import stsc.integrations.ddp  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=["fsdp2", "ddp"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="per rank")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per copy")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="CI-sized: 4 layers of 64, 6 steps")
    parser.add_argument("--meta-init", action="store_true", help="copies built on meta, materialized after sharding")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.text_tokens, args.steps, args.warmup = 4, 64, 12, 6, 1
    return args


def build(args):
    return tiny_llava.build_model(hidden_size=args.hidden, layers=args.layers, heads=max(args.hidden // 64, 1),
                                  intermediate_size=int(args.hidden * 8 / 3))


def copies(args, count: int):
    """The dense copy and ``count`` skipping copies (``SparseModel``s), this rank's batch, and the model whose weights
    they have (with ``--meta-init`` the copies are on the meta device, to be materialized with them)."""
    model = build(args)
    inputs = tiny_llava.example_inputs(model, batch=args.batch, text_tokens=args.text_tokens)
    inputs["pixel_values"] = inputs["pixel_values"] + dist.get_rank()  # each rank sees other data
    policy = parse_policy(f"""
version: 1
stages:
  - {{name: instruction, epochs: 1, passes: {{skip_layers: {{alpha: {args.alpha}, eps: {args.eps}}}}}}}
""", source="distributed")
    if args.meta_init:
        with torch.device("meta"):
            fresh = [build(args) for _ in range(count + 1)]
    else:
        fresh = [copy.deepcopy(model) for _ in range(count)] + [model]
    skipping = [stsc.sparsify(fresh[i], policy, inputs) for i in range(count)]
    return stsc.sparsify(fresh[-1], "dense", inputs), skipping, inputs, model


def materialize(model, full) -> None:
    """A model built on the meta device and sharded with ``fully_shard``: its storage allocated (``to_empty``), then
    ``full``'s weights loaded into its shards, and ``full``'s non-persistent buffers (no checkpoint holds them; the
    model's own init computes them, as torchtitan's ``init_weights`` does) copied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device="cpu")
    set_model_state_dict(model, full.state_dict(), options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        for name, buffer in full.named_buffers():
            model.get_buffer(name).copy_(buffer)


def train_step(trained, optimizer, inputs) -> float:
    """One optimizer step; its wall-clock seconds."""
    start = time.perf_counter()
    trained(**inputs)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(args, models: dict, inputs, after_step) -> dict:
    """Alternate one step per copy, calling ``after_step(step, name)`` after each; return the seconds of
    the measured (post warm-up) steps per copy. ``models``: name -> (trained module, its SparseModel, optimizer)."""
    times = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        for name, (trained, sparse, optimizer) in models.items():
            sparse.set_progress(step=step, epoch=max(step - args.warmup, 0) / args.steps)
            seconds = train_step(trained, optimizer, inputs)
            if step >= args.warmup:
                times[name].append(seconds)
            after_step(step, name)
    return times


# ------------------------------------------------------------------------------------------- FSDP2
class CountingComm:
    """An FSDP2 all-gather or reduce-scatter comm that adds the bytes it moves to ``counts[kind]``."""

    def __init__(self, kind: str, counts: dict):
        self.kind, self.counts = kind, counts

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op=None, async_op=False):
        if self.kind == "all_gather":
            self.counts[self.kind] += output_tensor.numel() * output_tensor.element_size()
            return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
        self.counts[self.kind] += input_tensor.numel() * input_tensor.element_size()
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def fsdp2(args) -> None:
    from torch.distributed.fsdp import fully_shard

    dense, (sts,), inputs, full = copies(args, 1)
    counts = {name: {"all_gather": 0, "reduce_scatter": 0} for name in ("dense", "sts")}
    for name, sparse in (("dense", dense), ("sts", sts)):
        for path in sparse.report.model.blocks:
            block = fully_shard(sparse.model.get_submodule(path))
            block.set_custom_all_gather(CountingComm("all_gather", counts[name]))
            block.set_custom_reduce_scatter(CountingComm("reduce_scatter", counts[name]))
        fully_shard(sparse.model)
        if args.meta_init:
            materialize(sparse.model, full)
    models = {name: (sparse, sparse, torch.optim.SGD(sparse.parameters(), lr=1e-3))
              for name, sparse in (("dense", dense), ("sts", sts))}
    rows: dict[int, dict] = {}

    def after_step(step, name):
        moved = sum(counts[name].values())
        counts[name].update(all_gather=0, reduce_scatter=0)
        if step >= args.warmup:
            row = rows.setdefault(step, {"step": step})
            row[f"{name}_bytes"] = moved
            if name == "sts":
                row["blocks_run"] = 1 - len(sts.runtimes["skip_layers"].last_skipped) / args.layers

    times = run(args, models, inputs, after_step)
    rows = list(rows.values())
    if dist.get_rank() != 0:
        return
    for row in rows:
        print("STEP " + json.dumps(row))
    dense_bytes = statistics.mean(r["dense_bytes"] for r in rows)
    sts_bytes = statistics.mean(r["sts_bytes"] for r in rows)
    blocks_run = statistics.mean(r["blocks_run"] for r in rows)
    excess = max(r["sts_bytes"] / r["dense_bytes"] - r["blocks_run"] for r in rows)
    dense_ms, sts_ms = (1e3 * statistics.mean(times[n]) for n in ("dense", "sts"))
    print(f"decoder {args.layers} x {args.hidden}, {args.steps} steps; per step, decoder blocks only (both ranks alike):")
    print(f"{'copy':<6} {'MB all-gather+reduce-scatter':>29} {'blocks run':>11} {'step ms':>8}")
    print(f"{'dense':<6} {dense_bytes / 2**20:>29.3f} {1.0:>11.3f} {dense_ms:>8.1f}")
    print(f"{'sts':<6} {sts_bytes / 2**20:>29.3f} {blocks_run:>11.3f} {sts_ms:>8.1f}")
    print(f"RESULT bytes_ratio={sts_bytes / dense_bytes:.4f} blocks_run={blocks_run:.4f} worst_step_excess={excess:.4f}")


# --------------------------------------------------------------------------------------------- DDP
def ddp(args) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dense, (find_unused, attached), inputs, _ = copies(args, 2)
    wrapped = {"dense": DistributedDataParallel(dense), "find_unused": DistributedDataParallel(find_unused,
                                                                                              find_unused_parameters=True),
               "attach": DistributedDataParallel(attached)}
    stsc.integrations.ddp.attach(wrapped["attach"], attached)
    sparse = {"dense": dense, "find_unused": find_unused, "attach": attached}
    models = {name: (wrapped[name], sparse[name], torch.optim.SGD(sparse[name].parameters(), lr=1e-3))
              for name in wrapped}
    skipped = []
    times = run(args, models, inputs, lambda step, name: name == "attach" and step >= args.warmup and
                skipped.append(len(attached.runtimes["skip_layers"].last_skipped)))
    if dist.get_rank() != 0:
        return
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    print(f"decoder {args.layers} x {args.hidden}, {args.steps} steps, {1 - statistics.mean(skipped) / args.layers:.3f} "
          f"of the blocks run; median step ms:")
    for name, value in ms.items():
        print(f"{name:<12} {value:>8.1f}")
    print(f"RESULT find_unused_ms={ms['find_unused']:.1f} attach_ms={ms['attach']:.1f} "
          f"ratio={ms['find_unused'] / ms['attach']:.3f} dense_ms={ms['dense']:.1f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    (fsdp2 if args.engine == "fsdp2" else ddp)(args)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip the engines' teardown, which can block on a gloo thread


if __name__ == "__main__":
    main()
