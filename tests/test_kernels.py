"""Triton kernels (fxdecomp_kernels) against their pure-torch references.

Where the kernels run
---------------------
Triton 3.8 reads ``TRITON_INTERPRET`` when a function is decorated with ``@triton.jit``; its own
library (``tl.zeros``, ``tl.sum``, ...) is decorated at ``import triton``. So the interpreter is a
process-wide mode fixed when triton is first imported -- and ``import timm`` imports triton, so
by the time this module is collected another test module has usually imported it already.
Setting the variable here would therefore either not work or leak into other tests. Instead:

- CUDA available: the kernel cases run here, on CUDA tensors (compiled, autotuned kernels).
- this process is already in interpreter mode (``TRITON_INTERPRET=1 pytest tests/...`` from the
  shell): the kernel cases run here, on CPU tensors.
- otherwise (a CPU machine, the usual case): the kernel cases are skipped here and
  ``test_kernel_cases_in_interpreter_subprocess`` re-runs this file in a child
  ``python -m pytest`` with ``TRITON_INTERPRET=1``; its output is shown if it fails. Nothing in
  this process changes mode.

Validation, backend choice and the ahead-of-time compile check (the GPU kernels compiled to
sm_90 cubins without a GPU) run in this process in every case.

Tolerances (kernel vs reference; both accumulate in fp32 and round once to the output dtype):
fp32 atol = rtol = 2e-5 (IEEE fp32 products, only the summation order differs); bf16 atol = rtol
= 1.6e-2 and fp16 atol = rtol = 2e-3 (about two units in the last place of the output dtype).
Inputs are scaled so outputs are O(1).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxdecomp_kernels as K
from fxdecomp_kernels import _common

HAS_CUDA = torch.cuda.is_available()
IN_INTERPRETER = _common.interpreting()
KERNEL_HERE = _common.HAS_TRITON and (HAS_CUDA or IN_INTERPRETER)
DEVICE = "cuda" if HAS_CUDA and not IN_INTERPRETER else "cpu"
_CHILD_FLAG = "FXDECOMP_KERNELS_TEST_CHILD"
if os.environ.get(_CHILD_FLAG) == "1" and not KERNEL_HERE:  # never let the child skip silently
    raise RuntimeError("test child started with TRITON_INTERPRET=1 but triton is not in "
                       "interpreter mode; was triton imported before the variable was read?")

needs_kernel = pytest.mark.skipif(
    not KERNEL_HERE,
    reason="no GPU and this process is not in Triton's interpreter mode: these cases run in the "
           "TRITON_INTERPRET=1 child process (test_kernel_cases_in_interpreter_subprocess)")

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2),
       torch.float16: (2e-3, 2e-3)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def assert_close(actual, expected, dtype, what):
    """Compare in fp32 with the dtype's tolerance; on failure say where and by how much."""
    atol, rtol = TOL[dtype]
    a, e = actual.float(), expected.float()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs err {err.max().item():.3g}; first at index {idx}: "
            f"got {a[idx].item():.6g}, expected {e[idx].item():.6g}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_o(B, H, Q, dh, dtype, layout, seed):
    """O [B, H, Q, dh]; layout "bqhd" is the usual view of a [B, Q, H*dh] attention output."""
    g = _gen(seed)
    if layout == "bqhd":
        O = torch.randn(B, Q, H, dh, generator=g).transpose(1, 2)
    else:
        O = torch.randn(B, H, Q, dh, generator=g)
    return O.to(DEVICE, dtype)


def make_m(H, dh, E, dtype, layout, seed):
    """M [H, dh, E] scaled by 1/sqrt(dh); layout "hed" is a transposed (non-contiguous) view."""
    g = _gen(seed)
    if layout == "hed":
        M = torch.randn(H, E, dh, generator=g).transpose(1, 2)
    else:
        M = torch.randn(H, dh, E, generator=g)
    return (M / dh ** 0.5).to(DEVICE, dtype)


def make_scale(B, Q, kind, seed):
    if kind is None:
        return None
    if kind == "expanded":  # one value per image, broadcast over rows: stride 0 along Q
        return (torch.rand(B, 1, generator=_gen(seed)) + 0.5).to(DEVICE).expand(B, Q)
    return (torch.rand(B, Q, generator=_gen(seed)) + 0.5).to(DEVICE, kind)


