// CUDA kernels of the native backend, registered for the CUDA dispatch key of the schemas
// declared in samfast/ops.py. Same maths and same order of operations as the CPU kernels.
//
// * Skip flags are read on the device (no host sync in a SAM step: CUDA-graph capturable).
// * Reductions are deterministic: each block reduces a fixed, grid-strided set of elements in
//   a fixed tree order and writes one partial; a second pass (at::sum over the partials, a
//   single-output reduction whose order is fixed for a given size) adds them. No atomics.
// * Elementwise kernels are grid-stride loops (256 threads, at most kMaxBlocks blocks):
//   memory-bound streams; bench/gpu_check.sh measures them against a copy.
// * Every kernel has a vector variant (kVec = 16 / sizeof(scalar_t): 8 bf16/fp16, 4 fp32,
//   2 fp64 per thread and iteration, one 128-bit load or store per stream), launched when all
//   its streams start 16-byte aligned, which samfast's flat layout guarantees (samfast/flat.py:
//   every slice starts at a multiple of 16 elements); its last n % kVec elements, none in that
//   layout, go one by one. kVec = 1 is the scalar variant for any other slice. Both run the
//   same loop body (instantiated for a pack and for one element), so the arithmetic of an
//   element and its bits are the same in both (the build passes -fmad=false: no contraction
//   into FMAs). tests/test_compile.py checks the registers and the SASS of every variant.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace samfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;
constexpr int kReduceBlocks = 1024;

int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads,
                                                                 kMaxBlocks)));
}

// kVec elements moved by one access: a 16-byte aligned struct is loaded and stored as one
// 128-bit access (ld.global.v4 / LDG.E.128).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
constexpr int vec_of() {
  return 16 / sizeof(T);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Pack `i` of p (elements [i * kVec, (i + 1) * kVec)).
template <int kVec, typename T>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, kVec>*>(p)[i];
}

template <int kVec, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, kVec>& x) {
  reinterpret_cast<Pack<T, kVec>*>(p)[i] = x;
}

// A grid-stride loop over the packs of [0, n), then over the n % kVec elements after them:
// body<kVec>(pack index) and body<1>(element index).
template <int kVec, typename Body>
__device__ __forceinline__ void for_each_pack(int64_t n, Body body) {
  const int64_t first = blockIdx.x * (int64_t)kThreads + threadIdx.x;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  const int64_t packs = n / kVec;
  for (int64_t i = first; i < packs; i += stride) body(std::integral_constant<int, kVec>(), i);
  if constexpr (kVec > 1) {
    for (int64_t i = packs * kVec + first; i < n; i += stride) {
      body(std::integral_constant<int, 1>(), i);
    }
  }
}

// Blocks for a grid-stride loop over n elements kVec at a time.
template <int kVec>
int blocks_for_packs(int64_t n) {
  return blocks_for((n + kVec - 1) / kVec);
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t shared[kThreads];
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  return shared[0];
}

