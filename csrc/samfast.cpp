// samfast._C: the op schemas of the native backend and their CPU kernels.
//
// Every op works on 1-D contiguous slices of samfast's flat buffers (see samfast/flat.py and
// samfast/backends/fused.py for the maths). Arithmetic is in float for fp32/fp16/bf16 storage
// ("opmath") and in double for fp64, rounded once on store. The CUDA kernels live in
// csrc/cuda/samfast_cuda.cu and register the same schemas for the CUDA dispatch key.
//
// CPU design: streams written for the compiler's auto-vectorizer (one pass, no branches in
// the body, flags hoisted into template parameters), split over threads with
// at::parallel_for. fp32/fp64 use csrc/cpu/kernels.h, built for SSE2 and for AVX2+FMA and
// picked at run time. Reductions use fixed blocks of kBlock elements whose partial sums are
// added in block order, so a result does not depend on the number of threads or the ISA
// (deterministic run to run and machine to machine).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace samfast {

// The fp32/fp64 kernels of csrc/cpu/kernels.h, compiled per ISA (see that file).
#define SAMFAST_DECLARE_CPU_KERNELS(NS)                                                   \
  namespace NS {                                                                          \
  template <typename T>                                                                   \
  void sq_norm_blocks_any(const T*, const T*, long, long, long, long, bool, T, T*);       \
  template <typename T>                                                                   \
  void nonfinite_blocks(const T*, long, long, long, long, long*);                         \
  template <typename T>                                                                   \
  void ascent_any(T*, const T*, T*, long, long, T, bool, T, bool);                        \
  template <typename T>                                                                   \
  void restore_sgd_any(T*, const T*, const T*, T*, long, long, T, T, T, T, bool, bool,    \
                       bool);                                                             \
  }
SAMFAST_DECLARE_CPU_KERNELS(base)
#if defined(__x86_64__) && defined(__GNUC__)
SAMFAST_DECLARE_CPU_KERNELS(avx2)
SAMFAST_DECLARE_CPU_KERNELS(avx512)
#endif
#undef SAMFAST_DECLARE_CPU_KERNELS

namespace {

enum class Isa { kBase, kAvx2, kAvx512 };

Isa cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    if (const char* forced = std::getenv("SAMFAST_CPU_ISA")) {  // for benchmarks and tests
      const std::string f(forced);
      if (f == "base") return Isa::kBase;
      if (f == "avx2") return Isa::kAvx2;
    }
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SAMFAST_CPU_CALL(fn, ...)                                        \
  (cpu_isa() == Isa::kAvx512 ? avx512::fn(__VA_ARGS__)                   \
   : cpu_isa() == Isa::kAvx2 ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define SAMFAST_CPU_CALL(fn, ...) base::fn(__VA_ARGS__)
#endif

constexpr int64_t kBlock = 1 << 15;   // elements per reduction block
constexpr int64_t kGrain = 1 << 15;   // elements per parallel task of elementwise kernels
constexpr int kLanes = 8;             // independent accumulators: lets the sum vectorize

// Streaming stores for the write-only stream of the ascent and of restore + SGD (see
// csrc/cpu/kernels.h) from this many bytes per buffer. They win when the buffers come from
// memory and lose when they are still cached: ascent + restore + SGD measured on the
// development machine (2 threads), plain -> streaming: 1M floats cold 2.62 -> 2.03 ms, warm
// 1.14 -> 1.36 ms; 256K floats cold 0.84 -> 0.71, warm 0.23 -> 0.37 ms. Between the kernels of
// a training step lie a forward and a backward pass whose activations (tens to hundreds of
// MB at batch 128 on CIFAR) evict the buffers, so "cold" is the training case; the threshold
// keeps small models, whose whole step may stay in the 300 MiB L3, on plain stores.
// SAMFAST_CPU_STREAM=0 or 1 forces them off or on (tests and benchmarks).
constexpr int64_t kStreamMinBytes = int64_t{4} << 20;

bool use_streaming_stores(const at::Tensor& t) {
  static const int forced = [] {
    const char* f = std::getenv("SAMFAST_CPU_STREAM");
    return f == nullptr ? -1 : (std::string(f) == "1" ? 1 : 0);
  }();
  if (forced >= 0) return forced == 1;
  return t.numel() * static_cast<int64_t>(t.element_size()) >= kStreamMinBytes;
}

void check_flat(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "samfast: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == like.numel(), "samfast: ", name, " has ", t.numel(),
              " elements, expected ", like.numel());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "samfast: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "samfast: ", name, " is on ", t.device(),
              ", expected ", like.device());
}

