// Images and samplers.
//
// An image is an image allocation (DDI 1.1): a CPU-visible allocation whose bytes hold the
// pixels in a linear layout that the host device's image object and the guest share (see
// GPUP_OCL_IMAGE_DESC). So reads, writes, maps and fills are memcpy on the shared section, exactly
// like buffers, and copies between images and buffers are device copies of rows. Only kernels see
// an image object: the dispatch names the allocation and the KMD binds its image. A sampler is a
// guest object whose three properties travel with each dispatch.
#include <algorithm>
#include <cmath>

#include "guest/ocl/image_support.h"

_cl_sampler::_cl_sampler() : IcdObject(gpup::ocl::Magic::kSampler) {}

namespace gpup::ocl {

namespace {

int channel_count(cl_channel_order order) {
  switch (order) {
    case CL_R: case CL_A: case CL_INTENSITY: case CL_LUMINANCE: case CL_DEPTH: case CL_Rx: return 1;
    case CL_RG: case CL_RA: case CL_RGx: return 2;
    case CL_RGB: case CL_RGBx: case CL_sRGB: case CL_sRGBx: return 3;
    case CL_RGBA: case CL_BGRA: case CL_ARGB: case CL_ABGR: case CL_sRGBA: case CL_sBGRA: return 4;
    default: return 0;
  }
}

}  // namespace

size_t element_size(const cl_image_format& f) {
  switch (f.image_channel_data_type) {
    case CL_UNORM_SHORT_565: case CL_UNORM_SHORT_555: return 2;
    case CL_UNORM_INT_101010: case CL_UNORM_INT_101010_2: return 4;
    default: break;
  }
  const int n = channel_count(f.image_channel_order);
  switch (f.image_channel_data_type) {
    case CL_SNORM_INT8: case CL_UNORM_INT8: case CL_SIGNED_INT8: case CL_UNSIGNED_INT8: return size_t(n);
    case CL_SNORM_INT16: case CL_UNORM_INT16: case CL_SIGNED_INT16: case CL_UNSIGNED_INT16: case CL_HALF_FLOAT:
      return size_t(n) * 2;
    case CL_SIGNED_INT32: case CL_UNSIGNED_INT32: case CL_FLOAT: return size_t(n) * 4;
    default: return 0;
  }
}

// OpenCL image coordinates (x, y or array index, z or array index) as a byte rectangle of the
// image's layout. 1D arrays keep their array index in origin[1]; it becomes the slice here.
Rect image_rect(cl_mem m, const size_t* origin, const size_t* region) {
  Rect r{};
  const size_t e = m->element_size;
  size_t o[3] = {origin[0], origin[1], origin[2]};
  size_t g[3] = {region[0], region[1], region[2]};
  if (m->type == CL_MEM_OBJECT_IMAGE1D_ARRAY) {
    o[2] = o[1];
    g[2] = g[1];
    o[1] = 0;
    g[1] = 1;
  }
  r.origin[0] = o[0] * e;
  r.origin[1] = o[1];
  r.origin[2] = o[2];
  r.region[0] = g[0] * e;
  r.region[1] = g[1];
  r.region[2] = g[2];
  r.row_pitch = m->desc.image_row_pitch;
  r.slice_pitch = m->type == CL_MEM_OBJECT_IMAGE1D_ARRAY ? m->desc.image_row_pitch : m->desc.image_slice_pitch;
  if (r.slice_pitch == 0) r.slice_pitch = r.row_pitch * std::max<size_t>(1, m->desc.image_height);
  r.end = r.offset() + (r.region[2] - 1) * r.slice_pitch + (r.region[1] - 1) * r.row_pitch + r.region[0];
  return r;
}

// The host side of a read, write or map: the same region packed with the given pitches (0: tight).
Rect host_rect(cl_mem m, const size_t* region, size_t row_pitch, size_t slice_pitch) {
  Rect r{};
  const size_t e = m->element_size;
  const bool array1d = m->type == CL_MEM_OBJECT_IMAGE1D_ARRAY;
  r.region[0] = region[0] * e;
  r.region[1] = array1d ? 1 : region[1];
  r.region[2] = array1d ? region[1] : region[2];
  r.row_pitch = row_pitch ? row_pitch : r.region[0];
  if (array1d) r.slice_pitch = slice_pitch ? slice_pitch : r.row_pitch;
  else r.slice_pitch = slice_pitch ? slice_pitch : r.row_pitch * r.region[1];
  r.end = (r.region[2] - 1) * r.slice_pitch + (r.region[1] - 1) * r.row_pitch + r.region[0];
  return r;
}

// Checks an image region: every used dimension inside the image, the unused ones exactly (0, 1).
cl_int check_image_region(cl_mem m, const size_t* origin, const size_t* region) {
  if (origin == nullptr || region == nullptr) return CL_INVALID_VALUE;
  const cl_image_desc& d = m->desc;
  size_t limits[3] = {d.image_width, 1, 1};
  switch (m->type) {
    case CL_MEM_OBJECT_IMAGE2D: limits[1] = d.image_height; break;
    case CL_MEM_OBJECT_IMAGE3D: limits[1] = d.image_height; limits[2] = d.image_depth; break;
    case CL_MEM_OBJECT_IMAGE1D_ARRAY: limits[1] = d.image_array_size; break;
    case CL_MEM_OBJECT_IMAGE2D_ARRAY: limits[1] = d.image_height; limits[2] = d.image_array_size; break;
    default: break;
  }
  for (int i = 0; i < 3; ++i) {
    if (region[i] == 0) return CL_INVALID_VALUE;
    if (origin[i] > limits[i] || region[i] > limits[i] - origin[i]) return CL_INVALID_VALUE;
  }
  return CL_SUCCESS;
}

namespace {

float clampf(float v, float lo, float hi) { return std::isnan(v) ? 0.0f : std::min(hi, std::max(lo, v)); }

uint16_t to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t exp = int32_t((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return uint16_t(sign | 0x7c00u | (mant ? 0x200u : 0));  // inf, nan
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t h = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = (uint32_t(exp) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;
  return uint16_t(sign | h);
}

float linear_to_srgb(float c) {
  c = clampf(c, 0.0f, 1.0f);
  return c <= 0.0031308f ? 12.92f * c : 1.055f * std::pow(c, 1.0f / 2.4f) - 0.055f;
}

}  // namespace

// The bytes of one pixel of `format` holding `color` (four floats, ints or uints, as
// clEnqueueFillImage takes them), converted as a kernel's write_image* would.
bool pack_pixel(const cl_image_format& f, const void* color, uint8_t* out) {
  float fv[4];
  int32_t iv[4];
  uint32_t uv[4];
  std::memcpy(fv, color, 16);
  std::memcpy(iv, color, 16);
  std::memcpy(uv, color, 16);
  const cl_channel_order order = f.image_channel_order;
  const bool srgb = order == CL_sRGB || order == CL_sRGBA || order == CL_sBGRA || order == CL_sRGBx;
  if (srgb)
    for (int i = 0; i < 3; ++i) fv[i] = linear_to_srgb(fv[i]);
  switch (f.image_channel_data_type) {
    case CL_UNORM_SHORT_565: {
      const uint16_t p = uint16_t((uint32_t(std::nearbyint(clampf(fv[0], 0, 1) * 31)) << 11) |
                                  (uint32_t(std::nearbyint(clampf(fv[1], 0, 1) * 63)) << 5) |
                                  uint32_t(std::nearbyint(clampf(fv[2], 0, 1) * 31)));
      std::memcpy(out, &p, 2);
      return true;
    }
    case CL_UNORM_SHORT_555: {
      const uint16_t p = uint16_t((uint32_t(std::nearbyint(clampf(fv[0], 0, 1) * 31)) << 10) |
                                  (uint32_t(std::nearbyint(clampf(fv[1], 0, 1) * 31)) << 5) |
                                  uint32_t(std::nearbyint(clampf(fv[2], 0, 1) * 31)));
      std::memcpy(out, &p, 2);
      return true;
    }
    case CL_UNORM_INT_101010: {
      const uint32_t p = (uint32_t(std::nearbyint(clampf(fv[0], 0, 1) * 1023)) << 20) |
                         (uint32_t(std::nearbyint(clampf(fv[1], 0, 1) * 1023)) << 10) |
                         uint32_t(std::nearbyint(clampf(fv[2], 0, 1) * 1023));
      std::memcpy(out, &p, 4);
      return true;
    }
    default: break;
  }
  int order_map[4];
  int n = 0;
  switch (order) {
    case CL_R: case CL_Rx: case CL_INTENSITY: case CL_LUMINANCE: case CL_DEPTH: order_map[n++] = 0; break;
    case CL_A: order_map[n++] = 3; break;
    case CL_RG: case CL_RGx: order_map[n++] = 0; order_map[n++] = 1; break;
    case CL_RA: order_map[n++] = 0; order_map[n++] = 3; break;
    case CL_RGB: case CL_RGBx: case CL_sRGB: case CL_sRGBx:
      order_map[n++] = 0; order_map[n++] = 1; order_map[n++] = 2; break;
    case CL_RGBA: case CL_sRGBA: order_map[0] = 0; order_map[1] = 1; order_map[2] = 2; order_map[3] = 3; n = 4; break;
    case CL_BGRA: case CL_sBGRA: order_map[0] = 2; order_map[1] = 1; order_map[2] = 0; order_map[3] = 3; n = 4; break;
    case CL_ARGB: order_map[0] = 3; order_map[1] = 0; order_map[2] = 1; order_map[3] = 2; n = 4; break;
    case CL_ABGR: order_map[0] = 3; order_map[1] = 2; order_map[2] = 1; order_map[3] = 0; n = 4; break;
    default: return false;
  }
  for (int i = 0; i < n; ++i) {
    const int c = order_map[i];
    switch (f.image_channel_data_type) {
      case CL_SNORM_INT8: out[i] = uint8_t(int8_t(std::nearbyint(clampf(fv[c], -1, 1) * 127))); break;
      case CL_UNORM_INT8: out[i] = uint8_t(std::nearbyint(clampf(fv[c], 0, 1) * 255)); break;
      case CL_SIGNED_INT8: out[i] = uint8_t(int8_t(std::clamp<int32_t>(iv[c], -128, 127))); break;
      case CL_UNSIGNED_INT8: out[i] = uint8_t(std::min<uint32_t>(uv[c], 255)); break;
      case CL_SNORM_INT16: {
        const int16_t v = int16_t(std::nearbyint(clampf(fv[c], -1, 1) * 32767));
        std::memcpy(out + 2 * i, &v, 2);
        break;
      }
      case CL_UNORM_INT16: {
        const uint16_t v = uint16_t(std::nearbyint(clampf(fv[c], 0, 1) * 65535));
        std::memcpy(out + 2 * i, &v, 2);
        break;
      }
      case CL_SIGNED_INT16: {
        const int16_t v = int16_t(std::clamp<int32_t>(iv[c], -32768, 32767));
        std::memcpy(out + 2 * i, &v, 2);
        break;
      }
      case CL_UNSIGNED_INT16: {
        const uint16_t v = uint16_t(std::min<uint32_t>(uv[c], 65535));
        std::memcpy(out + 2 * i, &v, 2);
        break;
      }
      case CL_HALF_FLOAT: {
        const uint16_t v = to_half(fv[c]);
        std::memcpy(out + 2 * i, &v, 2);
        break;
      }
      case CL_SIGNED_INT32: std::memcpy(out + 4 * i, &iv[c], 4); break;
      case CL_UNSIGNED_INT32: std::memcpy(out + 4 * i, &uv[c], 4); break;
      case CL_FLOAT: std::memcpy(out + 4 * i, &fv[c], 4); break;
      default: return false;
    }
  }
  return true;
}

bool format_supported(cl_device_id d, cl_mem_object_type type, cl_mem_flags flags, const cl_image_format& f) {
  cl_mem_flags access = flags & (CL_MEM_READ_WRITE | CL_MEM_READ_ONLY | CL_MEM_WRITE_ONLY);
  if (access == 0) access = CL_MEM_READ_WRITE;
  auto it = d->image_formats.find(GPUP_OCL_IMAGE_FORMATS_KEY(type, access));
  if (it == d->image_formats.end()) return false;
  return std::any_of(it->second.begin(), it->second.end(), [&](const cl_image_format& g) {
    return g.image_channel_order == f.image_channel_order && g.image_channel_data_type == f.image_channel_data_type;
  });
}

void sampler_release(cl_sampler s) {
  if (s->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  cl_context c = s->context;
  s->magic = Magic::kDead;
  delete s;
  context_release(c);
}

}  // namespace gpup::ocl

using namespace gpup::ocl;

namespace gpup::ocl::api {

namespace {

cl_mem fail(cl_int* errcode_ret, cl_int e) {
  if (errcode_ret) *errcode_ret = e;
  return nullptr;
}

bool is_image_type(cl_mem_object_type t) {
  switch (t) {
    case CL_MEM_OBJECT_IMAGE1D: case CL_MEM_OBJECT_IMAGE2D: case CL_MEM_OBJECT_IMAGE3D:
    case CL_MEM_OBJECT_IMAGE1D_ARRAY: case CL_MEM_OBJECT_IMAGE2D_ARRAY: case CL_MEM_OBJECT_IMAGE1D_BUFFER:
      return true;
    default:
      return false;
  }
}

// The geometry the device allows: a zero dimension is CL_INVALID_BUFFER_SIZE and one past the
// device's limits CL_INVALID_OPERATION, as the host implementation answers.
cl_int check_image_size(cl_device_id d, const cl_image_desc& desc) {
  const size_t w2 = d->scalar<size_t>(CL_DEVICE_IMAGE2D_MAX_WIDTH, 0);
  const size_t h2 = d->scalar<size_t>(CL_DEVICE_IMAGE2D_MAX_HEIGHT, 0);
  const size_t w3 = d->scalar<size_t>(CL_DEVICE_IMAGE3D_MAX_WIDTH, 0);
  const size_t h3 = d->scalar<size_t>(CL_DEVICE_IMAGE3D_MAX_HEIGHT, 0);
  const size_t d3 = d->scalar<size_t>(CL_DEVICE_IMAGE3D_MAX_DEPTH, 0);
  const size_t arrays = d->scalar<size_t>(CL_DEVICE_IMAGE_MAX_ARRAY_SIZE, 0);
  bool zero = false;
  auto in = [&](size_t v, size_t max) {
    zero = zero || v == 0;
    return v >= 1 && v <= max;
  };
  bool ok = false;
  switch (desc.image_type) {
    case CL_MEM_OBJECT_IMAGE1D: ok = in(desc.image_width, w2); break;
    case CL_MEM_OBJECT_IMAGE2D: ok = in(desc.image_width, w2) && in(desc.image_height, h2); break;
    case CL_MEM_OBJECT_IMAGE3D:
      ok = in(desc.image_width, w3) && in(desc.image_height, h3) && in(desc.image_depth, d3);
      break;
    case CL_MEM_OBJECT_IMAGE1D_ARRAY: ok = in(desc.image_width, w2) && in(desc.image_array_size, arrays); break;
    case CL_MEM_OBJECT_IMAGE2D_ARRAY:
      ok = in(desc.image_width, w2) && in(desc.image_height, h2) && in(desc.image_array_size, arrays);
      break;
    default: break;
  }
  if (ok) return CL_SUCCESS;
  return zero ? CL_INVALID_BUFFER_SIZE : CL_INVALID_OPERATION;
}

}  // namespace

cl_mem CreateImageWithProperties(cl_context c, const cl_mem_properties* props, cl_mem_flags flags,
                                 const cl_image_format* format, const cl_image_desc* desc, void* host_ptr,
                                 cl_int* errcode_ret) {
  if (!valid(c)) return fail(errcode_ret, CL_INVALID_CONTEXT);
  if (props != nullptr && props[0] != 0) return fail(errcode_ret, CL_INVALID_PROPERTY);
  if (flags == 0) flags = CL_MEM_READ_WRITE;
  if (cl_int e = check_mem_flags(flags); e != CL_SUCCESS) return fail(errcode_ret, e);
  cl_device_id d = c->devices.front();
  // The misuse codes are the host implementation's (PoCL's), which the differential suite
  // compares: an unknown image type is CL_INVALID_VALUE, a zero dimension
  // CL_INVALID_BUFFER_SIZE, a format or size the device cannot make CL_INVALID_OPERATION, a
  // misshapen host pitch CL_INVALID_VALUE.
  if (format == nullptr) return fail(errcode_ret, CL_INVALID_IMAGE_FORMAT_DESCRIPTOR);
  if (desc == nullptr) return fail(errcode_ret, CL_INVALID_IMAGE_DESCRIPTOR);
  if (!is_image_type(desc->image_type)) return fail(errcode_ret, CL_INVALID_VALUE);
  if (desc->num_mip_levels != 0 || desc->num_samples != 0) return fail(errcode_ret, CL_INVALID_IMAGE_DESCRIPTOR);
  // Images made from buffers or other images are not carried (no 1D image buffers, no
  // cl_khr_image2d_from_buffer).
  if (desc->image_type == CL_MEM_OBJECT_IMAGE1D_BUFFER && desc->mem_object == nullptr)
    return fail(errcode_ret, CL_INVALID_MEM_OBJECT);
  if (desc->image_type == CL_MEM_OBJECT_IMAGE1D_BUFFER || desc->mem_object != nullptr)
    return fail(errcode_ret, CL_INVALID_IMAGE_DESCRIPTOR);
  if (!d->images) return fail(errcode_ret, CL_INVALID_OPERATION);
  if (cl_int e = check_image_size(d, *desc); e != CL_SUCCESS) return fail(errcode_ret, e);
  if (element_size(*format) == 0) return fail(errcode_ret, CL_INVALID_OPERATION);
  const bool wants_ptr = (flags & (CL_MEM_USE_HOST_PTR | CL_MEM_COPY_HOST_PTR)) != 0;
  if (wants_ptr != (host_ptr != nullptr)) return fail(errcode_ret, CL_INVALID_HOST_PTR);

  const cl_mem_object_type type = desc->image_type;
  const bool has_height = image_has_height(type), is_array = image_is_array(type), slices = image_has_slices(type);
  const size_t e = element_size(*format);
  const size_t width = desc->image_width;
  const size_t height = has_height ? desc->image_height : 1;
  const size_t layers = type == CL_MEM_OBJECT_IMAGE3D ? desc->image_depth : is_array ? desc->image_array_size : 1;

  // The application's layout (host pointers only): pitches at least tight, whole elements and rows.
  size_t host_row = 0, host_slice = 0;
  if (host_ptr == nullptr) {
    if (desc->image_row_pitch != 0 || desc->image_slice_pitch != 0) return fail(errcode_ret, CL_INVALID_IMAGE_DESCRIPTOR);
  } else {
    host_row = desc->image_row_pitch ? desc->image_row_pitch : width * e;
    if (host_row < width * e || host_row % e != 0) return fail(errcode_ret, CL_INVALID_VALUE);
    const size_t min_slice = type == CL_MEM_OBJECT_IMAGE1D_ARRAY ? host_row : host_row * height;
    if (slices) {
      host_slice = desc->image_slice_pitch ? desc->image_slice_pitch : min_slice;
      if (host_slice < min_slice || host_slice % host_row != 0) return fail(errcode_ret, CL_INVALID_VALUE);
    }
  }
  if (!format_supported(d, type, flags, *format)) return fail(errcode_ret, CL_INVALID_OPERATION);

  // The backing's layout: tight rows and slices.
  const size_t row = width * e;
  const size_t slice = type == CL_MEM_OBJECT_IMAGE1D_ARRAY ? row : row * height;
  size_t total = 0;
  if (__builtin_mul_overflow(slice, layers, &total) || total > d->max_alloc)
    return fail(errcode_ret, CL_INVALID_IMAGE_SIZE);

  GPUP_OCL_IMAGE_DESC id{};
  id.Magic = GPUP_OCL_IMAGE_MAGIC;
  id.ImageType = type;
  id.ChannelOrder = format->image_channel_order;
  id.ChannelDataType = format->image_channel_data_type;
  id.Flags = flags & (CL_MEM_READ_WRITE | CL_MEM_READ_ONLY | CL_MEM_WRITE_ONLY);
  id.Width = width;
  id.Height = has_height ? height : 0;
  id.Depth = type == CL_MEM_OBJECT_IMAGE3D ? layers : 0;
  id.ArraySize = is_array ? layers : 0;
  id.RowPitch = row;
  id.SlicePitch = slices ? slice : 0;
  std::shared_ptr<Backing> backing;
  if (cl_int err = make_backing(c, total, &id, &backing); err != CL_SUCCESS) return fail(errcode_ret, err);

  auto* m = new _cl_mem();
  m->context = c;
  context_retain(c);
  m->type = type;
  m->flags = flags;
  m->size = total;
  m->host_ptr = (flags & CL_MEM_USE_HOST_PTR) ? host_ptr : nullptr;
  if (props != nullptr) m->properties.assign(props, props + 1);
  m->format = *format;
  m->desc = *desc;
  m->desc.image_row_pitch = row;
  m->desc.image_slice_pitch = slices ? slice : 0;
  m->element_size = e;
  m->host_row_pitch = host_row;
  m->host_slice_pitch = host_slice;
  m->backing = std::move(backing);
  if (wants_ptr) {
    const size_t origin[3] = {0, 0, 0};
    const size_t region[3] = {width, type == CL_MEM_OBJECT_IMAGE1D_ARRAY ? layers : height,
                              type == CL_MEM_OBJECT_IMAGE1D_ARRAY ? 1 : layers};
    const Rect dst = image_rect(m, origin, region);
    const Rect src = host_rect(m, region, host_row, host_slice);
    uint8_t* p = nullptr;
    cl_int err = m->backing->begin(&p);
    if (err == CL_SUCCESS) {
      for_each_row(dst, src, [&](size_t d_off, size_t s_off, size_t len) {
        std::memcpy(p + d_off, static_cast<const uint8_t*>(host_ptr) + s_off, len);
      });
      err = m->backing->end();
    }
    if (err != CL_SUCCESS) {
      mem_release(m);
      return fail(errcode_ret, err);
    }
  }
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return m;
}

cl_mem CreateImage(cl_context c, cl_mem_flags flags, const cl_image_format* format, const cl_image_desc* desc,
                   void* host_ptr, cl_int* errcode_ret) {
  return CreateImageWithProperties(c, nullptr, flags, format, desc, host_ptr, errcode_ret);
}

cl_mem CreateImage2D(cl_context c, cl_mem_flags flags, const cl_image_format* format, size_t width, size_t height,
                     size_t row_pitch, void* host_ptr, cl_int* errcode_ret) {
  cl_image_desc desc{};
  desc.image_type = CL_MEM_OBJECT_IMAGE2D;
  desc.image_width = width;
  desc.image_height = height;
  desc.image_row_pitch = row_pitch;
  return CreateImageWithProperties(c, nullptr, flags, format, &desc, host_ptr, errcode_ret);
}

cl_mem CreateImage3D(cl_context c, cl_mem_flags flags, const cl_image_format* format, size_t width, size_t height,
                     size_t depth, size_t row_pitch, size_t slice_pitch, void* host_ptr, cl_int* errcode_ret) {
  cl_image_desc desc{};
  desc.image_type = CL_MEM_OBJECT_IMAGE3D;
  desc.image_width = width;
  desc.image_height = height;
  desc.image_depth = depth;
  desc.image_row_pitch = row_pitch;
  desc.image_slice_pitch = slice_pitch;
  return CreateImageWithProperties(c, nullptr, flags, format, &desc, host_ptr, errcode_ret);
}

cl_int GetSupportedImageFormats(cl_context c, cl_mem_flags flags, cl_mem_object_type type, cl_uint num_entries,
                                cl_image_format* formats, cl_uint* num_formats) {
  if (!valid(c)) return CL_INVALID_CONTEXT;
  if (check_mem_flags(flags == 0 ? CL_MEM_READ_WRITE : flags) != CL_SUCCESS) return CL_INVALID_VALUE;
  if (!is_image_type(type)) return CL_INVALID_VALUE;
  if (num_entries == 0 && formats != nullptr) return CL_INVALID_VALUE;
  cl_device_id d = c->devices.front();
  std::vector<cl_image_format> list;
  if (d->images && type != CL_MEM_OBJECT_IMAGE1D_BUFFER) {
    cl_mem_flags access = flags & (CL_MEM_READ_WRITE | CL_MEM_READ_ONLY | CL_MEM_WRITE_ONLY);
    if (access == 0) access = CL_MEM_READ_WRITE;
    if (flags & CL_MEM_KERNEL_READ_AND_WRITE) access = CL_MEM_KERNEL_READ_AND_WRITE;
    auto it = d->image_formats.find(GPUP_OCL_IMAGE_FORMATS_KEY(type, access));
    if (it != d->image_formats.end()) list = it->second;
  }
  if (formats != nullptr) std::copy_n(list.begin(), std::min<size_t>(num_entries, list.size()), formats);
  if (num_formats) *num_formats = static_cast<cl_uint>(list.size());
  return CL_SUCCESS;
}

cl_int GetImageInfo(cl_mem m, cl_image_info param, size_t n, void* v, size_t* ret) {
  if (!valid(m) || !m->is_image()) return CL_INVALID_MEM_OBJECT;
  const cl_image_desc& d = m->desc;
  const bool has_height = image_has_height(m->type), is_array = image_is_array(m->type);
  switch (param) {
    case CL_IMAGE_FORMAT: return info_value(n, v, ret, m->format);
    case CL_IMAGE_ELEMENT_SIZE: return info_value(n, v, ret, m->element_size);
    case CL_IMAGE_ROW_PITCH: return info_value(n, v, ret, d.image_row_pitch);
    case CL_IMAGE_SLICE_PITCH: return info_value(n, v, ret, d.image_slice_pitch);
    case CL_IMAGE_WIDTH: return info_value(n, v, ret, d.image_width);
    case CL_IMAGE_HEIGHT: return info_value(n, v, ret, has_height ? d.image_height : size_t{0});
    case CL_IMAGE_DEPTH: return info_value(n, v, ret, m->type == CL_MEM_OBJECT_IMAGE3D ? d.image_depth : size_t{0});
    case CL_IMAGE_ARRAY_SIZE: return info_value(n, v, ret, is_array ? d.image_array_size : size_t{0});
    case CL_IMAGE_BUFFER: return info_value(n, v, ret, cl_mem{nullptr});
    case CL_IMAGE_NUM_MIP_LEVELS: return info_value(n, v, ret, cl_uint{0});
    case CL_IMAGE_NUM_SAMPLES: return info_value(n, v, ret, cl_uint{0});
    default: return CL_INVALID_VALUE;
  }
}

// ------------------------------------------------------------------------------------------------
// Samplers

namespace {

cl_sampler make_sampler(cl_context c, cl_bool normalized, cl_addressing_mode addressing, cl_filter_mode filter,
                        std::vector<cl_sampler_properties> props, cl_int* errcode_ret) {
  auto refuse = [&](cl_int e) -> cl_sampler {
    if (errcode_ret) *errcode_ret = e;
    return nullptr;
  };
  if (!valid(c)) return refuse(CL_INVALID_CONTEXT);
  if (normalized != CL_TRUE && normalized != CL_FALSE) return refuse(CL_INVALID_VALUE);
  if (addressing < CL_ADDRESS_NONE || addressing > CL_ADDRESS_MIRRORED_REPEAT) return refuse(CL_INVALID_VALUE);
  if (filter != CL_FILTER_NEAREST && filter != CL_FILTER_LINEAR) return refuse(CL_INVALID_VALUE);
  if (!c->devices.front()->images) return refuse(CL_INVALID_OPERATION);
  auto* s = new _cl_sampler();
  s->context = c;
  context_retain(c);
  s->normalized = normalized;
  s->addressing = addressing;
  s->filter = filter;
  s->properties = std::move(props);
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return s;
}

}  // namespace

cl_sampler CreateSampler(cl_context c, cl_bool normalized, cl_addressing_mode addressing, cl_filter_mode filter,
                         cl_int* errcode_ret) {
  return make_sampler(c, normalized, addressing, filter, {}, errcode_ret);
}

cl_sampler CreateSamplerWithProperties(cl_context c, const cl_sampler_properties* props, cl_int* errcode_ret) {
  cl_bool normalized = CL_TRUE;
  cl_addressing_mode addressing = CL_ADDRESS_CLAMP;
  cl_filter_mode filter = CL_FILTER_NEAREST;
  std::vector<cl_sampler_properties> list;
  if (props != nullptr) {
    uint32_t seen = 0;
    size_t i = 0;
    for (; props[i] != 0; i += 2) {
      uint32_t bit = 0;
      switch (props[i]) {
        case CL_SAMPLER_NORMALIZED_COORDS: bit = 1; normalized = static_cast<cl_bool>(props[i + 1]); break;
        case CL_SAMPLER_ADDRESSING_MODE: bit = 2; addressing = static_cast<cl_addressing_mode>(props[i + 1]); break;
        case CL_SAMPLER_FILTER_MODE: bit = 4; filter = static_cast<cl_filter_mode>(props[i + 1]); break;
        default:
          if (errcode_ret) *errcode_ret = valid(c) ? CL_INVALID_VALUE : CL_INVALID_CONTEXT;
          return nullptr;
      }
      if (seen & bit) {
        if (errcode_ret) *errcode_ret = valid(c) ? CL_INVALID_VALUE : CL_INVALID_CONTEXT;
        return nullptr;
      }
      seen |= bit;
    }
    list.assign(props, props + i + 1);
  }
  return make_sampler(c, normalized, addressing, filter, std::move(list), errcode_ret);
}

cl_int RetainSampler(cl_sampler s) {
  if (!valid(s)) return CL_INVALID_SAMPLER;
  s->refs.fetch_add(1, std::memory_order_relaxed);
  return CL_SUCCESS;
}

cl_int ReleaseSampler(cl_sampler s) {
  if (!valid(s)) return CL_INVALID_SAMPLER;
  sampler_release(s);
  return CL_SUCCESS;
}

cl_int GetSamplerInfo(cl_sampler s, cl_sampler_info param, size_t n, void* v, size_t* ret) {
  if (!valid(s)) return CL_INVALID_SAMPLER;
  switch (param) {
    case CL_SAMPLER_REFERENCE_COUNT: return info_value(n, v, ret, cl_uint(s->refs.load()));
    case CL_SAMPLER_CONTEXT: return info_value(n, v, ret, s->context);
    case CL_SAMPLER_NORMALIZED_COORDS: return info_value(n, v, ret, s->normalized);
    case CL_SAMPLER_ADDRESSING_MODE: return info_value(n, v, ret, s->addressing);
    case CL_SAMPLER_FILTER_MODE: return info_value(n, v, ret, s->filter);
    case CL_SAMPLER_PROPERTIES: return info_array(n, v, ret, s->properties);
    default: return CL_INVALID_VALUE;
  }
}

}  // namespace gpup::ocl::api
