// kmd_opencl: allocations (buffers and programs), Lock/Unlock, kernels, contexts of a device.
#include <algorithm>

#include "kmd/opencl/ocl_kmd.h"

namespace gpup::kmd::ocl {

namespace {

// Always added to the guest's options: argument kinds must be known to keep a guest from passing
// a value where the kernel expects a cl_mem (see classify_arg).
constexpr const char* kRequiredBuildOptions = "-cl-kernel-arg-info";

std::string build_log(cl_program program, cl_device_id device) {
  size_t n = 0;
  if (clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n) != CL_SUCCESS || n == 0) return {};
  std::string log(n, '\0');
  if (clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr) != CL_SUCCESS) return {};
  while (!log.empty() && log.back() == '\0') log.pop_back();
  return log;
}

std::string arg_string(cl_kernel k, cl_uint index, cl_kernel_arg_info what, cl_int* err) {
  size_t n = 0;
  *err = clGetKernelArgInfo(k, index, what, 0, nullptr, &n);
  if (*err != CL_SUCCESS) return {};
  std::string s(n, '\0');
  *err = clGetKernelArgInfo(k, index, what, n, s.data(), nullptr);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// What kind of DDI argument a kernel parameter takes. Only __global/__constant pointers take a
// cl_mem, only __local pointers take a local size, only plain private values take bytes; images,
// samplers, pipes, queues and events are not supported (the guest cannot name such objects).
Kernel::ArgKind classify_arg(cl_kernel k, cl_uint index) {
  cl_kernel_arg_address_qualifier address = 0;
  cl_int err = clGetKernelArgInfo(k, index, CL_KERNEL_ARG_ADDRESS_QUALIFIER, sizeof(address), &address, nullptr);
  if (err != CL_SUCCESS) return Kernel::ArgKind::kUnknown;
  const std::string type = arg_string(k, index, CL_KERNEL_ARG_TYPE_NAME, &err);
  if (err != CL_SUCCESS || type.empty()) return Kernel::ArgKind::kUnknown;
  const bool pointer = type.back() == '*';
  auto starts = [&](std::string_view p) { return type.compare(0, p.size(), p) == 0; };
  switch (address) {
    case CL_KERNEL_ARG_ADDRESS_GLOBAL:
    case CL_KERNEL_ARG_ADDRESS_CONSTANT:
      return pointer ? Kernel::ArgKind::kBuffer : Kernel::ArgKind::kUnsupported;
    case CL_KERNEL_ARG_ADDRESS_LOCAL:
      return pointer ? Kernel::ArgKind::kLocal : Kernel::ArgKind::kUnsupported;
    case CL_KERNEL_ARG_ADDRESS_PRIVATE:
      if (pointer || starts("image") || starts("sampler_t") || starts("pipe") || starts("queue_t") ||
          starts("clk_event_t") || starts("event_t") || starts("reserve_id_t")) {
        return Kernel::ArgKind::kUnsupported;
      }
      return Kernel::ArgKind::kValue;
    default:
      return Kernel::ArgKind::kUnknown;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Program

Result<std::shared_ptr<Kernel>> Program::kernel(const std::string& name, cl_device_id device) {
  std::lock_guard lock(mu_);
  if (auto it = kernels_.find(name); it != kernels_.end()) return it->second;
  cl_int err = CL_SUCCESS;
  ClKernel k(clCreateKernel(program_.get(), name.c_str(), &err));
  if (err != CL_SUCCESS) {
    if (err == CL_INVALID_KERNEL_NAME) {
      return Error(GPUP_STATUS_NOT_FOUND, fmt::format("the program has no kernel '{}'", printable(name)));
    }
    return Error(status_from_cl(err), fmt::format("clCreateKernel('{}'): {} ({})", printable(name), cl_error_name(err), err));
  }
  auto entry = std::make_shared<Kernel>();
  entry->name = name;
  cl_uint nargs = 0;
  if ((err = clGetKernelInfo(k.get(), CL_KERNEL_NUM_ARGS, sizeof(nargs), &nargs, nullptr)) != CL_SUCCESS) {
    return Error(GPUP_STATUS_DEVICE_ERROR, fmt::format("CL_KERNEL_NUM_ARGS: {}", cl_error_name(err)));
  }
  for (cl_uint i = 0; i < nargs; ++i) entry->kinds.push_back(classify_arg(k.get(), i));
  size_t wg = 0;
  if (clGetKernelWorkGroupInfo(k.get(), device, CL_KERNEL_WORK_GROUP_SIZE, sizeof(wg), &wg, nullptr) != CL_SUCCESS) wg = 1;
  entry->work_group_size = wg;
  entry->kernel = std::move(k);
  kernels_.emplace(name, entry);
  return entry;
}

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

gpup_status Device::create_program(GPUPDDI_ARG_CREATEALLOCATION* args, Allocation* alloc) {
  auto image = parse_program_desc(args->pPrivateDriverData, args->PrivateDriverDataSize);
  if (!image) {
    logf(GPUPDDI_LOG_WARN, "CreateAllocation: {}", image.error().message);
    return image.error().status;
  }
  const DeviceFacts& facts = adapter->facts;
  cl_device_id device = facts.device;
  cl_int err = CL_SUCCESS;
  ClProgram program;
  if (image->format == GPUP_OCL_PROGRAM_SOURCE) {
    const char* text = reinterpret_cast<const char*>(image->content.data());
    const size_t length = image->content.size();
    program.reset(clCreateProgramWithSource(adapter->context.get(), 1, &text, &length, &err));
  } else {
    const unsigned char* bin = image->content.data();
    const size_t length = image->content.size();
    cl_int binary_status = CL_SUCCESS;
    program.reset(clCreateProgramWithBinary(adapter->context.get(), 1, &device, &length, &bin, &binary_status, &err));
    if (err == CL_SUCCESS && binary_status != CL_SUCCESS) err = binary_status;
    if (err == CL_INVALID_BINARY) {
      args->OutputDataWritten = write_build_result(args->pOutputData, args->OutputDataSize, err,
                                                   "the device does not accept this program binary");
      return GPUP_STATUS_BUILD_FAILED;
    }
  }
  if (err != CL_SUCCESS) {
    logf(GPUPDDI_LOG_WARN, "CreateAllocation: creating the program: {} ({})", cl_error_name(err), err);
    return status_from_cl(err);
  }
  // The options and the source are the guest's: "-I dir", "-include file" or #include can make
  // the compiler read files of this process's file system (and echo them into the log). The
  // worker process's sandbox is what confines that; the KMD does not filter options.
  const std::string options =
      image->options.empty() ? kRequiredBuildOptions : image->options + " " + kRequiredBuildOptions;
  err = clBuildProgram(program.get(), 1, &device, options.c_str(), nullptr, nullptr);
  std::string log = build_log(program.get(), device);
  if (err != CL_SUCCESS && log.empty()) log = fmt::format("clBuildProgram failed: {} ({})", cl_error_name(err), err);
  args->OutputDataWritten = write_build_result(args->pOutputData, args->OutputDataSize, err, log);
  if (err != CL_SUCCESS) {
    logf(GPUPDDI_LOG_INFO, "CreateAllocation: program build failed: {} ({}), {}-byte log", cl_error_name(err), err,
         log.size());
    return err == CL_OUT_OF_HOST_MEMORY || err == CL_OUT_OF_RESOURCES ? GPUP_STATUS_NO_MEMORY
                                                                        : GPUP_STATUS_BUILD_FAILED;
  }
  alloc->program = std::make_unique<Program>(std::move(program));
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
