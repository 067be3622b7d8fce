"""Shared benchmark plumbing: environment record, interleaved timing, tables, result files.

Every benchmark measures baseline and candidates *interleaved in one run* (round r times each
implementation once, in turn), so a noisy neighbour slows all of them alike; it reports the
median over rounds and ratios against the named baseline.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def provenance() -> dict:
    """Which source produced a result: ``commit`` (short hash, ``-dirty`` when the tree differs
    from it), ``clean_tree`` (no modified tracked file and no untracked file that is not
    ignored: both travel to a lent GPU and are measured), and the source fingerprint.

    bench/gpu_check.sh exports SAMFAST_COMMIT / SAMFAST_CLEAN_TREE / SAMFAST_TREE_FINGERPRINT
    (from git, or from its stamp where the tree was copied without .git): they win over git."""
    commit, clean = os.environ.get("SAMFAST_COMMIT"), os.environ.get("SAMFAST_CLEAN_TREE")
    if commit is None:
        here = Path(__file__).parent
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=here, check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                                   text=True, cwd=here, check=True).stdout.strip()
            clean = "0" if dirty else "1"
            commit += "-dirty" if dirty else ""
        except (OSError, subprocess.CalledProcessError):  # not a checkout
            commit = "unknown"
    return {"commit": commit,
            "clean_tree": {"1": True, "0": False}.get(clean or ""),
            "tree_fingerprint": os.environ.get("SAMFAST_TREE_FINGERPRINT")}


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
                    break
        except OSError:
            pass
    env = {"device": name, "device_type": device.type, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "triton": triton_version,
           "python": platform.python_version(), **provenance(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:  # which install was measured (bench/gpu_check.sh: its scratch target dir)
        import samfast
        env["samfast"] = samfast.__version__
        env["samfast_file"] = samfast.__file__
    except ImportError:  # bench_cpu_streams needs no samfast
        pass
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]])
        except (OSError, ValueError, KeyError):
            pass
    return max(sizes, default=64 << 20)


def cache_flusher(device: torch.device) -> Callable[[], None]:
    """Overwrites twice the last-level cache, so every timed call starts cold, as an
    optimizer step does in training (the forward/backward passes evict its buffers). On the
    development CPU the L3 is 300 MiB: a step's buffers would otherwise stay cached between
    calls and the numbers would depend on which implementation ran just before."""
    buf = torch.empty(2 * last_level_cache_bytes(device) // 4, dtype=torch.float32,
                      device=device)
    return lambda: buf.fill_(1.0)


def time_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int = 15,
                     inner: int = 1, warmup: int = 2, cold: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each fn, one sample per round, all fns interleaved in each round
    (with ``cold``, the caches are flushed before each sample)."""
    flush = cache_flusher(device) if cold else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            flush()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(stem: str, env: dict, markdown: str, raw: dict, out_dir: Path | None) -> Path:
    """``<stem>-<device_type>-<date>.{md,json}`` in ``out_dir`` (default bench/results)."""
    out_dir = Path(out_dir or os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    day = env["date"][:10]
    base = out_dir / f"{stem}-{env['device_type']}-{day}"
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    base.with_suffix(".md").write_text(f"# {stem}\n\n{header}\n\n{markdown}\n")
    base.with_suffix(".json").write_text(json.dumps({"env": env, "raw": raw}, indent=1))
    return base.with_suffix(".md")


def median_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): the distribution-free confidence interval of the median from
    order statistics (binomial with p = 1/2): the widest-needed pair x_(k), x_(n+1-k) whose
    coverage is at least ``level``; with too few samples for that, (min, max) and the coverage
    it has (n = 5: 94%, n = 2: 50%)."""
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        raise ValueError("no samples")
    cdf, below = [], 0.0  # cdf[j] = P(Binomial(n, 1/2) <= j)
    for j in range(n + 1):
        below += math.comb(n, j) / 2 ** n
        cdf.append(below)
    k = 1  # 1-based rank of the lower bound; coverage = 1 - 2 P(B <= k - 1)
    while k + 1 <= (n + 1) // 2 and 1 - 2 * cdf[k] >= level:
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * cdf[k - 1]
