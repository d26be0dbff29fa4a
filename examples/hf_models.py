"""Tiny random-weight builds of Hugging Face MLLM families, with matching forward inputs.

Each builder returns ``(model, inputs)`` and records what a correct analysis must find in
``model.stsc_expected`` (decoder block paths, boundary kind, visual tokens per image), so tests and
the examples read the truth from one place. transformers is a test-only dependency (``pip install
-e ".[test]"``): import this module only from tests and examples, never from ``stsc``.

Every build is seeded and in train mode: batch 2, a text decoder of width 64 (vocabulary 128), a vision tower of
width 32 with 2 layers, one image per sample, labels ``IGNORE_INDEX`` on the prompt (bos, markers, placeholders).
The sections, by how images enter the token sequence:

(a) One run of placeholders per image: llava, vipllava, paligemma, gemma3, gemma3_mixed, idefics3, smolvlm, idefics2,
    internvl, aya_vision, cohere2_vision, janus, deepseek_vl, got_ocr2, perception_lm, aria, fast_vlm, video_llava,
    blip2, instructblip, ovis2, chameleon, emu3. smolvlm and idefics2 tile an image: one run per tile, and
    ``tokens_per_image`` counts one tile (stsc treats each tile as its own image).
(b) Positions given by a mask input, over several distinct ids: kosmos2.
(c) Dynamic resolution, tokens per image from size or grid metadata: llava_next, llava_next_mixed, llava_onevision,
    llava_next_video, qwen2_vl, qwen2_vl_mixed, qwen2_5_vl, qwen2_5_vl_mixed, qwen3_vl, qwen3_vl_moe, glm4v,
    paddleocr_vl, lighton_ocr.
(d) Image rows separated by break tokens: mistral3, llava_pixtral, fuyu.
(e) Mixed decoder stacks (blocks of several kinds): llama4, lfm2_vl, gemma3n.
(f) Cross-attention to the image: mllama.
(g) Text only: llama_text_only (not in ``BUILDERS``).
(h) This year's vision-language families (transformers 5.x): glm46v, glm4v_moe, glm_ocr, qwen3_5, qwen3_5_moe,
    llava_onevision1_5, hunyuan_vl, kimi_k25, lfm3_vl, step3p7, gemma4, molmo2, granite4_vision, granite_docling,
    deepseek_ocr2, deepseek_vl_hybrid, ernie4_5_vl_moe, ovis2_5, minicpmv4_6, minicpm_ocr, minicpmv4_7,
    phi4_multimodal, minimax_m3_vl, hy_v4_vl, nemotron_h_omni. MiniCPM-V views (a global view and slices) count as
    images, as tiles do; Molmo2's low- and high-resolution views too (``tokens_per_image`` lists the views).
(i) Audio-language families, one clip per row (``input_features`` or the family's own name): qwen2_audio, voxtral,
    audioflamingo3, musicflamingo, glmasr, qwen3_asr, granite_speech, phi4_multimodal_audio, qwen2_5_omni_thinker,
    qwen3_omni_moe_thinker. ``tokens_per_image`` counts one clip's audio tokens.
(j) Video, one clip of two frame groups per row, each group its own run of placeholders after its timestamp:
    qwen3_5_video, cosmos3_omni, glm46v_video. ``tokens_per_image`` counts one frame group.
(k) More vision-language families (transformers 5.x): apertus1p5, cohere_compass, exaone4_5,
    mistral_large4, hyperclovax_vision_v2, qianfan_ocr. qianfan_ocr puts an image's tiles back to back in one run
    of placeholders: ``tokens_per_image`` counts one tile (stsc cuts the run into the tower's images).
(l) Vision-language families with their own layouts (transformers 5.x): glm5_next, glm_image, qwen4_exp, dots3_note,
    unlimited_ocr, muse_glimmer. GLM-Image writes an image's VQ codes into the token ids before the lookup.
(m) Natively multimodal decoders, some with no vision encoder (patches embedded by an MLP, or by norms and a linear
    layer): inkling, inkling2, inkling2_loop, gemma4_unified, muse_spark, cosmos3_edge.
(n) More audio-language families, one clip per row as in (i): fun_asr_nano, granite_speech_plus,
    moss_transcribe_diarize, nemotron3_5_transcribe, omniasr, vibevoice_asr, voxtral_realtime (audio added onto
    every position, no placeholders: refused by ``compress_visual_tokens``).
(o) Video, vision-language-action and speech-dialogue families: instructblipvideo (a clip of 4 frames, the Q-Former
    queries of every frame back to back in one run: ``tokens_per_image`` counts one frame's), video_llama_3 (a clip
    of 2 frames, each its own run after its timestamp: ``tokens_per_image`` counts one frame), pi0 and pi05 (two
    cameras back to back in one run, a Gemma action expert attending to the decoder's keys and values).

``tokens_per_image`` is a list (one entry per image, in batch order) where the images of a batch differ in size.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

IGNORE_INDEX = -100
BATCH = 2
BOS = 1
VOCAB = 128
TEXT_IDS = (20, 100)  # random text ids: clear of every special id below (< 20) and of image-code ids at 100 and up


@dataclass(frozen=True)
class Expected:
    """What a correct analysis finds: decoder block paths, boundary kind, visual tokens per image, placeholder id."""

    blocks: list[str]
    boundary_kind: str
    tokens_per_image: int | list[int]
    placeholder_id: int | None


# ------------------------------------------------------------------------------------------------ shared helpers
def _text(hidden=64, layers=3, vocab=VOCAB, **extra):
    """A small decoder config (as kwargs); ``extra`` adds or overrides keys."""
    return {**dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512), **extra}


def _vit(config_cls, **extra):
    """A tiny ViT config (2 layers, width 32, 4 heads) of ``config_cls``, or a dict when ``config_cls`` is ``dict``."""
    return config_cls(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                         **extra})


def _clip(image_size, patch_size):
    from transformers import CLIPVisionConfig

    return _vit(CLIPVisionConfig, image_size=image_size, patch_size=patch_size, projection_dim=32)


def _blocks(layers, prefix="model.language_model.layers"):
    return [f"{prefix}.{i}" for i in range(layers)]


def _batch(prompts, text_tokens=8):
    """The token sequence of a batch, one prompt (list of ids) per row: ``prompt + random text``.

    Returns ``(input_ids, attention_mask, labels)``; labels are ``IGNORE_INDEX`` on the prompt. A row with a shorter
    prompt gets more text, so every row has ``longest prompt + text_tokens`` tokens and no padding is needed.
    """
    gen = torch.Generator().manual_seed(0)
    length = max(map(len, prompts)) + text_tokens
    ids, labels = [], []
    for prompt in prompts:
        prompt = torch.tensor(prompt, dtype=torch.long)
        text = torch.randint(*TEXT_IDS, (length - len(prompt),), generator=gen)
        ids.append(torch.cat([prompt, text]))
        labels.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), text]))
    input_ids = torch.stack(ids)
    return input_ids, torch.ones_like(input_ids), torch.stack(labels)


def _pixels(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def padded_batch(prompts, text_tokens, side="right", length=None, pad=0):
    """A padded batch: row i is ``prompts[i]`` (ids) then ``text_tokens[i]`` random text tokens, padded with ``pad`` on
    ``side`` (``"left"`` or ``"right"``) to the longest row, or to ``length`` (a collator's ``max_length`` padding).
    Returns ``(input_ids, attention_mask, labels)``: the mask 0 on padding, labels ``IGNORE_INDEX`` on the prompt and
    the padding."""
    gen = torch.Generator().manual_seed(0)
    rows = [(torch.tensor(p, dtype=torch.long), torch.randint(*TEXT_IDS, (n,), generator=gen))
            for p, n in zip(prompts, text_tokens)]
    length = max([len(p) + len(t) for p, t in rows] + [length or 0])
    ids, masks, labels = [], [], []
    for prompt, text in rows:
        pads = length - len(prompt) - len(text)
        where = (pads, 0) if side == "left" else (0, pads)
        ids.append(nn.functional.pad(torch.cat([prompt, text]), where, value=pad))
        masks.append(nn.functional.pad(torch.ones(len(prompt) + len(text), dtype=torch.long), where))
        labels.append(nn.functional.pad(torch.cat([torch.full_like(prompt, IGNORE_INDEX), text]), where,
                                        value=IGNORE_INDEX))
    return torch.stack(ids), torch.stack(masks), torch.stack(labels)


PADDED_FAMILIES = ("llava", "gemma3", "mistral3", "qwen2_vl")


def padded_inputs(family, rows, side="right", length=None):
    """Inputs of a padded batch for the tiny ``family`` build (one of ``PADDED_FAMILIES``, default arguments): one
    ``(images, text_tokens)`` per row, ``images`` the row's number of images (qwen2_vl: their ``(t, h, w)`` patch
    grids, so images differ in size: ``t * h * w / 4`` tokens each): a bos, each image in the family's markup (LLaVA
    puts a text token after each), then the text; rows padded on ``side`` to the longest or to ``length``
    (:func:`padded_batch`). A row without images is text only; a batch without images has no pixel input."""
    if family == "qwen2_vl":
        grids = [grid for images, _ in rows for grid in images]
        prompts = [[BOS] + sum(([3] + [5] * (t * h * w // MERGE ** 2) + [4] for t, h, w in images), [])
                   for images, _ in rows]
    else:
        image = {"llava": [3] * 16 + [20], "gemma3": [5] + [3] * 16 + [6], "mistral3": _image_rows(4, 4, 10, 12, 13)}
        prompts = [[BOS] + image[family] * images for images, _ in rows]
        grids = [None] * sum(images for images, _ in rows)
    input_ids, mask, labels = padded_batch(prompts, [text for _, text in rows], side, length)
    inputs = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
    if family == "qwen2_vl":
        inputs["mm_token_type_ids"] = (input_ids == 5).long()
        if grids:
            inputs.update(pixel_values=_pixels(sum(t * h * w for t, h, w in grids), 3 * TEMPORAL * PATCH * PATCH),
                          image_grid_thw=torch.tensor(grids))
    elif grids:
        inputs["pixel_values"] = _pixels(len(grids), 3, 32, 32)
        if family == "mistral3":
            inputs["image_sizes"] = torch.tensor([[32, 32]] * len(grids))
    if family == "gemma3":
        inputs["token_type_ids"] = (input_ids == 3).long()
    return inputs


def _per_image(counts):
    """``tokens_per_image``: one number when every image has the same count, else the list."""
    return counts[0] if len(set(counts)) == 1 else counts


def _seeded(model_cls, cfg):
    """``model_cls(cfg)``, seeded; once a DeepSpeed ZeRO-3 config is active (``TrainingArguments(deepspeed=...)``),
    built as ``from_pretrained`` builds it then: under ``deepspeed.zero.Init``, each rank holding a partition of every
    weight."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    torch.manual_seed(0)
    return model_cls._from_config(cfg) if is_deepspeed_zero3_enabled() else model_cls(cfg)


def _finish(model, inputs, expected):
    model.stsc_expected = expected
    return model.train(), inputs


def _same_rows(model, prompt, pixels, blocks, tokens, placeholder, batch=BATCH, **extra):
    """Finish a build whose rows all hold ``prompt``: ``pixel_values`` of shape ``[batch, *pixels]``, then the ``extra``
    inputs; a scatter boundary of ``tokens`` per image at ``placeholder``."""
    input_ids, mask, labels = _batch([prompt] * batch)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(batch, *pixels), attention_mask=mask, labels=labels,
                  **extra)
    return _finish(model, inputs, Expected(blocks, "scatter", tokens, placeholder))


# timm is not installed: fast_vlm and gemma3n get this stand-in conv tower (the projector, merge and decoder are theirs)
class _ResConv(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class _TinyConvTower(nn.Module):
    """Stand-in for a timm conv backbone: patchify stem + 2 residual conv blocks -> ``[B, C, h, w]``."""

    def __init__(self, width=32, patch=8, layers=2):
        super().__init__()
        self.stem = nn.Conv2d(3, width, patch, stride=patch)
        self.blocks = nn.ModuleList([_ResConv(width) for _ in range(layers)])

    def forward(self, pixel_values, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        x = self.stem(pixel_values)
        for block in self.blocks:
            x = block(x)
        return BaseModelOutputWithPooling(last_hidden_state=x)


@contextlib.contextmanager
def _stand_in_tower(module, config_type_name):
    """While building, make ``module.AutoModel.from_config`` return a ``_TinyConvTower`` for that config type."""
    original = module.AutoModel

    class _Auto:
        @staticmethod
        def from_config(config, *args, **kwargs):
            if type(config).__name__ == config_type_name:
                return _TinyConvTower(32, patch=8)
            return original.from_config(config, *args, **kwargs)

    module.AutoModel = _Auto
    try:
        yield
    finally:
        module.AutoModel = original


# -------------------------------------------------------------------------------------- (a) one run per image
def llava(layers=3, batch=2):
    """LlavaForConditionalGeneration: CLIP tower (CLS dropped), ``[bos, image x 16, text]``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_token = 3
    cfg = LlavaConfig(vision_config=_clip(32, 8), text_config=LlamaConfig(**_text(layers=layers)),
                      image_token_id=image_token, vision_feature_layer=-1)
    model = _seeded(LlavaForConditionalGeneration, cfg)
    tokens = (32 // 8) ** 2  # the CLS token is dropped by the default feature selection
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 32, 32), _blocks(layers), tokens, image_token,
                      batch=batch)


def vipllava(layers=3):
    """VipLlavaForConditionalGeneration: features of two CLIP layers concatenated on the channel axis."""
    from transformers import LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    image_token, tokens = 3, 16
    text = LlamaConfig(**_text(layers=layers), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # several vision layers concatenated on the channel axis (the real default is (-2, -5, -8, -11, 6))
    cfg = VipLlavaConfig(vision_config=_clip(32, 8), text_config=text, image_token_index=image_token,
                         vision_feature_layer=[-2, -1], image_seq_length=tokens)
    model = _seeded(VipLlavaForConditionalGeneration, cfg)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 32, 32), _blocks(layers), tokens, image_token)


def paligemma(layers=3):
    """PaliGemmaForConditionalGeneration: SigLIP tower, ``token_type_ids`` mark the suffix (the text to learn)."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    image_token = 3
    vision = _vit(SiglipVisionConfig, image_size=32, patch_size=8, projection_dim=64)
    text = GemmaConfig(**_text(layers=layers), head_dim=16)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=image_token, projection_dim=64)
    model = _seeded(PaliGemmaForConditionalGeneration, cfg)
    tokens = (32 // 8) ** 2
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[labels != IGNORE_INDEX] = 1
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels,
                  token_type_ids=token_type_ids)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def _gemma3(text, vision, prompt, image_token=3, tokens=16):
    """A Gemma3ForConditionalGeneration build (boi 5, eoi 6) with one ``prompt`` per row."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                       image_token_index=image_token, boi_token_index=5, eoi_token_index=6)
    model = _seeded(Gemma3ForConditionalGeneration, cfg)
    with torch.no_grad():  # a fresh Gemma3 projection weight is all zeros: give it random values
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.1)
    input_ids, mask, labels = _batch([prompt] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels,
                  token_type_ids=(input_ids == image_token).long())
    return _finish(model, inputs, Expected(_blocks(text.num_hidden_layers), "scatter", tokens, image_token))


def gemma3(layers=3):
    """Gemma3ForConditionalGeneration: 8 x 8 SigLIP patches average-pooled to 16 tokens, ``[bos, image x 16, text]``."""
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    vision = _vit(SiglipVisionConfig, image_size=32, patch_size=4)
    text = Gemma3TextConfig(**_text(layers=layers), head_dim=16, sliding_window=16)
    return _gemma3(text, vision, [BOS] + [3] * 16)


def gemma3_mixed(layers=4):
    """Gemma3ForConditionalGeneration with text layers sliding x 3, full (the full kind once, at the end); boi/eoi."""
    from transformers import Gemma3TextConfig, SiglipVisionConfig

    vision = _vit(SiglipVisionConfig, image_size=32, patch_size=4, vision_use_head=False)  # as in released configs
    text = Gemma3TextConfig(**_text(layers=layers), head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    return _gemma3(text, vision, [BOS, 5] + [3] * 16 + [6])


def idefics3(layers=3):
    """Idefics3ForConditionalGeneration: 8 x 8 patches pixel-shuffled by 2 into 16 tokens, ``[bos, image x 16]``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlamaConfig

    image_token, tokens = 3, (32 // 4) ** 2 // 4  # 8 x 8 patches, pixel-shuffled by 2 into 16 tokens
    vision = _vit(Idefics3VisionConfig, image_size=32, patch_size=4)
    cfg = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**_text(layers=layers)),
                         image_token_id=image_token, scale_factor=2)
    model = _seeded(Idefics3ForConditionalGeneration, cfg)
    return _same_rows(model, [BOS] + [image_token] * tokens, (1, 3, 32, 32), _blocks(layers, "model.text_model.layers"),
                      tokens, image_token)


def _tiles_prompt(image_token, per_tile, fake, row_col, newline, glob):
    """Idefics3 / SmolVLM image splitting: ``<fake><row_i_col_j>`` + a tile's placeholders per tile, two newlines, then
    ``<fake><global-img>`` + the global view's placeholders + ``<fake>`` (after a bos)."""
    prompt = [BOS]
    for rc in row_col:
        prompt += [fake, rc] + [image_token] * per_tile
    return prompt + [newline, newline, fake, glob] + [image_token] * per_tile + [fake]


