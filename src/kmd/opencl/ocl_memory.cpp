// kmd_opencl: allocations (buffers; programs are in ocl_program.cpp), Lock/Unlock, contexts of a
// device.
#include <algorithm>

#include "kmd/opencl/ocl_kmd.h"

namespace gpup::kmd::ocl {

// kmd_support's copies of OpenCL's values (it does not include <CL/cl.h>) must be OpenCL's.
namespace clv = cl_values;
static_assert(clv::kImage2D == CL_MEM_OBJECT_IMAGE2D && clv::kImage3D == CL_MEM_OBJECT_IMAGE3D &&
              clv::kImage2DArray == CL_MEM_OBJECT_IMAGE2D_ARRAY && clv::kImage1D == CL_MEM_OBJECT_IMAGE1D &&
              clv::kImage1DArray == CL_MEM_OBJECT_IMAGE1D_ARRAY && clv::kImage1DBuffer == CL_MEM_OBJECT_IMAGE1D_BUFFER);
static_assert(clv::kMemReadWrite == CL_MEM_READ_WRITE && clv::kMemWriteOnly == CL_MEM_WRITE_ONLY &&
              clv::kMemReadOnly == CL_MEM_READ_ONLY);
static_assert(clv::kR == CL_R && clv::kA == CL_A && clv::kRG == CL_RG && clv::kRA == CL_RA && clv::kRGB == CL_RGB &&
              clv::kRGBA == CL_RGBA && clv::kBGRA == CL_BGRA && clv::kARGB == CL_ARGB &&
              clv::kIntensity == CL_INTENSITY && clv::kLuminance == CL_LUMINANCE && clv::kRx == CL_Rx &&
              clv::kRGx == CL_RGx && clv::kRGBx == CL_RGBx && clv::kDepth == CL_DEPTH &&
              clv::kDepthStencil == CL_DEPTH_STENCIL);
static_assert(clv::kSnormInt8 == CL_SNORM_INT8 && clv::kSnormInt16 == CL_SNORM_INT16 &&
              clv::kUnormInt8 == CL_UNORM_INT8 && clv::kUnormInt16 == CL_UNORM_INT16 &&
              clv::kUnormShort565 == CL_UNORM_SHORT_565 && clv::kUnormShort555 == CL_UNORM_SHORT_555 &&
              clv::kUnormInt101010 == CL_UNORM_INT_101010 && clv::kSignedInt8 == CL_SIGNED_INT8 &&
              clv::kSignedInt16 == CL_SIGNED_INT16 && clv::kSignedInt32 == CL_SIGNED_INT32 &&
              clv::kUnsignedInt8 == CL_UNSIGNED_INT8 && clv::kUnsignedInt16 == CL_UNSIGNED_INT16 &&
              clv::kUnsignedInt32 == CL_UNSIGNED_INT32 && clv::kHalfFloat == CL_HALF_FLOAT &&
              clv::kFloat == CL_FLOAT && clv::kUnormInt24 == CL_UNORM_INT24);
static_assert(clv::kAddressNone == CL_ADDRESS_NONE && clv::kAddressClampToEdge == CL_ADDRESS_CLAMP_TO_EDGE &&
              clv::kAddressClamp == CL_ADDRESS_CLAMP && clv::kAddressRepeat == CL_ADDRESS_REPEAT &&
              clv::kAddressMirroredRepeat == CL_ADDRESS_MIRRORED_REPEAT && clv::kFilterNearest == CL_FILTER_NEAREST &&
              clv::kFilterLinear == CL_FILTER_LINEAR);

// ---------------------------------------------------------------------------------------------
// Allocation

Result<cl_mem> Allocation::range_mem(uint64_t offset, uint64_t range_size) {
  if (offset == 0 && range_size == size) return mem.get();
  std::lock_guard lock(sub_mu_);
  const auto key = std::make_pair(offset, range_size);
  if (auto it = sub_buffers_.find(key); it != sub_buffers_.end()) return it->second.get();
  // Releasing a sub-buffer that queued commands still use is safe: OpenCL keeps it alive until
  // they finish.
  if (sub_buffers_.size() >= kMaxSubBuffers) sub_buffers_.clear();
  cl_buffer_region region{static_cast<size_t>(offset), static_cast<size_t>(range_size)};
  cl_int err = CL_SUCCESS;
  ClMem sub(clCreateSubBuffer(mem.get(), 0, CL_BUFFER_CREATE_TYPE_REGION, &region, &err));
  if (err != CL_SUCCESS) {
    return Error(status_from_cl(err), fmt::format("clCreateSubBuffer(offset {}, size {}): {} ({})", offset, range_size,
                                                  cl_error_name(err), err));
  }
  cl_mem raw = sub.get();
  sub_buffers_.emplace(key, std::move(sub));
  return raw;
}

// ---------------------------------------------------------------------------------------------
// Device

Device::~Device() {
  OwnedObjects<Context> contexts;
  OwnedObjects<Allocation> allocations;
  {
    std::lock_guard lock(mu_);
    contexts.swap(contexts_);
    allocations.swap(allocations_);
  }
  contexts.clear();  // waits for their work and reports their completions
  allocations.clear();
}

Allocation* Device::find_allocation(GPUPDDI_HANDLE h) {
  return find_owned(mu_, allocations_, static_cast<const KmdObject*>(h));
}

gpup_status Device::create_allocation(GPUPDDI_ARG_CREATEALLOCATION* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  args->OutputDataWritten = 0;
  const GPUPDDI_ALLOCATIONFLAGS f = args->Flags;
  if (f.Reserved != 0) return GPUP_STATUS_INVALID_PARAMETER;
  auto alloc = std::make_unique<Allocation>();
  alloc->flags = f;

  if (f.Image) {
    if (gpup_status s = create_image(args, alloc.get()); s != GPUP_STATUS_SUCCESS) return s;
  } else if (f.Program) {
    if (f.CpuVisible || args->pSystemMemory != nullptr) {
      log_message(GPUPDDI_LOG_WARN, "CreateAllocation: a program allocation has no memory to make CPU-visible");
      return GPUP_STATUS_INVALID_PARAMETER;
    }
    if (gpup_status s = create_program(args, alloc.get()); s != GPUP_STATUS_SUCCESS) return s;
  } else {
    const DeviceFacts& facts = adapter->facts;
    if (args->Size == 0 || args->Size > facts.info.MaxAllocSize) {
      logf(GPUPDDI_LOG_WARN, "CreateAllocation: size {} outside 1..{} (CL_DEVICE_MAX_MEM_ALLOC_SIZE)", args->Size,
           facts.info.MaxAllocSize);
      return GPUP_STATUS_INVALID_PARAMETER;
    }
    if (args->PrivateDriverDataSize != 0) {
      log_message(GPUPDDI_LOG_WARN, "CreateAllocation: buffers take no private driver data");
      return GPUP_STATUS_INVALID_PARAMETER;
    }
    if (f.CpuVisible != (args->pSystemMemory != nullptr)) {
      log_message(GPUPDDI_LOG_WARN, "CreateAllocation: pSystemMemory must be given exactly for CpuVisible");
      return GPUP_STATUS_INVALID_PARAMETER;
    }
    cl_mem_flags mem_flags = f.ReadOnly ? CL_MEM_READ_ONLY : CL_MEM_READ_WRITE;
    if (f.CpuVisible) mem_flags |= CL_MEM_USE_HOST_PTR;  // zero copy on CPU and unified-memory devices
    cl_int err = CL_SUCCESS;
    alloc->mem.reset(clCreateBuffer(adapter->context.get(), mem_flags, args->Size, args->pSystemMemory, &err));
    if (err != CL_SUCCESS) {
      logf(GPUPDDI_LOG_WARN, "CreateAllocation: clCreateBuffer({} bytes): {} ({})", args->Size, cl_error_name(err), err);
      return status_from_cl(err);
    }
    if (!f.CpuVisible) {
      // Device memory may hold what an earlier allocation of this VM left; never show it.
      const cl_uint zero = 0;
      const bool whole_words = args->Size % sizeof(zero) == 0;
      std::lock_guard lock(queue_mu_);
      err = clEnqueueFillBuffer(queue_.get(), alloc->mem.get(), &zero, whole_words ? sizeof(zero) : 1, 0, args->Size,
                                0, nullptr, nullptr);
      if (err == CL_SUCCESS) err = clFinish(queue_.get());
      if (err != CL_SUCCESS) {
        logf(GPUPDDI_LOG_WARN, "CreateAllocation: zero fill: {} ({})", cl_error_name(err), err);
        return status_from_cl(err);
      }
    }
    alloc->size = args->Size;
    alloc->system_memory = args->pSystemMemory;
  }

  args->hAllocation = adopt(mu_, allocations_, std::move(alloc));
  return GPUP_STATUS_SUCCESS;
}

// An image allocation is a USE_HOST_PTR buffer (COPY, FILL and buffer arguments) and a
// USE_HOST_PTR image (image arguments) over the same pSystemMemory, with the guest's pitches.
// Adapter start offers image formats only on devices whose memory is the host's, where both
// objects read and write pSystemMemory itself, so neither needs syncing with the other.
gpup_status Device::create_image(GPUPDDI_ARG_CREATEALLOCATION* args, Allocation* alloc) {
  const DeviceFacts& facts = adapter->facts;
  const GPUPDDI_ALLOCATIONFLAGS f = args->Flags;
  if (f.Program || !f.CpuVisible || args->pSystemMemory == nullptr) {
    log_message(GPUPDDI_LOG_WARN, "CreateAllocation: an image allocation is CpuVisible with pSystemMemory, not a program");
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  if (args->Size == 0 || args->Size > facts.info.MaxAllocSize) {
    logf(GPUPDDI_LOG_WARN, "CreateAllocation: image allocation size {} outside 1..{}", args->Size,
         facts.info.MaxAllocSize);
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  auto layout = parse_image_desc(args->pPrivateDriverData, args->PrivateDriverDataSize, args->Size, f.ReadOnly != 0);
  if (!layout) {
    logf(GPUPDDI_LOG_WARN, "CreateAllocation: {}", layout.error().message);
    return layout.error().status;
  }
  const ImageLayout& l = *layout;
  if (!facts.image_formats.supports(l.image_type, l.access, l.channel_order, l.channel_type)) {
    logf(GPUPDDI_LOG_WARN,
         "CreateAllocation: image format (order {:#x}, type {:#x}) is not supported for image type {:#x} with access "
         "{:#x} on this device",
         l.channel_order, l.channel_type, l.image_type, l.access);
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  cl_int err = CL_SUCCESS;
  const cl_mem_flags buffer_flags = (f.ReadOnly ? CL_MEM_READ_ONLY : CL_MEM_READ_WRITE) | CL_MEM_USE_HOST_PTR;
  alloc->mem.reset(clCreateBuffer(adapter->context.get(), buffer_flags, args->Size, args->pSystemMemory, &err));
  if (err != CL_SUCCESS) {
    logf(GPUPDDI_LOG_WARN, "CreateAllocation: image buffer clCreateBuffer({} bytes): {} ({})", args->Size,
         cl_error_name(err), err);
    return status_from_cl(err);
  }
  const cl_image_format format{l.channel_order, l.channel_type};
  cl_image_desc desc{};
  desc.image_type = l.image_type;
  desc.image_width = static_cast<size_t>(l.width);
  desc.image_height = static_cast<size_t>(l.height);
  desc.image_depth = static_cast<size_t>(l.depth);
  desc.image_array_size = static_cast<size_t>(l.array_size);
  desc.image_row_pitch = static_cast<size_t>(l.row_pitch);
  desc.image_slice_pitch = static_cast<size_t>(l.slice_pitch);
  alloc->image.reset(clCreateImage(adapter->context.get(), l.access | CL_MEM_USE_HOST_PTR, &format, &desc,
                                   args->pSystemMemory, &err));
  if (err != CL_SUCCESS) {
    // Sizes beyond the device's image limits end here (CL_INVALID_IMAGE_SIZE).
    logf(GPUPDDI_LOG_WARN, "CreateAllocation: clCreateImage({:#x}, {}x{}x{}[{}], pitches {}/{}): {} ({})", l.image_type,
         l.width, l.height, l.depth, l.array_size, l.row_pitch, l.slice_pitch, cl_error_name(err), err);
    return status_from_cl(err);  // alloc (and its buffer) is released by the caller
  }
  alloc->layout = l;
  alloc->size = args->Size;
  alloc->system_memory = args->pSystemMemory;
  return GPUP_STATUS_SUCCESS;
}

void Device::destroy_allocation(GPUPDDI_HANDLE h) {
  // Destroyed outside mu_.
  take(mu_, allocations_, static_cast<const KmdObject*>(h), "DestroyAllocation: unknown allocation");
}

// Lock (device -> backing store) and Unlock (backing store -> device) map the USE_HOST_PTR
// buffer on the device's private queue and unmap it again before returning, so the buffer is
// never left mapped while contexts use it. The mapped pointer of a USE_HOST_PTR buffer is
// derived from the host pointer (OpenCL 1.2 5.4.2), so on CPU and unified-memory devices both
// are no-copy; the memcpy only runs for implementations that map elsewhere.
gpup_status Device::lock(GPUPDDI_HANDLE h) {
  Allocation* alloc = find_allocation(h);
  if (alloc == nullptr) return GPUP_STATUS_INVALID_HANDLE;
  if (!alloc->flags.CpuVisible) return GPUP_STATUS_INVALID_PARAMETER;
  std::lock_guard lock(queue_mu_);
  cl_int err = CL_SUCCESS;
  void* p = clEnqueueMapBuffer(queue_.get(), alloc->mem.get(), CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0, alloc->size, 0,
                               nullptr, nullptr, &err);
  if (err != CL_SUCCESS) {
    logf(GPUPDDI_LOG_WARN, "Lock: clEnqueueMapBuffer: {} ({})", cl_error_name(err), err);
    return status_from_cl(err);
  }
  if (p != alloc->system_memory) std::memcpy(alloc->system_memory, p, alloc->size);
  err = clEnqueueUnmapMemObject(queue_.get(), alloc->mem.get(), p, 0, nullptr, nullptr);
  if (err == CL_SUCCESS) err = clFinish(queue_.get());
  return status_from_cl(err);
}

gpup_status Device::unlock(GPUPDDI_HANDLE h) {
  Allocation* alloc = find_allocation(h);
  if (alloc == nullptr) return GPUP_STATUS_INVALID_HANDLE;
  if (!alloc->flags.CpuVisible) return GPUP_STATUS_INVALID_PARAMETER;
  std::lock_guard lock(queue_mu_);
  cl_int err = CL_SUCCESS;
  // WRITE_INVALIDATE_REGION: the device copy is about to be replaced, do not read it back over
  // the guest's writes.
  void* p = clEnqueueMapBuffer(queue_.get(), alloc->mem.get(), CL_TRUE, CL_MAP_WRITE_INVALIDATE_REGION, 0, alloc->size,
                               0, nullptr, nullptr, &err);
  if (err != CL_SUCCESS) {
    logf(GPUPDDI_LOG_WARN, "Unlock: clEnqueueMapBuffer: {} ({})", cl_error_name(err), err);
    return status_from_cl(err);
  }
  if (p != alloc->system_memory) std::memcpy(p, alloc->system_memory, alloc->size);
  err = clEnqueueUnmapMemObject(queue_.get(), alloc->mem.get(), p, 0, nullptr, nullptr);
  if (err == CL_SUCCESS) err = clFinish(queue_.get());
  return status_from_cl(err);
}

gpup_status Device::create_context(GPUPDDI_ARG_CREATECONTEXT* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->NodeOrdinal != 0 || args->Priority < -2 || args->Priority > 2 || args->Flags != 0 ||
      args->PrivateDriverDataSize != 0) {
    logf(GPUPDDI_LOG_WARN, "CreateContext: node {} priority {} flags {:#x} private data {} bytes not supported",
         args->NodeOrdinal, args->Priority, args->Flags, args->PrivateDriverDataSize);
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  cl_int err = CL_SUCCESS;
  ClQueue queue(clCreateCommandQueue(adapter->context.get(), adapter->facts.device, 0, &err));
  if (err != CL_SUCCESS) {
    logf(GPUPDDI_LOG_ERROR, "CreateContext: clCreateCommandQueue: {} ({})", cl_error_name(err), err);
    return status_from_cl(err);
  }
  args->hContext = adopt(mu_, contexts_, std::make_unique<Context>(this, args->hSystemContext, std::move(queue)));
  return GPUP_STATUS_SUCCESS;
}

void Device::destroy_context(Context* context) {
  std::unique_ptr<Context> dead = take(mu_, contexts_, context, "DestroyContext: unknown context");
  dead.reset();  // outside mu_: waits for the context's work
}

}  // namespace gpup::kmd::ocl