template <typename scalar_t, int kVec, bool kAdaptive>
__global__ void sq_norm_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                               int64_t n, at::opmath_type<scalar_t> eta,
                               at::opmath_type<scalar_t>* __restrict__ partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t acc = 0;
  for_each_pack<kVec>(n, [&](auto vec, int64_t i) {
    constexpr int V = decltype(vec)::value;
    const Pack<scalar_t, V> gv = load_pack<V>(g, i);
    Pack<scalar_t, V> wv;
    if (kAdaptive) wv = load_pack<V>(w, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      opmath_t x = static_cast<opmath_t>(gv.v[k]);
      if (kAdaptive) x *= fabs(static_cast<opmath_t>(wv.v[k])) + eta;
      acc += x * x;
    }
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename scalar_t, int kVec>
__global__ void nonfinite_kernel(const scalar_t* __restrict__ g, int64_t n,
                                 float* __restrict__ partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  float count = 0;
  for_each_pack<kVec>(n, [&](auto vec, int64_t i) {
    constexpr int V = decltype(vec)::value;
    const Pack<scalar_t, V> gv = load_pack<V>(g, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      count += !(fabs(static_cast<opmath_t>(gv.v[k])) < INFINITY) ? 1.f : 0.f;
    }
  });
  count = block_sum(count);
  if (threadIdx.x == 0) partial[blockIdx.x] = count;
}

template <typename scalar_t, int kVec, bool kAdaptive>
__global__ void ascent_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
                              scalar_t* __restrict__ backup, int64_t n,
                              const at::opmath_type<scalar_t>* __restrict__ scale,
                              const bool* __restrict__ skip, at::opmath_type<scalar_t> eta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool skipped = *skip;
  const opmath_t s = *scale;
  for_each_pack<kVec>(n, [&](auto vec, int64_t i) {
    constexpr int V = decltype(vec)::value;
    Pack<scalar_t, V> wv = load_pack<V>(w, i);
    store_pack<V>(backup, i, wv);
    if (skipped) return;
    const Pack<scalar_t, V> gv = load_pack<V>(g, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const opmath_t wf = static_cast<opmath_t>(wv.v[k]);
      opmath_t e = static_cast<opmath_t>(gv.v[k]);
      if (kAdaptive) {
        const opmath_t t = fabs(wf) + eta;
        e = (t * t) * e;
      }
      wv.v[k] = static_cast<scalar_t>(wf + e * s);
    }
    store_pack<V>(w, i, wv);
  });
}

// w and backup may be the same buffer (a plain SGD step): neither is __restrict__.
template <typename scalar_t, int kVec, bool kMomentum, bool kNesterov>
__global__ void restore_sgd_kernel(scalar_t* w, const scalar_t* __restrict__ g,
                                   const scalar_t* backup, scalar_t* __restrict__ buf,
                                   int64_t n, const bool* __restrict__ skip,
                                   const double* __restrict__ lr_ptr,
                                   const bool* __restrict__ started,
                                   at::opmath_type<scalar_t> momentum,
                                   at::opmath_type<scalar_t> dampening,
                                   at::opmath_type<scalar_t> wd) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool skipped = *skip;
  const bool first = kMomentum && !*started;  // uniform: buf is not read on the first step
  const opmath_t lr = static_cast<opmath_t>(*lr_ptr);  // as the CPU kernels round a double lr
  for_each_pack<kVec>(n, [&](auto vec, int64_t i) {
    constexpr int V = decltype(vec)::value;
    const Pack<scalar_t, V> bv = load_pack<V>(backup, i);
    if (skipped) {
      store_pack<V>(w, i, bv);
      return;
    }
    const Pack<scalar_t, V> gv = load_pack<V>(g, i);
    Pack<scalar_t, V> mv, wv;
    if (kMomentum && !first) mv = load_pack<V>(buf, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const opmath_t w0 = static_cast<opmath_t>(bv.v[k]);
      opmath_t d = static_cast<opmath_t>(gv.v[k]) + wd * w0;
      if (kMomentum) {
        opmath_t b = first ? d : static_cast<opmath_t>(mv.v[k]) * momentum + (1 - dampening) * d;
        mv.v[k] = static_cast<scalar_t>(b);
        b = static_cast<opmath_t>(mv.v[k]);
        d = kNesterov ? d + momentum * b : b;
      }
      wv.v[k] = static_cast<scalar_t>(w0 - lr * d);
    }
    if (kMomentum) store_pack<V>(buf, i, mv);
    store_pack<V>(w, i, wv);
  });
}

// ---- LookSAM (samfast/policies.py; maths in samfast/ops.py) ----------------------------------

// partial[b] = sum g * gs and partial[gridDim.x + b] = sum g^2 over block b's elements.
template <typename scalar_t, int kVec>
__global__ void looksam_dots_kernel(const scalar_t* __restrict__ g,
                                    const scalar_t* __restrict__ gs, int64_t n,
                                    at::opmath_type<scalar_t>* __restrict__ partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t dot = 0, sq = 0;
  for_each_pack<kVec>(n, [&](auto vec, int64_t i) {
    constexpr int V = decltype(vec)::value;
    const Pack<scalar_t, V> gv = load_pack<V>(g, i);
    const Pack<scalar_t, V> sv = load_pack<V>(gs, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const opmath_t x = static_cast<opmath_t>(gv.v[k]);
      dot += x * static_cast<opmath_t>(sv.v[k]);
      sq += x * x;
    }
  });
  dot = block_sum(dot);
  __syncthreads();  // every thread has read the first sum before the shared array is reused
  sq = block_sum(sq);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = dot;
    partial[gridDim.x + blockIdx.x] = sq;
  }
}