def make_av(B, H, Q, N, dh, dtype, seed):
    g = _gen(seed)
    A = torch.softmax(3 * torch.randn(B, H, Q, N, generator=g), dim=-1)
    V = torch.randn(B, H, N, dh, generator=g)
    return A.to(DEVICE, dtype), V.to(DEVICE, dtype)


# ---------------------------------------------------------------------------------------------
# head_projection: a covering subset of the grid (each awkward N/Q, dh, H, dtype at least once)
# ---------------------------------------------------------------------------------------------
#        B, H,  Q,   dh, E,   dtype,  center, scale,          O layout, M layout
HP_CASES = [
    (2, 3, 1, 32, 24, "fp32", False, None, "bhqd", "hde"),
    (2, 6, 50, 48, 40, "bf16", True, torch.float32, "bqhd", "hde"),
    (1, 12, 197, 64, 72, "fp16", True, torch.float16, "bqhd", "hed"),
    (1, 16, 257, 80, 24, "fp32", True, torch.float32, "bqhd", "hde"),
    (2, 12, 1, 80, 100, "bf16", False, "expanded", "bhqd", "hed"),
    (1, 3, 577, 48, 33, "fp32", True, None, "bhqd", "hed"),
    (1, 6, 197, 32, 16, "fp16", False, torch.bfloat16, "bqhd", "hde"),
]


@needs_kernel
@pytest.mark.parametrize("B,H,Q,dh,E,dt,center,scale_kind,o_layout,m_layout", HP_CASES)
def test_head_projection_matches_reference(B, H, Q, dh, E, dt, center, scale_kind, o_layout,
                                           m_layout):
    dtype = DTYPES[dt]
    O = make_o(B, H, Q, dh, dtype, o_layout, seed=1)
    M = make_m(H, dh, E, dtype, m_layout, seed=2)
    s = make_scale(B, Q, scale_kind, seed=3)
    got = K.head_projection(O, M, s, center=center, backend="triton")
    assert got.dtype == dtype and got.shape == (H, B, Q, E)
    assert_close(got, K.head_projection_reference(O, M, s, center=center), dtype,
                 "head_projection")
    if dtype != torch.float32:  # fp32 output from half inputs: compare at fp32 tolerance
        got32 = K.head_projection(O, M, s, center=center, backend="triton",
                                  out_dtype=torch.float32)
        assert got32.dtype == torch.float32
        assert_close(got32, K.head_projection_reference(O, M, s, center=center,
                                                        out_dtype=torch.float32),
                     torch.float32, "head_projection out_dtype=float32")
    if center:  # centering is per row: every row sums to ~0 over E
        assert_close(got.float().mean(-1), torch.zeros(H, B, Q, device=got.device), dtype,
                     "row means after centering")


@needs_kernel
def test_head_projection_backends_agree_and_auto():
    O = make_o(2, 3, 5, 48, torch.float32, "bqhd", seed=4)
    M = make_m(3, 48, 40, torch.float32, "hde", seed=5)
    s = make_scale(2, 5, torch.float32, seed=6)
    a = K.head_projection(O, M, s, center=True, backend="torch")
    b = K.head_projection(O, M, s, center=True, backend="triton")
    c = K.head_projection(O, M, s, center=True)  # auto
    assert_close(b, a, torch.float32, "triton vs torch backend")
    assert_close(c, a, torch.float32, "auto vs torch backend")


@needs_kernel
def test_head_projection_empty():
    O = torch.zeros(0, 3, 4, 32, device=DEVICE)
    M = torch.zeros(3, 32, 16, device=DEVICE)
    assert K.head_projection(O, M, backend="triton").shape == (3, 0, 4, 16)


# ---------------------------------------------------------------------------------------------
# token_contributions
# ---------------------------------------------------------------------------------------------
#        B, H,  Q,   N,   dh, E,  dtype,  scale,          M layout
TC_CASES = [
    (2, 3, 1, 50, 32, 24, "fp32", None, "hde"),
    (1, 3, 50, 50, 48, 40, "bf16", torch.float32, "hed"),
    (1, 6, 1, 197, 64, 72, "fp16", torch.float16, "hde"),
    (1, 3, 197, 197, 80, 16, "fp32", torch.float32, "hde"),
    (1, 12, 1, 257, 80, 24, "bf16", "expanded", "hed"),
    (1, 3, 257, 257, 64, 16, "fp16", None, "hde"),
    (1, 16, 1, 577, 48, 24, "fp32", torch.bfloat16, "hed"),
]


