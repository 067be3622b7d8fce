// samfast._C: the CPU kernels of the native backend's ops (namespace samfast; the schemas and
// the maths of each op are declared in samfast/ops.py).
//
// Every op works on 1-D contiguous slices of samfast's flat buffers (see samfast/flat.py and
// samfast/backends/fused.py for the maths). Arithmetic is in float for fp32/fp16/bf16 storage
// ("opmath") and in double for fp64, rounded once on store. The CUDA kernels live in
// csrc/cuda/samfast_cuda.cu and register the same schemas for the CUDA dispatch key.
//
// CPU design: one pass per op over whole 64-byte lines (GCC vector types, flags hoisted into
// template parameters), split over threads with at::parallel_for. The kernels live in
// csrc/cpu/kernels.h, built for SSE2, AVX2 (+FMA, F16C) and AVX-512 and picked at run time,
// for every dtype (fp16/bf16 widened to float per line). Reductions use fixed blocks of kBlock
// elements whose partial sums are added in block order, so a result does not depend on the
// number of threads or the ISA (deterministic run to run and machine to machine).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
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
  template <int F>                                                                        \
  void sq_norm_blocks16(const unsigned short*, const unsigned short*, long, long, long,   \
                        long, bool, float, float*);                                       \
  template <int F>                                                                        \
  void nonfinite_blocks16(const unsigned short*, long, long, long, long, long*);          \
  template <int F>                                                                        \
  void ascent16_any(unsigned short*, const unsigned short*, unsigned short*, long, long,   \
                    float, bool, float);                                                  \
  template <int F>                                                                        \
  void restore_sgd16_any(unsigned short*, const unsigned short*, const unsigned short*,   \
                         unsigned short*, long, long, float, float, float, float, bool,   \
                         bool);                                                           \
  template <typename T>                                                                   \
  void looksam_dots_blocks(const T*, const T*, long, long, long, long, T*, T*);           \
  template <typename T>                                                                   \
  void looksam_project_blocks(T*, const T*, long, long, long, long, T, T*);               \
  template <typename T>                                                                   \
  void looksam_reuse(T*, const T*, long, long, T);                                        \
  template <int F>                                                                        \
  void looksam_dots_blocks16(const unsigned short*, const unsigned short*, long, long,    \
                             long, long, float*, float*);                                 \
  template <int F>                                                                        \
  void looksam_project_blocks16(unsigned short*, const unsigned short*, long, long, long,  \
                                long, float, float*);                                     \
  template <int F>                                                                        \
  void looksam_reuse16(unsigned short*, const unsigned short*, long, long, float);        \
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
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("f16c")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return Isa::kAvx2;
    }
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

// skip / started: one-element bool tensors on the buffers' device, read there.
void check_flag(const at::Tensor& flag, const at::Tensor& like, const char* name) {
  TORCH_CHECK(flag.numel() == 1 && flag.scalar_type() == at::kBool &&
                  flag.device() == like.device(),
              "samfast: ", name, " must be a one-element bool tensor on ", like.device());
}

// scale: a one-element tensor in the opmath dtype (float64 for fp64 buffers, else float32).
void check_scale(const at::Tensor& scale, const at::Tensor& like) {
  const auto opmath = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == opmath &&
                  scale.device() == like.device(),
              "samfast: scale must be a one-element ", opmath, " tensor on ", like.device());
}

// The kernels of csrc/cpu/kernels.h: fp32/fp64 over T*, bf16/fp16 over their 16-bit patterns
// with the format as a template argument (0 = bf16, 1 = fp16, as kBf16 / kFp16 there).
bool is_wide(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

int format16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "samfast: unsupported dtype ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16 ? 0 : 1;
}

const unsigned short* bits16(const at::Tensor& t) {
  return static_cast<const unsigned short*>(t.const_data_ptr());
}