def smolvlm(layers=3):
    """SmolVLMForConditionalGeneration, each image split 1 x 2 plus a global view: three runs of 16 placeholders,
    separated by tile markers. stsc treats each tile as its own image, so ``tokens_per_image`` is one run (16)."""
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    image_token, fake, newline, glob = 3, 4, 7, 8
    row_col = [5, 6]  # <row_1_col_1>, <row_1_col_2>
    size, patch, scale = 32, 4, 2
    per_tile = (size // patch) ** 2 // scale ** 2  # 16
    vision = _vit(SmolVLMVisionConfig, image_size=size, patch_size=patch)
    cfg = SmolVLMConfig(vision_config=vision, text_config=LlamaConfig(**_text(layers=layers)),
                        image_token_id=image_token, scale_factor=scale)
    model = _seeded(SmolVLMForConditionalGeneration, cfg)
    prompt = _tiles_prompt(image_token, per_tile, fake, row_col, newline, glob)
    return _same_rows(model, prompt, (3, 3, size, size), _blocks(layers, "model.text_model.layers"), per_tile,
                      image_token)


def idefics2(layers=3):
    """Idefics2ForConditionalGeneration with image splitting (4 crops + the whole image), a perceiver of 8 latents per
    sub-image: five runs of 8 placeholders, each between two fake-image tokens. stsc treats each sub-image as its own
    image, so ``tokens_per_image`` is one run (8)."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, MistralConfig

    image_token, fake = 3, 4
    size, latents, subs = 32, 8, 5
    perceiver = dict(hidden_act="silu", resampler_n_latents=latents, resampler_depth=2, resampler_n_heads=2,
                     resampler_head_dim=8, num_key_value_heads=1)
    text = MistralConfig(**_text(layers=layers), head_dim=16, sliding_window=None)
    cfg = Idefics2Config(vision_config=_vit(dict, image_size=size, patch_size=4), perceiver_config=perceiver,
                         text_config=text, image_token_id=image_token)
    model = _seeded(Idefics2ForConditionalGeneration, cfg)
    prompt = [BOS] + ([fake] + [image_token] * latents + [fake]) * subs  # the processor's image_str * 5
    return _same_rows(model, prompt, (subs, 3, size, size), _blocks(layers, "model.text_model.layers"), latents,
                      image_token, pixel_attention_mask=torch.ones(BATCH, subs, size, size, dtype=torch.bool))


def internvl(layers=3):
    """InternVLForConditionalGeneration: 8 x 8 patches (CLS dropped) pixel-shuffled to 16, between ``<img> </img>``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    image_token, img_start, img_end, tokens = 3, 4, 5, 16
    vision = _vit(InternVLVisionConfig, image_size=32, patch_size=4)
    text = Qwen2Config(**_text(layers=layers), bos_token_id=1, eos_token_id=2)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token, image_seq_length=tokens,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _seeded(InternVLForConditionalGeneration, cfg)
    return _same_rows(model, [BOS, img_start] + [image_token] * tokens + [img_end], (3, 32, 32), _blocks(layers),
                      tokens, image_token)


def _cohere2_vision_family(config_cls, model_cls, layers, **extra):
    """AyaVision / Cohere2Vision: SigLIP 8 x 8 patches pixel-shuffled by 2 into 16 tokens, Cohere2 text (sliding
    window), ``[bos, start, image x 16, end, text]``."""
    from transformers import Cohere2Config, SiglipVisionConfig

    image_token, start, end, tokens = 3, 4, 5, 16
    text = Cohere2Config(**_text(layers=layers), sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = config_cls(vision_config=_vit(SiglipVisionConfig, image_size=32, patch_size=4), text_config=text,
                     downsample_factor=2, **extra)
    model = _seeded(model_cls, cfg)
    return _same_rows(model, [BOS, start] + [image_token] * tokens + [end], (3, 32, 32), _blocks(layers), tokens,
                      image_token)


def aya_vision(layers=3):
    """AyaVisionForConditionalGeneration: pixel-shuffle projector over all SigLIP patches, Cohere2 text."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    return _cohere2_vision_family(AyaVisionConfig, AyaVisionForConditionalGeneration, layers, image_token_index=3,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")


def cohere2_vision(layers=3):
    """Cohere2VisionForConditionalGeneration: pixel-shuffle + SwiGLU alignment projector, Cohere2 text."""
    from transformers import Cohere2VisionConfig, Cohere2VisionForConditionalGeneration

    return _cohere2_vision_family(Cohere2VisionConfig, Cohere2VisionForConditionalGeneration, layers,
                                  image_token_id=3, alignment_intermediate_size=128)


def janus(layers=3):
    """JanusForConditionalGeneration (understanding path): SigLIP-like tower, ``[bos, boi, image x 16, eoi, text]``."""
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig

    image_token, boi, eoi, tokens = 3, 4, 5, 16
    vision = dict(image_size=32, patch_size=8, num_image_tokens=tokens, hidden_size=32, projection_dim=64, depth=2,
                  num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, attention_dropout=0.0)
    vq = dict(embed_dim=12, num_embeddings=12, latent_channels=12, in_channels=3, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=10, image_token_embed_dim=64,
              resolution=32, num_patches=4)
    text = LlamaConfig(**_text(layers=layers), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token)
    model = _seeded(JanusForConditionalGeneration, cfg)
    return _same_rows(model, [BOS, boi] + [image_token] * tokens + [eoi], (3, 32, 32), _blocks(layers), tokens,
                      image_token)


def deepseek_vl(layers=3):
    """DeepseekVLForConditionalGeneration: SigLIP tower, ``[bos, image x 16, text]``."""
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, LlamaConfig, SiglipVisionConfig

    image_token, tokens = 3, 16
    text = LlamaConfig(**_text(layers=layers), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = DeepseekVLConfig(text_config=text, vision_config=_vit(SiglipVisionConfig, image_size=32, patch_size=8),
                           image_token_id=image_token)
    model = _seeded(DeepseekVLForConditionalGeneration, cfg)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 32, 32), _blocks(layers), tokens, image_token)


def got_ocr2(layers=3):
    """GotOcr2ForConditionalGeneration: SAM-style tower (window + global attention), two stride-2 convs to 16 tokens."""
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration

    image_token, tokens = 3, 16  # 64 px / patch 4 = 16 x 16 patches; the projector's convs -> 4 x 4
    vision = dict(num_hidden_layers=2, output_channels=32, hidden_size=32, mlp_dim=64, num_attention_heads=4,
                  patch_size=4, image_size=64, window_size=4, global_attn_indexes=[1])
    cfg = GotOcr2Config(vision_config=vision, text_config=_text(layers=layers, model_type="qwen2"),
                        image_token_index=image_token)
    model = _seeded(GotOcr2ForConditionalGeneration, cfg)
    with torch.no_grad():  # SAM-style init uses initializer_range 1e-10: give the vision tower real values
        for param in model.model.vision_tower.parameters():
            if param.dim() >= 2:
                param.normal_(std=0.05)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 64, 64), _blocks(layers), tokens, image_token)


def perception_lm(layers=3):
    """PerceptionLMForConditionalGeneration: 8 x 8 patches pooled 2x to 16 tokens; pixels ``[batch, tiles, ...]``."""
    from transformers import LlamaConfig, PerceptionLMConfig, PerceptionLMForConditionalGeneration, SiglipVisionConfig

    image_token, tokens = 3, 16
    # the real tower is timm's PE, and timm is not installed: a SigLIP ViT stands in for it
    vision = _vit(SiglipVisionConfig, image_size=32, patch_size=4, vision_use_head=False)
    vision.model_args = {"embed_dim": 32}
    cfg = PerceptionLMConfig(vision_config=vision, text_config=LlamaConfig(**_text(layers=layers)),
                             vision_use_cls_token=False, projector_pooling_ratio=2, image_token_id=image_token,
                             video_token_id=4)
    model = _seeded(PerceptionLMForConditionalGeneration, cfg)
    return _same_rows(model, [BOS] + [image_token] * tokens, (1, 3, 32, 32), _blocks(layers), tokens, image_token)


def aria(layers=3):
    """AriaForConditionalGeneration: 16 learned queries cross-attend to the 64 patches; MoE decoder blocks."""
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaTextConfig, Idefics3VisionConfig

    image_token, tokens = 3, 16
    text = AriaTextConfig(**_text(layers=layers), moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = AriaConfig(vision_config=_vit(Idefics3VisionConfig, image_size=32, patch_size=4), text_config=text,
                     image_token_index=image_token, projector_patch_to_query_dict={64: tokens})
    model = _seeded(AriaForConditionalGeneration, cfg)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 32, 32), _blocks(layers), tokens, image_token)


def fast_vlm(layers=3):
    """FastVlmForConditionalGeneration: conv tower (a stand-in), its 4 x 4 grid flattened to 16 tokens."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration
    from transformers.models.fast_vlm import modeling_fast_vlm

    image_token, tokens = 3, 16  # 32 px / stride 8 -> 4 x 4 grid
    vision = dict(hidden_size=32, architecture="fastvit_mci3", num_channels=3)
    cfg = FastVlmConfig(vision_config=vision, text_config=_text(layers=layers, model_type="qwen2"),
                        image_token_id=image_token)
    with _stand_in_tower(modeling_fast_vlm, "TimmWrapperConfig"):  # timm is not installed
        model = _seeded(FastVlmForConditionalGeneration, cfg)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 32, 32), _blocks(layers), tokens, image_token)


def video_llava(layers=3):
    """VideoLlavaForConditionalGeneration, images only: the video tower is built but unused."""
    from transformers import LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    image_token, video_token = 3, 4
    # vision_feature_layer -1: the default -2 would leave the last vision layer without gradient
    cfg = VideoLlavaConfig(vision_config=_clip(32, 8), text_config=LlamaConfig(**_text(layers=layers)),
                           image_token_index=image_token, video_token_index=video_token, vision_feature_layer=-1,
                           vision_feature_select_strategy="default")
    model = _seeded(VideoLlavaForConditionalGeneration, cfg)
    tokens = (32 // 8) ** 2  # CLS dropped by the "default" strategy
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 32, 32), _blocks(layers), tokens, image_token)


def _qformer(config_cls, **extra):
    """A Q-Former config of the tiny ViT's size that cross-attends in every layer, without dropout."""
    return _vit(config_cls, cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                **extra)


def _blip(config_cls, model_cls, vision_cls, qformer, text, bos, blocks, frames=None, **extra_inputs):
    """BLIP-2 / InstructBLIP: a Q-Former of 8 learned queries, ``[image x 8, bos, text]`` (the processor's order).
    ``frames``: a clip of that many frames per row instead of an image, the queries of every frame in one run at the
    video placeholder (InstructBLIP-Video), each frame's queries an image."""
    image_token, queries = 3, 8
    placeholder = {"video_token_index" if frames else "image_token_index": image_token}
    cfg = config_cls(vision_config=_vit(vision_cls, image_size=32, patch_size=8), qformer_config=qformer,
                     text_config=text, num_query_tokens=queries, **placeholder)
    model = _seeded(model_cls, cfg)
    with torch.no_grad():  # a fresh BLIP-2's query tokens are all zeros: give them random values
        model.query_tokens.normal_(std=0.5)
    pixels = (frames, 3, 32, 32) if frames else (3, 32, 32)
    return _same_rows(model, [image_token] * queries * (frames or 1) + [bos], pixels, blocks, queries, image_token,
                      **extra_inputs)


def blip2(layers=3):
    """Blip2ForConditionalGeneration: Q-Former queries before the prompt, OPT decoder."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    text = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers, ffn_dim=128, num_attention_heads=4,
                     word_embed_proj_dim=64, max_position_embeddings=512, dropout=0.0, pad_token_id=1,
                     bos_token_id=2, eos_token_id=2)
    return _blip(Blip2Config, Blip2ForConditionalGeneration, Blip2VisionConfig,
                 _qformer(Blip2QFormerConfig, vocab_size=100), text, bos=2,
                 blocks=_blocks(layers, "language_model.model.decoder.layers"))


def instructblip(layers=3, qformer_len=6, qformer_vocab=100):
    """InstructBlipForConditionalGeneration: the Q-Former also reads the instruction, tokenized with its own (smaller)
    vocabulary and a different length than ``input_ids``. ``qformer_len`` / ``qformer_vocab`` give survey variants."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig)

    return _instructblip(InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipVisionConfig,
                         InstructBlipQFormerConfig, layers, qformer_len, qformer_vocab)


def _instructblip(config_cls, model_cls, vision_cls, qformer_cls, layers, qformer_len, qformer_vocab, frames=None):
    """An InstructBLIP build (Llama text) whose Q-Former reads an instruction of ``qformer_len`` ids."""
    from transformers import LlamaConfig

    text = LlamaConfig(**_text(layers=layers), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    qformer_ids = torch.randint(5, qformer_vocab, (BATCH, qformer_len), generator=torch.Generator().manual_seed(2))
    return _blip(config_cls, model_cls, vision_cls, _qformer(qformer_cls, vocab_size=qformer_vocab, pad_token_id=0),
                 text, bos=BOS, blocks=_blocks(layers, "language_model.model.layers"), frames=frames,
                 qformer_input_ids=qformer_ids, qformer_attention_mask=torch.ones_like(qformer_ids))


def ovis2(layers=3):
    """Ovis2ForConditionalGeneration: each visual token a softmax over a visual vocabulary, looked up in a table;
    ``[bos, IMG_START, image x 16, IMG_GRID, IMG_END, text]`` (one tile)."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Qwen2Config
    from transformers.models.ovis2.configuration_ovis2 import Ovis2VisionConfig

    image_token, tokens = 3, 16
    indicators = [4, 5, 6, 7, 120]  # IMG_START, IMG_GRID, IMG_COL, IMG_ROW, IMG_END
    img_start, img_grid, _, _, img_end = indicators
    # 8 x 8 patches, hidden_stride 2 -> 4 x 4 = 16 visual tokens, each a soft distribution over a visual
    # vocabulary of 64 (+ 5 indicator entries) looked up in a 69 x 64 table
    vision = _vit(Ovis2VisionConfig, image_size=32, patch_size=4, hidden_stride=2, vocab_size=69,
                  num_visual_indicator_tokens=5, tokenize_function="softmax")
    text = Qwen2Config(**_text(layers=layers), bos_token_id=1, eos_token_id=2)
    cfg = Ovis2Config(vision_config=vision, text_config=text, image_token_id=image_token,
                      visual_indicator_token_ids=indicators, vocab_size=128, hidden_size=64)
    model = _seeded(Ovis2ForConditionalGeneration, cfg)
    return _same_rows(model, [BOS, img_start] + [image_token] * tokens + [img_grid, img_end], (3, 32, 32),
                      _blocks(layers), tokens, image_token)


def _vocabulary_map(special):
    """A ``vocabulary_map`` of ``VOCAB`` ids: ``t<id>`` for every id not named in ``special`` ({name: id})."""
    used = set(special.values())
    return {**{f"t{i}": i for i in range(VOCAB) if i not in used}, **special}


def chameleon(layers=3):
    """ChameleonForConditionalGeneration: a VQ-VAE turns the image into 64 discrete code tokens, embedded by
    ``embed_tokens`` (called twice: text, then the codes); ``[bos, image x 64, text]``."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    image_token, vq_codes, first_code_id, tokens = 4, 16, 100, 64
    # ids 100..115 are the VQ code tokens "IMGIMG<code in letters>Z"; id 4 is "<image>"
    codes = {"IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z": first_code_id + code
             for code in range(vq_codes)}
    # 16 px, one downsampling (channel_multiplier [1, 2]) -> 8 x 8 = 64 discrete tokens per image
    vq = dict(embed_dim=8, num_embeddings=vq_codes, latent_channels=8, in_channels=3, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[])
    cfg = ChameleonConfig(**_text(layers=layers), vocabulary_map=_vocabulary_map({"<image>": image_token, **codes}),
                          vq_config=vq, pad_token_id=0, bos_token_id=BOS, eos_token_id=2)
    model = _seeded(ChameleonForConditionalGeneration, cfg)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 16, 16), _blocks(layers, "model.layers"), tokens,
                      image_token)


def emu3(layers=3):
    """Emu3ForConditionalGeneration: VQ-VAE codes (BatchNorm3d inside) plus one end-of-row token per row: 4 x (4 + 1)
    = 20 placeholders per image."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3TextConfig

    image_token, eol, codes, first_visual_id = 3, 4, 16, 100
    special = {"<image>": image_token, "<|extra_200|>": eol}  # the end-of-row token appended to each row of codes
    special.update({f"<|visual token{code:06d}|>": first_visual_id + code for code in range(codes)})
    text = Emu3TextConfig(**_text(layers=layers), attention_dropout=0.0, pad_token_id=0, bos_token_id=BOS,
                          eos_token_id=2)
    # 16 px, spatial factor 4 (channel_multiplier [1, 2, 1]) -> 4 x 4 codes, + 1 EOL per row -> 20 tokens
    vq = dict(codebook_size=codes, temporal_downsample_factor=1, base_channels=32, channel_multiplier=[1, 2, 1],
              num_res_blocks=1, hidden_size=32, attn_resolutions=[], embed_dim=8, latent_channels=8)
    cfg = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=_vocabulary_map(special))
    model = _seeded(Emu3ForConditionalGeneration, cfg)
    tokens = 4 * (4 + 1)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 16, 16), _blocks(layers, "model.text_model.layers"),
                      tokens, image_token, image_sizes=torch.tensor([[16, 16]] * BATCH))


# ----------------------------------------------------------------------------- (b) positions given by a mask input
def kosmos2(layers=3):
    """Kosmos2ForConditionalGeneration: the 8 image positions hold distinct ids, ``image_embeds_position_mask`` marks
    them (no placeholder id)."""
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    latents, boi, eoi, first_image_id = 8, 5, 6, 8
    text = dict(vocab_size=128, embed_dim=64, layers=layers, ffn_dim=128, attention_heads=4, dropout=0.0,
                attention_dropout=0.0, max_position_embeddings=512, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    cfg = Kosmos2Config(text_config=text, vision_config=_vit(dict, image_size=32, patch_size=8),
                        latent_query_num=latents)
    model = _seeded(Kosmos2ForConditionalGeneration, cfg)
    # Kosmos2Processor: <s> <image> [first_image_id ...] </image> text
    image_ids = list(range(first_image_id, first_image_id + latents))
    input_ids, mask, labels = _batch([[0, boi] + image_ids + [eoi]] * BATCH)
    position_mask = torch.zeros_like(input_ids)
    position_mask[:, 2: 2 + latents] = 1
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels,
                  image_embeds_position_mask=position_mask)
    return _finish(model, inputs, Expected(_blocks(layers, "text_model.model.layers"), "scatter", latents, None))


# ------------------------------------------------------------------------------------- (c) dynamic resolution
# LLaVA-NeXT anyres: a base 16 px tile plus a grid of tiles chosen from the pinpoints; the grid features get an
# image_newline feature (a parameter, not a token) after each row. 16 x 16 px: 16 + 4 x (4 + 1) = 36 tokens;
# 16 x 32 px (H x W): 16 + 4 x (8 + 1) = 52.
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
SAME_SIZES = ((16, 16), (16, 16))


def _anyres(model, image_token, sizes, tiles, layers, **extra):
    """Finish an anyres build: one image per row of ``sizes`` ([H, W] px), pixels of ``tiles`` 16 px tiles (the base
    tile included, padded to the largest image's count). The token counts come from the model itself; ``extra``
    is given to the model with the pixels."""
    pixel_values = _pixels(BATCH, tiles, 3, 16, 16)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True,
                                                  **extra)
    counts = [int(f.shape[0]) for f in features.pooler_output]
    input_ids, mask, labels = _batch([[BOS] + [image_token] * n for n in counts])
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=mask,
                  labels=labels, **extra)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", _per_image(counts), image_token))


def llava_next(layers=3, sizes=SAME_SIZES, tiles=2):
    """LlavaNextForConditionalGeneration: anyres tiles, newline features per row; both images 16 x 16 (36 tokens)."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(vision_config=_clip(16, 4), text_config=LlamaConfig(**_text(layers=layers)),
                          image_token_index=3, vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS,
                          image_seq_length=16)
    return _anyres(_seeded(LlavaNextForConditionalGeneration, cfg), 3, sizes, tiles, layers)


