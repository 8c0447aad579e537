"""A GPT-style decoder: configuration, presets and the model, in one readable file.

The model owns parameters and calls `engine.ops` for every hot op (attention, the FFN with its
residual, LayerNorm, the loss); which kernels run is decided in engine/ops/registry.py.

Block structure (pre-LayerNorm, as GPT-2):
    x = x + dropout(proj(attention(ln1(x))))
    x = ffn(ln2(x), residual=x)              # x + dropout(W2 gelu(W1 h + b1) + b2)
then a final LayerNorm and the LM head (tied to the token embedding by default).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import ops

POS_ENCODINGS = ("sinusoidal", "learned")
ACTIVATIONS = ("gelu", "gelu_tanh")


def option(default, help: str):
    """A dataclass field with a help text; engine.train turns each such field into a flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class GPTConfig:
    """Architecture of the model. Every field is also a `python -m engine.train` flag (--d-model, ...)."""

    vocab_size: int = option(256, "Number of token ids; set from the tokenizer when training on a corpus.")
    d_model: int = option(512, "Width of the residual stream.")
    n_heads: int = option(8, "Attention heads; d_model must be divisible by it (head size = d_model / n_heads).")
    d_ff: int = option(2048, "Hidden width of the feed-forward network (4 x d_model in the classic design).")
    n_layers: int = option(6, "Number of transformer blocks.")
    max_seq_len: int = option(256, "Longest context the model sees; also the training sequence length.")
    dropout: float = option(0.0, "Dropout on attention weights, block outputs and embeddings.")
    pos_encoding: str = option("sinusoidal", "'sinusoidal' (fixed, as in the Transformer paper) or 'learned' (GPT-2).")
    bias: bool = option(True, "Biases in the linear layers and LayerNorms.")
    tie_embeddings: bool = option(True, "Share the token embedding matrix with the LM head.")
    activation: str = option("gelu", "'gelu' (exact, erf) or 'gelu_tanh' (GPT-2's tanh approximation).")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2 != 0:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}")
        return cls(**values)


# Presets by name. vocab_size is set from the tokenizer when training on a corpus; gpt2 fixes it.
PRESETS: dict[str, dict] = {
    # About 250K parameters: trains to a readable loss on a laptop CPU in minutes.
    "toy": dict(d_model=64, n_heads=4, d_ff=256, n_layers=5, max_seq_len=128),
    # The original design: 6 layers of 512, 8 heads, 4x FFN, sinusoidal positions (about 19M).
    "default": dict(d_model=512, n_heads=8, d_ff=2048, n_layers=6, max_seq_len=256),
    # GPT-2 small (124M): learned positions, tanh GELU, 1024 context, BPE vocabulary.
    "gpt2": dict(vocab_size=50257, d_model=768, n_heads=12, d_ff=3072, n_layers=12, max_seq_len=1024,
                 pos_encoding="learned", activation="gelu_tanh"),
}


def preset(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of a named preset, with any fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


def sinusoidal_positions(max_seq_len: int, d_model: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)); (T, d)."""
    position = torch.arange(max_seq_len, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_seq_len, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias; the arithmetic is engine.ops.layer_norm."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        dropout_p = self.dropout if self.training else 0.0
        y = ops.attention(q, k, v, causal=True, dropout_p=dropout_p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return F.dropout(self.proj(y), p=dropout_p, training=self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.dropout = config.dropout
        self.ln1 = LayerNorm(config.d_model, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = LayerNorm(config.d_model, config.bias)
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)  # weight (d_ff, d_model)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)  # weight (d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return ops.ffn(
            self.ln2(x), self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual=x,
            activation=self.activation, dropout_p=self.dropout if self.training else 0.0,
        )


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_encoding == "learned":
            self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        else:
            self.register_buffer(
                "position_table", sinusoidal_positions(config.max_seq_len, config.d_model), persistent=False
            )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = LayerNorm(config.d_model, config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: the projections that write into the residual stream get
        # std 0.02 / sqrt(2 * n_layers), so the stream's variance does not grow with depth.
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc2.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Trainable parameters, counting tied embeddings once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> final normalized hidden states (B, T, d_model)."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.token_embedding(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.position_embedding(torch.arange(T, device=idx.device))
        else:
            x = x + self.position_table[:T].to(x.dtype)
        x = F.dropout(x, p=self.config.dropout, training=self.training)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(idx))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
        """Mean next-token cross-entropy; idx and targets (B, T). The (B*T, V) logits may never exist."""
        hidden = self.hidden_states(idx)  # (B, T, C)
        return ops.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1), ignore_index=ignore_index
        )

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); the context is cropped to max_seq_len."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.max_seq_len:]
            logits = self(context)[:, -1, :].float() / max(temperature, 1e-6)  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx
