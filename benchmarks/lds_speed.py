"""Layer Dynamic Skipper: dense vs skipped train step, measured side by side in one run, in both lowerings.

Three copies of the bundled LLaVA-style example (same initialization), sized so that the decoder
dominates the step (``--shape cpu``, the default: 8 x 256 for 2 CPU cores; ``--shape llava7b``: 6 blocks
of LLaVA-1.5-7B's decoder, width 4096, 32 heads, MLP 11008, on 576 visual + 123 text tokens, batch 4, for
a GPU), train with AdamW on the same batch, on ``--device`` in ``--dtype`` (bfloat16 on CUDA; the
example's attention is SDPA): dense, skipping with the module lowering (``sparsify``: guards on the
blocks) and skipping with the graph lowering (``stsc.transform``: the exported graph with ``torch.cond``
around each block). Both skipping copies follow the paper's schedule
(``sts``, alpha, eps) over a simulated stage spanning the measured steps, so their mean skip fraction is
about alpha / 3, and they draw the same patterns. Steps of the three copies alternate, so machine noise
hits them alike.

Printed per lowering and mode (eager; compiled with ``--compile``: the module lowering as
``sparse.compile()`` plus ``torch.compile(sparse)``, the graph lowering as ``torch.compile`` of its graph,
the dense copy as ``torch.compile`` of the model): mean step times (CUDA events on a GPU), measured
speed-up over the dense copy in the same mode, the ideal ``1 / (1 - s)`` for the realized skip fraction s, and their ratio.
The graph lowering runs its training graph (``graph.training_module``: each block's ``torch.cond``
partitioned so that its backward reads the activations its forward saved).
Last line (module lowering, eager):

    RESULT speedup=<measured> ideal=<analytic> fraction_of_ideal=<measured/ideal>

    python benchmarks/lds_speed.py [--layers 8 --hidden 256 --text-tokens 64 --steps 60 --compile]
    python benchmarks/lds_speed.py --device cuda --shape llava7b [--dtype bfloat16 --compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_llava  # noqa: E402

from stsc import sparsify, transform  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402
from timing import LLAVA_7B, add_device_arguments, build_on, device_and_dtype, on_device, parse_with_shapes  # noqa: E402
from timing import describe, step_seconds  # noqa: E402

SHAPES = {"cpu": {"layers": 8, "hidden": 256, "heads": 4, "intermediate": 682, "image_size": 32, "patch_size": 4,
                  "text_tokens": 64, "batch": 4, "steps": 60, "warmup": 5},
          "llava7b": {**LLAVA_7B, "layers": 6, "text_tokens": 123, "batch": 4, "steps": 20, "warmup": 3}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("layers", "hidden", "heads", "intermediate", "image_size", "patch_size", "text_tokens", "batch",
                 "warmup"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--steps", type=int, help="measured steps per model")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    add_device_arguments(parser)
    return parse_with_shapes(parser, SHAPES, argv)


def train_step(model, optimizer, inputs):
    optimizer.zero_grad(set_to_none=True)
    model(**inputs)["loss"].backward()
    optimizer.step()


def build(args):
    """The dense model on the device and a batch for it."""
    device, dtype = device_and_dtype(args)
    dense = build_on(device, dtype, tiny_llava.build_model, hidden_size=args.hidden, layers=args.layers,
                     heads=args.heads, intermediate_size=args.intermediate, image_size=args.image_size,
                     patch_size=args.patch_size)
    return dense, on_device(tiny_llava.example_inputs(dense, batch=args.batch, text_tokens=args.text_tokens), device,
                            dtype)


def measure(args, compiled: bool) -> list[dict]:
    dense, inputs = build(args)
    device = inputs["input_ids"].device
    policy = parse_policy(f"""
version: 1
stages:
  - {{name: instruction, epochs: 1, passes: {{skip_layers: {{alpha: {args.alpha}, eps: {args.eps}}}}}}}
""", source="lds_speed")
    modules = sparsify(copy.deepcopy(dense), policy, inputs)
    graph = transform(copy.deepcopy(dense), policy, inputs)["instruction"]
    print("graph lowering:", "; ".join(graph.training_notes) or "every guarded block saves its activations")
    runs = {"dense": dense, "modules": modules, "graph": graph}
    torch._dynamo.reset()
    if compiled:
        modules.compile()
        graph.compile()
        runs = {"dense": torch.compile(dense), "modules": torch.compile(modules), "graph": graph}
    optimizers = {name: torch.optim.AdamW(run.parameters(), lr=1e-4) for name, run in runs.items()}
    times = {name: [] for name in runs}
    skipped = 0
    for step in range(-args.warmup, args.steps):  # the warm-up steps also compile every variant
        for lowering in (modules, graph):
            lowering.set_progress(step=args.warmup + step, epoch=max(step, 0) / args.steps)
        for name, run in runs.items():
            seconds = step_seconds(lambda: train_step(run, optimizers[name], inputs), device)
            if step >= 0:
                times[name].append(seconds)
        assert graph.last_skipped == modules.runtimes["skip_layers"].last_skipped  # the same decisions
        skipped += len(graph.last_skipped) if step >= 0 else 0
    fraction = skipped / (args.steps * args.layers)
    ideal = 1 / (1 - fraction)
    dense_s = statistics.mean(times["dense"])
    return [{"lowering": name, "mode": "compiled" if compiled else "eager", "dense_ms": 1e3 * dense_s,
             "sts_ms": 1e3 * statistics.mean(times[name]), "skip_fraction": fraction,
             "expected_fraction": 1 - modules.report.stages[0].layers_run,
             "speedup": dense_s / statistics.mean(times[name]), "ideal": ideal,
             "fraction_of_ideal": dense_s / statistics.mean(times[name]) / ideal} for name in ("modules", "graph")]


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    sequence = 1 + (args.image_size // args.patch_size) ** 2 + args.text_tokens
    print(f"decoder {args.layers} x {args.hidden} ({args.heads} heads, MLP {args.intermediate}), sequence {sequence} "
          f"tokens, batch {args.batch}, sts schedule alpha={args.alpha} eps={args.eps} over {args.steps} steps, "
          f"{describe(*device_and_dtype(args))}")
    rows = measure(args, compiled=False) + (measure(args, compiled=True) if args.compile else [])
    print(f"{'lowering':<9} {'mode':<9} {'dense ms':>9} {'sts ms':>9} {'skipped':>8} {'expected':>9} {'speedup':>8} "
          f"{'ideal':>6} {'of ideal':>9}")
    for r in rows:
        print(f"{r['lowering']:<9} {r['mode']:<9} {r['dense_ms']:>9.1f} {r['sts_ms']:>9.1f} {r['skip_fraction']:>8.3f} "
              f"{r['expected_fraction']:>9.3f} {r['speedup']:>8.3f} {r['ideal']:>6.3f} {r['fraction_of_ideal']:>9.3f}")
    eager = rows[0]
    print(f"RESULT speedup={eager['speedup']:.3f} ideal={eager['ideal']:.3f} fraction_of_ideal={eager['fraction_of_ideal']:.3f}")
    return rows


if __name__ == "__main__":
    main()
