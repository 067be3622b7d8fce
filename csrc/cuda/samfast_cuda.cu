// CUDA kernels of the native backend, registered for the CUDA dispatch key of the schemas
// declared in samfast/ops.py. Same maths and same order of operations as the CPU kernels.
//
// * Skip flags are read on the device (no host sync in a SAM step: CUDA-graph capturable).
// * Reductions are deterministic: each block reduces a fixed, grid-strided set of elements in
//   a fixed tree order and writes one partial; a second pass (at::sum over the partials, a
//   single-output reduction whose order is fixed for a given size) adds them. No atomics.
// * Elementwise kernels are grid-stride loops (256 threads, at most kMaxBlocks blocks) over
//   scalar elements: memory-bound streams; bench/gpu_check.sh measures them against a copy.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace samfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;
constexpr int kReduceBlocks = 1024;

int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads,
                                                                 kMaxBlocks)));
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

template <typename scalar_t, bool kAdaptive>
__global__ void sq_norm_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                               int64_t n, at::opmath_type<scalar_t> eta,
                               at::opmath_type<scalar_t>* __restrict__ partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t acc = 0;
  for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * kThreads) {
    opmath_t x = static_cast<opmath_t>(g[i]);
    if (kAdaptive) x *= fabs(static_cast<opmath_t>(w[i])) + eta;
    acc += x * x;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename scalar_t>
__global__ void nonfinite_kernel(const scalar_t* __restrict__ g, int64_t n,
                                 float* __restrict__ partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  float count = 0;
  for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * kThreads) {
    count += !(fabs(static_cast<opmath_t>(g[i])) < INFINITY) ? 1.f : 0.f;
  }
  count = block_sum(count);
  if (threadIdx.x == 0) partial[blockIdx.x] = count;
}

template <typename scalar_t, bool kAdaptive>
__global__ void ascent_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
                              scalar_t* __restrict__ backup, int64_t n,
                              const at::opmath_type<scalar_t>* __restrict__ scale,
                              const bool* __restrict__ skip, at::opmath_type<scalar_t> eta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool skipped = *skip;
  const opmath_t s = *scale;
  for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * kThreads) {
    const scalar_t wi = w[i];
    backup[i] = wi;
    if (skipped) continue;
    const opmath_t wf = static_cast<opmath_t>(wi);
    opmath_t e = static_cast<opmath_t>(g[i]);
    if (kAdaptive) {
      const opmath_t t = fabs(wf) + eta;
      e = (t * t) * e;
    }
    w[i] = static_cast<scalar_t>(wf + e * s);
  }
}

template <typename scalar_t, bool kMomentum, bool kNesterov>
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
  for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * kThreads) {
    const scalar_t b0 = backup[i];
    if (skipped) {
      w[i] = b0;
      continue;
    }
    const opmath_t w0 = static_cast<opmath_t>(b0);
    opmath_t d = static_cast<opmath_t>(g[i]) + wd * w0;
    if (kMomentum) {
      opmath_t b = first ? d : static_cast<opmath_t>(buf[i]) * momentum + (1 - dampening) * d;
      const scalar_t stored = static_cast<scalar_t>(b);
      buf[i] = stored;
      b = static_cast<opmath_t>(stored);
      d = kNesterov ? d + momentum * b : b;
    }
    w[i] = static_cast<scalar_t>(w0 - lr * d);
  }
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

at::Tensor sq_norm_cuda(const at::Tensor& g, const at::Tensor& w, bool adaptive, double eta) {
  check_cuda(g, g, "g");
  check_cuda(w, g, "w");
  c10::cuda::CUDAGuard guard(g.device());
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int blocks = std::min(blocks_for(g.numel()), kReduceBlocks);
  at::Tensor partial = at::empty({blocks}, g.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sq_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto* out = partial.mutable_data_ptr<opmath_t>();
    if (adaptive) {
      sq_norm_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), g.numel(), eta, out);
    } else {
      sq_norm_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), g.numel(), eta, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum();
}

at::Tensor nonfinite_cuda(const at::Tensor& g) {
  check_cuda(g, g, "g");
  c10::cuda::CUDAGuard guard(g.device());
  const int blocks = std::min(blocks_for(g.numel()), kReduceBlocks);
  at::Tensor partial = at::empty({blocks}, g.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "nonfinite", [&] {
    nonfinite_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), g.numel(), partial.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "ascent_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(scale.scalar_type() == c10::CppTypeToScalarType<opmath_t>::value,
                "samfast: scale must have the opmath dtype of w");
    const at::Tensor& s = scale;
    const int blocks = blocks_for(w.numel());
    if (adaptive) {
      ascent_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          w.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          backup.mutable_data_ptr<scalar_t>(), w.numel(), s.const_data_ptr<opmath_t>(),
          skip.const_data_ptr<bool>(), eta);
    } else {
      ascent_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          w.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          backup.mutable_data_ptr<scalar_t>(), w.numel(), s.const_data_ptr<opmath_t>(),
          skip.const_data_ptr<bool>(), eta);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void restore_sgd_launch(at::Tensor& w, const at::Tensor& g, const at::Tensor& backup,
                        at::Tensor& buf, const at::Tensor& skip, const at::Tensor& lr,
                        double momentum, double dampening, double wd, bool nesterov,
                        const at::Tensor& started, cudaStream_t stream) {
  auto* kernel = momentum == 0 ? restore_sgd_kernel<scalar_t, false, false>
                 : nesterov    ? restore_sgd_kernel<scalar_t, true, true>
                               : restore_sgd_kernel<scalar_t, true, false>;
  kernel<<<blocks_for(w.numel()), kThreads, 0, stream>>>(
      w.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
      backup.const_data_ptr<scalar_t>(), buf.mutable_data_ptr<scalar_t>(), w.numel(),
      skip.const_data_ptr<bool>(), lr.const_data_ptr<double>(), started.const_data_ptr<bool>(),
      momentum, dampening, wd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

}  // namespace

TORCH_LIBRARY_IMPL(samfast, CUDA, m) {
  m.impl("sq_norm", &sq_norm_cuda);
  m.impl("nonfinite", &nonfinite_cuda);
  m.impl("ascent_", &ascent_cuda);
  m.impl("restore_sgd_", &restore_sgd_cuda);
}

}  // namespace samfast
