// The ICD as a guest sees it, in a partition of 256 MiB (ctest icd_guest runs it with
// `differential.sh guest`):
//  - the crossing budget (docs/OPENCL.md), measured: this program and the ICD share the one
//    libgpupkmt of the process, so GpupKmtGetChannelStats counts the ICD's messages and round
//    trips for each group of calls;
//  - the device is the partition: its memory is the budget, and going past it fails like a
//    device out of memory, without disturbing what is already allocated;
//  - images: pixels through the shared section, and the specification's errors where the host
//    implementation is lenient.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#define CL_TARGET_OPENCL_VERSION 300
#define CL_USE_DEPRECATED_OPENCL_1_1_APIS  // clCreateImage2D and clCreateSampler, as older programs
#define CL_USE_DEPRECATED_OPENCL_1_2_APIS  // call them
#include <CL/cl.h>

#include "gpup/kmt.h"

namespace {

struct Counts {
  uint64_t messages = 0, round_trips = 0;
};

Counts counts() {
  GPUPKMT_CHANNELSTATS s{};
  EXPECT_EQ(GpupKmtGetChannelStats(&s), GPUP_STATUS_SUCCESS);
  return {s.MessagesSent, s.RoundTrips};
}

// The partition's max VRAM the test was started with (GPUP_EXPECT_MAX_VRAM, bytes; the ctest
// entries set it with the partition they create), 256 MiB when unset.
uint64_t expected_max_vram() {
  const char* v = std::getenv("GPUP_EXPECT_MAX_VRAM");
  return v ? std::strtoull(v, nullptr, 10) : 256ull << 20;
}

GPUPKMT_QUERYSTATISTICS partition_stats() {
  GPUPKMT_QUERYSTATISTICS s{};
  s.Type = GPUPKMT_QUERYSTATISTICS_VM;
  EXPECT_EQ(GpupKmtQueryStatistics(&s), GPUP_STATUS_SUCCESS);
  return s;
}

Counts since(const Counts& before) {
  Counts now = counts();
  return {now.messages - before.messages, now.round_trips - before.round_trips};
}

const char* kSource = R"CLC(
__kernel void scale(__global float* x, float a, __local float* scratch) {
  size_t i = get_global_id(0);
  scratch[get_local_id(0)] = x[i];
  barrier(CLK_LOCAL_MEM_FENCE);
  x[i] = scratch[get_local_id(0)] * a;
}
)CLC";

class Crossings : public ::testing::Test {
 protected:
  void SetUp() override {
    cl_int err;
    ASSERT_EQ(clGetPlatformIDs(1, &platform_, nullptr), CL_SUCCESS);
    ASSERT_EQ(clGetDeviceIDs(platform_, CL_DEVICE_TYPE_ALL, 1, &device_, nullptr), CL_SUCCESS);
    context_ = clCreateContext(nullptr, 1, &device_, nullptr, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS);
    queue_ = clCreateCommandQueueWithProperties(context_, device_, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS);
    program_ = clCreateProgramWithSource(context_, 1, &kSource, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS);
    ASSERT_EQ(clBuildProgram(program_, 1, &device_, "", nullptr, nullptr), CL_SUCCESS);
    kernel_ = clCreateKernel(program_, "scale", &err);
    ASSERT_EQ(err, CL_SUCCESS);
    buffer_ = clCreateBuffer(context_, CL_MEM_READ_WRITE, kBytes, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS);
    std::vector<float> ones(kElements, 1.0f);
    ASSERT_EQ(clEnqueueWriteBuffer(queue_, buffer_, CL_TRUE, 0, kBytes, ones.data(), 0, nullptr, nullptr), CL_SUCCESS);
  }
  void TearDown() override {
    if (buffer_) clReleaseMemObject(buffer_);
    if (kernel_) clReleaseKernel(kernel_);
    if (program_) clReleaseProgram(program_);
    if (queue_) clReleaseCommandQueue(queue_);
    if (context_) clReleaseContext(context_);
  }
  void set_args(float a) {
    ASSERT_EQ(clSetKernelArg(kernel_, 0, sizeof buffer_, &buffer_), CL_SUCCESS);
    ASSERT_EQ(clSetKernelArg(kernel_, 1, sizeof a, &a), CL_SUCCESS);
    ASSERT_EQ(clSetKernelArg(kernel_, 2, 64 * sizeof(float), nullptr), CL_SUCCESS);
  }
  static constexpr size_t kElements = 1 << 18;  // 1 MiB of floats
  static constexpr size_t kBytes = kElements * sizeof(float);
  cl_platform_id platform_ = nullptr;
  cl_device_id device_ = nullptr;
  cl_context context_ = nullptr;
  cl_command_queue queue_ = nullptr;
  cl_program program_ = nullptr;
  cl_kernel kernel_ = nullptr;
  cl_mem buffer_ = nullptr;
};

