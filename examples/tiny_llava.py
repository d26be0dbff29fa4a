"""A tiny LLaVA-style multimodal LLM in plain PyTorch: the example stsc runs on by default.

    pixels -> ViT encoder -> MLP projector -> visual tokens placed into the text sequence
           -> LLaMA-style decoder (RMSNorm, rotary attention, SwiGLU) -> LM head -> loss

Visual tokens enter the sequence in one of two ways, as real code bases do:

* ``merge="scatter"`` (Hugging Face style, the default): ``input_ids`` holds one placeholder token
  (``IMAGE_TOKEN_ID``) per visual token and the projected features are written into those positions
  with ``masked_scatter``.
* ``merge="concat"`` (prefix style): the features are concatenated in front of the text embeddings,
  and the attention mask and labels are extended inside the model to match.

The file exposes what ``stsc inspect`` / ``stsc transform`` look for: ``build_model()`` and
``example_inputs()`` (a dict of forward keyword arguments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_TOKEN_ID = 3
IGNORE_INDEX = -100


class TinyLlavaConfig:
    """Sizes of the example model. Defaults run a train step in milliseconds on a CPU."""

    def __init__(self, *, image_size=32, patch_size=4, channels=3, vision_dim=64, vision_layers=2,
                 vision_heads=4, hidden_size=64, layers=4, heads=4, intermediate_size=172,
                 vocab_size=128, max_positions=1024, rope_theta=10000.0, merge="scatter"):
        if merge not in ("scatter", "concat"):
            raise ValueError(f"merge must be 'scatter' or 'concat', got {merge!r}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.vision_dim, self.vision_layers, self.vision_heads = vision_dim, vision_layers, vision_heads
        self.hidden_size, self.layers, self.heads = hidden_size, layers, heads
        self.intermediate_size, self.vocab_size = intermediate_size, vocab_size
        self.max_positions, self.rope_theta, self.merge = max_positions, rope_theta, merge

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid


# ----------------------------------------------------------------------------------------- vision
class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: TinyLlavaConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.vision_dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.tokens_per_image, cfg.vision_dim) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(cfg.vision_dim, cfg.vision_heads) for _ in range(cfg.vision_layers))
        self.norm = nn.LayerNorm(cfg.vision_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    def __init__(self, vision_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# ---------------------------------------------------------------------------------------- decoder
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TinyLlavaConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.heads
        self.attn_norm = RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        b, s, d = hidden.shape
        x = self.attn_norm(hidden)
        q, k, v = (proj(x).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        hidden = hidden + self.o_proj(attn.transpose(1, 2).reshape(b, s, d))
        x = self.mlp_norm(hidden)
        return hidden + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Decoder(nn.Module):
    def __init__(self, cfg: TinyLlavaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden_size)
        head_dim = cfg.hidden_size // cfg.heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = inputs_embeds.shape
        positions = torch.arange(s, device=inputs_embeds.device).float()
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None].to(inputs_embeds.dtype), emb.sin()[None, None].to(inputs_embeds.dtype)
        causal = torch.ones(s, s, dtype=torch.bool, device=inputs_embeds.device).tril()
        attn_mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attn_mask)
        return self.norm(hidden)


# ------------------------------------------------------------------------------------------ model
class TinyLlava(nn.Module):
    def __init__(self, cfg: TinyLlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision = VisionEncoder(cfg)
        self.projector = Projector(cfg.vision_dim, cfg.hidden_size)
        self.decoder = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_embeds = self.decoder.embed_tokens(input_ids)
        image_features = self.projector(self.vision(pixel_values))
        if self.config.merge == "scatter":
            placeholders = (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1).expand_as(text_embeds)
            inputs_embeds = text_embeds.masked_scatter(placeholders, image_features.to(text_embeds.dtype))
        else:
            n_visual = image_features.shape[1]
            inputs_embeds = torch.cat([image_features.to(text_embeds.dtype), text_embeds], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], n_visual), attention_mask], dim=1)
            if labels is not None:
                labels = torch.cat([labels.new_full((input_ids.shape[0], n_visual), IGNORE_INDEX), labels], dim=1)
        logits = self.lm_head(self.decoder(inputs_embeds, attention_mask))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                          ignore_index=IGNORE_INDEX)
        return out


def build_model(**overrides) -> TinyLlava:
    """The example model with random weights (seeded, so every call gives the same weights)."""
    torch.manual_seed(0)
    return TinyLlava(TinyLlavaConfig(**overrides))


def example_inputs(model: TinyLlava | None = None, batch: int = 2, text_tokens: int = 12) -> dict:
    """Forward kwargs for ``model``: ``batch`` images and ``text_tokens`` text tokens per sample.

    For the scatter merge the sequence is ``[bos, placeholders..., text...]`` with one placeholder per
    visual token; labels are ``IGNORE_INDEX`` on the prompt (bos and placeholders) and the text tokens
    after it, and the last sample is right-padded by two positions to exercise the attention mask.
    """
    cfg = model.config if model is not None else TinyLlavaConfig()
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(IMAGE_TOKEN_ID + 1, cfg.vocab_size, (batch, text_tokens), generator=gen)
    pixel_values = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    if cfg.merge == "scatter":
        bos = torch.ones(batch, 1, dtype=torch.long)
        image = torch.full((batch, cfg.tokens_per_image), IMAGE_TOKEN_ID, dtype=torch.long)
        input_ids = torch.cat([bos, image, text], dim=1)
        labels = torch.cat([torch.full((batch, 1 + cfg.tokens_per_image), IGNORE_INDEX), text], dim=1)
    else:
        input_ids, labels = text, text.clone()
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        attention_mask[-1, -2:] = 0
        labels[-1, -2:] = IGNORE_INDEX
    return {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": attention_mask, "labels": labels}
