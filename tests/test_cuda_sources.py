"""The CUDA half of engine._C: its sources compile everywhere, its ops are right on a GPU.

Without a GPU (CI, the development machines) nothing CUDA can run, so these tests check what can be
checked: every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 (`nvcc -c`, all compiles in
parallel), with the defines a torch CUDAExtension build adds (no implicit half/bfloat16 conversions);
the kernel files include only CUDA headers (PLATFORM.md: torch's CUDA headers do not compile with a
CPU torch); every launcher declared in launchers.h is defined. The torch-facing glue is one file for both
devices (csrc/glue.cpp), which registers every op schema for CPU and CUDA; its CUDA build (-DENGINE_WITH_CUDA)
needs only the CPU torch headers and cuda_runtime.h, so it is compiled here too.

The `gpu` tests run the CUDA ops through torch.ops.engine against the `reference` backend and fp64
(the precision contract's 2x rule, tests/tolerance.py): attention forward and backward in fp32, fp16
and bf16 with odd sequence lengths and head dimensions, the FFN epilogues, LayerNorm and cross-entropy.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from engine.ops import reference
from tests.tolerance import assert_within_reference_error

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
GLUE = ROOT / "csrc" / "glue.cpp"
SOURCES = sorted(path.name for path in CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")
# What torch's CUDAExtension passes to nvcc that changes what compiles.
TORCH_NVCC_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
# Headers a kernel file may include: the CUDA toolkit's, this folder's own, and the C++ library's.
ALLOWED_INCLUDES = {"cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "mma.h", "common.cuh", "launchers.h", "cstdint"}


# ---- without a GPU: the sources ----

def test_one_kernel_file_per_op_family():
    assert set(SOURCES) >= {"attention.cu", "ffn_epilogues.cu", "layer_norm.cu", "cross_entropy.cu"}, SOURCES


@pytest.fixture(scope="session")
def nvcc_results(tmp_path_factory):
    """(source, arch) -> CompletedProcess of `nvcc -c`, all compiles run at once (one per core)."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compile-checked on this machine")
    out_dir = tmp_path_factory.mktemp("nvcc")

    def compile_one(source: str, arch: str) -> subprocess.CompletedProcess:
        command = [NVCC, "-c", "-std=c++17", f"-arch={arch}", "-O3", *TORCH_NVCC_DEFINES, "-Xptxas", "-v",
                   "-o", str(out_dir / f"{source}.{arch}.o"), str(CUDA_DIR / source)]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    # Largest (slowest) files first, so the two cores stay busy until the end.
    by_size = sorted(SOURCES, key=lambda source: (CUDA_DIR / source).stat().st_size, reverse=True)
    jobs = [(source, arch) for source in by_size for arch in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {job: pool.submit(compile_one, *job) for job in jobs}
        return {job: future.result() for job, future in futures.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_cuda_source_compiles(nvcc_results, source, arch):
    result = nvcc_results[(source, arch)]
    assert result.returncode == 0, f"nvcc -c -arch={arch} csrc/cuda/{source} failed:\n{result.stderr[-6000:]}"


def _ptxas_report(stderr: str) -> dict[str, tuple[int, int]]:
    """Kernel (mangled name) -> (registers, spill store bytes), from `ptxas -v`."""
    pattern = (r"Compiling entry function '(\S+)' for 'sm_\d+'\n.*?(\d+) bytes spill stores.*?"
               r"Used (\d+) registers")
    return {name: (int(registers), int(spills))
            for name, spills, registers in re.findall(pattern, stderr, flags=re.DOTALL)}


# The attention forward built for two blocks per SM at head dim 64 (attention_forward_tc_kernel<Element, 64, 2>):
# ptxas must fit it in 128 registers; that costs it a few bytes of spills (12 on sm_90, 4 on sm_80 with nvcc
# 13.0), the only kernel allowed any, which the GPU check weighs by timing it against the default build.
TWO_BLOCKS_VARIANT = re.compile(r"attention_forward_tc_kernel\w*Li64ELi2E")
MAX_VARIANT_SPILL_BYTES = 64


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_forward_has_a_two_blocks_per_sm_build_at_head_dim_64(nvcc_results, arch):
    report = _ptxas_report(nvcc_results[("attention.cu", arch)].stderr)
    variants = {name: usage for name, usage in report.items() if TWO_BLOCKS_VARIANT.search(name)}
    assert len(variants) == 2, f"expected the fp16 and bf16 builds of the variant, found {sorted(variants)}"
    for name, (registers, spills) in variants.items():
        assert registers <= 128, f"{name}: {registers} registers leave no room for 2 blocks of 256 threads"
        assert spills <= MAX_VARIANT_SPILL_BYTES, f"{name}: {spills} bytes of spill stores"


# Spills measured with nvcc 13.0 and accepted: (arch, kernel pattern) -> most spill-store bytes. On sm_80 the
# tensor-core dQ backward at head dim 128 spills 8 bytes, and the fp32 dQ backward at head dim 32 4 bytes at only
# 40 registers (so not for want of registers).
KNOWN_SPILLS = {
    ("sm_80", re.compile(r"attention_backward_dq_tc_kernel\w*Li128E")): 8,
    ("sm_80", re.compile(r"attention_backward_dq_fp32_kernelILi32E")): 4,
    ("sm_80", TWO_BLOCKS_VARIANT): MAX_VARIANT_SPILL_BYTES,
    ("sm_90", TWO_BLOCKS_VARIANT): MAX_VARIANT_SPILL_BYTES,
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_no_kernel_spills_registers(nvcc_results, source, arch):
    """Every kernel fits its registers, but the few measured spills above (which must not grow)."""
    report = _ptxas_report(nvcc_results[(source, arch)].stderr)
    assert report, f"no ptxas report for csrc/cuda/{source}"

    def allowed(name: str) -> int:
        return max((limit for (known_arch, pattern), limit in KNOWN_SPILLS.items()
                    if known_arch == arch and pattern.search(name)), default=0)

    spilling = {name: usage for name, usage in report.items() if usage[1] > allowed(name)}
    assert not spilling, f"kernels of csrc/cuda/{source} spill on {arch} (registers, spill bytes): {spilling}"


def _includes(path: Path) -> list[str]:
    return re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.MULTILINE)


@pytest.mark.parametrize("name", SOURCES + ["common.cuh", "launchers.h"])
def test_kernel_files_include_only_cuda_headers(name):
    disallowed = sorted(set(_includes(CUDA_DIR / name)) - ALLOWED_INCLUDES)
    assert not disallowed, (f"csrc/cuda/{name} includes {disallowed}; kernel files may include only "
                            f"{sorted(ALLOWED_INCLUDES)} (torch-facing code belongs in glue.cpp)")


def test_every_launcher_is_defined():
    declared = re.findall(r"^(?:cudaError_t|int64_t) (\w+)\(", (CUDA_DIR / "launchers.h").read_text(), re.MULTILINE)
    assert len(declared) >= 10, declared
    definitions = "".join((CUDA_DIR / source).read_text() for source in SOURCES)
    missing = [name for name in declared if f"engine_cuda::{name}(" not in definitions]
    assert not missing, f"launchers declared in launchers.h but defined in no .cu file: {missing}"


def test_glue_registers_every_schema():
    schemas = set(re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text()))
    implemented = set(re.findall(r'm\.impl\("(\w+)"', GLUE.read_text()))
    assert schemas, "no m.def(...) schemas found in csrc/ops.cpp"
    assert implemented == schemas, (f"csrc/glue.cpp registers {sorted(implemented)} but csrc/ops.cpp defines "
                                    f"{sorted(schemas)}")


def test_one_torch_facing_glue_for_both_devices():
    """CPU and CUDA register the same functions from csrc/glue.cpp; no other file registers a device kernel."""
    registering = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").rglob("*.c*")
                         if "TORCH_LIBRARY_IMPL(" in path.read_text())
    assert registering == ["csrc/glue.cpp"], f"device kernels are registered in {registering}"
    blocks = re.findall(r"^TORCH_LIBRARY_IMPL\(engine, (\w+), m\)", GLUE.read_text(), flags=re.MULTILINE)
    assert sorted(blocks) == ["AutocastCPU", "AutocastCUDA", "Autograd", "CPU", "CUDA"], blocks
    assert not list(CUDA_DIR.glob("*.cpp")), "CUDA-only torch glue is back in csrc/cuda/"


