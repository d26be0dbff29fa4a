"""Two-stage multimodal training, dense vs STS, side by side in one run, on a synthetic shapes task.

The task (generated from a seed, nothing downloaded): 32 x 32 images holding one or two coloured
shapes (circle, square, triangle; red, green, blue, yellow) in distinct quadrants.

* alignment stage: caption the image, "red circle top left blue square bottom right";
* instruction stage: answer a question about it, "what colour is the square ?" -> "red",
  "is there a circle ?" -> "yes", "how many shapes ?" -> "two", "where is the circle ?" -> "top left".

The bundled LLaVA-style model (all parameters trained in both stages: its vision encoder starts
from random weights, unlike LLaVA's pretrained one) trains through both stages twice from the same
initialization, data order and seeds: once dense (``policies/dense.yaml``), once with
``policies/sts.yaml`` (one ``sparsify`` call; progress picks the stage). Evaluation is exact match on
questions about held-out images, in ``eval()`` (the dense model): the answer tokens and the end
token predicted by argmax, teacher-forced, which equals greedy decoding's exact match.

Printed: per stage and run wall-clock (training steps only), decoder tokens processed (sequence
positions entering the decoder), decoder layers executed, final accuracy, and the ratios. Written:
``--out`` directory with ``two_stage.json`` and ``two_stage.png`` (loss vs wall-clock; skip rate).
Last line:

    RESULT accuracy_dense=<a> accuracy_sts=<b> retention=<b/a> speedup=<dense time / sts time>

    python benchmarks/train_two_stage.py [--quick] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_llava  # noqa: E402

import stsc  # noqa: E402

# --------------------------------------------------------------------------------------- the task
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = {("top", "left"): (8, 8), ("top", "right"): (8, 24), ("bottom", "left"): (24, 8),
             ("bottom", "right"): (24, 24)}
WORDS = ["<pad>", "<bos>", "<eos>", "<image>", "describe", "answer", ":", "?", "what", "colour", "is", "the",
         "there", "a", "how", "many", "shapes", "where", "yes", "no", "one", "two", *COLOURS, *SHAPES,
         "top", "bottom", "left", "right"]
VOCAB = {word: index for index, word in enumerate(WORDS)}
assert VOCAB["<image>"] == tiny_llava.IMAGE_TOKEN_ID
TEXT_TOKENS = 14  # prompt + answer + end, padded


@dataclass
class Scene:
    shapes: list[tuple[str, str, tuple[str, str]]]  # (colour, shape, quadrant)


def random_scene(gen: torch.Generator) -> Scene:
    count = 1 + int(torch.randint(2, (1,), generator=gen))
    quadrants = [list(QUADRANTS)[i] for i in torch.randperm(4, generator=gen)[:count].tolist()]
    shapes = [SHAPES[i] for i in torch.randperm(3, generator=gen)[:count].tolist()]
    colours = [list(COLOURS)[i] for i in torch.randperm(4, generator=gen)[:count].tolist()]
    order = list(QUADRANTS)
    return Scene(sorted(zip(colours, shapes, quadrants), key=lambda item: order.index(item[2])))  # reading order


def render(scene: Scene, gen: torch.Generator) -> torch.Tensor:
    image = 0.05 * torch.randn(3, 32, 32, generator=gen)
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for colour, shape, quadrant in scene.shapes:
        cy, cx = (c + float(torch.randint(-2, 3, (1,), generator=gen)) for c in QUADRANTS[quadrant])
        if shape == "circle":
            mask = (y - cy) ** 2 + (x - cx) ** 2 <= 36
        elif shape == "square":
            mask = ((y - cy).abs() <= 5) & ((x - cx).abs() <= 5)
        else:
            mask = (y >= cy - 5) & (y <= cy + 5) & ((x - cx).abs() <= (y - cy + 5) / 2)
        image[:, mask] = torch.tensor(COLOURS[colour])[:, None]
    return image


def caption(scene: Scene) -> tuple[list[str], list[str]]:
    return ["describe", ":"], [w for colour, shape, (v, h) in scene.shapes for w in (colour, shape, v, h)]


def question(scene: Scene, gen: torch.Generator) -> tuple[list[str], list[str]]:
    colour, shape, (v, h) = scene.shapes[int(torch.randint(len(scene.shapes), (1,), generator=gen))]
    kind = int(torch.randint(4, (1,), generator=gen))
    if kind == 0:
        return ["what", "colour", "is", "the", shape, "?", "answer", ":"], [colour]
    if kind == 1:
        asked = SHAPES[int(torch.randint(3, (1,), generator=gen))]
        present = any(s == asked for _, s, _ in scene.shapes)
        return ["is", "there", "a", asked, "?", "answer", ":"], ["yes" if present else "no"]
    if kind == 2:
        return ["how", "many", "shapes", "?", "answer", ":"], [["one", "two"][len(scene.shapes) - 1]]
    return ["where", "is", "the", shape, "?", "answer", ":"], [v, h]


def make_batches(stage: str, images: int, batch: int, seed: int, tokens_per_image: int) -> list[dict]:
    """``images`` samples of one stage as batches: ``[bos, image..., prompt, answer, eos, pad...]``."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(images):
        scene = random_scene(gen)
        prompt, answer = caption(scene) if stage == "alignment" else question(scene, gen)
        text = [VOCAB[w] for w in prompt + answer + ["<eos>"]]
        ids = [VOCAB["<bos>"]] + [VOCAB["<image>"]] * tokens_per_image + text + [0] * (TEXT_TOKENS - len(text))
        labels = [-100] * (len(ids) - TEXT_TOKENS + len(prompt)) + text[len(prompt):]
        labels += [-100] * (len(ids) - len(labels))
        samples.append((render(scene, gen), ids, labels, len(ids) - TEXT_TOKENS + len(text)))
    batches = []
    for start in range(0, images - batch + 1, batch):
        chunk = samples[start:start + batch]
        ids = torch.tensor([s[1] for s in chunk])
        mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):
            mask[row, : s[3]] = 1
        batches.append({"input_ids": ids, "pixel_values": torch.stack([s[0] for s in chunk]),
                        "attention_mask": mask, "labels": torch.tensor([s[2] for s in chunk])})
    return batches


