// The CPU kernels of the native backend (fp32, fp64, and bf16/fp16 at the end), on raw
// pointers over [begin, end).
//
// This header is compiled three times, into namespaces chosen by the including file: for the
// baseline x86-64 ISA (SSE2), under `#pragma GCC target("avx2,fma,f16c")` and for AVX-512; and
// csrc/samfast.cpp picks a version at run time (__builtin_cpu_supports; SAMFAST_CPU_ISA=base
// or avx2 forces one, for benchmarks). It includes no header itself (the including files
// include the intrinsics headers, whose functions are always inlined): inline functions of a
// header compiled under two ISAs could be merged by the linker into the AVX2 copy and then run
// on a CPU without AVX2.
//
// Why several ISAs: on the development machine (Xeon, 2 cores, 300 MiB L3) a WRN-16-8 step's
// buffers fit in cache, so wide vectors pay where DRAM-bound code would not care. Measured
// there on 11M floats (2 threads): sum of squares 1.9 ms (SSE2) vs 1.5 ms (AVX2); count of
// non-finite 5.2 ms vs 2.2 ms; the streams (ascent, restore + SGD) gain less, ~10%, being
// near the cache bandwidth already. AVX-512 measured within the noise of AVX2.
//
// Results are bit-identical across the builds and with or without streaming stores
// (tests/test_kernels.py checks it): elementwise code does the same IEEE operations per
// element (-ffp-contract=off: no FMA contraction), and reductions add in a fixed lane order
// (kLanes interleaved partial sums) that the compiler may not reassociate.
//
// Streaming (non-temporal) stores: the ascent's backup and the restore's weights are
// write-only streams. A plain store first reads the line it writes (read for ownership), so
// such a stream costs two passes over memory; a streaming store writes the line without
// reading it and does not keep it in cache. Measured on the development machine (11M floats,
// cold caches, 2 threads, stand-alone C++): ascent 11.2 -> 6.1 ms, restore + SGD 15.5 -> 7.6
// ms, copy 4.1 -> 2.7 ms. The caller enables them only for buffers too big to stay cached
// between the passes (csrc/samfast.cpp: kStreamMinBytes); the values stored are the same.
// The including file defines SAMFAST_STREAM_LINE_F32/F64(dst, src) (store one 64-byte line,
// dst 64-byte aligned) and SAMFAST_STREAM_FENCE() for its ISA.

#ifndef SAMFAST_CPU_NS
#error "define SAMFAST_CPU_NS before including csrc/cpu/kernels.h"
#endif

