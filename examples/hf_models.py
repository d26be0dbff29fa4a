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
    blip2, instructblip, ovis2, chameleon, emu3.
(b) Positions given by a mask input, over several distinct ids: kosmos2.
(c) Dynamic resolution, tokens per image from size or grid metadata: llava_next, llava_next_mixed, llava_onevision,
    llava_next_video, qwen2_vl, qwen2_vl_mixed, qwen2_5_vl, qwen2_5_vl_mixed, qwen3_vl, qwen3_vl_moe, glm4v,
    paddleocr_vl, lighton_ocr.
(d) Image rows separated by break tokens: mistral3, llava_pixtral, fuyu.
(e) Mixed decoder stacks (blocks of several kinds): llama4, lfm2_vl, gemma3n.
(f) Cross-attention to the image: mllama.
(g) Text only: llama_text_only (not in ``BUILDERS``).

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
TEXT_IDS = (20, 100)  # random text ids: clear of every special id below (< 20) and of image-code ids at 100 and up


@dataclass(frozen=True)
class Expected:
    blocks: list[str]
    boundary_kind: str
    tokens_per_image: int | list[int]
    placeholder_id: int | None


# ------------------------------------------------------------------------------------------------ shared helpers
def _text(hidden=64, layers=3, vocab=128, **extra):
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


def _per_image(counts):
    """``tokens_per_image``: one number when every image has the same count, else the list."""
    return counts[0] if len(set(counts)) == 1 else counts


def _seeded(model_cls, cfg):
    torch.manual_seed(0)
    return model_cls(cfg)


def _finish(model, inputs, expected):
    model.stsc_expected = expected
    return model.train(), inputs


# -------------------------------------------------------------------------------------- (a) one run per image
def llava(layers=3, batch=2):
    """LlavaForConditionalGeneration: CLIP tower (CLS dropped), ``[bos, image x 16, text]``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_token = 3
    cfg = LlavaConfig(vision_config=_clip(32, 8), text_config=LlamaConfig(**_text(layers=layers)),
                      image_token_id=image_token, vision_feature_layer=-1)
    model = _seeded(LlavaForConditionalGeneration, cfg)
    tokens = (32 // 8) ** 2  # the CLS token is dropped by the default feature selection
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * batch)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(batch, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def vipllava(layers=3):
    """VipLlavaForConditionalGeneration: features of two CLIP layers concatenated on the channel axis."""
    from transformers import LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    image_token, tokens = 3, 16
    text = LlamaConfig(**_text(layers=layers), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # several vision layers concatenated on the channel axis (the real default is (-2, -5, -8, -11, 6))
    cfg = VipLlavaConfig(vision_config=_clip(32, 8), text_config=text, image_token_index=image_token,
                         vision_feature_layer=[-2, -1], image_seq_length=tokens)
    model = _seeded(VipLlavaForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


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
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 1, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers, "model.text_model.layers"), "scatter", tokens, image_token))


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
    prompt = [BOS]
    for rc in row_col:
        prompt += [fake, rc] + [image_token] * per_tile
    prompt += [newline, newline, fake, glob] + [image_token] * per_tile + [fake]
    input_ids, mask, labels = _batch([prompt] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 3, size, size), attention_mask=mask,
                  labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers, "model.text_model.layers"), "scatter", per_tile,
                                           image_token))


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
    input_ids, mask, labels = _batch([prompt] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, subs, 3, size, size), attention_mask=mask,
                  labels=labels, pixel_attention_mask=torch.ones(BATCH, subs, size, size, dtype=torch.bool))
    return _finish(model, inputs, Expected(_blocks(layers, "model.text_model.layers"), "scatter", latents,
                                           image_token))


def internvl(layers=3):
    """InternVLForConditionalGeneration: 8 x 8 patches (CLS dropped) pixel-shuffled to 16, ``<img> image x 16 </img>``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    image_token, img_start, img_end, tokens = 3, 4, 5, 16
    vision = _vit(InternVLVisionConfig, image_size=32, patch_size=4)
    text = Qwen2Config(**_text(layers=layers), bos_token_id=1, eos_token_id=2)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token, image_seq_length=tokens,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _seeded(InternVLForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS, img_start] + [image_token] * tokens + [img_end]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def _cohere2_vision_family(config_cls, model_cls, layers, **extra):
    """AyaVision / Cohere2Vision: SigLIP 8 x 8 patches pixel-shuffled by 2 into 16 tokens, Cohere2 text (sliding
    window), ``[bos, start, image x 16, end, text]``."""
    from transformers import Cohere2Config, SiglipVisionConfig

    image_token, start, end, tokens = 3, 4, 5, 16
    text = Cohere2Config(**_text(layers=layers), sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = config_cls(vision_config=_vit(SiglipVisionConfig, image_size=32, patch_size=4), text_config=text,
                     downsample_factor=2, **extra)
    model = _seeded(model_cls, cfg)
    input_ids, mask, labels = _batch([[BOS, start] + [image_token] * tokens + [end]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


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
    input_ids, mask, labels = _batch([[BOS, boi] + [image_token] * tokens + [eoi]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def deepseek_vl(layers=3):
    """DeepseekVLForConditionalGeneration: SigLIP tower, ``[bos, image x 16, text]``."""
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, LlamaConfig, SiglipVisionConfig

    image_token, tokens = 3, 16
    text = LlamaConfig(**_text(layers=layers), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = DeepseekVLConfig(text_config=text, vision_config=_vit(SiglipVisionConfig, image_size=32, patch_size=8),
                           image_token_id=image_token)
    model = _seeded(DeepseekVLForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


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
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 64, 64), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


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
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 1, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def aria(layers=3):
    """AriaForConditionalGeneration: 16 learned queries cross-attend to the 64 patches; MoE decoder blocks."""
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaTextConfig, Idefics3VisionConfig

    image_token, tokens = 3, 16
    text = AriaTextConfig(**_text(layers=layers), moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = AriaConfig(vision_config=_vit(Idefics3VisionConfig, image_size=32, patch_size=4), text_config=text,
                     image_token_index=image_token, projector_patch_to_query_dict={64: tokens})
    model = _seeded(AriaForConditionalGeneration, cfg)
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


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
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


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
    input_ids, mask, labels = _batch([[BOS] + [image_token] * tokens] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels)
    return _finish(model, inputs, Expected(_blocks(layers), "scatter", tokens, image_token))


def _qformer(config_cls, **extra):
    """A Q-Former config of the tiny ViT's size that cross-attends in every layer, without dropout."""
    return _vit(config_cls, cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                **extra)


def _blip(config_cls, model_cls, vision_cls, qformer, text, bos, blocks, **extra_inputs):
    """BLIP-2 / InstructBLIP: a Q-Former of 8 learned queries, ``[image x 8, bos, text]`` (the processor's order)."""
    image_token, queries = 3, 8
    cfg = config_cls(vision_config=_vit(vision_cls, image_size=32, patch_size=8), qformer_config=qformer,
                     text_config=text, num_query_tokens=queries, image_token_index=image_token)
    model = _seeded(model_cls, cfg)
    with torch.no_grad():  # a fresh BLIP-2's query tokens are all zeros: give them random values
        model.query_tokens.normal_(std=0.5)
    input_ids, mask, labels = _batch([[image_token] * queries + [bos]] * BATCH)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(BATCH, 3, 32, 32), attention_mask=mask, labels=labels,
                  **extra_inputs)
    return _finish(model, inputs, Expected(blocks, "scatter", queries, image_token))
