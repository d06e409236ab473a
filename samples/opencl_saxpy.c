/* opencl_saxpy: an ordinary OpenCL program. Nothing in it knows about gpup: it links the system's
 * ICD loader (libOpenCL), takes the first platform and device, and computes y = a*x + y.
 *
 * Natively it runs on whatever OpenCL platform the machine has; in a partition it runs on the
 * partition, unchanged:  gpup run --vm NAME -- build/bin/gpup-sample-opencl-saxpy [N] */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                         \
  do {                                                                      \
    cl_int err_ = (call);                                                   \
    if (err_ != CL_SUCCESS) {                                               \
      fprintf(stderr, "opencl_saxpy: %s failed: %d\n", #call, (int)err_);   \
      return 1;                                                             \
    }                                                                       \
  } while (0)

static const char* kSource =
    "__kernel void saxpy(float a, __global const float* x, __global float* y) {\n"
    "  size_t i = get_global_id(0);\n"
    "  y[i] = a * x[i] + y[i];\n"
    "}\n";

int main(int argc, char** argv) {
  const size_t n = argc > 1 ? strtoul(argv[1], NULL, 0) : (1u << 20);
  cl_platform_id platform;
  cl_device_id device;
  cl_int err;
  char platform_name[128], device_name[256];
  cl_ulong global_mem;
  CHECK(clGetPlatformIDs(1, &platform, NULL));
  CHECK(clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 1, &device, NULL));
  CHECK(clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof platform_name, platform_name, NULL));
  CHECK(clGetDeviceInfo(device, CL_DEVICE_NAME, sizeof device_name, device_name, NULL));
  CHECK(clGetDeviceInfo(device, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof global_mem, &global_mem, NULL));
  printf("platform: %s; device: %s (%llu MiB)\n", platform_name, device_name,
         (unsigned long long)(global_mem >> 20));

  cl_context context = clCreateContext(NULL, 1, &device, NULL, NULL, &err);
  CHECK(err);
  cl_command_queue queue = clCreateCommandQueue(context, device, 0, &err);
  CHECK(err);
  cl_program program = clCreateProgramWithSource(context, 1, &kSource, NULL, &err);
  CHECK(err);
  CHECK(clBuildProgram(program, 1, &device, "", NULL, NULL));
  cl_kernel kernel = clCreateKernel(program, "saxpy", &err);
  CHECK(err);

  float* x = malloc(n * sizeof *x);
  float* y = malloc(n * sizeof *y);
  for (size_t i = 0; i < n; ++i) {
    x[i] = (float)(i % 1000);
    y[i] = 1.0f;
  }
  cl_mem bx = clCreateBuffer(context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, n * sizeof *x, x, &err);
  CHECK(err);
  cl_mem by = clCreateBuffer(context, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, n * sizeof *y, y, &err);
  CHECK(err);
  const float a = 2.0f;
  CHECK(clSetKernelArg(kernel, 0, sizeof a, &a));
  CHECK(clSetKernelArg(kernel, 1, sizeof bx, &bx));
  CHECK(clSetKernelArg(kernel, 2, sizeof by, &by));
  for (int round = 0; round < 10; ++round) CHECK(clEnqueueNDRangeKernel(queue, kernel, 1, NULL, &n, NULL, 0, NULL, NULL));
  CHECK(clEnqueueReadBuffer(queue, by, CL_TRUE, 0, n * sizeof *y, y, 0, NULL, NULL));

  size_t wrong = 0;
  for (size_t i = 0; i < n; ++i)
    if (y[i] != 1.0f + 10.0f * a * (float)(i % 1000)) ++wrong;
  printf("y = %.0f*x + y, ten times over %zu elements: %zu wrong\n", a, n, wrong);

  clReleaseMemObject(bx);
  clReleaseMemObject(by);
  clReleaseKernel(kernel);
  clReleaseProgram(program);
  clReleaseCommandQueue(queue);
  clReleaseContext(context);
  free(x);
  free(y);
  return wrong == 0 ? 0 : 1;
}