// Lines are 64-byte vectors (below); in the SSE2 and AVX2 builds GCC warns that passing one
// by value would change the ABI. Every function taking or returning a line is inline and
// local to this ISA's namespace, so no call crosses builds. (Not popped: GCC emits the warning
// at the end of the translation unit, and this header ends each kernels_*.cpp.)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace samfast {
namespace SAMFAST_CPU_NS {

constexpr long kLanes = 16;
constexpr long kLineBytes = 64;

inline void stream_line(float* dst, const float* src) { SAMFAST_STREAM_LINE_F32(dst, src); }
inline void stream_line(double* dst, const double* src) { SAMFAST_STREAM_LINE_F64(dst, src); }

// Splits [begin, end) for streaming stores into `out`: [begin, *a) and [*b, end) are written
// with plain stores, [*a, *b) in whole 64-byte lines (out + *a is 64-byte aligned).
template <typename T>
inline void line_range(const T* out, long begin, long end, long* a, long* b) {
  constexpr long kLine = kLineBytes / static_cast<long>(sizeof(T));
  const long misaligned = static_cast<long>(reinterpret_cast<unsigned long>(out + begin) %
                                            kLineBytes) / static_cast<long>(sizeof(T));
  long first = misaligned == 0 ? begin : begin + (kLine - misaligned);
  if (first > end) first = end;
  *a = first;
  *b = first + (end - first) / kLine * kLine;
}

// |x| for a scalar or a line (lane-wise); -0.0 stays -0.0 in both.
template <typename V>
inline V absval(const V& x) {
  return x < 0 ? -x : x;
}

// One 64-byte cache line as a GCC vector: 16 floats or 8 doubles. The line loops below work
// on whole lines through it, so the compiler emits one zmm, two ymm or four xmm operations per
// line by ISA, and the element formulas are written once for scalars and lines alike (vector
// arithmetic is lane-wise IEEE arithmetic, so a line gives the bits the scalar code gives).
// Written as plain per-element loops instead, GCC split the ascent's `backup[i] = w[i]` into
// a memmove (a second pass over w) and compiled the streaming version to scalar code.
typedef float LineF32 __attribute__((vector_size(kLineBytes)));
typedef double LineF64 __attribute__((vector_size(kLineBytes)));
template <typename T> struct LineOf;
template <> struct LineOf<float> { using type = LineF32; };
template <> struct LineOf<double> { using type = LineF64; };
template <typename T> using Line = typename LineOf<T>::type;

template <typename T>
inline Line<T> load_line(const T* p) {
  Line<T> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// Stores one line at p: a streaming store (p 64-byte aligned) or a plain one.
template <bool kStream, typename T>
inline void store_line(T* p, const Line<T>& v) {
  if (kStream) {
    stream_line(p, reinterpret_cast<const T*>(&v));
  } else {
    __builtin_memcpy(p, &v, sizeof v);
  }
}

// How a buffer's elements become arithmetic values: Wide<T> for fp32/fp64 (as they are),
// Format16<...> (below) for bf16/fp16, widened to float. value(x): one element; load(p): the
// line of arithmetic values starting at p.
template <typename T>
struct Wide {
  using Storage = T;
  using Arith = T;
  static T value(T x) { return x; }
  static Line<T> load(const T* p) { return load_line(p); }
  // (named as Format16's, whose arithmetic type is float; here storage is arithmetic)
  static T from_float(T x) { return x; }
  static void store(T* p, const Line<T>& v) { __builtin_memcpy(p, &v, sizeof v); }
};

// The reductions, over fixed blocks of `block` elements (a multiple of kLanes) of [0, n):
// a block is summed in kLanes interleaved lanes (lane l takes the elements i + l), then its
// lanes in order, then its tail elements one by one. block_sums writes the sums of blocks
// [b0, b1) to out[b0, b1), kStreams adjacent full blocks at a time in one loop, each in its own
// lanes: several read streams keep more cache misses in flight than one. Measured on 11M
// floats, cold caches, AMD EPYC, 2 threads, against one block at a time, three runs: sum of
// squares 1.55/1.42/1.56 -> 1.48/1.33/1.38 ms, non-finite count 1.49/1.36/1.42 ->
// 1.45/1.34/1.34 ms (8 streams no better than 4). A block's sum has the same bits however the
// blocks are grouped or split over threads (tests/test_kernels.py checks it).
constexpr long kStreams = 4;

template <typename T, typename Acc, typename Term, typename LineTerm>
Acc range_sum(long begin, long end, Term term, LineTerm line_term) {
  constexpr long kLine = kLineBytes / static_cast<long>(sizeof(T));
  Line<T> lanes[kLanes / kLine] = {};
  long i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (long j = 0; j < kLanes / kLine; ++j) lanes[j] += line_term(i + j * kLine);
  }
  Acc tail = 0;
  for (; i < end; ++i) tail += static_cast<Acc>(term(i));
  Acc total = 0;
  for (long j = 0; j < kLanes / kLine; ++j) {
    for (long m = 0; m < kLine; ++m) total += static_cast<Acc>(lanes[j][m]);
  }
  return total + tail;
}

template <typename T, typename Acc, typename Term, typename LineTerm>
void block_sums(long n, long block, long b0, long b1, Acc* out, Term term, LineTerm line_term) {
  constexpr long kLine = kLineBytes / static_cast<long>(sizeof(T));
  long b = b0;
  for (; b + kStreams <= b1 && (b + kStreams) * block <= n; b += kStreams) {
    Line<T> lanes[kStreams][kLanes / kLine] = {};
    for (long i = b * block; i < (b + 1) * block; i += kLanes) {
      for (long k = 0; k < kStreams; ++k) {
        for (long j = 0; j < kLanes / kLine; ++j) {
          lanes[k][j] += line_term(i + k * block + j * kLine);
        }
      }
    }
    for (long k = 0; k < kStreams; ++k) {
      Acc total = 0;
      for (long j = 0; j < kLanes / kLine; ++j) {
        for (long m = 0; m < kLine; ++m) total += static_cast<Acc>(lanes[k][j][m]);
      }
      out[b + k] = total + Acc(0);  // + the (empty) tail, as range_sum adds it
    }
  }
  for (; b < b1; ++b) {
    out[b] = range_sum<T, Acc>(b * block, (b + 1) * block < n ? (b + 1) * block : n, term,
                               line_term);
  }
}

// Per block: the sum of (T(w) g)^2, T = |w| + eta if adaptive (ASAM), else 1 (F: the format).
template <typename F, bool kAdaptive>
void sq_norm_of(const typename F::Storage* g, const typename F::Storage* w, long n, long block,
                long b0, long b1, typename F::Arith eta, typename F::Arith* out) {
  using A = typename F::Arith;
  auto term = [=](long i) {
    A x = F::value(g[i]);
    if (kAdaptive) x *= absval(F::value(w[i])) + eta;
    return x * x;
  };
  auto line_term = [=](long i) {
    Line<A> x = F::load(g + i);
    if (kAdaptive) x *= absval(F::load(w + i)) + eta;
    return x * x;
  };
  block_sums<A, A>(n, block, b0, b1, out, term, line_term);
}

// Per block: how many of g are +-inf or NaN, !(|x| < inf) (a compare and a masked add),
// counted in arithmetic-type lanes (exact: a lane sees block / kLanes < 2^24 elements)
// because int64 lanes would need a widening conversion per element.
template <typename F>
void nonfinite_of(const typename F::Storage* g, long n, long block, long b0, long b1,
                  long* out) {
  using A = typename F::Arith;
  const A inf = static_cast<A>(__builtin_inf());
  auto term = [=](long i) { return absval(F::value(g[i])) < inf ? A(0) : A(1); };
  auto line_term = [=](long i) {
    const Line<A> zero = {};
    return absval(F::load(g + i)) < inf ? zero : zero + A(1);
  };
  block_sums<A, long>(n, block, b0, b1, out, term, line_term);
}

// w + scale * T(w)^2 g for one element or one line (V = T or Line<T>).
template <bool kAdaptive, typename V, typename T>
inline V ascent_element(const V& wi, const V& gi, T scale, T eta) {
  V e = gi;
  if (kAdaptive) {
    const V t = absval(wi) + eta;
    e = (t * t) * e;
  }
  return wi + e * scale;
}

// backup <- w; w <- w + (T(w)^2 g) * scale over [begin, end); with `stream`, backup (the
// write-only stream) in streaming stores. Whole lines [a, b) aligned on backup, scalar ends.
template <typename T, bool kAdaptive, bool kStream>
void ascent_span(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ backup,
                 long begin, long end, T scale, T eta) {
  constexpr long kLine = kLineBytes / static_cast<long>(sizeof(T));
  long a, b;
  line_range(backup, begin, end, &a, &b);
  for (long i = begin; i < a; ++i) {
    backup[i] = w[i];
    w[i] = ascent_element<kAdaptive>(backup[i], g[i], scale, eta);
  }
  for (long i = a; i < b; i += kLine) {
    const Line<T> wi = load_line(w + i);
    store_line<kStream>(backup + i, wi);
    store_line<false>(w + i, ascent_element<kAdaptive>(wi, load_line(g + i), scale, eta));
  }
  if (kStream) SAMFAST_STREAM_FENCE();
  for (long i = b; i < end; ++i) {
    backup[i] = w[i];
    w[i] = ascent_element<kAdaptive>(backup[i], g[i], scale, eta);
  }
}

template <typename T, bool kAdaptive>
void ascent(T* w, const T* g, T* backup, long begin, long end, T scale, T eta, bool stream) {
  if (stream) {
    ascent_span<T, kAdaptive, true>(w, g, backup, begin, end, scale, eta);
  } else {
    ascent_span<T, kAdaptive, false>(w, g, backup, begin, end, scale, eta);
  }
}

// Rounds the momentum buffer's new value to what storage holds: nothing to do when storage is
// the arithmetic type.
struct AsIs {
  template <typename V>
  void operator()(V&) const {}
};

// torch.optim.SGD's update from the weight w0 (one element or one line, V = T or Line<T>), in
// its order of operations (see csrc/samfast.cpp); the momentum buffer is read and written
// through `buf`, and the step uses it as stored (`stored(b)` rounds b to a 16-bit format).
// (always inlined: a line returned from an out-of-line call would change the ABI below
// AVX-512, and GCC warns of it at the end of the file, past the pragma above)
template <bool kMomentum, bool kNesterov, bool kFirst, typename V, typename T,
          typename Stored = AsIs>
inline __attribute__((always_inline)) V sgd_element(const V& w0, const V& g, V& buf, T lr, T momentum, T dampening, T wd,
                     Stored stored = Stored()) {
  V d = g + wd * w0;
  if (kMomentum) {
    V b = kFirst ? d : buf * momentum + (T(1) - dampening) * d;
    stored(b);
    buf = b;
    d = kNesterov ? d + momentum * b : b;
  }
  return w0 - lr * d;
}

// w <- backup, then the SGD update; with `stream`, w (the write-only stream) in streaming
// stores. `backup == w` is a plain SGD step in place (then never streamed: w is read too).
template <typename T, bool kMomentum, bool kNesterov, bool kFirst, bool kStream>
void restore_sgd_span(T* w, const T* g, const T* backup, T* buf, long begin, long end, T lr,
                      T momentum, T dampening, T wd) {
  constexpr long kLine = kLineBytes / static_cast<long>(sizeof(T));
  long a, b;
  line_range(w, begin, end, &a, &b);
  auto scalar = [&](long i) {
    T m = kMomentum ? buf[i] : T(0);
    w[i] = sgd_element<kMomentum, kNesterov, kFirst>(backup[i], g[i], m, lr, momentum,
                                                     dampening, wd);
    if (kMomentum) buf[i] = m;
  };
  for (long i = begin; i < a; ++i) scalar(i);
  for (long i = a; i < b; i += kLine) {
    Line<T> m = kMomentum ? load_line(buf + i) : Line<T>{};
    const Line<T> out = sgd_element<kMomentum, kNesterov, kFirst>(
        load_line(backup + i), load_line(g + i), m, lr, momentum, dampening, wd);
    if (kMomentum) store_line<false>(buf + i, m);
    store_line<kStream>(w + i, out);
  }
  if (kStream) SAMFAST_STREAM_FENCE();
  for (long i = b; i < end; ++i) scalar(i);
}

template <typename T, bool kMomentum, bool kNesterov, bool kFirst>
void restore_sgd(T* w, const T* g, const T* backup, T* buf, long begin, long end, T lr,
                 T momentum, T dampening, T wd, bool stream) {
  if (stream && backup != w) {
    restore_sgd_span<T, kMomentum, kNesterov, kFirst, true>(w, g, backup, buf, begin, end, lr,
                                                            momentum, dampening, wd);
  } else {
    restore_sgd_span<T, kMomentum, kNesterov, kFirst, false>(w, g, backup, buf, begin, end,
                                                             lr, momentum, dampening, wd);
  }
}

// Entry points with the flags as run-time arguments, instantiated for float and double.
template <typename T>
void sq_norm_blocks_any(const T* g, const T* w, long n, long block, long b0, long b1,
                        bool adaptive, T eta, T* out) {
  adaptive ? sq_norm_of<Wide<T>, true>(g, w, n, block, b0, b1, eta, out)
           : sq_norm_of<Wide<T>, false>(g, w, n, block, b0, b1, eta, out);
}

template <typename T>
void nonfinite_blocks(const T* g, long n, long block, long b0, long b1, long* out) {
  nonfinite_of<Wide<T>>(g, n, block, b0, b1, out);
}

template <typename T>
void ascent_any(T* w, const T* g, T* backup, long begin, long end, T scale, bool adaptive,
                T eta, bool stream) {
  if (adaptive) {
    ascent<T, true>(w, g, backup, begin, end, scale, eta, stream);
  } else {
    ascent<T, false>(w, g, backup, begin, end, scale, eta, stream);
  }
}

template <bool B>
struct Flag {
  static constexpr bool value = B;
};

// Calls f(Flag<momentum>(), Flag<nesterov>(), Flag<first>()) for the SGD variants the kernels
// are instantiated for (without momentum, nesterov and first do not matter).
template <typename F>
void with_sgd_flags(bool momentum, bool nesterov, bool first, F f) {
  if (!momentum) {
    f(Flag<false>(), Flag<false>(), Flag<false>());
  } else if (first) {
    nesterov ? f(Flag<true>(), Flag<true>(), Flag<true>())
             : f(Flag<true>(), Flag<false>(), Flag<true>());
  } else {
    nesterov ? f(Flag<true>(), Flag<true>(), Flag<false>())
             : f(Flag<true>(), Flag<false>(), Flag<false>());
  }
}

template <typename T>
void restore_sgd_any(T* w, const T* g, const T* backup, T* buf, long begin, long end, T lr,
                     T momentum, T dampening, T wd, bool nesterov, bool first, bool stream) {
  with_sgd_flags(momentum != T(0), nesterov, first, [&](auto m, auto nv, auto fi) {
    restore_sgd<T, decltype(m)::value, decltype(nv)::value, decltype(fi)::value>(
        w, g, backup, buf, begin, end, lr, momentum, dampening, wd, stream);
  });
}

// ---- 16-bit storage (bf16, fp16) -------------------------------------------------------------
// Arithmetic in float, element for element as the fp32 kernels, with each stored value rounded
// to nearest even once (as c10::BFloat16 and c10::Half round); 16 elements (32 bytes) per step,
// widened to one line of floats. Before these, the 16-bit paths converted element by element
// through c10 (software fp16): a WRN-16-8 SAM step took 105 ms in fp16 and 24 ms in bf16 against
// 12 ms in fp32 and 19 / 17 ms for the per-tensor loop (AMD EPYC, 2 threads).
// fp16 lines convert with the including file's SAMFAST_F16_* macros (F16C / AVX-512 in the
// AVX2 and AVX-512 builds, c10's conversions in the baseline build); bf16 is integer code here.
// NaN payloads may differ between builds (a NaN anywhere skips the step before it is stored).
typedef unsigned short U16Line __attribute__((vector_size(kLineBytes / 2)));
typedef unsigned int U32Line __attribute__((vector_size(kLineBytes)));
constexpr long kHalfLine = kLineBytes / 4;  // 16-bit elements per step: one line of floats
constexpr int kBf16 = 0;
constexpr int kFp16 = 1;

template <int kFormat> struct Format16;

template <> struct Format16<kBf16> {
  using Storage = unsigned short;
  using Arith = float;
  static float value(unsigned short h) {
    const unsigned int u = static_cast<unsigned int>(h) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
  }
  static unsigned short from_float(float f) {
    unsigned int u;
    __builtin_memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0;
    return static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  static LineF32 load(const unsigned short* p) {
    U16Line h;
    __builtin_memcpy(&h, p, sizeof h);
    const U32Line u = __builtin_convertvector(h, U32Line) << 16;
    LineF32 f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
  }
  static void store(unsigned short* p, const LineF32& f) {
    U32Line u;
    __builtin_memcpy(&u, &f, sizeof u);
    U32Line r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const U32Line nan = U32Line{} + 0x7FC0u;
    r = f != f ? nan : r;
    const U16Line h = __builtin_convertvector(r, U16Line);
    __builtin_memcpy(p, &h, sizeof h);
  }
};

template <> struct Format16<kFp16> {
  using Storage = unsigned short;
  using Arith = float;
  static float value(unsigned short h) { return SAMFAST_F16_TO_F32(h); }
  static unsigned short from_float(float f) { return SAMFAST_F32_TO_F16(f); }
  static LineF32 load(const unsigned short* p) {
    LineF32 f;
    SAMFAST_F16_LOAD_LINE(f, p);
    return f;
  }
  static void store(unsigned short* p, const LineF32& f) { SAMFAST_F16_STORE_LINE(p, f); }
};

template <int kFormat>
void sq_norm_blocks16(const unsigned short* g, const unsigned short* w, long n, long block,
                      long b0, long b1, bool adaptive, float eta, float* out) {
  adaptive ? sq_norm_of<Format16<kFormat>, true>(g, w, n, block, b0, b1, eta, out)
           : sq_norm_of<Format16<kFormat>, false>(g, w, n, block, b0, b1, eta, out);
}

template <int kFormat>
void nonfinite_blocks16(const unsigned short* g, long n, long block, long b0, long b1,
                        long* out) {
  nonfinite_of<Format16<kFormat>>(g, n, block, b0, b1, out);
}

template <int kFormat, bool kAdaptive>
void ascent16(unsigned short* __restrict__ w, const unsigned short* __restrict__ g,
              unsigned short* __restrict__ backup, long begin, long end, float scale,
              float eta) {
  using C = Format16<kFormat>;
  long i = begin;
  for (; i + kHalfLine <= end; i += kHalfLine) {
    __builtin_memcpy(backup + i, w + i, sizeof(U16Line));
    C::store(w + i, ascent_element<kAdaptive>(C::load(w + i), C::load(g + i), scale, eta));
  }
  for (; i < end; ++i) {
    backup[i] = w[i];
    w[i] = C::from_float(ascent_element<kAdaptive>(C::value(backup[i]), C::value(g[i]),
                                                   scale, eta));
  }
}

// torch.optim.SGD's update with 16-bit storage (sgd_element's maths; the momentum buffer is
// rounded when stored and the step uses it as stored, as torch does).
template <int kFormat, bool kMomentum, bool kNesterov, bool kFirst>
void restore_sgd16(unsigned short* w, const unsigned short* g, const unsigned short* backup,
                   unsigned short* buf, long begin, long end, float lr, float momentum,
                   float dampening, float wd) {
  using C = Format16<kFormat>;
  auto stored_line = [](LineF32& b) {
    unsigned short h[kHalfLine];
    C::store(h, b);
    b = C::load(h);
  };
  auto stored = [](float& b) { b = C::value(C::from_float(b)); };
  long i = begin;
  for (; i + kHalfLine <= end; i += kHalfLine) {
    LineF32 m = kMomentum ? C::load(buf + i) : LineF32{};
    const LineF32 out = sgd_element<kMomentum, kNesterov, kFirst>(
        C::load(backup + i), C::load(g + i), m, lr, momentum, dampening, wd, stored_line);
    if (kMomentum) C::store(buf + i, m);  // m is a 16-bit value already: stored exactly
    C::store(w + i, out);
  }
  for (; i < end; ++i) {
    float m = kMomentum ? C::value(buf[i]) : 0.0f;
    const float out = sgd_element<kMomentum, kNesterov, kFirst>(
        C::value(backup[i]), C::value(g[i]), m, lr, momentum, dampening, wd, stored);
    if (kMomentum) buf[i] = C::from_float(m);
    w[i] = C::from_float(out);
  }
}

template <int kFormat>
void ascent16_any(unsigned short* w, const unsigned short* g, unsigned short* backup,
                  long begin, long end, float scale, bool adaptive, float eta) {
  adaptive ? ascent16<kFormat, true>(w, g, backup, begin, end, scale, eta)
           : ascent16<kFormat, false>(w, g, backup, begin, end, scale, eta);
}

template <int kFormat>
void restore_sgd16_any(unsigned short* w, const unsigned short* g, const unsigned short* backup,
                       unsigned short* buf, long begin, long end, float lr, float momentum,
                       float dampening, float wd, bool nesterov, bool first) {
  with_sgd_flags(momentum != 0.0f, nesterov, first, [&](auto m, auto nv, auto fi) {
    restore_sgd16<kFormat, decltype(m)::value, decltype(nv)::value, decltype(fi)::value>(
        w, g, backup, buf, begin, end, lr, momentum, dampening, wd);
  });
}

// ---- LookSAM (samfast/policies.py; the ops' maths in samfast/ops.py) -------------------------
// Generic over the format F (Wide<T>, Format16<...>): arithmetic in F::Arith, one rounding to
// storage per element. A "step" is one line of arithmetic values (16 floats or 8 doubles;
// 16 bf16/fp16 elements widened to floats), tails element by element with the same formulas.
// The two with a reduction work on fixed blocks of `block` elements in kLanes interleaved
// lanes, as range_sum does, so their sums do not depend on the threads or the ISA.

// Per block b of [b0, b1): dot[b] = sum g * gs, sq[b] = sum g^2, one read of both streams.
template <typename F>
void looksam_dots_of(const typename F::Storage* g, const typename F::Storage* gs, long n,
                     long block, long b0, long b1, typename F::Arith* dot,
                     typename F::Arith* sq) {
  using A = typename F::Arith;
  constexpr long kLine = kLineBytes / static_cast<long>(sizeof(A));
  for (long b = b0; b < b1; ++b) {
    const long begin = b * block, end = (b + 1) * block < n ? (b + 1) * block : n;
    Line<A> dl[kLanes / kLine] = {}, sl[kLanes / kLine] = {};
    long i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      for (long j = 0; j < kLanes / kLine; ++j) {
        const Line<A> x = F::load(g + i + j * kLine), y = F::load(gs + i + j * kLine);
        dl[j] += x * y;
        sl[j] += x * x;
      }
    }
    A dot_tail = 0, sq_tail = 0;
    for (; i < end; ++i) {
      const A x = F::value(g[i]), y = F::value(gs[i]);
      dot_tail += x * y;
      sq_tail += x * x;
    }
    A dot_total = 0, sq_total = 0;
    for (long j = 0; j < kLanes / kLine; ++j) {
      for (long m = 0; m < kLine; ++m) {
        dot_total += dl[j][m];
        sq_total += sl[j][m];
      }
    }
    dot[b] = dot_total + dot_tail;
    sq[b] = sq_total + sq_tail;
  }
}

// Per block: gv <- gs - coef * gv (gv holds g: the part of gs orthogonal to g), and
// out[b] = the sum of squares of gv as stored (rounded to storage first, then widened).
template <typename F>
void looksam_project_of(typename F::Storage* __restrict__ gv,
                        const typename F::Storage* __restrict__ gs, long n, long block, long b0,
                        long b1, typename F::Arith coef, typename F::Arith* out) {
  using A = typename F::Arith;
  constexpr long kLine = kLineBytes / static_cast<long>(sizeof(A));
  for (long b = b0; b < b1; ++b) {
    const long begin = b * block, end = (b + 1) * block < n ? (b + 1) * block : n;
    Line<A> lanes[kLanes / kLine] = {};
    long i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      for (long j = 0; j < kLanes / kLine; ++j) {
        const long at = i + j * kLine;
        F::store(gv + at, F::load(gs + at) - coef * F::load(gv + at));
        const Line<A> x = F::load(gv + at);
        lanes[j] += x * x;
      }
    }
    A tail = 0;
    for (; i < end; ++i) {
      gv[i] = F::from_float(F::value(gs[i]) - coef * F::value(gv[i]));
      const A x = F::value(gv[i]);
      tail += x * x;
    }
    A total = 0;
    for (long j = 0; j < kLanes / kLine; ++j) {
      for (long m = 0; m < kLine; ++m) total += lanes[j][m];
    }
    out[b] = total + tail;
  }
}

