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

// Calls fn(offset in a, offset in b, bytes) for every row of two rectangles of the same region.
template <typename Fn>
void for_each_row(const Rect& a, const Rect& b, Fn&& fn) {
  for (size_t z = 0; z < a.region[2]; ++z)
    for (size_t y = 0; y < a.region[1]; ++y)
      fn(a.offset() + z * a.slice_pitch + y * a.row_pitch, b.offset() + z * b.slice_pitch + y * b.row_pitch,
         a.region[0]);
}

// Images (image.cpp).
size_t element_size(const cl_image_format& f);  // 0: not a valid format
cl_int check_image_region(cl_mem image, const size_t* origin, const size_t* region);
Rect image_rect(cl_mem image, const size_t* origin, const size_t* region);  // after check_image_region
Rect host_rect(cl_mem image, const size_t* region, size_t row_pitch, size_t slice_pitch);
bool pack_pixel(const cl_image_format& f, const void* color, uint8_t* out);
bool format_supported(cl_device_id d, cl_mem_object_type type, cl_mem_flags flags, const cl_image_format& f);
void sampler_release(cl_sampler s);

}  // namespace gpup::ocl
