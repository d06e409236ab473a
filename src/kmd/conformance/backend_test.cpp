// Checks that only make sense for one backend: the mock's device faults and memory accounting,
// the OpenCL KMD's platform/device selection, binaries and argument kinds.
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

#include <array>
#include <iostream>

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

// The mock accepts image allocations and runs its two image kernels, but does not claim
// CL_DEVICE_IMAGE_SUPPORT to the guest's ICD.
TEST(MockKmd, DoesNotClaimImageSupport) {
  KmdFixture f;
  f.open("mock");
  ASSERT_FALSE(HasFatalFailure());
  const GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_DEVICE_INFO};
  std::vector<unsigned char> out(64 << 10);
  uint32_t written = 0;
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, out.data(), static_cast<uint32_t>(out.size()), &h, sizeof(h),
                    &written),
            GPUP_STATUS_SUCCESS);
  GPUP_OCL_INFO_LIST list;
  std::memcpy(&list, out.data(), sizeof(list));
  size_t at = sizeof(list);
  for (uint32_t i = 0; i < list.Count; ++i) {
    GPUP_OCL_INFO_RECORD r;
    std::memcpy(&r, out.data() + at, sizeof(r));
    at += sizeof(r);
    if (r.Param == CL_DEVICE_IMAGE_SUPPORT) {
      cl_bool v = CL_FALSE;
      std::memcpy(&v, out.data() + at, std::min<size_t>(r.Size, sizeof(v)));
      EXPECT_EQ(v, CL_FALSE);
    }
    EXPECT_NE(r.Param, uint32_t{CL_DEVICE_MAX_READ_IMAGE_ARGS});
    at += (r.Size + 7) / 8 * 8;
  }
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