# ----------------------------------------------------------------------------------- training
def train(model: torch.nn.Module, policy: str, stages: dict[str, list[dict]], lr: float, label: str) -> dict:
    sparse = stsc.sparsify(model, policy, stages["alignment"][0])
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=lr, weight_decay=0.0)
    layers = len(sparse.report.model.blocks)
    decoder_input = []
    probe = model.decoder.register_forward_pre_hook(lambda m, args: decoder_input.append(args[0].shape))  # inputs_embeds
    log, per_stage, clock, step = [], {}, 0.0, 0
    for index, (name, batches) in enumerate(stages.items()):
        totals = per_stage[name] = {"seconds": 0.0, "tokens": 0, "layers": 0, "steps": len(batches)}
        for position, batch in enumerate(batches):
            sparse.set_progress(epoch=index + position / len(batches), step=step)
            decoder_input.clear()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = sparse(**batch)["loss"]
            loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - start
            skipper = sparse.runtimes.get("skip_layers")
            skipped = len(skipper.last_skipped) if skipper else 0
            shape = decoder_input[0]
            totals["seconds"] += seconds
            totals["tokens"] += shape[0] * shape[1]
            totals["layers"] += layers - skipped
            clock += seconds
            step += 1
            log.append({"step": step, "stage": sparse.stage, "seconds": clock, "loss": loss.item(),
                        "skip_rate": skipped / layers})
            if position % 10 == 0 or position == len(batches) - 1:
                print(f"\r{label:<6} {name:<12} {position + 1:>4}/{len(batches)}  loss {loss.item():.3f}  "
                      f"{totals['seconds']:6.1f} s", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    probe.remove()
    return {"per_stage": per_stage, "log": log, "model": sparse.unwrap()}


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: list[dict]) -> float:
    """Exact match of the answer and end tokens (argmax, teacher-forced), in eval mode."""
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = model(**batch)["logits"]
        predicted, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        answered = labels != -100
        correct += int(((predicted == labels) | ~answered).all(dim=1).sum())
        total += labels.shape[0]
    model.train()
    return correct / total


# ------------------------------------------------------------------------------------- output
def table(results: dict[str, dict]) -> list[str]:
    dense, sts = results["dense"], results["sts"]
    rows = [f"{'stage':<12} {'run':<6} {'seconds':>8} {'tokens':>10} {'layers':>7} {'accuracy':>9}"]
    for name in dense["per_stage"]:
        for label, run in results.items():
            s = run["per_stage"][name]
            acc = f"{run['accuracy']:.3f}" if name == "instruction" else ""
            rows.append(f"{name:<12} {label:<6} {s['seconds']:>8.1f} {s['tokens']:>10} {s['layers']:>7} {acc:>9}")
        d, t = dense["per_stage"][name], sts["per_stage"][name]
        rows.append(f"{name:<12} {'ratio':<6} {d['seconds'] / t['seconds']:>7.2f}x {t['tokens'] / d['tokens']:>10.3f} "
                    f"{t['layers'] / d['layers']:>7.3f}")
    total_dense = sum(s["seconds"] for s in dense["per_stage"].values())
    total_sts = sum(s["seconds"] for s in sts["per_stage"].values())
    rows.append(f"{'total':<12} {'dense':<6} {total_dense:>8.1f}")
    rows.append(f"{'total':<12} {'sts':<6} {total_sts:>8.1f}")
    return rows


def plot(results: dict[str, dict], path: Path) -> bool:
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]')", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for label, run in results.items():
        log = run["log"]
        window = 10
        smooth = [sum(e["loss"] for e in log[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(len(log))]
        left.plot([e["seconds"] for e in log], smooth, label=label)
    left.set(xlabel="training wall-clock (s)", ylabel="loss (10-step mean)", title="loss vs wall-clock")
    left.legend()
    log = results["sts"]["log"]
    rates = [e["skip_rate"] for e in log]
    right.plot([e["step"] for e in log], rates, ".", markersize=2, label="drawn, per step")
    right.plot([e["step"] for e in log], [sum(rates[max(0, i - 24):i + 1]) / min(i + 1, 25) for i in range(len(rates))],
               label="25-step mean")
    right.legend()
    right.set(xlabel="step", ylabel="fraction of decoder blocks skipped", title="sts: skip rate over training", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a CI-sized run (seconds): pipeline check, not accuracy")
    parser.add_argument("--images", type=int, default=None, help="training images per stage")
    parser.add_argument("--eval-images", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default="sts", help="the sparse run's policy (default: the sts preset)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    images = args.images or (64 if args.quick else 6400)
    eval_images = args.eval_images or (32 if args.quick else 1000)
    torch.manual_seed(args.seed)
    model = tiny_llava.build_model(hidden_size=args.hidden, layers=args.layers, heads=max(args.hidden // 32, 1),
                                   intermediate_size=int(args.hidden * 8 / 3), vocab_size=len(WORDS))
    tokens = model.config.tokens_per_image
    stages = {"alignment": make_batches("alignment", images, args.batch, args.seed + 1, tokens),
              "instruction": make_batches("instruction", images, args.batch, args.seed + 2, tokens)}
    held_out = make_batches("instruction", eval_images, args.batch, args.seed + 1000, tokens)
    print(f"shapes task: {images} images per stage, batch {args.batch}, {len(held_out) * args.batch} held-out "
          f"questions; decoder {args.layers} x {args.hidden}, {tokens} visual tokens, {torch.get_num_threads()} threads")
    results = {}
    for label, policy in (("dense", "dense"), ("sts", args.policy)):
        torch.manual_seed(args.seed)
        run = train(copy.deepcopy(model), policy, stages, args.lr, label)
        run["accuracy"] = accuracy(run.pop("model"), held_out)
        results[label] = run
    rows = table(results)
    print("\n".join(rows))
    a, b = results["dense"]["accuracy"], results["sts"]["accuracy"]
    seconds = {label: sum(s["seconds"] for s in run["per_stage"].values()) for label, run in results.items()}
    summary = {"accuracy_dense": a, "accuracy_sts": b, "retention": b / a if a else math.nan,
               "speedup": seconds["dense"] / seconds["sts"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "two_stage.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
         "runs": {label: {"per_stage": run["per_stage"], "accuracy": run["accuracy"], "log": run["log"]}
                  for label, run in results.items()}}, indent=1))
    if plot(results, args.out / "two_stage.png"):
        print(f"wrote {args.out / 'two_stage.png'} and {args.out / 'two_stage.json'}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    return {"summary": summary, "runs": results}


if __name__ == "__main__":
    main()
