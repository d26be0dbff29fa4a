"""Realistic instruction mix: padded batches of dynamic-resolution images, dense vs compressed, with padding kept and
with padding removed.

Samples are drawn like a LLaVA-665K / Qwen2-VL instruction mix: 10 % text-only rows, 75 % one image, 15 % two or three
images; each image ``h x w`` patches with h and w drawn from 8 to 32 (Qwen2-VL's dynamic resolution: 16 to 256
tokens, 2 x 2 patches merged into one), text lengths log-normal (median 48 tokens, 8 to 320). Batches are right
padded (``padding_side="right"``) and formed two ways: **mixed** (consecutive samples of a shuffled list) and
**grouped** (``group_by_modality_length`` as LLaVA's trainer does it on 8 GPUs: image rows and text-only rows
apart, each shuffled and cut into mega-batches of 8 batches, sorted by length, cut into batches). The model is the
tiny HF Qwen2-VL of ``examples/hf_models.py`` with a wider decoder (``--hidden``, ``--layers``), trained with AdamW.

Three copies train on every batch, steps alternating (``benchmarks/timing.py``): **dense**; **padding kept**, the
compression as it was before padding removal: the same pass, with the matcher's padding mask withheld from it
(``structure.boundary.padding_input = None``), so it runs the very plan it ran then (each row drops its visual tokens,
the batch is as long as the row that drops the fewest, padding included); **padding removed**, the pass as it is.
Withholding the mask from the pass, rather than the batch from the model, keeps the model's own computation (its
attention mask, M-RoPE positions) identical in the two compressed copies, so they differ only in the plan.

Printed per batching: decoder positions summed over the batches (``batch x length``): padded (what the dense model
sees), each copy's, the **ideal** (per batch, ``batch x max over rows of (real positions - dropped visual tokens)``,
computed from the batch itself), and the rows' kept positions (no padding at all, as packing would give); step times
summed over batches (medians of ``--repeats``), each copy's speed-up over dense, and the **FLOPs ideal**: the dense
step's FLOPs over the FLOPs of a step at the ideal positions (``FlopCounterMode``, forward and backward, vision
encoder and LM head included; counted on the padding-removed copy's step, whose positions are the ideal ones, as
its ``of ideal`` column shows). Last line (mixed batches, padding removed):

    RESULT positions_of_ideal=<realised/ideal> speedup=<measured> ideal=<flops> fraction_of_ideal=<measured/ideal>

    python benchmarks/realistic_mix.py [--samples 32 --batch 4 --hidden 256 --layers 4 --repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import hf_models  # noqa: E402

from stsc import sparsify  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402
from timing import add_device_arguments, alternate, describe, device_and_dtype, on_device  # noqa: E402

PATCHES = range(8, 33, 4)  # image height / width in patches; 2 x 2 patches make one token
MEGABATCH = 8  # batches per mega-batch sorted by length (LLaVA's group_by_modality_length on 8 GPUs)


def draw_samples(count: int, seed: int) -> list[tuple[list[tuple[int, int, int]], int]]:
    """``(image grids, text tokens)`` per sample, drawn as the module docstring says."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        u = rng.random()
        images = 0 if u < 0.10 else 1 if u < 0.85 else rng.choice((2, 3))
        grids = [(1, rng.choice(PATCHES), rng.choice(PATCHES)) for _ in range(images)]
        samples.append((grids, min(max(round(rng.lognormvariate(3.87, 0.8)), 8), 320)))  # e^3.87 = 48
    return samples