def _cuda_include_dir() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", NVCC and str(Path(NVCC).resolve().parents[1])):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return None


def test_glue_compiles_for_both_builds_without_warnings():
    """csrc/glue.cpp as the CPU build compiles it and as the CUDA build does (-DENGINE_WITH_CUDA, which setup.py's
    CUDAExtension defines), against this machine's CPU torch headers and the CUDA toolkit's cuda_runtime.h: what
    a CUDA build compiles, short of linking (PLATFORM.md: a full CUDAExtension build needs a 5.5 GB CUDA torch).
    Warnings are errors: code used by one build only must not leave the other with unused variables."""
    from torch.utils import cpp_extension

    include = _cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA toolkit (cuda_runtime.h) on this machine")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler})")
    common = [compiler, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
              *(f"-isystem{path}" for path in cpp_extension.include_paths()), str(GLUE)]
    builds = {"cpu": common, "cuda": [*common, "-DENGINE_WITH_CUDA", f"-isystem{include}"]}
    # Both at once: each takes 20-40 s on a 2-core machine, most of it in torch's headers.
    running = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, command in builds.items()}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"the {name} build of csrc/glue.cpp fails:\n{' '.join(builds[name])}\n" \
            f"{stderr[-6000:]}"


# ---- on a GPU: the ops ----

