"""Each fused kernel on its own, for every fused backend on this machine, against float64
formulas: sizes 1, 7, 100003, every dtype, fresh random inputs."""

from __future__ import annotations

import functools
import types

import pytest
import torch

import samfast
import samfast.ops
from samfast.backends import resolve_backend

FUSED = [b for b in samfast.available_backends("cpu") if b != "reference"]
# "spec": the reference implementations of the op contract (samfast/ops.py), which
# samfast-doctor compares the kernels against, are held to the same float64 formulas.
KERNELS = FUSED + ["spec"]
SIZES = [1, 7, 100003]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def ops_of(backend: str):
    if backend == "spec":
        return types.SimpleNamespace(**samfast.ops.REFERENCE)
    return resolve_backend(backend, {torch.device("cpu")}).ops


def rand(n: int, dtype, gen) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)


def assert_storage_close(got: torch.Tensor, want64: torch.Tensor, magnitude: torch.Tensor,
                         roundings: int = 1) -> None:
    """``got`` is the float64 result ``want64`` computed in opmath (fp32, fp64 for fp64) and
    rounded ``roundings`` times to storage: at most half an ulp of storage per rounding plus a
    few ulps of opmath on ``magnitude`` (the sum of the |terms|, where cancellation bites)."""
    opmath = torch.float64 if got.dtype == torch.float64 else torch.float32
    bound = (roundings * 0.5 * torch.finfo(got.dtype).eps * want64.abs()
             + 8 * torch.finfo(opmath).eps * magnitude + torch.finfo(got.dtype).tiny)
    err = (got.double() - want64).abs()
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3e}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_sq_norm_and_nonfinite(backend, dtype, n):
    ops = ops_of(backend)
    gen = torch.Generator().manual_seed(n)
    g, w = rand(n, dtype, gen), rand(n, dtype, gen)
    for adaptive, eta in ((False, 0.0), (True, 0.0), (True, 0.01)):
        t = (w.double().abs() + eta) if adaptive else 1.0
        want = float(((t * g.double()) ** 2).sum())
        got = ops.sq_norm(g, w, adaptive, eta)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert abs(float(got) - want) <= tol * want
        assert torch.equal(got, ops.sq_norm(g, w, adaptive, eta))  # deterministic
    assert float(ops.nonfinite(g)) == 0
    bad = g.clone()
    idx = torch.randint(0, n, (min(n, 3),), generator=gen).unique()
    bad[idx[0]] = float("nan")
    if len(idx) > 1:
        signs = torch.sign(torch.randn(len(idx) - 1, generator=gen)).to(dtype)
        bad[idx[1:]] = float("inf") * signs
    assert float(ops.nonfinite(bad)) == len(idx)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_ascent(backend, dtype, n):
    ops = ops_of(backend)
    gen = torch.Generator().manual_seed(7 * n)
    w, g = rand(n, dtype, gen), rand(n, dtype, gen)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(0.37, dtype=opmath)
    for adaptive, eta in ((False, 0.0), (True, 0.01)):
        w1, backup = w.clone(), torch.full_like(w, 5.0)
        ops.ascent_(w1, g, backup, scale, torch.tensor(False), adaptive, eta)
        assert torch.equal(backup, w)
        t2 = (w.double().abs() + eta) ** 2 if adaptive else 1.0
        e = float(scale) * t2 * g.double()
        assert_storage_close(w1, w.double() + e, w.double().abs() + e.abs())
        w2 = w.clone()
        ops.ascent_(w2, g, backup, scale, torch.tensor(True), adaptive, eta)
        assert torch.equal(w2, w), "skip flag set: weights must not move"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_restore_sgd(backend, dtype, n):
    ops = ops_of(backend)
    gen = torch.Generator().manual_seed(11 * n)
    w, g, backup, buf = (rand(n, dtype, gen) for _ in range(4))
    lr, mom, damp, wd = 0.1, 0.9, 0.1, 5e-4
    lr_t = torch.tensor(lr, dtype=torch.float64)  # the kernels read lr on the device
    for momentum, nesterov, first in ((0.0, False, False), (mom, False, False),
                                      (mom, True, False), (mom, False, True)):
        w1, buf1 = w.clone(), buf.clone()
        ops.restore_sgd_(w1, g, backup, buf1, torch.tensor(False), lr_t, momentum, damp, wd,
                         nesterov, torch.tensor(not first))
        d = g.double() + wd * backup.double()
        if momentum:
            b = d if first else momentum * buf.double() + (1 - damp) * d
            assert_storage_close(buf1, b, (momentum * buf.double()).abs() + d.abs())
            b = buf1.double()
            d = d + momentum * b if nesterov else b
        else:
            assert torch.equal(buf1, buf)
        # the update reads the buffer as stored, so its rounding is already in d
        assert_storage_close(w1, backup.double() - lr * d,
                             backup.double().abs() + lr * (d.abs() + g.double().abs()))
        w2, buf2 = w.clone(), buf.clone()
        ops.restore_sgd_(w2, g, backup, buf2, torch.tensor(True), lr_t, momentum, damp, wd,
                         nesterov, torch.tensor(not first))
        assert torch.equal(w2, backup) and torch.equal(buf2, buf), "skip: restore only"


