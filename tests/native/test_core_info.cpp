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

// Without CUDA every cuda:: op says so; with CUDA, arguments are validated before any device
// work, so a null input is rejected by name even on a machine without a GPU.
TEST(CoreInfo, CudaEntryPointsFailClearly)
{
  double s[3];
  pysbn::Geometry g{1, 1, 1, pysbn::Layout::ChannelMajor};
  try {
    pysbn::cuda::moments(nullptr, pysbn::DType::Float32, g, s, nullptr);
    FAIL() << "expected an exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_TRUE(pysbn::built_with_cuda()) << e.what();
    EXPECT_NE(std::string(e.what()).find("x is null"), std::string::npos) << e.what();
  } catch (const std::runtime_error& e) {
    EXPECT_FALSE(pysbn::built_with_cuda()) << e.what();
    EXPECT_NE(std::string(e.what()).find("without CUDA"), std::string::npos) << e.what();
  }
}
