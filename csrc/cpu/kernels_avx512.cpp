// The CPU kernels compiled for AVX-512 (chosen at run time when the CPU has it).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define SAMFAST_CPU_NS avx512
#define SAMFAST_STREAM_LINE_F32(dst, src) _mm512_stream_ps((dst), _mm512_loadu_ps(src))
#define SAMFAST_STREAM_LINE_F64(dst, src) _mm512_stream_pd((dst), _mm512_loadu_pd(src))
#define SAMFAST_STREAM_FENCE() _mm_sfence()
#define SAMFAST_F16_TO_F32(h) _cvtsh_ss(h)
#define SAMFAST_F32_TO_F16(f) static_cast<unsigned short>(_cvtss_sh((f), _MM_FROUND_TO_NEAREST_INT))
// (the zero-masked forms: GCC 12's unmasked ones warn of an uninitialized pass-through)
#define SAMFAST_F16_LOAD_LINE(dst, p)            \
  ((dst) = _mm512_maskz_cvtph_ps(static_cast<__mmask16>(-1), \
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))))
#define SAMFAST_F16_STORE_LINE(p, v)                                              \
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),                              \
                      _mm512_maskz_cvtps_ph(static_cast<__mmask16>(-1), (v),       \
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#include "kernels.h"
#endif
