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

// Arguments are checked before the device is looked at, so a null input is rejected by name
// with Exec{Device::CUDA} in every build, even on a machine without a GPU; without CUDA, an op
// whose arguments are valid says that CUDA was not built, and writes nothing.
TEST(CoreInfo, CudaEntryPointsFailClearly)
{
  double s[3] = {-1.0, -1.0, -1.0};
  const pysbn::Geometry g{1, 1, 1, pysbn::Layout::ChannelMajor};
  const pysbn::Exec cuda{pysbn::Device::CUDA, 1, nullptr};
  try {
    pysbn::moments(pysbn::TensorView{nullptr, pysbn::DType::Float32, g}, s, cuda);
    FAIL() << "expected an exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("moments: x"), std::string::npos) << e.what();
  }
  if (pysbn::built_with_cuda()) { return; }
  const float x = 1.0f;
  try {
    pysbn::moments(pysbn::TensorView{&x, pysbn::DType::Float32, g}, s, cuda);
    FAIL() << "expected an exception";
  } catch (const std::invalid_argument& e) {
    FAIL() << "expected std::runtime_error, got std::invalid_argument: " << e.what();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("without CUDA"), std::string::npos) << e.what();
  }
  for (double v : s) { EXPECT_EQ(v, -1.0); }
}
