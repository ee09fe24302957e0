// The Python module fastdiss._C. It holds no Python functions: importing it loads the shared library,
// whose static TORCH_LIBRARY registrations make the ops visible as torch.ops.fastdiss.*.
// Only setup.py builds this file; the CMake library (no Python) leaves it out.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "fastdiss C++/CUDA ops, registered as torch.ops.fastdiss.*", -1, nullptr};
  return PyModule_Create(&module);
}