def llava_next_mixed(layers=3):
    """LlavaNextForConditionalGeneration with images of 16 x 16 and 16 x 32 px: 36 and 52 tokens."""
    return llava_next(layers, sizes=((16, 16), (16, 32)), tiles=3)


def llava_onevision(layers=3):
    """LlavaOnevisionForConditionalGeneration: anyres with SigLIP and Qwen2, ``batch_num_images`` given."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    cfg = LlavaOnevisionConfig(vision_config=_vit(SiglipVisionConfig, image_size=16, patch_size=4),
                               text_config=Qwen2Config(**_text(layers=layers)), image_token_index=3,
                               video_token_index=4, vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS)
    return _anyres(_seeded(LlavaOnevisionForConditionalGeneration, cfg), 3, SAME_SIZES, 2, layers,
                   batch_num_images=torch.tensor([1, 1]))


def llava_next_video(layers=3):
    """LlavaNextVideoForConditionalGeneration, images only (no ``pixel_values_videos``): as llava_next."""
    from transformers import LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    cfg = LlavaNextVideoConfig(vision_config=_clip(16, 4), text_config=LlamaConfig(**_text(layers=layers)),
                               image_token_index=3, video_token_index=4, vision_feature_layer=-1,
                               image_grid_pinpoints=PINPOINTS, image_seq_length=16, video_seq_length=4)
    return _anyres(_seeded(LlavaNextVideoForConditionalGeneration, cfg), 3, SAME_SIZES, 2, layers)


# Qwen-VL and the like: patches of 4 x 4 px over 2 frames, 2 x 2 patches merged into one token, so a grid of
# (t, h, w) patches gives t * h * w / 4 tokens; M-RoPE positions follow the grid.
PATCH, MERGE, TEMPORAL = 4, 2, 2
SAME_GRIDS = ((1, 4, 4), (1, 4, 4))  # 4 tokens per image
MIXED_GRIDS = ((1, 4, 4), (1, 4, 8))  # 4 and 8 tokens


def _grid_inputs(grids, image, start, end, bos=False, patch_shape=(3 * TEMPORAL * PATCH * PATCH,)):
    """Inputs for one image per row of ``grids``: ``[start, image x N, end, text]`` (after a bos if ``bos``), flat
    pixel patches, ``image_grid_thw`` and ``mm_token_type_ids`` (M-RoPE groups positions by it). Also returns
    ``tokens_per_image``."""
    counts = [t * h * w // MERGE ** 2 for t, h, w in grids]
    input_ids, mask, labels = _batch([[BOS] * bos + [start] + [image] * n + [end] for n in counts])
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(sum(t * h * w for t, h, w in grids), *patch_shape),
                  attention_mask=mask, labels=labels, image_grid_thw=torch.tensor(grids),
                  mm_token_type_ids=(input_ids == image).long())
    return inputs, _per_image(counts)


def _qwen_vision(widths=None, **extra):
    """A Qwen-VL vision dict: 2 blocks of width 32, merged to the text width 64 (Qwen2-VL names the widths
    differently: give them as ``widths``)."""
    widths = widths or dict(hidden_size=32, intermediate_size=64, out_hidden_size=64)
    return dict(depth=2, **widths, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE,
                temporal_patch_size=TEMPORAL, in_channels=3, **extra)


def _qwen_vl(config_cls, model_cls, text, vision, grids):
    """A Qwen-VL build: ``[vision_start 3, image 5 x N, vision_end 4, text]`` per row (video id 6, unused)."""
    image, start, end = 5, 3, 4
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=image, vision_start_token_id=start,
                     vision_end_token_id=end, video_token_id=6)
    model = _seeded(model_cls, cfg)
    inputs, tokens = _grid_inputs(grids, image, start, end)
    return _finish(model, inputs, Expected(_blocks(text["num_hidden_layers"]), "scatter", tokens, image))


def qwen2_vl(layers=3, grids=SAME_GRIDS, hidden=64):
    """Qwen2VLForConditionalGeneration: M-RoPE positions ``[3, B, T]`` from the grid; flat pixel patches. ``hidden``:
    the text width (4 heads)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    section = hidden // 32  # M-RoPE sections [2, 2, 4] at width 64: the half head (hidden / 8) split 1:1:2
    rope = {"type": "mrope", "mrope_section": [section, section, 2 * section]}
    text = _text(hidden=hidden, layers=layers, rope_scaling=rope, model_type="qwen2_vl", bos_token_id=1,
                 eos_token_id=2)
    vision = _qwen_vision(widths=dict(embed_dim=32, hidden_size=hidden))
    return _qwen_vl(Qwen2VLConfig, Qwen2VLForConditionalGeneration, text, vision, grids)


def qwen2_vl_mixed(layers=3):
    """Qwen2VLForConditionalGeneration with grids (1, 4, 4) and (1, 4, 8): 4 and 8 tokens."""
    return qwen2_vl(layers, MIXED_GRIDS)


def qwen2_5_vl(layers=3, grids=SAME_GRIDS):
    """Qwen2_5_VLForConditionalGeneration: window attention in vision block 0 (patches permuted, then restored)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _text(layers=layers, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 2, 4]}, bos_token_id=1, eos_token_id=2)
    # window 16 px = 2 x 2 merged tokens per window; block 1 is full attention, block 0 windowed
    vision = _qwen_vision(window_size=16, fullatt_block_indexes=[1])
    return _qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, text, vision, grids)


def qwen2_5_vl_mixed(layers=3):
    """Qwen2_5_VLForConditionalGeneration with grids (1, 4, 4) and (1, 4, 8): 4 and 8 tokens."""
    return qwen2_5_vl(layers, MIXED_GRIDS)


def _qwen3_vl(config_cls, model_cls, layers, grids, **text_extra):
    """Qwen3-VL: interleaved M-RoPE, an 8 x 8 learned position grid, DeepStack taps after vision block 0."""
    text = _text(layers=layers, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                 **text_extra)
    vision = _qwen_vision(num_position_embeddings=64, deepstack_visual_indexes=[0])
    return _qwen_vl(config_cls, model_cls, text, vision, grids)


def qwen3_vl(layers=3, grids=SAME_GRIDS):
    """Qwen3VLForConditionalGeneration: DeepStack features added to the visual positions inside the decoder loop."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return _qwen3_vl(Qwen3VLConfig, Qwen3VLForConditionalGeneration, layers, grids)


def qwen3_vl_moe(layers=3, grids=SAME_GRIDS):
    """Qwen3VLMoeForConditionalGeneration: as qwen3_vl, with MoE decoder blocks (4 experts, top 2)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    return _qwen3_vl(Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, layers, grids, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)


def _glm_vl(config_cls, model_cls, text, vision, grids=SAME_GRIDS):
    """A GLM-4V-style build: ``[image_start 5, image 7 x N, image_end 6, text]`` per row (video ids 3, 4, 8, unused)."""
    image_token, image_start, image_end = 7, 5, 6
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=image_token, video_token_id=8,
                     image_start_token_id=image_start, image_end_token_id=image_end, video_start_token_id=3,
                     video_end_token_id=4)
    model = _seeded(model_cls, cfg)
    inputs, tokens = _grid_inputs(grids, image_token, image_start, image_end)
    return _finish(model, inputs, Expected(_blocks(text["num_hidden_layers"]), "scatter", tokens, image_token))


GLM_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
# GLM-4.5V / GLM-OCR rotate half of each head (partial_rotary_factor 0.5): the sections cover 8 / 2 = 4 frequencies
GLM_HALF_ROPE = {**GLM_ROPE, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}


def glm4v(layers=3, grids=SAME_GRIDS):
    """Glm4vForConditionalGeneration: resampled learned positions, a 2 x 2 conv downsample, then the merger MLP."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    return _glm_vl(Glm4vConfig, Glm4vForConditionalGeneration, _text(layers=layers, rope_parameters=GLM_ROPE),
                   _qwen_vision(image_size=16), grids)


def paddleocr_vl(layers=3):
    """PaddleOCRVLForConditionalGeneration: NaViT-style tower, per-image 2 x 2 merge in the projector, M-RoPE;
    ``[bos, vision_start, image x 4, vision_end, text]``, pixel patches ``[patches, 3, 4, 4]``."""
    from transformers import PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration

    image_token, vision_start, vision_end = 5, 3, 4
    text = _text(layers=layers, head_dim=16, pad_token_id=0, bos_token_id=BOS, eos_token_id=2,
                 rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"})
    vision = _vit(dict, num_channels=3, patch_size=PATCH, spatial_merge_size=MERGE)
    cfg = PaddleOCRVLConfig(text_config=text, vision_config=vision, image_token_id=image_token,
                            vision_start_token_id=vision_start, vision_end_token_id=vision_end)
    model = _seeded(PaddleOCRVLForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image_token, vision_start, vision_end, bos=True,
                                  patch_shape=(3, PATCH, PATCH))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def lighton_ocr(layers=3):
    """LightOnOcrForConditionalGeneration: Pixtral tower, 2 x 2 patch merger, features split by ``image_sizes``."""
    from transformers import LightOnOcrConfig, LightOnOcrForConditionalGeneration

    image_token, patch, merge = 3, 4, 2
    vision = _vit(dict, model_type="pixtral", head_dim=8, image_size=32, patch_size=patch)
    cfg = LightOnOcrConfig(vision_config=vision, text_config=_text(layers=layers, model_type="qwen3", head_dim=16),
                           image_token_id=image_token, spatial_merge_size=merge)
    model = _seeded(LightOnOcrForConditionalGeneration, cfg)
    tokens = (32 // patch // merge) ** 2  # 8 x 8 patches merged 2 x 2 -> 16
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 32, 32), _blocks(layers), tokens, image_token,
                      image_sizes=torch.tensor([[32, 32]] * BATCH))


# ------------------------------------------------------------------------- (d) image rows separated by break tokens
def _image_rows(rows, cols, image, brk, end=None):
    """``rows`` rows of ``cols`` placeholders, each followed by ``brk``; the last ``brk`` becomes ``end`` if given."""
    ids = ([image] * cols + [brk]) * rows
    if end is not None:
        ids[-1] = end
    return ids


def mistral3(layers=3):
    """Mistral3ForConditionalGeneration: Pixtral tower, 2 x 2 patch merger; rows ``[IMG] x 4 [IMG_BREAK]``, the last
    break ``[IMG_END]``."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig

    text = MistralConfig(**_text(layers=layers), head_dim=16, sliding_window=None)
    return _pixtral_rows(Mistral3Config, Mistral3ForConditionalGeneration, text, layers)


def _pixtral_rows(config_cls, model_cls, text, layers):
    """Mistral3's layout over ``text``: a Pixtral tower (4 x 4 patches of a 32 x 32 image), a 2 x 2 patch merger, rows
    ``[IMG] x 4 [IMG_BREAK]``, the last break ``[IMG_END]``."""
    from transformers import PixtralVisionConfig

    image_token, brk, end = 10, 12, 13
    patch, merge, size = 4, 2, 32
    side = size // (patch * merge)  # 4 x 4 merged tokens per 32 x 32 image
    cfg = config_cls(vision_config=_vit(PixtralVisionConfig, image_size=size, patch_size=patch, head_dim=8),
                     text_config=text, image_token_index=image_token, spatial_merge_size=merge, vision_feature_layer=-1)
    model = _seeded(model_cls, cfg)
    return _same_rows(model, [BOS] + _image_rows(side, side, image_token, brk, end), (3, size, size), _blocks(layers),
                      side * side, image_token, image_sizes=torch.tensor([[size, size]] * BATCH))


def llava_pixtral(layers=3):
    """LlavaForConditionalGeneration over a Pixtral tower: two images of different sizes (4 x 4 and 4 x 2 patches),
    Pixtral rows; the second image is padded to 32 x 32 px and cropped by the model using ``image_sizes``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralVisionConfig

    image_token, brk, end = 10, 12, 13
    patch, size = 8, 32
    sizes = [(32, 32), (32, 16)]  # (height, width)
    grids = [(h // patch, w // patch) for h, w in sizes]
    text = MistralConfig(**_text(layers=layers), head_dim=16, sliding_window=None)
    cfg = LlavaConfig(vision_config=_vit(PixtralVisionConfig, image_size=size, patch_size=patch, head_dim=8),
                      text_config=text, image_token_id=image_token, vision_feature_layer=-1,
                      vision_feature_select_strategy="full", multimodal_projector_bias=True)
    model = _seeded(LlavaForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS] + _image_rows(r, c, image_token, brk, end) for r, c in grids])
    pixels = _pixels(BATCH, 3, size, size)
    pixels[1, :, :, 16:] = 0  # the second image is 32 x 16, padded to 32 x 32
    inputs = dict(input_ids=input_ids, pixel_values=pixels, attention_mask=mask, labels=labels,
                  image_sizes=torch.tensor(sizes))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", [r * c for r, c in grids], image_token))


def fuyu(layers=3):
    """FuyuForCausalLM: raw patches linearly embedded, no vision tower; rows of ``|SPEAKER|`` each followed by
    ``|NEWLINE|``."""
    from transformers import FuyuConfig, FuyuForCausalLM

    image_token, newline = 10, 11
    patch, rows, cols = 4, 4, 4
    dims = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    text = dict(model_type="persimmon", **dims, max_position_embeddings=512, **ids)
    cfg = FuyuConfig(text_config=text, **dims, image_size=rows * patch, patch_size=patch, num_channels=3,
                     image_token_id=image_token, **ids)
    model = _seeded(FuyuForCausalLM, cfg)
    return _same_rows(model, [BOS] + _image_rows(rows, cols, image_token, newline), (rows * cols, 3 * patch * patch),
                      _blocks(layers), rows * cols, image_token)


