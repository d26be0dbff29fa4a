"""Host syncs per training step: a compressing and a skipping stage, in both lowerings, at two depths.

The bundled example (2 images, batch 2) on ``--device`` in ``--dtype``. Per stage (``compress``: uniform,
keep_ratio 0.5; ``skip``: skip_layers, constant alpha 0.5), lowering (``modules``: ``sparsify``; ``graph``:
``stsc.transform``) and depth (``--layers``, default 2 and 6 blocks): one warm-up step, then one training step
(forward, backward, AdamW) counted by :func:`stsc.syncs.count_syncs`, with the lowered model and the batch as the
roots; and the dense example's own step, for reference. On the CPU the count is what would sync on a GPU; on a GPU, CUDA's sync debug mode counts too (the
``cuda`` column, which should equal ``syncs``). Then where each stage's syncs come from, and the last line:

    RESULT dense=<n> compress_modules=<n> compress_graph=<n> skip_modules=<n> skip_graph=<n> grows_with_blocks=<yes|no>
           cuda_agrees=<yes|no, on a GPU: every count equals CUDA's; n/a on the CPU>

    python benchmarks/sync_count.py [--device cuda --layers 2 6 --batch 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_llava  # noqa: E402

from stsc import sparsify, transform  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402
from stsc.syncs import count_syncs  # noqa: E402
from timing import add_device_arguments, build_on, describe, device_and_dtype, on_device  # noqa: E402

STAGES = {"compress": "{compress_visual_tokens: {keep_ratio: 0.5}}",
          "skip": "{skip_layers: {schedule: constant, alpha: 0.5}}"}
LOWERINGS = {"dense": ("-",), "compress": ("modules", "graph"), "skip": ("modules", "graph")}  # dense: the example


def counted_step(stage: str, lowering: str, layers: int, batch: int, device, dtype):
    """The count of one training step of ``stage`` in ``lowering`` (after a warm-up step); ``dense``: the example
    itself."""
    model = build_on(device, dtype, tiny_llava.build_model, layers=layers)
    inputs = on_device(tiny_llava.example_inputs(model, batch=batch), device, dtype)
    run = model
    if stage != "dense":
        policy = parse_policy(f"version: 1\nstages:\n  - {{name: {stage}, epochs: 1, passes: {STAGES[stage]}}}\n",
                              "sync_count")
        run = sparsify(model, policy, inputs) if lowering == "modules" else transform(model, policy, inputs)[stage]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(number):
        if run is not model:
            run.set_progress(step=number, epoch=0.0)
        optimizer.zero_grad(set_to_none=True)
        run(**inputs)["loss"].backward()
        optimizer.step()

    step(0)
    with count_syncs(run, inputs) as count:
        step(1)
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--batch", type=int, default=2)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    print(f"host syncs per training step, the example with {args.batch} images, {describe(device, dtype)}")
    print(f"{'stage':<9} {'lowering':<9} {'blocks':>6} {'syncs':>6} {'cuda':>5}")
    counts = {}
    for stage, lowerings in LOWERINGS.items():
        for lowering in lowerings:
            for layers in args.layers:
                count = counts[stage, lowering, layers] = counted_step(stage, lowering, layers, args.batch, device,
                                                                       dtype)
                cuda = "-" if count.cuda_warnings is None else count.cuda_warnings
                print(f"{stage:<9} {lowering:<9} {layers:>6} {count.total:>6} {cuda:>5}", flush=True)
    deepest = max(args.layers)
    for stage, lowering in [(stage, lowering) for stage, lowerings in LOWERINGS.items() for lowering in lowerings]:
        print(f"{stage}, {lowering}, {deepest} blocks: {counts[stage, lowering, deepest].summary()}")
    grows = any(counts[key].by_location() != counts[(*key[:2], deepest)].by_location() for key in counts)
    agrees = "n/a" if device.type != "cuda" else "yes" if all(
        c.cuda_warnings == c.total for c in counts.values()) else "no"
    print("RESULT " + " ".join(f"{stage}_{lowering}={counts[stage, lowering, deepest].total}".replace("_-", "")
                               for stage, lowerings in LOWERINGS.items() for lowering in lowerings)
          + f" grows_with_blocks={'yes' if grows else 'no'} cuda_agrees={agrees}")
    return counts


if __name__ == "__main__":
    main()
