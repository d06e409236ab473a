// The ICD as a guest sees it, in a partition of 256 MiB (ctest icd_guest runs it with
// `differential.sh guest`):
//  - the crossing budget (docs/OPENCL.md), measured: this program and the ICD share the one
//    libgpupkmt of the process, so GpupKmtGetChannelStats counts the ICD's messages and round
//    trips for each group of calls;
//  - the device is the partition: its memory is the budget, and going past it fails like a
//    device out of memory, without disturbing what is already allocated.
#include <cstdio>
#include <cstring>
#include <vector>

#include <gtest/gtest.h>

#define CL_TARGET_OPENCL_VERSION 300
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

TEST(Partition, TheDeviceIsThePartition) {
  cl_platform_id platform;
  cl_device_id device;
  ASSERT_EQ(clGetPlatformIDs(1, &platform, nullptr), CL_SUCCESS);
  ASSERT_EQ(clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 1, &device, nullptr), CL_SUCCESS);
  cl_ulong global = 0, max_alloc = 0;
  ASSERT_EQ(clGetDeviceInfo(device, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof global, &global, nullptr), CL_SUCCESS);
  ASSERT_EQ(clGetDeviceInfo(device, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof max_alloc, &max_alloc, nullptr), CL_SUCCESS);
  EXPECT_EQ(global, 256ull << 20);
  EXPECT_LE(max_alloc, global);
  char vendor[256] = {};
  ASSERT_EQ(clGetDeviceInfo(device, CL_DEVICE_VENDOR, sizeof vendor, vendor, nullptr), CL_SUCCESS);
  EXPECT_EQ(std::strncmp(vendor, "gpup (", 6), 0) << vendor;
  char platform_name[64] = {};
  ASSERT_EQ(clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof platform_name, platform_name, nullptr), CL_SUCCESS);
  EXPECT_STREQ(platform_name, "gpup");
}

TEST(Partition, MemoryBeyondTheBudgetFailsLikeADeviceOutOfMemory) {
  cl_platform_id platform;
  cl_device_id device;
  cl_int err;
  ASSERT_EQ(clGetPlatformIDs(1, &platform, nullptr), CL_SUCCESS);
  ASSERT_EQ(clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 1, &device, nullptr), CL_SUCCESS);
  cl_context context = clCreateContext(nullptr, 1, &device, nullptr, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  cl_command_queue queue = clCreateCommandQueueWithProperties(context, device, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  const size_t chunk = 100u << 20;
  cl_mem a = clCreateBuffer(context, CL_MEM_READ_WRITE, chunk, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  cl_mem b = clCreateBuffer(context, CL_MEM_READ_WRITE, chunk, nullptr, &err);
  ASSERT_EQ(err, CL_SUCCESS);
  const int pattern = 0x5a5a5a5a;
  ASSERT_EQ(clEnqueueFillBuffer(queue, a, &pattern, sizeof pattern, 0, chunk, 0, nullptr, nullptr), CL_SUCCESS);
  // 300 MiB in a 256 MiB partition.
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
  clReleaseCommandQueue(queue);
  clReleaseContext(context);
}

}  // namespace