unsigned short* mutable_bits16(at::Tensor& t) {
  return static_cast<unsigned short*>(t.mutable_data_ptr());
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

at::Tensor sq_norm_cpu(const at::Tensor& g, const at::Tensor& w, bool adaptive, double eta) {
  check_flat(g, g, "g");
  check_flat(w, g, "w");
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({}, g.options().dtype(acc));
  const int64_t n = g.numel();
  if (is_wide(g)) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sq_norm", [&] {
      const auto* gp = g.const_data_ptr<scalar_t>();
      const auto* wp = w.const_data_ptr<scalar_t>();
      const auto e = static_cast<scalar_t>(eta);
      out.fill_(blocked_reduce<scalar_t>(n, [=](int64_t b0, int64_t b1, scalar_t* partial) {
        SAMFAST_CPU_CALL(sq_norm_blocks_any<scalar_t>, gp, wp, n, kBlock, b0, b1, adaptive, e,
                         partial);
      }));
    });
    return out;
  }
  const unsigned short *gp = bits16(g), *wp = bits16(w);
  const auto e = static_cast<float>(eta);
  const bool bf16 = format16(g) == 0;
  out.fill_(blocked_reduce<float>(n, [=](int64_t b0, int64_t b1, float* partial) {
    bf16 ? SAMFAST_CPU_CALL(sq_norm_blocks16<0>, gp, wp, n, kBlock, b0, b1, adaptive, e, partial)
         : SAMFAST_CPU_CALL(sq_norm_blocks16<1>, gp, wp, n, kBlock, b0, b1, adaptive, e,
                            partial);
  }));
  return out;
}

at::Tensor nonfinite_cpu(const at::Tensor& g) {
  check_flat(g, g, "g");
  const int64_t n = g.numel();
  int64_t count = 0;
  if (is_wide(g)) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "nonfinite", [&] {
      const auto* gp = g.const_data_ptr<scalar_t>();
      count = blocked_reduce<long>(n, [=](int64_t b0, int64_t b1, long* partial) {
        SAMFAST_CPU_CALL(nonfinite_blocks<scalar_t>, gp, n, kBlock, b0, b1, partial);
      });
    });
  } else {
    const unsigned short* gp = bits16(g);
    const bool bf16 = format16(g) == 0;
    count = blocked_reduce<long>(n, [=](int64_t b0, int64_t b1, long* partial) {
      bf16 ? SAMFAST_CPU_CALL(nonfinite_blocks16<0>, gp, n, kBlock, b0, b1, partial)
           : SAMFAST_CPU_CALL(nonfinite_blocks16<1>, gp, n, kBlock, b0, b1, partial);
    });
  }
  return at::full({}, static_cast<double>(count), g.options().dtype(at::kFloat));
}

void ascent_cpu(at::Tensor& w, const at::Tensor& g, at::Tensor& backup, const at::Tensor& scale,
                const at::Tensor& skip, bool adaptive, double eta) {
  check_flat(w, w, "w");
  check_flat(g, w, "g");
  check_flat(backup, w, "backup");
  check_flag(skip, w, "skip");
  check_scale(scale, w);
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
  const float s = scale.item<float>();  // arithmetic in float, as for fp32
  const auto e = static_cast<float>(eta);
  unsigned short *wp = mutable_bits16(w), *bp = mutable_bits16(backup);
  const unsigned short* gp = bits16(g);
  const bool bf16 = format16(w) == 0;
  at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
    bf16 ? SAMFAST_CPU_CALL(ascent16_any<0>, wp, gp, bp, begin, end, s, adaptive, e)
         : SAMFAST_CPU_CALL(ascent16_any<1>, wp, gp, bp, begin, end, s, adaptive, e);
  });
}

// w <- backup; then torch.optim.SGD's update, in its order of operations:
//   d = g + wd * w;  buf = first ? d : momentum * buf + (1 - dampening) * d;
//   d = nesterov ? d + momentum * buf : buf;  w = w - lr * d
// (with 16-bit storage the step uses the momentum buffer as stored, as torch does).
void restore_sgd_cpu(at::Tensor& w, const at::Tensor& g, const at::Tensor& backup,
                     at::Tensor& buf, const at::Tensor& skip, const at::Tensor& lr_t,
                     double momentum, double dampening, double weight_decay, bool nesterov,
                     const at::Tensor& started) {
  check_flat(w, w, "w");
  check_flat(g, w, "g");
  check_flat(backup, w, "backup");
  if (momentum != 0) check_flat(buf, w, "buf");
  check_flag(skip, w, "skip");
  check_flag(started, w, "started");
  TORCH_CHECK(lr_t.numel() == 1 && lr_t.device() == w.device() &&
                  lr_t.scalar_type() == at::kDouble,
              "samfast: lr must be a one-element float64 tensor on ", w.device());
  const double lr = lr_t.item<double>();
  const bool first = !started.item<bool>();
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
  unsigned short *wp = mutable_bits16(w), *mp = mutable_bits16(buf);
  const unsigned short *gp = bits16(g), *bp = bits16(backup);
  const float l = lr, m = momentum, d = dampening, wd = weight_decay;
  const bool bf16 = format16(w) == 0;
  at::parallel_for(0, w.numel(), kGrain, [&](int64_t begin, int64_t end) {
    bf16 ? SAMFAST_CPU_CALL(restore_sgd16_any<0>, wp, gp, bp, mp, begin, end, l, m, d, wd,
                            nesterov, first)
         : SAMFAST_CPU_CALL(restore_sgd16_any<1>, wp, gp, bp, mp, begin, end, l, m, d, wd,
                            nesterov, first);
  });
}