TEST(OpenClKmd, ArgumentKindsOfImagesAndSamplers) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  auto built = f.build(
      "__kernel void with_sampler(sampler_t s, __global int* b) { b[0] = 1; }\n"
      "__kernel void with_image(__read_only image2d_t img, __global int* b) { b[0] = 1; }\n"
      "__kernel void with_image3d(__write_only image3d_t img, __global int* b) { b[0] = 1; }\n"
      "__kernel void with_image_buffer(__read_only image1d_buffer_t img, __global int* b) { b[0] = 1; }\n",
      GPUP_OCL_PROGRAM_SOURCE, {}, 1 << 20);
  ASSERT_EQ(built.status, GPUP_STATUS_SUCCESS) << built.log;
  const auto* sampler_k = built.info.find("with_sampler");
  const auto* image_k = built.info.find("with_image");
  const auto* image3d_k = built.info.find("with_image3d");
  const auto* image_buffer_k = built.info.find("with_image_buffer");
  ASSERT_TRUE(sampler_k && image_k && image3d_k && image_buffer_k);
  EXPECT_EQ(sampler_k->args[0].info.Kind, uint32_t{GPUPDDI_ARG_SAMPLER});
  EXPECT_EQ(sampler_k->args[0].info.ValueSize, sizeof(cl_sampler));
  EXPECT_EQ(image_k->args[0].info.Kind, uint32_t{GPUPDDI_ARG_IMAGE});
  EXPECT_EQ(image_k->args[0].info.ValueSize, sizeof(cl_mem));
  EXPECT_EQ(image3d_k->args[0].info.Kind, uint32_t{GPUPDDI_ARG_IMAGE});
  EXPECT_EQ(image3d_k->args[0].info.AccessQualifier, uint32_t{CL_KERNEL_ARG_ACCESS_WRITE_ONLY});
  EXPECT_EQ(image_buffer_k->args[0].info.Kind, uint32_t{GPUP_OCL_ARG_UNSUPPORTED});
  EXPECT_EQ(image_buffer_k->args[0].info.ValueSize, 0u);

  auto buf = f.cpu_buffer(4096);
  gpup_status s = GPUP_STATUS_INTERNAL;
  auto img2d = f.image(image_desc(CL_MEM_OBJECT_IMAGE2D, CL_R, CL_UNSIGNED_INT32, 16, 16, 0, 0, 64, 0), 4096, &s);
  ASSERT_EQ(s, GPUP_STATUS_SUCCESS);
  auto* c = f.context();
  // Whatever the guest passes for an image buffer must not reach OpenCL.
  Dispatch image_buffer(built.h, "with_image_buffer", Args().image(ref(img2d.h, 0, 4096)).buffer(ref(buf.h, 0, 4096)), 1);
  EXPECT_EQ(f.submit(c, {image_buffer.cmd()}, 1), GPUP_STATUS_NOT_SUPPORTED);
  Dispatch sampler_as_value(built.h, "with_sampler", Args().value(uint64_t{0x4141414141414141}).buffer(ref(buf.h, 0, 4096)), 1);
  EXPECT_EQ(f.submit(c, {sampler_as_value.cmd()}, 2), GPUP_STATUS_INVALID_PARAMETER);
  Dispatch image_as_buffer(built.h, "with_image", Args().buffer(ref(buf.h, 0, 4096)).buffer(ref(buf.h, 0, 4096)), 1);
  EXPECT_EQ(f.submit(c, {image_as_buffer.cmd()}, 3), GPUP_STATUS_INVALID_PARAMETER);
  // A 2D image for a 3D parameter: the kernel would read a layout the image does not have.
  Dispatch wrong_type(built.h, "with_image3d", Args().image(ref(img2d.h, 0, 4096)).buffer(ref(buf.h, 0, 4096)), 1);
  EXPECT_EQ(f.submit(c, {wrong_type.cmd()}, 4), GPUP_STATUS_INVALID_PARAMETER);
  Dispatch good(built.h, "with_image", Args().image(ref(img2d.h, 0, 4096)).buffer(ref(buf.h, 0, 4096)), 1);
  ASSERT_EQ(f.run(c, {good.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(buf.mem[0], 1);
}

// Every access flag and type the device answers natively, answered by the query (2D read-write
// at least), and the image layout of kmd_opencl.h as PoCL reads it for arrays.
TEST(OpenClKmd, ImageFormatsMatchNativeAndArraysUseTheContractLayout) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  const GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_IMAGE_FORMATS};
  std::vector<unsigned char> out(64 << 10);
  uint32_t written = 0;
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, out.data(), static_cast<uint32_t>(out.size()), &h, sizeof(h),
                    &written),
            GPUP_STATUS_SUCCESS);
  GPUP_OCL_INFO_LIST list;
  std::memcpy(&list, out.data(), sizeof(list));
  ASSERT_GT(list.Count, 0u);
  std::vector<cl_image_format> got;
  size_t at = sizeof(list);
  for (uint32_t i = 0; i < list.Count; ++i) {
    GPUP_OCL_INFO_RECORD r;
    std::memcpy(&r, out.data() + at, sizeof(r));
    at += sizeof(r);
    if (r.Param == GPUP_OCL_IMAGE_FORMATS_KEY(CL_MEM_OBJECT_IMAGE2D, CL_MEM_READ_WRITE)) {
      got.resize(r.Size / sizeof(cl_image_format));
      std::memcpy(got.data(), out.data() + at, got.size() * sizeof(cl_image_format));
    }
    at += (r.Size + 7) / 8 * 8;
  }
  ASSERT_FALSE(got.empty()) << "PoCL has 2D read-write image formats";

  cl_platform_id platforms[16];
  cl_uint n = 0;
  ASSERT_EQ(clGetPlatformIDs(16, platforms, &n), CL_SUCCESS);
  cl_device_id device = nullptr;
  for (cl_uint i = 0; i < n && i < 16 && device == nullptr; ++i) {
    cl_device_id d;
    char name[256] = {};
    if (clGetDeviceIDs(platforms[i], CL_DEVICE_TYPE_ALL, 1, &d, nullptr) != CL_SUCCESS) continue;
    clGetDeviceInfo(d, CL_DEVICE_NAME, sizeof(name) - 1, name, nullptr);
    if (std::string(name).substr(0, sizeof(f.info.Name) - 1) == f.info.Name) device = d;
  }
  ASSERT_NE(device, nullptr);
  cl_int err;
  cl_context ctx = clCreateContext(nullptr, 1, &device, nullptr, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  cl_uint count = 0;
  ASSERT_EQ(clGetSupportedImageFormats(ctx, CL_MEM_READ_WRITE, CL_MEM_OBJECT_IMAGE2D, 0, nullptr, &count), CL_SUCCESS);
  std::vector<cl_image_format> native(count);
  ASSERT_EQ(clGetSupportedImageFormats(ctx, CL_MEM_READ_WRITE, CL_MEM_OBJECT_IMAGE2D, count, native.data(), nullptr),
            CL_SUCCESS);
  clReleaseContext(ctx);
  ASSERT_EQ(got.size(), native.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].image_channel_order, native[i].image_channel_order) << i;
    EXPECT_EQ(got[i].image_channel_data_type, native[i].image_channel_data_type) << i;
  }

  // Arrays: pixel (x, y) of layer a at x * 4 + y * RowPitch + a * SlicePitch (1D arrays: RowPitch).
  auto built = f.build(
      "__kernel void read_1d_array(read_only image1d_array_t img, __global uint* out) {\n"
      "  int x = get_global_id(0), a = get_global_id(1);\n"
      "  out[a * get_image_width(img) + x] = read_imageui(img, (int2)(x, a)).x;\n"
      "}\n"
      "__kernel void read_2d_array(read_only image2d_array_t img, __global uint* out) {\n"
      "  int x = get_global_id(0), y = get_global_id(1), a = get_global_id(2);\n"
      "  int w = get_image_width(img), h = get_image_height(img);\n"
      "  out[(a * h + y) * w + x] = read_imageui(img, (int4)(x, y, a, 0)).x;\n"
      "}\n");
  ASSERT_EQ(built.status, GPUP_STATUS_SUCCESS) << built.log;
  auto* c = f.context();
  auto result = f.cpu_buffer(4096);
  ASSERT_EQ(f.lock(result.h), GPUP_STATUS_SUCCESS);
  gpup_status s = GPUP_STATUS_INTERNAL;
  {
    constexpr uint32_t kW = 5, kA = 3, kPitch = 32;
    auto img = f.image(image_desc(CL_MEM_OBJECT_IMAGE1D_ARRAY, CL_R, CL_UNSIGNED_INT32, kW, 0, 0, kA, kPitch, 0),
                       (kA - 1) * kPitch + kW * 4, &s);
    ASSERT_EQ(s, GPUP_STATUS_SUCCESS);
    for (uint32_t a = 0; a < kA; ++a) {
      for (uint32_t x = 0; x < kW; ++x) {
        const uint32_t v = 100 * a + x;
        std::memcpy(img.mem + a * kPitch + x * 4, &v, 4);
      }
    }
    Dispatch d(built.h, "read_1d_array", Args().image(ref(img.h, 0, img.size)).buffer(ref(result.h, 0, 4096)), kW);
    d.dims = 2;
    d.global[1] = kA;
    ASSERT_EQ(f.run(c, {d.cmd()}), GPUP_STATUS_SUCCESS);
    for (uint32_t i = 0; i < kW * kA; ++i) {
      uint32_t v;
      std::memcpy(&v, result.mem + i * 4, 4);
      EXPECT_EQ(v, 100 * (i / kW) + i % kW) << "1D array pixel " << i;
    }
  }
  {
    constexpr uint32_t kW = 3, kH = 2, kA = 4, kPitch = 16, kSlice = 48;
    auto img = f.image(image_desc(CL_MEM_OBJECT_IMAGE2D_ARRAY, CL_R, CL_UNSIGNED_INT32, kW, kH, 0, kA, kPitch, kSlice),
                       (kA - 1) * kSlice + (kH - 1) * kPitch + kW * 4, &s);
    ASSERT_EQ(s, GPUP_STATUS_SUCCESS);
    for (uint32_t a = 0; a < kA; ++a) {
      for (uint32_t y = 0; y < kH; ++y) {
        for (uint32_t x = 0; x < kW; ++x) {
          const uint32_t v = 1000 * a + 10 * y + x;
          std::memcpy(img.mem + a * kSlice + y * kPitch + x * 4, &v, 4);
        }
      }
    }
    Dispatch d(built.h, "read_2d_array", Args().image(ref(img.h, 0, img.size)).buffer(ref(result.h, 0, 4096)), kW);
    d.dims = 3;
    d.global[1] = kH;
    d.global[2] = kA;
    ASSERT_EQ(f.run(c, {d.cmd()}), GPUP_STATUS_SUCCESS);
    for (uint32_t i = 0; i < kW * kH * kA; ++i) {
      uint32_t v;
      std::memcpy(&v, result.mem + i * 4, 4);
      EXPECT_EQ(v, 1000 * (i / (kW * kH)) + 10 * (i / kW % kH) + i % kW) << "2D array pixel " << i;
    }
  }
}