// Sum over [begin, end) of f(i), with kLanes interleaved partial sums.
template <typename acc_t, typename F>
acc_t lane_sum(int64_t begin, int64_t end, F f) {
  acc_t lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += f(i + l);
  }
  acc_t total = 0;
  for (; i < end; ++i) total += f(i);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Deterministic blocked reduction: block partials in parallel, then summed in block order.
template <typename acc_t, typename F>
acc_t blocked_sum(int64_t n, F f) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<acc_t> partial(blocks, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      partial[b] = lane_sum<acc_t>(b * kBlock, std::min(n, (b + 1) * kBlock), f);
    }
  });
  acc_t total = 0;
  for (acc_t p : partial) total += p;
  return total;
}

// fp32/fp64 run the ISA-dispatched kernels of csrc/cpu/kernels.h; fp16/bf16 the templates
// here, which convert each element through c10's scalar conversions.
bool is_wide(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// Deterministic blocked reduction whose block sums come from f(b0, b1, out), which writes the
// sums of blocks [b0, b1) to out[b0, b1) (the kernels of csrc/cpu/kernels.h).
template <typename acc_t, typename F>
acc_t blocked_reduce(int64_t n, F f) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<acc_t> partial(blocks, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) { f(b0, b1, partial.data()); });
  acc_t total = 0;
  for (acc_t p : partial) total += p;
  return total;
}

template <typename scalar_t, bool kAdaptive>
at::opmath_type<scalar_t> sq_norm_kernel(const scalar_t* g, const scalar_t* w, int64_t n,
                                         at::opmath_type<scalar_t> eta) {
  using opmath_t = at::opmath_type<scalar_t>;
  return blocked_sum<opmath_t>(n, [=](int64_t i) {
    opmath_t x = static_cast<opmath_t>(g[i]);
    if (kAdaptive) x *= std::abs(static_cast<opmath_t>(w[i])) + eta;
    return x * x;
  });
}

at::Tensor sq_norm_cpu(const at::Tensor& g, const at::Tensor& w, bool adaptive, double eta) {
  check_flat(g, g, "g");
  check_flat(w, g, "w");
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({}, g.options().dtype(acc));
  if (is_wide(g)) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sq_norm", [&] {
      const auto* gp = g.const_data_ptr<scalar_t>();
      const auto* wp = w.const_data_ptr<scalar_t>();
      const auto e = static_cast<scalar_t>(eta);
      const int64_t n = g.numel();
      out.fill_(blocked_reduce<scalar_t>(n, [=](int64_t b0, int64_t b1, scalar_t* partial) {
        SAMFAST_CPU_CALL(sq_norm_blocks_any<scalar_t>, gp, wp, n, kBlock, b0, b1, adaptive, e,
                         partial);
      }));
    });
    return out;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(g.scalar_type(), "sq_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto* gp = g.const_data_ptr<scalar_t>();
    const auto* wp = w.const_data_ptr<scalar_t>();
    const opmath_t s = adaptive ? sq_norm_kernel<scalar_t, true>(gp, wp, g.numel(), eta)
                                : sq_norm_kernel<scalar_t, false>(gp, wp, g.numel(), eta);
    out.fill_(s);
  });
  return out;
}

