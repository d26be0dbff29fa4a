"""Layer Dynamic Skipper: dense vs skipped train step, measured side by side in one run, in both lowerings.

Three copies of the bundled LLaVA-style example (same initialization), sized so that the decoder
dominates the step, train with AdamW on the same batch: dense, skipping with the module lowering
(``sparsify``: guards on the blocks) and skipping with the graph lowering (``stsc.transform``: the
exported graph with ``torch.cond`` around each block). Both skipping copies follow the paper's schedule
(``sts``, alpha, eps) over a simulated stage spanning the measured steps, so their mean skip fraction is
about alpha / 3, and they draw the same patterns. Steps of the three copies alternate, so machine noise
hits them alike.

Printed per lowering and mode (eager; compiled with ``--compile``: the module lowering as
``sparse.compile()`` plus ``torch.compile(sparse)``, the graph lowering as ``torch.compile`` of its graph,
the dense copy as ``torch.compile`` of the model): mean step times, measured speed-up over the dense
copy in the same mode, the ideal ``1 / (1 - s)`` for the realized skip fraction s, and their ratio.
The graph lowering runs its training graph (``graph.training_module``: each block's ``torch.cond``
partitioned so that its backward reads the activations its forward saved).
Last line (module lowering, eager):

    RESULT speedup=<measured> ideal=<analytic> fraction_of_ideal=<measured/ideal>

    python benchmarks/lds_speed.py [--layers 8 --hidden 256 --text-tokens 64 --steps 60 --compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_llava  # noqa: E402

from stsc import sparsify, transform  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    return parser.parse_args(argv)


def train_step(model, optimizer, inputs):
    optimizer.zero_grad(set_to_none=True)
    model(**inputs)["loss"].backward()
    optimizer.step()


def measure(args, compiled: bool) -> list[dict]:
    dense = tiny_llava.build_model(hidden_size=args.hidden, layers=args.layers, heads=max(args.hidden // 64, 1),
                                   intermediate_size=int(args.hidden * 8 / 3))
    inputs = tiny_llava.example_inputs(dense, batch=args.batch, text_tokens=args.text_tokens)
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
            start = time.perf_counter()
            train_step(run, optimizers[name], inputs)
            if step >= 0:
                times[name].append(time.perf_counter() - start)
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
    print(f"decoder {args.layers} x {args.hidden}, sequence {64 + 1 + args.text_tokens} tokens, batch {args.batch}, "
          f"sts schedule alpha={args.alpha} eps={args.eps} over {args.steps} steps, {torch.get_num_threads()} threads")
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