// Unless skip: gv <- gs - coef * gv. partial[b]: the sum of squares of gv as stored.
template <typename scalar_t, int kVec>
__global__ void looksam_project_kernel(scalar_t* __restrict__ gv,
                                       const scalar_t* __restrict__ gs, int64_t n,
                                       const at::opmath_type<scalar_t>* __restrict__ coef,
                                       const bool* __restrict__ skip,
                                       at::opmath_type<scalar_t>* __restrict__ partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool skipped = *skip;
  const opmath_t c = *coef;
  opmath_t acc = 0;
  for_each_pack<kVec>(n, [&](auto vec, int64_t i) {
    constexpr int V = decltype(vec)::value;
    Pack<scalar_t, V> vv = load_pack<V>(gv, i);
    if (!skipped) {
      const Pack<scalar_t, V> sv = load_pack<V>(gs, i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        vv.v[k] = static_cast<scalar_t>(static_cast<opmath_t>(sv.v[k]) -
                                        c * static_cast<opmath_t>(vv.v[k]));
      }
      store_pack<V>(gv, i, vv);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const opmath_t x = static_cast<opmath_t>(vv.v[k]);
      acc += x * x;
    }
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Unless skip: g <- g + coef * gv.
template <typename scalar_t, int kVec>
__global__ void looksam_reuse_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ gv,
                                     int64_t n,
                                     const at::opmath_type<scalar_t>* __restrict__ coef,
                                     const bool* __restrict__ skip) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (*skip) return;
  const opmath_t c = *coef;
  for_each_pack<kVec>(n, [&](auto vec, int64_t i) {
    constexpr int V = decltype(vec)::value;
    Pack<scalar_t, V> gg = load_pack<V>(g, i);
    const Pack<scalar_t, V> vv = load_pack<V>(gv, i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      gg.v[k] = static_cast<scalar_t>(static_cast<opmath_t>(gg.v[k]) +
                                      c * static_cast<opmath_t>(vv.v[k]));
    }
    store_pack<V>(g, i, gg);
  });
}

// skip / started: one-element bool tensors on w's device (read by the kernels there).
void check_flag(const at::Tensor& flag, const at::Tensor& like, const char* name) {
  TORCH_CHECK(flag.numel() == 1 && flag.scalar_type() == at::kBool &&
                  flag.device() == like.device(),
              "samfast: ", name, " must be a one-element bool tensor on ", like.device());
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "samfast: ", name,
              " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.numel() == like.numel() && t.scalar_type() == like.scalar_type() &&
                  t.device() == like.device(),
              "samfast: ", name, " does not match w in size, dtype or device");
}

// launch(kVec): the vector variant when every stream the kernel reads or writes starts 16-byte
// aligned, else the scalar one.
template <typename scalar_t, typename Launch>
void launch_vec_or_scalar(bool aligned, Launch launch) {
  constexpr int kVec = vec_of<scalar_t>();
  if (aligned) {
    launch(std::integral_constant<int, kVec>());
  } else {
    launch(std::integral_constant<int, 1>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sq_norm_cuda(const at::Tensor& g, const at::Tensor& w, bool adaptive, double eta) {
  check_cuda(g, g, "g");
  check_cuda(w, g, "w");
  c10::cuda::CUDAGuard guard(g.device());
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = g.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sq_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    launch_vec_or_scalar<scalar_t>(aligned16(gp) && (!adaptive || aligned16(wp)), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int blocks = std::min(blocks_for_packs<V>(n), kReduceBlocks);
      partial = at::empty({blocks}, g.options().dtype(acc));
      auto* kernel = adaptive ? sq_norm_kernel<scalar_t, V, true>
                              : sq_norm_kernel<scalar_t, V, false>;
      kernel<<<blocks, kThreads, 0, stream>>>(gp, wp, n, eta,
                                              partial.mutable_data_ptr<opmath_t>());
    });
  });
  return partial.sum();
}

