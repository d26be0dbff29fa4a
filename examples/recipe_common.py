"""What the recipes share: synthetic instruction data for the tiny HF builds, a right-padding collator, an in-memory
tokenizer, and a log of what stsc did at each optimizer step.

The data imitates an instruction mix: rows with one image (of one size for LLaVA, of several sizes for Qwen2-VL,
whose token count per image follows its grid) and text-only rows, answers of varying length, prompts masked out of
the labels. Batches are right-padded to their longest row with an attention mask, as real collators make them.
Nothing is downloaded: the tokenizer is a word-level one over the builds' vocabulary of 128 ids.
"""

from __future__ import annotations

import functools
import random

import torch
from torch import nn

import hf_models
from stsc.forwards import ForwardScope, forward_modules

PAD = 0
LLAVA_IMAGE = 3  # hf_models.llava: [bos, image x 16, text]
QWEN_IMAGE, QWEN_START, QWEN_END = 5, 3, 4  # hf_models.qwen2_vl: [vision_start, image x N, vision_end, text]
QWEN_GRIDS = ((1, 4, 4), (1, 4, 8), (1, 8, 8))  # 4, 8 and 16 tokens per image: dynamic resolution
PATCH_VALUES = 3 * hf_models.TEMPORAL * hf_models.PATCH ** 2  # one flattened Qwen2-VL pixel patch


def _row(prompt: list[int], answer_length: int, rng: random.Random) -> dict:
    answer = [rng.randrange(*hf_models.TEXT_IDS) for _ in range(answer_length)]
    return {"input_ids": prompt + answer, "labels": [hf_models.IGNORE_INDEX] * len(prompt) + answer}


def llava_rows(images: int, text_only: int, seed: int = 0) -> list[dict]:
    """Rows for ``hf_models.llava``: ``images`` rows with one 32 x 32 image (16 visual tokens), ``text_only`` rows
    with a text prompt; answers of 4 to 12 tokens."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = []
    for index in range(images + text_only):
        if index < images:
            row = _row([hf_models.BOS] + [LLAVA_IMAGE] * 16, rng.randint(4, 12), rng)
            row["pixel_values"] = torch.randn(1, 3, 32, 32, generator=gen)
        else:
            prompt = [hf_models.BOS] + [rng.randrange(*hf_models.TEXT_IDS) for _ in range(6)]
            row = _row(prompt, rng.randint(4, 12), rng)
        rows.append(row)
    return rows


def qwen2_vl_rows(count: int, seed: int = 0, text_only_every: int = 4) -> list[dict]:
    """Rows for ``hf_models.qwen2_vl``: one image of a grid drawn from ``QWEN_GRIDS`` per row, every
    ``text_only_every``-th row text only; answers of 4 to 12 tokens."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        if index % text_only_every == text_only_every - 1:
            rows.append(_row([hf_models.BOS] + [rng.randrange(*hf_models.TEXT_IDS) for _ in range(6)],
                             rng.randint(4, 12), rng))
            continue
        t, h, w = rng.choice(QWEN_GRIDS)
        row = _row([QWEN_START] + [QWEN_IMAGE] * (t * h * w // hf_models.MERGE ** 2) + [QWEN_END],
                   rng.randint(4, 12), rng)
        row["pixel_values"] = torch.randn(t * h * w, PATCH_VALUES, generator=gen)
        row["image_grid_thw"] = torch.tensor([[t, h, w]])
        rows.append(row)
    return rows


class Collator:
    """Right-pads a list of rows into a batch: ``input_ids`` (pad id 0), ``attention_mask``, ``labels`` (-100 on
    padding), the rows' images concatenated in row order (``pixel_values``, ``image_grid_thw``), and, when
    ``token_types`` names the image token, ``mm_token_type_ids`` (1 at image tokens). Rows may hold tensors or the
    nested lists a ``datasets.Dataset`` gives back."""

    def __init__(self, token_types: int | None = None):
        self.token_types = token_types

    def __call__(self, rows: list[dict]) -> dict:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), PAD)
        labels = torch.full((len(rows), length), hf_models.IGNORE_INDEX)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = (torch.as_tensor(row["input_ids"]),
                                                                      torch.as_tensor(row["labels"]), 1)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in ("pixel_values", "image_grid_thw"):
            values = [torch.as_tensor(row[key]) for row in rows if row.get(key) is not None]
            if values:
                batch[key] = torch.cat(values)
        if self.token_types is not None:
            batch["mm_token_type_ids"] = (input_ids == self.token_types).long()
        return batch


def tokenizer():
    """A word-level tokenizer over the builds' 128 ids (token ``"i"`` is id i; pad 0, eos 2): what TRL needs as
    ``processing_class`` when the collator does the tokenizing."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(hf_models.VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=str(PAD))),
                                   pad_token=str(PAD), eos_token="2")


class StepLog:
    """What the decoder did in each training forward of ``sparse``, seen from the model's own modules: the stage, the
    padded length of the batch, the blocks that ran, the sequence length they received (blocks it skipped run no
    hook) and the autocast dtype they ran under; and which decoder blocks had a trainable parameter with a gradient
    at each optimizer step (:meth:`record_gradients`, called before the optimizer steps)."""

    def __init__(self, sparse):
        self.sparse, self.forwards, self.gradients = sparse, [], []
        self.blocks = [sparse.model.get_submodule(path) for path in sparse.report.model.blocks]
        self.hooks = [ForwardScope(forward_modules(sparse.model, sparse.structure), self._begin)]  # or its backbone
        self.hooks += [block.register_forward_pre_hook(functools.partial(self._block, index), with_kwargs=True)
                       for index, block in enumerate(self.blocks)]

    def _begin(self, module, args, kwargs):
        if module.training:
            self.forwards.append({"stage": self.sparse.stage, "padded": kwargs["input_ids"].shape[1], "ran": [],
                                  "decoder": None})

    def _block(self, index, module, args, kwargs):
        if module.training:
            hidden = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point())
            device = hidden.device.type
            self.forwards[-1].update(decoder=hidden.shape[1], autocast=torch.get_autocast_dtype(device)
                                     if torch.is_autocast_enabled(device) else None)
            self.forwards[-1]["ran"].append(index)

    def record_gradients(self) -> None:
        self.gradients.append([any(p.grad is not None for p in block.parameters() if p.requires_grad)
                               for block in self.blocks])

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def skipped(self) -> list[list[int]]:
        """The blocks each training forward skipped."""
        return [[i for i in range(len(self.blocks)) if i not in entry["ran"]] for entry in self.forwards]

    def print_steps(self, losses: list[float]) -> None:
        """A line per training forward: its stage, the padded and decoder lengths, the blocks skipped, the loss."""
        for entry, skipped, loss in zip(self.forwards, self.skipped(), losses):
            print(f"{entry['stage']:<12} padded {entry['padded']:>3}  decoder {entry['decoder']:>3}  skipped {skipped}  "
                  f"loss {loss:.4f}")


def freeze_all_but(model: nn.Module, *prefixes: str) -> None:
    """Train only the parameters whose names start with one of ``prefixes``."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
