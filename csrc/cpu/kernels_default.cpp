// The CPU kernels for the baseline ISA: SSE2 on x86-64 (streaming stores of 16 bytes),
// plain stores elsewhere.
#if defined(__x86_64__) && defined(__GNUC__)
#include <emmintrin.h>
#define SAMFAST_STREAM_LINE_F32(dst, src)                                                   \
  (_mm_stream_ps((dst), _mm_loadu_ps(src)), _mm_stream_ps((dst) + 4, _mm_loadu_ps((src) + 4)), \
   _mm_stream_ps((dst) + 8, _mm_loadu_ps((src) + 8)),                                       \
   _mm_stream_ps((dst) + 12, _mm_loadu_ps((src) + 12)))
#define SAMFAST_STREAM_LINE_F64(dst, src)                                                   \
  (_mm_stream_pd((dst), _mm_loadu_pd(src)), _mm_stream_pd((dst) + 2, _mm_loadu_pd((src) + 2)), \
   _mm_stream_pd((dst) + 4, _mm_loadu_pd((src) + 4)),                                       \
   _mm_stream_pd((dst) + 6, _mm_loadu_pd((src) + 6)))
#define SAMFAST_STREAM_FENCE() _mm_sfence()
#else
#define SAMFAST_STREAM_LINE_F32(dst, src) \
  for (int l_ = 0; l_ < 16; ++l_) (dst)[l_] = (src)[l_]
#define SAMFAST_STREAM_LINE_F64(dst, src) \
  for (int l_ = 0; l_ < 8; ++l_) (dst)[l_] = (src)[l_]
#define SAMFAST_STREAM_FENCE() ((void)0)
#endif
// fp16 element by element through c10::Half (IEEE round to nearest even, as F16C).
#include <c10/util/Half.h>
#define SAMFAST_F16_TO_F32(h) static_cast<float>(c10::Half((h), c10::Half::from_bits()))
#define SAMFAST_F32_TO_F16(f) (c10::Half(f).x)
#define SAMFAST_F16_LOAD_LINE(dst, p) \
  for (int l_ = 0; l_ < 16; ++l_) (dst)[l_] = SAMFAST_F16_TO_F32((p)[l_])
#define SAMFAST_F16_STORE_LINE(p, v) \
  for (int l_ = 0; l_ < 16; ++l_) (p)[l_] = SAMFAST_F32_TO_F16((v)[l_])
#define SAMFAST_CPU_NS base
#include "kernels.h"
