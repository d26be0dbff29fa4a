"""Visual Token Compressor: dense vs compressed training on a LLaVA-1.5-shaped sequence, side by side.

The bundled example with a 24 x 24 patch grid (576 visual tokens per image, as LLaVA-1.5) and ~64
text tokens, a decoder sized to run on 2 CPU cores (4 x 512). Two measurements, steps of the dense and the
compressed model (``uniform``, keep_ratio 0.5 and 0.25) alternating:

* decoder part: forward + backward + AdamW of the decoder alone, on the hidden states that enter
  it in each model (the part the compressor shortens; its ideal is the FLOPs ratio below);
* whole step: the model's train step, vision encoder included (which compression does not shorten).

The ideal of the decoder part is the ratio of decoder FLOPs, dense / compressed: linear layers scale
with the sequence length S, attention scores with S^2 (``stsc.savings.decoder_flops``). The ideal of
the whole step is the ratio of the FLOPs one training step of each model performs, counted by
``torch.utils.flop_counter.FlopCounterMode`` (the vision encoder, the projector and the LM head on
the expanded sequence included). Last line (decoder part, keep_ratio 0.25):

    RESULT speedup=<measured> ideal=<analytic> fraction_of_ideal=<measured/ideal>

    python benchmarks/vtc_speed.py [--layers 4 --hidden 512 --steps 20]

The default width 512 keeps the decoder's matrices large enough that the FLOPs count describes
their cost; at width 256 per-call overheads the count ignores cost about a tenth of the ideal at
keep_ratio 0.25 (both are in the README).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_llava  # noqa: E402

from stsc import sparsify, transform  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402
from stsc.savings import decoder_flops  # noqa: E402
from timing import alternate  # noqa: E402


def model_step(model, inputs):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs)["loss"].backward()
        optimizer.step()
    return step


def step_flops(model, inputs) -> int:
    """FLOPs of one training forward and backward of ``model`` (a SparseModel compresses as it trains)."""
    with FlopCounterMode(display=False) as counter:
        model(**inputs)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def decoder_step(model, inputs):
    """A train step of the decoder alone, on the hidden states that enter it when ``model`` trains."""
    decoder = model.decoder  # a SparseModel passes attributes through to the model
    seen = []
    handle = decoder.register_forward_pre_hook(lambda module, args: seen.append(args))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    embeds, mask = seen[0]
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        decoder(embeds.detach().requires_grad_(), mask).square().mean().backward()
        optimizer.step()
    return step, embeds.shape[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd steps")
    args = parser.parse_args(argv)
    kwargs = dict(image_size=336, patch_size=14, vision_dim=64, vision_layers=1, hidden_size=args.hidden,
                  layers=args.layers, heads=max(args.hidden // 64, 1), intermediate_size=int(args.hidden * 8 / 3))
    dense = tiny_llava.build_model(**kwargs)
    inputs = tiny_llava.example_inputs(dense, batch=args.batch, text_tokens=args.text_tokens)
    sequence = inputs["input_ids"].shape[1]
    print(f"visual tokens 576 per image, sequence {sequence}, decoder {args.layers} x {args.hidden}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'part':<8} {'lowering':<9} {'mode':<9} {'keep':>5} {'seq':>5} {'dense ms':>9} {'vtc ms':>8} "
          f"{'speedup':>8} {'ideal':>6} {'of ideal':>9}")
    rows = []
    for keep_ratio in (0.5, 0.25):
        policy = parse_policy(f"version: 1\nstages:\n  - {{name: alignment, epochs: 1, passes: "
                              f"{{compress_visual_tokens: {{keep_ratio: {keep_ratio}}}}}}}\n", "vtc_speed")
        sparse = sparsify(copy.deepcopy(dense), policy, inputs)
        graph = transform(copy.deepcopy(dense), policy, inputs)["alignment"]
        dense_decoder, _ = decoder_step(dense, inputs)
        sparse_decoder, short = decoder_step(sparse, inputs)
        ideals = {"decoder": decoder_flops(sequence, args.hidden, args.layers)
                  / decoder_flops(short, args.hidden, args.layers),
                  "step": step_flops(dense, inputs) / step_flops(sparse, inputs)}
        torch._dynamo.reset()
        graph.compile(backend="aot_eager")  # eager kernels; node by node, the export's guards re-run every call
        measured = [("decoder", "modules", "eager", dense_decoder, sparse_decoder),
                    ("step", "modules", "eager", model_step(dense, inputs), model_step(sparse, inputs)),
                    ("step", "graph", "eager", model_step(dense, inputs), model_step(graph, inputs))]
        if args.compile:
            compiled_dense = torch.compile(copy.deepcopy(dense))
            sparse.compile()
            compiled_graph = transform(copy.deepcopy(dense), policy, inputs)["alignment"]
            compiled_graph.compile()
            measured += [("step", "modules", "compiled", model_step(compiled_dense, inputs),
                          model_step(torch.compile(sparse), inputs)),
                         ("step", "graph", "compiled", model_step(compiled_dense, inputs),
                          model_step(compiled_graph, inputs))]
        for part, lowering, mode, dense_fn, sparse_fn in measured:
            dense_s, sparse_s = alternate([dense_fn, sparse_fn], args.steps)
            speedup, ideal = dense_s / sparse_s, ideals[part]
            rows.append({"part": part, "lowering": lowering, "mode": mode, "keep_ratio": keep_ratio, "sequence": short,
                         "dense_ms": 1e3 * dense_s, "vtc_ms": 1e3 * sparse_s, "speedup": speedup, "ideal": ideal,
                         "fraction_of_ideal": speedup / ideal})
            r = rows[-1]
            print(f"{part:<8} {lowering:<9} {mode:<9} {keep_ratio:>5} {short:>5} {r['dense_ms']:>9.1f} "
                  f"{r['vtc_ms']:>8.1f} {speedup:>8.3f} {ideal:>6.3f} {r['fraction_of_ideal']:>9.3f}", flush=True)
    result = next(r for r in reversed(rows) if r["part"] == "decoder")
    print(f"RESULT speedup={result['speedup']:.3f} ideal={result['ideal']:.3f} "
          f"fraction_of_ideal={result['fraction_of_ideal']:.3f}")
    return rows


if __name__ == "__main__":
    main()