// ---- LookSAM (samfast/policies.py; maths in samfast/ops.py) ----------------------------------

// Two sums per block (dot, sq), added in block order like blocked_reduce's.
template <typename acc_t, typename F>
std::pair<acc_t, acc_t> blocked_reduce2(int64_t n, F f) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<acc_t> first(blocks, 0), second(blocks, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    f(b0, b1, first.data(), second.data());
  });
  acc_t a = 0, b = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    a += first[i];
    b += second[i];
  }
  return {a, b};
}

// coef: a one-element tensor in the opmath dtype on the buffers' device, as scale.
void check_coef(const at::Tensor& coef, const at::Tensor& like) {
  const auto opmath = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef.numel() == 1 && coef.scalar_type() == opmath && coef.device() == like.device(),
              "samfast: coef must be a one-element ", opmath, " tensor on ", like.device());
}

at::Tensor looksam_dots_cpu(const at::Tensor& g, const at::Tensor& gs) {
  check_flat(g, g, "g");
  check_flat(gs, g, "gs");
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({2}, g.options().dtype(acc));
  const int64_t n = g.numel();
  if (is_wide(g)) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "looksam_dots", [&] {
      const auto *gp = g.const_data_ptr<scalar_t>(), *sp = gs.const_data_ptr<scalar_t>();
      const auto sums = blocked_reduce2<scalar_t>(
          n, [=](int64_t b0, int64_t b1, scalar_t* dot, scalar_t* sq) {
            SAMFAST_CPU_CALL(looksam_dots_blocks<scalar_t>, gp, sp, n, kBlock, b0, b1, dot, sq);
          });
      out[0].fill_(sums.first);
      out[1].fill_(sums.second);
    });
    return out;
  }
  const unsigned short *gp = bits16(g), *sp = bits16(gs);
  const bool bf16 = format16(g) == 0;
  const auto sums = blocked_reduce2<float>(n, [=](int64_t b0, int64_t b1, float* dot, float* sq) {
    bf16 ? SAMFAST_CPU_CALL(looksam_dots_blocks16<0>, gp, sp, n, kBlock, b0, b1, dot, sq)
         : SAMFAST_CPU_CALL(looksam_dots_blocks16<1>, gp, sp, n, kBlock, b0, b1, dot, sq);
  });
  out[0].fill_(sums.first);
  out[1].fill_(sums.second);
  return out;
}

// gv <- gs - coef * gv unless skip; returns the sum of squares of gv as it then is.
at::Tensor looksam_project_cpu(at::Tensor& gv, const at::Tensor& gs, const at::Tensor& coef,
                               const at::Tensor& skip) {
  check_flat(gv, gv, "gv");
  check_flat(gs, gv, "gs");
  check_flag(skip, gv, "skip");
  check_coef(coef, gv);
  const auto acc = gv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (skip.item<bool>()) return sq_norm_cpu(gv, gv, false, 0.0);
  at::Tensor out = at::empty({}, gv.options().dtype(acc));
  const int64_t n = gv.numel();
  if (is_wide(gv)) {
    AT_DISPATCH_FLOATING_TYPES(gv.scalar_type(), "looksam_project_", [&] {
      auto* vp = gv.mutable_data_ptr<scalar_t>();
      const auto* sp = gs.const_data_ptr<scalar_t>();
      const scalar_t c = coef.item<scalar_t>();
      out.fill_(blocked_reduce<scalar_t>(n, [=](int64_t b0, int64_t b1, scalar_t* partial) {
        SAMFAST_CPU_CALL(looksam_project_blocks<scalar_t>, vp, sp, n, kBlock, b0, b1, c,
                         partial);
      }));
    });
    return out;
  }
  unsigned short* vp = mutable_bits16(gv);
  const unsigned short* sp = bits16(gs);
  const float c = coef.item<float>();
  const bool bf16 = format16(gv) == 0;
  out.fill_(blocked_reduce<float>(n, [=](int64_t b0, int64_t b1, float* partial) {
    bf16 ? SAMFAST_CPU_CALL(looksam_project_blocks16<0>, vp, sp, n, kBlock, b0, b1, c, partial)
         : SAMFAST_CPU_CALL(looksam_project_blocks16<1>, vp, sp, n, kBlock, b0, b1, c, partial);
  }));
  return out;
}

