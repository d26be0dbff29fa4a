"""sparsify at full scale on the meta device: seconds and peak memory of matching a model from its weights' shapes.

    python benchmarks/meta_scale.py [--configs llava-1.5-7b qwen2.5-vl-72b] [--policy sts]

Each config runs in a fresh process, so its peak memory is its own: the model is built on the meta device from its
published shapes (no weight exists anywhere), then ``sparsify(model, policy, example_inputs, verify=False)`` runs
on real example inputs (one image; token ids, pixels, grid: kilobytes). ``verify=False`` because the trial step
needs weights; with ``verify=True`` it runs at the first training forward anyway (the weights hold no data here).

Per config: parameters, what was found (capture method, decoder blocks, boundary, visual tokens per image, decoder
entry), seconds to build the model on meta, wall-clock and CPU seconds of ``sparsify`` (CPU seconds are less
sensitive to other processes on the machine), the process's peak resident memory (``resource.getrusage``: torch and
transformers included), and the load average before and after. One ``RESULT config=... sparsify_s=...
peak_rss_gib=...`` line per config.

Configs (shapes as published on the Hugging Face Hub): ``llava-1.5-7b`` (llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at
336 px, Llama-2-7B; exported), ``qwen2.5-vl-72b`` (Qwen/Qwen2.5-VL-72B-Instruct: a 32-block window-attention vision
tower, an 80-block Qwen2 decoder with M-RoPE; dynamic resolution, so captured by the real-tensor trace, which
computes the image grid's positions for real and everything that reads a weight on meta).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

import stsc

LLAVA_IMAGE = 32000
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 151655, 151656, 151652, 151653


def llava_1_5_7b():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 576), LLAVA_IMAGE), torch.randint(100, 30000, (1, 64))], 1)
    labels = torch.where(ids == LLAVA_IMAGE, -100, ids)
    return model, dict(input_ids=ids, pixel_values=torch.randn(1, 3, 336, 336), attention_mask=torch.ones_like(ids),
                       labels=labels)


def qwen2_5_vl_72b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16, out_hidden_size=8192,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                              video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
                              vision_end_token_id=QWEN_END)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    grid = torch.tensor([[1, 16, 16]])  # 224 x 224 px: 16 x 16 patches of 14 px, 2 x 2 merged: 64 visual tokens
    ids = torch.cat([torch.tensor([[QWEN_START]]), torch.full((1, 64), QWEN_IMAGE), torch.tensor([[QWEN_END]]),
                     torch.randint(100, 30000, (1, 64))], 1)
    labels = torch.where(ids == QWEN_IMAGE, -100, ids)
    return model, dict(input_ids=ids, pixel_values=torch.randn(256, 3 * 2 * 14 * 14), image_grid_thw=grid,
                       attention_mask=torch.ones_like(ids), labels=labels, mm_token_type_ids=(ids == QWEN_IMAGE).long())


CONFIGS = {"llava-1.5-7b": llava_1_5_7b, "qwen2.5-vl-72b": qwen2_5_vl_72b}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load() -> float:
    return float(open("/proc/loadavg").read().split()[0]) if os.path.exists("/proc/loadavg") else float("nan")


def child(name: str, policy: str) -> dict:
    """One config in this (fresh) process."""
    load_before, start = load(), time.perf_counter()
    model, inputs = CONFIGS[name]()
    model.train()
    built, cpu = time.perf_counter(), cpu_seconds()
    sparse = stsc.sparsify(model, policy, inputs, verify=False)
    seconds, cpu = time.perf_counter() - built, cpu_seconds() - cpu
    report = sparse.report.model
    return {"config": name, "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
            "capture": report.capture_method, "blocks": len(report.blocks), "boundary": report.boundary.kind,
            "tokens_per_image": report.boundary.tokens_per_image, "decoder_entry": report.boundary.decoder_entry,
            "support": report.support, "build_s": built - start, "sparsify_s": seconds, "sparsify_cpu_s": cpu,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "load_before": load_before, "load_after": load()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--policy", default="sts")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("CHILD " + json.dumps(child(args.child, args.policy)), flush=True)
        return []
    rows = []
    for name in args.configs:
        result = subprocess.run([sys.executable, __file__, "--child", name, "--policy", args.policy],
                                capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("CHILD ")]
        if result.returncode or not lines:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(lines[0][len("CHILD "):]))
    print(f"{'config':<16} {'params':>7} {'capture':<8} {'blocks':>6} {'tokens/image':>12} {'build s':>8} "
          f"{'sparsify s':>10} {'cpu s':>6} {'peak RSS GiB':>12} {'load':>11}")
    for row in rows:
        print(f"{row['config']:<16} {row['params_b']:>6.1f}B {row['capture']:<8} {row['blocks']:>6} "
              f"{row['tokens_per_image']!s:>12} {row['build_s']:>8.1f} {row['sparsify_s']:>10.1f} "
              f"{row['sparsify_cpu_s']:>6.1f} {row['peak_rss_gib']:>12.2f} "
              f"{row['load_before']:>5.1f}/{row['load_after']:<5.1f}")
        print(f"  boundary {row['boundary']}, decoder entry {row['decoder_entry']}, support {row['support']}")
    for row in rows:
        print(f"RESULT config={row['config']} sparsify_s={row['sparsify_s']:.1f} "
              f"sparsify_cpu_s={row['sparsify_cpu_s']:.1f} peak_rss_gib={row['peak_rss_gib']:.2f}")
    return rows


if __name__ == "__main__":
    main()
