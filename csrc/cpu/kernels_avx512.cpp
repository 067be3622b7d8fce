// The CPU kernels compiled for AVX-512 (chosen at run time when the CPU has it).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define SAMFAST_CPU_NS avx512
#define SAMFAST_STREAM_LINE_F32(dst, src) _mm512_stream_ps((dst), _mm512_loadu_ps(src))
#define SAMFAST_STREAM_LINE_F64(dst, src) _mm512_stream_pd((dst), _mm512_loadu_pd(src))
#define SAMFAST_STREAM_FENCE() _mm_sfence()
#include "kernels.h"
#endif
