// An unmodified OpenCL program for the device-time and fault-isolation tests (e2e_test.cpp,
// VidSch suite): it only uses the OpenCL API, so it runs natively or as a gpup guest alike.
//
//   cl_sched_guest spin SECONDS   kernels of a few ms back to back for SECONDS (a clFinish every
//                                 few), then checks every result; prints "WARM" once the first
//                                 kernel is done and "SPIN kernels=N ok" at the end
//   cl_sched_guest hang           one kernel that never ends; prints "HANG started", then the
//                                 error clFinish returns and how long it took ("HANG err=E ms=T")
//   cl_sched_guest crash          one kernel that writes to an address no buffer has (the device
//                                 process faults); prints "CRASH err=E ms=T"
//   cl_sched_guest check          a small kernel whose results are checked; prints "CHECK ok"
// Exit 0 when the outcome is the expected one (success; for hang and crash: an error in bounded
// time), 1 otherwise, 2 for a usage or setup error.
#define CL_TARGET_OPENCL_VERSION 300
#include <CL/cl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

const char* kSource = R"CLC(
__kernel void spin(__global uint* out, uint iters) {
  uint x = (uint)get_global_id(0);
  for (uint k = 0; k < iters; ++k) x = x * 1664525u + 1013904223u;
  out[get_global_id(0)] = x;
}
__kernel void hang(__global volatile uint* flag) {
  while (flag[0] == 0u) { }
}
__kernel void crash(__global uint* p) {
  __global volatile uint* wild = (__global volatile uint*)(ulong)64;
  wild[get_global_id(0)] = p[0];
}
)CLC";

constexpr size_t kItems = 4096;
constexpr cl_uint kIters = 1500;

uint32_t expected(uint32_t i) {
  uint32_t x = i;
  for (cl_uint k = 0; k < kIters; ++k) x = x * 1664525u + 1013904223u;
  return x;
}

struct Cl {
  cl_context ctx = nullptr;
  cl_command_queue q = nullptr;
  cl_program prog = nullptr;
};

bool setup(Cl& cl) {
  cl_platform_id platform;
  cl_uint n = 0;
  if (clGetPlatformIDs(1, &platform, &n) != CL_SUCCESS || n == 0) return false;
  cl_device_id dev;
  if (clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 1, &dev, nullptr) != CL_SUCCESS) return false;
  cl_int err;
  cl.ctx = clCreateContext(nullptr, 1, &dev, nullptr, nullptr, &err);
  if (err != CL_SUCCESS) return false;
  cl.q = clCreateCommandQueueWithProperties(cl.ctx, dev, nullptr, &err);
  if (err != CL_SUCCESS) return false;
  cl.prog = clCreateProgramWithSource(cl.ctx, 1, &kSource, nullptr, &err);
  if (err != CL_SUCCESS) return false;
  if (clBuildProgram(cl.prog, 1, &dev, "", nullptr, nullptr) != CL_SUCCESS) {
    std::fprintf(stderr, "build failed\n");
    return false;
  }
  return true;
}

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

// The spin kernel with its output buffer bound; false when they cannot be made.
bool spin_kernel(Cl& cl, cl_kernel& k, cl_mem& out) {
  cl_int err;
  k = clCreateKernel(cl.prog, "spin", &err);
  if (err != CL_SUCCESS) return false;
  out = clCreateBuffer(cl.ctx, CL_MEM_READ_WRITE, kItems * 4, nullptr, &err);
  if (err != CL_SUCCESS) return false;
  const cl_uint iters = kIters;
  return clSetKernelArg(k, 0, sizeof out, &out) == CL_SUCCESS && clSetKernelArg(k, 1, sizeof iters, &iters) == CL_SUCCESS;
}

size_t count_wrong(const std::vector<uint32_t>& host) {
  size_t wrong = 0;
  for (size_t i = 0; i < host.size(); ++i) wrong += host[i] != expected(static_cast<uint32_t>(i));
  return wrong;
}