@pytest.fixture(scope="module")
def ops():
    """torch.ops.engine with the CUDA kernels registered."""
    try:
        import engine._C  # noqa: F401  (importing registers torch.ops.engine.*)
    except ImportError as error:
        pytest.fail(f"engine._C is not built (pip install --no-build-isolation -e .): {error}")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("engine::attention_forward", "CUDA"):
        pytest.fail("engine._C was built without its CUDA kernels (setup.py found no nvcc or a CPU torch)")
    return torch.ops.engine


LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def _attention_with_grads(q, k, v, grad_out, causal, scale):
    """Output and (dq, dk, dv) of the reference backend, by autograd, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = reference.attention(*leaves, causal=causal, scale=scale)
    out.backward(grad_out)
    return out.detach(), *(leaf.grad for leaf in leaves)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 64), (1, 2, 77, 64), (2, 2, 200, 128), (1, 3, 130, 40),
                                   (1, 2, 33, 16), (1, 1, 257, 96), (2, 1, 64, 8)], ids=str)
def test_attention_matches_reference(ops, shape, causal, dtype):
    q, k, v, grad_out = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
    scale = shape[-1] ** -0.5
    out, lse = ops.attention_forward(q, k, v, causal, scale)
    grads = ops.attention_backward(grad_out, q, k, v, out, lse, causal, scale)

    low = _attention_with_grads(q, k, v, grad_out, causal, scale)
    exact = _attention_with_grads(q.double(), k.double(), v.double(), grad_out.double(), causal, scale)
    for name, actual, low_value, exact_value in zip(("out", "grad_q", "grad_k", "grad_v"), (out, *grads), low, exact):
        assert actual.dtype == dtype
        assert_within_reference_error(actual, low_value, exact_value, name)

    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    if causal:
        T = shape[2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    exact_lse = torch.logsumexp(scores, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == shape[:3]
    assert (lse.double() - exact_lse).abs().max().item() <= 1e-4 * (1 + exact_lse.abs().max().item())


@pytest.mark.gpu
def test_attention_backward_is_deterministic_and_memory_is_linear_in_t(ops):
    B, H, T, D = 1, 2, 4096, 64
    q, k, v, grad_out = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse = ops.attention_forward(q, k, v, True, D ** -0.5)
    first = ops.attention_backward(grad_out, q, k, v, out, lse, True, D ** -0.5)
    peak = torch.cuda.max_memory_allocated() - before
    score_matrix_bytes = B * H * T * T * 2  # one bf16 (T x T) matrix per head
    assert peak < score_matrix_bytes / 4, f"peak {peak} bytes: attention must not materialize T x T"
    second = ops.attention_backward(grad_out, q, k, v, out, lse, True, D ** -0.5)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "the backward (no atomics) must give bitwise identical gradients"


@pytest.mark.gpu
def test_attention_rejects_unsupported_input(ops):
    q = torch.randn(1, 1, 8, 12, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dimension"):
        ops.attention_forward(q, q, q, True, 1.0)
    q = torch.randn(1, 1, 8, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="k has dtype"):
        ops.attention_forward(q, q.float(), q, True, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_attention_forward_two_blocks_per_sm_build_matches_reference(ops, monkeypatch, dtype):
    """ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM=2 runs the __launch_bounds__(256, 2) build at head dim 64; read per call."""
    q, k, v = (torch.randn(2, 3, 333, 64, device="cuda", dtype=dtype) for _ in range(3))
    default, _ = ops.attention_forward(q, k, v, True, 0.125)
    monkeypatch.setenv("ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM", "2")
    two_blocks, _ = ops.attention_forward(q, k, v, True, 0.125)
    low = reference.attention(q, k, v, causal=True, scale=0.125)
    exact = reference.attention(q.double(), k.double(), v.double(), causal=True, scale=0.125)
    assert_within_reference_error(two_blocks, low, exact, "out (two blocks per SM)")
    assert_within_reference_error(default, low, exact, "out (default)")
    monkeypatch.setenv("ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM", "3")
    with pytest.raises(RuntimeError, match="ENGINE_CUDA_ATTENTION_BLOCKS_PER_SM must be 1 or 2, got '3'"):
        ops.attention_forward(q, k, v, True, 0.125)


def _with_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. the float tensors among inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [leaf.grad for leaf in leaves if leaf is not None and leaf.is_floating_point()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_gelu_matches_reference(ops, activation, with_bias, dtype):
    N, F = 37, 301
    pre = torch.randn(N, F, device="cuda", dtype=dtype) * 2
    bias = torch.randn(F, device="cuda", dtype=dtype) if with_bias else None
    grad = torch.randn(N, F, device="cuda", dtype=dtype)
    tanh_approx = activation == "gelu_tanh"

    def act(p, b):
        return reference.activation_fn(p if b is None else p + b, activation)

    out = ops.bias_gelu(pre, bias, tanh_approx)
    grad_pre = ops.bias_gelu_backward(grad, pre, bias, tanh_approx)
    low_out, low_grads = _with_grads(act, (pre, bias), grad)
    exact_out, exact_grads = _with_grads(act, (pre.double(), None if bias is None else bias.double()), grad.double())
    assert_within_reference_error(out, low_out, exact_out, "out")
    assert_within_reference_error(grad_pre, low_grads[0], exact_grads[0], "grad_pre")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_residual_matches_reference(ops, with_bias, dtype):
    N, C = 29, 515
    y, residual = torch.randn(N, C, device="cuda", dtype=dtype), torch.randn(N, C, device="cuda", dtype=dtype)
    bias = torch.randn(C, device="cuda", dtype=dtype) if with_bias else None

    def expected(y_, bias_, residual_):
        return residual_ + (y_ if bias_ is None else y_ + bias_)

    low = expected(y, bias, residual)
    exact = expected(y.double(), None if bias is None else bias.double(), residual.double())
    assert_within_reference_error(ops.bias_residual(y, bias, residual), low, exact, "out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(5, 123), (300, 768), (1, 1)], ids=str)
def test_layer_norm_matches_reference(ops, shape, with_bias, dtype):
    N, C = shape
    x = torch.randn(N, C, device="cuda", dtype=dtype) * 3 + 1
    weight = torch.randn(C, device="cuda", dtype=dtype)
    bias = torch.randn(C, device="cuda", dtype=dtype) if with_bias else None
    grad_y = torch.randn(N, C, device="cuda", dtype=dtype)

    y, mean, rstd = ops.layer_norm_forward(x, weight, bias, 1e-5)
    grad_x, grad_weight, grad_bias = ops.layer_norm_backward(grad_y, x, weight, mean, rstd)

    def layer_norm(x_, w_, b_):
        return reference.layer_norm(x_, w_, b_, 1e-5)

    low_y, low_grads = _with_grads(layer_norm, (x, weight, bias), grad_y)
    exact_inputs = (x.double(), weight.double(), None if bias is None else bias.double())
    exact_y, exact_grads = _with_grads(layer_norm, exact_inputs, grad_y.double())
    assert_within_reference_error(y, low_y, exact_y, "y")
    assert_within_reference_error(grad_x, low_grads[0], exact_grads[0], "grad_x")
    assert_within_reference_error(grad_weight, low_grads[1], exact_grads[1], "grad_weight")
    exact_grad_bias = grad_y.double().sum(0)  # also returned when the forward had no bias
    assert_within_reference_error(grad_bias, grad_y.float().sum(0).to(dtype), exact_grad_bias, "grad_bias")
    assert torch.allclose(mean.double(), x.double().mean(1), atol=1e-4 * (1 + x.abs().max().item()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(7, 1000), (64, 50257), (3, 1)], ids=str)
def test_cross_entropy_matches_reference(ops, shape, dtype):
    N, V = shape
    logits = torch.randn(N, V, device="cuda", dtype=dtype) * 4
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::3] = -1  # ignored rows
    grad_loss = torch.tensor(1.7, device="cuda")

    loss, lse = ops.cross_entropy_forward(logits, targets, -1)
    grad_logits = ops.cross_entropy_backward(grad_loss, logits, targets, lse, -1)

    def loss_fn(logits_):
        return reference.cross_entropy(logits_, targets, ignore_index=-1)

    low_loss, low_grads = _with_grads(loss_fn, (logits,), grad_loss)
    exact_loss, exact_grads = _with_grads(loss_fn, (logits.double(),), grad_loss.double())
    assert loss.shape == () and loss.dtype == torch.float32
    assert_within_reference_error(loss, low_loss, exact_loss, "loss")
    assert_within_reference_error(grad_logits, low_grads[0], exact_grads[0], "grad_logits")
    exact_lse = torch.logsumexp(logits.double(), dim=1)
    assert (lse.double() - exact_lse).abs().max().item() <= 1e-5 * (1 + exact_lse.abs().max().item())
    assert torch.all(grad_logits[::3] == 0), "ignored rows get no gradient"


@pytest.mark.gpu
def test_cross_entropy_with_every_row_ignored_is_nan_like_the_reference(ops):
    logits = torch.randn(4, 10, device="cuda")
    targets = torch.full((4,), -1, device="cuda")
    loss, lse = ops.cross_entropy_forward(logits, targets, -1)
    assert torch.isnan(loss) and torch.isnan(reference.cross_entropy(logits, targets, ignore_index=-1))
    grad = ops.cross_entropy_backward(torch.tensor(1.0, device="cuda"), logits, targets, lse, -1)
    assert torch.all(grad == 0)
