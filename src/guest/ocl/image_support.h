// Byte rectangles (rect reads, writes and copies of buffers and images) and the image helpers
// shared by image.cpp and queue.cpp.
#pragma once

#include "guest/ocl/icd.h"

namespace gpup::ocl {

// A box of bytes: origin and region in bytes (x) and rows / slices (y, z), with pitches.
struct Rect {
  size_t origin[3], region[3], row_pitch, slice_pitch;
  size_t offset() const { return origin[2] * slice_pitch + origin[1] * row_pitch + origin[0]; }
  size_t end = 0;  // the last byte touched plus one
};

// A rectangle from OpenCL's arguments; CL_INVALID_VALUE for empty regions, short pitches or
// arithmetic that would overflow.
cl_int make_rect(const size_t* origin, const size_t* region, size_t row_pitch, size_t slice_pitch, Rect* r);

// Calls fn(offset in a, offset in b, bytes) for every row of two rectangles with the same row
// length and number of rows, taken in order (the shapes may differ: the rows of a 1D image array
// are its layers, those of a 2D image its lines).
template <typename Fn>
void for_each_row(const Rect& a, const Rect& b, Fn&& fn) {
  const size_t rows = a.region[1] * a.region[2];
  const size_t a0 = a.offset(), b0 = b.offset();
  for (size_t i = 0; i < rows; ++i) {
    const size_t ay = i % a.region[1], az = i / a.region[1];
    const size_t by = i % b.region[1], bz = i / b.region[1];
    fn(a0 + az * a.slice_pitch + ay * a.row_pitch, b0 + bz * b.slice_pitch + by * b.row_pitch, a.region[0]);
  }
}

// True when the rectangle's rows follow each other without gaps.
inline bool contiguous(const Rect& r) {
  return r.row_pitch == r.region[0] && (r.region[2] == 1 || r.slice_pitch == r.region[0] * r.region[1]);
}

// Which coordinates an image type uses beyond x: rows (a height), array layers, and so a slice
// pitch (3D images and arrays; a 1D array's slice is one row).
inline bool image_has_height(cl_mem_object_type t) {
  return t == CL_MEM_OBJECT_IMAGE2D || t == CL_MEM_OBJECT_IMAGE3D || t == CL_MEM_OBJECT_IMAGE2D_ARRAY;
}
inline bool image_is_array(cl_mem_object_type t) {
  return t == CL_MEM_OBJECT_IMAGE1D_ARRAY || t == CL_MEM_OBJECT_IMAGE2D_ARRAY;
}
inline bool image_has_slices(cl_mem_object_type t) { return t == CL_MEM_OBJECT_IMAGE3D || image_is_array(t); }

// Images (image.cpp).
size_t element_size(const cl_image_format& f);  // 0: not a valid format
cl_int check_image_region(cl_mem image, const size_t* origin, const size_t* region);
Rect image_rect(cl_mem image, const size_t* origin, const size_t* region);  // after check_image_region
Rect host_rect(cl_mem image, const size_t* region, size_t row_pitch, size_t slice_pitch);
bool pack_pixel(const cl_image_format& f, const void* color, uint8_t* out);
bool format_supported(cl_device_id d, cl_mem_object_type type, cl_mem_flags flags, const cl_image_format& f);
void sampler_release(cl_sampler s);

}  // namespace gpup::ocl
