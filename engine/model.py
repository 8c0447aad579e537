"""A GPT-style decoder: configuration, presets and the model, in one readable file.

The model owns parameters and calls `engine.ops` for every hot op (attention, the FFN with its
residual, LayerNorm, the loss); which kernels run is decided in engine/ops/registry.py.

Block structure (pre-LayerNorm, as GPT-2):
    x = x + dropout(proj(attention(ln1(x))))
    x = ffn(ln2(x), residual=x)              # x + dropout(W2 gelu(W1 h + b1) + b2)
then a final LayerNorm and the LM head (tied to the token embedding by default).

Generation keeps a KVCache: the prompt is encoded once (prefill, causal attention), then each new
token costs one position, its query attending to the cached keys and values of all earlier tokens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import ops
from engine.config import MODEL, option, require_positive_integers
from engine.profiling import nvtx_range

POS_ENCODINGS = ("sinusoidal", "learned")
ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass
class GPTConfig:
    """Architecture of the model. Every field is also a `python -m engine.train` flag (--d-model, ...)."""

    vocab_size: int = option(256, "Number of token ids; set from the tokenizer when training on a corpus.", MODEL)
    d_model: int = option(512, "Width of the residual stream.", MODEL)
    n_heads: int = option(8, "Attention heads; d_model must be divisible by it (head size = d_model / n_heads).",
                          MODEL)
    d_ff: int = option(2048, "Hidden width of the feed-forward network (4 x d_model in the classic design).", MODEL)
    n_layers: int = option(6, "Number of transformer blocks.", MODEL)
    max_seq_len: int = option(256, "Longest context the model sees; also the training sequence length.", MODEL)
    dropout: float = option(0.0, "Dropout on attention weights, block outputs and embeddings.", MODEL)
    pos_encoding: str = option("sinusoidal", "'sinusoidal' (fixed, as in the Transformer paper) or 'learned' "
                                             "(GPT-2).", MODEL)
    bias: bool = option(True, "Biases in the linear layers and LayerNorms.", MODEL)
    tie_embeddings: bool = option(True, "Share the token embedding matrix with the LM head.", MODEL)
    activation: str = option("gelu", "'gelu' (exact, erf) or 'gelu_tanh' (GPT-2's tanh approximation).", MODEL)

    def __post_init__(self) -> None:
        require_positive_integers(self, ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len"))
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


# Presets by name. Training sets vocab_size from the tokenizer (--vocab-size may pad it). gpt2's 50304
# is GPT-2's BPE vocabulary of 50257 padded to a multiple of 64, as nanoGPT does: an odd row length
# costs the LM head's matmuls and the cross-entropy kernels their vectorized and asynchronous loads.
# The padding rows are never targets; engine.hf exports only the tokenizer's 50257.
PRESETS: dict[str, dict] = {
    # About 250K parameters: trains to a readable loss on a laptop CPU in minutes.
    "toy": dict(d_model=64, n_heads=4, d_ff=256, n_layers=5, max_seq_len=128),
    # nanoGPT's CPU recipe for character-level Shakespeare (4 x 128, context 64, no bias, learned positions).
    "nanogpt-cpu": dict(d_model=128, n_heads=4, d_ff=512, n_layers=4, max_seq_len=64, bias=False,
                        pos_encoding="learned"),
    # The original design: 6 layers of 512, 8 heads, 4x FFN, sinusoidal positions. 23.1M parameters on
    # the 8192-token BPE vocabulary it trains with (engine.train's PRESET_TRAINING), 19M on characters.
    "default": dict(d_model=512, n_heads=8, d_ff=2048, n_layers=6, max_seq_len=256),
    # GPT-2 small (124M): learned positions, tanh GELU, 1024 context, BPE vocabulary.
    "gpt2": dict(vocab_size=50304, d_model=768, n_heads=12, d_ff=3072, n_layers=12, max_seq_len=1024,
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


class LayerKV:
    """One layer's cached keys and values, (B, H, T_cached, D) each; empty until the first forward.

    The buffers grow by doubling, so appending one token is an in-place write (amortized O(1)),
    not a copy of the whole cache; extend() returns views of the filled part.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (B, H, capacity, D)
        self.values: torch.Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' k, v (B, H, T_new, D); returns all of them (B, H, T_cached + T_new, D)."""
        end = self.length + k.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            capacity = max(end, 2 * (0 if self.keys is None else self.keys.shape[2]))
            keys = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            values = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if self.keys is not None:
                keys[:, :, :self.length] = self.keys[:, :, :self.length]
                values[:, :, :self.length] = self.values[:, :, :self.length]
            self.keys, self.values = keys, values
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Every layer's keys and values for the tokens seen so far, so decoding never recomputes them.

    Pass one to GPT.forward: the first call (prefill) encodes the prompt causally and fills it;
    each later call takes one token, at position len(cache), which attends to all cached keys.
    """

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(n_layers)]

    def __len__(self) -> int:
        """The number of cached positions."""
        return len(self.layers[0])


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        B, T, C = x.shape
        past = 0 if kv is None else len(kv)
        if past > 0 and T != 1:
            raise ValueError(f"a forward on a filled KV cache takes one token at a time, got {T}")
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        if kv is not None:
            k, v = kv.extend(k, v)  # (B, H, past + T, D)
        dropout_p = self.dropout if self.training else 0.0
        # A decode step's single query comes after every cached key: no mask (causal=False, T_q = 1).
        y = ops.attention(q, k, v, causal=past == 0, dropout_p=dropout_p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return F.dropout(self.proj(y), p=dropout_p, training=self.training)


class FeedForward(nn.Module):
    """The feed-forward sublayer and its residual in one engine.ops.ffn call:
    residual + dropout(fc2(act(fc1(x)))), fc1 from d_model to d_ff and fc2 back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.dropout = config.dropout
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)  # weight (d_ff, d_model)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)  # weight (d_model, d_ff)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        return ops.ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual=residual,
                       activation=self.activation, dropout_p=dropout_p)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, index: int = 0) -> None:
        super().__init__()
        # NVTX range names (engine/profiling.py; on with --nvtx): one per sublayer of this block.
        self.attention_range = f"block{index}.attention"
        self.ffn_range = f"block{index}.ffn"
        self.ln1 = LayerNorm(config.d_model, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = LayerNorm(config.d_model, config.bias)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        with nvtx_range(self.attention_range):
            x = x + self.attn(self.ln1(x), kv)
        with nvtx_range(self.ffn_range):
            return self.ffn(self.ln2(x), residual=x)


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
        self.blocks = nn.ModuleList(Block(config, index) for index in range(config.n_layers))
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

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final normalized hidden states (B, T, d_model).

        With a cache, the tokens sit at positions len(cache) .. len(cache) + T - 1 and their keys
        and values are appended to it.
        """
        B, T = idx.shape
        past = 0 if cache is None else len(cache)
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + T} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.token_embedding(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.position_embedding(torch.arange(past, past + T, device=idx.device))
        else:
            # As in the Transformer paper the token embeddings are multiplied by sqrt(d_model): the fixed
            # sinusoids have amplitude 1, and at GPT-2's init std of 0.02 they would drown the tokens
            # (learning then stalls near the unigram loss for hundreds of steps).
            x = x * math.sqrt(self.config.d_model) + self.position_table[past:past + T].to(x.dtype)
        x = F.dropout(x, p=self.config.dropout, training=self.training)
        layer_caches = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, kv in zip(self.blocks, layer_caches):
            x = block(x, kv)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size); see hidden_states for the cache."""
        return self.lm_head(self.hidden_states(idx, cache))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
        """Mean next-token cross-entropy; idx and targets (B, T). The (B*T, V) logits may never exist."""
        hidden = self.hidden_states(idx)  # (B, T, C)
        return ops.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1), ignore_index=ignore_index
        )

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True):
        """Yield max_new_tokens sampled tokens, (B, 1) each, continuing idx (B, T).

        The model sees the last max_seq_len tokens. With use_cache the prompt is encoded once and
        each new token then costs one position. Once the sequence outgrows max_seq_len, the window
        slides and every cached key would move to a new position, so from then on each step
        re-encodes the last max_seq_len tokens: exactly what use_cache=False computes, so both
        paths give the same tokens for the same generator.
        """
        window = self.config.max_seq_len
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                hidden = self.hidden_states(idx[:, -window:])
            elif cache is not None and len(cache) < window:
                hidden = self.hidden_states(idx[:, -1:], cache)  # one new position
            else:
                cache = KVCache(self.config.n_layers)
                hidden = self.hidden_states(idx[:, -window:], cache)  # prefill
            logits = self.lm_head(hidden[:, -1, :])  # (B, V): only the last position is needed
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens); see stream."""
        new_tokens = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache))
        return torch.cat([idx, *new_tokens], dim=1)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from logits (B, V) -> (B, 1).

    temperature 0 is greedy (argmax, no randomness drawn). Otherwise the logits are divided by the
    temperature, then top_k keeps the k most likely tokens and top_p the smallest set of most likely
    tokens whose probabilities add up to at least p (nucleus sampling); one multinomial draw follows.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probabilities = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the more likely ones before it already reach top_p (the first always stays).
        mass_before = torch.cumsum(probabilities, dim=-1) - probabilities
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
