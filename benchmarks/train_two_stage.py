"""Two-stage LLaVA-recipe training on a synthetic shapes task: dense, STS, the policy `stsc profile`
proposes, and a stronger preset, trained side by side (interleaved step by step) over several seeds.

The task (generated from a seed, nothing downloaded): 32 x 32 images holding one or two coloured
shapes (circle, square, triangle; red, green, blue, yellow) in distinct quadrants.

* alignment stage: caption the image, "red circle top left blue square bottom right";
* instruction stage: answer a question about it, "what colour is the square ?" -> "red",
  "is there a circle ?" -> "yes", "how many shapes ?" -> "two", "where is the circle ?" -> "top left".

The recipe is LLaVA-1.5's on the bundled LLaVA-style model (``examples/tiny_llava.py``):

* pretrained parts (not timed; computed once and cached in ``--out``): the vision encoder learns to
  tell, from each of its output tokens, the colour and shape in the token's quadrant and which quadrant
  it is (a linear probe, then dropped), so its tokens carry their surroundings as CLIP's do; the
  decoder is a language model trained on text alone: the scene written in words ("red circle top
  left ...") in place of the image, then a caption or a question with its answer. It
  can read and answer, but has never seen a visual token, as LLaVA's Vicuna knows language but not images;
* alignment: the projector alone trains (fresh weights per seed); the encoder and decoder are frozen;
* instruction tuning: the projector and the decoder train. The vision encoder stays frozen throughout
  (``requires_grad`` off: it runs forward only, and no gradient is computed for it).

Each seed (its own projector initialization, training images and order, and policy seed for the
random draws) trains one model and AdamW optimizer per policy from the same weights: ``dense``
(``policies/dense.yaml``), ``sts`` (the paper's scheme), ``profile`` (the policy ``stsc.profile``
proposes from the model at the start of training, on the first alignment batches) and ``sts_fast``
(``policies/sts_fast.yaml``: compression in both stages, a harder skip schedule, a dense tail); others
with ``--policies``. The policies advance **in round robin, one training step at a time, on
the same batch**, with the order rotating every step, so that machine noise hits all of them alike.
One ``sparsify`` call per run; the epoch progress picks the policy's stage.

Measured: the wall-clock of each training step (``zero_grad``, forward, backward, optimizer and
learning-rate steps; nothing else: not evaluation, profiling or schedule moves), the positions
entering the decoder (tokens) and the decoder blocks run (layers) per stage; held-out accuracy
(exact match of the answer and end tokens of questions about 1000 unseen images, argmax teacher-forced,
in ``eval()``, i.e. on the dense model) at the end of alignment and every ``--eval-every`` instruction
steps. Per policy, over the seeds: the mean and spread of the final accuracy, the retention (accuracy /
the dense run's accuracy, per seed), the speed-up (dense training seconds / the policy's, per seed)
and the time-to-accuracy speed-up (the training wall-clock at which the dense run first reaches its
own final accuracy / the wall-clock at which the policy first reaches it; "not reached" if never),
per seed, also to 0.99 of the dense final accuracy (the retention target), and on the accuracy curves
averaged over the seeds (target: the dense runs' mean final accuracy). Training steps run with
``--threads`` (1); pretraining and profiles (not timed) with ``--untimed-threads``; evaluations run in a worker
process with one thread, on the core the training steps leave free.
Also printed: the analytic shares of step FLOPs (vision encoder, projector, decoder, LM head) of this
model and of LLaVA-1.5-7B, and, on the first seed, ``stsc.profile`` at the start and end of each stage
(dense run, and the ``sts`` run in instruction tuning) side by side.

Written to ``--out``: ``two_stage.json`` (everything, profiles included) and ``two_stage.png``
(accuracy vs wall-clock; skip rate and decoder sequence length over training). Last line:

    RESULT accuracy_dense=<a> accuracy_sts=<b> retention=<mean b/a> speedup=<mean dense/sts time>
           best_policy=<name> best_retention=<r> best_speedup=<y>

(accuracies: means over seeds; retention and speed-up: means of the per-seed ratios; the best policy:
of those with mean retention >= 0.99, the fastest; if none, the one with the highest retention).

    python benchmarks/train_two_stage.py [--quick] [--seeds 3] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev

import torch
import torch.nn.functional as F
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_llava  # noqa: E402

import stsc  # noqa: E402
from stsc.policy import load_policy, parse_policy  # noqa: E402
from stsc.passes.compress_visual_tokens import METHODS as COMPRESSION_METHODS  # noqa: E402
from stsc.profile_output import compare  # noqa: E402
from stsc.savings import decoder_flops  # noqa: E402

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
SCENE_WORDS = 8  # two shapes in words: colour, shape, top/bottom, left/right
TORCH_THREADS = torch.get_num_threads()  # torch's default on this machine, before --threads changes it
HELD_OUT_SEED, ENCODER_SEED, TEXT_SEED = 10_000, 20_000, 30_000  # data seeds apart from the runs' (seed * 1000 + ...)


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


def quadrant_labels(scene: Scene) -> torch.Tensor:
    """``[4, 2]``: per quadrant (reading order), the colour (0: none, 1-4) and the shape (0: none, 1-3)."""
    labels = torch.zeros(4, 2, dtype=torch.long)
    for colour, shape, quadrant in scene.shapes:
        labels[list(QUADRANTS).index(quadrant)] = torch.tensor([1 + list(COLOURS).index(colour), 1 + SHAPES.index(shape)])
    return labels


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
    """``images`` samples of one stage as batches: ``[bos, image..., prompt, answer, eos, pad...]``, labels on
    the answer and end tokens. ``tokens_per_image=0``: the scene written in words instead of the image
    (``[bos, colour, shape, top/bottom, left/right, ..., prompt, answer, eos, pad...]``), for the decoder's
    text pretraining; ``pixel_values`` are rendered all the same."""
    gen = torch.Generator().manual_seed(seed)
    length = 1 + (tokens_per_image or SCENE_WORDS) + TEXT_TOKENS
    samples = []
    for _ in range(images):
        scene = random_scene(gen)
        prompt, answer = caption(scene) if stage == "alignment" else question(scene, gen)
        image = [VOCAB["<image>"]] * tokens_per_image if tokens_per_image else [VOCAB[w] for w in caption(scene)[1]]
        text = [VOCAB[w] for w in prompt + answer + ["<eos>"]]
        ids = [VOCAB["<bos>"]] + image + text
        labels = [-100] * (1 + len(image) + len(prompt)) + text[len(prompt):]
        samples.append((render(scene, gen), ids + [0] * (length - len(ids)), labels + [-100] * (length - len(ids)),
                        len(ids)))
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


def encoder_batches(images: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images with their :func:`quadrant_labels`, for pretraining the vision encoder."""
    gen = torch.Generator().manual_seed(seed)
    scenes = [random_scene(gen) for _ in range(images)]
    pixels = [render(scene, gen) for scene in scenes]
    return [(torch.stack(pixels[i:i + batch]), torch.stack([quadrant_labels(s) for s in scenes[i:i + batch]]))
            for i in range(0, images - batch + 1, batch)]


