"""samfast-doctor (also ``python -m samfast``): the first command to run on a new machine.

Prints the versions (Python, torch, Triton, CUDA runtime and driver), how the native
extension was built (CPU ISA picked, CUDA archs), and, for every device present and every
backend available there, whether each fused op matches its reference implementation
(``samfast/ops.py``) on a realistic buffer — fp32 and bf16, an odd length, and a slice one
element off alignment — with the largest error, then the bandwidth each op reaches beside a
plain copy on that device. Exits 1 if any available backend is wrong, 0 otherwise.

    python -m samfast                 # every device, every backend
    python -m samfast --json out.json # the same, also as JSON (bench/gpu_check.sh keeps it)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from . import __version__
from . import ops as contract
from .backends import _unavailable_reason, available_backends, native, ops_namespace
from .backends import triton_backend
from .selfcheck import check_ops, check_pgd

# Streams each op moves, in parameter-sized buffers (see samfast/backends/fused.py).
STREAMS = {"copy": 2, "sq_norm": 1, "nonfinite": 1, "ascent_": 4, "restore_sgd_": 5}


def versions() -> dict:
    info = {"samfast": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "platform": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
        info["cuda_driver"] = driver
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def extension() -> dict:
    error = native.load_error()
    if error is not None:
        return {"loaded": False, "error": error}
    try:
        from . import _C
        return {"loaded": True, **_C.build_info()}
    except (ImportError, AttributeError):  # a JIT build registers the ops without the module
        return {"loaded": True, "build": "JIT (SAMFAST_JIT=1)"}


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (and compilation)
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth(namespace, device: torch.device, dtype: torch.dtype, n: int, reps: int) -> dict:
    """GB/s of each op (bytes it must move / median time) and of a plain copy."""
    gen = torch.Generator().manual_seed(1)
    w, g, backup, buf = (torch.randn(n, generator=gen).to(dtype).to(device) for _ in range(4))
    dst = torch.empty_like(w)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    flag = lambda v: torch.tensor(v, device=device)  # noqa: E731
    scale = torch.tensor(1e-3, dtype=opmath, device=device)
    lr = torch.tensor(1e-3, dtype=torch.float64, device=device)
    calls = {
        "copy": lambda: dst.copy_(w),
        "sq_norm": lambda: namespace.sq_norm(g, w, False, 0.0),
        "nonfinite": lambda: namespace.nonfinite(g),
        "ascent_": lambda: namespace.ascent_(w, g, backup, scale, flag(False), False, 0.0),
        "restore_sgd_": lambda: namespace.restore_sgd_(w, g, backup, buf, flag(False), lr, 0.9,
                                                       0.0, 5e-4, True, flag(True)),
    }
    out = {}
    for name, fn in calls.items():
        seconds = _median_seconds(fn, device, reps)
        out[name] = STREAMS[name] * n * w.element_size() / seconds / 1e9
    return out


def run(json_path: str | None = None, n: int | None = None, quick: bool = False) -> int:
    report = {"versions": versions(), "extension": extension(), "devices": {}}
    ok = True
    v = report["versions"]
    print(f"samfast {v['samfast']} doctor | python {v['python']} | torch {v['torch']} "
          f"(CUDA build {v['torch_cuda']}) | triton {v['triton']}")
    if "gpus" in v:
        print(f"GPUs: {', '.join(v['gpus'])} | driver {v.get('cuda_driver')}")
    ext = report["extension"]
    print("native extension: " + (", ".join(f"{k} {val}" for k, val in ext.items() if k != "loaded")
                                  if ext["loaded"] else f"NOT LOADED: {ext['error']}"))
    for device in devices():
        interpreted = device.type == "cpu" and triton_backend.interpreting()
        dev_report = report["devices"][str(device)] = {"backends": {}}
        names = [b for b in ("native", "triton") if b in available_backends(device)]
        skipped = {b: _unavailable_reason(b, device) for b in ("native", "triton")
                   if b not in names}
        print(f"\n== {device}: fused backends {names or 'none'}"
              + "".join(f"\n   {b}: unavailable ({why})" for b, why in skipped.items()))
        length = n or (4099 if interpreted else (1_000_003 if device.type == "cpu"
                                                 else 16_000_003))
        for name in names:
            namespace = ops_namespace(name)
            checks = []
            for dtype in (torch.float32, torch.bfloat16):
                for offset in (0, 1):
                    checks += check_ops(namespace, device, dtype, length, offset)
            if name == "triton":
                checks += check_pgd(namespace, device)
            wrong = [c for c in checks if not c.ok]
            ok &= not wrong
            worst = max(checks, key=lambda c: c.max_error)
            print(f"-- {name}: {len(checks) - len(wrong)}/{len(checks)} checks match the "
                  f"reference (length {length}, aligned and misaligned, fp32 and bf16); "
                  f"largest error {worst.max_error:.3g} ulp ({worst.op}, {worst.dtype})")
            for c in wrong:
                print("   WRONG " + c.line())
            entry = {"checks": [dict(op=c.op, dtype=str(c.dtype), case=c.case,
                                     max_error=c.max_error, ok=c.ok, detail=c.detail)
                                for c in checks]}
            if not quick and not interpreted:
                bw_n = 1 << (22 if device.type == "cpu" else 26)
                reps = 5 if device.type == "cpu" else 20
                entry["bandwidth_gbs"] = {str(dt).replace("torch.", ""): bandwidth(
                    namespace, device, dt, bw_n, reps) for dt in (torch.float32, torch.bfloat16)}
                for dt, gbs in entry["bandwidth_gbs"].items():
                    print(f"   {dt} GB/s (n={bw_n}): " + ", ".join(
                        f"{op} {val:.1f} ({val / gbs['copy']:.0%} of copy)" if op != "copy"
                        else f"copy {val:.1f}" for op, val in gbs.items()))
            dev_report["backends"][name] = entry
    print(f"\n{'OK: every available backend matches the reference' if ok else 'FAILED: a backend is wrong (see WRONG above); backend=auto will not use it'}")
    report["ok"] = ok
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="samfast-doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--n", type=int, default=None,
                        help="buffer length of the correctness checks (default: 1,000,003 "
                             "on the CPU, 16,000,003 on a GPU, 4099 under the interpreter)")
    parser.add_argument("--quick", action="store_true", help="correctness only, no bandwidth")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 8:
        parser.error(f"argument --n: must be >= 8, got {args.n}")
    return run(args.json, args.n, args.quick)


if __name__ == "__main__":
    sys.exit(main())
