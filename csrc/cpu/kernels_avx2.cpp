// The CPU kernels compiled for AVX2 + FMA (chosen at run time when the CPU has both).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define SAMFAST_CPU_NS avx2
#include "kernels.h"
#endif
