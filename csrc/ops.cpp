// The op schemas of the `localvol` namespace, declared once (contract: localvol_fast/ops/SPEC.md).
// Each device registers its kernels in one place, csrc/cpu/register.cpp and csrc/cuda/register.cpp; the
// fake (meta) kernels live in localvol_fast/ops/compiled.py. Importing localvol_fast._C runs these
// registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(localvol, m) {
  // Seeds are integers in [0, 2^64) carried as int (int64) and reinterpreted as uint64 by the kernels;
  // the Python wrappers map seeds >= 2^63 to their two's-complement value.
  m.def("philox_bits(int seed, Tensor indices, int start, int length) -> Tensor");
  m.def("gaussian(int seed, Tensor indices, int start, int length) -> Tensor");
  m.def(
      "direction_stats(int seed, Tensor indices, Tensor anchor, Tensor? precond, Tensor? weights, "
      "Tensor? bounds, int start) -> Tensor");
  // A mutating op returns nothing: torch 2.11's functionalization (torch.compile, opcheck) rejects a
  // custom op whose output aliases an input, and the Python wrappers return `out` themselves.
  m.def(
      "perturb_(Tensor(a!) out, Tensor anchor, Tensor? precond, int seed, Tensor indices, Tensor scales, "
      "int start) -> ()");
  m.def("kl_against_anchor(Tensor logits, Tensor anchor_logprobs, Tensor? mask) -> Tensor");
}

// A bare Python module: the ops are reached through torch.ops.localvol, so no pybind11 is needed.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "localvol custom ops (torch.ops.localvol)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
