// Built instead of cuda/drop_path.cu when the library is compiled without CUDA: the build
// queries of drop_path.h report "not compiled" and the launchers of cuda_api.h throw, so callers
// need no #ifdef.
#include <stdexcept>

#include "cuda_api.h"

namespace stochdepth {
namespace {
[[noreturn]] void no_cuda() {
  throw std::invalid_argument(
      "stochdepth was built without CUDA: rebuild with nvcc on PATH (STOCHDEPTH_CUDA=AUTO|ON)");
}
}  // namespace

bool cuda_compiled() { return false; }
std::string cuda_architectures() { return ""; }
int cuda_device_count() { return 0; }
int cuda_swap_device(int) { return -1; }
void drop_path_cuda(const DropPathParams&, int, void*) { no_cuda(); }
void drop_path_backward_gamma_cuda(const DropPathParams&, const void*, void*, int, void*) {
  no_cuda();
}
void stream_copy_cuda(void*, const void*, size_t, int, void*) { no_cuda(); }
void* cuda_alloc(size_t, int, void*) { no_cuda(); }
void cuda_free(void*, int) {}
void cuda_trim() {}
void cuda_export(void*, int, void*) { no_cuda(); }
void cuda_write_words(void*, uint64_t, uint64_t, int) { no_cuda(); }

}  // namespace stochdepth
