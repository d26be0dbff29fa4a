"""Visual Token Compressor: dense vs compressed train step on a LLaVA-1.5-shaped sequence, side by side.

The bundled example with a 24 x 24 patch grid (576 visual tokens per image, as LLaVA-1.5) and ~64
text tokens, a decoder sized to run on 2 CPU cores. Train steps (forward + backward + AdamW) of the
dense copy and the compressed copy (``uniform``, keep_ratio 0.5 and 0.25) alternate. The ideal is
the ratio of decoder FLOPs, dense / compressed, per token position: linear layers scale with the
sequence length S, attention scores with S^2 (counted per block as ``24 S d^2 + 4 S^2 d`` forward,
SwiGLU width 8/3 d). Last line (keep_ratio 0.25):

    RESULT speedup=<measured> ideal=<analytic> fraction_of_ideal=<measured/ideal>

    python benchmarks/vtc_speed.py [--layers 4 --hidden 256 --steps 12]
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

from stsc import capture, match  # noqa: E402
from stsc.passes.compress_visual_tokens import CompressVisualTokensConfig, apply  # noqa: E402
from stsc.savings import decoder_flops  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(argv)
    kwargs = dict(image_size=336, patch_size=14, vision_dim=64, vision_layers=1, hidden_size=args.hidden,
                  layers=args.layers, heads=max(args.hidden // 64, 1), intermediate_size=int(args.hidden * 8 / 3))
    dense = tiny_llava.build_model(**kwargs)
    inputs = tiny_llava.example_inputs(dense, batch=args.batch, text_tokens=args.text_tokens)
    sequence = inputs["input_ids"].shape[1]
    print(f"visual tokens 576 per image, sequence {sequence}, decoder {args.layers} x {args.hidden}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'keep':>5} {'seq':>5} {'dense ms':>9} {'vtc ms':>8} {'speedup':>8} {'ideal':>6} {'of ideal':>9}")
    result = None
    for keep_ratio in (0.5, 0.25):
        sparse = copy.deepcopy(dense)
        compressor, _ = apply(sparse, match(capture(sparse, inputs)),
                              CompressVisualTokensConfig(keep_ratio=keep_ratio), inputs)
        short = sequence - (576 - compressor.kept)
        ideal = decoder_flops(sequence, args.hidden, args.layers) / decoder_flops(short, args.hidden, args.layers)
        models = [(dense, torch.optim.AdamW(dense.parameters(), lr=1e-4), []),
                  (sparse, torch.optim.AdamW(sparse.parameters(), lr=1e-4), [])]
        for step in range(args.steps + 2):
            for model, optimizer, times in models:
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                model(**inputs)["loss"].backward()
                optimizer.step()
                if step >= 2:  # the first two steps warm up
                    times.append(time.perf_counter() - start)
        dense_s, sparse_s = (statistics.mean(times) for _, _, times in models)
        speedup = dense_s / sparse_s
        print(f"{keep_ratio:>5} {short:>5} {1e3 * dense_s:>9.1f} {1e3 * sparse_s:>8.1f} {speedup:>8.3f} "
              f"{ideal:>6.3f} {speedup / ideal:>9.3f}")
        result = (speedup, ideal)
    print(f"RESULT speedup={result[0]:.3f} ideal={result[1]:.3f} fraction_of_ideal={result[0] / result[1]:.3f}")


if __name__ == "__main__":
    main()