@needs_kernel
@pytest.mark.parametrize("B,H,Q,N,dh,E,dt,scale_kind,m_layout", TC_CASES)
def test_token_contributions_matches_reference(B, H, Q, N, dh, E, dt, scale_kind, m_layout):
    dtype = DTYPES[dt]
    A, V = make_av(B, H, Q, N, dh, dtype, seed=7)
    M = make_m(H, dh, E, dtype, m_layout, seed=8)
    s = make_scale(B, Q, scale_kind, seed=9)

    full = K.token_contributions(A, V, M, s, backend="triton")
    assert full.dtype == dtype and full.shape == (B, H, Q, N, E)
    assert_close(full, K.token_contributions_reference(A, V, M, s), dtype, "token_contributions")

    pooled = K.token_contributions(A, V, M, s, reduce_q=True, backend="triton")
    assert pooled.shape == (B, H, N, E)
    assert_close(pooled, K.token_contributions_reference(A, V, M, s, reduce_q=True), dtype,
                 "token_contributions reduce_q")
    # reduce_q equals the sum over q of the unreduced result (fp32 outputs: no rounding between)
    full32 = K.token_contributions(A, V, M, s, backend="triton", out_dtype=torch.float32)
    pooled32 = K.token_contributions(A, V, M, s, reduce_q=True, backend="triton",
                                     out_dtype=torch.float32)
    assert_close(pooled32, full32.sum(dim=2), torch.float32, "reduce_q vs sum over q")


@needs_kernel
def test_token_contributions_mean_pool_577():
    """A mean-pooled target over all 577 tokens (ViT-L/14 @ 336): reduce_q only, so the
    [B, H, Q, N, E] tensor is never formed by the kernel."""
    B, H, N, dh, E = 1, 3, 577, 64, 16
    A, V = make_av(B, H, N, N, dh, torch.float32, seed=15)
    M = make_m(H, dh, E, torch.float32, "hed", seed=16)
    s = make_scale(B, N, torch.float32, seed=17) / N  # frozen 1/sigma and the mean's 1/Q
    got = K.token_contributions(A, V, M, s, reduce_q=True, backend="triton")
    assert_close(got, K.token_contributions_reference(A, V, M, s, reduce_q=True), torch.float32,
                 "reduce_q at N = Q = 577")


@needs_kernel
@pytest.mark.parametrize("B,H,Q,N,dh,E", [(2, 3, 1, 50, 48, 40), (1, 6, 257, 257, 80, 24)])
def test_sum_over_tokens_equals_head_projection(B, H, Q, N, dh, E):
    """sum_n token_contributions(A, V, M, s) == head_projection(A @ V, M, s), up to layout; and
    with M centered over E it equals head_projection(..., center=True) (centering is linear)."""
    A, V = make_av(B, H, Q, N, dh, torch.float32, seed=10)
    M = make_m(H, dh, E, torch.float32, "hde", seed=11)
    s = make_scale(B, Q, torch.float32, seed=12)
    per_token = K.token_contributions(A, V, M, s, backend="triton")
    heads = K.head_projection(A @ V, M, s, backend="triton")  # [H, B, Q, E]
    assert_close(per_token.sum(dim=3), heads.permute(1, 0, 2, 3), torch.float32,
                 "sum over n vs head_projection")
    Mc = M - M.mean(dim=-1, keepdim=True)
    per_token_c = K.token_contributions(A, V, Mc, s, backend="triton")
    heads_c = K.head_projection(A @ V, M, s, center=True, backend="triton")
    assert_close(per_token_c.sum(dim=3), heads_c.permute(1, 0, 2, 3), torch.float32,
                 "centered: sum over n vs head_projection(center=True)")