# ----------------------------------------------------------------------------------- the model
def build_model(args) -> tiny_llava.TinyLlava:
    return tiny_llava.build_model(hidden_size=args.hidden, layers=args.layers, heads=max(args.hidden // 32, 1),
                                  intermediate_size=int(args.hidden * 8 / 3), vocab_size=len(WORDS))


def trainable(model: tiny_llava.TinyLlava, stage: str) -> list[nn.Module]:
    """The recipe: alignment trains the projector; instruction tuning the projector and the decoder (LM head
    included). The vision encoder is never trained."""
    return [model.projector] if stage == "alignment" else [model.projector, model.decoder, model.lm_head]


def freeze_all_but(model: nn.Module, modules: list[nn.Module]) -> list[nn.Parameter]:
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def token_targets(model: tiny_llava.TinyLlava, labels: torch.Tensor) -> torch.Tensor:
    """``[B, tokens, 3]``: for each visual token, its quadrant's colour and shape (:func:`quadrant_labels`) and
    the quadrant itself: what a pretrained encoder's token is asked to know about its surroundings."""
    g = model.config.grid
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    quadrant = (2 * (rows >= g // 2) + (cols >= g // 2)).flatten()
    return torch.cat([labels[:, quadrant], quadrant.expand(len(labels), -1)[..., None]], dim=-1)


def pretrain(args, model: tiny_llava.TinyLlava) -> dict:
    """The pretrained parts (module docstring), loaded from ``--out`` when cached; returns their measures."""
    settings = {"hidden": args.hidden, "layers": args.layers, "steps": args.pretrain_steps, "version": 3}
    path = args.out / f"pretrained-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        model.load_state_dict(cached["state"])
        return {**cached["measures"], "cache": str(path), "loaded": True}
    start = time.perf_counter()
    torch.manual_seed(ENCODER_SEED)
    classes = (5, 4, 4)  # colour (none + 4) and shape (none + 3) of the token's quadrant, the quadrant
    probe = nn.Linear(model.config.vision_dim, sum(classes))

    def logits_and_targets(pixels, labels):
        return probe(model.vision(pixels)).split(classes, dim=-1), token_targets(model, labels)

    optimizer = torch.optim.AdamW([*freeze_all_but(model, [model.vision]), *probe.parameters()], lr=1e-3)
    for step, batch in enumerate(encoder_batches(args.pretrain_steps * 32, 32, ENCODER_SEED)):
        logits, targets = logits_and_targets(*batch)
        loss = sum(F.cross_entropy(part.flatten(0, 1), targets[..., i].flatten()) for i, part in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _progress(f"pretraining the vision encoder {step + 1}/{args.pretrain_steps}  loss {loss.item():.3f}")
    with torch.no_grad():
        right = total = 0
        for batch in encoder_batches(256, 64, HELD_OUT_SEED + 1):
            logits, targets = logits_and_targets(*batch)
            guess = torch.stack([part.argmax(-1) for part in logits], dim=-1)
            right, total = right + int((guess == targets).all(-1).sum()), total + targets.shape[:2].numel()
    optimizer = torch.optim.AdamW(freeze_all_but(model, [model.decoder, model.lm_head]), lr=1e-3)
    text = [b for pair in zip(make_batches("alignment", args.pretrain_steps * 16, 32, TEXT_SEED, 0),
                              make_batches("instruction", args.pretrain_steps * 16, 32, TEXT_SEED + 1, 0)) for b in pair]
    for step, batch in enumerate(text):
        loss = model(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _progress(f"pretraining the decoder on text {step + 1}/{len(text)}  loss {loss.item():.3f}")
    model.requires_grad_(True)
    measures = {"encoder_probe_accuracy": right / total, "decoder_text_loss": fmean(
        model(**b)["loss"].item() for b in make_batches("instruction", 256, 64, HELD_OUT_SEED + 2, 0)),
        "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "measures": measures}, path)
    _progress("")
    return {**measures, "cache": str(path), "loaded": False}


# ------------------------------------------------------------------------------------- FLOPs
def vit_flops(tokens: int, dim: int, layers: int) -> float:
    """Forward FLOPs of ViT blocks: projections 4 d^2 + MLP 8 d^2 (x2 per multiply-add), attention 4 S^2 d."""
    return layers * (2 * tokens * 12 * dim * dim + 4 * tokens * tokens * dim)


def step_flop_shares(patches: int, patch_pixels: int, vision_dim: int, vision_layers: int, hidden: int, layers: int,
                     sequence: int, vocab: int) -> dict[str, dict[str, float]]:
    """Each part's share of one training step's FLOPs, per stage of the recipe. Forward FLOPs times: 1 for
    the frozen encoder (forward only); 2 for the projector (forward and weight gradients: its input needs
    none); 2 for the decoder and LM head in alignment (forward and the input gradients that reach the
    projector), 3 in instruction tuning (forward, input and weight gradients)."""
    forward = {"vision encoder": 2 * patches * patch_pixels * vision_dim + vit_flops(patches, vision_dim, vision_layers),
               "projector": 2 * patches * (vision_dim * hidden + hidden * hidden),
               "decoder": decoder_flops(sequence, hidden, layers), "lm head": 2 * sequence * hidden * vocab}
    shares = {}
    for stage, backward in (("alignment", 1), ("instruction", 2)):
        step = {"vision encoder": forward["vision encoder"], "projector": 2 * forward["projector"],
                "decoder": (1 + backward) * forward["decoder"], "lm head": (1 + backward) * forward["lm head"]}
        shares[stage] = {part: flops / sum(step.values()) for part, flops in step.items()}
    return shares


def flop_report(model: tiny_llava.TinyLlava, sequence: int) -> dict:
    """Step FLOP shares of this model and of LLaVA-1.5-7B (CLIP ViT-L/14 at 336 px: 577 positions, 23 of 24
    layers run; a 1024 -> 4096 -> 4096 projector; Vicuna-7B, 32 x 4096, at 576 visual + 64 text positions)."""
    c = model.config
    return {"this model": step_flop_shares(c.tokens_per_image, c.channels * c.patch_size ** 2, c.vision_dim,
                                           c.vision_layers, c.hidden_size, c.layers, sequence, c.vocab_size),
            "LLaVA-1.5-7B": step_flop_shares(577, 3 * 14 * 14, 1024, 23, 4096, 32, 640, 32000)}


# ----------------------------------------------------------------------------------- training
def with_seed(policy, seed: int):
    """``policy`` (a preset name, path or Policy) with ``seed`` as the seed of its random draws."""
    loaded = load_policy(policy)
    return parse_policy(yaml.safe_dump({**loaded.to_dict(), "seed": seed}, sort_keys=False), source=loaded.source)


def policy_name(policy: str) -> str:
    """A policy's name in the tables: the preset name, or a policy file's stem."""
    return Path(policy).stem


def learning_rate_factor(step: int, steps: int) -> float:
    """LLaVA's schedule: linear warm-up over the first 3 % of the stage's steps, then cosine decay to 0."""
    warmup = max(1, round(0.03 * steps))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


class Run:
    """One policy's model, optimizer and measurements, advanced one training step at a time."""

    def __init__(self, name: str, model: tiny_llava.TinyLlava, policy, example: dict, evaluator: "Evaluator",
                 untimed_threads: int):
        self.name = name
        self.evaluator = evaluator
        self.untimed_threads = untimed_threads  # torch threads of its profiles (not timed)
        self.sparse = stsc.sparsify(model, policy, example)
        self.layers = len(self.sparse.report.model.blocks)
        self.entering: list[torch.Size] = []  # the merged sequence handed to the decoder (inputs_embeds), per forward
        # First of the decoder's hooks (before any compaction, whenever the passes were installed); it runs even
        # when a skipped first block does not
        model.decoder.register_forward_pre_hook(lambda module, args: self.entering.append(args[0].shape), prepend=True)
        self.clock = 0.0  # training wall-clock so far
        self.log: list[dict] = []  # per step
        self.evals: list[dict] = []  # held-out accuracy
        self.stages: dict[str, dict] = {}  # per recipe stage: seconds, tokens, layers, steps

    def enter(self, stage: str, lr: float, steps: int) -> None:
        """Start a recipe stage: its trainable parameters and a fresh optimizer (LLaVA's stages are separate jobs)."""
        parameters = freeze_all_but(self.sparse.model, trainable(self.sparse.model, stage))
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: learning_rate_factor(step, steps))
        self.stage = stage
        self.stages[stage] = {"seconds": 0.0, "tokens": 0, "layers": 0, "steps": 0}

    def step(self, batch: dict, epoch: float, step: int) -> None:
        self.sparse.set_progress(epoch=epoch, step=step)
        self.entering.clear()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.sparse(**batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        seconds = time.perf_counter() - start
        skipper = self.sparse.runtimes.get("skip_layers")
        skipped = len(skipper.last_skipped) if skipper else 0
        batch_size, sequence = self.decoder_sequence()
        totals = self.stages[self.stage]
        totals["seconds"] += seconds
        totals["tokens"] += batch_size * sequence
        totals["layers"] += self.layers - skipped
        totals["steps"] += 1
        self.clock += seconds
        self.log.append({"step": step, "stage": self.stage, "policy_stage": self.sparse.stage, "seconds": self.clock,
                         "loss": loss.item(), "skip_rate": skipped / self.layers, "sequence": sequence})

    def decoder_sequence(self) -> tuple[int, int]:
        """(batch, positions per sample entering the decoder blocks) in the last forward: the merged sequence
        less the visual tokens the compressor dropped (it compacts at the decoder's entry)."""
        batch_size, merged = self.entering[0][:2]
        compressor = self.sparse.runtimes.get("compress_visual_tokens")
        if compressor is None:
            return batch_size, merged
        kept, tokens = compressor.last_kept()
        return batch_size, merged - (tokens - kept) // batch_size

    def evaluate(self, step: int) -> None:
        """Held-out accuracy of the model as it is now (its weights sent to the evaluator; filled in later)."""
        self.evals.append({"step": step, "seconds": self.clock, "accuracy": None})
        self.evaluator.submit(self.sparse.model, self.evals[-1])

    def latest_accuracy(self) -> list[float]:
        """The latest accuracy the evaluator has filled in (an empty list before the first)."""
        return [e["accuracy"] for e in reversed(self.evals) if e["accuracy"] is not None][:1]

    def profile(self, batches: list[dict], label: str, methods: tuple[str, ...]) -> stsc.Profile:
        """``stsc.profile`` of the model as it is now (its passes removed; the next step puts them back)."""
        with threads(self.untimed_threads):
            return stsc.profile(self.sparse.unwrap(), batches, methods=methods,
                                progress=lambda line: _progress(f"{label}: {line}"))

    def result(self) -> dict:
        return {"stages": self.stages, "accuracy": self.evals[-1]["accuracy"], "seconds": self.clock,
                "evals": self.evals, "log": self.log}


class Evaluator:
    """Held-out accuracy computed in a worker process, one torch thread: the timed training steps run one
    thread, so the worker evaluates on the core they leave free, and evaluations neither hold up the training
    loop nor sit inside its timed steps. Every policy's steps share the machine with it alike (round robin)."""

    def __init__(self, args):
        context = multiprocessing.get_context("spawn")
        self._jobs, self._results = context.Queue(), context.Queue()
        self._worker = context.Process(target=_evaluate_jobs, daemon=True, args=(
            args.hidden, args.layers, args.eval_images, self._jobs, self._results))
        self._worker.start()
        self._ids = itertools.count()
        self._pending: dict[int, dict] = {}  # job -> the evaluation record whose accuracy it fills

    def submit(self, model: nn.Module, record: dict) -> None:
        job = next(self._ids)
        self._pending[job] = record
        self._jobs.put((job, {key: value.detach().clone() for key, value in model.state_dict().items()}))

    def collect(self, wait: bool) -> None:
        """Fill in the accuracies computed so far (``wait``: all of them)."""
        while self._pending:
            try:
                job, value = self._results.get(timeout=5 if wait else 0.001)
            except queue.Empty:
                if not self._worker.is_alive():
                    raise RuntimeError(f"the evaluation worker exited (code {self._worker.exitcode})") from None
                if wait:
                    continue
                return
            self._pending.pop(job)["accuracy"] = value

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join()


def _evaluate_jobs(hidden: int, layers: int, images: int, jobs, results) -> None:
    """The evaluation worker: the held-out questions, then each model state it is sent, to the end (None)."""
    torch.set_num_threads(1)
    model = build_model(argparse.Namespace(hidden=hidden, layers=layers))
    held_out = make_batches("instruction", images, 50, HELD_OUT_SEED, model.config.tokens_per_image)
    for job, state in iter(jobs.get, None):
        model.load_state_dict(state)
        results.put((job, accuracy(model, held_out)))


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[dict]) -> float:
    """Exact match of the answer and end tokens (argmax, teacher-forced), in eval mode (the dense model)."""
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


def train_seed(args, pretrained: dict, seed: int, evaluator: Evaluator, profile_stages: bool) -> dict:
    """Every policy through both stages from the same start, interleaved step by step (module docstring)."""
    model = build_model(args)
    model.load_state_dict(pretrained)
    torch.manual_seed(seed)
    for layer in model.projector.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()  # the projector is new in every seed, as in LLaVA
    tokens = model.config.tokens_per_image
    stages = {"alignment": make_batches("alignment", args.images, args.batch, seed * 1000 + 1, tokens),
              "instruction": make_batches("instruction", args.images, args.batch, seed * 1000 + 2, tokens)}
    probe = {name: batches[:args.profile_batches] for name, batches in stages.items()}
    methods = args.profile_methods
    with threads(args.untimed_threads):
        profiles = {"alignment start": stsc.profile(
            model, probe["alignment"], methods=methods, progress=lambda line: _progress(f"seed {seed}: alignment start: {line}"))}
    proposed = profiles["alignment start"].proposal.policy
    policies = {policy_name(policy): proposed if policy == "profile" else policy for policy in args.policies}
    runs = {}
    for name, policy in policies.items():
        copy = build_model(args)
        copy.load_state_dict(model.state_dict())
        runs[name] = Run(name, copy, with_seed(policy, seed), stages["alignment"][0], evaluator, args.untimed_threads)
    order, step = list(runs), 0
    for index, (stage, batches) in enumerate(stages.items()):
        for run in runs.values():
            run.enter(stage, args.lr_alignment if stage == "alignment" else args.lr_instruction, len(batches))
        if profile_stages and stage == "instruction":
            for name in ("dense", "sts"):
                profiles[f"instruction start ({name})"] = runs[name].profile(probe["instruction"], f"seed {seed}", methods)
        for position, batch in enumerate(batches):
            for name in order[step % len(order):] + order[:step % len(order)]:
                runs[name].step(batch, epoch=index + position / len(batches), step=step)
            step += 1
            if stage == "instruction" and ((position + 1) % args.eval_every == 0 or position == len(batches) - 1):
                for run in runs.values():
                    run.evaluate(step)
            evaluator.collect(wait=False)
            _progress(f"seed {seed}: {stage} {position + 1}/{len(batches)}  " + "  ".join(
                f"{name} {run.clock:.0f} s" + "".join(f" {accuracy:.3f}" for accuracy in run.latest_accuracy())
                for name, run in runs.items()))
        if stage == "alignment":
            for run in runs.values():
                run.evaluate(step)
            if profile_stages:
                profiles["alignment end (dense)"] = runs["dense"].profile(probe["alignment"], f"seed {seed}", methods)
    if profile_stages:
        for name in ("dense", "sts"):
            profiles[f"instruction end ({name})"] = runs[name].profile(probe["instruction"], f"seed {seed}", methods)
    _progress(f"seed {seed}: waiting for the last evaluations")
    evaluator.collect(wait=True)
    _progress("")
    return {"runs": {name: run.result() for name, run in runs.items()}, "profiles": profiles,
            "models": {name: run.sparse.unwrap() for name, run in runs.items()}}


# ------------------------------------------------------------------------------------- results
def time_to_accuracy(run: dict, target: float) -> float | None:
    """Training wall-clock at the first evaluation reaching ``target`` (None: never)."""
    return next((e["seconds"] for e in run["evals"] if e["accuracy"] >= target), None)


TARGETS = {"dense": 1.0, "0.99 dense": 0.99}  # time-to-accuracy targets: these fractions of the dense final accuracy


def time_to_accuracy_speedup(dense: dict, run: dict, target: float) -> float | None:
    """Dense's wall-clock to ``target`` over the run's (None: the run never reached it)."""
    reached = time_to_accuracy(run, target)
    return time_to_accuracy(dense, target) / reached if reached else None


def seed_figures(runs: dict[str, dict]) -> dict[str, dict]:
    """Per policy: accuracy, retention, speed-ups (total and per stage), token and layer ratios, and the
    time-to-accuracy speed-ups to each of :data:`TARGETS` (``reached_at``: when it reached the dense final accuracy)."""
    dense = runs["dense"]
    target = dense["accuracy"]
    figures = {}
    for name, run in runs.items():
        figures[name] = {
            "accuracy": run["accuracy"], "retention": run["accuracy"] / target if target else math.nan,
            "seconds": run["seconds"], "speedup": dense["seconds"] / run["seconds"],
            **{f"{stage} speedup": dense["stages"][stage]["seconds"] / s["seconds"] for stage, s in run["stages"].items()},
            **{f"{stage} tokens": s["tokens"] / dense["stages"][stage]["tokens"] for stage, s in run["stages"].items()},
            **{f"{stage} layers": s["layers"] / dense["stages"][stage]["layers"] for stage, s in run["stages"].items()},
            "reached_at": time_to_accuracy(run, target),
            "to accuracy": {label: time_to_accuracy_speedup(dense, run, fraction * target)
                            for label, fraction in TARGETS.items()}}
    return figures


def mean_curve_speedups(seeds: list[dict[str, dict]]) -> dict[str, float | None]:
    """Time-to-accuracy on the curves averaged over the seeds: per policy, the mean accuracy and mean wall-clock
    at each evaluation (the same steps in every seed); the target is the dense runs' mean final accuracy."""
    def mean_curve(name):
        evals = [runs[name]["evals"] for runs in seeds]
        return {"evals": [{"seconds": fmean(e[i]["seconds"] for e in evals),
                           "accuracy": fmean(e[i]["accuracy"] for e in evals)} for i in range(len(evals[0]))]}
    curves = {name: mean_curve(name) for name in seeds[0]}
    target = curves["dense"]["evals"][-1]["accuracy"]
    return {name: time_to_accuracy_speedup(curves["dense"], curve, target) for name, curve in curves.items()}


def sd(values: list[float]) -> float:
    """The standard deviation over the seeds (0 for one seed; nan where a value is, e.g. a retention of a dense
    run that answered nothing right)."""
    if len(values) < 2:
        return 0.0
    return stdev(values) if all(math.isfinite(v) for v in values) else math.nan


def spread(values: list[float]) -> str:
    return f"{fmean(values):.3f} ± {sd(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def summarize(per_seed: list[dict[str, dict]], mean_curves: dict[str, float | None]) -> dict[str, dict]:
    """Per policy, over the seeds: means (and standard deviations) of each per-seed figure; per time-to-accuracy
    target, the per-seed speed-ups, how many seeds reached it and their mean (None unless every seed did)."""
    summary = {}
    for name in per_seed[0]:
        rows = [figures[name] for figures in per_seed]
        summary[name] = {key: fmean(r[key] for r in rows) for key in rows[0] if key not in ("reached_at", "to accuracy")}
        summary[name].update({f"{key} sd": sd([r[key] for r in rows]) for key in ("accuracy", "retention", "speedup")})
        summary[name]["to accuracy"] = {}
        for label in TARGETS:
            speedups = [r["to accuracy"][label] for r in rows]
            reached = [x for x in speedups if x is not None]
            summary[name]["to accuracy"][label] = {"per_seed": speedups, "reached": len(reached),
                                                   "mean": fmean(reached) if len(reached) == len(rows) else None}
        summary[name]["to accuracy"]["dense, mean curve"] = mean_curves[name]
    return summary


def table(per_seed: list[dict[str, dict]], summary: dict[str, dict]) -> list[str]:
    rows = [f"{'policy':<9} {'accuracy':>15} {'retention':>15} {'speed-up':>15} {'align':>6} {'instr':>6} "
            f"{'tok al':>6} {'tok in':>6} {'lay in':>6} {'to dense acc':>15} {'to 0.99 dense':>15} {'mean curve':>10}"]
    for name in per_seed[0]:
        figures = [f[name] for f in per_seed]
        to_accuracy = summary[name]["to accuracy"]
        per_target = []
        for label in TARGETS:
            speedups, reached = to_accuracy[label]["per_seed"], to_accuracy[label]["reached"]
            per_target.append(spread(speedups) + "x" if reached == len(speedups) else f"{reached}/{len(speedups)} reached")
        mean_curve = to_accuracy["dense, mean curve"]
        rows.append(f"{name:<9} {spread([f['accuracy'] for f in figures]):>15} "
                    f"{spread([f['retention'] for f in figures]):>15} {spread([f['speedup'] for f in figures]) + 'x':>15} "
                    + " ".join(f"{fmean(f[key] for f in figures):>6.2f}" for key in (
                        "alignment speedup", "instruction speedup", "alignment tokens", "instruction tokens",
                        "instruction layers")) + "".join(f" {text:>15}" for text in per_target)
                    + f" {f'{mean_curve:.3f}x' if mean_curve else 'not reached':>10}")
    return rows


def best_policy(summary: dict[str, dict]) -> str:
    """Of the sparse policies with mean retention >= 0.99 the fastest; if none, the one with the best retention."""
    sparse = {name: s for name, s in summary.items() if name != "dense"}
    keeping = [name for name, s in sparse.items() if s["retention"] >= 0.99]
    if keeping:
        return max(keeping, key=lambda name: sparse[name]["speedup"])
    return max(sparse, key=lambda name: sparse[name]["retention"])


def plot(seeds: list[dict], path: Path) -> bool:
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]')", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axes, skip_axes, length_axes) = plt.subplots(1, 3, figsize=(17, 4.5))
    colours = dict(zip(seeds[0]["runs"], ("black", "tab:blue", "tab:green", "tab:red", "tab:purple")))
    for index, seed in enumerate(seeds):
        for name, run in seed["runs"].items():
            accuracy_axes.plot([e["seconds"] for e in run["evals"]], [e["accuracy"] for e in run["evals"]],
                               color=colours[name], alpha=1.0 if index == 0 else 0.35, marker="." if index == 0 else None,
                               label=name if index == 0 else None)
    dense_final = fmean(seed["runs"]["dense"]["accuracy"] for seed in seeds)
    accuracy_axes.axhline(dense_final, color="grey", linestyle="--", linewidth=1, label="dense final (mean)")
    accuracy_axes.set(xlabel="training wall-clock (s)", ylabel="held-out accuracy",
                      title=f"accuracy vs wall-clock ({len(seeds)} seeds; first seed bold)")
    accuracy_axes.legend()
    window = 25

    def trailing_mean(values: list[float]) -> list[float]:
        return [fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]

    for name, run in seeds[0]["runs"].items():
        steps = [e["step"] for e in run["log"]]
        skip_axes.plot(steps, trailing_mean([e["skip_rate"] for e in run["log"]]), color=colours[name], label=name)
        length_axes.plot(steps, trailing_mean([e["sequence"] for e in run["log"]]), color=colours[name], label=name)
    skip_axes.set(xlabel="step", ylabel=f"decoder blocks skipped ({window}-step mean)", ylim=(0, 1),
                  title="skip rate over training (first seed)")
    length_axes.set(xlabel="step", ylabel=f"positions entering the decoder ({window}-step mean)",
                    title="decoder sequence length (first seed)")
    for axes in (skip_axes, length_axes):
        axes.axvline(len(seeds[0]["runs"]["dense"]["log"]) / 2, color="grey", linewidth=0.8)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


@contextlib.contextmanager
def threads(count: int):
    """Run something with ``count`` torch threads, then go back to the threads before."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(line: str) -> None:
    print(f"\r\033[K{line}", end="" if line else "", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a CI-sized run (seconds): pipeline check, not accuracy")
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds (default 3; --quick 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    parser.add_argument("--images", type=int, default=None, help="training images per stage (default 3200)")
    parser.add_argument("--eval-images", type=int, default=None, help="held-out images (default 1000)")
    parser.add_argument("--eval-every", type=int, default=None, help="instruction steps between evaluations (default: a tenth of the stage)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="steps of each pretraining (default 300)")
    parser.add_argument("--profile-batches", type=int, default=None,
                        help="training batches stsc.profile measures on (default 2; --quick 1)")
    parser.add_argument("--policies", default="dense,sts,profile,sts_fast",
                        help="comma-separated presets or policy files ('profile': the policy stsc profile proposes); "
                             "dense and sts first")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lr-alignment", type=float, default=1e-3)
    parser.add_argument("--lr-instruction", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the timed training steps (default 1: with 2 threads on 2 shared cores "
                             "a step slowed up to 30x whenever another process held a core, with 1 thread about 2x)")
    parser.add_argument("--untimed-threads", type=int, default=TORCH_THREADS,
                        help="torch threads of what is not timed: pretraining and profiles (default: "
                             f"torch's default here, {TORCH_THREADS}; 1 on a busy machine)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    args.policies = args.policies.split(",")
    if args.policies[:2] != ["dense", "sts"]:
        parser.error("--policies: dense and sts come first (the RESULT line compares them)")
    torch.set_num_threads(args.threads)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.images = args.images or (64 if args.quick else 3200)
    args.eval_images = args.eval_images or (50 if args.quick else 1000)
    args.pretrain_steps = args.pretrain_steps or (4 if args.quick else 300)
    args.profile_batches = args.profile_batches or (1 if args.quick else 2)
    args.profile_methods = ("uniform", "random") if args.quick else COMPRESSION_METHODS  # --quick: a quicker profile
    args.eval_every = args.eval_every or max(1, args.images // args.batch // 10)
    start = time.perf_counter()

    model = build_model(args)
    with threads(args.untimed_threads):
        measures = pretrain(args, model)
    tokens = model.config.tokens_per_image
    print(f"shapes task: {args.images} images per stage, batch {args.batch}, {args.eval_images // 50 * 50} held-out "
          f"questions (evaluated in a worker process); "
          f"decoder {args.layers} x {args.hidden}, {tokens} visual tokens, {args.threads} thread(s) timed, "
          f"{args.untimed_threads} untimed; "
          f"{args.seeds} seed(s)")
    print(f"pretrained parts ({'loaded from' if measures['loaded'] else 'written to'} {measures['cache']}, "
          f"{measures['seconds']:.0f} s, not timed): vision encoder probe accuracy {measures['encoder_probe_accuracy']:.3f} "
          f"(per token: its quadrant's colour and shape, and the quadrant; held out); decoder text-only answer loss {measures['decoder_text_loss']:.3f}")
    sequence = 1 + tokens + TEXT_TOKENS  # bos, the visual tokens, the text
    flops = flop_report(model, sequence)
    for name, shares in flops.items():
        print(f"step FLOPs, {name:<12} " + "; ".join(
            f"{stage}: " + ", ".join(f"{part} {100 * share:.1f} %" for part, share in parts.items())
            for stage, parts in shares.items()))

    seeds, per_seed = [], []
    evaluator = Evaluator(args)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        result = train_seed(args, model.state_dict(), seed, evaluator, profile_stages=seed == args.first_seed)
        figures = seed_figures(result["runs"])
        per_seed.append(figures)
        seeds.append(result)
        print(f"seed {seed}: " + "; ".join(
            f"{name} {f['accuracy']:.3f} in {f['seconds']:.1f} s" + (
                f" (dense accuracy at {f['reached_at']:.1f} s)" if f["reached_at"] is not None else " (not reached)")
            for name, f in figures.items()))
    evaluator.close()
    profiles = seeds[0]["profiles"]
    print("per-stage profiles (first seed; stsc.profile on the stage's first training batches):")
    print(compare(profiles))
    print("proposed by stsc profile at the start of training (first seed):")
    print(profiles["alignment start"].proposal.yaml().rstrip())
    print(f"over {args.seeds} seed(s) (mean ± sd; speed-up: dense / policy training wall-clock; align/instr: per "
          f"stage; tok/lay: decoder positions / blocks run vs dense; to dense acc, to 0.99 dense: speed-up of the "
          f"time to the dense run's final accuracy, and to 0.99 of it, per seed; mean curve: the time to the dense "
          f"runs' mean final accuracy on the accuracy curves averaged over the seeds)")
    summary = summarize(per_seed, mean_curve_speedups([seed["runs"] for seed in seeds]))
    rows = table(per_seed, summary)
    print("\n".join(rows))
    best = best_policy(summary)
    result = {"accuracy_dense": summary["dense"]["accuracy"], "accuracy_sts": summary["sts"]["accuracy"],
              "retention": summary["sts"]["retention"], "speedup": summary["sts"]["speedup"], "best_policy": best,
              "best_retention": summary[best]["retention"], "best_speedup": summary[best]["speedup"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "two_stage.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "pretrained": measures, "flops": flops, "result": result,
         "summary": summary, "per_seed": per_seed, "table": rows,
         "profiles": {name: p.to_dict() for name, p in profiles.items()},
         "seeds": [{"runs": seed["runs"], "proposed_policy": seed["profiles"]["alignment start"].proposal.yaml()}
                   for seed in seeds]}, indent=1, default=str))
    if plot(seeds, args.out / "two_stage.png"):
        print(f"wrote {args.out / 'two_stage.png'} and {args.out / 'two_stage.json'}")
    print(f"total wall-clock {time.perf_counter() - start:.0f} s (pretraining, training, evaluation and profiles)")
    to_accuracy = summary[best]["to accuracy"]
    print(f"time to accuracy, {best}: " + "; ".join(
        f"to {label}: " + (f"{entry['mean']:.3f}x" if entry["mean"] else f"{entry['reached']}/{args.seeds} seeds reached")
        for label, entry in to_accuracy.items() if isinstance(entry, dict))
        + "; dense, mean curve: " + (f"{to_accuracy['dense, mean curve']:.3f}x" if to_accuracy["dense, mean curve"]
                                     else "not reached"))
    print("RESULT " + " ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.3f}" for k, v in result.items()))
    return {"result": result, "summary": summary, "per_seed": per_seed, "seeds": seeds, "pretrained": measures}


if __name__ == "__main__":
    main()