def tokens(sample) -> int:
    """The sample's length: bos, each image between its start and end markers, the text."""
    grids, text = sample
    return 1 + sum(t * h * w // 4 + 2 for t, h, w in grids) + text


def mixed_batches(samples: list, batch: int) -> list[list]:
    return [samples[i:i + batch] for i in range(0, len(samples), batch)]


def grouped_batches(samples: list, batch: int, seed: int) -> list[list]:
    """``group_by_modality_length``: each modality shuffled, cut into mega-batches sorted by length (longest first),
    cut into batches; the batches of both modalities shuffled together."""
    rng = random.Random(seed)
    batches = []
    for modality in ([s for s in samples if s[0]], [s for s in samples if not s[0]]):
        modality = rng.sample(modality, len(modality))
        for start in range(0, len(modality), MEGABATCH * batch):
            mega = sorted(modality[start:start + MEGABATCH * batch], key=tokens, reverse=True)
            batches += mixed_batches(mega, batch)
    return rng.sample(batches, len(batches))


def ideal_positions(rows: list, inputs: dict, keep_ratio: float) -> int:
    """``batch x max over rows of (real positions - dropped visual tokens)`` of one batch."""
    real = inputs["attention_mask"].sum(dim=1).tolist()
    dropped = [sum(n - round(n * keep_ratio) for n in (t * h * w // 4 for t, h, w in grids)) for grids, _ in rows]
    return len(rows) * max(r - d for r, d in zip(real, dropped))


def train_step(model, inputs: dict):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()
    return step


def step_flops(model, inputs: dict) -> int:
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(batches: list, copies: dict, keep_ratio: float, repeats: int, device, dtype) -> dict:
    """Positions, FLOPs and step times of every copy, summed over ``batches``."""
    totals = {"batches": len(batches), "padded": 0, "ideal": 0, "rows": 0, "flops_dense": 0, "flops_ideal": 0,
              **{f"positions_{name}": 0 for name in copies}, **{f"seconds_{name}": 0.0 for name in copies}}
    for rows in batches:
        inputs = on_device(hf_models.padded_inputs("qwen2_vl", rows, "right"), device, dtype)
        batch, length = inputs["input_ids"].shape
        seconds = alternate([train_step(model, inputs) for model in copies.values()], repeats, warmup=1,
                            device=device)
        totals["padded"] += batch * length
        totals["ideal"] += ideal_positions(rows, inputs, keep_ratio)
        for (name, model), time in zip(copies.items(), seconds):
            compressor = model.runtimes.get("compress_visual_tokens") if name != "dense" else None
            totals[f"positions_{name}"] += batch * (compressor.last_plan.length if compressor else length)
            totals[f"seconds_{name}"] += time
        totals["rows"] += int(copies["after"].runtimes["compress_visual_tokens"].last_plan.lengths.sum())
        totals["flops_dense"] += step_flops(copies["dense"], inputs)
        totals["flops_ideal"] += step_flops(copies["after"], inputs)
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the benchmark works")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.hidden, args.layers, args.repeats = 8, 64, 2, 1
    device, dtype = device_and_dtype(args)
    model, example = hf_models.qwen2_vl(layers=args.layers, hidden=args.hidden)
    policy = parse_policy(f"version: 1\nstages:\n  - {{name: a, steps: 1, passes: {{compress_visual_tokens: "
                          f"{{method: uniform, keep_ratio: {args.keep_ratio}}}}}}}\n", "realistic_mix")
    before = sparsify(copy.deepcopy(model), policy, example)
    before.structure.boundary.padding_input = None  # padding kept: the plan the pass ran before padding removal
    copies = {"dense": model, "before": before, "after": sparsify(copy.deepcopy(model), policy, example)}
    for copy_ in copies.values():
        copy_.to(device, dtype).train()
    samples = draw_samples(args.samples, args.seed)
    print(f"{len(samples)} samples ({sum(not s[0] for s in samples)} text only, "
          f"{sum(len(s[0]) > 1 for s in samples)} with several images), batch {args.batch}, decoder {args.layers} x "
          f"{args.hidden}, keep_ratio {args.keep_ratio}, {describe(device, dtype)}")
    print(f"{'batching':<9} {'padding':<8} {'positions':>9} {'of padded':>9} {'of ideal':>8} {'step s':>7} "
          f"{'speed-up':>8} {'ideal':>6} {'of ideal':>8}")
    results = {}
    for batching, batches in (("mixed", mixed_batches(samples, args.batch)),
                              ("grouped", grouped_batches(samples, args.batch, args.seed))):
        t = measure(batches, copies, args.keep_ratio, args.repeats, device, dtype)
        ideal_speedup = t["flops_dense"] / t["flops_ideal"]
        for name, label in (("dense", "-"), ("before", "kept"), ("after", "removed")):
            positions, seconds = t[f"positions_{name}"], t[f"seconds_{name}"]
            speedup = t["seconds_dense"] / seconds
            print(f"{batching:<9} {label:<8} {positions:>9} {positions / t['padded']:>9.3f} "
                  f"{positions / t['ideal']:>8.3f} {seconds:>7.2f} {speedup:>8.3f} {ideal_speedup:>6.3f} "
                  f"{speedup / ideal_speedup:>8.3f}")
        print(f"{batching:<9} {t['batches']} batches: ideal {t['ideal']} positions, {t['padded']} padded; the rows' "
              f"kept positions {t['rows']} (no padding at all)", flush=True)
        results[batching] = {**t, "ideal_speedup": ideal_speedup}
    r = results["mixed"]
    speedup = r["seconds_dense"] / r["seconds_after"]
    print(f"RESULT positions_of_ideal={r['positions_after'] / r['ideal']:.3f} speedup={speedup:.3f} "
          f"ideal={r['ideal_speedup']:.3f} fraction_of_ideal={speedup / r['ideal_speedup']:.3f}")
    return results


if __name__ == "__main__":
    main()