@needs_kernel
def test_token_contributions_backends_agree_and_auto():
    A, V = make_av(2, 3, 4, 50, 32, torch.float32, seed=13)
    M = make_m(3, 32, 24, torch.float32, "hde", seed=14)
    a = K.token_contributions(A, V, M, backend="torch")
    b = K.token_contributions(A, V, M, backend="triton")
    c = K.token_contributions(A, V, M)  # auto
    assert_close(b, a, torch.float32, "triton vs torch backend")
    assert_close(c, a, torch.float32, "auto vs torch backend")


@needs_kernel
def test_token_contributions_empty():
    A = torch.zeros(2, 3, 0, 10, device=DEVICE)
    V = torch.zeros(2, 3, 10, 32, device=DEVICE)
    M = torch.zeros(3, 32, 16, device=DEVICE)
    assert K.token_contributions(A, V, M, backend="triton").shape == (2, 3, 0, 10, 16)
    pooled = K.token_contributions(A, V, M, reduce_q=True, backend="triton")
    assert pooled.shape == (2, 3, 10, 16) and not pooled.any()


# ---------------------------------------------------------------------------------------------
# the interpreter child process (CPU machines)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(KERNEL_HERE or not _common.HAS_TRITON or os.environ.get(_CHILD_FLAG) == "1",
                    reason="kernel cases already run in this process (GPU or interpreter mode), "
                           "or triton is not installed")
