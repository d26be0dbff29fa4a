"""Tiny random-weight builds of Hugging Face MLLM families, with matching forward inputs.

Each builder returns ``(model, inputs)`` and records what a correct analysis must find in
``model.stsc_expected`` (decoder block paths, boundary kind, visual tokens per image), so tests and
the examples read the truth from one place. transformers is a test-only dependency (``pip install
-e ".[test]"``): import this module only from tests and examples, never from ``stsc``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Expected:
    blocks: list[str]
    boundary_kind: str
    tokens_per_image: int
    placeholder_id: int | None


def _text(hidden=64, layers=3, vocab=128, **extra):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)


def _placeholder_batch(placeholder_id, tokens_per_image, batch=2, text_tokens=8, vocab=128, first_text_id=5):
    """``[bos, placeholders x N, text...]`` per sample, labels ignoring the prompt."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(first_text_id, vocab, (batch, text_tokens), generator=gen)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                           torch.full((batch, tokens_per_image), placeholder_id), text], dim=1)
    labels = input_ids.clone()
    labels[:, : 1 + tokens_per_image] = IGNORE_INDEX
    return input_ids, torch.ones_like(input_ids), labels


def _pixels(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _finish(model, inputs, expected):
    model.stsc_expected = expected
    return model.train(), inputs


def llava(layers=3, batch=2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_token = 3
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text(layers=layers)),
                      image_token_id=image_token, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    tokens = (32 // 8) ** 2  # the CLS token is dropped by the default feature selection
    input_ids, mask, labels = _placeholder_batch(image_token, tokens, batch=batch)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(batch, 3, 32, 32), attention_mask=mask, labels=labels)
    blocks = [f"model.language_model.layers.{i}" for i in range(layers)]
    return _finish(model, inputs, Expected(blocks, "scatter", tokens, image_token))


def paligemma(layers=3):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    image_token = 3
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=64)
    text = GemmaConfig(**_text(layers=layers), head_dim=16)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=image_token, projection_dim=64)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(cfg)
    tokens = (32 // 8) ** 2
    input_ids, mask, labels = _placeholder_batch(image_token, tokens)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[labels != IGNORE_INDEX] = 1
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(2, 3, 32, 32), attention_mask=mask, labels=labels,
                  token_type_ids=token_type_ids)
    blocks = [f"model.language_model.layers.{i}" for i in range(layers)]
    return _finish(model, inputs, Expected(blocks, "scatter", tokens, image_token))


def gemma3(layers=3):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    image_token, tokens = 3, 16  # 8 x 8 patches average-pooled to 4 x 4 by the projector
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=4)
    text = Gemma3TextConfig(**_text(layers=layers), head_dim=16, sliding_window=16)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens, image_token_index=image_token,
                       boi_token_index=5, eoi_token_index=6)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # a fresh Gemma3 projection weight is all zeros: give it random values
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.1)
    input_ids, mask, labels = _placeholder_batch(image_token, tokens, first_text_id=7)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(2, 3, 32, 32), attention_mask=mask, labels=labels,
                  token_type_ids=(input_ids == image_token).long())
    blocks = [f"model.language_model.layers.{i}" for i in range(layers)]
    return _finish(model, inputs, Expected(blocks, "scatter", tokens, image_token))


def idefics3(layers=3):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlamaConfig

    image_token, tokens = 3, (32 // 4) ** 2 // 4  # 8 x 8 patches, pixel-shuffled by 2 into 16 tokens
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=4)
    cfg = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**_text(layers=layers)),
                         image_token_id=image_token, scale_factor=2)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(cfg)
    input_ids, mask, labels = _placeholder_batch(image_token, tokens)
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(2, 1, 3, 32, 32), attention_mask=mask, labels=labels)
    blocks = [f"model.text_model.layers.{i}" for i in range(layers)]
    return _finish(model, inputs, Expected(blocks, "scatter", tokens, image_token))


def mllama(layers=4, cross_attention_layers=(1, 3)):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    image_token, tiles, image_size, patch = 4, 2, 16, 4
    text = _text(layers=layers, cross_attention_layers=list(cross_attention_layers), rope_scaling={"rope_type": "default"},
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text.update(model_type="mllama")
    vision = dict(image_size=image_size, patch_size=patch, num_channels=3, hidden_size=32, intermediate_layers_indices=[0],
                  vision_output_dim=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                  intermediate_size=64, max_num_tiles=tiles, supported_aspect_ratios=[[1, 1], [1, 2]])
    cfg = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image_token)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(cfg)
    with torch.no_grad():  # a fresh Mllama's tanh gates are 0: open them so cross-attention contributes
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.5)
    batch, seq = 2, 10
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 128, (batch, seq), generator=gen)
    input_ids[:, 1] = image_token
    labels = input_ids.clone()
    labels[:, :2] = IGNORE_INDEX
    inputs = dict(input_ids=input_ids, pixel_values=_pixels(batch, 1, tiles, 3, image_size, image_size),
                  aspect_ratio_ids=torch.full((batch, 1), 2), aspect_ratio_mask=torch.ones(batch, 1, tiles, dtype=torch.long),
                  cross_attention_mask=torch.ones(batch, seq, 1, tiles, dtype=torch.long),
                  attention_mask=torch.ones_like(input_ids), labels=labels)
    # one image = all its tiles; each tile gives its patches plus a class token
    tokens = tiles * ((image_size // patch) ** 2 + 1)
    blocks = [f"model.language_model.layers.{i}" for i in range(layers)]
    return _finish(model, inputs, Expected(blocks, "cross_attention", tokens, None))


def qwen2_vl(layers=3):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    image_token, vision_start, vision_end = 5, 3, 4
    patch, merge, temporal = 4, 2, 2
    grid_t, grid_h, grid_w = 1, 4, 4
    text = _text(layers=layers, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    text.update(model_type="qwen2_vl", bos_token_id=1, eos_token_id=2)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=patch, spatial_merge_size=merge,
                  temporal_patch_size=temporal, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image_token,
                        vision_start_token_id=vision_start, vision_end_token_id=vision_end)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg)
    batch = 2
    tokens = grid_t * grid_h * grid_w // (merge * merge)
    gen = torch.Generator().manual_seed(0)
    text_ids = torch.randint(6, 128, (batch, 8), generator=gen)
    input_ids = torch.cat([torch.full((batch, 1), vision_start), torch.full((batch, tokens), image_token),
                           torch.full((batch, 1), vision_end), text_ids], dim=1)
    labels = input_ids.clone()
    labels[:, : tokens + 2] = IGNORE_INDEX
    patches = grid_t * grid_h * grid_w
    pixel_values = _pixels(batch * patches, 3 * temporal * patch * patch)
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                  labels=labels, image_grid_thw=torch.tensor([[grid_t, grid_h, grid_w]] * batch),
                  mm_token_type_ids=(input_ids == image_token).long())
    blocks = [f"model.language_model.layers.{i}" for i in range(layers)]
    return _finish(model, inputs, Expected(blocks, "scatter", tokens, image_token))


def llama_text_only(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_text(layers=layers)))
    input_ids = torch.randint(5, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids.clone())
    return _finish(model, inputs, Expected([f"model.layers.{i}" for i in range(layers)], "none", 0, None))


BUILDERS = {"llava": llava, "paligemma": paligemma, "gemma3": gemma3, "idefics3": idefics3, "mllama": mllama, "qwen2_vl": qwen2_vl}
