// The Python module of a native extension. It holds nothing: importing the shared library
// runs its static TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations, which is all Python
// needs (the operators are then torch.ops.tome_native.*). The build defines
// TORCH_EXTENSION_NAME (tome_kernels._C, tome_kernels._C_cuda, or a JIT build's name).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "tome_kernels native operators (registered as torch.ops.tome_native.*)";
}