def test_kernel_cases_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x",
         "-p", "no:cacheprovider"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"kernel cases failed under TRITON_INTERPRET=1:\n{tail}"
    assert " passed" in proc.stdout, tail


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile for a GPU we do not have (catches codegen / shared-memory problems)
# ---------------------------------------------------------------------------------------------
def _compile_sm90(kernel, ptr_types, consts, cfg):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    consts = {**consts, **cfg.kwargs}
    sig = {name: "constexpr" if name in consts else ptr_types.get(name, "i32")
           for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert compiled.asm["cubin"], "no cubin"
    assert compiled.metadata.shared <= 227 * 1024, f"shared memory {compiled.metadata.shared}"


@pytest.mark.skipif(not _common.HAS_TRITON or IN_INTERPRETER,
                    reason="needs triton in compiled (non-interpreter) mode")
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dt):
    """Every autotune config of both kernels compiles to an sm_90 cubin (no GPU needed)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton's NVIDIA backend unavailable: {exc}")
    # (the package re-exports functions of the same names: import the modules themselves)
    hp_mod = importlib.import_module("fxdecomp_kernels.head_projection")
    tc_mod = importlib.import_module("fxdecomp_kernels.token_contributions")

    t, prec = {"bf16": ("bf16", None), "fp32": ("fp32", "ieee")}[dt]
    configs_hp = hp_mod._CONFIGS if dt == "bf16" else hp_mod._CONFIGS[-1:]
    configs_tc = tc_mod._CONFIGS if dt == "bf16" else tc_mod._CONFIGS[-1:]
    for cfg in configs_hp:
        _compile_sm90(hp_mod._head_projection_kernel,
                      {"O_ptr": "*" + t, "M_ptr": "*" + t, "MBAR_ptr": "*fp32",
                       "S_ptr": "*fp32", "OUT_ptr": "*" + t},
                      dict(HAS_SCALE=True, CENTER=True, INPUT_PRECISION=prec, DOT_UPCAST=False),
                      cfg)
    for cfg in configs_tc:
        for reduce_q in (False, True):
            _compile_sm90(tc_mod._token_contributions_kernel,
                          {"A_ptr": "*" + t, "V_ptr": "*" + t, "M_ptr": "*" + t,
                           "S_ptr": "*fp32", "OUT_ptr": "*" + t},
                          dict(HAS_SCALE=True, REDUCE_Q=reduce_q, INPUT_PRECISION=prec,
                               DOT_UPCAST=False, BLOCK_Q=tc_mod._GPU_BLOCK_Q), cfg)


@pytest.mark.skipif(not _common.HAS_TRITON, reason="triton not installed")
def test_token_config_pruning():
    tc_mod = importlib.import_module("fxdecomp_kernels.token_contributions")
    cls = tc_mod._prune_configs(tc_mod._CONFIGS, {"Q": 1}, REDUCE_Q=False)
    assert cls and all(c.kwargs["Q_PER_PROGRAM"] == 1 for c in cls)
    assert len(tc_mod._prune_configs(tc_mod._CONFIGS, {"Q": 197}, REDUCE_Q=False)) == \
        len(tc_mod._CONFIGS)
    pooled = tc_mod._prune_configs(tc_mod._CONFIGS, {"Q": 197}, REDUCE_Q=True)
    assert 0 < len(pooled) < len(tc_mod._CONFIGS)


# ---------------------------------------------------------------------------------------------
# validation and backend choice (no kernel launched; run in every process)
# ---------------------------------------------------------------------------------------------
def _hp_inputs():
    return torch.randn(2, 3, 5, 8), torch.randn(3, 8, 16), torch.rand(2, 5)


def _tc_inputs():
    return torch.rand(2, 3, 5, 7), torch.randn(2, 3, 7, 8), torch.randn(3, 8, 16), torch.rand(2, 5)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("mutate,match", [
    (lambda O, M, s: (O[0], M, s), r"O must have rank 4 \[B, H, Q, dh\]"),
    (lambda O, M, s: (O, M[0], s), r"M must have rank 3"),
    (lambda O, M, s: (O, M[:2], s), r"disagree on H \(3 vs 2\)"),
    (lambda O, M, s: (O, M[:, :6], s), r"dh \(8 vs 6\)"),
    (lambda O, M, s: (O.double(), M.double(), s), r"O dtype must be one of"),
    (lambda O, M, s: (O.int(), M, s), r"O dtype must be one of"),
    (lambda O, M, s: (O, M.half(), s), r"O and M must share a dtype"),
    (lambda O, M, s: (O, M.to("meta"), s), r"one device.*device meta"),
    (lambda O, M, s: (O, M, s[:, :4]), r"scale must have shape \[B, Q\] = \(2, 5\)"),
    (lambda O, M, s: (O, M, s.double()), r"scale dtype"),
    (lambda O, M, s: (O, M, s.to("meta")), r"scale must be on cpu"),
    (lambda O, M, s: (O.numpy(), M, s), r"O must be a torch.Tensor"),
])
def test_head_projection_validation(mutate, match, backend):
    O, M, s = mutate(*_hp_inputs())
    with pytest.raises(K.KernelInputError, match=match):
        K.head_projection(O, M, s, backend=backend)
    with pytest.raises(ValueError, match=match):  # KernelInputError is a ValueError
        K.head_projection_reference(O, M, s)


@pytest.mark.parametrize("mutate,match", [
    (lambda A, V, M, s: (A[0], V, M, s), r"A must have rank 4 \[B, H, Q, N\]"),
    (lambda A, V, M, s: (A, V[..., 0], M, s), r"V must have rank 4"),
    (lambda A, V, M, s: (A[:, :, :, :6], V, M, s), r"disagree on B, H or N"),
    (lambda A, V, M, s: (A[:1], V, M, s[:1]), r"disagree on B, H or N"),
    (lambda A, V, M, s: (A, V, M[:, :4], s), r"dh \(8 vs 4\)"),
    (lambda A, V, M, s: (A[:, :2], V[:, :2], M, s), r"disagree on H \(2 vs 3\)"),
    (lambda A, V, M, s: (A, V.bfloat16(), M, s), r"A and V must share a dtype"),
    (lambda A, V, M, s: (A, V, M.to("meta"), s), r"one device"),
    (lambda A, V, M, s: (A, V, M, s.T), r"scale must have shape \[B, Q\] = \(2, 5\)"),
])
def test_token_contributions_validation(mutate, match):
    A, V, M, s = mutate(*_tc_inputs())
    with pytest.raises(K.KernelInputError, match=match):
        K.token_contributions(A, V, M, s)


def test_bad_backend_and_out_dtype():
    O, M, s = _hp_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        K.head_projection(O, M, s, backend="cuda")
    with pytest.raises(ValueError, match="out_dtype"):
        K.head_projection(O, M, s, out_dtype=torch.float64)
    assert K.head_projection(O, M, s, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_resolve_backend():
    x = torch.zeros(1)
    assert K.resolve_backend("torch", x) == "torch"
    assert K.resolve_backend("auto", x) == "torch"  # CPU tensors: reference, even in interpreter
    if HAS_CUDA and _common.HAS_TRITON:
        assert K.resolve_backend("auto", x.cuda()) == "triton"
    if IN_INTERPRETER:
        assert K.resolve_backend("triton", x) == "triton"


@pytest.mark.skipif(not _common.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("requested,match", [
    (False, r"needs CUDA tensors, got a tensor on cpu.*TRITON_INTERPRET=1"),
    (True, r"triton was imported before it was"),
])
def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch, requested, match):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "interpreter_requested", lambda: requested)
    O, M, s = _hp_inputs()
    with pytest.raises(RuntimeError, match=match):
        K.head_projection(O, M, s, backend="triton")
    A, V, M2, s2 = _tc_inputs()
    with pytest.raises(RuntimeError, match=match):
        K.token_contributions(A, V, M2, s2, backend="triton")


def test_reference_semantics_small():
    """The references against explicit loops on a tiny case (the obviously-correct path)."""
    O, M, s = _hp_inputs()
    ref = K.head_projection_reference(O, M, s, center=True)
    h, b, q = 2, 1, 3
    row = O[b, h, q] @ M[h]
    assert torch.allclose(ref[h, b, q], s[b, q] * (row - row.mean()), atol=1e-6)
    A, V, M, s = _tc_inputs()
    ref = K.token_contributions_reference(A, V, M, s)
    b, h, q, n = 1, 2, 4, 6
    assert torch.allclose(ref[b, h, q, n], s[b, q] * A[b, h, q, n] * (V[b, h, n] @ M[h]),
                          atol=1e-6)
    pooled = K.token_contributions_reference(A, V, M, s, reduce_q=True)
    assert torch.allclose(pooled, ref.sum(2), atol=1e-5)


# ------------------------------------------------------------------------------------ engine
@needs_kernel
@pytest.mark.parametrize("granularity", ["heads", "tokens"])
def test_engine_triton_backend_matches_torch(granularity):
    """The whole decomposition with backend="triton" (the fused per-head projection) equals
    backend="torch" on deit_tiny_patch16_224."""
    import fxdecomp
    from fxdecomp.capture.adapters import example_input, load_model
    model, info = load_model("timm:deit_tiny_patch16_224", random_init=True, seed=0)
    x = example_input(info, batch=1, seed=0).to(DEVICE)
    model = model.to(DEVICE)
    with torch.no_grad():
        ref = fxdecomp.decompose(model, x, granularity=granularity, backend="torch")(x)
        got = fxdecomp.decompose(model, x, granularity=granularity, backend="triton")(x)
    assert got.names == ref.names
    scale = float(ref.output.abs().max())
    torch.testing.assert_close(got.components, ref.components, rtol=1e-5, atol=1e-5 * scale)
    err = float((got.components.double().sum(0) - got.output.double()).abs().max()) / scale
    assert err <= 1e-5


@needs_kernel
def test_engine_projects_per_token_terms_with_the_token_kernel(monkeypatch):
    """Tokens mode of a mean-pooled ViT: each head's per-source-token terms reach the output as
    factors (the final mean's weight of every source token, its value row), projected by the
    fused ``token_contributions`` kernel with backend="triton" (once per attention layer); the
    components equal backend="torch" and sum to the output."""
    import timm

    import fxdecomp
    import fxdecomp_kernels
    calls = []
    kernel = fxdecomp_kernels.token_contributions

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fxdecomp_kernels, "token_contributions", spy)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, global_pool="avg",
                              class_token=False, num_classes=0).eval().to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        ref = fxdecomp.decompose(model, x, granularity="tokens", backend="torch")(x)
        assert not calls
        got = fxdecomp.decompose(model, x, granularity="tokens", backend="triton")(x)
    assert calls == ["triton", "triton"]
    assert got.names == ref.names and len(got.names) > 2 * 2 * 16
    scale = float(ref.output.abs().max())
    torch.testing.assert_close(got.components, ref.components, rtol=1e-5, atol=1e-5 * scale)
    err = float((got.components.double().sum(0) - got.output.double()).abs().max()) / scale
    assert err <= 1e-5


# ---------------------------------------------------------------------------------------------
# head_projection writing into a preallocated slab (the engine's write-once path)
# ---------------------------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("center,scale_kind", [(False, None), (True, torch.float32)])
def test_head_projection_out_writes_into_slab(center, scale_kind):
    """out= writes [H, B, Q, E] into a slice of a larger tensor, leaving the rest untouched,
    with the values of the reference; both backends."""
    B, H, Q, dh, E = 2, 3, 5, 16, 24
    O, M = make_o(B, H, Q, dh, torch.float32, "bhqd", 0), make_m(H, dh, E, torch.float32, "hde", 1)
    s = make_scale(B, Q, scale_kind, 2)
    ref = K.head_projection_reference(O, M, s, center)
    for backend in ("triton", "torch"):
        slab = torch.full((H + 2, B, Q, E), 7.0, device=DEVICE)
        got = K.head_projection(O, M, s, center, backend=backend, out=slab[1:H + 1])
        assert got.data_ptr() == slab[1].data_ptr()
        assert_close(slab[1:H + 1], ref, torch.float32, f"head_projection out= ({backend})")
        assert bool((slab[0] == 7).all()) and bool((slab[H + 1] == 7).all())


@needs_kernel
@pytest.mark.parametrize("reduce_q", [True, False])
def test_token_contributions_out_writes_into_slab(reduce_q):
    """out= writes the per-token contributions into a strided slice of a larger tensor, leaving
    the rest untouched, with the values of the reference; both backends."""
    B, H, Q, N, dh, E = 2, 3, 2, 7, 16, 12
    A, V = make_av(B, H, Q, N, dh, torch.float32, seed=21)
    M, s = make_m(H, dh, E, torch.float32, "hde", 22), make_scale(B, Q, torch.float32, 23)
    ref = K.token_contributions_reference(A, V, M, s, reduce_q)
    for backend in ("triton", "torch"):
        slab = torch.full((B, H, N + 2) + ref.shape[3:], 7.0, device=DEVICE) if reduce_q else \
            torch.full((B, H, Q, N + 2, E), 7.0, device=DEVICE)
        view = slab[:, :, 1:N + 1] if reduce_q else slab[:, :, :, 1:N + 1]
        got = K.token_contributions(A, V, M, s, reduce_q, backend=backend, out=view)
        assert got.data_ptr() == view.data_ptr()
        assert_close(view, ref, torch.float32, f"token_contributions out= ({backend})")
        edges = (slab[:, :, [0, N + 1]] if reduce_q else slab[:, :, :, [0, N + 1]])
        assert bool((edges == 7).all())


def test_token_contributions_out_rejects_wrong_shape():
    A, V, M = torch.rand(1, 2, 1, 5), torch.randn(1, 2, 5, 4), torch.randn(2, 4, 3)
    with pytest.raises(K.KernelInputError, match="out must be"):
        K.token_contributions(A, V, M, reduce_q=True, backend="torch", out=torch.empty(1, 2, 1, 5, 3))


def test_head_projection_out_rejects_wrong_shape():
    O, M = torch.randn(1, 2, 3, 4), torch.randn(2, 4, 5)
    with pytest.raises(K.KernelInputError, match="out must be"):
        K.head_projection(O, M, backend="torch", out=torch.empty(2, 1, 3, 4))


@needs_kernel
@pytest.mark.parametrize("center,scale_kind", [(False, None), (True, torch.float32)])
def test_head_projection_gradients_agree_between_backends(center, scale_kind):
    """The Triton forward is wrapped so autograd gives the reference's gradients (O, M, scale)."""
    B, H, Q, dh, E = 2, 3, 4, 16, 24
    grads = {}
    for backend in ("triton", "torch"):
        O = make_o(B, H, Q, dh, torch.float32, "bhqd", 0).requires_grad_(True)
        M = make_m(H, dh, E, torch.float32, "hde", 1).requires_grad_(True)
        s = make_scale(B, Q, scale_kind, 2)
        s = s.clone().requires_grad_(True) if s is not None else None
        w = torch.randn(H, B, Q, E, generator=_gen(3)).to(DEVICE)
        y = K.head_projection(O, M, s, center, backend=backend)
        inputs = [O, M] + ([s] if s is not None else [])
        grads[backend] = torch.autograd.grad((y * w).sum(), inputs)
    for a, b in zip(grads["triton"], grads["torch"]):
        assert_close(a, b, torch.float32, "head_projection gradient")
