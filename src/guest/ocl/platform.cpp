// The gpup platform and its devices (the partition's adapters), and contexts.
//
// The platform appears when the process can reach its partition (GPUP_VRD, set by `gpup run`);
// otherwise the ICD reports no platform and stays out of the way. Device information is fetched
// from the host KMD once (GPUP_OCL_QUERY_DEVICE_INFO) and answered locally from then on, with the
// values a partition changes overridden: its memory is the partition's budget, its name says what
// it is, and features the paravirtual path does not carry (SVM, pipes, device-side enqueue,
// sub-devices, IL programs, images made from buffers; images altogether when the KMD or device
// cannot carry them) are reported absent.
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <set>
#include <sstream>

#include "guest/ocl/icd.h"

namespace gpup::ocl {

namespace {

constexpr const char* kPlatformName = "gpup";
constexpr const char* kPlatformVendor = "gpup";
constexpr const char* kIcdSuffix = "GPUP";
constexpr uint64_t kVaArena = uint64_t{1} << 40;  // 1 TiB of GPU VA per process

_cl_platform_id g_platform;
std::once_flag g_once;
cl_int g_init_error = CL_PLATFORM_NOT_FOUND_KHR;

// Extensions the partition device keeps: those that only concern the kernel language (the host
// compiler implements them) or queries this ICD answers. API extensions whose entry points the
// ICD does not provide are dropped.
const std::set<std::string, std::less<>> kKeptExtensions = {
    "cl_khr_byte_addressable_store", "cl_khr_global_int32_base_atomics", "cl_khr_global_int32_extended_atomics",
    "cl_khr_local_int32_base_atomics", "cl_khr_local_int32_extended_atomics", "cl_khr_int64_base_atomics",
    "cl_khr_int64_extended_atomics", "cl_khr_fp16", "cl_khr_fp64", "cl_khr_icd", "cl_khr_extended_versioning",
    "cl_khr_integer_dot_product", "cl_khr_expect_assume", "cl_khr_extended_bit_ops", "cl_ext_float_atomics",
    "cl_khr_select_fprounding_mode", "cl_khr_spirv_no_integer_wrap_decoration", "cl_khr_kernel_clock",
    "cl_khr_device_uuid"};

// OpenCL C features a partition does not carry (images only without image support).
const std::set<std::string, std::less<>> kDroppedFeatures = {"__opencl_c_pipes", "__opencl_c_device_enqueue"};
const std::set<std::string, std::less<>> kImageFeatures = {"__opencl_c_images", "__opencl_c_3d_image_writes",
                                                           "__opencl_c_read_write_images"};
const std::set<std::string, std::less<>> kImageExtensions = {"cl_khr_3d_image_writes", "cl_khr_depth_images"};

std::vector<uint8_t> text_of(std::string_view s) {
  std::vector<uint8_t> v(s.begin(), s.end());
  v.push_back(0);
  return v;
}
template <typename T>
std::vector<uint8_t> bytes_of(const T& value) {
  std::vector<uint8_t> v(sizeof(T));
  std::memcpy(v.data(), &value, sizeof(T));
  return v;
}

std::string string_of(const std::vector<uint8_t>& v) {
  std::string s(v.begin(), v.end());
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

std::string filter_words(const std::string& list, const auto& keep) {
  std::istringstream in(list);
  std::string word, out;
  while (in >> word) {
    if (!keep(word)) continue;
    if (!out.empty()) out += ' ';
    out += word;
  }
  return out;
}

// cl_name_version arrays filtered like their string forms.
std::vector<uint8_t> filter_name_versions(const std::vector<uint8_t>& raw, const auto& keep) {
  std::vector<uint8_t> out;
  const size_t n = raw.size() / sizeof(cl_name_version);
  for (size_t i = 0; i < n; ++i) {
    cl_name_version nv;
    std::memcpy(&nv, raw.data() + i * sizeof nv, sizeof nv);
    nv.name[CL_NAME_VERSION_MAX_NAME_SIZE - 1] = '\0';
    if (!keep(std::string(nv.name))) continue;
    const auto* p = reinterpret_cast<const uint8_t*>(&nv);
    out.insert(out.end(), p, p + sizeof nv);
  }
  return out;
}

cl_int query_device_info(cl_device_id d) {
  std::vector<uint8_t> out(64 * 1024);
  GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_DEVICE_INFO};
  GPUPKMT_QUERYADAPTERINFO q{};
  q.hAdapter = d->adapter;
  q.Type = GPUPDDI_QAITYPE_UMDRIVERPRIVATE;
  q.pInputData = &h;
  q.InputDataSize = sizeof h;
  q.pOutputData = out.data();
  q.OutputDataSize = static_cast<uint32_t>(out.size());
  gpup_status s = GpupKmtQueryAdapterInfo(&q);
  if (GPUP_FAILED(s)) {
    log_failure("querying the host device's information", s);
    return CL_DEVICE_NOT_AVAILABLE;
  }
  GPUP_OCL_INFO_LIST list;
  if (q.OutputDataWritten < sizeof list) return CL_DEVICE_NOT_AVAILABLE;
  std::memcpy(&list, out.data(), sizeof list);
  if (list.Magic != GPUP_OCL_INFO_LIST_MAGIC || list.TotalSize > q.OutputDataWritten) return CL_DEVICE_NOT_AVAILABLE;
  size_t at = sizeof list;
  for (uint32_t i = 0; i < list.Count; ++i) {
    GPUP_OCL_INFO_RECORD r;
    if (at + sizeof r > list.TotalSize) return CL_DEVICE_NOT_AVAILABLE;
    std::memcpy(&r, out.data() + at, sizeof r);
    at += sizeof r;
    if (r.Size > list.TotalSize - at) return CL_DEVICE_NOT_AVAILABLE;
    d->info[r.Param].assign(out.data() + at, out.data() + at + r.Size);
    at += (r.Size + 7u) & ~size_t{7};
  }
  return CL_SUCCESS;
}

// The host device's image formats per (image type, access), read once.
void query_image_formats(cl_device_id d) {
  std::vector<uint8_t> out(64 * 1024);
  GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_IMAGE_FORMATS};
  GPUPKMT_QUERYADAPTERINFO q{};
  q.hAdapter = d->adapter;
  q.Type = GPUPDDI_QAITYPE_UMDRIVERPRIVATE;
  q.pInputData = &h;
  q.InputDataSize = sizeof h;
  q.pOutputData = out.data();
  q.OutputDataSize = static_cast<uint32_t>(out.size());
  if (gpup_status s = GpupKmtQueryAdapterInfo(&q); GPUP_FAILED(s)) {
    log_failure("querying the host device's image formats", s);
    return;
  }
  GPUP_OCL_INFO_LIST list;
  if (q.OutputDataWritten < sizeof list) return;
  std::memcpy(&list, out.data(), sizeof list);
  if (list.Magic != GPUP_OCL_INFO_LIST_MAGIC || list.TotalSize > q.OutputDataWritten) return;
  size_t at = sizeof list;
  for (uint32_t i = 0; i < list.Count; ++i) {
    GPUP_OCL_INFO_RECORD r;
    if (at + sizeof r > list.TotalSize) return;
    std::memcpy(&r, out.data() + at, sizeof r);
    at += sizeof r;
    if (r.Size > list.TotalSize - at) return;
    std::vector<cl_image_format> formats(r.Size / sizeof(cl_image_format));
    if (!formats.empty()) std::memcpy(formats.data(), out.data() + at, formats.size() * sizeof(cl_image_format));
    d->image_formats[r.Param] = std::move(formats);
    at += (r.Size + 7u) & ~size_t{7};
  }
}

// The partition's view of the host device.
void apply_partition_overrides(cl_device_id d) {
  auto& info = d->info;
  const std::string host_name = string_of(info[CL_DEVICE_NAME]);
  const std::string host_vendor = string_of(info[CL_DEVICE_VENDOR]);
  info[CL_DEVICE_NAME] = text_of("gpup partition of " + host_name);
  info[CL_DEVICE_VENDOR] = text_of("gpup (" + host_vendor + ")");
  info[CL_DEVICE_PLATFORM] = bytes_of(d->platform);
  info[CL_DEVICE_PARENT_DEVICE] = bytes_of(cl_device_id{nullptr});
  info[CL_DEVICE_REFERENCE_COUNT] = bytes_of(cl_uint{1});
  info[CL_DEVICE_AVAILABLE] = bytes_of(cl_bool{CL_TRUE});

  // Memory: the partition's budget.
  const cl_ulong host_global = d->scalar<cl_ulong>(CL_DEVICE_GLOBAL_MEM_SIZE, d->budget);
  const cl_ulong global = d->budget != 0 ? d->budget : host_global;
  const cl_ulong max_alloc = std::min(d->scalar<cl_ulong>(CL_DEVICE_MAX_MEM_ALLOC_SIZE, global), global);
  info[CL_DEVICE_GLOBAL_MEM_SIZE] = bytes_of(global);
  info[CL_DEVICE_MAX_MEM_ALLOC_SIZE] = bytes_of(max_alloc);
  if (d->scalar<cl_ulong>(CL_DEVICE_MAX_CONSTANT_BUFFER_SIZE, 0) > max_alloc)
    info[CL_DEVICE_MAX_CONSTANT_BUFFER_SIZE] = bytes_of(max_alloc);

  // Images are carried when the host device has them and its KMD speaks contract 3; images made
  // from buffers (1D image buffers, cl_khr_image2d_from_buffer) are not.
  if (!d->images) {
    info[CL_DEVICE_IMAGE_SUPPORT] = bytes_of(cl_bool{CL_FALSE});
    for (cl_device_info p : {CL_DEVICE_MAX_READ_IMAGE_ARGS, CL_DEVICE_MAX_WRITE_IMAGE_ARGS,
                             CL_DEVICE_MAX_READ_WRITE_IMAGE_ARGS, CL_DEVICE_MAX_SAMPLERS,
                             CL_DEVICE_IMAGE_PITCH_ALIGNMENT, CL_DEVICE_IMAGE_BASE_ADDRESS_ALIGNMENT}) {
      if (info.count(p)) info[p] = bytes_of(cl_uint{0});
    }
    for (cl_device_info p : {CL_DEVICE_IMAGE2D_MAX_WIDTH, CL_DEVICE_IMAGE2D_MAX_HEIGHT, CL_DEVICE_IMAGE3D_MAX_WIDTH,
                             CL_DEVICE_IMAGE3D_MAX_HEIGHT, CL_DEVICE_IMAGE3D_MAX_DEPTH, CL_DEVICE_IMAGE_MAX_ARRAY_SIZE}) {
      if (info.count(p)) info[p] = bytes_of(size_t{0});
    }
  }
  if (info.count(CL_DEVICE_IMAGE_MAX_BUFFER_SIZE)) info[CL_DEVICE_IMAGE_MAX_BUFFER_SIZE] = bytes_of(size_t{0});
  // Features the paravirtual path does not carry.
  for (cl_device_info p : {CL_DEVICE_MAX_PIPE_ARGS,
                           CL_DEVICE_PIPE_MAX_ACTIVE_RESERVATIONS, CL_DEVICE_PIPE_MAX_PACKET_SIZE,
                           CL_DEVICE_MAX_ON_DEVICE_QUEUES, CL_DEVICE_MAX_ON_DEVICE_EVENTS,
                           CL_DEVICE_QUEUE_ON_DEVICE_PREFERRED_SIZE, CL_DEVICE_QUEUE_ON_DEVICE_MAX_SIZE,
                           CL_DEVICE_PARTITION_MAX_SUB_DEVICES}) {
    if (info.count(p)) info[p] = bytes_of(cl_uint{0});
  }
  info[CL_DEVICE_SVM_CAPABILITIES] = bytes_of(cl_device_svm_capabilities{0});
  if (info.count(CL_DEVICE_PIPE_SUPPORT)) info[CL_DEVICE_PIPE_SUPPORT] = bytes_of(cl_bool{CL_FALSE});
  if (info.count(CL_DEVICE_DEVICE_ENQUEUE_CAPABILITIES))
    info[CL_DEVICE_DEVICE_ENQUEUE_CAPABILITIES] = bytes_of(cl_device_device_enqueue_capabilities{0});
  if (info.count(CL_DEVICE_QUEUE_ON_DEVICE_PROPERTIES))
    info[CL_DEVICE_QUEUE_ON_DEVICE_PROPERTIES] = bytes_of(cl_command_queue_properties{0});
  info[CL_DEVICE_PARTITION_PROPERTIES] = bytes_of(cl_device_partition_property{0});
  info[CL_DEVICE_PARTITION_AFFINITY_DOMAIN] = bytes_of(cl_device_affinity_domain{0});
  info[CL_DEVICE_PARTITION_TYPE] = {};
  info[CL_DEVICE_BUILT_IN_KERNELS] = text_of("");
  if (info.count(CL_DEVICE_BUILT_IN_KERNELS_WITH_VERSION)) info[CL_DEVICE_BUILT_IN_KERNELS_WITH_VERSION] = {};
  if (info.count(CL_DEVICE_IL_VERSION)) info[CL_DEVICE_IL_VERSION] = text_of("");
  if (info.count(CL_DEVICE_ILS_WITH_VERSION)) info[CL_DEVICE_ILS_WITH_VERSION] = {};
  if (info.count(CL_DEVICE_MAX_NUM_SUB_GROUPS)) info[CL_DEVICE_MAX_NUM_SUB_GROUPS] = bytes_of(cl_uint{0});
  if (info.count(CL_DEVICE_SUB_GROUP_INDEPENDENT_FORWARD_PROGRESS))
    info[CL_DEVICE_SUB_GROUP_INDEPENDENT_FORWARD_PROGRESS] = bytes_of(cl_bool{CL_FALSE});
  // In-order execution satisfies out-of-order queues; profiling is measured by the guest.
  const cl_command_queue_properties qp = CL_QUEUE_OUT_OF_ORDER_EXEC_MODE_ENABLE | CL_QUEUE_PROFILING_ENABLE;
  info[CL_DEVICE_QUEUE_PROPERTIES] = bytes_of(qp);  // == CL_DEVICE_QUEUE_ON_HOST_PROPERTIES
  info[CL_DEVICE_PROFILING_TIMER_RESOLUTION] = bytes_of(size_t{1});

  const bool images = d->images;
  auto keep_ext = [images](const std::string& e) {
    return kKeptExtensions.count(e) != 0 || (images && kImageExtensions.count(e) != 0);
  };
  info[CL_DEVICE_EXTENSIONS] = text_of(filter_words(string_of(info[CL_DEVICE_EXTENSIONS]), keep_ext));
  if (info.count(CL_DEVICE_EXTENSIONS_WITH_VERSION))
    info[CL_DEVICE_EXTENSIONS_WITH_VERSION] = filter_name_versions(info[CL_DEVICE_EXTENSIONS_WITH_VERSION], keep_ext);
  if (info.count(CL_DEVICE_OPENCL_C_FEATURES)) {
    auto keep_feature = [images](const std::string& f) {
      return kDroppedFeatures.count(f) == 0 && (images || kImageFeatures.count(f) == 0);
    };
    info[CL_DEVICE_OPENCL_C_FEATURES] = filter_name_versions(info[CL_DEVICE_OPENCL_C_FEATURES], keep_feature);
  }
  if (!d->linker_available) info[CL_DEVICE_LINKER_AVAILABLE] = bytes_of(cl_bool{CL_FALSE});
}

void cache_scalars(cl_device_id d) {
  d->type = d->scalar<cl_device_type>(CL_DEVICE_TYPE, CL_DEVICE_TYPE_GPU);
  d->max_alloc = d->scalar<cl_ulong>(CL_DEVICE_MAX_MEM_ALLOC_SIZE, 0);
  d->mem_base_addr_align = d->scalar<cl_uint>(CL_DEVICE_MEM_BASE_ADDR_ALIGN, 1024);
  d->max_work_group_size = d->scalar<size_t>(CL_DEVICE_MAX_WORK_GROUP_SIZE, 1);
  d->max_work_item_dims = std::min<cl_uint>(3, d->scalar<cl_uint>(CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS, 3));
  auto it = d->info.find(CL_DEVICE_MAX_WORK_ITEM_SIZES);
  if (it != d->info.end()) {
    const size_t n = std::min<size_t>(3, it->second.size() / sizeof(size_t));
    std::memcpy(d->max_work_item_sizes, it->second.data(), n * sizeof(size_t));
  }
  d->queue_properties = d->scalar<cl_command_queue_properties>(CL_DEVICE_QUEUE_PROPERTIES, 0);
  d->non_uniform_work_groups = d->scalar<cl_bool>(CL_DEVICE_NON_UNIFORM_WORK_GROUP_SUPPORT, CL_FALSE) == CL_TRUE;
  const std::string version = string_of(d->info[CL_DEVICE_VERSION]);
  unsigned major = 1, minor = 2;
  if (std::sscanf(version.c_str(), "OpenCL %u.%u", &major, &minor) == 2) {
    d->opencl_major = major;
    d->opencl_minor = minor;
  }
}

cl_int open_device(cl_device_id d, const GPUPKMT_ADAPTERINFO& adapter) {
  d->platform = &g_platform;
  d->adapter = adapter.hAdapter;
  d->budget = adapter.Budget;

  GPUPDDI_GPUMMUCAPS mmu{};
  GPUPKMT_QUERYADAPTERINFO q{};
  q.hAdapter = d->adapter;
  q.Type = GPUPDDI_QAITYPE_GPUMMUCAPS;
  q.pOutputData = &mmu;
  q.OutputDataSize = sizeof mmu;
  if (gpup_status s = GpupKmtQueryAdapterInfo(&q); GPUP_FAILED(s)) {
    log_failure("querying the adapter's GPU MMU", s);
    return CL_DEVICE_NOT_AVAILABLE;
  }
  d->coherent = mmu.CacheCoherentMemorySupported != 0;
  GPUPKMT_CHANNELSTATS channel{};
  d->persistent_maps = d->coherent && GPUP_SUCCEEDED(GpupKmtGetChannelStats(&channel)) && channel.SharedMemory != 0;

  GPUP_OCL_UMD_INFO umd{};
  GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_UMD_INFO};
  q = {};
  q.hAdapter = d->adapter;
  q.Type = GPUPDDI_QAITYPE_UMDRIVERPRIVATE;
  q.pInputData = &h;
  q.InputDataSize = sizeof h;
  q.pOutputData = &umd;
  q.OutputDataSize = sizeof umd;
  if (GPUP_FAILED(GpupKmtQueryAdapterInfo(&q)) || umd.ContractVersion < 2) return CL_DEVICE_NOT_AVAILABLE;
  d->linker_available = (umd.ProgramFormats & GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_LINK)) != 0;

  if (cl_int err = query_device_info(d); err != CL_SUCCESS) return err;
  if (umd.ContractVersion >= 3) query_image_formats(d);
  // Images need the host device's image support, its formats, and memory it shares with the host
  // (the KMD makes each image over its allocation's bytes).
  d->images = !d->image_formats.empty() && d->scalar<cl_bool>(CL_DEVICE_IMAGE_SUPPORT, CL_FALSE) == CL_TRUE &&
              d->scalar<cl_bool>(CL_DEVICE_HOST_UNIFIED_MEMORY, CL_FALSE) == CL_TRUE;
  apply_partition_overrides(d);
  cache_scalars(d);

  GPUPKMT_RESERVEGPUVA rv{0, kVaArena, 0};
  if (gpup_status s = GpupKmtReserveGpuVirtualAddress(&rv); GPUP_FAILED(s)) {
    log_failure("reserving the GPU virtual address arena", s);
    return CL_OUT_OF_RESOURCES;
  }
  d->va_base = rv.VirtualAddress;
  d->va_size = kVaArena;
  d->va_free.emplace(d->va_base, d->va_size);
  return CL_SUCCESS;
}

