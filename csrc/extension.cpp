// Python entry point of uniformerv2_kernels._C. The ops themselves register through TORCH_LIBRARY
// (namespace `uniformerv2_cuda`, one .cu per op); importing this module loads them into torch.ops.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(uniformerv2_cuda, m) {
  // Ops are added by each csrc/<op>.cu with TORCH_LIBRARY_FRAGMENT.
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "uniformerv2-kernels CUDA ops", -1,
                                      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
}