// g <- g + coef * gv over [begin, end): the gradient of a LookSAM step between full ones.
template <typename F>
void looksam_reuse_of(typename F::Storage* __restrict__ g,
                      const typename F::Storage* __restrict__ gv, long begin, long end,
                      typename F::Arith coef) {
  using A = typename F::Arith;
  constexpr long kLine = kLineBytes / static_cast<long>(sizeof(A));
  long i = begin;
  for (; i + kLine <= end; i += kLine) F::store(g + i, F::load(g + i) + coef * F::load(gv + i));
  for (; i < end; ++i) g[i] = F::from_float(F::value(g[i]) + coef * F::value(gv[i]));
}

template <typename T>
void looksam_dots_blocks(const T* g, const T* gs, long n, long block, long b0, long b1, T* dot,
                         T* sq) {
  looksam_dots_of<Wide<T>>(g, gs, n, block, b0, b1, dot, sq);
}

template <typename T>
void looksam_project_blocks(T* gv, const T* gs, long n, long block, long b0, long b1, T coef,
                            T* out) {
  looksam_project_of<Wide<T>>(gv, gs, n, block, b0, b1, coef, out);
}

template <typename T>
void looksam_reuse(T* g, const T* gv, long begin, long end, T coef) {
  looksam_reuse_of<Wide<T>>(g, gv, begin, end, coef);
}