void init_platform() {
  GPUPKMT_ADAPTERINFO adapters[GPUPKMT_ADAPTERS_MAX];
  GPUPKMT_ENUMADAPTERS en{GPUPKMT_ADAPTERS_MAX, adapters};
  if (std::getenv("GPUP_VRD") == nullptr) return;  // not in a partition: no platform
  if (gpup_status s = GpupKmtEnumAdapters(&en); GPUP_FAILED(s)) {
    log_failure("reaching the partition", s);
    return;
  }
  for (uint32_t i = 0; i < en.NumAdapters; ++i) {
    auto* d = new _cl_device_id();  // lives as long as the process
    if (open_device(d, adapters[i]) != CL_SUCCESS) {
      delete d;
      continue;
    }
    g_platform.devices.push_back(d);
  }
  if (g_platform.devices.empty()) return;
  const cl_device_id first = g_platform.devices.front();
  g_platform.version = "OpenCL " + std::to_string(first->opencl_major) + "." + std::to_string(first->opencl_minor) +
                       " gpup " GPUP_VERSION_STRING;
  g_init_error = CL_SUCCESS;
}

}  // namespace

// ------------------------------------------------------------------------------------------------

cl_int info_bytes(size_t param_value_size, void* param_value, size_t* param_value_size_ret, const void* value,
                  size_t size) {
  if (param_value != nullptr) {
    if (param_value_size < size) return CL_INVALID_VALUE;
    if (size != 0) std::memcpy(param_value, value, size);
  }
  if (param_value_size_ret != nullptr) *param_value_size_ret = size;
  return CL_SUCCESS;
}

