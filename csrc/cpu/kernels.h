// The fp32/fp64 CPU kernels of the native backend, on raw pointers over [begin, end).
//
// This header is compiled three times, into namespaces chosen by the including file: for the
// baseline x86-64 ISA (SSE2), under `#pragma GCC target("avx2,fma")` and for AVX-512; and
// csrc/samfast.cpp picks a version at run time (__builtin_cpu_supports; SAMFAST_CPU_ISA=base
// or avx2 forces one, for benchmarks). It includes no
// header: inline functions of a header compiled under two ISAs could be merged by the linker
// into the AVX2 copy and then run on a CPU without AVX2.
//
// Why several ISAs: on the development machine (Xeon, 2 cores, 300 MiB L3) a WRN-16-8 step's
// buffers fit in cache, so wide vectors pay where DRAM-bound code would not care. Measured
// there on 11M floats (2 threads): sum of squares 1.9 ms (SSE2) vs 1.5 ms (AVX2); count of
// non-finite 5.2 ms vs 2.2 ms; the streams (ascent, restore + SGD) gain less, ~10%, being
// near the cache bandwidth already. AVX-512 measured within the noise of AVX2.
//
// Results are bit-identical across the builds: elementwise code does the same IEEE
// operations per element (ISO C++ mode: no FMA contraction), and reductions add in a fixed
// lane order (kLanes interleaved partial sums) that the compiler may not reassociate.

#ifndef SAMFAST_CPU_NS
#error "define SAMFAST_CPU_NS before including csrc/cpu/kernels.h"
#endif

namespace samfast {
namespace SAMFAST_CPU_NS {

constexpr long kLanes = 16;

template <typename T>
inline T absval(T x) {
  return x < T(0) ? -x : x;
}

// sum over [begin, end) of (T(w) g)^2 with T = |w| + eta if adaptive, in kLanes lanes.
template <typename T, bool kAdaptive>
T sq_norm(const T* __restrict__ g, const T* __restrict__ w, long begin, long end, T eta) {
  T lanes[kLanes] = {};
  long i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (long l = 0; l < kLanes; ++l) {
      T x = g[i + l];
      if (kAdaptive) x *= absval(w[i + l]) + eta;
      lanes[l] += x * x;
    }
  }
  T tail = 0;
  for (; i < end; ++i) {
    T x = g[i];
    if (kAdaptive) x *= absval(w[i]) + eta;
    tail += x * x;
  }
  T total = 0;
  for (long l = 0; l < kLanes; ++l) total += lanes[l];
  return total + tail;
}

// How many of g[begin, end) are +-inf or NaN: !(|x| < inf), a compare and a masked add.
// Counted in T lanes (exact: a lane sees at most end - begin < 2^24 elements per call, see
// kBlock) because int64 lanes would need a widening conversion per element.
template <typename T>
long nonfinite(const T* __restrict__ g, long begin, long end) {
  const T inf = static_cast<T>(__builtin_inf());
  T lanes[kLanes] = {};
  long i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (long l = 0; l < kLanes; ++l) lanes[l] += absval(g[i + l]) < inf ? T(0) : T(1);
  }
  long total = 0;
  for (; i < end; ++i) total += !(absval(g[i]) < inf);
  for (long l = 0; l < kLanes; ++l) total += static_cast<long>(lanes[l]);
  return total;
}

// backup <- w; w <- w + (T(w)^2 g) * scale
template <typename T, bool kAdaptive>
void ascent(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ backup, long begin,
            long end, T scale, T eta) {
  for (long i = begin; i < end; ++i) {
    const T wi = w[i];
    backup[i] = wi;
    T e = g[i];
    if (kAdaptive) {
      const T t = absval(wi) + eta;
      e = (t * t) * e;
    }
    w[i] = wi + e * scale;
  }
}

