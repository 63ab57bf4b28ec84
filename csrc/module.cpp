// The Python module dla_fast._C. Its kernels are registered with the PyTorch dispatcher by each kernel
// family's own files (TORCH_LIBRARY_FRAGMENT(dla_fast_C, ...)) and called as torch.ops.dla_fast_C.<name>;
// importing this module (after torch) loads them. The module itself only reports how it was built.
#include <pybind11/pybind11.h>

namespace {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dla_fast compiled kernels: import after torch; the ops live in torch.ops.dla_fast_C";
  m.def("has_cuda", &has_cuda, "True when the extension was compiled with its CUDA kernels.");
}
