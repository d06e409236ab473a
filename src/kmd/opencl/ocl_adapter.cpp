// kmd_opencl: adapter start/stop, queries, devices.
#include <algorithm>
#include <array>

#include "kmd/opencl/ocl_kmd.h"

namespace gpup::kmd::ocl {

const char* cl_error_name(cl_int err) {
  switch (err) {
#define GPUP_CL_ERR_(e) \
  case e:               \
    return #e;
    GPUP_CL_ERR_(CL_SUCCESS)
    GPUP_CL_ERR_(CL_DEVICE_NOT_FOUND)
    GPUP_CL_ERR_(CL_DEVICE_NOT_AVAILABLE)
    GPUP_CL_ERR_(CL_COMPILER_NOT_AVAILABLE)
    GPUP_CL_ERR_(CL_MEM_OBJECT_ALLOCATION_FAILURE)
    GPUP_CL_ERR_(CL_OUT_OF_RESOURCES)
    GPUP_CL_ERR_(CL_OUT_OF_HOST_MEMORY)
    GPUP_CL_ERR_(CL_MEM_COPY_OVERLAP)
    GPUP_CL_ERR_(CL_BUILD_PROGRAM_FAILURE)
    GPUP_CL_ERR_(CL_MAP_FAILURE)
    GPUP_CL_ERR_(CL_MISALIGNED_SUB_BUFFER_OFFSET)
    GPUP_CL_ERR_(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
    GPUP_CL_ERR_(CL_COMPILE_PROGRAM_FAILURE)
    GPUP_CL_ERR_(CL_LINK_PROGRAM_FAILURE)
    GPUP_CL_ERR_(CL_KERNEL_ARG_INFO_NOT_AVAILABLE)
    GPUP_CL_ERR_(CL_INVALID_VALUE)
    GPUP_CL_ERR_(CL_INVALID_DEVICE_TYPE)
    GPUP_CL_ERR_(CL_INVALID_PLATFORM)
    GPUP_CL_ERR_(CL_INVALID_DEVICE)
    GPUP_CL_ERR_(CL_INVALID_CONTEXT)
    GPUP_CL_ERR_(CL_INVALID_COMMAND_QUEUE)
    GPUP_CL_ERR_(CL_INVALID_HOST_PTR)
    GPUP_CL_ERR_(CL_INVALID_MEM_OBJECT)
    GPUP_CL_ERR_(CL_INVALID_BINARY)
    GPUP_CL_ERR_(CL_INVALID_BUILD_OPTIONS)
    GPUP_CL_ERR_(CL_INVALID_PROGRAM)
    GPUP_CL_ERR_(CL_INVALID_PROGRAM_EXECUTABLE)
    GPUP_CL_ERR_(CL_INVALID_KERNEL_NAME)
    GPUP_CL_ERR_(CL_INVALID_KERNEL)
    GPUP_CL_ERR_(CL_INVALID_ARG_INDEX)
    GPUP_CL_ERR_(CL_INVALID_ARG_VALUE)
    GPUP_CL_ERR_(CL_INVALID_ARG_SIZE)
    GPUP_CL_ERR_(CL_INVALID_KERNEL_ARGS)
    GPUP_CL_ERR_(CL_INVALID_WORK_DIMENSION)
    GPUP_CL_ERR_(CL_INVALID_WORK_GROUP_SIZE)
    GPUP_CL_ERR_(CL_INVALID_WORK_ITEM_SIZE)
    GPUP_CL_ERR_(CL_INVALID_GLOBAL_OFFSET)
    GPUP_CL_ERR_(CL_INVALID_EVENT_WAIT_LIST)
    GPUP_CL_ERR_(CL_INVALID_EVENT)
    GPUP_CL_ERR_(CL_INVALID_OPERATION)
    GPUP_CL_ERR_(CL_INVALID_BUFFER_SIZE)
    GPUP_CL_ERR_(CL_INVALID_GLOBAL_WORK_SIZE)
    GPUP_CL_ERR_(CL_INVALID_COMPILER_OPTIONS)
    GPUP_CL_ERR_(CL_INVALID_LINKER_OPTIONS)
    GPUP_CL_ERR_(CL_LINKER_NOT_AVAILABLE)
    GPUP_CL_ERR_(CL_IMAGE_FORMAT_MISMATCH)
    GPUP_CL_ERR_(CL_IMAGE_FORMAT_NOT_SUPPORTED)
    GPUP_CL_ERR_(CL_INVALID_IMAGE_FORMAT_DESCRIPTOR)
    GPUP_CL_ERR_(CL_INVALID_IMAGE_SIZE)
    GPUP_CL_ERR_(CL_INVALID_IMAGE_DESCRIPTOR)
    GPUP_CL_ERR_(CL_INVALID_SAMPLER)
#undef GPUP_CL_ERR_
    default:
      return "CL_UNKNOWN_ERROR";
  }
}

gpup_status status_from_cl(cl_int err) {
  switch (err) {
    case CL_SUCCESS:
      return GPUP_STATUS_SUCCESS;
    case CL_OUT_OF_HOST_MEMORY:
    case CL_OUT_OF_RESOURCES:
    case CL_MEM_OBJECT_ALLOCATION_FAILURE:
      return GPUP_STATUS_NO_MEMORY;
    case CL_INVALID_VALUE:
    case CL_INVALID_BUFFER_SIZE:
    case CL_INVALID_HOST_PTR:
    case CL_MEM_COPY_OVERLAP:
    case CL_MISALIGNED_SUB_BUFFER_OFFSET:
    case CL_INVALID_ARG_INDEX:
    case CL_INVALID_ARG_VALUE:
    case CL_INVALID_ARG_SIZE:
    case CL_INVALID_KERNEL_ARGS:
    case CL_INVALID_WORK_DIMENSION:
    case CL_INVALID_WORK_GROUP_SIZE:
    case CL_INVALID_WORK_ITEM_SIZE:
    case CL_INVALID_GLOBAL_OFFSET:
    case CL_INVALID_GLOBAL_WORK_SIZE:
    case CL_IMAGE_FORMAT_NOT_SUPPORTED:
    case CL_INVALID_IMAGE_FORMAT_DESCRIPTOR:
    case CL_INVALID_IMAGE_SIZE:
    case CL_INVALID_IMAGE_DESCRIPTOR:
    case CL_INVALID_SAMPLER:
      return GPUP_STATUS_INVALID_PARAMETER;
    case CL_INVALID_KERNEL_NAME:
      return GPUP_STATUS_NOT_FOUND;
    case CL_DEVICE_NOT_AVAILABLE:
      return GPUP_STATUS_DEVICE_REMOVED;
    default:
      return GPUP_STATUS_DEVICE_ERROR;
  }
}

namespace {

constexpr const char* kDefaultPlatform = "Portable Computing Language";
constexpr std::array<std::string_view, 5> kConfigKeys = {"platform", "device", "sandbox_ro", "sandbox_dev",
                                                         "sandbox_exec"};

std::string platform_string(cl_platform_id p, cl_platform_info what) {
  size_t n = 0;
  if (clGetPlatformInfo(p, what, 0, nullptr, &n) != CL_SUCCESS || n == 0) return {};
  std::string s(n, '\0');
  if (clGetPlatformInfo(p, what, n, s.data(), nullptr) != CL_SUCCESS) return {};
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

std::string device_string(cl_device_id d, cl_device_info what) {
  size_t n = 0;
  if (clGetDeviceInfo(d, what, 0, nullptr, &n) != CL_SUCCESS || n == 0) return {};
  std::string s(n, '\0');
  if (clGetDeviceInfo(d, what, n, s.data(), nullptr) != CL_SUCCESS) return {};
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

template <typename T>
T device_value(cl_device_id d, cl_device_info what, T fallback) {
  T v{};
  return clGetDeviceInfo(d, what, sizeof(v), &v, nullptr) == CL_SUCCESS ? v : fallback;
}

// Cuts s at the last space that leaves it shorter than limit bytes.
std::string cut_at_space(const std::string& s, size_t limit) {
  if (s.size() < limit) return s;
  const size_t space = s.rfind(' ', limit - 1);
  return space == std::string::npos ? std::string() : s.substr(0, space);
}

DeviceFacts read_facts(cl_platform_id platform, cl_device_id device) {
  DeviceFacts f;
  f.platform = platform;
  f.device = device;
  GPUPDDI_DEVICEINFO& info = f.info;
  copy_fixed_string(info.Name, device_string(device, CL_DEVICE_NAME));
  copy_fixed_string(info.Vendor, device_string(device, CL_DEVICE_VENDOR));
  copy_fixed_string(info.DriverVersion, device_string(device, CL_DRIVER_VERSION));
  copy_fixed_string(info.Platform, platform_string(platform, CL_PLATFORM_NAME));
  info.GlobalMemSize = device_value<cl_ulong>(device, CL_DEVICE_GLOBAL_MEM_SIZE, 0);
  info.MaxAllocSize = device_value<cl_ulong>(device, CL_DEVICE_MAX_MEM_ALLOC_SIZE, 0);
  info.LocalMemSize = device_value<cl_ulong>(device, CL_DEVICE_LOCAL_MEM_SIZE, 0);
  info.ComputeUnits = device_value<cl_uint>(device, CL_DEVICE_MAX_COMPUTE_UNITS, 1);
  const size_t wg = device_value<size_t>(device, CL_DEVICE_MAX_WORK_GROUP_SIZE, 1);
  info.MaxWorkGroupSize = static_cast<uint32_t>(std::min<size_t>(wg, UINT32_MAX));
  // At least one byte: the OpenCL minimum is the size of the largest built-in type anyway.
  info.MemBaseAddrAlignBits = std::max<cl_uint>(device_value<cl_uint>(device, CL_DEVICE_MEM_BASE_ADDR_ALIGN, 8), 8);
  f.align_bytes = info.MemBaseAddrAlignBits / 8;

  f.max_dims = std::clamp<cl_uint>(device_value<cl_uint>(device, CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS, 3), 1, 3);
  size_t sizes[64] = {};
  const cl_uint all_dims = std::min<cl_uint>(device_value<cl_uint>(device, CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS, 3), 64);
  if (clGetDeviceInfo(device, CL_DEVICE_MAX_WORK_ITEM_SIZES, sizeof(size_t) * all_dims, sizes, nullptr) == CL_SUCCESS) {
    for (uint32_t i = 0; i < f.max_dims; ++i) f.max_work_item_sizes[i] = sizes[i];
  }
  f.max_parameter_size = device_value<size_t>(device, CL_DEVICE_MAX_PARAMETER_SIZE, 256);
  f.unified_memory = device_value<cl_bool>(device, CL_DEVICE_HOST_UNIFIED_MEMORY, CL_FALSE) == CL_TRUE;

  GPUP_OCL_UMD_INFO& umd = f.umd;
  umd.ContractVersion = GPUP_OCL_CONTRACT_VERSION;
  umd.ProgramFormats =
      GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_SOURCE) | GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_BINARY) |
      GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_COMPILE) | GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_LINK);
  umd.AddressBits = device_value<cl_uint>(device, CL_DEVICE_ADDRESS_BITS, 64);
  umd.MaxWorkItemDimensions = f.max_dims;
  for (uint32_t i = 0; i < 3; ++i) umd.MaxWorkItemSizes[i] = f.max_work_item_sizes[i];
  umd.MaxParameterSize = f.max_parameter_size;
  umd.MaxConstantBufferSize = device_value<cl_ulong>(device, CL_DEVICE_MAX_CONSTANT_BUFFER_SIZE, 0);
  copy_fixed_string(umd.DeviceVersion, device_string(device, CL_DEVICE_VERSION));
  copy_fixed_string(umd.OpenCLCVersion, device_string(device, CL_DEVICE_OPENCL_C_VERSION));
  copy_fixed_string(umd.Extensions, cut_at_space(device_string(device, CL_DEVICE_EXTENSIONS), sizeof(umd.Extensions)));
  f.device_info = read_device_info_list(device);
  return f;
}

// The formats clGetSupportedImageFormats gives for every image type and access flag of
// GPUP_OCL_QUERY_IMAGE_FORMATS. Empty unless the device supports images and its memory is the
// host's (image allocations alias a buffer and an image over the same host memory, which only
// stays coherent there). Access flags the implementation does not know (KERNEL_READ_AND_WRITE
// before OpenCL 2.0) are left out.
ImageFormats read_image_formats(cl_context context, const DeviceFacts& f) {
  ImageFormats out;
  if (device_value<cl_bool>(f.device, CL_DEVICE_IMAGE_SUPPORT, CL_FALSE) != CL_TRUE) return out;
  if (!f.unified_memory) {
    log_message(GPUPDDI_LOG_INFO, "images not offered: the device's memory is not the host's");
    return out;
  }
  constexpr cl_uint kMaxFormats = 4096;
  for (uint32_t type : kImageTypes) {
    for (uint64_t access : kImageAccessFlags) {
      cl_uint n = 0;
      if (clGetSupportedImageFormats(context, access, type, 0, nullptr, &n) != CL_SUCCESS || n > kMaxFormats) continue;
      std::vector<cl_image_format> formats(n);
      if (n > 0 && clGetSupportedImageFormats(context, access, type, n, formats.data(), nullptr) != CL_SUCCESS) continue;
      std::vector<ImageFormats::Format> list;
      list.reserve(n);
      for (const cl_image_format& one : formats) list.push_back({one.image_channel_order, one.image_channel_data_type});
      out.set(type, access, std::move(list));
    }
  }
  return out;
}

void CL_CALLBACK context_error(const char* errinfo, const void*, size_t, void*) {
  logf(GPUPDDI_LOG_ERROR, "OpenCL context error: {}", printable(errinfo ? errinfo : "", 512));
}

}  // namespace

