// The CPU kernels compiled for AVX2 + FMA (chosen at run time when the CPU has both).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx2,fma")
#define SAMFAST_CPU_NS avx2
#define SAMFAST_STREAM_LINE_F32(dst, src)                         \
  (_mm256_stream_ps((dst), _mm256_loadu_ps(src)),                 \
   _mm256_stream_ps((dst) + 8, _mm256_loadu_ps((src) + 8)))
#define SAMFAST_STREAM_LINE_F64(dst, src)                         \
  (_mm256_stream_pd((dst), _mm256_loadu_pd(src)),                 \
   _mm256_stream_pd((dst) + 4, _mm256_loadu_pd((src) + 4)))
#define SAMFAST_STREAM_FENCE() _mm_sfence()
#include "kernels.h"
#endif