at::Tensor nonfinite_cpu(const at::Tensor& g) {
  check_flat(g, g, "g");
  int64_t count = 0;
  if (is_wide(g)) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "nonfinite", [&] {
      const auto* gp = g.const_data_ptr<scalar_t>();
      const int64_t n = g.numel();
      count = blocked_reduce<long>(n, [=](int64_t b0, int64_t b1, long* partial) {
        SAMFAST_CPU_CALL(nonfinite_blocks<scalar_t>, gp, n, kBlock, b0, b1, partial);
      });
    });
    return at::full({}, static_cast<double>(count), g.options().dtype(at::kFloat));
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(g.scalar_type(), "nonfinite", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto* gp = g.const_data_ptr<scalar_t>();
    constexpr opmath_t inf = std::numeric_limits<opmath_t>::infinity();
    // !(|x| < inf) is true exactly for +-inf and NaN, and compiles to a compare + mask.
    count = blocked_sum<int64_t>(g.numel(), [=](int64_t i) {
      return static_cast<int64_t>(!(std::abs(static_cast<opmath_t>(gp[i])) < inf));
    });
  });
  return at::full({}, static_cast<double>(count), g.options().dtype(at::kFloat));
}

template <typename scalar_t, bool kAdaptive>
void ascent_kernel(scalar_t* w, const scalar_t* g, scalar_t* backup, int64_t n,
                   at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t> eta) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t wi = w[i];
      backup[i] = wi;
      const opmath_t wf = static_cast<opmath_t>(wi);
      opmath_t e = static_cast<opmath_t>(g[i]);
      if (kAdaptive) {
        const opmath_t t = std::abs(wf) + eta;
        e = (t * t) * e;
      }
      w[i] = static_cast<scalar_t>(wf + e * scale);
    }
  });
}

void ascent_cpu(at::Tensor& w, const at::Tensor& g, at::Tensor& backup, const at::Tensor& scale,
                const at::Tensor& skip, bool adaptive, double eta) {
  check_flat(w, w, "w");
  check_flat(g, w, "g");
  check_flat(backup, w, "backup");
  if (skip.item<bool>()) {
    backup.copy_(w);
    return;
  }
  if (is_wide(w)) {
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "ascent_", [&] {
      const scalar_t s = scale.item<scalar_t>();
      const auto e = static_cast<scalar_t>(eta);
      auto* wp = w.mutable_data_ptr<scalar_t>();
      auto* bp = backup.mutable_data_ptr<scalar_t>();
      const auto* gp = g.const_data_ptr<scalar_t>();
      const bool stream = use_streaming_stores(w);
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        SAMFAST_CPU_CALL(ascent_any<scalar_t>, wp, gp, bp, begin, end, s, adaptive, e, stream);
      });
    });
    return;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(w.scalar_type(), "ascent_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t s = scale.item<opmath_t>();
    auto* wp = w.mutable_data_ptr<scalar_t>();
    auto* bp = backup.mutable_data_ptr<scalar_t>();
    const auto* gp = g.const_data_ptr<scalar_t>();
    if (adaptive) {
      ascent_kernel<scalar_t, true>(wp, gp, bp, w.numel(), s, eta);
    } else {
      ascent_kernel<scalar_t, false>(wp, gp, bp, w.numel(), s, eta);
    }
  });
}

// w <- backup; then torch.optim.SGD's update, in its order of operations:
//   d = g + wd * w;  buf = first ? d : momentum * buf + (1 - dampening) * d;
//   d = nesterov ? d + momentum * buf : buf;  w = w - lr * d
template <typename scalar_t, bool kMomentum, bool kNesterov, bool kFirst>
void restore_sgd_kernel(scalar_t* w, const scalar_t* g, const scalar_t* backup, scalar_t* buf,
                        int64_t n, at::opmath_type<scalar_t> lr,
                        at::opmath_type<scalar_t> momentum,
                        at::opmath_type<scalar_t> dampening, at::opmath_type<scalar_t> wd) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const opmath_t w0 = static_cast<opmath_t>(backup[i]);
      opmath_t d = static_cast<opmath_t>(g[i]) + wd * w0;
      if (kMomentum) {
        opmath_t b = kFirst ? d : static_cast<opmath_t>(buf[i]) * momentum + (1 - dampening) * d;
        const scalar_t stored = static_cast<scalar_t>(b);
        buf[i] = stored;
        b = static_cast<opmath_t>(stored);  // torch steps with the buffer as stored
        d = kNesterov ? d + momentum * b : b;
      }
      w[i] = static_cast<scalar_t>(w0 - lr * d);
    }
  });
}