# ------------------------------------------------------------------------------------ (e) mixed decoder stacks
@functools.cache
def _llama4_text_output():
    """The language model's output type with an ``image_outputs`` field: a real dataclass field, so the output survives
    pytree flatten/unflatten (ModelOutput subclasses are pytree nodes)."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    @dataclass
    class Llama4TextOutputWithImageOutputs(MoeCausalLMOutputWithPast):
        image_outputs: object = None

    return Llama4TextOutputWithImageOutputs


def _give_image_outputs(language_model):
    """Swap in a subclass (same name, parameters and state_dict keys) whose forward returns ``_llama4_text_output``."""
    base = type(language_model)

    def forward(self, *args, **kwargs):
        return _llama4_text_output()(**super(cls, self).forward(*args, **kwargs))

    cls = type(base.__name__, (base,), {"forward": forward})
    language_model.__class__ = cls


def llama4(layers=4):
    """Llama4ForConditionalGeneration, the Maverick pattern at 4 layers: MoE every 2nd layer, no RoPE every 4th
    (kinds: dense+rope, moe+rope, dense+rope, moe+no-rope); ``[bos, start, <|image|>, patch x 16, end, text]``."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    image_token, start, end, image_marker = 10, 11, 12, 13  # <|patch|>, <|image_start|>, <|image_end|>, <|image|>
    size, patch = 32, 4
    tokens = (size // patch) ** 2 // 4  # 8 x 8 patches, pixel-shuffled by 0.5 -> 16 tokens
    vision = _vit(dict, intermediate_size=128, image_size=size, patch_size=patch, vision_output_dim=32,
                  projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text = _text(layers=layers, intermediate_size=64, intermediate_size_mlp=128, head_dim=16, num_local_experts=4,
                 num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=4, attention_chunk_size=16,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = Llama4Config(vision_config=vision, text_config=text, image_token_index=image_token, boi_token_index=start,
                       eoi_token_index=end)
    model = _seeded(Llama4ForConditionalGeneration, cfg)
    # transformers 5.24 bug: the top forward reads `outputs.image_outputs`, which the language model's output lacks
    _give_image_outputs(model.language_model)
    return _same_rows(model, [BOS, start, image_marker] + [image_token] * tokens + [end], (3, size, size),
                      _blocks(layers, "language_model.model.layers"), tokens, image_token)


def lfm2_vl(layers=4):
    """Lfm2VlForConditionalGeneration: short-conv blocks x 3, then attention (the attention kind once, at the end);
    SigLIP2 patches unshuffled by 2 into 16 tokens."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    image_token, start, end = 10, 11, 12  # <image>, <|image_start|>, <|image_end|>
    patch, side, factor = 4, 8, 2  # 8 x 8 patches per image, unshuffled by 2 -> 16 tokens
    tokens = (side // factor) ** 2
    vision = _vit(dict, model_type="siglip2_vision_model", num_channels=3, num_patches=side * side, patch_size=patch,
                  vision_use_head=False)  # as in the released LFM2-VL configs: no pooling head
    text = _text(layers=layers, model_type="lfm2", conv_L_cache=3, block_multiple_of=16,
                 layer_types=["conv"] * (layers - 1) + ["full_attention"], pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)
    cfg = Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=image_token, downsample_factor=factor,
                       projector_hidden_size=64)
    model = _seeded(Lfm2VlForConditionalGeneration, cfg)
    return _same_rows(model, [BOS, start] + [image_token] * tokens + [end], (side * side, 3 * patch * patch),
                      _blocks(layers), tokens, image_token, spatial_shapes=torch.tensor([[side, side]] * BATCH),
                      pixel_attention_mask=torch.ones(BATCH, side * side, dtype=torch.long))


def gemma3n(layers=4):
    """Gemma3nForConditionalGeneration: AltUp, per-layer inputs, KV sharing (layers 2, 3 reuse the K/V of 0, 1: two
    kinds); conv tower (a stand-in); image ids in a vision vocabulary after the text one."""
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration
    from transformers.models.gemma3n import modeling_gemma3n

    # text ids 0..127, vision soft/hard tokens 128..135, audio 136..143 (as 262144 / +128 / +128 in the real model)
    text_vocab, boi, image_token, eoi, audio_token = 128, 5, 129, 6, 137
    tokens = 16  # vision_soft_tokens_per_image: the 4 x 4 grid of the (stand-in) tower
    text = _text(layers=layers, vocab=144, vocab_size_per_layer_input=text_vocab, head_dim=16,
                 hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2, num_kv_shared_layers=2,
                 sliding_window=16, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                 pad_token_id=0, bos_token_id=BOS, eos_token_id=2)
    vision = dict(hidden_size=32, vocab_size=8, vocab_offset=text_vocab)
    audio = dict(hidden_size=32, vocab_size=8, vocab_offset=text_vocab + 8, input_feat_size=16,
                 conf_num_attention_heads=4, conf_num_hidden_layers=1, sscp_conv_channel_size=[8, 8],
                 conf_attention_chunk_size=4, conf_attention_context_left=5)
    cfg = Gemma3nConfig(text_config=text, vision_config=vision, audio_config=audio, vision_soft_tokens_per_image=tokens,
                        boi_token_id=boi, eoi_token_id=eoi, image_token_id=image_token, boa_token_id=7,
                        eoa_token_id=8, audio_token_id=audio_token)
    with _stand_in_tower(modeling_gemma3n, "Gemma3nVisionConfig"):  # the real tower is timm's, not installed
        model = _seeded(Gemma3nForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS, boi] + [image_token] * tokens + [eoi]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels,
                  token_type_ids=(input_ids == image_token).long())
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


# ----------------------------------------------------------------------------------------- (f) cross-attention
def mllama(layers=4, cross_attention_layers=(1, 3)):
    """MllamaForConditionalGeneration: cross-attention layers among self-attention ones (two kinds); one ``<|image|>``
    token, the image (2 tiles) enters through cross-attention."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    image_token, tiles, image_size, patch = 4, 2, 16, 4
    text = _text(layers=layers, cross_attention_layers=list(cross_attention_layers),
                 rope_scaling={"rope_type": "default"}, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 model_type="mllama")
    vision = dict(image_size=image_size, patch_size=patch, num_channels=3, hidden_size=32,
                  intermediate_layers_indices=[0], vision_output_dim=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=4, intermediate_size=64, max_num_tiles=tiles,
                  supported_aspect_ratios=[[1, 1], [1, 2]])
    cfg = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image_token)
    model = _seeded(MllamaForConditionalGeneration, cfg)
    with torch.no_grad():  # a fresh Mllama's tanh gates are 0: open them so cross-attention contributes
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.5)
    input_ids, mask, labels = _batch([[BOS, image_token]] * BATCH)
    seq = input_ids.shape[1]
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 1, tiles, 3, image_size, image_size),
                  aspect_ratio_ids=torch.full((BATCH, 1), 2),
                  aspect_ratio_mask=torch.ones(BATCH, 1, tiles, dtype=torch.long),
                  cross_attention_mask=torch.ones(BATCH, seq, 1, tiles, dtype=torch.long),
                  attention_mask=mask, labels=labels)
    # one image = all its tiles; each tile gives its patches plus a class token
    tokens = tiles * ((image_size // patch) ** 2 + 1)
    return _finish(model, inputs, Expected(_blocks(layers), "cross_attention", tokens, None))


# ------------------------------------------------------------------------------------------------ (g) text only
def llama_text_only(layers=3):
    """LlamaForCausalLM, no image: 12 text tokens, every one a label."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _seeded(LlamaForCausalLM, LlamaConfig(**_text(layers=layers)))
    input_ids, mask, labels = _batch([[]] * BATCH, text_tokens=12)
    inputs = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers, "model.layers"), "none", 0, None))


# ------------------------------------------------------------------------ (h) 2026 vision-language families
def glm46v(layers=3):
    """Glm46VForConditionalGeneration: GLM-4V's tower and merger over a GLM-4V text decoder (the 4.6V release)."""
    from transformers import Glm46VConfig, Glm46VForConditionalGeneration

    text = _text(layers=layers, model_type="glm4v_text", rope_parameters=GLM_ROPE)
    return _glm_vl(Glm46VConfig, Glm46VForConditionalGeneration, text,
                   _qwen_vision(model_type="glm4v_vision", image_size=16))


def glm4v_moe(layers=3):
    """Glm4vMoeForConditionalGeneration: GLM-4.5V, the first block dense, then MoE blocks (4 routed experts, top 2,
    a shared expert): two kinds."""
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    text = _text(layers=layers, head_dim=16, rope_parameters=GLM_HALF_ROPE, moe_intermediate_size=32,
                 n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)
    return _glm_vl(Glm4vMoeConfig, Glm4vMoeForConditionalGeneration, text, _qwen_vision(image_size=16))


def glm_ocr(layers=3):
    """GlmOcrForConditionalGeneration: GLM-4V's layout with an OCR-sized tower and text decoder."""
    from transformers import GlmOcrConfig, GlmOcrForConditionalGeneration

    text = _text(layers=layers, head_dim=16, rope_parameters=GLM_HALF_ROPE)
    return _glm_vl(GlmOcrConfig, GlmOcrForConditionalGeneration, text, _qwen_vision(image_size=16))


def _qwen3_5_text(layers, **extra):
    """A Qwen3.5 text config: gated delta-net (linear attention) blocks x 3, then full attention, interleaved M-RoPE."""
    return _text(layers=layers, head_dim=16, layer_types=["linear_attention"] * (layers - 1) + ["full_attention"],
                 linear_conv_kernel_dim=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                 linear_num_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                 **extra)


def qwen3_5(layers=4):
    """Qwen3_5ForConditionalGeneration: Qwen3-VL's tower without DeepStack over a hybrid decoder (two kinds)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    return _qwen_vl(Qwen3_5Config, Qwen3_5ForConditionalGeneration, _qwen3_5_text(layers),
                    _qwen_vision(num_position_embeddings=64), SAME_GRIDS)


def qwen3_5_moe(layers=4):
    """Qwen3_5MoeForConditionalGeneration: as qwen3_5, every block's MLP a MoE (4 experts, top 2, a shared expert)."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = _qwen3_5_text(layers, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                         num_experts_per_tok=2)
    return _qwen_vl(Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, text,
                    _qwen_vision(num_position_embeddings=64), SAME_GRIDS)


def llava_onevision1_5(layers=3):
    """LlavaOnevision15ForConditionalGeneration: RICE ViT (a class token per image, dropped after the blocks), 2 x 2
    patch merger, Qwen3 text with 1-D positions; Qwen2-VL's ``[vision_start, image x N, vision_end]``."""
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

    image, start, end = 5, 3, 4
    vision = _vit(dict, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE, out_hidden_size=64)
    cfg = LlavaOnevision15Config(text_config=_text(layers=layers, model_type="qwen3", head_dim=16),
                                 vision_config=vision, image_token_id=image, video_token_id=6,
                                 vision_start_token_id=start, vision_end_token_id=end)
    model = _seeded(LlavaOnevision15ForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image, start, end, patch_shape=(3 * PATCH * PATCH,))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image))


def hunyuan_vl(layers=3):
    """HunYuanVLForConditionalGeneration: a conv merger appends a newline feature to each row and wraps the image in
    begin/end features (parameters), all at placeholder positions: 4 x (4 + 1) + 2 = 22 per image, between
    ``<im_start> <im_end>``; 4-axis positions (sequence, width, height, image index)."""
    from transformers import HunYuanVLConfig, HunYuanVLForConditionalGeneration

    image_token, im_start, im_end = 10, 11, 12
    side = 8  # 8 x 8 patches of 4 px, merged 2 x 2 -> 4 rows of 4 tokens plus a newline each, plus begin and end
    tokens = (side // MERGE) * (side // MERGE + 1) + 2
    vision = _vit(dict, num_channels=3, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=1,
                  out_hidden_size=64, text_hidden_size=64, max_image_size=32)
    text = _text(layers=layers, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "mrope_section": [2, 2, 2, 2]})
    cfg = HunYuanVLConfig(text_config=text, vision_config=vision, image_token_id=image_token, im_start_id=im_start,
                          im_end_id=im_end, im_newline_id=13)
    model = _seeded(HunYuanVLForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS, im_start] + [image_token] * tokens + [im_end]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * side * side, 3 * PATCH * PATCH),
                  attention_mask=mask, labels=labels, image_grid_thw=torch.tensor([[1, side, side]] * BATCH),
                  mm_token_type_ids=(input_ids == image_token).long())
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def _deepseek_v3_text(layers, **extra):
    """A DeepSeek-V3 text config: multi-head latent attention, the first block dense, then MoE (4 experts, top 2)."""
    return _text(layers=layers, model_type="deepseek_v3", kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                 qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra)


def kimi_k25(layers=3):
    """Kimi_K25ForConditionalGeneration: MoonViT (learned positions resampled per grid), 2 x 2 merge, DeepSeek-V3
    text; the placeholder ids are replaced by 0 before the embedding lookup. ``[media_start, pad x 16, media_end]``."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    image_token, start, end, side = 10, 11, 12, 8
    tokens = (side // MERGE) ** 2
    vision = _vit(dict, patch_size=PATCH, pos_emb_height=side, pos_emb_width=side, pos_emb_time=1,
                  merge_kernel_size=[MERGE, MERGE])
    cfg = Kimi_K25Config(text_config=_deepseek_v3_text(layers), vision_config=vision, projection_hidden_size=32,
                         image_token_id=image_token, video_token_id=13, vision_start_token_id=start,
                         vision_end_token_id=end)
    model = _seeded(Kimi_K25ForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS, start] + [image_token] * tokens + [end]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * side * side, 3, PATCH, PATCH),
                  attention_mask=mask, labels=labels, image_grid_thw=torch.tensor([[1, side, side]] * BATCH))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def lfm3_vl(layers=4):
    """Lfm3VlForConditionalGeneration: a tower of short-conv layers, 2 x 2 merge, an LFM3 decoder of short-conv,
    sliding and full attention blocks (three kinds); Qwen2-VL's ``[vision_start, image x N, vision_end]``."""
    from transformers import Lfm3VlConfig, Lfm3VlForConditionalGeneration

    image, start, end = 5, 3, 4
    vision = _vit(dict, num_key_value_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL)
    text = _text(layers=layers, model_type="lfm3", head_dim=16, sliding_window=8,
                 layer_types=["conv", "sliding_attention", "full_attention", "conv"][:layers], pad_token_id=0,
                 bos_token_id=BOS, eos_token_id=2)
    cfg = Lfm3VlConfig(text_config=text, vision_config=vision, image_token_id=image, video_token_id=6,
                       vision_start_token_id=start, vision_end_token_id=end, projector_hidden_size=64)
    model = _seeded(Lfm3VlForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image, start, end)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image))