def assert_same_as_reference(op: str, got: torch.Tensor, first: torch.Tensor, *rest):
    """``got``, what ``op`` made of its in-place argument ``first`` (called with ``rest``),
    equals the reference implementation's result bit for bit (the same operations in opmath,
    one rounding); returns the reference's return value."""
    want = first.clone()
    out = samfast.ops.REFERENCE[op](want, *rest)
    assert torch.equal(got, want), f"{op}: differs from the reference implementation"
    return out


def sum_tolerance(dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_looksam_dots(backend, dtype, n):
    ops = ops_of(backend)
    gen = torch.Generator().manual_seed(13 * n)
    g, gs = rand(n, dtype, gen), rand(n, dtype, gen)
    got = ops.looksam_dots(g, gs)
    assert got.shape == (2,)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    products = g.double() * gs.double()
    # the dot cancels: its error is measured against the sum of the |terms|
    assert abs(float(got[0]) - float(products.sum())) <= \
        sum_tolerance(dtype) * float(products.abs().sum())
    sq = float(g.double().square().sum())
    assert abs(float(got[1]) - sq) <= sum_tolerance(dtype) * sq
    assert torch.equal(got, ops.looksam_dots(g, gs))  # deterministic


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_looksam_project(backend, dtype, n):
    ops = ops_of(backend)
    gen = torch.Generator().manual_seed(17 * n)
    g, gs = rand(n, dtype, gen), rand(n, dtype, gen)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.tensor(0.37, dtype=opmath)
    gv = g.clone()
    sq = ops.looksam_project_(gv, gs, coef, torch.tensor(False))
    assert sq.shape == () and sq.dtype == opmath
    term = float(coef) * g.double()
    assert_storage_close(gv, gs.double() - term, gs.double().abs() + term.abs())
    stored = float(gv.double().square().sum())
    assert abs(float(sq) - stored) <= sum_tolerance(dtype) * stored  # of the values as stored
    if backend != "spec":
        assert_same_as_reference("looksam_project_", gv, g, gs, coef, torch.tensor(False))
    gv = g.clone()
    sq = ops.looksam_project_(gv, gs, coef, torch.tensor(True))
    assert torch.equal(gv, g), "skip flag set: g_v must not change"
    assert abs(float(sq) - float(g.double().square().sum())) <= \
        sum_tolerance(dtype) * float(g.double().square().sum())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_looksam_reuse(backend, dtype, n):
    ops = ops_of(backend)
    gen = torch.Generator().manual_seed(19 * n)
    g, gv = rand(n, dtype, gen), rand(n, dtype, gen)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.tensor(1.7, dtype=opmath)
    g1 = g.clone()
    ops.looksam_reuse_(g1, gv, coef, torch.tensor(False))
    term = float(coef) * gv.double()
    assert_storage_close(g1, g.double() + term, g.double().abs() + term.abs())
    if backend != "spec":
        assert_same_as_reference("looksam_reuse_", g1, g, gv, coef, torch.tensor(False))
    g2 = g.clone()
    ops.looksam_reuse_(g2, gv, coef, torch.tensor(True))
    assert torch.equal(g2, g), "skip flag set: g must not change"


@pytest.mark.parametrize("backend", KERNELS)
def test_plain_sgd_step_with_backup_aliasing_w(backend):
    ops = ops_of(backend)
    gen = torch.Generator().manual_seed(3)
    w, g, buf = (rand(1000, torch.float32, gen) for _ in range(3))
    w1, buf1 = w.clone(), buf.clone()
    ops.restore_sgd_(w1, g, w1, buf1, torch.tensor(False), torch.tensor(0.1, dtype=torch.float64),
                     0.9, 0.0, 0.0, False, torch.tensor(True))
    b = 0.9 * buf.double() + g.double()
    torch.testing.assert_close(w1.double(), w.double() - 0.1 * buf1.double())
    torch.testing.assert_close(buf1.double(), b)


@pytest.mark.skipif("native" not in FUSED, reason="samfast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_native_reductions_over_many_blocks(dtype):
    """The CPU reductions sum blocks of 32768 elements, four adjacent blocks at a time; how
    blocks group depends on the thread count (each thread takes a range of blocks). A buffer
    that is zero but for one block shows that block's sum itself (a total over all blocks
    would absorb a last-bit difference), so equal bits across thread counts for every block
    show that a block's sum does not depend on its grouping."""
    block, n = 32768, 9 * 32768 + 5095  # nine full blocks and a partial one
    gen = torch.Generator().manual_seed(17)
    g, w = rand(n, dtype, gen), rand(n, dtype, gen)
    bad = g.clone()
    where = torch.tensor([0, 32767, 4 * 32768 + 3, 8 * 32768 + 100, n - 1])
    bad[where] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"),
                               float("inf")], dtype=dtype)
    probes = []
    for b in range(10):
        probe = torch.zeros_like(g)
        probe[b * block:(b + 1) * block] = g[b * block:(b + 1) * block]
        probes.append(probe)

    def reductions():
        # (LookSAM's two sums and its projection's sum of squares as well)
        coef = torch.tensor(0.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        return ([torch.ops.samfast.sq_norm(x, w, adaptive, 0.01)
                 for x in [g] + probes for adaptive in (False, True)]
                + [torch.ops.samfast.looksam_dots(x, w) for x in [g] + probes]
                + [torch.ops.samfast.looksam_project_(x.clone(), w, coef, torch.tensor(False))
                   for x in [g] + probes],
                float(torch.ops.samfast.nonfinite(bad)))

    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3, 4, 5):
            torch.set_num_threads(t)
            results.append(reductions())
    finally:
        torch.set_num_threads(threads)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    sums, count = results[0]
    want = [float((t * x.double()).pow(2).sum())
            for x in [g] + probes for t in (1.0, w.double().abs() + 0.01)]
    for got, exact in zip(sums, want):
        assert abs(float(got) - exact) <= tol * exact
    dots = sums[len(want):len(want) + 1 + len(probes)]
    for got, x in zip(dots, [g] + probes):
        products = x.double() * w.double()
        assert abs(float(got[0]) - float(products.sum())) <= tol * float(products.abs().sum())
        assert abs(float(got[1]) - float(x.double().square().sum())) <= \
            tol * float(x.double().square().sum())
    assert count == len(where)
    for other_sums, other_count in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(sums, other_sums))
        assert other_count == len(where)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    """Each implementation against the op contract: schema (mutations as declared), fake
    implementation, and tracing (torch.library.opcheck)."""
    ops = ops_of(backend)
    g, w, backup, buf = (torch.randn(37) for _ in range(4))
    flag = functools.partial(torch.tensor, dtype=torch.bool)
    torch.library.opcheck(ops.sq_norm, (g, w, True, 0.1))
    torch.library.opcheck(ops.nonfinite, (g,))
    torch.library.opcheck(ops.ascent_, (w.clone(), g, backup.clone(), torch.tensor(0.1),
                                        flag(False), False, 0.0))
    for started in (False, True):
        torch.library.opcheck(ops.restore_sgd_,
                              (w.clone(), g, backup, buf.clone(), flag(False),
                               torch.tensor(0.1, dtype=torch.float64), 0.9, 0.0, 1e-4, True,
                               flag(started)))
    coef = torch.tensor(0.3)
    torch.library.opcheck(ops.looksam_dots, (g, w))
    for skip in (False, True):
        torch.library.opcheck(ops.looksam_project_, (backup.clone(), g, coef, flag(skip)))
        torch.library.opcheck(ops.looksam_reuse_, (buf.clone(), g, coef, flag(skip)))
    if backend == "triton":
        x = torch.rand(3, 2, 5, 5)
        for norm in ("linf", "l2"):
            torch.library.opcheck(ops.pgd_step, (x.clone(), torch.randn_like(x), x, 0.1, 0.02,
                                                 norm, 0.0, 1.0))