cl_int cl_error_from_status(gpup_status s, cl_int out_of_memory_error) {
  switch (s) {
    case GPUP_STATUS_SUCCESS: return CL_SUCCESS;
    case GPUP_STATUS_QUOTA_EXCEEDED:
    case GPUP_STATUS_NO_MEMORY: return out_of_memory_error;
    case GPUP_STATUS_CONNECTION_LOST:
    case GPUP_STATUS_DEVICE_REMOVED: return CL_DEVICE_NOT_AVAILABLE;
    default: return CL_OUT_OF_RESOURCES;
  }
}

void log_failure(const char* what, gpup_status s) {
  if (std::getenv("GPUP_OCL_DEBUG") == nullptr) return;
  std::fprintf(stderr, "gpup ICD: %s: %s: %s\n", what, gpup_status_name(s), GpupKmtGetLastErrorMessage());
}

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

cl_int ensure_platform() {
  std::call_once(g_once, init_platform);
  return g_init_error;
}

cl_platform_id platform() { return ensure_platform() == CL_SUCCESS ? &g_platform : nullptr; }

}  // namespace gpup::ocl

// ------------------------------------------------------------------------------------------------
// GPU VA arena: first fit over a coalesced free list. Ranges are page multiples.

uint64_t _cl_device_id::va_alloc(uint64_t size) {
  std::lock_guard lock(va_mu);
  for (auto it = va_free.begin(); it != va_free.end(); ++it) {
    if (it->second < size) continue;
    const uint64_t va = it->first, left = it->second - size;
    va_free.erase(it);
    if (left != 0) va_free.emplace(va + size, left);
    return va;
  }
  return 0;
}