// torch.optim.SGD's update of one element from the weight w0, in its order of operations
// (see csrc/samfast.cpp); the momentum buffer element is read and written through `buf`.
template <typename T, bool kMomentum, bool kNesterov, bool kFirst>
inline T sgd_element(T w0, T g, T& buf, T lr, T momentum, T dampening, T wd) {
  T d = g + wd * w0;
  if (kMomentum) {
    const T b = kFirst ? d : buf * momentum + (T(1) - dampening) * d;
    buf = b;
    d = kNesterov ? d + momentum * b : b;
  }
  return w0 - lr * d;
}

// w <- backup, then the SGD update: four distinct streams, restrict-qualified.
template <typename T, bool kMomentum, bool kNesterov, bool kFirst>
void restore_sgd(T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ backup,
                 T* __restrict__ buf, long begin, long end, T lr, T momentum, T dampening,
                 T wd) {
  for (long i = begin; i < end; ++i) {
    w[i] = sgd_element<T, kMomentum, kNesterov, kFirst>(backup[i], g[i], buf[i], lr, momentum,
                                                         dampening, wd);
  }
}

// A plain SGD step (the base phase): the weights are read and written in place.
template <typename T, bool kMomentum, bool kNesterov, bool kFirst>
void sgd_in_place(T* w, const T* __restrict__ g, T* __restrict__ buf, long begin, long end,
                  T lr, T momentum, T dampening, T wd) {
  for (long i = begin; i < end; ++i) {
    w[i] = sgd_element<T, kMomentum, kNesterov, kFirst>(w[i], g[i], buf[i], lr, momentum,
                                                        dampening, wd);
  }
}

// Entry points with the flags as run-time arguments, instantiated for float and double.
template <typename T>
T sq_norm_any(const T* g, const T* w, long begin, long end, bool adaptive, T eta) {
  return adaptive ? sq_norm<T, true>(g, w, begin, end, eta)
                  : sq_norm<T, false>(g, w, begin, end, eta);
}

template <typename T>
void ascent_any(T* w, const T* g, T* backup, long begin, long end, T scale, bool adaptive,
                T eta) {
  if (adaptive) {
    ascent<T, true>(w, g, backup, begin, end, scale, eta);
  } else {
    ascent<T, false>(w, g, backup, begin, end, scale, eta);
  }
}

template <typename T>
void restore_sgd_any(T* w, const T* g, const T* backup, T* buf, long begin, long end, T lr,
                     T momentum, T dampening, T wd, bool nesterov, bool first) {
  const bool in_place = backup == w;
#define SAMFAST_SGD_CASE(M, N, F)                                                        \
  (in_place ? sgd_in_place<T, M, N, F>(w, g, buf, begin, end, lr, momentum, dampening, wd) \
            : restore_sgd<T, M, N, F>(w, g, backup, buf, begin, end, lr, momentum,       \
                                      dampening, wd))
  if (momentum == T(0)) {
    SAMFAST_SGD_CASE(false, false, false);
  } else if (first) {
    nesterov ? SAMFAST_SGD_CASE(true, true, true) : SAMFAST_SGD_CASE(true, false, true);
  } else {
    nesterov ? SAMFAST_SGD_CASE(true, true, false) : SAMFAST_SGD_CASE(true, false, false);
  }
#undef SAMFAST_SGD_CASE
}

template float sq_norm_any<float>(const float*, const float*, long, long, bool, float);
template double sq_norm_any<double>(const double*, const double*, long, long, bool, double);
template long nonfinite<float>(const float*, long, long);
template long nonfinite<double>(const double*, long, long);
template void ascent_any<float>(float*, const float*, float*, long, long, float, bool, float);
template void ascent_any<double>(double*, const double*, double*, long, long, double, bool,
                                 double);
template void restore_sgd_any<float>(float*, const float*, const float*, float*, long, long,
                                     float, float, float, float, bool, bool);
template void restore_sgd_any<double>(double*, const double*, const double*, double*, long,
                                      long, double, double, double, double, bool, bool);

}  // namespace SAMFAST_CPU_NS
}  // namespace samfast
