"""Benchmarks: one harness for every op and backend, end-to-end training throughput, results.

    python -m bench.attention      forward / backward / both, per backend, T from 256 to 8192
    python -m bench.ffn            the FFN block (two matmuls, GELU, residual), and torch.compile
    python -m bench.layer_norm     LayerNorm bandwidth
    python -m bench.cross_entropy  cross-entropy bandwidth and the fused LM head + loss (peak memory)
    python -m bench.train          training tokens/s, MFU, step time and peak memory per backend
    python -m bench.report DIR     tables (markdown), plots (PNG) and a compact summary of a results folder
    bash bench/gpu_check.sh [DIR]  all of the above on a GPU machine (9 minutes), packed into one archive
    python -m bench.sanitize_ops   every extension op on tiny ragged shapes, to run under compute-sanitizer
    python -m bench.autotune MOD   run `python -m MOD` with ENGINE_AUTOTUNE (quick / shard:I/N) applied and
                                   Triton compiles, autotuning and torch.compile graphs counted

bench.harness holds the timing method and the row format; each op module states its FLOP and
byte counts beside its input builder.
"""