Result<std::unique_ptr<Adapter>> Adapter::start(const char* config) {
  auto parsed = parse_config(config, kConfigKeys);
  if (!parsed) return parsed.error();
  const auto& cfg = parsed.value();

  cl_uint nplatforms = 0;
  cl_int err = clGetPlatformIDs(0, nullptr, &nplatforms);
  if (err != CL_SUCCESS || nplatforms == 0) {
    return Error(GPUP_STATUS_NOT_FOUND, fmt::format("no OpenCL platform ({} from clGetPlatformIDs)", cl_error_name(err)));
  }
  std::vector<cl_platform_id> platforms(nplatforms);
  if ((err = clGetPlatformIDs(nplatforms, platforms.data(), nullptr)) != CL_SUCCESS) {
    return Error(GPUP_STATUS_DEVICE_ERROR, fmt::format("clGetPlatformIDs: {}", cl_error_name(err)));
  }
  std::vector<std::string> names;
  for (cl_platform_id p : platforms) names.push_back(platform_string(p, CL_PLATFORM_NAME));
  auto describe_platforms = [&] {
    std::string s;
    for (size_t i = 0; i < names.size(); ++i) s += fmt::format("{}'{}'", i ? ", " : "", names[i]);
    return s;
  };

  size_t chosen = names.size();
  if (auto it = cfg.find("platform"); it != cfg.end()) {
    for (size_t i = 0; i < names.size() && chosen == names.size(); ++i) {
      if (names[i].find(it->second) != std::string::npos) chosen = i;
    }
    if (chosen == names.size()) {
      return Error(GPUP_STATUS_NOT_FOUND, fmt::format("no OpenCL platform name contains '{}'; platforms: {}",
                                                      printable(it->second), describe_platforms()));
    }
  } else {
    for (size_t i = 0; i < names.size() && chosen == names.size(); ++i) {
      if (names[i].find(kDefaultPlatform) != std::string::npos) chosen = i;
    }
    if (chosen == names.size()) chosen = 0;
  }
  cl_platform_id platform = platforms[chosen];

  cl_uint ndevices = 0;
  err = clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 0, nullptr, &ndevices);
  if (err != CL_SUCCESS && err != CL_DEVICE_NOT_FOUND) {
    return Error(GPUP_STATUS_DEVICE_ERROR, fmt::format("clGetDeviceIDs on '{}': {}", names[chosen], cl_error_name(err)));
  }
  if (err == CL_DEVICE_NOT_FOUND) ndevices = 0;
  std::vector<cl_device_id> devices(ndevices);
  if (ndevices > 0 && (err = clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, ndevices, devices.data(), nullptr)) != CL_SUCCESS) {
    return Error(GPUP_STATUS_DEVICE_ERROR, fmt::format("clGetDeviceIDs on '{}': {}", names[chosen], cl_error_name(err)));
  }
  uint64_t index = 0;
  if (auto it = cfg.find("device"); it != cfg.end() && !parse_u64(it->second, &index)) {
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("config device='{}' is not a device index", printable(it->second)));
  }
  if (index >= devices.size()) {
    std::string list;
    for (size_t i = 0; i < devices.size(); ++i) {
      list += fmt::format("{}#{} '{}'", i ? ", " : "", i, device_string(devices[i], CL_DEVICE_NAME));
    }
    return Error(GPUP_STATUS_NOT_FOUND, fmt::format("platform '{}' has no device #{}; it has {} device(s){}{}",
                                                    names[chosen], index, devices.size(), list.empty() ? "" : ": ",
                                                    list));
  }

  auto adapter = std::make_unique<Adapter>();
  adapter->facts = read_facts(platform, devices[index]);
  const cl_context_properties props[] = {CL_CONTEXT_PLATFORM, reinterpret_cast<cl_context_properties>(platform), 0};
  cl_device_id device = devices[index];
  adapter->context.reset(clCreateContext(props, 1, &device, context_error, nullptr, &err));
  if (err != CL_SUCCESS) {
    return Error(status_from_cl(err), fmt::format("clCreateContext: {} ({})", cl_error_name(err), err));
  }
  adapter->facts.image_formats = read_image_formats(adapter->context.get(), adapter->facts);
  adapter->facts.image_formats_list = adapter->facts.image_formats.encode();
  auto needs = sandbox_needs(cfg);
  if (!needs) return needs.error();
  adapter->sandbox_needs_text = std::move(*needs);
  const GPUPDDI_DEVICEINFO& info = adapter->facts.info;
  logf(GPUPDDI_LOG_INFO,
       "adapter started on '{}' device #{} '{}': {} MiB global, {} MiB max alloc, {} CUs, {}-byte device info list",
       info.Platform, index, info.Name, info.GlobalMemSize >> 20, info.MaxAllocSize >> 20, info.ComputeUnits,
       adapter->facts.device_info.size());
  return adapter;
}

