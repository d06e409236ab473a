// kmd_opencl: allocations (buffers; programs are in ocl_program.cpp), Lock/Unlock, contexts of a
// device.
#include <algorithm>

#include "kmd/opencl/ocl_kmd.h"

namespace gpup::kmd::ocl {

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

  if (f.Program) {
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