_BUILD_SCRIPT = r"""
import sys, torch, samfast
assert samfast.backends.native.load_error() is None
C = torch.ops.samfast
out = {}
lr = torch.tensor(0.1, dtype=torch.float64)
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(5)
    w, g, b, m = (torch.randn(100003 + 64, generator=gen, dtype=torch.float64).to(dtype)
                  for _ in range(4))
    # slices whose starts are not 64-byte aligned: the streaming stores need a scalar head
    for s, e in ((0, 100003), (3, 100067), (5, 12), (9, 10)):
        for adaptive in (False, True):
            ws, bs = w.clone(), b.clone()
            out[f"{dtype}-{s}-{adaptive}-norm"] = C.sq_norm(g[s:e], w[s:e], adaptive, 0.01)
            C.ascent_(ws[s:e], g[s:e], bs[s:e], torch.tensor(0.3, dtype=opmath),
                      torch.tensor(False), adaptive, 0.01)
            out[f"{dtype}-{s}-{adaptive}-ascent"] = (ws, bs)
        out[f"{dtype}-{s}-nonfinite"] = C.nonfinite(g[s:e])
        for mom, nesterov, first in ((0.0, False, False), (0.9, True, False), (0.9, False, True)):
            ws, ms = w.clone(), m.clone()
            C.restore_sgd_(ws[s:e], g[s:e], b[s:e], ms[s:e], torch.tensor(False), lr, mom,
                           0.1, 5e-4, nesterov, torch.tensor(not first))
            out[f"{dtype}-{s}-{mom}-{nesterov}-{first}-restore"] = (ws, ms)
            ws, ms = w.clone(), m.clone()  # a plain SGD step: backup is w itself
            C.restore_sgd_(ws[s:e], g[s:e], ws[s:e], ms[s:e], torch.tensor(False), lr, mom,
                           0.1, 5e-4, nesterov, torch.tensor(not first))
            out[f"{dtype}-{s}-{mom}-{nesterov}-{first}-sgd"] = (ws, ms)
        coef = torch.tensor(0.3, dtype=opmath)
        out[f"{dtype}-{s}-dots"] = C.looksam_dots(g[s:e], b[s:e])
        vs = g.clone()
        out[f"{dtype}-{s}-project"] = (C.looksam_project_(vs[s:e], b[s:e], coef,
                                                          torch.tensor(False)), vs)
        gs_ = g.clone()
        C.looksam_reuse_(gs_[s:e], b[s:e], coef, torch.tensor(False))
        out[f"{dtype}-{s}-reuse"] = gs_
    # the reductions walk four 32768-element blocks at once: nine blocks and a partial one
    big = torch.randn(9 * 32768 + 5101, generator=gen, dtype=torch.float64).to(dtype)
    for adaptive in (False, True):
        out[f"{dtype}-big-{adaptive}-norm"] = C.sq_norm(big[3:], big[:-3], adaptive, 0.01)
    out[f"{dtype}-big-dots"] = C.looksam_dots(big[3:], big[:-3])
    vs = big.clone()
    out[f"{dtype}-big-project"] = (C.looksam_project_(vs[3:], big[:-3],
                                                      torch.tensor(0.3, dtype=opmath),
                                                      torch.tensor(False)), vs)
    big[[5, 4 * 32768, 8 * 32768 + 7]] = float("nan")
    out[f"{dtype}-big-nonfinite"] = C.nonfinite(big[3:])
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif("native" not in FUSED, reason="samfast._C not built")
def test_native_cpu_builds_and_streaming_stores_agree_bitwise(tmp_path):
    """The kernels exist per ISA (SSE2, AVX2, AVX-512) and, for fp32/fp64, with or without
    streaming stores (csrc/cpu/kernels.h); all must give the same bits, for every dtype (fp16
    converts through c10 in the SSE2 build, through F16C / AVX-512 in the others). The default picks the
    best ISA and streams only big buffers, so the parity tests above cover one combination;
    this checks that every other agrees with it, on misaligned slices and odd sizes."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_BUILD_SCRIPT)
    results = {}
    for isa in ("default", "base", "avx2"):
        for stream in ("0", "1"):
            env = {k: v for k, v in os.environ.items()
                   if k not in ("SAMFAST_CPU_ISA", "SAMFAST_CPU_STREAM")}
            env["SAMFAST_CPU_STREAM"] = stream
            if isa != "default":
                env["SAMFAST_CPU_ISA"] = isa
            path = tmp_path / f"{isa}-{stream}.pt"
            subprocess.run([sys.executable, str(script), str(path)], env=env, check=True)
            results[(isa, stream)] = torch.load(path, weights_only=True)
    first_key, first = next(iter(results.items()))
    for key, res in results.items():
        for name, value in res.items():
            want = first[name]
            got_t = value if isinstance(value, tuple) else (value,)
            want_t = want if isinstance(want, tuple) else (want,)
            for a, b in zip(got_t, want_t):
                assert torch.equal(a, b), f"{key} differs from {first_key} in {name}"


