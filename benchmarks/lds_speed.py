"""Layer Dynamic Skipper: dense vs skipped train step, measured side by side in one run.

Two copies of the bundled LLaVA-style example (same initialization), sized so that the decoder
dominates the step, train with AdamW on the same batch. The skipping copy follows the paper's
schedule (``sts``, alpha, eps) over a simulated stage spanning the measured steps, so its mean skip
fraction is about alpha / 3. Steps of the two copies alternate, so machine noise hits both alike.

Printed per mode (eager; compiled with ``--compile``): median step times, measured speed-up, the
ideal ``1 / (1 - s)`` for the realized skip fraction s, and their ratio. Last line (eager):

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

from stsc import sparsify  # noqa: E402
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


def measure(args, compiled: bool) -> dict:
    dense = tiny_llava.build_model(hidden_size=args.hidden, layers=args.layers, heads=max(args.hidden // 64, 1),
                                   intermediate_size=int(args.hidden * 8 / 3))
    inputs = tiny_llava.example_inputs(dense, batch=args.batch, text_tokens=args.text_tokens)
    policy = parse_policy(f"""
version: 1
stages:
  - {{name: instruction, epochs: 1, passes: {{skip_layers: {{alpha: {args.alpha}, eps: {args.eps}}}}}}}
""", source="lds_speed")
    sparse = sparsify(copy.deepcopy(dense), policy, inputs)
    dense = sparsify(dense, "dense", inputs)  # the same wrapper, no passes: compiled alike
    run_dense, run_sparse = dense, sparse
    if compiled:
        torch._dynamo.reset()
        for model in (dense, sparse):
            model.compile()
        run_dense, run_sparse = torch.compile(dense), torch.compile(sparse)
    opt_dense = torch.optim.AdamW(dense.parameters(), lr=1e-4)
    opt_sparse = torch.optim.AdamW(sparse.parameters(), lr=1e-4)
    for step in range(args.warmup):  # also compiles every variant
        sparse.set_progress(step=step, epoch=0.0)
        train_step(run_dense, opt_dense, inputs)
        train_step(run_sparse, opt_sparse, inputs)
    times_dense, times_sparse, skipped = [], [], 0
    for step in range(args.steps):
        sparse.set_progress(step=args.warmup + step, epoch=step / args.steps)
        for run, opt, times in ((run_dense, opt_dense, times_dense), (run_sparse, opt_sparse, times_sparse)):
            start = time.perf_counter()
            train_step(run, opt, inputs)
            times.append(time.perf_counter() - start)
        skipped += len(sparse.runtimes["skip_layers"].last_skipped)
    fraction = skipped / (args.steps * args.layers)
    dense_s, sparse_s = statistics.mean(times_dense), statistics.mean(times_sparse)
    speedup, ideal = dense_s / sparse_s, 1 / (1 - fraction)
    return {"mode": "compiled" if compiled else "eager", "dense_ms": 1e3 * dense_s, "sts_ms": 1e3 * sparse_s,
            "skip_fraction": fraction, "expected_fraction": 1 - sparse.report.stages[0].layers_run,
            "speedup": speedup, "ideal": ideal, "fraction_of_ideal": speedup / ideal}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    print(f"decoder {args.layers} x {args.hidden}, sequence {64 + 1 + args.text_tokens} tokens, batch {args.batch}, "
          f"sts schedule alpha={args.alpha} eps={args.eps} over {args.steps} steps, {torch.get_num_threads()} threads")
    rows = [measure(args, compiled=False)] + ([measure(args, compiled=True)] if args.compile else [])
    print(f"{'mode':<9} {'dense ms':>9} {'sts ms':>9} {'skipped':>8} {'expected':>9} {'speedup':>8} {'ideal':>6} {'of ideal':>9}")
    for r in rows:
        print(f"{r['mode']:<9} {r['dense_ms']:>9.1f} {r['sts_ms']:>9.1f} {r['skip_fraction']:>8.3f} "
              f"{r['expected_fraction']:>9.3f} {r['speedup']:>8.3f} {r['ideal']:>6.3f} {r['fraction_of_ideal']:>9.3f}")
    eager = rows[0]
    print(f"RESULT speedup={eager['speedup']:.3f} ideal={eager['ideal']:.3f} fraction_of_ideal={eager['fraction_of_ideal']:.3f}")


if __name__ == "__main__":
    main()