Adapter::~Adapter() {
  OwnedObjects<Device> devices;
  {
    std::lock_guard lock(mu_);
    devices.swap(devices_);
  }
  if (!devices.empty()) logf(GPUPDDI_LOG_INFO, "adapter stop: destroying {} device(s) still open", devices.size());
  devices.clear();
  processes.clear();
}

gpup_status Adapter::query(const GPUPDDI_ARG_QUERYADAPTERINFO* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->pOutputDataWritten != nullptr) *args->pOutputDataWritten = 0;
  const GPUPDDI_DEVICEINFO& info = facts.info;
  // Adding a query type: a case here and in the mock, a conformance test. Others are refused.
  switch (args->Type) {
    case GPUPDDI_QAITYPE_UMDRIVERPRIVATE:
      return handle_umd_private_query(args, facts.umd, facts.device_info, facts.image_formats_list);
    case GPUPDDI_QAITYPE_DRIVERCAPS: {
      GPUPDDI_DRIVERCAPS caps{};
      caps.WDDMVersion = 0x3000;
      caps.MemoryManagementCaps.ParavirtualizationSupported = 1;
      // Each VM's device work runs in its own worker process, in its own address space.
      caps.MemoryManagementCaps.IoMmuSecureModeSupported = 1;
      caps.ComputeOnly = 1;
      caps.SupportPerEngineTDR = 0;  // OpenCL cannot abort a running kernel
      caps.NodeCount = 1;
      caps.MaxAllocationSize = info.MaxAllocSize;
      return write_query_output(args, caps);
    }
    case GPUPDDI_QAITYPE_QUERYSEGMENT:
      return write_query_output(args, standard_segments(info.GlobalMemSize));
    case GPUPDDI_QAITYPE_DEVICEINFO:
      return write_query_output(args, info);
    case GPUPDDI_QAITYPE_GPUMMUCAPS:
      return write_query_output(args, standard_mmu_caps(facts.unified_memory));
    case GPUPDDI_QAITYPE_PAGETABLELEVELDESC:
      return answer_page_table_level(args);
    case GPUPDDI_QAITYPE_GPUPCAPS:
      return write_query_output(args, GPUPDDI_GPUPCAPS{});  // no hibernation / migration yet
    case GPUPDDI_QAITYPE_SANDBOXNEEDS:
      return write_query_text(args, sandbox_needs_text);
    default:
      logf(GPUPDDI_LOG_WARN, "QueryAdapterInfo: unsupported type {}", args->Type);
      return GPUP_STATUS_NOT_SUPPORTED;
  }
}