@pytest.mark.skipif("native" not in FUSED, reason="samfast._C not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_16bit_kernels_round_like_torch_on_special_values(dtype):
    """The 16-bit CPU kernels (widened to float 16 elements at a time, converted back with
    their own code) against torch's float arithmetic and conversions, bit for bit, on signed
    zeros, subnormals, the largest finite values (the update overflows to inf), inf and NaN
    (compared as NaN: payloads may differ). 1000 elements: the line loop and a scalar tail."""
    fi = torch.finfo(dtype)
    vals = torch.tensor([0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 4, fi.max, -fi.max, fi.max / 2,
                         1.0, -1.5, float("inf"), -float("inf"), float("nan"), 3.14159, 1e-3,
                         fi.eps])
    gen = torch.Generator().manual_seed(0)
    w, g, m, b = (vals[torch.randint(0, len(vals), (1000,), generator=gen)].to(dtype)
                  for _ in range(4))

    def same_bits(got, want):
        return bool(((got.view(torch.int16) == want.view(torch.int16))
                     | (got.isnan() & want.isnan())).all())

    f32 = functools.partial(torch.tensor, dtype=torch.float32)
    scale, eta = f32(0.75), f32(0.01)
    for adaptive in (False, True):
        ws, bs = w.clone(), torch.empty_like(w)
        torch.ops.samfast.ascent_(ws, g, bs, scale, torch.tensor(False), adaptive, 0.01)
        t = w.float().abs() + eta
        e = (t * t) * g.float() if adaptive else g.float()
        assert same_bits(ws, (w.float() + e * scale).to(dtype)) and same_bits(bs, w)
    lr, damp, wd = 0.1, 0.1, 5e-4
    for mom, nesterov, first in ((0.0, False, False), (0.9, True, False), (0.9, False, False),
                                 (0.9, False, True)):
        ws, ms = w.clone(), m.clone()
        torch.ops.samfast.restore_sgd_(ws, g, b, ms, torch.tensor(False),
                                       torch.tensor(lr, dtype=torch.float64), mom, damp, wd,
                                       nesterov, torch.tensor(not first))
        d = g.float() + f32(wd) * b.float()
        if mom:
            stored = (d if first else m.float() * f32(mom) + (f32(1.0) - f32(damp)) * d).to(dtype)
            assert same_bits(ms, stored)
            d = d + f32(mom) * stored.float() if nesterov else stored.float()
        assert same_bits(ws, (b.float() - f32(lr) * d).to(dtype))
    assert float(torch.ops.samfast.nonfinite(g)) == int((~torch.isfinite(g)).sum())


@pytest.mark.parametrize("backend", KERNELS)
def test_nonfinite_counts_fp64_in_fp64(backend):
    """Finite fp64 values beyond fp32's range are finite (a cast to fp32 made them inf)."""
    ops = ops_of(backend)
    g = torch.tensor([1e300, -1e300, 3.5e38, 1e-320, 0.0, float("inf"), float("nan")],
                     dtype=torch.float64)
    assert float(ops.nonfinite(g)) == 2
    assert float(ops.nonfinite(g[:5])) == 0


@pytest.mark.skipif("native" not in FUSED, reason="samfast._C not built")
def test_native_checks_its_flag_and_scale_arguments():
    """skip/started must be one-element bool tensors and scale a one-element opmath tensor on
    the buffers' device: anything else is refused, not read as garbage."""
    w, g, b, m = (torch.randn(64) for _ in range(4))
    C = torch.ops.samfast
    lr = torch.tensor(0.1, dtype=torch.float64)
    ok = torch.tensor(False)
    with pytest.raises(RuntimeError, match="skip must be a one-element bool"):
        C.ascent_(w, g, b, torch.tensor(0.1), torch.tensor(0.0), False, 0.0)
    with pytest.raises(RuntimeError, match="scale must be a one-element"):
        C.ascent_(w, g, b, torch.tensor(0.1, dtype=torch.float64), ok, False, 0.0)
    with pytest.raises(RuntimeError, match="scale must be a one-element"):
        C.ascent_(w, g, b, torch.tensor([0.1, 0.2]), ok, False, 0.0)
    with pytest.raises(RuntimeError, match="started must be a one-element bool"):
        C.restore_sgd_(w, g, b, m, ok, lr, 0.9, 0.0, 0.0, False, torch.tensor([True, True]))
    with pytest.raises(RuntimeError, match="lr must be a one-element float64"):
        C.restore_sgd_(w, g, b, m, ok, torch.tensor(0.1), 0.9, 0.0, 0.0, False, ok)
    with pytest.raises(RuntimeError, match="coef must be a one-element"):
        C.looksam_project_(w, g, torch.tensor(0.1, dtype=torch.float64), ok)
    with pytest.raises(RuntimeError, match="coef must be a one-element"):
        C.looksam_reuse_(w, g, torch.tensor([0.1, 0.2]), ok)
    with pytest.raises(RuntimeError, match="skip must be a one-element bool"):
        C.looksam_reuse_(w, g, torch.tensor(0.1), torch.tensor(1))
    with pytest.raises(RuntimeError, match="gs has 63 elements"):
        C.looksam_dots(w, g[1:])
