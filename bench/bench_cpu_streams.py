"""What one pass over a parameter-sized buffer costs on this CPU, by kind of memory traffic.

The optimizer-step benchmark compares samfast's SAM step with one fused SGD step; which of
them is near its floor depends on whether the memory system is bound by bytes moved or by
bytes read. This times, on buffers of a WRN-16-8's parameter count (fp32, caches flushed
before every sample, all threads, interleaved rounds), C++ loops with one kind of traffic each:

  * read:            s += x                      (1 P read)
  * read 2:          s += x + y                  (2 P read)
  * in place:        x = x + 1                   (1 P read, the same 1 P written back)
  * copy:            y = x, plain stores         (1 P read, 1 P written, read first for ownership)
  * copy, streaming: y = x, non-temporal stores  (1 P read, 1 P written without reading it)
  * write, streaming: y = 1, non-temporal stores (1 P written)
  * SGD-like:        reads w, g, m; writes w, m in place (torch.optim.SGD's traffic)

and prints each as a multiple of the read pass, as timed alone and with the write-back of the
lines it left dirty in the caches (which the next flush pays; in training, the forward pass).

    python bench/bench_cpu_streams.py [--n 10960000] [--rounds 21] [--save]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, median, write_results  # noqa: E402

SOURCE = r"""
#include <torch/extension.h>
#include <emmintrin.h>

// Each pass splits [0, n) over the OpenMP threads; n is a multiple of 4 (checked in Python).
static float* f(torch::Tensor t) { return t.data_ptr<float>(); }

double read1(torch::Tensor x) {
  const float* a = f(x); const long n = x.numel(); double total = 0;
  #pragma omp parallel reduction(+ : total)
  {
    __m128 s = _mm_setzero_ps();
    #pragma omp for schedule(static)
    for (long i = 0; i < n; i += 4) s = _mm_add_ps(s, _mm_loadu_ps(a + i));
    float v[4]; _mm_storeu_ps(v, s); total += v[0] + v[1] + v[2] + v[3];
  }
  return total;
}

double read2(torch::Tensor x, torch::Tensor y) {
  const float* a = f(x); const float* b = f(y); const long n = x.numel(); double total = 0;
  #pragma omp parallel reduction(+ : total)
  {
    __m128 s = _mm_setzero_ps();
    #pragma omp for schedule(static)
    for (long i = 0; i < n; i += 4)
      s = _mm_add_ps(s, _mm_add_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i)));
    float v[4]; _mm_storeu_ps(v, s); total += v[0] + v[1] + v[2] + v[3];
  }
  return total;
}

void in_place(torch::Tensor x) {
  float* a = f(x); const long n = x.numel(); const __m128 one = _mm_set1_ps(1.f);
  #pragma omp parallel for schedule(static)
  for (long i = 0; i < n; i += 4) _mm_storeu_ps(a + i, _mm_add_ps(_mm_loadu_ps(a + i), one));
}

void copy(torch::Tensor dst, torch::Tensor src, bool stream) {
  float* d = f(dst); const float* s = f(src); const long n = src.numel();
  #pragma omp parallel for schedule(static)
  for (long i = 0; i < n; i += 4) {
    if (stream) _mm_stream_ps(d + i, _mm_loadu_ps(s + i));  // d is 16-byte aligned
    else _mm_storeu_ps(d + i, _mm_loadu_ps(s + i));
  }
  _mm_sfence();
}

void write_stream(torch::Tensor dst) {
  float* d = f(dst); const long n = dst.numel(); const __m128 one = _mm_set1_ps(1.f);
  #pragma omp parallel for schedule(static)
  for (long i = 0; i < n; i += 4) _mm_stream_ps(d + i, one);
  _mm_sfence();
}

void sgd_like(torch::Tensor w, torch::Tensor g, torch::Tensor m) {
  float* wp = f(w); const float* gp = f(g); float* mp = f(m); const long n = w.numel();
  const __m128 mu = _mm_set1_ps(0.9f), lr = _mm_set1_ps(0.1f);
  #pragma omp parallel for schedule(static)
  for (long i = 0; i < n; i += 4) {
    const __m128 b = _mm_add_ps(_mm_mul_ps(mu, _mm_loadu_ps(mp + i)), _mm_loadu_ps(gp + i));
    _mm_storeu_ps(mp + i, b);
    _mm_storeu_ps(wp + i, _mm_sub_ps(_mm_loadu_ps(wp + i), _mm_mul_ps(lr, b)));
  }
}
"""

FUNCTIONS = ["read1", "read2", "in_place", "copy", "write_stream", "sgd_like"]


def build():
    return cpp_extension.load_inline(
        "samfast_bench_streams", cpp_sources=SOURCE, functions=FUNCTIONS,
        extra_cflags=["-O3", "-fopenmp", "-fno-wrapv"], extra_ldflags=["-fopenmp"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10_960_000, help="floats per buffer (WRN-16-8)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--save", action="store_true", help="write bench/results (or $OUT) files")
    args = ap.parse_args(argv)
    if args.n % 4:
        ap.error("--n must be a multiple of 4")
    device = torch.device("cpu")
    env = environment(device)
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    ext = build()
    a, b, c, d = (torch.rand(args.n) for _ in range(4))
    flush = torch.empty(2 * 64 * 2**20 // 4)  # 128 MiB: every pass starts cold
    passes = {
        "read": (lambda: ext.read1(a), "1 P read"),
        "read 2": (lambda: ext.read2(a, b), "2 P read"),
        "in place": (lambda: ext.in_place(d), "1 P read + written back"),
        "copy": (lambda: ext.copy(c, a, False), "1 P read, 1 P written (plain)"),
        "copy, streaming": (lambda: ext.copy(c, a, True), "1 P read, 1 P written (NT)"),
        "write, streaming": (lambda: ext.write_stream(c), "1 P written (NT)"),
        "SGD-like": (lambda: ext.sgd_like(d, a, b), "3 P read, 2 P written in place"),
    }
    passes["nothing"] = (lambda: None, "-")
    # A pass leaves up to a cache's worth of dirty lines behind, written back during whatever
    # runs next (here the next flush; in training the forward pass). "with write-back" times
    # the pass plus the flush after it, minus a flush after nothing.
    samples = {name: [] for name in passes}
    settled = {name: [] for name in passes}
    for _ in range(args.rounds):
        for name, (fn, _) in passes.items():
            flush.fill_(1.0)
            start = time.perf_counter()
            fn()
            done = time.perf_counter()
            flush.fill_(1.0)
            samples[name].append(done - start)
            settled[name].append(time.perf_counter() - start)
    base = median(settled.pop("nothing"))
    samples.pop("nothing"), passes.pop("nothing")
    read, read_settled = median(samples["read"]), median(settled["read"]) - base
    rows = []
    for name, (_, traffic) in passes.items():
        t, t_settled = median(samples[name]), median(settled[name]) - base
        rows.append([name, traffic, t * 1e3, t / read, t_settled * 1e3, t_settled / read_settled])
    table = markdown_table(["pass", "traffic", "median ms", "x read pass",
                            "with write-back ms", "x read pass (with write-back)"], rows)
    title = f"## {args.n / 1e6:.2f} M floats per buffer, {torch.get_num_threads()} threads"
    print(f"\n{title}\n\n{table}")
    if args.save:
        path = write_results("cpu_streams", env, f"{title}\n\n{table}",
                             {"pass": samples, "with_write_back": settled}, None)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