at::Tensor nonfinite_cuda(const at::Tensor& g) {
  check_cuda(g, g, "g");
  c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "nonfinite", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    launch_vec_or_scalar<scalar_t>(aligned16(gp), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int blocks = std::min(blocks_for_packs<V>(n), kReduceBlocks);
      partial = at::empty({blocks}, g.options().dtype(at::kFloat));
      nonfinite_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(
          gp, n, partial.mutable_data_ptr<float>());
    });
  });
  return partial.sum();
}

void ascent_cuda(at::Tensor& w, const at::Tensor& g, at::Tensor& backup, const at::Tensor& scale,
                 const at::Tensor& skip, bool adaptive, double eta) {
  check_cuda(w, w, "w");
  check_cuda(g, w, "g");
  check_cuda(backup, w, "backup");
  check_flag(skip, w, "skip");
  TORCH_CHECK(scale.numel() == 1 && scale.device() == w.device(),
              "samfast: scale must be a one-element tensor on ", w.device());
  c10::cuda::CUDAGuard guard(w.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = w.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "ascent_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(scale.scalar_type() == c10::CppTypeToScalarType<opmath_t>::value,
                "samfast: scale must have the opmath dtype of w");
    scalar_t* wp = w.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* bp = backup.mutable_data_ptr<scalar_t>();
    const opmath_t* sp = scale.const_data_ptr<opmath_t>();
    const bool* skp = skip.const_data_ptr<bool>();
    const bool aligned = aligned16(wp) && aligned16(gp) && aligned16(bp);
    launch_vec_or_scalar<scalar_t>(aligned, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      auto* kernel = adaptive ? ascent_kernel<scalar_t, V, true>
                              : ascent_kernel<scalar_t, V, false>;
      kernel<<<blocks_for_packs<V>(n), kThreads, 0, stream>>>(wp, gp, bp, n, sp, skp, eta);
    });
  });
}

template <typename scalar_t>
void restore_sgd_launch(at::Tensor& w, const at::Tensor& g, const at::Tensor& backup,
                        at::Tensor& buf, const at::Tensor& skip, const at::Tensor& lr,
                        double momentum, double dampening, double wd, bool nesterov,
                        const at::Tensor& started, cudaStream_t stream) {
  const int64_t n = w.numel();
  scalar_t* wp = w.mutable_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* bp = backup.const_data_ptr<scalar_t>();
  scalar_t* mp = buf.mutable_data_ptr<scalar_t>();
  const bool aligned = aligned16(wp) && aligned16(gp) && aligned16(bp) &&
                       (momentum == 0 || aligned16(mp));
  launch_vec_or_scalar<scalar_t>(aligned, [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    auto* kernel = momentum == 0 ? restore_sgd_kernel<scalar_t, V, false, false>
                   : nesterov    ? restore_sgd_kernel<scalar_t, V, true, true>
                                 : restore_sgd_kernel<scalar_t, V, true, false>;
    kernel<<<blocks_for_packs<V>(n), kThreads, 0, stream>>>(
        wp, gp, bp, mp, n, skip.const_data_ptr<bool>(), lr.const_data_ptr<double>(),
        started.const_data_ptr<bool>(), momentum, dampening, wd);
  });
}

void restore_sgd_cuda(at::Tensor& w, const at::Tensor& g, const at::Tensor& backup,
                      at::Tensor& buf, const at::Tensor& skip, const at::Tensor& lr,
                      double momentum, double dampening, double weight_decay, bool nesterov,
                      const at::Tensor& started) {
  check_cuda(w, w, "w");
  check_cuda(g, w, "g");
  check_cuda(backup, w, "backup");
  if (momentum != 0) check_cuda(buf, w, "buf");
  check_flag(skip, w, "skip");
  check_flag(started, w, "started");
  TORCH_CHECK(lr.device() == w.device() && lr.scalar_type() == at::kDouble && lr.numel() == 1,
              "samfast: lr must be a one-element float64 tensor on ", w.device());
  c10::cuda::CUDAGuard guard(w.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "restore_sgd_", [&] {
    restore_sgd_launch<scalar_t>(w, g, backup, buf, skip, lr, momentum, dampening, weight_decay,
                                 nesterov, started, stream);
  });
}