TEST_F(Crossings, QueriesAndKernelArgumentsCrossNothing) {
  const Counts before = counts();
  for (int i = 0; i < 1000; ++i) set_args(1.0f);
  char name[256];
  cl_ulong mem = 0;
  size_t wg = 0;
  cl_uint nargs = 0;
  ASSERT_EQ(clGetDeviceInfo(device_, CL_DEVICE_NAME, sizeof name, name, nullptr), CL_SUCCESS);
  ASSERT_EQ(clGetDeviceInfo(device_, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof mem, &mem, nullptr), CL_SUCCESS);
  ASSERT_EQ(clGetKernelWorkGroupInfo(kernel_, device_, CL_KERNEL_WORK_GROUP_SIZE, sizeof wg, &wg, nullptr), CL_SUCCESS);
  ASSERT_EQ(clGetKernelInfo(kernel_, CL_KERNEL_NUM_ARGS, sizeof nargs, &nargs, nullptr), CL_SUCCESS);
  size_t log_size = 0;
  ASSERT_EQ(clGetProgramBuildInfo(program_, device_, CL_PROGRAM_BUILD_LOG, 0, nullptr, &log_size), CL_SUCCESS);
  cl_kernel another = clCreateKernel(program_, "scale", nullptr);
  ASSERT_NE(another, nullptr);
  clReleaseKernel(another);
  const Counts d = since(before);
  EXPECT_EQ(d.messages, 0u);
  EXPECT_EQ(nargs, 3u);
  EXPECT_EQ(std::strncmp(name, "gpup partition of ", 18), 0) << name;
}

TEST_F(Crossings, QueuedKernelsCrossOnlyAtFlushAndEventsReadTheFencePage) {
  set_args(-1.0f);  // 201 launches flip the sign of every element an odd number of times
  const size_t global = kElements, local = 64;
  const Counts before = counts();
  cl_event last = nullptr;
  for (int i = 0; i < 201; ++i) {
    cl_event* ev = i == 200 ? &last : nullptr;
    ASSERT_EQ(clEnqueueNDRangeKernel(queue_, kernel_, 1, nullptr, &global, &local, 0, nullptr, ev), CL_SUCCESS);
  }
  EXPECT_EQ(since(before).messages, 0u) << "non-blocking enqueues must stay in the guest's command buffer";
  ASSERT_EQ(clFlush(queue_), CL_SUCCESS);
  Counts d = since(before);
  EXPECT_EQ(d.messages, 1u) << "one submission for the whole batch";
  EXPECT_EQ(d.round_trips, 0u) << "a submission is one-way";
  ASSERT_EQ(clFinish(queue_), CL_SUCCESS);
  d = since(before);
  EXPECT_LE(d.round_trips, 1u) << "finish waits once at most";
  const Counts after_finish = counts();
  cl_int status = 1;
  for (int i = 0; i < 100; ++i)
    ASSERT_EQ(clGetEventInfo(last, CL_EVENT_COMMAND_EXECUTION_STATUS, sizeof status, &status, nullptr), CL_SUCCESS);
  EXPECT_EQ(status, CL_COMPLETE);
  ASSERT_EQ(clWaitForEvents(1, &last), CL_SUCCESS);
  EXPECT_EQ(since(after_finish).messages, 0u) << "completion is read from the fence page";
  clReleaseEvent(last);

  std::vector<float> out(kElements);
  ASSERT_EQ(clEnqueueReadBuffer(queue_, buffer_, CL_TRUE, 0, kBytes, out.data(), 0, nullptr, nullptr), CL_SUCCESS);
  for (size_t i = 0; i < kElements; ++i) ASSERT_EQ(out[i], -1.0f) << i;
}