def step3p7(layers=4):
    """Step3p7ForConditionalGeneration: 16 x 16 patches, two stride-2 convs to 4 x 4 = 16 tokens; a decoder of sliding
    and full attention blocks, dense then MoE MLPs. A small image is its global view only (no local crops):
    ``[im_start, im_patch x 16, im_end]``."""
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    image_token, im_start, im_end, size, tokens = 10, 11, 12, 64, 16
    vision = _vit(dict, image_size=size, patch_size=PATCH, mlp_ratio=2.0, max_position_embeddings=(size // PATCH) ** 2)
    text = _text(layers=layers, head_dim=16, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                 mlp_layer_types=["dense", "sparse"] * (layers // 2), n_routed_experts=4, num_local_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=32, share_expert_dim=32, pad_token_id=0)
    cfg = Step3p7Config(vision_config=vision, text_config=text, image_token_id=image_token)
    model = _seeded(Step3p7ForConditionalGeneration, cfg)
    return _same_rows(model, [BOS, im_start] + [image_token] * tokens + [im_end], (3, size, size), _blocks(layers),
                      tokens, image_token)


def gemma4(layers=4):
    """Gemma4ForConditionalGeneration: image ids replaced by the pad id before the lookup, a second (per-layer)
    embedding table indexed by the same ids, KV sharing (layers 2, 3 reuse the K/V of 0, 1), bidirectional attention
    over the image; ``[bos, boi, image x 16, eoi, text]``, 8 x 8 patches pooled 2 x 2 by their positions."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    patch, side, kernel = 4, 8, 2
    tokens = (side // kernel) ** 2
    text = _text(layers=layers, head_dim=16, global_head_dim=16, sliding_window=16, vocab_size_per_layer_input=VOCAB,
                 layer_types=["sliding_attention", "full_attention"] * (layers // 2), hidden_size_per_layer_input=8,
                 num_kv_shared_layers=2, use_bidirectional_attention="vision", pad_token_id=0, bos_token_id=BOS,
                 eos_token_id=2)
    vision = _vit(dict, num_key_value_heads=4, head_dim=8, patch_size=patch, pooling_kernel_size=kernel,
                  position_embedding_size=side)
    return _gemma4_layout(Gemma4Config, Gemma4ForConditionalGeneration, text, vision, layers, side, tokens,
                          3 * patch * patch)


def _gemma4_layout(config_cls, model_cls, text, vision, layers, side, tokens, patch_values):
    """Gemma4's layout: ``[bos, boi, image x tokens, eoi, text]``, one image a row given as its ``side`` x ``side``
    patches (``patch_values`` each) with their (x, y) positions, the image positions' token type 1."""
    image_token, boi, eoi = 3, 4, 5
    cfg = config_cls(text_config=text, vision_config=vision, audio_config=None, image_token_id=image_token,
                     boi_token_id=boi, eoi_token_id=eoi, video_token_id=6, audio_token_id=7, boa_token_id=8,
                     eoa_token_index=9)
    model = _seeded(model_cls, cfg)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([cols.flatten(), rows.flatten()], dim=-1).expand(BATCH, -1, -1)  # (x, y) of each patch
    input_ids, mask, labels = _batch([[BOS, boi] + [image_token] * tokens + [eoi]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, side * side, patch_values),
                  image_position_ids=positions, attention_mask=mask, labels=labels,
                  mm_token_type_ids=(input_ids == image_token).long())
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def molmo2(layers=3):
    """Molmo2ForConditionalGeneration: each image a low-resolution view (4 x 4 tokens) then a high-resolution one
    (4 x 8, two crops side by side), every row of patches ended by a column token; pooled features added onto the
    patch embeddings; bidirectional attention over the image tokens. stsc compresses each view on its own grid, so
    ``tokens_per_image`` lists the views."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    start, low_start, end, patch_token, column = 120, 121, 122, 123, 124  # the extra vocabulary after 120 text ids
    patch, crop, pool = 4, 32, 2
    side = crop // patch  # 8 x 8 patches per crop
    views = [(side // pool, side // pool, low_start), (side // pool, 2 * side // pool, start)]  # (rows, cols, opener)
    text = _text(layers=layers, vocab=120, additional_vocab_size=8, head_dim=16, pad_token_id=0, bos_token_id=BOS,
                 eos_token_id=2)
    vision = _vit(dict, num_key_value_heads=4, head_dim=8, image_size=[crop, crop], patch_size=patch)
    adapter = dict(vision_feature_layer=[-1, 0], hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=8, text_hidden_size=64)  # the last and the first ViT layer
    cfg = Molmo2Config(text_config=text, vision_config=vision, adapter_config=adapter, image_start_token_id=start,
                       low_res_image_start_token_id=low_start, image_end_token_id=end, image_patch_id=patch_token,
                       frame_start_token_id=125, frame_end_token_id=126)
    model = _seeded(Molmo2ForConditionalGeneration, cfg)
    prompt = [BOS] + [i for rows, cols, opener in views for i in [opener] + ([patch_token] * cols + [column]) * rows
                      + [end]]
    input_ids, mask, labels = _batch([prompt] * BATCH)

    def pooled(crop_index, row, col):  # the 2 x 2 patches of crop ``crop_index`` under token (row, col)
        return [crop_index * side * side + (pool * row + i) * side + pool * col + j for i in range(pool)
                for j in range(pool)]

    # crop 0 is the low-resolution view; crops 1 and 2 the left and right halves of the high-resolution one
    pooling = [pooled(0, r, c) for r in range(views[0][0]) for c in range(views[0][1])]
    pooling += [pooled(1 + c // (side // pool), r, c % (side // pool)) for r in range(views[1][0])
                for c in range(views[1][1])]
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, side * side, 3 * patch * patch),
                  image_token_pooling=torch.tensor(pooling * BATCH),
                  image_grids=torch.tensor([[*views[0][:2], *views[1][:2]]] * BATCH),
                  image_num_crops=torch.full((BATCH,), 3), attention_mask=mask, labels=labels,
                  mm_token_type_ids=torch.isin(input_ids, torch.tensor([start, low_start, end, patch_token, column]))
                  .long())
    counts = [rows * cols for rows, cols, _ in views] * BATCH
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", counts, patch_token))


def granite4_vision(layers=6):
    """Granite4VisionForConditionalGeneration: LLaVA-NeXT anyres (base tile + a 1 x 1 grid with row newlines), each
    feature map downsampled 2x by a windowed Q-Former; the placeholder embeddings are zeroed and features added at the
    visual positions before six decoder blocks: two vision layers' before blocks 0 and 1, four spatial offset groups'
    before blocks 2..5 (distinct blocks, as in the released model). The Q-Formers run without dropout, so a training
    forward draws nothing (a hand-compacted reference forward sees the same features)."""
    from transformers import Granite4VisionConfig, Granite4VisionForConditionalGeneration

    image_token, size = 3, 16
    vision = _vit(dict, model_type="clip_vision_model", hidden_size=64, image_size=size, patch_size=2,
                  projection_dim=64)  # the Q-Former's heads are hidden_size // 64
    text = _text(layers=layers, model_type="granite4_vision_text", bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    qformer = dict(num_hidden_layers=1, intermediate_size=64, cross_attention_frequency=1, max_position_embeddings=64,
                   use_qformer_text_input=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = Granite4VisionConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                               image_grid_pinpoints=[[size, size]], downsample_rate="1/2",
                               deepstack_layer_map=[[1, 0], [2, 1]], spatial_target_layers=[2, 3, 4, 5],
                               projector_dropout=0.0, qformer_config=qformer)
    model = _seeded(Granite4VisionForConditionalGeneration, cfg)
    pixel_values, image_sizes = _pixels(BATCH, 2, 3, size, size), torch.tensor([[size, size]] * BATCH)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    tokens = [int(f.shape[0]) for f in features.deepstack_features[0][1]]  # 16 + 4 x (4 + 1) = 36
    input_ids, mask, labels = _batch([[BOS] + [image_token] * n for n in tokens])
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=mask,
                  labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", _per_image(tokens), image_token))


def granite_docling(layers=3):
    """GraniteDoclingForConditionalGeneration: Idefics3's image splitting (1 x 2 tiles + a global view, 16 tokens each
    after a pixel shuffle by 2), DeepStack features of vision layer 0 added after the first decoder block; a density
    router (unused in training forwards)."""
    from transformers import GraniteDoclingConfig, GraniteDoclingForConditionalGeneration

    image_token, fake, newline, glob, row_col = 3, 4, 7, 8, [5, 6]
    size, per_tile = 32, 16  # 8 x 8 patches, pixel-shuffled by 2
    vision = _vit(dict, image_size=size, patch_size=PATCH, out_hidden_size=64, scale_factor=2,
                  deepstack_visual_indexes=[0])
    text = _text(layers=layers, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    cfg = GraniteDoclingConfig(text_config=text, vision_config=vision, image_token_id=image_token, pad_token_id=0)
    model = _seeded(GraniteDoclingForConditionalGeneration, cfg)
    prompt = _tiles_prompt(image_token, per_tile, fake, row_col, newline, glob)
    return _same_rows(model, prompt, (3, 3, size, size), _blocks(layers, "model.text_model.layers"), per_tile,
                      image_token, pixel_attention_mask=torch.ones(BATCH, 3, dtype=torch.bool))


def deepseek_ocr2(layers=3):
    """DeepseekOcr2ForConditionalGeneration: SAM-style tower, then a Qwen2-style encoder in which 144 learned queries
    read the patches; the global view's 144 features plus a view separator (a parameter): 145 placeholders per image.
    Decoder: a dense block, then MoE blocks."""
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration

    encoder = _text(hidden=64, layers=2, rms_norm_eps=1e-6)
    return _sam_ocr(DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration, layers, 16, 145, encoder)


def _sam_ocr(config_cls, model_cls, layers, size, tokens, encoder, **text_extra):
    """A SAM-style high-resolution tower (a ``size`` px image) read by a second ``encoder``, over a decoder of a dense
    block then MoE blocks: ``[bos, image x tokens, text]`` (DeepSeek-OCR-2, Unlimited-OCR)."""
    image_token = 3
    sam = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4, image_size=size,
               patch_size=2, mlp_ratio=2.0, window_size=4, global_attn_indexes=[1], downsample_channels=[32, 64])
    text = _text(layers=layers, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), n_routed_experts=4,
                 n_shared_experts=1, moe_intermediate_size=32, num_experts_per_tok=2, bos_token_id=BOS,
                 eos_token_id=2, pad_token_id=0, **text_extra)
    cfg = config_cls(vision_config=dict(sam_config=sam, encoder_config=encoder), text_config=text,
                     image_token_id=image_token)
    model = _seeded(model_cls, cfg)
    with torch.no_grad():  # SAM-style init uses initializer_range 1e-10: give the SAM tower real values
        for param in model.model.vision_tower.sam_encoder.parameters():
            if param.dim() >= 2:
                param.normal_(std=0.05)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, size, size), _blocks(layers), tokens, image_token)


def deepseek_vl_hybrid(layers=3):
    """DeepseekVLHybridForConditionalGeneration: a SigLIP tower (4 x 4 patches) and a SAM-style high-resolution tower
    whose features an aligner fuses: 16 tokens, ``[bos, image x 16, text]``."""
    from transformers import DeepseekVLHybridConfig, DeepseekVLHybridForConditionalGeneration

    image_token, tokens = 3, 16
    vision = _vit(dict, image_size=32, patch_size=8, vision_use_head=False)
    high_res = dict(num_hidden_layers=2, global_attn_indexes=[0], hidden_size=16, intermediate_size=32, mlp_dim=24,
                    output_channels=4, image_size=128, patch_size=32, num_attention_heads=4)
    text = _text(layers=layers, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    cfg = DeepseekVLHybridConfig(text_config=text, vision_config=vision, high_res_vision_config=high_res,
                                 image_token_id=image_token)
    model = _seeded(DeepseekVLHybridForConditionalGeneration, cfg)
    return _same_rows(model, [BOS] + [image_token] * tokens, (3, 32, 32), _blocks(layers), tokens, image_token,
                      high_res_pixel_values=_pixels(BATCH, 3, 128, 128))


def ernie4_5_vl_moe(layers=3):
    """Ernie4_5_VLMoeForConditionalGeneration: MoE blocks with separate text and vision experts, routed by a per-token
    input (``moe_mm_token_type_ids``: 1 on the image and its start/end tokens); M-RoPE;
    ``[image_start, image x 4, image_end]`` (GLM-4V's ids)."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    image_token, image_start, image_end = 7, 5, 6
    text = _text(layers=layers, head_dim=16, rope_parameters={**GLM_ROPE, "mrope_section": [3, 3, 2]},
                 mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), moe_intermediate_size=[32, 32], moe_k=2,
                 moe_num_experts=4, moe_num_shared_experts=1, moe_norm_min=1e-12)
    vision = _vit(dict, depth=2, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE)
    cfg = Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, image_token_id=image_token, video_token_id=8,
                               image_start_token_id=image_start, image_end_token_id=image_end,
                               video_start_token_id=3, video_end_token_id=4)
    model = _seeded(Ernie4_5_VLMoeForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image_token, image_start, image_end, patch_shape=(3 * PATCH * PATCH,))
    ids = inputs["input_ids"]
    inputs["moe_mm_token_type_ids"] = torch.isin(ids, torch.tensor([image_token, image_start, image_end])).long()
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def ovis2_5(layers=3):
    """Ovis2_5ForConditionalGeneration: NaViT tower, each visual token a softmax over a visual vocabulary looked up in a
    table; the image's start/end tokens get indicator embeddings (``where``) after the placeholders are scattered;
    ``[image_start, image x 4, image_end]``, Qwen3 text."""
    from transformers import Ovis2_5Config, Ovis2_5ForConditionalGeneration

    image_token, start, end = 5, 3, 4
    vision = _vit(dict, patch_size=PATCH, spatial_merge_size=MERGE, image_size=32, window_size=16, vocab_size=68,
                  num_visual_indicator_tokens=4, max_position_embeddings=64)
    cfg = Ovis2_5Config(text_config=_text(layers=layers, model_type="qwen3", head_dim=16), vision_config=vision,
                        image_token_id=image_token, video_token_id=6, image_start_token_id=start,
                        image_end_token_id=end, video_start_token_id=7, video_end_token_id=8)
    model = _seeded(Ovis2_5ForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image_token, start, end, patch_shape=(3 * PATCH * PATCH,))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


# MiniCPM-V 4.6 / 4.7 / MiniCPM-OCR: an image is a global view and slices (here one row of two), each a NaViT-packed
# view of SIDE x SIDE patches; ids: <image_id> 0 </image_id>, <image> </image>, <slice> </slice>, newline
MINICPM = dict(image=10, image_start=11, image_end=12, slice_start=13, slice_end=14, newline=15, id_start=16,
               id_end=17, zero=18)


def _minicpm(config_cls, model_cls, layers, side, divisor, **cfg_extra):
    """A MiniCPM-V build: ``<image_id>0</image_id><image> unk x n </image><slice> unk x n </slice> x 2`` per row,
    views of ``side`` x ``side`` patches of 4 px, ``n = side**2 / divisor`` tokens per view (the window merger after
    vision layer 0 and the merger each take 2 x 2, or only the merger for ``"4x"``); a Qwen3.5 hybrid decoder. stsc
    treats each view as its own image, so ``tokens_per_image`` is one view."""
    ids = MINICPM
    views, tokens = 3, side * side // divisor
    vision = _vit(dict, image_size=side * PATCH, patch_size=PATCH, num_channels=3)
    text = _qwen3_5_text(layers, model_type="qwen3_5_text", bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=ids["image"], insert_layer_id=0,
                     **cfg_extra)
    model = _seeded(model_cls, cfg)
    view = [ids["image"]] * tokens
    prompt = ([BOS, ids["id_start"], ids["zero"], ids["id_end"], ids["image_start"]] + view + [ids["image_end"]]
              + ([ids["slice_start"]] + view + [ids["slice_end"]]) * (views - 1))
    input_ids, mask, labels = _batch([prompt] * BATCH)
    # NaViT packing: every view's patches side by side along the last axis, (1, C, patch, patches * patch)
    pixels = _pixels(1, 3, PATCH, BATCH * views * side * side * PATCH)
    inputs = dict(input_ids=input_ids, pixel_values=pixels, target_sizes=torch.tensor([[side, side]] * BATCH * views),
                  attention_mask=mask, labels=labels)
    return model, inputs, Expected(_blocks(layers), "scatter", tokens, ids["image"])


def minicpmv4_6(layers=4):
    """MiniCPMV4_6ForConditionalGeneration: a global view and two slices of 16 x 16 patches, 16x downsampling (16
    tokens per view); Qwen3.5 hybrid decoder."""
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    model, inputs, expected = _minicpm(MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration, layers, 16, 16,
                                       image_size=64, drop_vision_last_layer=False)
    return _finish(model, inputs, expected)


def minicpm_ocr(layers=4):
    """MiniCPMOcrForConditionalGeneration: MiniCPM-V 4.6's layout with 4x downsampling (8 x 8 patches -> 16 tokens per
    view: the merger only, the window merger inside the tower unused)."""
    from transformers import MiniCPMOcrConfig, MiniCPMOcrForConditionalGeneration

    model, inputs, expected = _minicpm(MiniCPMOcrConfig, MiniCPMOcrForConditionalGeneration, layers, 8, 4)
    return _finish(model, inputs, expected)


def minicpmv4_7(layers=4):
    """MiniCPMV4_7ForConditionalGeneration: MiniCPM-V 4.6's layout with canvas M-RoPE (the global view and the slices
    placed on one position canvas, markers at their corners), positions grouped by ``mm_token_type_ids``."""
    from transformers import MiniCPMV4_7Config, MiniCPMV4_7ForConditionalGeneration

    ids = MINICPM
    model, inputs, expected = _minicpm(
        MiniCPMV4_7Config, MiniCPMV4_7ForConditionalGeneration, layers, 16, 16, image_size=64,
        image_start_id=ids["image_start"], image_end_id=ids["image_end"], slice_start_id=ids["slice_start"],
        slice_end_id=ids["slice_end"], newline_id=ids["newline"])
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == ids["image"]).long()
    return _finish(model, inputs, expected)


def _phi4_multimodal(layers):
    """A Phi4MultimodalForCausalLM build: image placeholder id 10, audio placeholder id 11."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    vision = _vit(dict, image_size=32, patch_size=PATCH, crop_size=32, image_token_id=10)
    audio = dict(num_blocks=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                 depthwise_separable_out_channel=32, nemo_conv_channels=32, ext_pw_out_channel=32,
                 audio_token_id=11)
    cfg = Phi4MultimodalConfig(**_text(layers=layers, num_key_value_heads=4), vision_config=vision, audio_config=audio,
                               bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    return _seeded(Phi4MultimodalForCausalLM, cfg)


def phi4_multimodal(layers=3):
    """Phi4MultimodalForCausalLM, an image: SigLIP crops (the global view and one 32 px crop, 8 x 8 patches pooled
    2 x 2), each row followed by a learned separator feature, the crop then a separator then the global view: 4 x (4 +
    1) + 1 + 4 x (4 + 1) = 41 placeholders ``<|image|>``, written by ``index_put``."""
    model = _phi4_multimodal(layers)
    tokens = 41
    input_ids, mask, labels = _batch([[BOS] + [10] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, image_pixel_values=_pixels(BATCH, 2, 3, 32, 32),
                  image_attention_mask=torch.ones(BATCH, 2, 8, 8), image_sizes=torch.tensor([[32, 32]] * BATCH),
                  attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers, "model.layers"), "scatter", tokens, 10))


def minimax_m3_vl(layers=4):
    """MiniMaxM3SparseForConditionalGeneration: a Qwen2-VL-style tower; a decoder whose first block has full attention
    and a dense MLP, the others block-sparse attention (a lightning indexer picks key blocks) and MoE MLPs (two kinds);
    ``[vision_start, image x 4, vision_end]``."""
    from transformers import MiniMaxM3SparseForConditionalGeneration, MiniMaxM3VLConfig

    image, start, end = 5, 3, 4
    text = _text(layers=layers, head_dim=16, rotary_dim=8,
                 layer_types=["full_attention"] + ["minimax_m3_sparse"] * (layers - 1),
                 mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), num_local_experts=4, num_experts_per_tok=2,
                 dense_intermediate_size=128, shared_intermediate_size=32, index_n_heads=2, index_head_dim=16,
                 index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=BOS, eos_token_id=2)
    vision = _vit(dict, image_size=32, patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE)
    cfg = MiniMaxM3VLConfig(vision_config=vision, text_config=text, image_token_index=image, video_token_index=6,
                            projector_hidden_size=64)
    model = _seeded(MiniMaxM3SparseForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image, start, end)
    del inputs["mm_token_type_ids"]  # 1-D positions: the model takes no token types
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image))


def hy_v4_vl(layers=6):
    """HYV4VLForConditionalGeneration: HunYuan's conv merger (a newline feature after each row: 4 x (4 + 1) = 20 per
    image); a decoder with hyper-connections (the hidden state is 4 residual streams mixed per block), multi-head latent
    attention restricted by an indexer (blocks 0, 1, 5 select, blocks 2..4 reuse the selection before them, as in the
    released model's every-4th pattern), a dense MLP in block 0, then MoE: three kinds."""
    from transformers import HYV4VLConfig, HYV4VLForConditionalGeneration

    image_token, side = 10, 8
    tokens = (side // MERGE) * (side // MERGE + 1)
    vision = _vit(dict, num_channels=3, patch_size=PATCH, spatial_merge_size=MERGE, out_hidden_size=64,
                  max_image_size=32)
    text = _text(layers=layers, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8,
                 v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 index_topk=8, index_head_dim=16, index_n_heads=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                 bos_token_id=BOS, eos_token_id=2, pad_token_id=0)
    cfg = HYV4VLConfig(text_config=text, vision_config=vision, image_token_id=image_token, video_token_id=11)
    model = _seeded(HYV4VLForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * side * side, 3 * PATCH * PATCH),
                  attention_mask=mask, labels=labels, image_grid_thw=torch.tensor([[1, side, side]] * BATCH),
                  mm_token_type_ids=(input_ids == image_token).long())
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def _nemotron_h_text(layers, **extra):
    """A Nemotron-H decoder config of Mamba-2, MoE, attention and MoE blocks (the pattern repeated)."""
    pattern = ["linear_attention", "moe", "full_attention", "moe"]
    return _text(layers=layers, head_dim=16, layers_block_type=(pattern * layers)[:layers], moe_intermediate_size=32,
                 moe_shared_expert_intermediate_size=32, mlp_hidden_act="relu2", ssm_state_size=16, mamba_num_heads=8,
                 n_groups=2, mamba_head_dim=16, conv_kernel=4, expand=2, chunk_size=8, n_routed_experts=4,
                 num_experts_per_tok=2, **extra)


def nemotron_h_omni(layers=4):
    """NemotronH_Omni_Reasoning_V3: a RADIO tower (class and register tokens dropped), 8 x 8 patches pixel-shuffled to
    16 tokens; a hybrid decoder of Mamba-2, attention and MoE blocks (three kinds), ``[bos, image x 16, text]``."""
    from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config

    image_token, side = 10, 8
    vision = _vit(dict, mlp_ratio=2.0, patch_size=PATCH, image_size=side * PATCH, max_img_size=64, num_cls_tokens=2,
                  num_registers=1, video_temporal_patch_size=2)
    cfg = NemotronH_Omni_Reasoning_V3_Config(vision_config=vision, text_config=_nemotron_h_text(layers),
                                             audio_config=None, vision_hidden_size=32, projector_hidden_size=64,
                                             downsample_ratio=0.5, image_token_id=image_token, video_token_id=11)
    model = _seeded(NemotronH_Omni_Reasoning_V3, cfg)
    tokens = (side // 2) ** 2
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * side * side, 3 * PATCH * PATCH),
                  image_grid_hw=torch.tensor([[side, side]] * BATCH), attention_mask=mask, labels=labels)
    blocks = _blocks(layers, "language_model.model.layers")
    return _finish(model, inputs, Expected(blocks, "scatter", tokens, image_token))


# -------------------------------------------------------------------------------- (i) audio-language families
# A clip is CLIP_FRAMES mel frames of MEL bins; its audio tokens are one run of placeholders in time order (a 1-D
# layout). ``tokens_per_image`` counts one clip's tokens.
MEL, CLIP_FRAMES = 16, 64


def _audio_rows(model, prompt, features, tokens, audio_token, blocks, **extra):
    """Finish an audio build whose rows all hold ``prompt``: ``input_features`` (one clip per row), then the ``extra``
    inputs; a scatter boundary of ``tokens`` per clip at ``audio_token``."""
    input_ids, mask, labels = _batch([prompt] * BATCH)
    inputs = dict(input_ids=input_ids, input_features=features, attention_mask=mask, labels=labels, **extra)
    return _finish(model, inputs, Expected(blocks, "scatter", tokens, audio_token))


