"""Convergence: the `toy` model trained with every op on the triton backend follows `reference`.

Both runs start from the same weights and cycle through the same few batches; in fp32 the only
differences are the order of floating-point sums inside the kernels, so over 30 AdamW steps the two
loss curves must agree to within LOSS_TOLERANCE at every step, and the model must have learned (it
memorizes the batches: the loss falls by more than 1). On the CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1), hence one sequence of 16 tokens per batch.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine import ops
from engine.model import GPT, preset
from engine.ops.backend import OP_NAMES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 30
BATCH, SEQ_LEN = 1, 16
DISTINCT_BATCHES = 4
# Absolute difference allowed between the two runs' losses at any step (losses start near 3.1).
# Measured on the CPU: at most 5e-7. For scale, perturbing the reference's attention backward moves
# the curve by 9e-4 (dQ halved), 4e-3 (dV times 1.1) or 2e-2 (dK zeroed) within these 30 steps.
LOSS_TOLERANCE = 1e-4

TEXT = "to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
pytestmark = [
    # Triton 3.6's interpreter converts loop bounds with a numpy conversion that numpy 2.x deprecates.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.usefixtures("single_thread"),
]


def batches(vocab: dict[str, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS (input, target) batches cycling through DISTINCT_BATCHES random windows of the text."""
    tokens = torch.tensor([vocab[ch] for ch in TEXT])
    generator = torch.Generator().manual_seed(1234)
    distinct = []
    for _ in range(DISTINCT_BATCHES):
        starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (BATCH,), generator=generator)
        window = torch.stack([tokens[s:s + SEQ_LEN + 1] for s in starts.tolist()])  # (B, T + 1)
        distinct.append((window[:, :-1].to(DEVICE), window[:, 1:].to(DEVICE)))
    return [distinct[step % DISTINCT_BATCHES] for step in range(STEPS)]


def train(backend: str, data, vocab_size: int) -> list[float]:
    """Losses of STEPS AdamW steps of a freshly seeded toy model with every op on `backend`."""
    torch.manual_seed(0)
    model = GPT(preset("toy", vocab_size=vocab_size, max_seq_len=SEQ_LEN)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ops.set_backend(backend)
    try:
        for op in OP_NAMES:
            assert ops.resolve_name(op, DEVICE) == backend
        losses = []
        for inputs, targets in data:
            loss = model.loss(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
    finally:
        ops.set_backend("auto")


def test_toy_model_trains_the_same_with_triton_and_reference():
    vocab = {ch: i for i, ch in enumerate(sorted(set(TEXT)))}
    data = batches(vocab)
    reference_losses = train("reference", data, len(vocab))
    triton_losses = train("triton", data, len(vocab))
    assert reference_losses[-1] < reference_losses[0] - 1.0, f"the model did not learn: {reference_losses}"
    differences = [abs(a - b) for a, b in zip(triton_losses, reference_losses)]
    worst = max(range(STEPS), key=differences.__getitem__)
    assert differences[worst] <= LOSS_TOLERANCE, (
        f"step {worst}: triton loss {triton_losses[worst]:.6f} vs reference {reference_losses[worst]:.6f} "
        f"(max difference {differences[worst]:.2e} > {LOSS_TOLERANCE}); "
        f"triton {triton_losses}, reference {reference_losses}"
    )
