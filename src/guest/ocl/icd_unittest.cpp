// libgpupocl without a partition: the dispatch table is complete, the shared library exports only
// the ICD loader's entry points, and with no partition to reach the ICD reports no platform.
#include <dlfcn.h>
#include <stdlib.h>

#include <gtest/gtest.h>

#include "guest/ocl/icd.h"

namespace {

TEST(IcdDispatch, EverySlotIsFilled) {
  const auto* slots = reinterpret_cast<void* const*>(&gpup::ocl::kDispatch);
  const size_t n = sizeof(cl_icd_dispatch) / sizeof(void*);
  ASSERT_GE(n, 140u);  // OpenCL 1.0 to 3.0, and the sharing extensions
  for (size_t i = 0; i < n; ++i) EXPECT_NE(slots[i], nullptr) << "dispatch slot " << i << " is empty";
}

class SharedLibrary : public ::testing::Test {
 protected:
  void SetUp() override {
    unsetenv("GPUP_VRD");
    handle_ = dlopen(GPUPOCL_PATH, RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(handle_, nullptr) << dlerror();
  }
  void TearDown() override {
    if (handle_) dlclose(handle_);
  }
  void* handle_ = nullptr;
};

TEST_F(SharedLibrary, ExportsOnlyTheLoaderEntryPoints) {
  for (const char* name : {"clIcdGetPlatformIDsKHR", "clGetExtensionFunctionAddress",
                           "clGetExtensionFunctionAddressForPlatform", "clGetPlatformInfo"})
    EXPECT_NE(dlsym(handle_, name), nullptr) << name;
  // Everything else is reached through dispatch tables; exporting it would shadow the loader's.
  for (const char* name : {"clCreateBuffer", "clGetDeviceIDs", "clEnqueueNDRangeKernel"})
    EXPECT_EQ(dlsym(handle_, name), nullptr) << name;
}

TEST_F(SharedLibrary, NoPartitionMeansNoPlatform) {
  using GetIds = cl_int (*)(cl_uint, cl_platform_id*, cl_uint*);
  auto get_ids = reinterpret_cast<GetIds>(dlsym(handle_, "clIcdGetPlatformIDsKHR"));
  ASSERT_NE(get_ids, nullptr);
  cl_uint n = 77;
  EXPECT_EQ(get_ids(0, nullptr, &n), CL_PLATFORM_NOT_FOUND_KHR);
  EXPECT_EQ(n, 0u);
  EXPECT_EQ(get_ids(0, nullptr, nullptr), CL_INVALID_VALUE);

  using GetAddress = void* (*)(const char*);
  auto address = reinterpret_cast<GetAddress>(dlsym(handle_, "clGetExtensionFunctionAddress"));
  ASSERT_NE(address, nullptr);
  EXPECT_EQ(address("clIcdGetPlatformIDsKHR"), reinterpret_cast<void*>(get_ids));
  EXPECT_EQ(address("clNoSuchFunctionKHR"), nullptr);
}

}  // namespace
