"""gpt-engine: train GPT-style decoders from scratch on hand-written kernels.

Layers: engine.train (CLI) -> engine.trainer (loop) -> engine.model (GPT) -> engine.ops (the op API,
backends chosen in engine.ops.registry) -> kernels/ (Triton) and csrc/ (C++/CUDA).
"""

__version__ = "0.1.0"