// g <- g + coef * gv unless skip.
void looksam_reuse_cpu(at::Tensor& g, const at::Tensor& gv, const at::Tensor& coef,
                       const at::Tensor& skip) {
  check_flat(g, g, "g");
  check_flat(gv, g, "gv");
  check_flag(skip, g, "skip");
  check_coef(coef, g);
  if (skip.item<bool>()) return;
  if (is_wide(g)) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "looksam_reuse_", [&] {
      auto* gp = g.mutable_data_ptr<scalar_t>();
      const auto* vp = gv.const_data_ptr<scalar_t>();
      const scalar_t c = coef.item<scalar_t>();
      at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
        SAMFAST_CPU_CALL(looksam_reuse<scalar_t>, gp, vp, begin, end, c);
      });
    });
    return;
  }
  unsigned short* gp = mutable_bits16(g);
  const unsigned short* vp = bits16(gv);
  const float c = coef.item<float>();
  const bool bf16 = format16(g) == 0;
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
    bf16 ? SAMFAST_CPU_CALL(looksam_reuse16<0>, gp, vp, begin, end, c)
         : SAMFAST_CPU_CALL(looksam_reuse16<1>, gp, vp, begin, end, c);
  });
}

}  // namespace

// The schemas are declared once, in samfast/ops.py (the contract every backend implements),
// before this library is loaded; here only the CPU implementations are registered.
TORCH_LIBRARY_IMPL(samfast, CPU, m) {
  m.impl("sq_norm", &sq_norm_cpu);
  m.impl("nonfinite", &nonfinite_cpu);
  m.impl("ascent_", &ascent_cpu);
  m.impl("restore_sgd_", &restore_sgd_cpu);
  m.impl("looksam_dots", &looksam_dots_cpu);
  m.impl("looksam_project_", &looksam_project_cpu);
  m.impl("looksam_reuse_", &looksam_reuse_cpu);
}

}  // namespace samfast

// Defined by csrc/cuda/build_info.cu in a CUDA build; absent (null) in a CPU-only one.
extern "C" const char* samfast_cuda_arch_list() __attribute__((weak));
extern "C" int samfast_cuda_runtime_version() __attribute__((weak));

namespace {

const char* isa_name(samfast::Isa isa) {
  return isa == samfast::Isa::kAvx512 ? "avx512" : isa == samfast::Isa::kAvx2 ? "avx2" : "base";
}

// samfast._C.build_info(): how this extension was built and what it picked at run time.
PyObject* build_info(PyObject*, PyObject*) {
  PyObject* info = PyDict_New();
  auto set = [&](const char* key, PyObject* value) {
    PyDict_SetItemString(info, key, value);
    Py_DECREF(value);
  };
  set("cpu_isa", PyUnicode_FromString(isa_name(samfast::cpu_isa())));
#if defined(__x86_64__) && defined(__GNUC__)
  set("cpu_isas_built", PyUnicode_FromString("base (SSE2), avx2, avx512"));
#else
  set("cpu_isas_built", PyUnicode_FromString("base"));
#endif
  set("compiler", PyUnicode_FromString(__VERSION__));
  set("torch", PyUnicode_FromFormat("%d.%d.%d", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                                    TORCH_VERSION_PATCH));
  if (samfast_cuda_arch_list != nullptr) {
    set("cuda_archs", PyUnicode_FromString(samfast_cuda_arch_list()));
    set("cuda_runtime", PyLong_FromLong(samfast_cuda_runtime_version()));
  } else {
    Py_INCREF(Py_None);
    set("cuda_archs", Py_None);
  }
  return info;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How samfast._C was built (doctor)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import samfast._C` loads this library, whose static initializers register the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