// ValueSize / ValueSizeAlt let the guest ICD answer clSetKernelArg's CL_INVALID_ARG_SIZE exactly
// as the host's OpenCL does: checked here against a native build of the same kernel.
TEST(OpenClKmd, ValueSizesMirrorNativeSetKernelArg) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  const char* src =
      "typedef struct { int a; char b; float c[3]; } S;\n"
      "__kernel void mix(__global int* out, __local float* scratch, int i, char c, long l, float3 f3, float4 f4,\n"
      "                  uchar16 u16, S s, __constant int* k) {\n"
      "  scratch[get_local_id(0)] = s.c[2];\n"
      "  barrier(CLK_LOCAL_MEM_FENCE);\n"
      "  out[0] = i + c + (int)l + (int)f3.z + (int)f4.w + u16.s7 + s.a + s.b + (int)scratch[0] + (k ? k[0] : 0);\n"
      "}\n";
  auto built = f.build(src, GPUP_OCL_PROGRAM_SOURCE, {}, 4 << 20);
  ASSERT_EQ(built.status, GPUP_STATUS_SUCCESS) << built.log;
  // PoCL 3.1 names a kernel with a struct passed by value "_cl_<name>" (CL_PROGRAM_KERNEL_NAMES,
  // CL_KERNEL_FUNCTION_NAME, and clCreateKernel accepts only that name): the KMD reports what the
  // device says, so the guest sees the same name as a native application.
  ASSERT_EQ(built.info.kernels.size(), 1u);
  const auto* mix = &built.info.kernels[0];
  ASSERT_TRUE(mix->name == "mix" || mix->name == "_cl_mix") << mix->name;
  ASSERT_EQ(mix->args.size(), 10u);
  const uint32_t kinds[10] = {GPUPDDI_ARG_BUFFER, GPUPDDI_ARG_LOCAL, GPUPDDI_ARG_VALUE, GPUPDDI_ARG_VALUE,
                              GPUPDDI_ARG_VALUE,  GPUPDDI_ARG_VALUE, GPUPDDI_ARG_VALUE, GPUPDDI_ARG_VALUE,
                              GPUPDDI_ARG_VALUE,  GPUPDDI_ARG_BUFFER};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(mix->args[i].info.Kind, kinds[i]) << "argument " << i;
  EXPECT_EQ(mix->args[8].type_name, "S");
  EXPECT_EQ(mix->args[8].name, "s");
  EXPECT_EQ(mix->args[1].info.AddressQualifier, uint32_t{CL_KERNEL_ARG_ADDRESS_LOCAL});
  EXPECT_EQ(mix->args[9].info.AddressQualifier, uint32_t{CL_KERNEL_ARG_ADDRESS_CONSTANT});
  EXPECT_EQ(mix->args[5].info.ValueSize, 16u) << "float3 takes sizeof(float4)";

  // The same kernel, natively: every size from 1 to 64 must be accepted exactly where the
  // reported sizes say.
  cl_platform_id platforms[16];
  cl_uint n = 0;
  ASSERT_EQ(clGetPlatformIDs(16, platforms, &n), CL_SUCCESS);
  cl_device_id device = nullptr;
  for (cl_uint i = 0; i < n && i < 16 && device == nullptr; ++i) {
    cl_device_id d;
    char name[256] = {};
    if (clGetDeviceIDs(platforms[i], CL_DEVICE_TYPE_ALL, 1, &d, nullptr) != CL_SUCCESS) continue;
    clGetDeviceInfo(d, CL_DEVICE_NAME, sizeof(name) - 1, name, nullptr);
    if (std::string(name).substr(0, sizeof(f.info.Name) - 1) == f.info.Name) device = d;
  }
  ASSERT_NE(device, nullptr);
  cl_int err;
  cl_context ctx = clCreateContext(nullptr, 1, &device, nullptr, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  cl_program p = clCreateProgramWithSource(ctx, 1, &src, nullptr, &err);
  ASSERT_EQ(clBuildProgram(p, 1, &device, "", nullptr, nullptr), CL_SUCCESS);
  cl_kernel k = clCreateKernel(p, mix->name.c_str(), &err);
  ASSERT_EQ(err, CL_SUCCESS);
  unsigned char zeros[64] = {};
  for (cl_uint i = 2; i <= 8; ++i) {
    const GPUP_OCL_KERNEL_ARG_INFO& a = mix->args[i].info;
    for (uint32_t size = 1; size <= 64; ++size) {
      const bool icd = a.ValueSize == 0 || size == a.ValueSize || (a.ValueSizeAlt != 0 && size == a.ValueSizeAlt);
      const bool native = clSetKernelArg(k, i, size, zeros) == CL_SUCCESS;
      EXPECT_EQ(icd, native) << mix->args[i].type_name << " argument " << i << " size " << size;
    }
  }
  clReleaseKernel(k);
  clReleaseProgram(p);
  clReleaseContext(ctx);

  // The struct and __local arguments dispatch.
  struct S {
    int32_t a;
    char b;
    float c[3];
  } s{1000, 2, {0, 0, 5.0f}};
  auto out = f.cpu_buffer(4096);
  auto* c = f.context();
  Dispatch d(built.h, mix->name,
             Args()
                 .buffer(ref(out.h, 0, 4096))
                 .local(64)
                 .value(int32_t{1})
                 .value(char{2})
                 .value(int64_t{3})
                 .bytes(std::array<float, 4>{0, 0, 4, 0}.data(), 16)
                 .bytes(std::array<float, 4>{0, 0, 0, 5}.data(), 16)
                 .bytes(std::array<uint8_t, 16>{0, 0, 0, 0, 0, 0, 0, 6}.data(), 16)
                 .bytes(&s, sizeof(s))
                 .null_buffer(),
             1, 1);
  ASSERT_EQ(f.run(c, {d.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(out.h), GPUP_STATUS_SUCCESS);
  int32_t v;
  std::memcpy(&v, out.mem, 4);
  EXPECT_EQ(v, 1 + 2 + 3 + 4 + 5 + 6 + 1000 + 2 + 5);
}

// Binary sizes PoCL gives, for the record (the worker's inline output is 64 KiB).
TEST(OpenClKmd, BinarySizes) {
  KmdFixture f;
  f.open("opencl");
  ASSERT_FALSE(HasFatalFailure());
  auto small = f.build("__kernel void add(__global int* b, int v) { b[get_global_id(0)] += v; }\n",
                       GPUP_OCL_PROGRAM_SOURCE, {}, 16 << 20);
  ASSERT_EQ(small.status, GPUP_STATUS_SUCCESS) << small.log;
  std::string twenty;
  for (int i = 0; i < 20; ++i) {
    twenty += "__kernel void k" + std::to_string(i) +
              "(__global float* a, __global const float* b, float s, int n) { int i = get_global_id(0); if (i < n) "
              "a[i] = a[i] * s + b[i] * " + std::to_string(i) + ".0f; }\n";
  }
  auto big = f.build(twenty, GPUP_OCL_PROGRAM_SOURCE, {}, 16 << 20);
  ASSERT_EQ(big.status, GPUP_STATUS_SUCCESS) << big.log;
  EXPECT_EQ(big.info.info.KernelCount, 20u);
  EXPECT_EQ(big.info.info.KernelTableComplete, 1u);
  EXPECT_GT(small.info.info.BinarySize, 0u);
  EXPECT_GT(big.info.info.BinarySize, small.info.info.BinarySize);
  std::cout << "[ info ] binary of 1 kernel: " << small.info.info.BinarySize << " bytes; of 20 kernels: "
            << big.info.info.BinarySize << " bytes (table " << big.info.info.KernelTableSize << " bytes)\n";
  // In a 64 KiB output the 20-kernel table still fits whole.
  auto capped = f.build(twenty, GPUP_OCL_PROGRAM_SOURCE, {}, 64 << 10);
  ASSERT_EQ(capped.status, GPUP_STATUS_SUCCESS);
  EXPECT_EQ(capped.info.info.KernelTableComplete, 1u);
  EXPECT_EQ(capped.info.info.BinarySize, big.info.info.BinarySize);
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