def _whisper_encoder(**extra):
    """A tiny Whisper-style audio encoder config (2 layers, width 32) over MEL bins, CLIP_FRAMES frames."""
    return _vit(dict, num_mel_bins=MEL, max_source_positions=CLIP_FRAMES // 2, **extra)


def qwen2_audio(layers=3):
    """Qwen2AudioForConditionalGeneration: Whisper encoder, stride-2 conv then 2x average pooling (64 frames -> 16
    tokens), ``[bos, audio_bos, AUDIO x 16, audio_eos, text]``."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    audio_token, bos, eos, tokens = 4, 5, 6, CLIP_FRAMES // 4
    audio = dict(num_mel_bins=MEL, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 max_source_positions=CLIP_FRAMES // 2)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=_text(layers=layers, model_type="qwen2"),
                           audio_token_index=audio_token)
    model = _seeded(Qwen2AudioForConditionalGeneration, cfg)
    return _audio_rows(model, [BOS, bos] + [audio_token] * tokens + [eos], _pixels(BATCH, MEL, CLIP_FRAMES), tokens,
                       audio_token, _blocks(layers), feature_attention_mask=torch.ones(BATCH, CLIP_FRAMES,
                                                                                       dtype=torch.long))


def voxtral(layers=3):
    """VoxtralForConditionalGeneration: Whisper encoder (stride-2 conv), every 4 frames concatenated and projected
    (64 frames -> 8 tokens), ``[bos, BEGIN_AUDIO, AUDIO x 8, text]``, Llama text."""
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration

    audio_token, begin, tokens = 4, 5, CLIP_FRAMES // 8
    audio = _whisper_encoder(intermediate_size=4 * 32)  # the projector reads 4 frames of width 32 at a time
    cfg = VoxtralConfig(audio_config=audio, text_config=_text(layers=layers, head_dim=16), audio_token_id=audio_token)
    model = _seeded(VoxtralForConditionalGeneration, cfg)
    return _audio_rows(model, [BOS, begin] + [audio_token] * tokens, _pixels(BATCH, MEL, CLIP_FRAMES), tokens,
                       audio_token, _blocks(layers))


def _flamingo(config_cls, model_cls, layers, prompt_ids, **cfg_extra):
    """Audio Flamingo 3 / Music Flamingo: Whisper encoder, stride-2 conv then 2x average pooling (64 frames -> 16
    tokens), ``input_features_mask`` marks the real frames, Qwen2 text; ``prompt_ids(tokens)`` lays out a row."""
    audio_token, tokens = 4, CLIP_FRAMES // 4
    audio = _whisper_encoder(model_type="audioflamingo3_encoder")  # Music Flamingo reads the type from the dict
    cfg = config_cls(audio_config=audio, text_config=_text(layers=layers, model_type="qwen2"),
                     audio_token_id=audio_token, **cfg_extra)
    model = _seeded(model_cls, cfg)
    return _audio_rows(model, prompt_ids(audio_token, tokens), _pixels(BATCH, MEL, CLIP_FRAMES), tokens, audio_token,
                       _blocks(layers), input_features_mask=torch.ones(BATCH, CLIP_FRAMES, dtype=torch.long))


def audioflamingo3(layers=3):
    """AudioFlamingo3ForConditionalGeneration: ``[bos, <sound> x 16, text]``."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    return _flamingo(AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration, layers,
                     lambda audio, n: [BOS] + [audio] * n)


def musicflamingo(layers=3):
    """MusicFlamingoForConditionalGeneration: Audio Flamingo 3 with rotary time embeddings on the audio features and
    ``[bos, sound_bos, <sound> x 16, sound_eos, text]``."""
    from transformers import MusicFlamingoConfig, MusicFlamingoForConditionalGeneration

    return _flamingo(MusicFlamingoConfig, MusicFlamingoForConditionalGeneration, layers,
                     lambda audio, n: [BOS, 5] + [audio] * n + [6], audio_bos_token_id=5, audio_eos_token_id=6)


def glmasr(layers=3):
    """GlmAsrForConditionalGeneration: a rotary Whisper-style encoder (a stride-2 conv), every 4 frames concatenated
    and projected (64 frames -> 8 tokens), ``[bos, <|pad|> x 8, text]``, Llama text."""
    from transformers import GlmAsrConfig, GlmAsrForConditionalGeneration

    audio_token, tokens = 4, CLIP_FRAMES // 8
    audio = _vit(dict, num_mel_bins=MEL, intermediate_size=4 * 32, max_position_embeddings=CLIP_FRAMES,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    cfg = GlmAsrConfig(audio_config=audio, text_config=_text(layers=layers, head_dim=16), audio_token_id=audio_token)
    model = _seeded(GlmAsrForConditionalGeneration, cfg)
    return _audio_rows(model, [BOS] + [audio_token] * tokens, _pixels(BATCH, MEL, CLIP_FRAMES), tokens, audio_token,
                       _blocks(layers), input_features_mask=torch.ones(BATCH, CLIP_FRAMES, dtype=torch.long))


def qwen3_asr(layers=3):
    """Qwen3ASRForConditionalGeneration: the encoder reads windows of 100 frames (three stride-2 convs: 13 tokens per
    window), ``[bos, audio_bos, audio x 13, audio_eos, text]``, Qwen3 text."""
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    audio_token, bos, eos, frames, tokens = 4, 5, 6, 100, 13
    audio = dict(num_mel_bins=MEL, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=64, downsample_hidden_size=16)
    cfg = Qwen3ASRConfig(audio_config=audio, text_config=_text(layers=layers, model_type="qwen3", head_dim=16),
                         audio_token_id=audio_token, timestamp_token_id=7, pad_token_id=0, eos_token_id=2)
    model = _seeded(Qwen3ASRForConditionalGeneration, cfg)
    return _audio_rows(model, [BOS, bos] + [audio_token] * tokens + [eos], _pixels(BATCH, MEL, frames), tokens,
                       audio_token, _blocks(layers), input_features_mask=torch.ones(BATCH, frames, dtype=torch.long))


def granite_speech(layers=3):
    """GraniteSpeechForConditionalGeneration: a conformer over stacked frames, a Q-Former reading windows of 15 frames
    with 3 queries each (30 frames -> 6 tokens); the placeholder ids are replaced by 0 before the embedding lookup;
    ``[bos, <|audio|> x 6, text]``, Granite text."""
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    return _granite_speech(GraniteSpeechConfig, GraniteSpeechForConditionalGeneration, layers)


def _granite_speech(config_cls, model_cls, layers, encoder_width=32, **encoder_extra):
    """Granite Speech and its variants: the Q-Former reads ``encoder_width`` features per frame."""
    audio_token, frames, tokens = 4, 30, 6
    encoder = dict(input_dim=MEL, num_layers=2, hidden_dim=32, num_heads=4, output_dim=8, context_size=15,
                   dropout=0.0, **encoder_extra)
    projector = dict(hidden_size=32, encoder_hidden_size=encoder_width, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, cross_attention_frequency=1, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg = config_cls(text_config=_text(layers=layers, model_type="granite"), encoder_config=encoder,
                     projector_config=projector, audio_token_index=audio_token, has_lora_adapter=False)
    model = _seeded(model_cls, cfg)
    return _audio_rows(model, [BOS] + [audio_token] * tokens, _pixels(BATCH, frames, MEL), tokens, audio_token,
                       _blocks(layers), input_features_mask=torch.ones(BATCH, tokens, dtype=torch.bool))


def _omni_thinker(config_cls, model_cls, layers, text, audio, frames, tokens):
    """A Qwen-Omni thinker on a clip: ``[bos, audio_start, audio x tokens, audio_end, text]`` (audio id 10, start 11,
    end 12), audio positions on M-RoPE's time axis; the vision tower is built but unused."""
    audio_token, start, end = 10, 11, 12
    vision = _qwen_vision(num_position_embeddings=64)
    cfg = config_cls(audio_config=audio, vision_config=vision, text_config=text, audio_token_id=audio_token,
                     image_token_id=13, video_token_id=14, audio_start_token_id=start, audio_end_token_id=end,
                     vision_start_token_id=15, vision_end_token_id=16, user_token_id=17, position_id_per_seconds=25)
    model = _seeded(model_cls, cfg)
    return _audio_rows(model, [BOS, start] + [audio_token] * tokens + [end], _pixels(BATCH, MEL, frames), tokens,
                       audio_token, _blocks(layers), feature_attention_mask=torch.ones(BATCH, frames,
                                                                                       dtype=torch.long))


def qwen2_5_omni_thinker(layers=3):
    """Qwen2_5OmniThinkerForConditionalGeneration on a clip: Whisper-style encoder over windows, stride-2 conv then 2x
    average pooling (64 frames -> 16 tokens), Qwen2 text with M-RoPE."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    audio = dict(num_mel_bins=MEL, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 n_window=100, output_dim=64, max_source_positions=CLIP_FRAMES // 2)
    text = _text(layers=layers, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    return _omni_thinker(Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration, layers, text, audio,
                         CLIP_FRAMES, CLIP_FRAMES // 4)


def qwen3_omni_moe_thinker(layers=3):
    """Qwen3OmniMoeThinkerForConditionalGeneration on a clip: the encoder reads windows of 100 frames (three stride-2
    convs: 13 tokens), MoE text blocks (4 experts, top 2) with interleaved M-RoPE."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    audio = dict(num_mel_bins=MEL, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=64, downsample_hidden_size=16)
    text = _text(layers=layers, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 decoder_sparse_step=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    return _omni_thinker(Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration, layers, text, audio,
                         100, 13)


def phi4_multimodal_audio(layers=3):
    """Phi4MultimodalForCausalLM, a clip: a conformer with 8x time reduction (61 frames of 80 bins -> 8 tokens),
    ``[bos, <|audio|> x 8, text]``, written by ``index_put``."""
    model = _phi4_multimodal(layers)
    tokens = 8
    input_ids, mask, labels = _batch([[BOS] + [11] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, audio_input_features=_pixels(BATCH, 61, 80),
                  audio_embed_sizes=torch.tensor([tokens] * BATCH), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers, "model.layers"), "scatter", tokens, 11))


# ------------------------------------------------------------------------------------------------- (j) video
# A clip of 4 frames: TEMPORAL (2) frames per patch, so 2 frame groups of 4 x 4 patches, each merged to 4 tokens;
# each group is its own run of placeholders after its timestamp ("<0.5 seconds>": two text ids here).
VIDEO_GRID = (2, 4, 4)
TIMESTAMP = [40, 41]


def _video_inputs(frame, video_token, prefix=(), suffix=()):
    """Inputs for one clip per row: ``prefix + frame(i) for each frame group + suffix`` after a bos, where ``frame(i)``
    lays out group i around ``video_token`` placeholders; flat pixel patches, ``video_grid_thw`` and
    ``mm_token_type_ids`` (2 on the video placeholders). Returns the inputs and the tokens of one frame group."""
    t, h, w = VIDEO_GRID
    tokens = h * w // MERGE ** 2
    prompt = [BOS, *prefix] + [i for group in range(t) for i in frame([video_token] * tokens)] + list(suffix)
    input_ids, mask, labels = _batch([prompt] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values_videos=_pixels(BATCH * t * h * w, 3 * TEMPORAL * PATCH * PATCH),
                  video_grid_thw=torch.tensor([VIDEO_GRID] * BATCH), attention_mask=mask, labels=labels,
                  mm_token_type_ids=(input_ids == video_token).long() * 2)
    return inputs, tokens


def _qwen3_video(config_cls, model_cls, text, vision, layers):
    """A Qwen3-VL-style video build: ``<t seconds> <vision_start> video x 4 <vision_end>`` per frame group."""
    video, start, end = 6, 3, 4
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=5, video_token_id=video,
                     vision_start_token_id=start, vision_end_token_id=end)
    model = _seeded(model_cls, cfg)
    inputs, tokens = _video_inputs(lambda run: TIMESTAMP + [start] + run + [end], video)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, video))


def qwen3_5_video(layers=4):
    """Qwen3_5ForConditionalGeneration on a clip: each frame group after its timestamp, M-RoPE positions per group."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    return _qwen3_video(Qwen3_5Config, Qwen3_5ForConditionalGeneration, _qwen3_5_text(layers),
                        _qwen_vision(num_position_embeddings=64), layers)


def cosmos3_omni(layers=3):
    """Cosmos3OmniForConditionalGeneration on a clip: Qwen3-VL's tower with DeepStack taps and text decoder, the
    video layout of Qwen3-VL."""
    from transformers import Cosmos3OmniConfig, Cosmos3OmniForConditionalGeneration

    text = _text(layers=layers, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = _qwen_vision(num_position_embeddings=64, deepstack_visual_indexes=[0])
    return _qwen3_video(Cosmos3OmniConfig, Cosmos3OmniForConditionalGeneration, text, vision, layers)


def glm46v_video(layers=3):
    """Glm46VForConditionalGeneration on a clip: ``<begin_of_video>``, then per frame group ``<begin_of_image> image x 4
    <end_of_image> <t seconds>``, ``<end_of_video>``; frames use the image placeholder id."""
    from transformers import Glm46VConfig, Glm46VForConditionalGeneration

    image_token, image_start, image_end, video_start, video_end = 7, 5, 6, 3, 4
    text = _text(layers=layers, model_type="glm4v_text", rope_parameters=GLM_ROPE)
    cfg = Glm46VConfig(text_config=text, vision_config=_qwen_vision(model_type="glm4v_vision", image_size=16),
                       image_token_id=image_token, video_token_id=8, image_start_token_id=image_start,
                       image_end_token_id=image_end, video_start_token_id=video_start, video_end_token_id=video_end)
    model = _seeded(Glm46VForConditionalGeneration, cfg)
    inputs, tokens = _video_inputs(lambda run: [image_start] + run + [image_end] + TIMESTAMP, image_token,
                                   prefix=[video_start], suffix=[video_end])
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


# --------------------------------------------------------------- (k) more vision-language families (transformers 5.x)
def apertus1p5(layers=3):
    """Apertus1p5ForConditionalGeneration: an EMU3.5 VQ tokenizer turns each image (cropped to ``image_sizes``) into
    4 x 4 discrete codes, embedded by the text table and written at the placeholders; the processor's
    ``<boi> 4*4 <wrapper>``, then the rows of placeholders joined by end-of-row tokens, ``<eoi>``. The audio tokenizer
    (WavTokenizer) is built but given no clip."""
    from transformers import Apertus1p5Config, Apertus1p5ForConditionalGeneration

    image_token, boi, eoi, wrapper, eol, first_code_id = 3, 4, 5, 6, 7, 100
    size, codes, side = 16, 16, 4  # 16 px, spatial factor 4 (channel_multiplier [1, 2, 1]) -> 4 x 4 codes
    header = [boi, 30, 31, 30, wrapper]  # "<boi>4*4<wrapper>": the grid written as text
    text = _text(layers=layers, model_type="apertus1p5_text", hidden_act="gelu", pad_token_id=0, bos_token_id=BOS,
                 eos_token_id=2)
    vision = dict(codebook_size=codes, base_channels=32, channel_multiplier=[1, 2, 1], num_res_blocks=1, embed_dim=8,
                  latent_channels=8, attn_resolutions=[], resolution=size)
    audio = dict(model_type="wavtokenizer_encoder", num_filters=8, upsampling_ratios=[2, 2], hidden_size=32,
                 codebook_dim=32, codebook_size=12, decoder_hidden_size=32, decoder_intermediate_size=64,
                 decoder_num_layers=2)
    # visual codes take ids 100..115, audio codes 116..127: the vocabulary's end
    cfg = Apertus1p5Config(text_config=text, vision_config=vision, audio_config=audio, image_token_id=image_token,
                           audio_token_id=8, image_token_offset=first_code_id, audio_token_offset=first_code_id + codes)
    model = _seeded(Apertus1p5ForConditionalGeneration, cfg)
    prompt = [BOS] + header + _image_rows(side, side, image_token, eol, end=eoi)
    return _same_rows(model, prompt, (3, size, size), _blocks(layers), side * side, image_token,
                      image_sizes=torch.tensor([[size, size]] * BATCH))


def cohere_compass(layers=3):
    """CohereCompassForConditionalGeneration: Qwen3-VL's tower (DeepStack taps after vision block 0) and layout over
    a Cohere2 decoder (parallel attention and MLP), two sliding blocks with interleaved M-RoPE, then a full attention
    block without positions (``rope_parameters`` per block kind, ``None`` for NoPE)."""
    from transformers import CohereCompassConfig, CohereCompassForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = _text(layers=layers, head_dim=16, sliding_window=8,
                 layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                 rope_parameters={"sliding_attention": rope, "full_attention": None})
    vision = _qwen_vision(num_position_embeddings=64, deepstack_visual_indexes=[0])
    return _qwen_vl(CohereCompassConfig, CohereCompassForConditionalGeneration, text, vision, SAME_GRIDS)


def exaone4_5(layers=4):
    """Exaone4_5_ForConditionalGeneration: Qwen2.5-VL's windowed tower with grouped-query attention (2D RoPE), over an
    EXAONE-4 decoder of three sliding blocks then a full one (``LLLG``), 1-D positions;
    ``[vision_start, image x N, vision_end]`` (no ``mm_token_type_ids``)."""
    from transformers import Exaone4_5_Config, Exaone4_5_ForConditionalGeneration

    image, start, end = 5, 3, 4
    text = _text(layers=layers, model_type="exaone4", head_dim=16, sliding_window=8, sliding_window_pattern=4)
    vision = _qwen_vision(num_key_value_heads=2, window_size=16, fullatt_block_indexes=[1])
    cfg = Exaone4_5_Config(text_config=text, vision_config=vision, image_token_id=image, video_token_id=6)
    model = _seeded(Exaone4_5_ForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image, start, end)
    del inputs["mm_token_type_ids"]
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image))


def mistral_large4(layers=4):
    """MistralLarge4ForConditionalGeneration: Mistral3's Pixtral tower, 2 x 2 patch merger and image rows, over a
    decoder of latent attention restricted by an indexer (blocks 0, 1, 3 select, block 2 reuses the selection before
    it: each block returns its selection for the next), block 2 attending to block 1's latent keys and values (a
    shared store), block 3 without RoPE, a dense MLP in block 0, then MoE; logits soft-capped."""
    from transformers import MistralLarge4Config, MistralLarge4ForConditionalGeneration

    text = _text(layers=layers, model_type="mistral_large4_text", num_key_value_heads=4, kv_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, index_topk=8, index_head_dim=16, index_n_heads=2, index_topk_freq=2,
                 kv_source_layers=[0, 1, 1, 3], max_position_embeddings=512 * 2048)  # YaRN's default: 2048 x 512
    return _pixtral_rows(MistralLarge4Config, MistralLarge4ForConditionalGeneration, text, layers)


def hyperclovax_vision_v2(layers=3):
    """HyperCLOVAXVisionV2ForConditionalGeneration: Qwen2.5-VL's windowed tower and a linear projector over a
    HyperCLOVA X decoder (norms after attention and MLP as well as before, scaled embeddings, residuals and logits);
    1-D positions, ``[vision_start, image x N, vision_end]``."""
    from transformers import HyperCLOVAXVisionV2Config, HyperCLOVAXVisionV2ForConditionalGeneration

    image, start, end = 5, 3, 4
    text = _text(layers=layers, model_type="hyperclovax", head_dim=16, embedding_multiplier=2.0,
                 residual_multiplier=0.5, logits_scaling=0.5, attention_multiplier=0.25)
    vision = _qwen_vision(model_type="qwen2_5_vl_vision", window_size=16, fullatt_block_indexes=[1])
    cfg = HyperCLOVAXVisionV2Config(text_config=text, vision_config=vision, image_token_id=image, video_token_id=6)
    model = _seeded(HyperCLOVAXVisionV2ForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image, start, end)
    del inputs["mm_token_type_ids"]
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image))


def qianfan_ocr(layers=3, tiles=3):
    """QianfanOCRForConditionalGeneration: InternVL's layout (8 x 8 patches, CLS dropped, pixel-shuffled to 16 per
    tile) with stochastic depth in the tower and a Qwen3 decoder; a document image is ``tiles`` tiles (two crops and
    a thumbnail), all in one run ``<img> IMG_CONTEXT x 16 * tiles </img>``."""
    from transformers import QianfanOCRConfig, QianfanOCRForConditionalGeneration

    image_token, img_start, img_end, per_tile = 3, 4, 5, 16
    vision = _vit(dict, image_size=32, patch_size=4)
    text = _text(layers=layers, model_type="qwen3", head_dim=16, bos_token_id=BOS, eos_token_id=2)
    cfg = QianfanOCRConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                           image_seq_length=per_tile, downsample_ratio=0.5, vision_feature_layer=-1,
                           vision_feature_select_strategy="default")
    model = _seeded(QianfanOCRForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS, img_start] + [image_token] * per_tile * tiles + [img_end]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * tiles, 3, 32, 32), attention_mask=mask,
                  labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", per_tile, image_token))  # a tile an image


# ------------------------------------------------------- (l) vision-language families with their own layouts
def glm5_next(layers=5):
    """Glm5NextForConditionalGeneration: GLM-OCR's tower (a 2 x 2 conv downsample, then a clamped SwiGLU merger) over
    GLM-5.3-Flash's decoder: hyper-connections (4 residual streams), gated linear-attention blocks (KDA) and NoPE
    latent attention restricted by a pooled indexer (block 2 selects, block 3 reuses that selection), dense MLPs in
    blocks 0 and 1, then MoE: four kinds; GLM-4V's ``[image_start, image x 4, image_end]``."""
    from transformers import Glm5NextConfig, Glm5NextForConditionalGeneration

    text = _text(layers=layers, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
                 v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 index_topk=8, index_kpool=4, index_head_dim=16, index_n_heads=2, linear_num_heads=2,
                 linear_head_dim=16, linear_conv_kernel_dim=2, hc_sinkhorn_iters=3, pad_token_id=0,
                 layer_types=["linear_attention"] * 2 + ["indexed_attention"] * 2 + ["linear_attention"],
                 indexer_types=["full", "full", "full", "shared", "full"],
                 mlp_layer_types=["dense"] * 2 + ["sparse"] * 3)
    vision = _qwen_vision(projection_intermediate_size=64)
    return _glm_vl(Glm5NextConfig, Glm5NextForConditionalGeneration, text, vision)


