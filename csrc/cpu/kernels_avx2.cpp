// The CPU kernels compiled for AVX2 + FMA + F16C (chosen at run time when the CPU has all).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c")
#define SAMFAST_CPU_NS avx2
#define SAMFAST_STREAM_LINE_F32(dst, src)                         \
  (_mm256_stream_ps((dst), _mm256_loadu_ps(src)),                 \
   _mm256_stream_ps((dst) + 8, _mm256_loadu_ps((src) + 8)))
#define SAMFAST_STREAM_LINE_F64(dst, src)                         \
  (_mm256_stream_pd((dst), _mm256_loadu_pd(src)),                 \
   _mm256_stream_pd((dst) + 4, _mm256_loadu_pd((src) + 4)))
#define SAMFAST_STREAM_FENCE() _mm_sfence()
#define SAMFAST_F16_TO_F32(h) _cvtsh_ss(h)
#define SAMFAST_F32_TO_F16(f) static_cast<unsigned short>(_cvtss_sh((f), _MM_FROUND_TO_NEAREST_INT))
#define SAMFAST_F16_LOAD_LINE(dst, p)                                                         \
  do {                                                                                        \
    const __m256 lo_ = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); \
    const __m256 hi_ =                                                                        \
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>((p) + 8)));          \
    __builtin_memcpy(&(dst), &lo_, 32);                                                       \
    __builtin_memcpy(reinterpret_cast<char*>(&(dst)) + 32, &hi_, 32);                         \
  } while (0)
#define SAMFAST_F16_STORE_LINE(p, v)                                                          \
  do {                                                                                        \
    __m256 lo_, hi_;                                                                          \
    __builtin_memcpy(&lo_, &(v), 32);                                                         \
    __builtin_memcpy(&hi_, reinterpret_cast<const char*>(&(v)) + 32, 32);                     \
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),                                           \
                     _mm256_cvtps_ph(lo_, _MM_FROUND_TO_NEAREST_INT));                        \
    _mm_storeu_si128(reinterpret_cast<__m128i*>((p) + 8),                                     \
                     _mm256_cvtps_ph(hi_, _MM_FROUND_TO_NEAREST_INT));                        \
  } while (0)
#include "kernels.h"
#endif
