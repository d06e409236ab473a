// The kernels the mock KMD can "run", and the same kernels in OpenCL C for real devices.
//
// A mock program is built from GPUP_OCL_PROGRAM_DESC private data like a real one. Its content
// (source, or a "binary" read as text) is scanned for kernel declarations
// "[__]kernel void NAME("; the build succeeds when there is at least one and every NAME is in
// the table below, and fails with BUILD_FAILED and a log otherwise. At dispatch the name is
// looked up in the program (NOT_FOUND if absent), the arguments are checked against the
// signature (count, kind and exact value size: INVALID_PARAMETER), and the kernel runs on the
// context's worker thread in host memory, one work item at a time over the whole ND range.
// Indexing uses get_global_id(0) only, as in the OpenCL versions below. A buffer index outside
// the argument's range is a device fault: the submission completes with DEVICE_ERROR.
//
//   add_i32(__global int* b, int v)                      b[gid] += v
//   copy_i32(__global const int* src, __global int* dst) dst[gid] = src[gid]
//   or_null_i32(__global int* dst, __global const int* src, __local int* scratch)
//                                                        dst[gid] = src ? src[gid] : -1
//                                                        (src may be a NULL buffer; scratch is
//                                                        any non-zero local size)
//   spin(__global ulong* out, ulong iterations)          x = gid; repeat iterations times
//                                                        x = x * 6364136223846793005 +
//                                                        1442695040888963407; out[gid] = x.
//                                                        Checks for an engine reset as it goes.
//   fault(__global int* b)                               mock only: always a device fault
//
// Image kernels (DDI 1.1), over a 2D CL_R / CL_UNSIGNED_INT32 image of width w, one work item
// per pixel in row order (gid = y * w + x):
//   image_read_u32(read_only image2d_t img, sampler_t s, __global uint* out)
//                                                        out[gid] = read_imageui(img, s, (x, y)).x
//                                                        (the mock takes only unnormalized,
//                                                        nearest samplers)
//   image_write_u32(write_only image2d_t img, __global const uint* in, uint add)
//                                                        pixel (x, y) = in[gid] + add
//   A pixel outside the image is a device fault on the mock.
#pragma once

namespace gpup::kmd::mock {

// OpenCL C for the portable kernels above (all but fault), for tests that run the same program
// on the mock and on a real device.
inline constexpr const char* kPortableKernelsSource = R"CLC(
__kernel void add_i32(__global int* b, int v) { b[get_global_id(0)] += v; }
__kernel void copy_i32(__global const int* src, __global int* dst) {
  dst[get_global_id(0)] = src[get_global_id(0)];
}
__kernel void or_null_i32(__global int* dst, __global const int* src, __local int* scratch) {
  size_t l = get_local_id(0);
  scratch[l] = src ? src[get_global_id(0)] : -1;
  barrier(CLK_LOCAL_MEM_FENCE);
  dst[get_global_id(0)] = scratch[l];
}
__kernel void spin(__global ulong* out, ulong iterations) {
  ulong x = get_global_id(0);
  for (ulong i = 0; i < iterations; ++i) x = x * 6364136223846793005UL + 1442695040888963407UL;
  out[get_global_id(0)] = x;
}
)CLC";

// OpenCL C for the image kernels above, built separately (devices without images cannot).
inline constexpr const char* kPortableImageKernelsSource = R"CLC(
__kernel void image_read_u32(read_only image2d_t img, sampler_t s, __global uint* out) {
  int i = get_global_id(0);
  int w = get_image_width(img);
  out[i] = read_imageui(img, s, (int2)(i % w, i / w)).x;
}
__kernel void image_write_u32(write_only image2d_t img, __global const uint* in, uint add) {
  int i = get_global_id(0);
  int w = get_image_width(img);
  write_imageui(img, (int2)(i % w, i / w), (uint4)(in[i] + add, 0, 0, 1));
}
)CLC";

// spin's result for one work item, computed on the host.
inline unsigned long long spin_reference(unsigned long long gid, unsigned long long iterations) {
  unsigned long long x = gid;
  for (unsigned long long i = 0; i < iterations; ++i) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
  return x;
}

}  // namespace gpup::kmd::mock