def glm_image(layers=3):
    """GlmImageForConditionalGeneration (image-to-image): the tower's features of a source image are quantized by a
    VQ codebook into code ids 0..15 (the vocabulary's first ids), written into the token ids at the placeholders, then
    embedded; ``[image_start, image x 16, image_end]``, then the target's grid ``<sop> h w <eop>`` and a bos; each row's
    ``image_grid_thw`` lists its source image, then its target (``images_per_sample`` 2)."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    image_token, image_start, image_end, grid_bos, grid_eos, codes, side = 18, 16, 17, 10, 11, 16, 4
    text = _text(layers=layers, head_dim=16, rope_parameters=GLM_ROPE, vision_vocab_size=VOCAB, pad_token_id=0,
                 eos_token_id=image_end)
    vision = _vit(dict, depth=2, num_heads=4, patch_size=PATCH, image_size=side * PATCH, spatial_merge_size=1)
    vq = dict(embed_dim=8, num_embeddings=codes, latent_channels=32, in_channels=3)
    cfg = GlmImageConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token,
                         image_start_token_id=image_start, image_end_token_id=image_end)
    model = _seeded(GlmImageForConditionalGeneration, cfg)
    tokens = side * side
    prompt = [image_start] + [image_token] * tokens + [image_end, grid_bos, 30, 31, grid_eos, BOS]
    input_ids, mask, labels = _batch([prompt] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * tokens, 3 * PATCH * PATCH), attention_mask=mask,
                  labels=labels, image_grid_thw=torch.tensor([[1, side, side]] * 2 * BATCH),
                  images_per_sample=torch.tensor([2] * BATCH))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def qwen4_exp(layers=4):
    """Qwen4ExpForConditionalGeneration: Qwen3.5's tower and layout over a decoder with hyper-connections (4 residual
    streams flattened into the width), gated delta-net blocks, a per-layer embedding of hashed token n-grams injected
    in block 1 (indexed by the token ids), then attention restricted by a token indexer in block 3: three kinds."""
    from transformers import Qwen4ExpConfig, Qwen4ExpForConditionalGeneration

    text = _qwen3_5_text(layers, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                         num_experts_per_tok=2, hc_count=4, hc_lowrank=8, ple_layer_ids=[2], heads_per_ngram=2,
                         ngram_vocab_size_base=1000, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                         indexer_budget=8, indexer_compress_ratio=4, eos_token_id=2)
    return _qwen_vl(Qwen4ExpConfig, Qwen4ExpForConditionalGeneration, text, _qwen_vision(num_position_embeddings=64),
                    SAME_GRIDS)


def dots3_note(layers=4):
    """Dots3NoteForConditionalGeneration, images only: a NaViT-packed tower whose second block is a MoE (4 experts), a
    2 x 2 merger; a decoder of multi-head latent attention, full with an indexer (blocks 0, 1) and sliding (blocks 2,
    3), a dense MLP in block 0, then MoE: three kinds; 1-D positions, ``[bos, img_start, image x 4, img_end]``."""
    from transformers import Dots3NoteConfig, Dots3NoteForConditionalGeneration

    image, start, end = 10, 11, 12
    attention = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, head_dim=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=16)
    text = _text(layers=layers, **attention, **{f"swa_{key}": value for key, value in attention.items()},
                 swa_num_attention_heads=4, sliding_window_size=8, index_n_heads=2, index_head_dim=16, index_topk=8,
                 n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_experts_intermediate_size=32, first_k_dense_replace=1, pad_token_id=0, bos_token_id=BOS,
                 eos_token_id=2)
    vision = _vit(dict, moe_intermediate_size=32, num_channels=3, patch_size=PATCH, spatial_merge_size=MERGE,
                  pyramid_num_routed=[-1, 4], adapter_in_dim=32, adapter_out_dim=64, adapter_merge_size=MERGE)
    audio = _vit(dict, feature_size=MEL, downsample_hidden_size=4, adapter_input_size=32, adapter_out_dim=64,
                 max_position_embeddings=64)
    cfg = Dots3NoteConfig(text_config=text, vision_config=vision, audio_config=audio, image_token_id=image,
                          video_token_id=13, audio_token_id=14)
    model = _seeded(Dots3NoteForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image, start, end, bos=True, patch_shape=(3 * PATCH * PATCH,))
    del inputs["mm_token_type_ids"]  # 1-D positions: the model takes no token types
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image))


def unlimited_ocr(layers=3):
    """UnlimitedOcrForConditionalGeneration, the global view only: a SAM-style tower (32 px, patches of 2, two stride-2
    convs: a 4 x 4 map), a CLIP encoder over that map (its class token dropped), both concatenated and projected; each
    row of 4 features gets a newline feature and the view a separator (parameters): 4 x (4 + 1) + 1 = 21 placeholders.
    Decoder: a dense block, then MoE blocks, attention over a sliding window plus the prompt."""
    from transformers import UnlimitedOcrConfig, UnlimitedOcrForConditionalGeneration

    side = 4
    encoder = _vit(dict, hidden_size=64, intermediate_size=128, image_size=side, patch_size=1)
    return _sam_ocr(UnlimitedOcrConfig, UnlimitedOcrForConditionalGeneration, layers, 32, side * (side + 1) + 1, encoder,
                    sliding_window=8)


def muse_glimmer(layers=4):
    """MuseGlimmerForConditionalGeneration: a NaViT-packed tower with learned positions resampled per grid, window and
    full attention blocks, a 2 x 2 pixel shuffle, an adapter and a projection; the placeholder ids are replaced by 0
    before the (normed) embedding lookup. Decoder: sliding-window blocks with RoPE and a full-attention NoPE block,
    sandwich norms, soft-capped logits; 1-D positions, ``[bos, image_start, patch x 4, image_end]``."""
    from transformers import MuseGlimmerConfig, MuseGlimmerForConditionalGeneration

    image, start, end = 5, 3, 4
    text = _text(layers=layers, head_dim=16, sliding_window=8, pad_token_id=0, bos_token_id=BOS, eos_token_id=2)
    vision = _vit(dict, patch_size=PATCH, patch_temporal=TEMPORAL, merge_size=MERGE, pos_emb_height=4,
                  pos_emb_width=4, max_position_embeddings=16)
    cfg = MuseGlimmerConfig(text_config=text, vision_config=vision, image_token_id=image, video_token_id=6,
                            out_hidden_size=32 * MERGE ** 2, projector_hidden_size=64)
    model = _seeded(MuseGlimmerForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image, start, end, bos=True)
    del inputs["mm_token_type_ids"]  # 1-D positions: the model takes no token types
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image))


# ------------------------------------------------------------------------------ (m) natively multimodal decoders
def inkling(layers=4):
    """InklingForConditionalGeneration: no ViT, each 4 x 4 patch (2 frames) folded to one token by an MLP tower
    (``pixel_values`` ``[patches, 2, 4, 4, 3]``, a 4 x 4 grid per image); blocks of short convolutions around sliding
    or full attention (a relative position bias of its own extent each), a dense MLP in the first block and MoE in the
    others, so only blocks 1 and 3 are alike; ``[bos, content_image, image x 16, text]``."""
    from transformers import InklingConfig, InklingForConditionalGeneration

    image_token, image_bos, patch, side = 3, 5, 4, 4
    tokens = side * side
    text = _text(layers=layers, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                 sliding_window_size=16, d_rel=4, rel_extent=64, pad_token_id=0,
                 layer_types=["hybrid_sliding", "hybrid"] * (layers // 2),
                 mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), moe_intermediate_size=32, n_routed_experts=4,
                 num_experts_per_tok=2, n_shared_experts=1)
    # 4 tower layers: one per fold of the 4 x 4 x 2 patch (fewer would need scipy to assign the folds)
    cfg = InklingConfig(text_config=text, vision_config=dict(patch_size=patch, num_hidden_layers=4),
                        audio_config=dict(n_mel_bins=4, mel_vocab_size=8), image_token_id=image_token,
                        audio_token_id=4, image_bos_token_id=image_bos)
    model = _seeded(InklingForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS, image_bos] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * tokens, 2, patch, patch, 3), attention_mask=mask,
                  labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def _inkling2(config_cls, model_cls, layers, layer_types, **text_extra):
    """An Inkling-2 build: a ViT (a class token per image, axial RoPE) whose 2 x 2 patches are concatenated into one
    token, ``pixel_values`` one ``[8, 8, 3]`` patch square per token and ``image_grid_thw`` in tokens (a 4 x 4 grid);
    blocks of sliding or full attention read an attention over the block states (the hidden states the decoder loop
    keeps at block boundaries) instead of a plain residual, MoE MLPs; ``[bos, content_image, image x 16, text]``."""
    image_token, image_bos, patch, merge, side = 3, 5, 4, 2, 4
    tokens = side * side
    text = _text(layers=layers, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                 sliding_window_size=16, d_rel=4, rel_extent=64, pad_token_id=0, unpadded_vocab_size=VOCAB,
                 layer_types=layer_types, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                 **text_extra)
    vision = _vit(dict, model_type="inkling2_vision", patch_size=patch, spatial_merge_size=merge,
                  posemb_grid_size=side * merge, projection_hidden_dim=64, text_hidden_size=64,
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    model = _seeded(model_cls, config_cls(text_config=text, vision_config=vision, image_token_id=image_token))
    input_ids, mask, labels = _batch([[BOS, image_bos] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * tokens, patch * merge, patch * merge, 3),
                  image_grid_thw=torch.tensor([[1, side, side]] * BATCH), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def inkling2(layers=4):
    """Inkling2ForConditionalGeneration: a block boundary every 2 blocks; the first block reads no block states, so
    only blocks 1 and 3 (sliding attention) are alike."""
    from transformers import Inkling2Config, Inkling2ForConditionalGeneration

    return _inkling2(Inkling2Config, Inkling2ForConditionalGeneration, layers,
                     ["hybrid_sliding", "hybrid_sliding", "hybrid", "hybrid_sliding"], n_layers_per_attn_res_block=2)


def inkling2_loop(layers=4):
    """Inkling2LoopForConditionalGeneration: Inkling-2 whose blocks 1 and 2 run twice, the second pass restarting
    from block 1's input and gating in messages read from the first pass's block states (a block boundary at every
    block)."""
    from transformers import Inkling2LoopConfig, Inkling2LoopForConditionalGeneration

    return _inkling2(Inkling2LoopConfig, Inkling2LoopForConditionalGeneration, layers,
                     ["hybrid_sliding"] * (layers - 1) + ["hybrid"], n_layers_per_attn_res_block=1,
                     loop_layer_index_start=1, loop_layer_index_end=3, loop_num_passes=2, loop_gate_rank=8)


def gemma4_unified(layers=4):
    """Gemma4UnifiedForConditionalGeneration: no vision tower, each 4 x 4 patch (``pixel_values`` ``[batch, 16, 48]``)
    embedded by LayerNorms, a linear layer and factorized (x, y) position embeddings, then projected; image ids
    replaced by the pad id before the lookup, KV sharing (layers 2, 3 reuse the K/V of 0, 1), bidirectional attention
    over the image; ``[bos, boi, image x 16, eoi, text]``, a 4 x 4 grid."""
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    patch, kernel, side = 2, 2, 4
    tokens = side * side
    text = _text(layers=layers, head_dim=16, global_head_dim=16, sliding_window=16,
                 layer_types=["sliding_attention", "full_attention"] * (layers // 2), num_kv_shared_layers=2,
                 use_bidirectional_attention="vision", pad_token_id=0, bos_token_id=BOS, eos_token_id=2)
    vision = dict(patch_size=patch, pooling_kernel_size=kernel, mm_embed_dim=32, mm_posemb_size=side,
                  output_proj_dims=32)
    return _gemma4_layout(Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration, text, vision, layers, side,
                          tokens, 3 * (patch * kernel) ** 2)


def muse_spark(layers=4):
    """MuseSparkForConditionalGeneration: a windowed ViT (axial RoPE, 4 x 4 patch windows, the last layer global)
    whose 2 x 2 patches are concatenated by a pixel shuffle, an MLP adapter, a projection and an RMSNorm; image ids set
    to 0 in place before the lookup; blocks with gated residuals, NoPE full attention in every fourth block from the
    last, a dense MLP in the first block and MoE (projected to its own width) in the others; ``[bos, image_start,
    image x 16, image_end, text]``, 8 x 8 patches of 2 frames per image."""
    from transformers import MuseSparkConfig, MuseSparkForConditionalGeneration

    image_token, start, end = 3, 4, 5
    patch, merge, side = 4, 2, 8
    tokens = (side // merge) ** 2
    text = _text(layers=layers, head_dim=16, sliding_window=16, mlp_layer_types=["dense"] + ["sparse"] * (layers - 1),
                 moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, moe_hidden_size=32,
                 pad_token_id=0, bos_token_id=BOS, eos_token_id=2)
    vision = _vit(dict, patch_size=patch, pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16,
                  merge_size=merge, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    audio = dict(patch_sizes=[2, 2], hidden_sizes=[8, 16], depths=[1, 1], num_hidden_layers=2, out_hidden_size=64)
    cfg = MuseSparkConfig(text_config=text, vision_config=vision, audio_config=audio, image_token_id=image_token,
                          video_token_id=6, audio_token_id=7, out_hidden_size=32 * merge ** 2,
                          projector_hidden_size=64)
    model = _seeded(MuseSparkForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS, start] + [image_token] * tokens + [end]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH * side * side, 3 * 2 * patch * patch),
                  image_grid_thw=torch.tensor([[1, side, side]] * BATCH), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def cosmos3_edge(layers=3):
    """Cosmos3EdgeForConditionalGeneration: a SigLIP2 tower on flat patches (learned positions resized to each grid),
    2 x 2 patches merged by an MLP, M-RoPE positions from ``mm_token_type_ids``; ``[vision_start, image x 4,
    vision_end, text]``."""
    from transformers import Cosmos3EdgeConfig, Cosmos3EdgeForConditionalGeneration

    image, start, end = 5, 3, 4
    text = _text(layers=layers, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [2, 3, 3]})
    vision = _vit(dict, patch_size=PATCH, num_patches=16, spatial_merge_size=MERGE)
    cfg = Cosmos3EdgeConfig(text_config=text, vision_config=vision, projector_hidden_size=64, image_token_id=image,
                            video_token_id=6, vision_start_token_id=start, vision_end_token_id=end)
    model = _seeded(Cosmos3EdgeForConditionalGeneration, cfg)
    inputs, tokens = _grid_inputs(SAME_GRIDS, image, start, end, patch_shape=(3 * PATCH * PATCH,))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image))


# ------------------------------------------------------------------------- (n) more audio-language families
def fun_asr_nano(layers=3):
    """FunAsrNanoForConditionalGeneration: a SAN-M encoder (attention with an FSMN memory) over low-frame-rate
    features (7 mel frames stacked per step), projected and passed through adaptor layers, one token per step (16
    steps -> 16 tokens), ``[bos, <|object_ref_start|> x 16, <|im_end|>, text]``, Qwen3 text."""
    from transformers import FunAsrNanoConfig, FunAsrNanoForConditionalGeneration

    audio_token, end, steps = 4, 5, 16
    audio = _vit(dict, model_type="fun_asr_nano_encoder", num_mel_bins=MEL, num_timestamp_prediction_layers=1,
                 fsmn_kernel_size=3, max_position_embeddings=CLIP_FRAMES, hidden_dropout=0.0, attention_dropout=0.0)
    adaptor = dict(hidden_size=64, intermediate_size=16, num_attention_heads=4, num_hidden_layers=1,
                   projector_hidden_size=64)
    cfg = FunAsrNanoConfig(audio_config=audio, adaptor_config=adaptor,
                           text_config=_text(layers=layers, model_type="qwen3", head_dim=16),
                           audio_token_id=audio_token)
    model = _seeded(FunAsrNanoForConditionalGeneration, cfg)
    features = _pixels(BATCH, steps, MEL * cfg.audio_config.num_stacked_frames)
    return _audio_rows(model, [BOS] + [audio_token] * steps + [end], features, steps, audio_token, _blocks(layers),
                       input_features_mask=torch.ones(BATCH, steps, dtype=torch.long))


def granite_speech_plus(layers=3):
    """GraniteSpeechPlusForConditionalGeneration: Granite Speech whose Q-Former reads the encoder's last features
    concatenated with those after its first conformer layer (width 2 x 32), ``[bos, <|audio|> x 6, text]``."""
    from transformers import GraniteSpeechPlusConfig, GraniteSpeechPlusForConditionalGeneration

    return _granite_speech(GraniteSpeechPlusConfig, GraniteSpeechPlusForConditionalGeneration, layers,
                           encoder_width=64, cat_hidden_layers=[1])


def moss_transcribe_diarize(layers=3):
    """MossTranscribeDiarizeForConditionalGeneration: a Whisper encoder over a window padded to 512 frames of which
    400 are real (``input_features_mask``), a stride-2 conv, the real frames kept and every 4 concatenated and projected
    (400 frames -> 50 tokens, 12.5 per second); the processor writes a time marker (the text "2", "4") after every 2
    seconds of placeholders: ``[bos, <|audio_start|>, <|audio_pad|> x 25, 2, <|audio_pad|> x 25, 4, <|audio_end|>,
    text]``, Qwen3 text. ``tokens_per_image`` counts the clip's two runs."""
    from transformers import MossTranscribeDiarizeConfig, MossTranscribeDiarizeForConditionalGeneration

    audio_token, start, end, two, four = 4, 5, 6, 50, 52
    window, frames, run = 512, 400, 25
    audio = _vit(dict, num_mel_bins=MEL, max_source_positions=window // 2)
    cfg = MossTranscribeDiarizeConfig(audio_config=audio, text_config=_text(layers=layers, head_dim=16),
                                      audio_token_id=audio_token)
    model = _seeded(MossTranscribeDiarizeForConditionalGeneration, cfg)
    prompt = [BOS, start] + [audio_token] * run + [two] + [audio_token] * run + [four, end]
    mask = (torch.arange(window) < frames).long().expand(BATCH, -1)
    return _audio_rows(model, prompt, _pixels(BATCH, MEL, window), 2 * run, audio_token, _blocks(layers),
                       input_features_mask=mask)


def nemotron3_5_transcribe(layers=4):
    """Nemotron3_5TranscribeForConditionalGeneration: a speech encoder over 8 stacked frames, run in chunks of 8
    encoder frames with 2 frames of context each side and written into one buffer, plus a speaker-diarization model on
    the same spectrogram whose speaker activities are embedded and added (128 frames -> 16 tokens); the placeholder id
    is past the vocabulary (looked up as 0), ``[bos, <|audio|> x 16, text]``, a Nemotron-H decoder."""
    from transformers import Nemotron3_5TranscribeConfig, Nemotron3_5TranscribeForConditionalGeneration

    frames, tokens, speakers = 128, 16, 4
    encoder = _vit(dict, num_mel_bins=MEL)
    diarization = dict(model_type="nemotron3_diarization", audio_config=encoder, chunk_length=8, chunk_left_context=2,
                       chunk_right_context=2, fifo_length=8, speaker_cache_update_period=8,
                       head_config=dict(hidden_size=16, num_speakers=speakers, audio_hidden_size=32),
                       streaming_config=dict(num_speakers=speakers, speaker_cache_length=2 * speakers))
    timestamps = _vit(dict, num_hidden_layers=1, vocab_size=16, blank_token_id=15)
    cfg = Nemotron3_5TranscribeConfig(audio_config=dict(asr_config=encoder, diarization_config=diarization),
                                      text_config=_nemotron_h_text(layers), word_timestamp_config=timestamps,
                                      audio_token_id=VOCAB)
    model = _seeded(Nemotron3_5TranscribeForConditionalGeneration, cfg)
    return _audio_rows(model, [BOS] + [VOCAB] * tokens, _pixels(BATCH, frames, MEL), tokens, VOCAB, _blocks(layers),
                       input_features_mask=torch.ones(BATCH, frames, dtype=torch.long))


def omniasr(layers=3):
    """OmniASRForConditionalGeneration: a wav2vec2-style encoder on the raw waveform (two strided convs: 170 samples ->
    16 frames, a convolutional position embedding), one token per frame; the prompt opens with the audio and closes
    with the bos the transcription follows: ``[<extra_id_1> x 16, <|lang:...|>, bos, text]``, Llama text."""
    from transformers import OmniASRConfig, OmniASRForConditionalGeneration

    audio_token, language, bos, samples, tokens = 4, 5, 0, 170, 16
    audio = _vit(dict, model_type="omniasr_audio", conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, hidden_dropout=0.0, layerdrop=0.0,
                 activation_dropout=0.0)
    cfg = OmniASRConfig(audio_config=audio, text_config=_text(layers=layers, head_dim=16), audio_token_id=audio_token)
    model = _seeded(OmniASRForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[audio_token] * tokens + [language, bos]] * BATCH)
    inputs = dict(input_ids=input_ids, input_values=_pixels(BATCH, 1, samples), attention_mask=mask, labels=labels,
                  padding_mask=torch.ones(BATCH, samples, dtype=torch.long))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, audio_token))


