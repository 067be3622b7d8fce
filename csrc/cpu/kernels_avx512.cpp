// The CPU kernels compiled for AVX-512 (chosen at run time when the CPU has it).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define SAMFAST_CPU_NS avx512
#include "kernels.h"
#endif