gpup_status Adapter::create_device(GPUPDDI_ARG_CREATEDEVICE* args) {
  if (!arg_ok(args) || args->Flags != 0) return GPUP_STATUS_INVALID_PARAMETER;
  Process* process = processes.find(args->hKmdProcess);
  if (process == nullptr) return GPUP_STATUS_INVALID_HANDLE;
  if (!process->may_create_devices()) {
    logf(GPUPDDI_LOG_WARN, "CreateDevice: process {} is a VM worker process, which does no device work", process->id);
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  cl_int err = CL_SUCCESS;
  ClQueue queue(clCreateCommandQueue(context.get(), facts.device, 0, &err));
  if (err != CL_SUCCESS) {
    logf(GPUPDDI_LOG_ERROR, "CreateDevice: clCreateCommandQueue: {} ({})", cl_error_name(err), err);
    return status_from_cl(err);
  }
  args->hDevice = adopt(mu_, devices_, std::make_unique<Device>(this, process, std::move(queue)));
  return GPUP_STATUS_SUCCESS;
}

Result<cl_sampler> Adapter::sampler(const GPUP_OCL_SAMPLER_DESC& desc) {
  const auto key = std::make_tuple(desc.NormalizedCoords, desc.AddressingMode, desc.FilterMode);
  std::lock_guard lock(sampler_mu_);
  if (auto it = samplers_.find(key); it != samplers_.end()) return it->second.get();
  if (samplers_.size() >= kMaxSamplers) {
    // Unreachable with checked descriptors; never evict (kernels may still hold the sampler).
    return Error(GPUP_STATUS_NO_MEMORY, "too many distinct samplers");
  }
  cl_int err = CL_SUCCESS;
  ClSampler s(clCreateSampler(context.get(), desc.NormalizedCoords ? CL_TRUE : CL_FALSE, desc.AddressingMode,
                              desc.FilterMode, &err));
  if (err != CL_SUCCESS) {
    const gpup_status st = status_from_cl(err);
    return Error(st == GPUP_STATUS_NO_MEMORY ? st : GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("clCreateSampler: {} ({})", cl_error_name(err), err));
  }
  cl_sampler raw = s.get();
  samplers_.emplace(key, std::move(s));
  return raw;
}

void Adapter::destroy_device(Device* device) {
  take(mu_, devices_, device, "DestroyDevice: unknown device");  // destroyed outside mu_
}

}  // namespace gpup::kmd::ocl
