"""Visual Token Compressor: dense vs compressed training on a LLaVA-1.5-shaped sequence, side by side.

The bundled example with a 24 x 24 patch grid (576 visual tokens per image, as LLaVA-1.5), on ``--device`` in
``--dtype`` (bfloat16 on CUDA; the example's attention is SDPA), at ``--shape cpu`` (the default: ~64 text
tokens, a decoder sized to run on 2 CPU cores, 4 x 512, batch 2) or ``--shape llava7b`` (4 blocks of
LLaVA-1.5-7B's decoder, width 4096, 32 heads, MLP 11008, 700-token rows, batch 8, for a GPU). Two
measurements, steps of the dense and the compressed model (``uniform``, keep_ratio 0.5 and 0.25) alternating
(CUDA events on a GPU):

* decoder part: forward + backward + AdamW of the decoder alone, on the hidden states that enter
  it in each model (the part the compressor shortens; its ideal is the FLOPs ratio below);
* whole step: the model's train step, vision encoder included (which compression does not shorten).

The ideal of the decoder part is the ratio of decoder FLOPs, dense / compressed: linear layers scale
with the sequence length S, attention scores with S^2 (``stsc.savings.decoder_flops``). The ideal of
the whole step is the ratio of the FLOPs one training step of each model performs, counted by
``torch.utils.flop_counter.FlopCounterMode`` (the vision encoder, the projector and the LM head on
the expanded sequence included). Last line (decoder part, the last keep ratio, 0.25 by default):

    RESULT speedup=<measured> ideal=<analytic> fraction_of_ideal=<measured/ideal>

    python benchmarks/vtc_speed.py [--layers 4 --hidden 512 --steps 20 --compile]
    python benchmarks/vtc_speed.py --device cuda --shape llava7b [--dtype bfloat16 --compile]

The default width 512 keeps the decoder's matrices large enough that the FLOPs count describes
their cost; at width 256 per-call overheads the count ignores cost about a tenth of the ideal at
keep_ratio 0.25 (both are in docs/benchmarks.md, "VTC speed").
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
from timing import LLAVA_7B, add_device_arguments, alternate, build_on, describe, device_and_dtype  # noqa: E402
from timing import on_device, parse_with_shapes  # noqa: E402

SHAPES = {"cpu": {"layers": 4, "hidden": 512, "heads": 8, "intermediate": 1365, "image_size": 336, "patch_size": 14,
                  "text_tokens": 64, "batch": 2, "steps": 20},
          "llava7b": {**LLAVA_7B, "layers": 4, "text_tokens": 123, "batch": 8, "steps": 10}}


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def model_step(model, inputs, optimizer):
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


def decoder_step(model, inputs, optimizer):
    """A train step of the decoder alone, on the hidden states that enter it when ``model`` trains (``optimizer``:
    the model's; only the decoder's parameters get gradients, so only they are stepped)."""
    decoder = model.decoder  # a SparseModel passes attributes through to the model
    seen = []
    handle = decoder.register_forward_pre_hook(lambda module, args: seen.append(args))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    embeds, mask = seen[0]

    def step():
        optimizer.zero_grad(set_to_none=True)
        decoder(embeds.detach().requires_grad_(), mask).float().square().mean().backward()
        optimizer.step()
    return step, embeds.shape[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("layers", "hidden", "heads", "intermediate", "image_size", "patch_size", "text_tokens", "batch",
                 "steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd steps")
    add_device_arguments(parser)
    args = parse_with_shapes(parser, SHAPES, argv)
    device, dtype = device_and_dtype(args)
    dense = build_on(device, dtype, tiny_llava.build_model, image_size=args.image_size, patch_size=args.patch_size,
                     vision_dim=64, vision_layers=1, hidden_size=args.hidden, layers=args.layers, heads=args.heads,
                     intermediate_size=args.intermediate)
    inputs = on_device(tiny_llava.example_inputs(dense, batch=args.batch, text_tokens=args.text_tokens), device, dtype)
    sequence = inputs["input_ids"].shape[1]
    dense_optimizer = adamw(dense)
    print(f"visual tokens {dense.config.tokens_per_image} per image, sequence {sequence}, decoder {args.layers} x "
          f"{args.hidden} ({args.heads} heads, MLP {args.intermediate}), batch {args.batch}, {describe(device, dtype)}")
    print(f"{'part':<8} {'lowering':<9} {'mode':<9} {'keep':>5} {'seq':>5} {'dense ms':>9} {'vtc ms':>8} "
          f"{'speedup':>8} {'ideal':>6} {'of ideal':>9}")
    rows = []
    for keep_ratio in args.keep_ratios:
        policy = parse_policy(f"version: 1\nstages:\n  - {{name: alignment, epochs: 1, passes: "
                              f"{{compress_visual_tokens: {{keep_ratio: {keep_ratio}}}}}}}\n", "vtc_speed")
        sparse = sparsify(copy.deepcopy(dense), policy, inputs)
        graph = transform(copy.deepcopy(dense), policy, inputs)["alignment"]
        sparse_optimizer, graph_optimizer = adamw(sparse), adamw(graph)
        dense_decoder, _ = decoder_step(dense, inputs, dense_optimizer)
        sparse_decoder, short = decoder_step(sparse, inputs, sparse_optimizer)
        ideals = {"decoder": decoder_flops(sequence, args.hidden, args.layers)
                  / decoder_flops(short, args.hidden, args.layers),
                  "step": step_flops(dense, inputs) / step_flops(sparse, inputs)}
        torch._dynamo.reset()
        graph.compile(backend="aot_eager")  # eager kernels; node by node, the export's guards re-run every call
        measured = [("decoder", "modules", "eager", dense_decoder, sparse_decoder),
                    ("step", "modules", "eager", model_step(dense, inputs, dense_optimizer),
                     model_step(sparse, inputs, sparse_optimizer)),
                    ("step", "graph", "eager", model_step(dense, inputs, dense_optimizer),
                     model_step(graph, inputs, graph_optimizer))]
        if args.compile:
            compiled_dense = torch.compile(copy.deepcopy(dense))
            sparse.compile()
            compiled_graph = transform(copy.deepcopy(dense), policy, inputs)["alignment"]
            compiled_graph.compile()
            compiled_optimizer = adamw(compiled_dense)
            measured += [("step", "modules", "compiled", model_step(compiled_dense, inputs, compiled_optimizer),
                          model_step(torch.compile(sparse), inputs, sparse_optimizer)),
                         ("step", "graph", "compiled", model_step(compiled_dense, inputs, compiled_optimizer),
                          model_step(compiled_graph, inputs, adamw(compiled_graph)))]
        for part, lowering, mode, dense_fn, sparse_fn in measured:
            dense_s, sparse_s = alternate([dense_fn, sparse_fn], args.steps, device=device)
            speedup, ideal = dense_s / sparse_s, ideals[part]
            rows.append({"part": part, "lowering": lowering, "mode": mode, "keep_ratio": keep_ratio, "sequence": short,
                         "dense_ms": 1e3 * dense_s, "vtc_ms": 1e3 * sparse_s, "speedup": speedup, "ideal": ideal,
                         "fraction_of_ideal": speedup / ideal})
            r = rows[-1]
            print(f"{part:<8} {lowering:<9} {mode:<9} {keep_ratio:>5} {short:>5} {r['dense_ms']:>9.1f} "
                  f"{r['vtc_ms']:>8.1f} {speedup:>8.3f} {ideal:>6.3f} {r['fraction_of_ideal']:>9.3f}", flush=True)
        del measured, sparse, graph, sparse_optimizer, graph_optimizer, sparse_decoder  # before the next copies
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = next(r for r in reversed(rows) if r["part"] == "decoder")
    print(f"RESULT speedup={result['speedup']:.3f} ideal={result['ideal']:.3f} "
          f"fraction_of_ideal={result['fraction_of_ideal']:.3f}")
    return rows


if __name__ == "__main__":
    main()