template <typename scalar_t>
void restore_sgd_dispatch(at::Tensor& w, const at::Tensor& g, const at::Tensor& backup,
                          at::Tensor& buf, double lr, double momentum, double dampening,
                          double wd, bool nesterov, bool first) {
  auto* wp = w.mutable_data_ptr<scalar_t>();
  const auto* gp = g.const_data_ptr<scalar_t>();
  const auto* bp = backup.const_data_ptr<scalar_t>();
  auto* mp = buf.mutable_data_ptr<scalar_t>();
  const int64_t n = w.numel();
  auto* kernel = momentum == 0 ? restore_sgd_kernel<scalar_t, false, false, false>
                 : first      ? (nesterov ? restore_sgd_kernel<scalar_t, true, true, true>
                                          : restore_sgd_kernel<scalar_t, true, false, true>)
                              : (nesterov ? restore_sgd_kernel<scalar_t, true, true, false>
                                          : restore_sgd_kernel<scalar_t, true, false, false>);
  kernel(wp, gp, bp, mp, n, lr, momentum, dampening, wd);
}

void restore_sgd_cpu(at::Tensor& w, const at::Tensor& g, const at::Tensor& backup,
                     at::Tensor& buf, const at::Tensor& skip, const at::Tensor& lr_t,
                     double momentum, double dampening, double weight_decay, bool nesterov,
                     bool first) {
  check_flat(w, w, "w");
  check_flat(g, w, "g");
  check_flat(backup, w, "backup");
  if (momentum != 0) check_flat(buf, w, "buf");
  TORCH_CHECK(lr_t.numel() == 1 && lr_t.device() == w.device(),
              "samfast: lr must be a one-element tensor on ", w.device());
  const double lr = lr_t.item<double>();
  if (skip.item<bool>()) {
    if (!backup.is_same(w)) w.copy_(backup);
    return;
  }
  if (is_wide(w)) {
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "restore_sgd_", [&] {
      auto* wp = w.mutable_data_ptr<scalar_t>();
      const auto* gp = g.const_data_ptr<scalar_t>();
      const auto* bp = backup.const_data_ptr<scalar_t>();
      auto* mp = buf.mutable_data_ptr<scalar_t>();
      using T = scalar_t;
      const bool stream = use_streaming_stores(w);
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
        SAMFAST_CPU_CALL(restore_sgd_any<T>, wp, gp, bp, mp, begin, end, T(lr), T(momentum),
                         T(dampening), T(weight_decay), nesterov, first, stream);
      });
    });
    return;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(w.scalar_type(), "restore_sgd_", [&] {
    restore_sgd_dispatch<scalar_t>(w, g, backup, buf, lr, momentum, dampening, weight_decay,
                                   nesterov, first);
  });
}

}  // namespace

TORCH_LIBRARY(samfast, m) {
  m.def("sq_norm(Tensor g, Tensor w, bool adaptive, float eta) -> Tensor");
  m.def("nonfinite(Tensor g) -> Tensor");
  m.def("ascent_(Tensor(a!) w, Tensor g, Tensor(b!) backup, Tensor scale, Tensor skip, "
        "bool adaptive, float eta) -> ()");
  // lr is a tensor (the kernels read it on the device: no host sync, and a CUDA graph replays
  // the current value of a tensor lr that a scheduler updates in place).
  m.def("restore_sgd_(Tensor(a!) w, Tensor g, Tensor backup, Tensor(b!) buf, Tensor skip, "
        "Tensor lr, float momentum, float dampening, float weight_decay, bool nesterov, "
        "bool first) -> ()");
}

TORCH_LIBRARY_IMPL(samfast, CPU, m) {
  m.impl("sq_norm", &sq_norm_cpu);
  m.impl("nonfinite", &nonfinite_cpu);
  m.impl("ascent_", &ascent_cpu);
  m.impl("restore_sgd_", &restore_sgd_cpu);
}

}  // namespace samfast

// `import samfast._C` loads this library, whose static initializers register the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
