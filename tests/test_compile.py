"""What the GPU kernels compile to, checked without a GPU.

* Triton: every kernel variant the backends launch (each op x dtype x constexpr flags, in the
  aligned and the unaligned specialization) is compiled ahead of time for sm_90 and sm_80 in a
  subprocess without TRITON_INTERPRET (the interpreter, which the other tests use, compiles
  nothing and so hides compile errors). Asserts: it compiles, ptxas spills no register, and the
  aligned variants of the streaming kernels move their buffers with 128-bit loads and stores.
* The flat buckets of real models (ResNet-20, WRN-16-8; fp32 and bf16) only ever produce
  launches of that aligned specialization.
* CUDA C++: csrc/cuda/samfast_cuda.cu compiled by nvcc for sm_90 and sm_80 with the build's
  flags: no spills, and the vector kernels' global accesses are 128-bit in the SASS.

Run with ``-s`` to see the register tables. Cost (csrc/README.md): ~60 s of CPU time, nvcc
running alongside the Triton compiles; both arches' full matrices fit in that, so sm_80 is not
trimmed to a subset.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
          "fp16": torch.float16}
SPILL_FIELDS = ("spill_stores", "spill_loads", "stack")
# Triton kernels' pointers to one-element flags and scalars, and the reductions' partial sums
SCALAR_POINTERS = {"scale_ptr", "skip_ptr", "lr_ptr", "started_ptr", "partial_ptr", "eta_ptr",
                   "hyper_ptr", "coef_ptr"}


# =============================================================================================
# what ptxas and the disassemblers print
# =============================================================================================

def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """``ptxas -v`` output -> {function: {regs, spill_stores, spill_loads, stack}}."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            name = f"{m.group(1)}@{m.group(2)}"
            out[name] = {}
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m:
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                             spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["regs"] = int(m.group(1))
    return out


def ptx_global_accesses(ptx: str) -> list[tuple[str, int]]:
    """Every global load/store of a PTX listing as (ld|st, bits moved by one instruction)."""
    accesses = []
    for m in re.finditer(r"\b(ld|st)\.global((?:\.[\w:]+)*)", ptx):
        parts = m.group(2).split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        width = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p))
        accesses.append((m.group(1), lanes * width))
    return accesses


