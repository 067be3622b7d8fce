// The CPU kernels for the baseline x86-64 ISA (or whatever the compiler targets by default).
#define SAMFAST_CPU_NS base
#include "kernels.h"