// coef: a one-element tensor in the opmath dtype of `like`, on its device.
template <typename scalar_t>
const at::opmath_type<scalar_t>* coef_ptr(const at::Tensor& coef, const at::Tensor& like) {
  using opmath_t = at::opmath_type<scalar_t>;
  TORCH_CHECK(coef.numel() == 1 && coef.device() == like.device() &&
                  coef.scalar_type() == c10::CppTypeToScalarType<opmath_t>::value,
              "samfast: coef must be a one-element tensor in the opmath dtype of the buffers, "
              "on ", like.device());
  return coef.const_data_ptr<opmath_t>();
}

at::Tensor looksam_dots_cuda(const at::Tensor& g, const at::Tensor& gs) {
  check_cuda(g, g, "g");
  check_cuda(gs, g, "gs");
  c10::cuda::CUDAGuard guard(g.device());
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = g.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "looksam_dots", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = gs.const_data_ptr<scalar_t>();
    launch_vec_or_scalar<scalar_t>(aligned16(gp) && aligned16(sp), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int blocks = std::min(blocks_for_packs<V>(n), kReduceBlocks);
      partial = at::empty({2, blocks}, g.options().dtype(acc));
      looksam_dots_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(
          gp, sp, n, partial.mutable_data_ptr<opmath_t>());
    });
  });
  return partial.sum(1);
}

at::Tensor looksam_project_cuda(at::Tensor& gv, const at::Tensor& gs, const at::Tensor& coef,
                                const at::Tensor& skip) {
  check_cuda(gv, gv, "gv");
  check_cuda(gs, gv, "gs");
  check_flag(skip, gv, "skip");
  c10::cuda::CUDAGuard guard(gv.device());
  const auto acc = gv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = gv.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gv.scalar_type(), "looksam_project_",
                                  [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* cp = coef_ptr<scalar_t>(coef, gv);
    scalar_t* vp = gv.mutable_data_ptr<scalar_t>();
    const scalar_t* sp = gs.const_data_ptr<scalar_t>();
    launch_vec_or_scalar<scalar_t>(aligned16(vp) && aligned16(sp), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int blocks = std::min(blocks_for_packs<V>(n), kReduceBlocks);
      partial = at::empty({blocks}, gv.options().dtype(acc));
      looksam_project_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(
          vp, sp, n, cp, skip.const_data_ptr<bool>(), partial.mutable_data_ptr<opmath_t>());
    });
  });
  return partial.sum();
}

void looksam_reuse_cuda(at::Tensor& g, const at::Tensor& gv, const at::Tensor& coef,
                        const at::Tensor& skip) {
  check_cuda(g, g, "g");
  check_cuda(gv, g, "gv");
  check_flag(skip, g, "skip");
  c10::cuda::CUDAGuard guard(g.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = g.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "looksam_reuse_",
                                  [&] {
    const auto* cp = coef_ptr<scalar_t>(coef, g);
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    const scalar_t* vp = gv.const_data_ptr<scalar_t>();
    launch_vec_or_scalar<scalar_t>(aligned16(gp) && aligned16(vp), [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      looksam_reuse_kernel<scalar_t, V><<<blocks_for_packs<V>(n), kThreads, 0, stream>>>(
          gp, vp, n, cp, skip.const_data_ptr<bool>());
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(samfast, CUDA, m) {
  m.impl("sq_norm", &sq_norm_cuda);
  m.impl("nonfinite", &nonfinite_cuda);
  m.impl("ascent_", &ascent_cuda);
  m.impl("restore_sgd_", &restore_sgd_cuda);
  m.impl("looksam_dots", &looksam_dots_cuda);
  m.impl("looksam_project_", &looksam_project_cuda);
  m.impl("looksam_reuse_", &looksam_reuse_cuda);
}

}  // namespace samfast