TEST_F(Crossings, LargeTransfersUseTheSharedSectionNotMessages) {
  std::vector<float> data(kElements);
  for (size_t i = 0; i < kElements; ++i) data[i] = static_cast<float>(i);
  const Counts before = counts();
  ASSERT_EQ(clEnqueueWriteBuffer(queue_, buffer_, CL_TRUE, 0, kBytes, data.data(), 0, nullptr, nullptr), CL_SUCCESS);
  std::vector<float> back(kElements, -1.0f);
  ASSERT_EQ(clEnqueueReadBuffer(queue_, buffer_, CL_TRUE, 0, kBytes, back.data(), 0, nullptr, nullptr), CL_SUCCESS);
  const Counts d = since(before);
  // 1 MiB each way, eight times the message limit, with at most a submit and a wait per call.
  EXPECT_LE(d.messages, 4u);
  EXPECT_EQ(back, data);
}

// A released buffer's allocation is kept by its context for the next buffer of the same size: a
// create/release loop crosses once, and a reused buffer is as good as a new one.
TEST_F(Crossings, ReleasedBuffersOfTheSameSizeAreReusedWithoutCrossing) {
  set_args(2.0f);
  cl_int err;
  cl_mem first = clCreateBuffer(context_, CL_MEM_READ_WRITE, kBytes, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  ASSERT_EQ(clReleaseMemObject(first), CL_SUCCESS);
  const Counts before = counts();
  for (int i = 0; i < 100; ++i) {
    cl_mem m = clCreateBuffer(context_, CL_MEM_READ_WRITE, kBytes, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS);
    ASSERT_EQ(clReleaseMemObject(m), CL_SUCCESS);
  }
  EXPECT_EQ(since(before).messages, 0u) << "same-sized buffers come from the context's pool";

  // Another size is a new allocation (create and map its GPU VA at least).
  const Counts other = counts();
  cl_mem odd = clCreateBuffer(context_, CL_MEM_READ_WRITE, kBytes + 4, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  EXPECT_GE(since(other).round_trips, 1u);
  clReleaseMemObject(odd);

  // A reused buffer, written and computed on, holds exactly what this use put there.
  std::vector<float> data(kElements);
  for (size_t i = 0; i < kElements; ++i) data[i] = static_cast<float>(i % 1000);
  cl_mem reused = clCreateBuffer(context_, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, kBytes, data.data(), &err);
  ASSERT_EQ(err, CL_SUCCESS);
  const float a = 3.0f;
  ASSERT_EQ(clSetKernelArg(kernel_, 0, sizeof reused, &reused), CL_SUCCESS);
  ASSERT_EQ(clSetKernelArg(kernel_, 1, sizeof a, &a), CL_SUCCESS);
  const size_t global = kElements, local = 64;
  ASSERT_EQ(clEnqueueNDRangeKernel(queue_, kernel_, 1, nullptr, &global, &local, 0, nullptr, nullptr), CL_SUCCESS);
  // Released while the kernel may still run: the allocation is pooled only after it completes.
  ASSERT_EQ(clReleaseMemObject(reused), CL_SUCCESS);
  cl_mem next = clCreateBuffer(context_, CL_MEM_READ_WRITE, kBytes, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  const std::vector<float> zeros(kElements, 0.0f);
  ASSERT_EQ(clEnqueueWriteBuffer(queue_, next, CL_TRUE, 0, kBytes, zeros.data(), 0, nullptr, nullptr), CL_SUCCESS);
  ASSERT_EQ(clFinish(queue_), CL_SUCCESS);
  std::vector<float> back(kElements, -1.0f);
  ASSERT_EQ(clEnqueueReadBuffer(queue_, next, CL_TRUE, 0, kBytes, back.data(), 0, nullptr, nullptr), CL_SUCCESS);
  EXPECT_EQ(back, zeros) << "the kernel on the released buffer must not land in the new one";
  clReleaseMemObject(next);
}

// Images: the pixels travel like a buffer's bytes (memcpy on the shared section), a sampler is
// guest-local, and where the host implementation is more lenient than the specification the
// ICD keeps the specification's error (the differential suite cannot compare those).
TEST_F(Crossings, ImagesMoveThroughTheSharedSectionAndKeepTheSpecificationsErrors) {
  cl_bool images = CL_FALSE;
  ASSERT_EQ(clGetDeviceInfo(device_, CL_DEVICE_IMAGE_SUPPORT, sizeof images, &images, nullptr), CL_SUCCESS);
  ASSERT_EQ(images, CL_TRUE) << "PoCL's CPU device supports images, so the partition must";
  const cl_image_format rgba8{CL_RGBA, CL_UNORM_INT8};
  cl_image_desc desc{};
  desc.image_type = CL_MEM_OBJECT_IMAGE2D;
  desc.image_width = 256;
  desc.image_height = 256;  // 256 KiB: twice the message limit
  cl_int err;
  Counts before = counts();
  cl_mem image = clCreateImage(context_, CL_MEM_READ_WRITE, &rgba8, &desc, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  EXPECT_LE(since(before).round_trips, 2u);  // create the allocation, map its GPU VA

  std::vector<uint8_t> pixels(256 * 256 * 4), back(pixels.size());
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i * 7 + 3);
  const size_t origin[3] = {0, 0, 0}, region[3] = {256, 256, 1};
  before = counts();
  ASSERT_EQ(clEnqueueWriteImage(queue_, image, CL_TRUE, origin, region, 0, 0, pixels.data(), 0, nullptr, nullptr),
            CL_SUCCESS);
  ASSERT_EQ(clEnqueueReadImage(queue_, image, CL_TRUE, origin, region, 0, 0, back.data(), 0, nullptr, nullptr),
            CL_SUCCESS);
  EXPECT_LE(since(before).messages, 5u);
  EXPECT_EQ(back, pixels);

  // Samplers cross nothing; NULL properties are the defaults.
  before = counts();
  cl_sampler sampler = clCreateSamplerWithProperties(context_, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  EXPECT_EQ(since(before).messages, 0u);
  cl_bool normalized = CL_FALSE;
  cl_addressing_mode addressing = 0;
  cl_filter_mode filter = 0;
  clGetSamplerInfo(sampler, CL_SAMPLER_NORMALIZED_COORDS, sizeof normalized, &normalized, nullptr);
  clGetSamplerInfo(sampler, CL_SAMPLER_ADDRESSING_MODE, sizeof addressing, &addressing, nullptr);
  clGetSamplerInfo(sampler, CL_SAMPLER_FILTER_MODE, sizeof filter, &filter, nullptr);
  EXPECT_EQ(normalized, CL_TRUE);
  EXPECT_EQ(addressing, static_cast<cl_addressing_mode>(CL_ADDRESS_CLAMP));
  EXPECT_EQ(filter, static_cast<cl_filter_mode>(CL_FILTER_NEAREST));

  // Misuse the host implementation lets through.
  size_t width = 0;
  EXPECT_EQ(clGetImageInfo(buffer_, CL_IMAGE_WIDTH, sizeof width, &width, nullptr), CL_INVALID_MEM_OBJECT);
  EXPECT_EQ(clEnqueueReadBuffer(queue_, image, CL_TRUE, 0, 64, back.data(), 0, nullptr, nullptr), CL_INVALID_MEM_OBJECT);
  EXPECT_EQ(clEnqueueWriteBuffer(queue_, image, CL_TRUE, 0, 64, back.data(), 0, nullptr, nullptr), CL_INVALID_MEM_OBJECT);
  const size_t empty[3] = {0, 4, 1};
  EXPECT_EQ(clEnqueueReadImage(queue_, image, CL_TRUE, origin, empty, 0, 0, back.data(), 0, nullptr, nullptr),
            CL_INVALID_VALUE);
  cl_image_desc pitched = desc;
  pitched.image_row_pitch = 2048;
  EXPECT_EQ(clCreateImage(context_, CL_MEM_READ_WRITE, &rgba8, &pitched, nullptr, &err), nullptr);
  EXPECT_EQ(err, CL_INVALID_IMAGE_DESCRIPTOR);
  EXPECT_EQ(clCreateSampler(context_, CL_TRUE, 0x7777, CL_FILTER_NEAREST, &err), nullptr);
  EXPECT_EQ(err, CL_INVALID_VALUE);
  EXPECT_EQ(clCreateSampler(context_, CL_TRUE, CL_ADDRESS_CLAMP, 0x7777, &err), nullptr);
  EXPECT_EQ(err, CL_INVALID_VALUE);
  const cl_sampler_properties bad[] = {CL_SAMPLER_ADDRESSING_MODE, 0x7777, 0};
  EXPECT_EQ(clCreateSamplerWithProperties(context_, bad, &err), nullptr);
  EXPECT_EQ(err, CL_INVALID_VALUE);

  const char* src = "__kernel void k(read_only image2d_t i, sampler_t s, __global float4* o) {"
                    "  o[0] = read_imagef(i, s, (int2)(0, 0)); }";
  cl_program program = clCreateProgramWithSource(context_, 1, &src, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  ASSERT_EQ(clBuildProgram(program, 1, &device_, "", nullptr, nullptr), CL_SUCCESS);
  cl_kernel kernel = clCreateKernel(program, "k", &err);
  ASSERT_EQ(err, CL_SUCCESS);
  cl_sampler no_sampler = nullptr;
  EXPECT_EQ(clSetKernelArg(kernel, 0, sizeof buffer_, &buffer_), CL_INVALID_MEM_OBJECT);
  EXPECT_EQ(clSetKernelArg(kernel, 1, sizeof no_sampler, &no_sampler), CL_INVALID_SAMPLER);
  EXPECT_EQ(clSetKernelArg(kernel, 1, sizeof buffer_, &buffer_), CL_INVALID_SAMPLER);
  // Used properly, the kernel reads the first pixel.
  cl_sampler unnormalized = clCreateSampler(context_, CL_FALSE, CL_ADDRESS_CLAMP_TO_EDGE, CL_FILTER_NEAREST, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  ASSERT_EQ(clSetKernelArg(kernel, 0, sizeof image, &image), CL_SUCCESS);
  ASSERT_EQ(clSetKernelArg(kernel, 1, sizeof unnormalized, &unnormalized), CL_SUCCESS);
  ASSERT_EQ(clSetKernelArg(kernel, 2, sizeof buffer_, &buffer_), CL_SUCCESS);
  const size_t one = 1;
  ASSERT_EQ(clEnqueueNDRangeKernel(queue_, kernel, 1, nullptr, &one, &one, 0, nullptr, nullptr), CL_SUCCESS);
  float first[4] = {};
  ASSERT_EQ(clEnqueueReadBuffer(queue_, buffer_, CL_TRUE, 0, sizeof first, first, 0, nullptr, nullptr), CL_SUCCESS);
  for (int c = 0; c < 4; ++c) EXPECT_FLOAT_EQ(first[c], pixels[c] / 255.0f) << "channel " << c;

  clReleaseKernel(kernel);
  clReleaseProgram(program);
  clReleaseSampler(unnormalized);
  clReleaseSampler(sampler);
  clReleaseMemObject(image);
}

// The partition as one device, with a context and an in-order queue on it.
class Partition : public ::testing::Test {
 protected:
  void SetUp() override {
    cl_int err;
    ASSERT_EQ(clGetPlatformIDs(1, &platform, nullptr), CL_SUCCESS);
    ASSERT_EQ(clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 1, &device, nullptr), CL_SUCCESS);
    context = clCreateContext(nullptr, 1, &device, nullptr, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS);
    queue = clCreateCommandQueueWithProperties(context, device, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS);
  }
  void TearDown() override {
    if (queue) clReleaseCommandQueue(queue);
    if (context) clReleaseContext(context);
  }
  cl_platform_id platform = nullptr;
  cl_device_id device = nullptr;
  cl_context context = nullptr;
  cl_command_queue queue = nullptr;
};

TEST_F(Partition, TheDeviceIsThePartition) {
  cl_ulong global = 0, max_alloc = 0;
  ASSERT_EQ(clGetDeviceInfo(device, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof global, &global, nullptr), CL_SUCCESS);
  ASSERT_EQ(clGetDeviceInfo(device, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof max_alloc, &max_alloc, nullptr), CL_SUCCESS);
  EXPECT_EQ(global, expected_max_vram());
  EXPECT_LE(max_alloc, global);
  char vendor[256] = {};
  ASSERT_EQ(clGetDeviceInfo(device, CL_DEVICE_VENDOR, sizeof vendor, vendor, nullptr), CL_SUCCESS);
  EXPECT_EQ(std::strncmp(vendor, "gpup (", 6), 0) << vendor;
  char platform_name[64] = {};
  ASSERT_EQ(clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof platform_name, platform_name, nullptr), CL_SUCCESS);
  EXPECT_STREQ(platform_name, "gpup");
}

TEST_F(Partition, MemoryBeyondTheBudgetFailsLikeADeviceOutOfMemory) {
  cl_int err;
  const size_t chunk = (expected_max_vram() * 2 / 5) & ~size_t{0xfffff};  // 100 MiB of 256
  cl_mem a = clCreateBuffer(context, CL_MEM_READ_WRITE, chunk, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  cl_mem b = clCreateBuffer(context, CL_MEM_READ_WRITE, chunk, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  const int pattern = 0x5a5a5a5a;
  ASSERT_EQ(clEnqueueFillBuffer(queue, a, &pattern, sizeof pattern, 0, chunk, 0, nullptr, nullptr), CL_SUCCESS);
  // 120% of the partition.
  cl_mem c = clCreateBuffer(context, CL_MEM_READ_WRITE, chunk, nullptr, &err);
  EXPECT_EQ(c, nullptr);
  EXPECT_EQ(err, CL_MEM_OBJECT_ALLOCATION_FAILURE);
  // Larger than the device allows at all.
  cl_ulong max_alloc = 0;
  clGetDeviceInfo(device, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof max_alloc, &max_alloc, nullptr);
  EXPECT_EQ(clCreateBuffer(context, CL_MEM_READ_WRITE, max_alloc + 1, nullptr, &err), nullptr);
  EXPECT_EQ(err, CL_INVALID_BUFFER_SIZE);
  // What was there is intact, and freed memory can be used again.
  int back[4] = {};
  ASSERT_EQ(clEnqueueReadBuffer(queue, a, CL_TRUE, chunk - sizeof back, sizeof back, back, 0, nullptr, nullptr),
            CL_SUCCESS);
  for (int v : back) EXPECT_EQ(v, pattern);
  ASSERT_EQ(clReleaseMemObject(b), CL_SUCCESS);
  c = clCreateBuffer(context, CL_MEM_READ_WRITE, chunk, nullptr, &err);
  EXPECT_EQ(err, CL_SUCCESS);
  if (c) clReleaseMemObject(c);
  clReleaseMemObject(a);
}

// Pooled allocations are the partition's memory until it is needed: a buffer that only fits
// without them gets it, in any context of the process, and a released context gives its pool back.
TEST_F(Partition, PooledBuffersGiveTheirMemoryBackWhenItRunsShort) {
  cl_int err;
  const GPUPKMT_QUERYSTATISTICS start = partition_stats();
  const size_t small = 4u << 20;
  std::vector<cl_mem> smalls;
  for (int i = 0; i < 4; ++i) {
    smalls.push_back(clCreateBuffer(context, CL_MEM_READ_WRITE, small, nullptr, &err));
    ASSERT_EQ(err, CL_SUCCESS);
  }
  for (cl_mem m : smalls) clReleaseMemObject(m);
  const uint64_t pooled = partition_stats().VramUsed - start.VramUsed;
  EXPECT_EQ(pooled, 4 * small) << "released buffers stay allocated, for reuse";

  // Everything else the partition has, in buffers of another size, from another context.
  cl_context other = clCreateContext(nullptr, 1, &device, nullptr, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  cl_ulong max_alloc = 0;
  ASSERT_EQ(clGetDeviceInfo(device, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof max_alloc, &max_alloc, nullptr), CL_SUCCESS);
  const uint64_t avail = start.VramMax - start.VramUsed;
  const uint64_t most = std::min<uint64_t>(max_alloc, 64ull << 20);
  const uint64_t count = (avail + most - 1) / most;
  const uint64_t chunk = avail / count & ~uint64_t{4095};
  ASSERT_NE(chunk, small);
  std::vector<cl_mem> held;
  uint64_t got = 0;
  for (uint64_t i = 0; i < count; ++i) {
    cl_mem m = clCreateBuffer(other, CL_MEM_READ_WRITE, chunk, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS) << "with " << got << " bytes held and " << pooled << " pooled";
    held.push_back(m);
    got += chunk;
  }
  EXPECT_GT(got + pooled, avail) << "the test must need the pooled bytes";
  for (cl_mem m : held) clReleaseMemObject(m);

  // The other context's pool now holds some of its chunks, within the pool's share (1/8 of the
  // partition), and gives them back when the context goes.
  const uint64_t kept = partition_stats().VramUsed - start.VramUsed;
  EXPECT_LE(kept, start.VramMax / 8);
  ASSERT_EQ(clReleaseContext(other), CL_SUCCESS);
  EXPECT_EQ(partition_stats().VramUsed, start.VramUsed);
}

// Each guest allocates up to its partition's max and not one allocation past it; what it frees
// comes back to the partition.
TEST_F(Partition, AllocatesExactlyUpToItsMaxAndGetsReleasedMemoryBack) {
  cl_int err;
  cl_ulong max_alloc = 0;
  ASSERT_EQ(clGetDeviceInfo(device, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof max_alloc, &max_alloc, nullptr), CL_SUCCESS);

  const GPUPKMT_QUERYSTATISTICS start = partition_stats();
  ASSERT_EQ(start.VramMax, expected_max_vram());
  std::vector<cl_mem> held;
  const uint64_t chunk = std::min<uint64_t>(max_alloc, 64ull << 20);
  for (;;) {
    const uint64_t used = partition_stats().VramUsed;
    ASSERT_LE(used, start.VramMax);
    if (used == start.VramMax) break;
    const uint64_t size = std::min(chunk, start.VramMax - used);
    cl_mem m = clCreateBuffer(context, CL_MEM_READ_WRITE, size, nullptr, &err);
    ASSERT_EQ(err, CL_SUCCESS) << "at " << used << " of " << start.VramMax << " bytes, asking " << size;
    held.push_back(m);
  }
  EXPECT_EQ(partition_stats().VramUsed, start.VramMax);
  // Full: the smallest allocation fails as on a device out of memory, for buffers and images.
  EXPECT_EQ(clCreateBuffer(context, CL_MEM_READ_WRITE, 1, nullptr, &err), nullptr);
  EXPECT_EQ(err, CL_MEM_OBJECT_ALLOCATION_FAILURE);
  const cl_image_format r32f{CL_R, CL_FLOAT};
  EXPECT_EQ(clCreateImage2D(context, CL_MEM_READ_WRITE, &r32f, 4, 4, 0, nullptr, &err), nullptr);
  EXPECT_EQ(err, CL_MEM_OBJECT_ALLOCATION_FAILURE);
  // The last byte of the partition is real memory.
  const int pattern = 0x13572468;
  cl_mem last = held.back();
  size_t last_size = 0;
  clGetMemObjectInfo(last, CL_MEM_SIZE, sizeof last_size, &last_size, nullptr);
  ASSERT_EQ(clEnqueueFillBuffer(queue, last, &pattern, sizeof pattern, 0, last_size & ~size_t{3}, 0, nullptr, nullptr),
            CL_SUCCESS);
  int back = 0;
  ASSERT_EQ(clEnqueueReadBuffer(queue, last, CL_TRUE, (last_size & ~size_t{3}) - sizeof back, sizeof back, &back, 0,
                                nullptr, nullptr),
            CL_SUCCESS);
  EXPECT_EQ(back, pattern);

  for (cl_mem m : held) clReleaseMemObject(m);
  // Released buffers stay in the context's pool, within its share of the partition ...
  EXPECT_LE(partition_stats().VramUsed - start.VramUsed, start.VramMax / 8);
  cl_mem again = clCreateBuffer(context, CL_MEM_READ_WRITE, chunk, nullptr, &err);
  EXPECT_EQ(err, CL_SUCCESS);
  if (again) clReleaseMemObject(again);
  // ... and all of it is the partition's again when the context goes.
  clReleaseCommandQueue(queue);
  queue = nullptr;
  clReleaseContext(context);
  context = nullptr;
  EXPECT_EQ(partition_stats().VramUsed, start.VramUsed);
}

}  // namespace