def vibevoice_asr(layers=3):
    """VibeVoiceAsrForConditionalGeneration: two frozen convolutional tokenizers (acoustic and semantic, run under
    ``no_grad``) on the raw waveform, in chunks of 64 samples with a streaming padding cache, 8 samples per latent
    (128 samples -> 16 tokens); noise is added to the acoustic latents (``sample``, the default); the two projected
    latents are summed, ``[bos, <|object_ref_start|>, <|box_start|> x 16, <|object_ref_end|>, text]``, Qwen2 text."""
    from transformers import VibeVoiceAsrConfig, VibeVoiceAsrForConditionalGeneration

    audio_token, start, end, samples, tokens = 4, 5, 6, 128, 16
    tokenizer = dict(model_type="vibevoice_acoustic_tokenizer_encoder", hidden_size=16, num_filters=8,
                     downsampling_ratios=[2, 4], depths=[1, 1, 1])
    cfg = VibeVoiceAsrConfig(acoustic_tokenizer_encoder_config=tokenizer,
                             semantic_tokenizer_encoder_config={**tokenizer, "hidden_size": 24},
                             text_config=_text(layers=layers, model_type="qwen2"), audio_token_id=audio_token,
                             audio_bos_token_id=start, audio_eos_token_id=end, acoustic_tokenizer_chunk_size=64)
    model = _seeded(VibeVoiceAsrForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS, start] + [audio_token] * tokens + [end]] * BATCH)
    inputs = dict(input_ids=input_ids, input_values=_pixels(BATCH, 1, samples), attention_mask=mask, labels=labels,
                  padding_mask=torch.ones(BATCH, samples, dtype=torch.bool))
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, audio_token))


def voxtral_realtime(layers=3):
    """VoxtralRealtimeForConditionalGeneration: a causal streaming encoder (stride-2 conv, every 4 frames concatenated
    and projected: 128 frames -> 16 positions) whose features are added onto every token embedding, one audio frame
    per position (no placeholders): ``[bos, streaming pad x 7 (left pad and 6 delay tokens), text]``, the delay as
    ``num_delay_tokens``; a Mistral decoder whose MLPs are scaled by a delay embedding. No position holds audio alone,
    so stsc refuses to compress it (layer skipping works)."""
    from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

    pad, delay, frames, positions = 3, 6, 128, 16
    audio = _vit(dict, num_mel_bins=MEL, head_dim=8, sliding_window=16, max_position_embeddings=CLIP_FRAMES)
    text = _text(layers=layers, model_type="voxtral_realtime_text", head_dim=16, sliding_window=32)
    cfg = VoxtralRealtimeConfig(audio_config=audio, text_config=text)
    model = _seeded(VoxtralRealtimeForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS] + [pad] * (1 + delay)] * BATCH, text_tokens=positions - 2 - delay)
    inputs = dict(input_ids=input_ids, input_features=_pixels(BATCH, MEL, frames), attention_mask=mask, labels=labels,
                  num_delay_tokens=delay)
    return _finish(model, inputs, Expected(_blocks(layers), "other", positions, None))


# ------------------------------------------------------ (o) video, vision-language-action and speech-dialogue families
def instructblipvideo(layers=3):
    """InstructBlipVideoForConditionalGeneration: InstructBLIP on a clip of 4 frames (the processor's fixed count), each
    frame's 8 queries back to back in one run, ``[video x 32, bos, text]``."""
    from transformers import (InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration,
                              InstructBlipVideoQFormerConfig, InstructBlipVideoVisionConfig)

    return _instructblip(InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration,
                         InstructBlipVideoVisionConfig, InstructBlipVideoQFormerConfig, layers, 6, 100, frames=4)


def video_llama_3(layers=3):
    """VideoLlama3ForConditionalGeneration on a clip of 2 frames (4 x 4 patches each, one frame per temporal patch,
    2 x 2 merged to 4 tokens): ``Time 0.0s:<video> x 4,Time 1.0s:<video> x 4`` after a bos (the timestamp is a text
    id here, the comma another), flat pixel patches, ``video_merge_sizes`` and the processor's token compression mask
    (every token kept); Qwen2 text, 1-D positions."""
    from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

    video_token, comma, (t, h, w) = 6, 7, VIDEO_GRID
    tokens = h * w // MERGE ** 2
    vision = _vit(dict, patch_size=PATCH, num_channels=3)
    cfg = VideoLlama3Config(text_config=_text(layers=layers), vision_config=vision, image_token_id=5,
                            video_token_id=video_token)
    model = _seeded(VideoLlama3ForConditionalGeneration, cfg)
    frames = [[40 + frame] + [video_token] * tokens for frame in range(t)]
    input_ids, mask, labels = _batch([[BOS] + frames[0] + [comma] + frames[1]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values_videos=_pixels(BATCH * t * h * w, 3 * PATCH * PATCH),
                  video_grid_thw=torch.tensor([VIDEO_GRID] * BATCH), video_merge_sizes=torch.tensor([MERGE] * BATCH),
                  video_compression_mask=torch.ones(BATCH * t * tokens, dtype=torch.bool), attention_mask=mask,
                  labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, video_token))


def _gemma(layers, **extra):
    """A tiny Gemma decoder config (as a dict), head width 16."""
    return _text(layers=layers, model_type="gemma", head_dim=16, **extra)


def _action_inputs(cameras, tokens, image_token, chunk, dim, state):
    """Inputs of a vision-language-action model (PI0-style) on ``cameras`` images per row: ``[<image> x tokens per
    camera, bos, task text]`` (the processor's prompt), a robot ``state`` input if ``state`` (PI0.5 writes it in the
    text), the target ``actions`` (the labels: a flow-matching loss on the action chunk), and fixed ``noise`` and
    ``timestep`` (drawn at random when left out)."""
    input_ids, mask, _ = _batch([[image_token] * tokens * cameras + [BOS]] * BATCH)
    gen = torch.Generator().manual_seed(3)
    return dict(**({"state": torch.randn(BATCH, dim, generator=gen)} if state else {}), input_ids=input_ids,
                pixel_values=_pixels(BATCH, cameras, 3, 32, 32),
                pixel_attention_mask=torch.ones(BATCH, cameras, dtype=torch.bool), attention_mask=mask,
                actions=torch.randn(BATCH, chunk, dim, generator=gen),
                noise=torch.randn(BATCH, chunk, dim, generator=gen), timestep=torch.tensor([0.3, 0.7]))


def _vla(config_cls, model_cls, layers, cameras=2, state=True):
    """A PI0-style build: a PaliGemma prefix (SigLIP tower, 16 tokens per camera, Gemma text) and a Gemma action expert
    of width 32 whose layer ``i`` attends to the prefix's keys and values of layer ``i``; chunks of 4 actions of 8."""
    image_token, tokens, chunk, dim = 3, 16, 4, 8
    vision = _vit(dict, model_type="siglip_vision_model", image_size=32, patch_size=8, vision_use_head=False)
    vlm = dict(model_type="paligemma", text_config=_gemma(layers), vision_config=vision, projection_dim=64,
               image_token_id=image_token)
    cfg = config_cls(vlm_config=vlm, dit_config=_gemma(layers, hidden_size=32, intermediate_size=64), chunk_size=chunk,
                     max_state_dim=dim, max_action_dim=dim)
    model = _seeded(model_cls, cfg)
    inputs = _action_inputs(cameras, tokens, image_token, chunk, dim, state)
    return _finish(model, inputs, Expected(_blocks(layers, "model.vlm.language_model.layers"), "scatter", tokens,
                                           image_token))


def pi0(layers=3):
    """PI0ForConditionalGeneration: two cameras per row, their placeholder runs back to back; the state is a token of
    the action expert's sequence."""
    from transformers import PI0Config, PI0ForConditionalGeneration

    return _vla(PI0Config, PI0ForConditionalGeneration, layers)


def pi05(layers=3):
    """PI05ForConditionalGeneration: as PI0, the state written in the prompt's text instead, the action expert's norms
    conditioned on the timestep (adaptive RMS norm)."""
    from transformers import PI05Config, PI05ForConditionalGeneration

    return _vla(PI05Config, PI05ForConditionalGeneration, layers, state=False)


BUILDERS = {
    # (a) one run of placeholders per image
    "llava": llava, "vipllava": vipllava, "paligemma": paligemma, "gemma3": gemma3, "gemma3_mixed": gemma3_mixed,
    "idefics3": idefics3, "smolvlm": smolvlm, "idefics2": idefics2, "internvl": internvl, "aya_vision": aya_vision,
    "cohere2_vision": cohere2_vision, "janus": janus, "deepseek_vl": deepseek_vl, "got_ocr2": got_ocr2,
    "perception_lm": perception_lm, "aria": aria, "fast_vlm": fast_vlm, "video_llava": video_llava, "blip2": blip2,
    "instructblip": instructblip, "ovis2": ovis2, "chameleon": chameleon, "emu3": emu3,
    # (b) positions given by a mask input
    "kosmos2": kosmos2,
    # (c) dynamic resolution
    "llava_next": llava_next, "llava_next_mixed": llava_next_mixed, "llava_onevision": llava_onevision,
    "llava_next_video": llava_next_video, "qwen2_vl": qwen2_vl, "qwen2_vl_mixed": qwen2_vl_mixed,
    "qwen2_5_vl": qwen2_5_vl, "qwen2_5_vl_mixed": qwen2_5_vl_mixed, "qwen3_vl": qwen3_vl, "qwen3_vl_moe": qwen3_vl_moe,
    "glm4v": glm4v, "paddleocr_vl": paddleocr_vl, "lighton_ocr": lighton_ocr,
    # (d) image rows separated by break tokens
    "mistral3": mistral3, "llava_pixtral": llava_pixtral, "fuyu": fuyu,
    # (e) mixed decoder stacks
    "llama4": llama4, "lfm2_vl": lfm2_vl, "gemma3n": gemma3n,
    # (f) cross-attention
    "mllama": mllama,
    # (h) 2026 vision-language families
    "glm46v": glm46v, "glm4v_moe": glm4v_moe, "glm_ocr": glm_ocr, "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe,
    "llava_onevision1_5": llava_onevision1_5, "hunyuan_vl": hunyuan_vl, "kimi_k25": kimi_k25,
    "lfm3_vl": lfm3_vl, "step3p7": step3p7, "gemma4": gemma4, "molmo2": molmo2,
    "granite4_vision": granite4_vision, "granite_docling": granite_docling,
    "deepseek_ocr2": deepseek_ocr2, "deepseek_vl_hybrid": deepseek_vl_hybrid,
    "ernie4_5_vl_moe": ernie4_5_vl_moe, "ovis2_5": ovis2_5, "minicpmv4_6": minicpmv4_6, "minicpm_ocr": minicpm_ocr,
    "minicpmv4_7": minicpmv4_7, "phi4_multimodal": phi4_multimodal,
    "minimax_m3_vl": minimax_m3_vl, "hy_v4_vl": hy_v4_vl, "nemotron_h_omni": nemotron_h_omni,
    # (i) audio-language families
    "qwen2_audio": qwen2_audio, "voxtral": voxtral, "audioflamingo3": audioflamingo3, "musicflamingo": musicflamingo,
    "glmasr": glmasr, "qwen3_asr": qwen3_asr, "granite_speech": granite_speech,
    "phi4_multimodal_audio": phi4_multimodal_audio, "qwen2_5_omni_thinker": qwen2_5_omni_thinker,
    "qwen3_omni_moe_thinker": qwen3_omni_moe_thinker,
    # (j) video
    "qwen3_5_video": qwen3_5_video, "cosmos3_omni": cosmos3_omni, "glm46v_video": glm46v_video,
    # (k) more vision-language families (transformers 5.x)
    "apertus1p5": apertus1p5, "cohere_compass": cohere_compass, "exaone4_5": exaone4_5,
    "mistral_large4": mistral_large4, "hyperclovax_vision_v2": hyperclovax_vision_v2,
    "qianfan_ocr": qianfan_ocr,
    # (l) vision-language families with their own layouts
    "glm5_next": glm5_next, "glm_image": glm_image, "qwen4_exp": qwen4_exp, "dots3_note": dots3_note,
    "unlimited_ocr": unlimited_ocr, "muse_glimmer": muse_glimmer,
    # (m) natively multimodal decoders
    "inkling": inkling, "inkling2": inkling2, "inkling2_loop": inkling2_loop,
    "gemma4_unified": gemma4_unified, "muse_spark": muse_spark,
    "cosmos3_edge": cosmos3_edge,
    # (n) more audio-language families
    "fun_asr_nano": fun_asr_nano, "granite_speech_plus": granite_speech_plus,
    "moss_transcribe_diarize": moss_transcribe_diarize, "nemotron3_5_transcribe": nemotron3_5_transcribe,
    "omniasr": omniasr, "vibevoice_asr": vibevoice_asr, "voxtral_realtime": voxtral_realtime,
    # (o) video, vision-language-action and speech-dialogue families
    "instructblipvideo": instructblipvideo, "video_llama_3": video_llama_3, "pi0": pi0, "pi05": pi05,
}
