// Checks that only make sense for one backend: the mock's device faults and memory accounting,
// the OpenCL KMD's platform/device selection, binaries and argument kinds.
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

#include "kmd/conformance/kmd_fixture.h"
#include "kmd/mock/mock_kernels.h"

namespace gpup::kmd::test {
namespace {

gpup_status start_with(KmdFixture& f, const char* config, GPUPDDI_HANDLE* out = nullptr) {
  GPUPDDI_ARG_STARTADAPTER a{};
  a.struct_size = sizeof(a);
  a.pConfig = config;
  const gpup_status s = f.ddi().Adapter.pfnStartAdapter(&a);
  if (s == GPUP_STATUS_SUCCESS) {
    if (out) {
      *out = a.hAdapter;
    } else {
      f.ddi().Adapter.pfnStopAdapter(a.hAdapter);
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Mock

TEST(MockKmd, FaultsCompleteWithDeviceError) {
  KmdFixture f;
  f.open("mock");
  ASSERT_FALSE(HasFatalFailure());
  auto built = f.build(std::string(mock::kPortableKernelsSource) + "__kernel void fault(__global int* b) {}\n");
  ASSERT_EQ(built.status, GPUP_STATUS_SUCCESS) << built.log;
  auto buf = f.cpu_buffer(4096);
  auto* ctx = f.context();
  Dispatch fault(built.h, "fault", Args().buffer(ref(buf.h, 0, 4096)), 1);
  EXPECT_EQ(f.run(ctx, {fault.cmd()}), GPUP_STATUS_DEVICE_ERROR);
  // An index past the argument's range is a fault too, and stops the rest of the submission.
  Dispatch past_end(built.h, "add_i32", Args().buffer(ref(buf.h, 0, 256)).value(int32_t{1}), 65);
  Dispatch after(built.h, "add_i32", Args().buffer(ref(buf.h, 1024, 1024)).value(int32_t{1}), 256);
  EXPECT_EQ(f.run(ctx, {past_end.cmd(), after.cmd()}), GPUP_STATUS_DEVICE_ERROR);
  int32_t v;
  std::memcpy(&v, buf.mem + 1024, 4);
  EXPECT_EQ(v, 0) << "commands after the fault did not run";
  Dispatch ok(built.h, "add_i32", Args().buffer(ref(buf.h, 0, 256)).value(int32_t{1}), 64);
  EXPECT_EQ(f.run(ctx, {ok.cmd()}), GPUP_STATUS_SUCCESS) << "the context keeps working";
}

TEST(MockKmd, DeviceMemoryIsAccounted) {
  KmdFixture f;
  f.open("mock", "memory=16777216\nname=small mock");
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(f.info.GlobalMemSize, 16u << 20);
  EXPECT_STREQ(f.info.Name, "small mock");
  auto a = f.device_buffer(8 << 20);
  auto b = f.device_buffer(8 << 20);
  GPUPDDI_ARG_CREATEALLOCATION c{};
  c.struct_size = sizeof(c);
  c.Size = 4096;
  EXPECT_EQ(f.create_allocation(&c), GPUP_STATUS_NO_MEMORY);
  f.destroy_allocation(a.h);
  EXPECT_EQ(f.create_allocation(&c), GPUP_STATUS_SUCCESS);
  std::vector<unsigned char> backing(1 << 20);
  GPUPDDI_ARG_CREATEALLOCATION cpu{};
  cpu.struct_size = sizeof(cpu);
  cpu.Flags.CpuVisible = 1;
  cpu.Size = backing.size();
  cpu.pSystemMemory = backing.data();
  EXPECT_EQ(f.ddi().Memory.pfnCreateAllocation(f.device, &cpu), GPUP_STATUS_SUCCESS) << "system memory is not counted";
  f.ddi().Memory.pfnDestroyAllocation(f.device, cpu.hAllocation);
  (void)b;
}

TEST(MockKmd, ConfigIsChecked) {
  KmdFixture f;
  f.open("mock");
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_EQ(start_with(f, "memory=lots"), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(start_with(f, "memory=1024"), GPUP_STATUS_INVALID_PARAMETER) << "below 1 MiB";
  EXPECT_EQ(start_with(f, "memory=1\nmemory=2"), GPUP_STATUS_INVALID_PARAMETER) << "repeated key";
  EXPECT_EQ(start_with(f, " memory = 33554432 \n"), GPUP_STATUS_SUCCESS);
}

TEST(MockKmd, BuildRejectsKernelsItCannotRun) {
  KmdFixture f;
  f.open("mock");
  ASSERT_FALSE(HasFatalFailure());
  auto b = f.build("__kernel void add_i32(__global int* b, int v) {}\nkernel void saxpy(global float* y) {}\n");
  EXPECT_EQ(b.status, GPUP_STATUS_BUILD_FAILED);
  EXPECT_NE(b.log.find("saxpy"), std::string::npos) << b.log;
  auto none = f.build("int helper(int x) { return x; }\n");
  EXPECT_EQ(none.status, GPUP_STATUS_BUILD_FAILED);
  // A kernel the mock knows but this program does not declare is not found.
  auto only_add = f.build("__kernel void add_i32(__global int* b, int v) { b[get_global_id(0)] += v; }\n");
  ASSERT_EQ(only_add.status, GPUP_STATUS_SUCCESS);
  auto buf = f.cpu_buffer(4096);
  auto* ctx = f.context();
  Dispatch copy(only_add.h, "copy_i32", Args().buffer(ref(buf.h, 0, 128)).buffer(ref(buf.h, 128, 128)), 32);
  EXPECT_EQ(f.submit(ctx, {copy.cmd()}, 1), GPUP_STATUS_NOT_FOUND);
}

// ---------------------------------------------------------------------------------------------
// OpenCL

TEST(OpenClKmd, ConfigSelectsPlatformAndDevice) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  clear_log();
  EXPECT_EQ(start_with(f, "platform=No Such Platform"), GPUP_STATUS_NOT_FOUND);
  EXPECT_TRUE(log_contains("No Such Platform")) << "names what was asked for";
  EXPECT_TRUE(log_contains(f.info.Platform)) << "names what exists";
  EXPECT_EQ(start_with(f, "device=99"), GPUP_STATUS_NOT_FOUND);
  EXPECT_TRUE(log_contains("no device #99"));
  EXPECT_EQ(start_with(f, "device=first"), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(start_with(f, "device=-1"), GPUP_STATUS_INVALID_PARAMETER);
  const std::string explicit_config = std::string("platform=") + f.info.Platform + "\ndevice=0\n";
  EXPECT_EQ(start_with(f, explicit_config.c_str()), GPUP_STATUS_SUCCESS);
}

TEST(OpenClKmd, DeviceInfoMatchesOpenCL) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  cl_platform_id platforms[16];
  cl_uint n = 0;
  ASSERT_EQ(clGetPlatformIDs(16, platforms, &n), CL_SUCCESS);
  bool found = false;
  for (cl_uint i = 0; i < n && i < 16 && !found; ++i) {
    cl_device_id dev;
    if (clGetDeviceIDs(platforms[i], CL_DEVICE_TYPE_ALL, 1, &dev, nullptr) != CL_SUCCESS) continue;
    char name[256] = {};
    clGetDeviceInfo(dev, CL_DEVICE_NAME, sizeof(name) - 1, name, nullptr);
    if (std::string(name).substr(0, sizeof(f.info.Name) - 1) != f.info.Name) continue;
    found = true;
    cl_ulong global = 0, max_alloc = 0;
    cl_uint align = 0;
    clGetDeviceInfo(dev, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof(global), &global, nullptr);
    clGetDeviceInfo(dev, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof(max_alloc), &max_alloc, nullptr);
    clGetDeviceInfo(dev, CL_DEVICE_MEM_BASE_ADDR_ALIGN, sizeof(align), &align, nullptr);
    EXPECT_EQ(f.info.GlobalMemSize, global);
    EXPECT_EQ(f.info.MaxAllocSize, max_alloc);
    EXPECT_EQ(f.info.MemBaseAddrAlignBits, align);
  }
  EXPECT_TRUE(found) << f.info.Name;
}

TEST(OpenClKmd, BinaryProgramsRoundTrip) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  // Build the portable kernels natively to get this device's binary.
  cl_platform_id platform;
  cl_device_id device = nullptr;
  cl_platform_id platforms[16];
  cl_uint n = 0;
  ASSERT_EQ(clGetPlatformIDs(16, platforms, &n), CL_SUCCESS);
  for (cl_uint i = 0; i < n && i < 16 && device == nullptr; ++i) {
    cl_device_id d;
    char name[256] = {};
    if (clGetDeviceIDs(platforms[i], CL_DEVICE_TYPE_ALL, 1, &d, nullptr) != CL_SUCCESS) continue;
    clGetDeviceInfo(d, CL_DEVICE_NAME, sizeof(name) - 1, name, nullptr);
    if (std::string(name).substr(0, sizeof(f.info.Name) - 1) == f.info.Name) {
      platform = platforms[i];
      device = d;
    }
  }
  ASSERT_NE(device, nullptr);
  (void)platform;
  cl_int err;
  cl_context ctx = clCreateContext(nullptr, 1, &device, nullptr, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  const char* src = mock::kPortableKernelsSource;
  cl_program p = clCreateProgramWithSource(ctx, 1, &src, nullptr, &err);
  ASSERT_EQ(clBuildProgram(p, 1, &device, "-cl-kernel-arg-info", nullptr, nullptr), CL_SUCCESS);
  size_t size = 0;
  clGetProgramInfo(p, CL_PROGRAM_BINARY_SIZES, sizeof(size), &size, nullptr);
  std::string binary(size, '\0');
  unsigned char* ptr = reinterpret_cast<unsigned char*>(binary.data());
  clGetProgramInfo(p, CL_PROGRAM_BINARIES, sizeof(ptr), &ptr, nullptr);
  clReleaseProgram(p);
  clReleaseContext(ctx);
  ASSERT_GT(size, 0u);

  auto built = f.build(binary, GPUP_OCL_PROGRAM_BINARY);
  ASSERT_EQ(built.status, GPUP_STATUS_SUCCESS) << built.log;
  auto buf = f.cpu_buffer(1024 * 4);
  auto* c = f.context();
  Dispatch add(built.h, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{9}), 1024);
  ASSERT_EQ(f.run(c, {add.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  int32_t v;
  std::memcpy(&v, buf.mem + 4 * 1023, 4);
  EXPECT_EQ(v, 9);
}

TEST(OpenClKmd, UnsupportedArgumentKindsAreRefused) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  auto built = f.build(
      "__kernel void with_sampler(sampler_t s, __global int* b) { b[0] = 1; }\n"
      "__kernel void with_image(__read_only image2d_t img, __global int* b) { b[0] = 1; }\n");
  ASSERT_EQ(built.status, GPUP_STATUS_SUCCESS) << built.log;
  auto buf = f.cpu_buffer(4096);
  auto* c = f.context();
  // The guest cannot name a sampler or an image: whatever it passes must not reach OpenCL.
  Dispatch sampler(built.h, "with_sampler", Args().value(uint64_t{0x4141414141414141}).buffer(ref(buf.h, 0, 4096)), 1);
  EXPECT_EQ(f.submit(c, {sampler.cmd()}, 1), GPUP_STATUS_NOT_SUPPORTED);
  Dispatch image(built.h, "with_image", Args().value(uint64_t{0x4141414141414141}).buffer(ref(buf.h, 0, 4096)), 1);
  EXPECT_EQ(f.submit(c, {image.cmd()}, 2), GPUP_STATUS_NOT_SUPPORTED);
  Dispatch image_as_buffer(built.h, "with_image", Args().buffer(ref(buf.h, 0, 4096)).buffer(ref(buf.h, 0, 4096)), 1);
  EXPECT_EQ(f.submit(c, {image_as_buffer.cmd()}, 3), GPUP_STATUS_NOT_SUPPORTED);
}

TEST(OpenClKmd, BadBuildOptionsFailTheBuild) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  auto built = f.build(mock::kPortableKernelsSource, GPUP_OCL_PROGRAM_SOURCE, "-no-such-option");
  EXPECT_EQ(built.status, GPUP_STATUS_BUILD_FAILED);
  EXPECT_EQ(built.result.BuildError, CL_INVALID_BUILD_OPTIONS);
}

}  // namespace
}  // namespace gpup::kmd::test