void _cl_device_id::va_release(uint64_t va, uint64_t size) {
  std::lock_guard lock(va_mu);
  auto [it, inserted] = va_free.emplace(va, size);
  if (!inserted) return;
  auto next = std::next(it);
  if (next != va_free.end() && it->first + it->second == next->first) {
    it->second += next->second;
    va_free.erase(next);
  }
  if (it != va_free.begin()) {
    auto prev = std::prev(it);
    if (prev->first + prev->second == it->first) {
      prev->second += it->second;
      va_free.erase(it);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// API: platforms and devices

using namespace gpup::ocl;

namespace gpup::ocl::api {

cl_int GetPlatformIDs(cl_uint num_entries, cl_platform_id* platforms, cl_uint* num_platforms) {
  if ((num_entries == 0 && platforms != nullptr) || (platforms == nullptr && num_platforms == nullptr))
    return CL_INVALID_VALUE;
  cl_platform_id p = platform();
  if (num_platforms) *num_platforms = p ? 1 : 0;
  if (p == nullptr) return CL_PLATFORM_NOT_FOUND_KHR;
  if (platforms) platforms[0] = p;
  return CL_SUCCESS;
}

cl_int GetPlatformInfo(cl_platform_id p, cl_platform_info param, size_t n, void* v, size_t* ret) {
  if (p != nullptr && !valid(p)) return CL_INVALID_PLATFORM;
  p = platform();
  if (p == nullptr) return CL_INVALID_PLATFORM;
  const cl_version version = CL_MAKE_VERSION(p->devices.front()->opencl_major, p->devices.front()->opencl_minor, 0);
  switch (param) {
    case CL_PLATFORM_PROFILE: return info_string(n, v, ret, "FULL_PROFILE");
    case CL_PLATFORM_VERSION: return info_string(n, v, ret, p->version);
    case CL_PLATFORM_NUMERIC_VERSION: return info_value(n, v, ret, version);
    case CL_PLATFORM_NAME: return info_string(n, v, ret, kPlatformName);
    case CL_PLATFORM_VENDOR: return info_string(n, v, ret, kPlatformVendor);
    case CL_PLATFORM_EXTENSIONS: return info_string(n, v, ret, "cl_khr_icd cl_khr_extended_versioning");
    case CL_PLATFORM_EXTENSIONS_WITH_VERSION: {
      std::vector<cl_name_version> ext(2);
      std::snprintf(ext[0].name, sizeof ext[0].name, "cl_khr_icd");
      ext[0].version = CL_MAKE_VERSION(1, 0, 0);
      std::snprintf(ext[1].name, sizeof ext[1].name, "cl_khr_extended_versioning");
      ext[1].version = CL_MAKE_VERSION(1, 0, 0);
      return info_array(n, v, ret, ext);
    }
    case CL_PLATFORM_ICD_SUFFIX_KHR: return info_string(n, v, ret, kIcdSuffix);
    case CL_PLATFORM_HOST_TIMER_RESOLUTION: return info_value(n, v, ret, cl_ulong{0});
    default: return CL_INVALID_VALUE;
  }
}

cl_int GetDeviceIDs(cl_platform_id p, cl_device_type type, cl_uint num_entries, cl_device_id* devices,
                    cl_uint* num_devices) {
  if (p != nullptr && !valid(p)) return CL_INVALID_PLATFORM;
  p = platform();
  if (p == nullptr) return CL_INVALID_PLATFORM;
  constexpr cl_device_type kKnown = CL_DEVICE_TYPE_CPU | CL_DEVICE_TYPE_GPU | CL_DEVICE_TYPE_ACCELERATOR |
                                    CL_DEVICE_TYPE_CUSTOM | CL_DEVICE_TYPE_DEFAULT;
  // An unknown type matches no device (the host implementation answers so, not INVALID_DEVICE_TYPE).
  if (type != CL_DEVICE_TYPE_ALL && (type & ~kKnown) != 0) type = 0;
  if ((num_entries == 0 && devices != nullptr) || (devices == nullptr && num_devices == nullptr))
    return CL_INVALID_VALUE;
  std::vector<cl_device_id> found;
  for (cl_device_id d : p->devices) {
    const bool match = type == CL_DEVICE_TYPE_ALL || (type & d->type) != 0 ||
                       ((type & CL_DEVICE_TYPE_DEFAULT) != 0 && found.empty() && d == p->devices.front());
    if (match) found.push_back(d);
  }
  if (num_devices) *num_devices = static_cast<cl_uint>(found.size());
  if (found.empty()) return CL_DEVICE_NOT_FOUND;
  if (devices) {
    for (size_t i = 0; i < found.size() && i < num_entries; ++i) devices[i] = found[i];
  }
  return CL_SUCCESS;
}

cl_int GetDeviceInfo(cl_device_id d, cl_device_info param, size_t n, void* v, size_t* ret) {
  if (!valid(d)) return CL_INVALID_DEVICE;
  if (param == CL_DEVICE_PLATFORM) return info_value(n, v, ret, d->platform);
  auto it = d->info.find(param);
  if (it == d->info.end()) return CL_INVALID_VALUE;
  return info_bytes(n, v, ret, it->second.data(), it->second.size());
}

cl_int CreateSubDevices(cl_device_id d, const cl_device_partition_property*, cl_uint, cl_device_id*, cl_uint*) {
  if (!valid(d)) return CL_INVALID_DEVICE;
  return CL_INVALID_VALUE;  // CL_DEVICE_PARTITION_MAX_SUB_DEVICES is 0
}
cl_int RetainDevice(cl_device_id d) { return valid(d) ? CL_SUCCESS : CL_INVALID_DEVICE; }
cl_int ReleaseDevice(cl_device_id d) { return valid(d) ? CL_SUCCESS : CL_INVALID_DEVICE; }

cl_int GetDeviceAndHostTimer(cl_device_id d, cl_ulong* device_ts, cl_ulong* host_ts) {
  if (!valid(d)) return CL_INVALID_DEVICE;
  if (!device_ts || !host_ts) return CL_INVALID_VALUE;
  *device_ts = *host_ts = now_ns();
  return CL_SUCCESS;
}
cl_int GetHostTimer(cl_device_id d, cl_ulong* host_ts) {
  if (!valid(d)) return CL_INVALID_DEVICE;
  if (!host_ts) return CL_INVALID_VALUE;
  *host_ts = now_ns();
  return CL_SUCCESS;
}

// ------------------------------------------------------------------------------------------------
// Contexts

namespace {

cl_int parse_context_properties(const cl_context_properties* props, std::vector<cl_context_properties>* out) {
  out->clear();
  if (props == nullptr) return CL_SUCCESS;
  bool seen_platform = false, seen_sync = false;
  size_t i = 0;
  for (; props[i] != 0; i += 2) {
    switch (props[i]) {
      case CL_CONTEXT_PLATFORM:
        if (seen_platform) return CL_INVALID_PROPERTY;
        seen_platform = true;
        if (reinterpret_cast<cl_platform_id>(props[i + 1]) != platform()) return CL_INVALID_PLATFORM;
        break;
      case CL_CONTEXT_INTEROP_USER_SYNC:
        if (seen_sync) return CL_INVALID_PROPERTY;
        seen_sync = true;
        break;
      default: return CL_INVALID_PROPERTY;
    }
  }
  out->assign(props, props + i + 1);
  return CL_SUCCESS;
}

cl_context make_context(const cl_context_properties* props, std::vector<cl_device_id> devices,
                        void(CL_CALLBACK* notify)(const char*, const void*, size_t, void*), void* user_data,
                        cl_int* errcode_ret) {
  auto ret = [&](cl_int e) -> cl_context {
    if (errcode_ret) *errcode_ret = e;
    return nullptr;
  };
  if (notify == nullptr && user_data != nullptr) return ret(CL_INVALID_VALUE);
  std::vector<cl_context_properties> parsed;
  if (cl_int e = parse_context_properties(props, &parsed); e != CL_SUCCESS) return ret(e);
  // One thunk device per context (the partition's adapter of its device).
  GPUPKMT_CREATEDEVICE cd{devices.front()->adapter, 0, 0};
  if (gpup_status s = GpupKmtCreateDevice(&cd); GPUP_FAILED(s)) {
    log_failure("creating the context's device", s);
    return ret(cl_error_from_status(s, CL_OUT_OF_HOST_MEMORY));
  }
  auto* c = new _cl_context();
  c->hw_device = cd.hDevice;
  c->devices = std::move(devices);
  c->buffer_pool->configure(c->devices.front()->budget);
  c->properties = std::move(parsed);
  c->notify = notify;
  c->notify_data = user_data;
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return c;
}

}  // namespace

cl_context CreateContext(const cl_context_properties* props, cl_uint num_devices, const cl_device_id* devices,
                         void(CL_CALLBACK* notify)(const char*, const void*, size_t, void*), void* user_data,
                         cl_int* errcode_ret) {
  if (num_devices == 0 || devices == nullptr) {
    if (errcode_ret) *errcode_ret = CL_INVALID_VALUE;
    return nullptr;
  }
  std::vector<cl_device_id> list;
  for (cl_uint i = 0; i < num_devices; ++i) {
    if (!valid(devices[i])) {
      if (errcode_ret) *errcode_ret = CL_INVALID_DEVICE;
      return nullptr;
    }
    if (std::find(list.begin(), list.end(), devices[i]) == list.end()) list.push_back(devices[i]);
  }
  return make_context(props, std::move(list), notify, user_data, errcode_ret);
}

cl_context CreateContextFromType(const cl_context_properties* props, cl_device_type type,
                                 void(CL_CALLBACK* notify)(const char*, const void*, size_t, void*), void* user_data,
                                 cl_int* errcode_ret) {
  cl_uint n = 0;
  cl_int err = GetDeviceIDs(nullptr, type, 0, nullptr, &n);
  if (err != CL_SUCCESS) {
    if (errcode_ret) *errcode_ret = err;
    return nullptr;
  }
  std::vector<cl_device_id> list(n);
  GetDeviceIDs(nullptr, type, n, list.data(), nullptr);
  return make_context(props, std::move(list), notify, user_data, errcode_ret);
}

cl_int RetainContext(cl_context c) {
  if (!valid(c)) return CL_INVALID_CONTEXT;
  context_retain(c);
  return CL_SUCCESS;
}

cl_int ReleaseContext(cl_context c) {
  if (!valid(c)) return CL_INVALID_CONTEXT;
  context_release(c);
  return CL_SUCCESS;
}

cl_int GetContextInfo(cl_context c, cl_context_info param, size_t n, void* v, size_t* ret) {
  if (!valid(c)) return CL_INVALID_CONTEXT;
  switch (param) {
    case CL_CONTEXT_REFERENCE_COUNT: return info_value(n, v, ret, cl_uint(c->refs.load()));
    case CL_CONTEXT_NUM_DEVICES: return info_value(n, v, ret, cl_uint(c->devices.size()));
    case CL_CONTEXT_DEVICES: return info_array(n, v, ret, c->devices);
    case CL_CONTEXT_PROPERTIES: return info_array(n, v, ret, c->properties);
    default: return CL_INVALID_VALUE;
  }
}

cl_int SetContextDestructorCallback(cl_context c, void(CL_CALLBACK* fn)(cl_context, void*), void* user_data) {
  if (!valid(c)) return CL_INVALID_CONTEXT;
  if (fn == nullptr) return CL_INVALID_VALUE;
  std::lock_guard lock(c->mu);
  c->destructors.emplace_back(fn, user_data);
  return CL_SUCCESS;
}

}  // namespace gpup::ocl::api

_cl_context::_cl_context()
    : IcdObject(gpup::ocl::Magic::kContext), buffer_pool(std::make_unique<gpup::ocl::BufferPool>()) {}
_cl_context::~_cl_context() = default;

namespace gpup::ocl {

void context_retain(cl_context c) { c->refs.fetch_add(1, std::memory_order_relaxed); }

void context_release(cl_context c) {
  if (c->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  // Destructor callbacks run in reverse order of registration.
  for (auto it = c->destructors.rbegin(); it != c->destructors.rend(); ++it) it->first(c, it->second);
  c->buffer_pool->close();
  GPUPKMT_DESTROYDEVICE dd{c->hw_device};
  if (gpup_status s = GpupKmtDestroyDevice(&dd); GPUP_FAILED(s)) log_failure("destroying the context's device", s);
  c->magic = Magic::kDead;
  delete c;
}

}  // namespace gpup::ocl
