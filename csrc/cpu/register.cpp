// TORCH_LIBRARY_IMPL(localvol, CPU, m): every CPU kernel (kernels.h), registered in one place.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(localvol, CPU, m) {
  m.impl("philox_bits", &localvol::cpu::philox_bits);
  m.impl("gaussian", &localvol::cpu::gaussian);
  m.impl("direction_stats", &localvol::cpu::direction_stats);
  m.impl("perturb_", &localvol::cpu::perturb);
  m.impl("kl_against_anchor", &localvol::cpu::kl_against_anchor);
}
