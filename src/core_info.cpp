// SPDX-License-Identifier: MIT
// Build information of the core.
#include <pysbn/core.hpp>

namespace pysbn {

const char* version() { return PYSBN_VERSION; }

bool built_with_cuda()
{
#ifdef PYSBN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_openmp()
{
#ifdef PYSBN_WITH_OPENMP
  return true;
#else
  return false;
#endif
}

const char* cuda_architectures()
{
#ifdef PYSBN_CUDA_ARCHS
  return PYSBN_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace pysbn