def sass_global_accesses(sass: str) -> list[tuple[str, int]]:
    """Every LDG/STG of a SASS listing as (ld|st, bits); no width suffix means 32 bits."""
    accesses = []
    for m in re.finditer(r"\b(LDG|STG)((?:\.[\w]+)*)", sass):
        widths = [int(p) for p in m.group(2).split(".") if p.isdigit()]
        accesses.append(("ld" if m.group(1) == "LDG" else "st", widths[0] if widths else 32))
    return accesses


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def bundled_tool(name: str) -> str:
    """A tool shipped with Triton (cuobjdump), else the CUDA toolkit's."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    return shutil.which(name) or str(Path(find_nvcc() or "/nonexistent").parent / name)


# =============================================================================================
# Triton: the variants the backends launch
# =============================================================================================

@dataclasses.dataclass(frozen=True)
class Launch:
    """One call of a Triton launcher as the backends make it. ``aligned``: every buffer slice
    starts 16-byte aligned and its length is a multiple of 16 (samfast's flat layout);
    otherwise the slices start one element off and have an odd length."""
    op: str
    dtype: str
    aligned: bool
    flags: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return "-".join([self.op, self.dtype, *self.flags,
                         "aligned" if self.aligned else "unaligned"])


def launches() -> list[Launch]:
    out = []
    for dtype in DTYPES:
        for aligned in (True, False):
            for adaptive in ((), ("adaptive",)):
                out.append(Launch("sq_norm", dtype, aligned, adaptive))
                out.append(Launch("ascent_", dtype, aligned, adaptive))
            out.append(Launch("nonfinite", dtype, aligned))
            for sgd in ((), ("momentum",), ("momentum", "nesterov")):
                out.append(Launch("restore_sgd_", dtype, aligned, sgd))
                if aligned and sgd:
                    # The `started` flag of a run is the bool of its cohort's first param: any
                    # byte address, so its pointer may lose the divisibility attribute.
                    out.append(Launch("restore_sgd_", dtype, aligned, sgd + ("started+1",)))
            for op in ("looksam_dots", "looksam_project_", "looksam_reuse_"):
                out.append(Launch(op, dtype, aligned))
            for norm in ("linf", "l2"):
                out.append(Launch("pgd_step", dtype, aligned, (norm,)))
    # n >= 2^31: Triton passes n as an i64 (runs of over 2G elements, big models' buckets)
    for op, flags in (("sq_norm", ("adaptive",)), ("nonfinite", ()), ("ascent_", ("adaptive",)),
                      ("restore_sgd_", ("momentum", "nesterov")), ("looksam_dots", ()),
                      ("looksam_project_", ()), ("looksam_reuse_", ())):
        out.append(Launch(op, "fp32", True, flags + ("i64",)))
    return out


LAUNCHES = launches()


def call_launcher(launch: Launch) -> None:
    """Call the op's launcher on CPU tensors laid out as ``launch`` says."""
    from samfast.kernels import ascent, looksam, norm, pgd, restore

    dtype = DTYPES[launch.dtype]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    offset = 0 if launch.aligned else 1
    # a few programs and a partial one
    n = 3 * 4096 + 16 * 7 if launch.aligned else 3 * 4096 + 16 * 7 + 1
    if "i64" in launch.flags:
        n = 2**31 + 16 * 7

    def buffer(shape=(n,)):
        if "i64" in launch.flags:  # no memory: the launcher reads only numel and data_ptr
            return torch.zeros(1, dtype=dtype).expand(shape)
        numel = int(torch.tensor(shape).prod())
        flat = torch.zeros(numel + 64, dtype=dtype)
        return flat[offset:offset + numel].view(shape)

    def flag(value=False, at=0):
        return torch.zeros(16, dtype=torch.bool)[at:at + 1].reshape(()).fill_(value)

    if launch.op == "sq_norm":
        norm.sq_norm(buffer(), buffer(), "adaptive" in launch.flags, 0.01)
    elif launch.op == "nonfinite":
        norm.nonfinite(buffer())
    elif launch.op == "ascent_":
        ascent.ascent_(buffer(), buffer(), buffer(), torch.tensor(0.05, dtype=opmath), flag(),
                       "adaptive" in launch.flags, 0.01)
    elif launch.op == "restore_sgd_":
        w = buffer()
        momentum = 0.9 if "momentum" in launch.flags else 0.0
        # without momentum the backend passes the param buffer as buf (neither read nor written)
        buf = buffer() if momentum else w
        started = flag(True, at=1 if "started+1" in launch.flags else 0)
        restore.restore_sgd_(w, buffer(), buffer(), buf, flag(), torch.tensor(0.1).double(),
                             momentum, 0.0, 5e-4, "nesterov" in launch.flags, started)
    elif launch.op == "looksam_dots":
        looksam.looksam_dots(buffer(), buffer())
    elif launch.op == "looksam_project_":
        looksam.looksam_project_(buffer(), buffer(), torch.tensor(0.5, dtype=opmath), flag())
    elif launch.op == "looksam_reuse_":
        looksam.looksam_reuse_(buffer(), buffer(), torch.tensor(0.5, dtype=opmath), flag())
    elif launch.op == "pgd_step":
        shape = (8, 3, 32, 32) if launch.aligned else (8, 3, 7, 7)
        pgd.pgd_step(buffer(shape), buffer(shape), buffer(shape), 8 / 255, 2 / 255,
                     launch.flags[0], 0.0, 1.0)
    else:
        raise ValueError(launch.op)


def record_launch(launch: Launch):
    """(kernel, args, kwargs) of the one kernel launch the launcher makes."""
    from triton.runtime.jit import JITFunction

    calls = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    JITFunction.run = run
    try:
        call_launcher(launch)
    finally:
        JITFunction.run = original
    assert len(calls) == 1, f"{launch.id}: {len(calls)} launches"
    return calls[0]


def specialize(kernel, args, kwargs, backend):
    """signature, constexprs, attrs and options exactly as Triton's runtime derives them from
    the launch arguments (pointers with data_ptr % 16 == 0 and ints % 16 == 0 get
    tt.divisibility 16; an int equal to 1 becomes a constexpr)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    names = list(bound)
    signature = {name: s[0] for name, s in zip(names, spec)}
    constexprs = {(i,): bound[name] for i, (name, s) in enumerate(zip(names, spec))
                  if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str)}
    return signature, constexprs, attrs, options


def compile_launches(out_path: str) -> None:
    """Subprocess entry: compile every launch for every arch and write the metrics as JSON."""
    assert os.environ.get("TRITON_INTERPRET") != "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    cuobjdump = bundled_tool("cuobjdump")
    results, cache = [], {}
    start = time.perf_counter()
    for launch in LAUNCHES:
        kernel, args, kwargs = record_launch(launch)
        for arch in ARCHS:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            signature, constexprs, attrs, options = specialize(kernel, args, kwargs, backend)
            key = (kernel.__name__, arch, repr(signature), repr(constexprs), repr(attrs),
                   repr(sorted(options.items())))
            row = dict(launch=launch.id, arch=arch, kernel=kernel.__name__,
                       num_warps=options.get("num_warps", 4),
                       fp_fusion=options.get("enable_fp_fusion", True), signature=signature,
                       divisible=sorted(signature_names(signature, attrs)))
            if key not in cache:
                cache[key] = compile_one(kernel, signature, constexprs, attrs, options, target,
                                         cuobjdump, triton, ASTSource)
            row.update(cache[key])
            results.append(row)
    Path(out_path).write_text(json.dumps(
        dict(rows=results, seconds=time.perf_counter() - start, compiles=len(cache),
             triton=triton.__version__, kernels=all_kernels())))


def all_kernels() -> list[str]:
    """The @triton.jit kernels (not the helpers they call) of samfast.kernels."""
    from triton.runtime.jit import JITFunction

    from samfast.kernels import ascent, looksam, norm, pgd, restore

    return sorted(name for module in (ascent, looksam, norm, pgd, restore)
                  for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel"))


def signature_names(signature, attrs):
    names = list(signature)
    return [names[i] for (i,), a in attrs.items() if ["tt.divisibility", 16] in a]


def compile_one(kernel, signature, constexprs, attrs, options, target, cuobjdump, triton,
                ASTSource) -> dict:
    log = io.StringIO()
    try:
        # TRITON_DUMP_PTXAS_LOG (set by the parent) prints the `ptxas -v` log of the very
        # ptxas run that makes the cubin.
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=target, options=options)
    except Exception as exc:  # noqa: BLE001 - reported as the variant's failure
        return dict(error=f"{type(exc).__name__}: {exc}"[:4000])
    ptxas = parse_ptxas_log(log.getvalue())
    if len(ptxas) != 1:
        return dict(error=f"expected one ptxas report, got: {log.getvalue()[:2000]}")
    row = dict(next(iter(ptxas.values())))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    row.update(cubin_regs=int(m.group(1)), cubin_stack=int(m.group(2)),
               cubin_local=int(m.group(3)),
               accesses=ptx_global_accesses(compiled.asm["ptx"]))
    return row


@pytest.fixture(scope="module")
def triton_report(tmp_path_factory, nvcc_job):
    """(``nvcc_job`` is only requested to start nvcc first: it compiles meanwhile.)"""
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("triton_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_DUMP_PTXAS_LOG="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, __file__, "--triton", str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    report = json.loads(out.read_text())
    print_triton_table(report)
    rows = {(r["launch"], r["arch"]): r for r in report["rows"]}
    return dict(rows=rows, kernels=report["kernels"])


def print_triton_table(report) -> None:
    print(f"\nTriton {report['triton']}: {len(report['rows'])} launches, "
          f"{report['compiles']} distinct compiles in {report['seconds']:.1f} s")
    rows = sorted(report["rows"], key=lambda r: (-r["arch"], r["launch"]))
    print(f"{'launch':54} {'sm':>3} {'warps':>5} {'regs':>4} {'spill st/ld':>11} "
          f"{'128-bit ld/st':>13} {'other ld/st':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['launch']:54} {r['arch']:>3}  ERROR {r['error'][:80]}")
            continue
        wide = [k for k, bits in r["accesses"] if bits == 128]
        narrow = [k for k, bits in r["accesses"] if bits != 128]
        print(f"{r['launch']:54} {r['arch']:>3} {r['num_warps']:>5} {r['regs']:>4} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<5} "
              f"{wide.count('ld'):>6}/{wide.count('st'):<6} "
              f"{narrow.count('ld'):>5}/{narrow.count('st'):<5}")


def test_every_triton_kernel_is_compiled(triton_report):
    compiled = {r["kernel"] for r in triton_report["rows"].values()}
    assert compiled == set(triton_report["kernels"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.id)
def test_triton_variant_compiles_without_spills(triton_report, launch, arch):
    row = triton_report["rows"][launch.id, arch]
    assert "error" not in row, row.get("error")
    assert all(row[f] == 0 for f in SPILL_FIELDS), row
    # ptxas' report and the cubin's resource table describe the same binary
    assert (row["cubin_regs"], row["cubin_stack"], row["cubin_local"]) == (row["regs"], 0, 0)
    assert ("i64" in row["signature"].values()) == ("i64" in launch.flags), row["signature"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.id)
def test_triton_aligned_variant_moves_128_bits(triton_report, launch, arch):
    """The aligned specialization loads and stores its streams 128 bits at a time; the only
    narrower accesses are the one-element flags/scalars (scale, skip, lr, started) and a
    reduction's one partial sum. The unaligned one cannot (a check that the count works)."""
    row = triton_report["rows"][launch.id, arch]
    assert "error" not in row, row.get("error")
    wide = [k for k, bits in row["accesses"] if bits == 128]
    narrow = [k for k, bits in row["accesses"] if bits != 128]
    # the launch got the specialization its name says: its streams' pointers and its size are
    # divisible by 16 (or not)
    streams = {k for k, v in row["signature"].items() if v.startswith("*")} - SCALAR_POINTERS
    sized = streams | ({"n", "row"} & set(row["signature"]))
    divisible = set(row["divisible"])
    assert ("started_ptr" in divisible) == (launch.op == "restore_sgd_"
                                             and "started+1" not in launch.flags), row
    if not launch.aligned:
        # (pgd_step's output is a fresh allocation: aligned whatever its inputs)
        assert not (sized - {"out_ptr"}) & divisible, row
        assert not wide, row
        return
    assert sized <= divisible, row
    # one-element loads: ascent scale, skip (+ eta); sq_norm (eta); restore skip, lr, started
    # and its float64 hyper-parameters (weight decay; + momentum, dampening); LookSAM's
    # project and reuse coef, skip
    adaptive = "adaptive" in launch.flags
    scalars = {"ascent_": 2 + adaptive, "sq_norm": int(adaptive), "restore_sgd_": 6,
               "looksam_project_": 2, "looksam_reuse_": 2}.get(launch.op, 0)
    # partial sums stored: one per reduction (LookSAM's dots: two)
    partials = {"sq_norm": 1, "nonfinite": 1, "looksam_dots": 2,
                "looksam_project_": 1}.get(launch.op, 0)
    assert "ld" in wide, row
    assert narrow.count("ld") <= scalars, row
    assert narrow.count("st") <= partials, row
    if partials == 0:
        assert "st" in wide, row


# =============================================================================================
# real models: every launch of the fused backends gets the aligned specialization
# =============================================================================================

def model_masks(n: int) -> dict[str, list[bool]]:
    gen = torch.Generator().manual_seed(n)
    return {"all": [True] * n, "alternate": [i % 2 == 0 for i in range(n)],
            "first-half": [i < n // 2 for i in range(n)],
            "random": (torch.rand(n, generator=gen) < 0.7).tolist()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_name", ["resnet20", "wrn16_8"])
def test_real_model_launches_are_aligned(model_name, dtype):
    """Every run the fused backend launches a kernel on (sq_norm, nonfinite and ascent over
    ``bucket.runs``; restore + SGD over ``bucket.momentum_runs``, before and after masked steps
    split the momentum cohorts) has every buffer slice 16-byte aligned and a length divisible
    by 16: Triton's runtime gives it the divisibility-16 specialization whose 128-bit accesses
    test_triton_aligned_variant_moves_128_bits checks, and the CUDA kernels their vector
    variant. (The one-element flags are scalar loads whatever their address.)"""
    import samfast
    from samfast.cifar.models import build_model

    fused = [b for b in samfast.available_backends("cpu") if b != "reference"]
    if not fused:
        pytest.skip("no fused backend on this machine")
    torch.manual_seed(0)
    model = build_model(model_name).to(dtype)
    opt = samfast.SAM(model.parameters(), backend=fused[0], lr=0.1, momentum=0.9)
    launches = 0
    for bucket in opt._backend.buckets:
        assert bucket.dtype == dtype
        masks = model_masks(len(bucket.params))
        for name, mask in masks.items():
            runs = [(s, e) for s, e in bucket.runs(mask)]
            # restore + SGD runs, then the cohorts a step over this mask leaves behind
            runs += [(s, e) for s, e, _ in bucket.momentum_runs(mask)]
            bucket.momentum_stepped(mask, False, opt.state)
            runs += [(s, e) for s, e, _ in bucket.momentum_runs(masks["all"])]
            assert runs, name
            for s, e in runs:
                for buf in (bucket.param, bucket.grad, bucket.backup, bucket.momentum):
                    assert buf[s:e].data_ptr() % 16 == 0, (name, s, e)
                assert (e - s) % 16 == 0, (name, s, e)
                launches += 1
    assert launches > 0


# =============================================================================================
# CUDA C++: csrc/cuda/samfast_cuda.cu as the build compiles it
# =============================================================================================

KERNEL_FLAGS = {"sq_norm_kernel": ("adaptive",), "nonfinite_kernel": (),
                "ascent_kernel": ("adaptive",), "restore_sgd_kernel": ("momentum", "nesterov"),
                "looksam_dots_kernel": (), "looksam_project_kernel": (),
                "looksam_reuse_kernel": ()}
TYPE_NAMES = {"f": "fp32", "d": "fp64", "N3c104HalfE": "fp16", "N3c108BFloat16E": "bf16"}


def cuda_kernel_name(mangled: str) -> tuple[str, str, int, tuple[str, ...]]:
    """(kernel, dtype, kVec, flags set) of a mangled samfast kernel<scalar_t, kVec, bool...>."""
    m = re.search(r"\d+([a-z_]+_kernel)I(f|d|N3c104HalfE|N3c108BFloat16E)Li(\d+)E"
                  r"((?:Lb[01]E)*)E", mangled)
    assert m, mangled
    kernel, bools = m.group(1), [b == "1" for b in re.findall(r"Lb([01])E", m.group(4))]
    flags = tuple(f for f, on in zip(KERNEL_FLAGS[kernel], bools) if on)
    return kernel, TYPE_NAMES[m.group(2)], int(m.group(3)), flags


def setup_nvcc_flags() -> list[str]:
    """NVCC_FLAGS of setup.py (read, not imported: importing it runs setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no NVCC_FLAGS")


def nvcc_command(nvcc: str, source: Path, out: Path) -> list[str]:
    """What torch.utils.cpp_extension.BuildExtension passes nvcc for setup.py's CUDAExtension
    (its COMMON_NVCC_FLAGS, -std=c++20, the extension defines, torch's include dirs), with
    device code only (--fatbin: no host compiler pass) for sm_90 and sm_80."""
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [nvcc, "--fatbin", *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
            *cpp_extension.COMMON_NVCC_FLAGS, *setup_nvcc_flags(), "-std=c++20",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *[f"-I{p}" for p in cpp_extension.include_paths()],
            "-Xptxas", "-v", "-o", str(out), str(source)]


def sass_by_function(sass: str) -> dict[str, str]:
    """``cuobjdump -sass`` listing -> {function@sm_XX: its SASS}."""
    out, arch, name = {}, None, None
    for line in sass.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = f"{m.group(1)}@{arch}"
            out[name] = ""
            continue
        if name is not None:
            out[name] += line + "\n"
    return out


@pytest.fixture(scope="module")
def nvcc_job(tmp_path_factory):
    """nvcc, started in the background: it compiles while the Triton variants do (each is
    one process on one core)."""
    nvcc = find_nvcc()
    if nvcc is None:
        yield None
        return
    tmp = tmp_path_factory.mktemp("nvcc")
    fatbin, log = tmp / "samfast_cuda.fatbin", tmp / "nvcc.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(nvcc_command(nvcc, ROOT / "csrc/cuda/samfast_cuda.cu", fatbin),
                                stdout=out, stderr=subprocess.STDOUT)
    job = dict(proc=proc, fatbin=fatbin, log=log, start=time.perf_counter(), nvcc=nvcc)
    yield job
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cuda_report(nvcc_job):
    if nvcc_job is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda or PATH)")
    cuobjdump = bundled_tool("cuobjdump")
    if not Path(cuobjdump).exists():
        pytest.skip("cuobjdump not found (neither Triton's nor the CUDA toolkit's)")
    returncode = nvcc_job["proc"].wait(timeout=900)
    seconds = time.perf_counter() - nvcc_job["start"]
    log = nvcc_job["log"].read_text()
    assert returncode == 0, log[-8000:]
    ptxas = parse_ptxas_log(log)
    sass = sass_by_function(subprocess.run(
        [cuobjdump, "-sass", str(nvcc_job["fatbin"])],
        capture_output=True, text=True, check=True).stdout)
    assert set(ptxas) == set(sass)
    report = []
    for key, usage in ptxas.items():
        mangled, arch = key.split("@")
        kernel, dtype, vec, flags = cuda_kernel_name(mangled)
        report.append(dict(usage, kernel=kernel, dtype=dtype, vec=vec, flags=flags,
                           arch=int(arch[3:]), accesses=sass_global_accesses(sass[key])))
    report.sort(key=lambda r: (-r["arch"], r["kernel"], r["dtype"], r["flags"], r["vec"]))
    version = subprocess.run([nvcc_job["nvcc"], "--version"], capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
    print(f"\nnvcc ({version}): {len(report)} kernels, done {seconds:.1f} s after its start")
    print(f"{'kernel':46} {'sm':>3} {'regs':>4} {'spill st/ld':>11} {'128-bit ld/st':>13}")
    for r in report:
        wide = [k for k, bits in r["accesses"] if bits == 128]
        name = "-".join([r["kernel"], r["dtype"], *r["flags"], f"vec{r['vec']}"])
        print(f"{name:46} {r['arch']:>3} {r['regs']:>4} {r['spill_stores']:>5}/"
              f"{r['spill_loads']:<5} {wide.count('ld'):>6}/{wide.count('st'):<6}")
    return report


def test_cuda_kernels_compile_without_spills(cuda_report):
    # dtypes x (sq_norm 2 + nonfinite 1 + ascent 2 + restore 3 + LookSAM's dots, project,
    # reuse 1 each) x (vector, scalar) per arch
    assert len(cuda_report) == len(ARCHS) * 4 * 11 * 2
    spilled = [r for r in cuda_report if any(r[f] for f in SPILL_FIELDS)]
    assert not spilled, spilled


def test_cuda_vector_kernels_move_128_bits(cuda_report):
    """The vector variant reads every stream it reads and writes every stream it writes with
    128-bit accesses (LDG.E.128 / STG.E.128 in the SASS); the scalar variant has none, which
    also shows that the count distinguishes them."""
    for r in cuda_report:
        wide = [k for k, bits in r["accesses"] if bits == 128]
        if r["vec"] == 1:
            assert not wide, r
            continue
        assert r["vec"] * {"fp64": 8, "fp32": 4}.get(r["dtype"], 2) == 16, r
        momentum = "momentum" in r["flags"]
        reads, writes = {
            "sq_norm_kernel": (1 + ("adaptive" in r["flags"]), 0),
            "nonfinite_kernel": (1, 0),
            "ascent_kernel": (2, 2),                           # w, g -> backup, w
            "restore_sgd_kernel": (2 + momentum, 1 + momentum),  # backup, g, buf -> w, buf
            "looksam_dots_kernel": (2, 0),                     # g, gs
            "looksam_project_kernel": (2, 1),                  # gv, gs -> gv
            "looksam_reuse_kernel": (2, 1),                    # g, gv -> g
        }[r["kernel"]]
        assert wide.count("ld") >= reads and wide.count("st") >= writes, r


if __name__ == "__main__" and sys.argv[1:2] == ["--triton"]:
    compile_launches(sys.argv[2])