template <int kFormat>
void looksam_dots_blocks16(const unsigned short* g, const unsigned short* gs, long n, long block,
                           long b0, long b1, float* dot, float* sq) {
  looksam_dots_of<Format16<kFormat>>(g, gs, n, block, b0, b1, dot, sq);
}

template <int kFormat>
void looksam_project_blocks16(unsigned short* gv, const unsigned short* gs, long n, long block,
                              long b0, long b1, float coef, float* out) {
  looksam_project_of<Format16<kFormat>>(gv, gs, n, block, b0, b1, coef, out);
}

template <int kFormat>
void looksam_reuse16(unsigned short* g, const unsigned short* gv, long begin, long end,
                     float coef) {
  looksam_reuse_of<Format16<kFormat>>(g, gv, begin, end, coef);
}

#define SAMFAST_INSTANTIATE_16(F)                                                           \
  template void sq_norm_blocks16<F>(const unsigned short*, const unsigned short*, long, long, \
                                    long, long, bool, float, float*);                        \
  template void nonfinite_blocks16<F>(const unsigned short*, long, long, long, long, long*);  \
  template void ascent16_any<F>(unsigned short*, const unsigned short*, unsigned short*,      \
                                long, long, float, bool, float);                             \
  template void restore_sgd16_any<F>(unsigned short*, const unsigned short*,                  \
                                     const unsigned short*, unsigned short*, long, long,      \
                                     float, float, float, float, bool, bool);                 \
  template void looksam_dots_blocks16<F>(const unsigned short*, const unsigned short*, long,  \
                                         long, long, long, float*, float*);                  \
  template void looksam_project_blocks16<F>(unsigned short*, const unsigned short*, long,     \
                                            long, long, long, float, float*);                \
  template void looksam_reuse16<F>(unsigned short*, const unsigned short*, long, long, float);