int spin(Cl& cl, double seconds) {
  cl_int err;
  cl_kernel k;
  cl_mem out;
  if (!spin_kernel(cl, k, out)) return 2;
  const size_t global = kItems;
  const auto start = std::chrono::steady_clock::now();
  long kernels = 0;
  bool warm = false;
  while (ms_since(start) < seconds * 1000) {
    for (int i = 0; i < 4; ++i) {
      if ((err = clEnqueueNDRangeKernel(cl.q, k, 1, nullptr, &global, nullptr, 0, nullptr, nullptr)) != CL_SUCCESS) {
        std::printf("SPIN enqueue err=%d\n", err);
        return 1;
      }
      ++kernels;
    }
    if ((err = clFinish(cl.q)) != CL_SUCCESS) {
      std::printf("SPIN finish err=%d\n", err);
      return 1;
    }
    if (!warm) {
      warm = true;
      std::printf("WARM\n");
      std::fflush(stdout);
    }
  }
  std::vector<uint32_t> host(kItems);
  if ((err = clEnqueueReadBuffer(cl.q, out, CL_TRUE, 0, kItems * 4, host.data(), 0, nullptr, nullptr)) != CL_SUCCESS) {
    std::printf("SPIN read err=%d\n", err);
    return 1;
  }
  const size_t wrong = count_wrong(host);
  std::printf("SPIN kernels=%ld wrong=%zu %s\n", kernels, wrong, wrong ? "BAD" : "ok");
  clReleaseMemObject(out);
  clReleaseKernel(k);
  return wrong ? 1 : 0;
}

// One kernel that does not come back (hang) or faults (crash); the error and the time it took.
int fault(Cl& cl, const char* kernel, const char* tag) {
  cl_int err;
  cl_kernel k = clCreateKernel(cl.prog, kernel, &err);
  cl_mem buf = clCreateBuffer(cl.ctx, CL_MEM_READ_WRITE, 4096, nullptr, &err);
  if (err != CL_SUCCESS) return 2;
  const cl_uint zero = 0;
  clEnqueueFillBuffer(cl.q, buf, &zero, sizeof zero, 0, 4096, 0, nullptr, nullptr);
  clFinish(cl.q);
  clSetKernelArg(k, 0, sizeof buf, &buf);
  const size_t global = 1;
  const auto start = std::chrono::steady_clock::now();
  err = clEnqueueNDRangeKernel(cl.q, k, 1, nullptr, &global, nullptr, 0, nullptr, nullptr);
  std::printf("%s started\n", tag);
  std::fflush(stdout);
  if (err == CL_SUCCESS) err = clFinish(cl.q);
  std::printf("%s err=%d ms=%.0f\n", tag, err, ms_since(start));
  // Later calls must fail too, promptly, not hang.
  const auto later = std::chrono::steady_clock::now();
  cl_int again = clEnqueueFillBuffer(cl.q, buf, &zero, sizeof zero, 0, 4096, 0, nullptr, nullptr);
  if (again == CL_SUCCESS) again = clFinish(cl.q);
  std::printf("%s later err=%d ms=%.0f\n", tag, again, ms_since(later));
  return err != CL_SUCCESS && again != CL_SUCCESS ? 0 : 1;
}

int check(Cl& cl) {
  cl_kernel k;
  cl_mem out;
  if (!spin_kernel(cl, k, out)) return 2;
  const size_t global = kItems;
  std::vector<uint32_t> host(kItems);
  cl_int err = clEnqueueNDRangeKernel(cl.q, k, 1, nullptr, &global, nullptr, 0, nullptr, nullptr);
  if (err == CL_SUCCESS) err = clEnqueueReadBuffer(cl.q, out, CL_TRUE, 0, kItems * 4, host.data(), 0, nullptr, nullptr);
  if (err != CL_SUCCESS) {
    std::printf("CHECK err=%d\n", err);
    return 1;
  }
  const size_t wrong = count_wrong(host);
  std::printf("CHECK %s wrong=%zu\n", wrong ? "BAD" : "ok", wrong);
  return wrong ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s spin SECONDS | hang | crash | check\n", argv[0]);
    return 2;
  }
  std::printf("PID %d\n", static_cast<int>(getpid()));
  std::fflush(stdout);
  Cl cl;
  if (!setup(cl)) {
    std::printf("SETUP failed\n");
    return 2;
  }
  const std::string mode = argv[1];
  if (mode == "spin" && argc == 3) return spin(cl, std::atof(argv[2]));
  if (mode == "hang") return fault(cl, "hang", "HANG");
  if (mode == "crash") return fault(cl, "crash", "CRASH");
  if (mode == "check") return check(cl);
  std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}
