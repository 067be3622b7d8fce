// What this build of the CUDA kernels targets, for samfast._C.build_info() (samfast-doctor).
// nvcc defines __CUDA_ARCH_LIST__ in every compilation pass as the comma-separated virtual
// architectures of the build (e.g. 800,900).

#define SAMFAST_STR2(...) #__VA_ARGS__
#define SAMFAST_STR(...) SAMFAST_STR2(__VA_ARGS__)

extern "C" const char* samfast_cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return SAMFAST_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

extern "C" int samfast_cuda_runtime_version() { return CUDART_VERSION; }