SAMFAST_INSTANTIATE_16(kBf16)
SAMFAST_INSTANTIATE_16(kFp16)
#undef SAMFAST_INSTANTIATE_16

template void sq_norm_blocks_any<float>(const float*, const float*, long, long, long, long, bool,
                                        float, float*);
template void sq_norm_blocks_any<double>(const double*, const double*, long, long, long, long,
                                         bool, double, double*);
template void nonfinite_blocks<float>(const float*, long, long, long, long, long*);
template void nonfinite_blocks<double>(const double*, long, long, long, long, long*);
template void ascent_any<float>(float*, const float*, float*, long, long, float, bool, float,
                                bool);
template void ascent_any<double>(double*, const double*, double*, long, long, double, bool,
                                 double, bool);
template void restore_sgd_any<float>(float*, const float*, const float*, float*, long, long,
                                     float, float, float, float, bool, bool, bool);
template void restore_sgd_any<double>(double*, const double*, const double*, double*, long,
                                      long, double, double, double, double, bool, bool, bool);
template void looksam_dots_blocks<float>(const float*, const float*, long, long, long, long,
                                         float*, float*);
template void looksam_dots_blocks<double>(const double*, const double*, long, long, long, long,
                                          double*, double*);
template void looksam_project_blocks<float>(float*, const float*, long, long, long, long, float,
                                            float*);
template void looksam_project_blocks<double>(double*, const double*, long, long, long, long,
                                             double, double*);
template void looksam_reuse<float>(float*, const float*, long, long, float);
template void looksam_reuse<double>(double*, const double*, long, long, double);

}  // namespace SAMFAST_CPU_NS
}  // namespace samfast
