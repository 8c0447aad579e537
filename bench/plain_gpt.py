"""A plain PyTorch GPT and training loop: the baseline `python -m bench.train --baseline plain` measures against.

Written the way a user would write it from the PyTorch documentation, with no engine code in the model:
nn.Linear, nn.LayerNorm, nn.Embedding, F.scaled_dot_product_attention, F.gelu, F.cross_entropy, AdamW
(PyTorch's default implementation, as a user gets it without flags), torch.autocast for bf16. It builds
the same architecture as engine.model.GPT for a GPTConfig (pre-LayerNorm blocks, tied LM head, GPT-2's
initialization with the scaled residual projections, sinusoidal positions with the sqrt(d_model) token
scale or learned positions), and the loop runs the same recipe as engine.trainer (AdamW with weight decay
on matrices only, linear warm-up and cosine decay, gradient clipping) on the same batches, so that the
loss after N steps can be compared and the tokens/s ratio measures the engine's implementation only.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.model import GPTConfig, sinusoidal_positions
from engine.trainer import TrainConfig, learning_rate


class PlainAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class PlainFeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class PlainBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = PlainAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.ffn = PlainFeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class PlainGPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.dropout > 0:
            raise ValueError("the plain baseline trains without dropout (the engine's cpp backend has none)")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_encoding == "learned":
            self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model)
        else:
            self.register_buffer("position_table", sinusoidal_positions(config.max_seq_len, config.d_model),
                                 persistent=False)
        self.blocks = nn.ModuleList(PlainBlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        for name, parameter in self.named_parameters():
            if name.endswith(("proj.weight", "fc2.weight")):  # GPT-2: writes into the residual
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * config.n_layers))
            elif parameter.dim() >= 2:
                nn.init.normal_(parameter, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size)."""
        T = idx.shape[1]
        x = self.token_embedding(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            x = x + self.position_embedding(torch.arange(T, device=idx.device))
        else:
            x = x * math.sqrt(self.config.d_model) + self.position_table[:T]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.forward(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def make_optimizer(model: PlainGPT, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices (embeddings included) only, as nanoGPT's configure_optimizers."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def autocast(dtype: torch.dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)


def train_step(model: PlainGPT, optimizer: torch.optim.AdamW, x: torch.Tensor, y: torch.Tensor, step: int,
               config: TrainConfig, dtype: torch.dtype) -> torch.Tensor:
    """One optimizer step on a batch x, y (B, T); returns the loss (no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, config)
    with autocast(dtype):
        loss = model.loss(x, y)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(model: PlainGPT, data, split: str, config: TrainConfig, dtype: torch.dtype) -> float:
    """Mean loss over eval_iters batches drawn as engine.trainer's evaluate draws them (the same batches)."""
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses = []
    for _ in range(config.eval_iters):
        x, y = data.batch(split, config.batch_size, model.config.max_seq_len, generator)
        with autocast(dtype):
            losses.append(model.loss(x, y))
    model.train()
    return torch.stack(losses).mean().item()
