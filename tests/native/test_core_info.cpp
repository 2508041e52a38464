// SPDX-License-Identifier: MIT
// Build information and the no-CUDA error path.
#include <gtest/gtest.h>
#include <pysbn/core.hpp>

#include <stdexcept>
#include <string>

TEST(CoreInfo, VersionAndFlags)
{
  EXPECT_FALSE(std::string(pysbn::version()).empty());
  EXPECT_EQ(pysbn::built_with_cuda(), std::string(pysbn::cuda_architectures()).size() > 0);
}

TEST(CoreInfo, CudaEntryPointsThrowWithoutCuda)
{
  if (pysbn::built_with_cuda()) { GTEST_SKIP() << "built with CUDA"; }
  float x = 0.f;
  double s[3];
  pysbn::Geometry g{1, 1, 1, pysbn::Layout::ChannelMajor};
  try {
    pysbn::cuda::moments(&x, pysbn::DType::Float32, g, s, nullptr);
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("without CUDA"), std::string::npos) << e.what();
  }
}
