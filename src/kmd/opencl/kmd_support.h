// Pieces every gpup KMD plugin needs and that must behave identically in all of them: the driver
// entry handshake, logging through the host's callbacks, "key=value" configuration, the
// GPUP_OCL_* private-data contract (include/gpup/kmd_opencl.h: program descriptors, build
// results, escapes, UMD-private queries), the process / VM-data object model of the DDI, the
// bookkeeping of owned objects behind handles, the standard GPU MMU description both KMDs report,
// and the DDI entry points themselves (DdiEntryPoints, a template over each KMD's object types).
//
// Built as the static library gpup_kmd_support (PIC, hidden visibility) and linked into
// libgpup_kmd_opencl.so and the libgpup_kmd_mock*.so variants. Nothing here is exported.
//
// Threads: everything is safe to call from any thread. ProcessTable locks internally; the
// callbacks copy is written once by install_callbacks() in GpupKmdDriverEntry, before the host
// makes any other call.
#pragma once

#include <fmt/format.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "gpup/ddi.h"
#include "gpup/kmd_opencl.h"

namespace gpup::kmd {

// ---------------------------------------------------------------------------------------------
// Driver entry and logging

// The GpupKmdDriverEntry handshake shared by all gpup KMDs: checks the host's DdiVersion major
// and struct sizes, copies the callbacks (see install_callbacks), zeroes *pFuncs (keeping its
// struct_size), writes our DdiVersion, DriverName and every table's struct_size. The caller
// then fills the function pointers. Returns VERSION_MISMATCH (with our DdiVersion written) for
// another major, INVALID_PARAMETER for missing or short structures.
gpup_status driver_entry_prologue(const GPUPDDI_CALLBACKS* pCallbacks, GPUPDDI_DRIVER_FUNCS* pFuncs,
                                  const char* driver_name);

// The host's callbacks as given to the last successful driver entry. Fields the host's (older)
// struct lacked are NULL.
const GPUPDDI_CALLBACKS& callbacks();

void log_message(int level, std::string_view message);
template <typename... Args>
void logf(int level, fmt::format_string<Args...> format, Args&&... args) {
  log_message(level, fmt::format(format, std::forward<Args>(args)...));
}

// Reports a finished submission to the host. Must not be called from inside a DDI call on the
// same context (ddi.h "Threads").
void notify_complete(GPUPDDI_SYSTEM_HANDLE hSystemContext, uint64_t submission_id, gpup_status status);

// A guest- or host-supplied string made safe to log: at most max_len bytes, non-printable bytes
// shown as '?'.
std::string printable(std::string_view s, size_t max_len = 128);
// Copies s into a fixed char array, truncating, always NUL-terminated, rest zero-filled.
void copy_fixed_string(char* dst, size_t dst_size, std::string_view s);
template <size_t N>
void copy_fixed_string(char (&dst)[N], std::string_view s) {
  copy_fixed_string(dst, N, s);
}

// Runs a DDI body so that no C++ exception crosses the C ABI: std::bad_alloc becomes NO_MEMORY,
// anything else INTERNAL, both logged with what.
template <typename F>
gpup_status guarded(const char* what, F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    logf(GPUPDDI_LOG_ERROR, "{}: out of memory", what);
    return GPUP_STATUS_NO_MEMORY;
  } catch (const std::exception& e) {
    logf(GPUPDDI_LOG_ERROR, "{}: {}", what, e.what());
    return GPUP_STATUS_INTERNAL;
  } catch (...) {
    logf(GPUPDDI_LOG_ERROR, "{}: unknown exception", what);
    return GPUP_STATUS_INTERNAL;
  }
}
template <typename F>
void guarded_void(const char* what, F&& body) noexcept {
  (void)guarded(what, [&] {
    body();
    return GPUP_STATUS_SUCCESS;
  });
}

// ---------------------------------------------------------------------------------------------
// Handles
//
// Every KMD object begins with a tag naming its type. The host only hands back handles we gave
// it (ddi.h), so this is a cheap guard against host bugs, not validation of guest input.

enum class ObjectTag : uint32_t {
  kNone = 0,
  kAdapter = 0x41444150,     // 'ADAP'
  kProcess = 0x50524F43,     // 'PROC'
  kDevice = 0x44455649,      // 'DEVI'
  kContext = 0x43545854,     // 'CTXT'
  kAllocation = 0x414C4C4F,  // 'ALLO'
};

class KmdObject {
 public:
  explicit KmdObject(ObjectTag tag) : tag_(tag) {}
  KmdObject(const KmdObject&) = delete;
  KmdObject& operator=(const KmdObject&) = delete;
  virtual ~KmdObject() { tag_ = ObjectTag::kNone; }
  ObjectTag tag() const { return tag_; }

 private:
  ObjectTag tag_;
};

// The object behind a handle, or nullptr when the handle is NULL or names another type.
template <typename T>
T* from_handle(GPUPDDI_HANDLE h) {
  if (h == nullptr) return nullptr;
  auto* obj = static_cast<KmdObject*>(h);
  return obj->tag() == T::kTag ? static_cast<T*>(obj) : nullptr;
}
template <typename T>
GPUPDDI_HANDLE to_handle(T* obj) {
  return static_cast<KmdObject*>(obj);
}

// The objects a KMD object owns (an adapter's devices, a device's allocations and contexts, the
// processes), keyed by the KmdObject they are handed out as.
template <typename T>
using OwnedObjects = std::map<const KmdObject*, std::unique_ptr<T>>;

// Adds obj to objects (the caller holds the lock guarding them) and returns its handle.
template <typename T>
GPUPDDI_HANDLE adopt_locked(OwnedObjects<T>& objects, std::unique_ptr<T> obj) {
  T* raw = obj.get();
  objects.emplace(raw, std::move(obj));
  return to_handle(raw);
}
// Same, taking mu for the insertion.
template <typename T>
GPUPDDI_HANDLE adopt(std::mutex& mu, OwnedObjects<T>& objects, std::unique_ptr<T> obj) {
  std::lock_guard lock(mu);
  return adopt_locked(objects, std::move(obj));
}

// The object keyed by key, or nullptr; takes mu for the lookup.
template <typename T>
T* find_owned(std::mutex& mu, OwnedObjects<T>& objects, const KmdObject* key) {
  std::lock_guard lock(mu);
  auto it = objects.find(key);
  return it == objects.end() ? nullptr : it->second.get();
}

// Removes the object keyed by key from objects (the caller holds the lock guarding them) and
// hands it back; when there is none, logs unknown_message as an error and returns nullptr.
template <typename T>
std::unique_ptr<T> take_locked(OwnedObjects<T>& objects, const KmdObject* key, const char* unknown_message) {
  auto it = objects.find(key);
  if (it == objects.end()) {
    log_message(GPUPDDI_LOG_ERROR, unknown_message);
    return nullptr;
  }
  std::unique_ptr<T> taken = std::move(it->second);
  objects.erase(it);
  return taken;
}
// Same, taking mu for the removal only: the object comes back, and so is destroyed, outside mu.
template <typename T>
std::unique_ptr<T> take(std::mutex& mu, OwnedObjects<T>& objects, const KmdObject* key, const char* unknown_message) {
  std::lock_guard lock(mu);
  return take_locked(objects, key, unknown_message);
}

// True when an argument struct from the host is present and at least as large as ours.
template <typename T>
bool arg_ok(const T* args) {
  return args != nullptr && args->struct_size >= sizeof(T);
}

// ---------------------------------------------------------------------------------------------
// Configuration

// Parses pfnStartAdapter's "key=value" lines. Blank lines and lines starting with '#' are
// skipped; whitespace around keys and values is trimmed. A line without '=', an empty key, a key
// not in known_keys or a repeated key is an INVALID_PARAMETER error naming it. NULL text is an
// empty configuration.
Result<std::map<std::string, std::string>> parse_config(const char* text,
                                                        std::span<const std::string_view> known_keys);
// Strict unsigned decimal (no sign, no spaces, no overflow).
bool parse_u64(std::string_view s, uint64_t* out);

// ---------------------------------------------------------------------------------------------
// Programs (GPUP_OCL_PROGRAM_DESC)

struct ProgramImage {
  // One entry of a COMPILE or LINK set (GPUP_OCL_SET_ENTRY).
  struct Entry {
    std::string name;                // COMPILE headers: the include name; empty otherwise
    std::vector<unsigned char> data; // texts: without a terminating NUL; never empty
  };
  uint32_t version = 0;                // GPUP_OCL_PROGRAM_DESC.Version: 1 or 2
  uint32_t format = 0;                 // GPUP_OCL_PROGRAM_*
  std::string options;                 // without a terminating NUL
  std::vector<unsigned char> content;  // SOURCE (without a terminating NUL) and BINARY; never empty
  std::vector<Entry> entries;          // COMPILE (entry 0 is the main source) and LINK
};

// Validates a program allocation's private data completely (magic, version, reserved, format,
// sizes summing exactly to size without overflow, the NUL rules of kmd_opencl.h, the framing of
// COMPILE / LINK sets) and copies it out. Every failure is INVALID_PARAMETER with a message
// saying what was wrong.
Result<ProgramImage> parse_program_desc(const void* data, uint32_t size);

// Writes GPUP_OCL_BUILD_RESULT and as much of log as fits into out[0..capacity). Returns the
// bytes written (0 when out is NULL or capacity is below the header size).
uint32_t write_build_result(void* out, uint32_t capacity, int32_t build_error, std::string_view log);

// What a KMD knows about a built program, for the version 2 output (GPUP_OCL_PROGRAM_INFO). The
// size fields of the GPUP_OCL_* structures are filled in by write_program_output from the strings.
struct ArgDescription {
  GPUP_OCL_KERNEL_ARG_INFO info{};
  std::string type_name;
  std::string name;
};
struct KernelDescription {
  GPUP_OCL_KERNEL_INFO info{};  // NumArgs is taken from args.size()
  std::string name;
  std::string attributes;
  std::vector<ArgDescription> args;
};
struct ProgramDescription {
  uint32_t binary_type = 0;  // CL_PROGRAM_BINARY_TYPE_*
  std::vector<KernelDescription> kernels;
  uint64_t binary_size = 0;                // 0: none
  std::vector<unsigned char> binary;       // binary_size bytes, or empty when not fetched
};

// Bytes the kernel table of program takes in the version 2 output.
uint64_t kernel_table_size(const ProgramDescription& program);

// The whole output of a program allocation for a descriptor of the given version: version 1 is
// write_build_result; version 2 adds GPUP_OCL_PROGRAM_INFO after the log as kmd_opencl.h lays it
// out (program NULL: a failed build, no kernels, no binary). The binary is written only when
// program->binary holds it. Returns the bytes written.
uint32_t write_program_output(void* out, uint32_t capacity, uint32_t version, int32_t build_error,
                              std::string_view log, const ProgramDescription* program);

// A GPUP_OCL_INFO_LIST (device info or image format records), ready to be copied out.
using InfoList = std::vector<unsigned char>;

// ---------------------------------------------------------------------------------------------
// Images and samplers (contract version 3)
//
// OpenCL's values for the names the contract uses; kmd_support does not include the OpenCL
// headers (kmd_opencl checks them against <CL/cl.h> with static asserts).
namespace cl_values {
inline constexpr uint32_t kImage2D = 0x10F1, kImage3D = 0x10F2, kImage2DArray = 0x10F3, kImage1D = 0x10F4,
                          kImage1DArray = 0x10F5, kImage1DBuffer = 0x10F6;
inline constexpr uint64_t kMemReadWrite = 1u << 0, kMemWriteOnly = 1u << 1, kMemReadOnly = 1u << 2,
                          kMemKernelReadAndWrite = 1u << 12;
inline constexpr uint32_t kR = 0x10B0, kA = 0x10B1, kRG = 0x10B2, kRA = 0x10B3, kRGB = 0x10B4, kRGBA = 0x10B5,
                          kBGRA = 0x10B6, kARGB = 0x10B7, kIntensity = 0x10B8, kLuminance = 0x10B9, kRx = 0x10BA,
                          kRGx = 0x10BB, kRGBx = 0x10BC, kDepth = 0x10BD, kDepthStencil = 0x10BE, kSRGB = 0x10BF,
                          kSRGBx = 0x10C0, kSRGBA = 0x10C1, kSBGRA = 0x10C2, kABGR = 0x10C3;
inline constexpr uint32_t kSnormInt8 = 0x10D0, kSnormInt16 = 0x10D1, kUnormInt8 = 0x10D2, kUnormInt16 = 0x10D3,
                          kUnormShort565 = 0x10D4, kUnormShort555 = 0x10D5, kUnormInt101010 = 0x10D6,
                          kSignedInt8 = 0x10D7, kSignedInt16 = 0x10D8, kSignedInt32 = 0x10D9, kUnsignedInt8 = 0x10DA,
                          kUnsignedInt16 = 0x10DB, kUnsignedInt32 = 0x10DC, kHalfFloat = 0x10DD, kFloat = 0x10DE,
                          kUnormInt24 = 0x10DF, kUnormInt101010_2 = 0x10E0;
inline constexpr uint32_t kAddressNone = 0x1130, kAddressClampToEdge = 0x1131, kAddressClamp = 0x1132,
                          kAddressRepeat = 0x1133, kAddressMirroredRepeat = 0x1134;
inline constexpr uint32_t kFilterNearest = 0x1140, kFilterLinear = 0x1141;
}  // namespace cl_values

// Bytes of one pixel of the format (channel order, channel data type), or 0 when the pair names
// no OpenCL format.
uint32_t image_element_size(uint32_t channel_order, uint32_t channel_type);

// The image types (clGetSupportedImageFormats) and access flags GPUP_OCL_QUERY_IMAGE_FORMATS
// lists, in the order the KMDs ask for them.
inline constexpr uint32_t kImageTypes[] = {cl_values::kImage1D, cl_values::kImage2D, cl_values::kImage3D,
                                           cl_values::kImage1DArray, cl_values::kImage2DArray};
inline constexpr uint64_t kImageAccessFlags[] = {cl_values::kMemReadWrite, cl_values::kMemReadOnly,
                                                 cl_values::kMemWriteOnly, cl_values::kMemKernelReadAndWrite};

// The formats a device supports per image type and access flag: what GPUP_OCL_QUERY_IMAGE_FORMATS
// answers and what image allocations are checked against.
class ImageFormats {
 public:
  struct Format {
    uint32_t order = 0;  // cl_channel_order
    uint32_t type = 0;   // cl_channel_type
  };
  // Records the answer for (image type, access flag), replacing an earlier one.
  void set(uint32_t image_type, uint64_t access, std::vector<Format> formats);
  bool supports(uint32_t image_type, uint64_t access, uint32_t order, uint32_t type) const;
  bool empty() const { return lists_.empty(); }
  // The GPUP_OCL_INFO_LIST of kmd_opencl.h: one record per (type, access) answered, keyed by
  // GPUP_OCL_IMAGE_FORMATS_KEY, the value an array of cl_image_format (two uint32 each).
  InfoList encode() const;

 private:
  std::map<uint32_t, std::vector<Format>> lists_;  // by GPUP_OCL_IMAGE_FORMATS_KEY
};

// An image allocation's GPUP_OCL_IMAGE_DESC, checked, with what follows from it.
struct ImageLayout {
  uint32_t image_type = 0;     // CL_MEM_OBJECT_IMAGE*
  uint32_t channel_order = 0;
  uint32_t channel_type = 0;
  uint64_t access = 0;         // exactly one of CL_MEM_READ_WRITE / _READ_ONLY / _WRITE_ONLY (0 given: READ_WRITE)
  uint64_t width = 0, height = 0, depth = 0, array_size = 0;
  uint64_t row_pitch = 0;
  uint64_t slice_pitch = 0;    // as OpenCL takes it: 1D arrays get row_pitch, 1D and 2D images 0
  uint32_t element_size = 0;
  uint64_t bytes = 0;          // one past the image's last byte
};

// Validates the private data of an allocation of allocation_size bytes made with Flags.Image
// (read_only: the allocation's Flags.ReadOnly) against kmd_opencl.h: exact size, magic, image
// type, dimensions used and unused, a known format, access flags only, pitches at least the
// minimum and multiples of the element size (slices: of the row pitch), the image's last byte
// inside the allocation, all without overflow. A read-only allocation takes only a READ_ONLY
// image. Does not check that the device supports the format (see ImageFormats). Every failure is
// INVALID_PARAMETER with a message.
Result<ImageLayout> parse_image_desc(const void* data, uint32_t size, uint64_t allocation_size, bool read_only);

// Validates the value of a GPUPDDI_ARG_SAMPLER argument: Size == sizeof(GPUP_OCL_SAMPLER_DESC),
// NormalizedCoords 0 or 1, a known addressing and filter mode, REPEAT / MIRRORED_REPEAT only with
// normalized coordinates (OpenCL leaves the other combination undefined), Reserved 0.
Result<GPUP_OCL_SAMPLER_DESC> parse_sampler_desc(const void* data, uint32_t size);

// ---------------------------------------------------------------------------------------------
// Escapes and queries

uint64_t fnv1a64(std::span<const unsigned char> bytes);

// pfnEscape for the GPUP_OCL_ESCAPE_* codes, answering DEVICE_INFO with info.
gpup_status handle_escape(const GPUPDDI_ARG_ESCAPE* args, const GPUPDDI_DEVICEINFO& info);

// Encodes records (cl_device_info param -> raw value bytes) as a GPUP_OCL_INFO_LIST: sorted by
// param (the map's order), each value padded to 8. Throws std::length_error when the list would
// not fit the 32-bit TotalSize.
InfoList encode_info_list(const std::map<uint32_t, std::vector<unsigned char>>& records);

// GPUPDDI_QAITYPE_UMDRIVERPRIVATE: checks the GPUP_OCL_PRIVATE_HEADER input and answers
// GPUP_OCL_QUERY_UMD_INFO with info, GPUP_OCL_QUERY_DEVICE_INFO with device_info (an
// encode_info_list result) and GPUP_OCL_QUERY_IMAGE_FORMATS with image_formats (an
// ImageFormats::encode result).
gpup_status handle_umd_private_query(const GPUPDDI_ARG_QUERYADAPTERINFO* args, const GPUP_OCL_UMD_INFO& info,
                                     const InfoList& device_info, const InfoList& image_formats);

// Copies a fixed-size answer into a query's output: INVALID_PARAMETER without an output buffer,
// BUFFER_TOO_SMALL when it cannot hold a T; sets *pOutputDataWritten when given.
template <typename T>
gpup_status write_query_output(const GPUPDDI_ARG_QUERYADAPTERINFO* args, const T& value) {
  if (args->pOutputData == nullptr) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->OutputDataSize < sizeof(T)) return GPUP_STATUS_BUFFER_TOO_SMALL;
  std::memcpy(args->pOutputData, &value, sizeof(T));
  if (args->pOutputDataWritten != nullptr) *args->pOutputDataWritten = sizeof(T);
  return GPUP_STATUS_SUCCESS;
}

// Copies a NUL-terminated text answer (GPUPDDI_QAITYPE_SANDBOXNEEDS): INVALID_PARAMETER without
// pOutputDataWritten; BUFFER_TOO_SMALL with *pOutputDataWritten = the size needed.
gpup_status write_query_text(const GPUPDDI_ARG_QUERYADAPTERINFO* args, std::string_view text);

// The GPU MMU both gpup KMDs model: 48-bit VA, 4 levels of 512-entry (9 index bits) 4 KiB page
// tables, 4 KiB leaf pages. Segment ids are 1-based indices into GPUPDDI_QUERYSEGMENTOUT.Segments
// (the WDDM convention); page tables live in segment 1.
inline constexpr uint32_t kMmuLevels = 4;
GPUPDDI_GPUMMUCAPS standard_mmu_caps(bool cache_coherent);
// GPUPDDI_QAITYPE_QUERYSEGMENT: segment 1 is device memory at 0, segment 2 the CPU-visible
// aperture of system memory the device sees, placed after it; both global_mem_size bytes.
GPUPDDI_QUERYSEGMENTOUT standard_segments(uint64_t global_mem_size);
// GPUPDDI_QAITYPE_PAGETABLELEVELDESC: input must be exactly one uint32_t level < kMmuLevels.
gpup_status answer_page_table_level(const GPUPDDI_ARG_QUERYADAPTERINFO* args);

// ---------------------------------------------------------------------------------------------
// Processes and VM data

struct VmData {
  GPUPDDI_GUID guid{};
  std::string name;
  uint64_t min_vram = 0, max_vram = 0, optimal_vram = 0;
  uint32_t compute_weight = 0, max_compute_percent = 0;
  bool secure = false;
  uint32_t updates = 0;  // how many times pfnSetVirtualMachineData was called
};

class Process final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kProcess;
  Process() : KmdObject(kTag) {}

  uint64_t id = 0;  // unique within the adapter, for logs and links
  GPUPDDI_CREATEPROCESSFLAGS flags{};
  GPUPDDI_SYSTEM_HANDLE host_cookie = nullptr;
  uint32_t guest_pid = 0;
  std::string name;
  uint64_t worker_id = 0;           // VirtualMachineProcess: id of its worker process
  std::unique_ptr<VmData> vm;       // VirtualMachineWorkerProcess: set by SetVirtualMachineData

  bool is_worker() const { return flags.VirtualMachineWorkerProcess != 0; }
  // May this process own devices? A VM's worker process does no device work itself (ddi.h).
  bool may_create_devices() const { return !is_worker(); }
};

// The adapter's processes: pfnCreateProcess / pfnDestroyProcess / pfnSetVirtualMachineData.
// Thread-safe. Owns the Process objects; a handle stays valid until destroy() or clear().
class ProcessTable {
 public:
  gpup_status create(GPUPDDI_ARG_CREATEPROCESS* args);
  void destroy(GPUPDDI_HANDLE h);
  gpup_status set_vm_data(const GPUPDDI_ARG_SETVIRTUALMACHINEDATA* args);
  // The live process behind h, or nullptr. The pointer stays valid until the host destroys the
  // process, which it does only after destroying the process's devices.
  Process* find(GPUPDDI_HANDLE h);
  void clear();
  size_t size();

 private:
  std::mutex mu_;
  uint64_t next_id_ = 1;
  OwnedObjects<Process> processes_;
};

// ---------------------------------------------------------------------------------------------
// DDI entry points

// The DDI entry points of a gpup KMD, written once for all of them. Each recovers its object from
// the handle (INVALID_HANDLE when the handle names no object of that type; the void ones then do
// nothing), runs under guarded() with the DDI's name and calls the member of the same meaning:
//   Adapter: static start(config) -> Result<std::unique_ptr<Adapter>>, query, device_info(),
//            processes (a ProcessTable), create_device, destroy_device(Device*),
//            kCanResetEngine and, when true, reset_engine
//   Device:  adapter, create_allocation, destroy_allocation, lock, unlock, create_context,
//            destroy_context(Context*)
//   Context: device(), submit
template <typename Adapter, typename Device, typename Context>
class DdiEntryPoints {
 public:
  // Fills every function pointer of *pFuncs (pfnResetEngine is NULL unless
  // Adapter::kCanResetEngine). Call after driver_entry_prologue succeeded.
  static void fill(GPUPDDI_DRIVER_FUNCS* pFuncs) {
    pFuncs->Adapter.pfnStartAdapter = StartAdapter;
    pFuncs->Adapter.pfnStopAdapter = StopAdapter;
    pFuncs->Adapter.pfnQueryAdapterInfo = QueryAdapterInfo;
    pFuncs->Adapter.pfnSetVirtualMachineData = SetVirtualMachineData;
    pFuncs->Adapter.pfnEscape = Escape;
    if constexpr (Adapter::kCanResetEngine) {
      pFuncs->Adapter.pfnResetEngine = ResetEngine;
    } else {
      pFuncs->Adapter.pfnResetEngine = nullptr;
    }
    pFuncs->Process.pfnCreateProcess = CreateProcess;
    pFuncs->Process.pfnDestroyProcess = DestroyProcess;
    pFuncs->Device.pfnCreateDevice = CreateDevice;
    pFuncs->Device.pfnDestroyDevice = DestroyDevice;
    pFuncs->Memory.pfnCreateAllocation = CreateAllocation;
    pFuncs->Memory.pfnDestroyAllocation = DestroyAllocation;
    pFuncs->Memory.pfnLock = Lock;
    pFuncs->Memory.pfnUnlock = Unlock;
    pFuncs->Context.pfnCreateContext = CreateContext;
    pFuncs->Context.pfnDestroyContext = DestroyContext;
    pFuncs->Context.pfnSubmitCommand = SubmitCommand;
  }

 private:
  static gpup_status StartAdapter(GPUPDDI_ARG_STARTADAPTER* args) {
    return guarded("StartAdapter", [&]() -> gpup_status {
      if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
      auto adapter = Adapter::start(args->pConfig);
      if (!adapter) {
        logf(GPUPDDI_LOG_ERROR, "StartAdapter: {}", adapter.error().message);
        return adapter.error().status;
      }
      args->hAdapter = to_handle(adapter->release());
      return GPUP_STATUS_SUCCESS;
    });
  }

  static void StopAdapter(GPUPDDI_HANDLE hAdapter) {
    guarded_void("StopAdapter", [&] { delete from_handle<Adapter>(hAdapter); });
  }

  static gpup_status QueryAdapterInfo(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_QUERYADAPTERINFO* args) {
    return guarded("QueryAdapterInfo", [&]() -> gpup_status {
      Adapter* a = from_handle<Adapter>(hAdapter);
      return a ? a->query(args) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static gpup_status SetVirtualMachineData(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_SETVIRTUALMACHINEDATA* args) {
    return guarded("SetVirtualMachineData", [&]() -> gpup_status {
      Adapter* a = from_handle<Adapter>(hAdapter);
      return a ? a->processes.set_vm_data(args) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static gpup_status Escape(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_ESCAPE* args) {
    return guarded("Escape", [&]() -> gpup_status {
      Adapter* a = from_handle<Adapter>(hAdapter);
      return a ? handle_escape(args, a->device_info()) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static gpup_status ResetEngine(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_RESETENGINE* args) {
    return guarded("ResetEngine", [&]() -> gpup_status {
      Adapter* a = from_handle<Adapter>(hAdapter);
      return a ? a->reset_engine(args) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static gpup_status CreateProcess(GPUPDDI_HANDLE hAdapter, GPUPDDI_ARG_CREATEPROCESS* args) {
    return guarded("CreateProcess", [&]() -> gpup_status {
      Adapter* a = from_handle<Adapter>(hAdapter);
      return a ? a->processes.create(args) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static void DestroyProcess(GPUPDDI_HANDLE hAdapter, GPUPDDI_HANDLE hKmdProcess) {
    guarded_void("DestroyProcess", [&] {
      if (Adapter* a = from_handle<Adapter>(hAdapter)) a->processes.destroy(hKmdProcess);
    });
  }

  static gpup_status CreateDevice(GPUPDDI_HANDLE hAdapter, GPUPDDI_ARG_CREATEDEVICE* args) {
    return guarded("CreateDevice", [&]() -> gpup_status {
      Adapter* a = from_handle<Adapter>(hAdapter);
      return a ? a->create_device(args) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static void DestroyDevice(GPUPDDI_HANDLE hDevice) {
    guarded_void("DestroyDevice", [&] {
      if (Device* d = from_handle<Device>(hDevice)) d->adapter->destroy_device(d);
    });
  }

  static gpup_status CreateAllocation(GPUPDDI_HANDLE hDevice, GPUPDDI_ARG_CREATEALLOCATION* args) {
    return guarded("CreateAllocation", [&]() -> gpup_status {
      Device* d = from_handle<Device>(hDevice);
      return d ? d->create_allocation(args) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static void DestroyAllocation(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation) {
    guarded_void("DestroyAllocation", [&] {
      if (Device* d = from_handle<Device>(hDevice)) d->destroy_allocation(hAllocation);
    });
  }

  static gpup_status Lock(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation) {
    return guarded("Lock", [&]() -> gpup_status {
      Device* d = from_handle<Device>(hDevice);
      return d ? d->lock(hAllocation) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static gpup_status Unlock(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation) {
    return guarded("Unlock", [&]() -> gpup_status {
      Device* d = from_handle<Device>(hDevice);
      return d ? d->unlock(hAllocation) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static gpup_status CreateContext(GPUPDDI_HANDLE hDevice, GPUPDDI_ARG_CREATECONTEXT* args) {
    return guarded("CreateContext", [&]() -> gpup_status {
      Device* d = from_handle<Device>(hDevice);
      return d ? d->create_context(args) : GPUP_STATUS_INVALID_HANDLE;
    });
  }

  static void DestroyContext(GPUPDDI_HANDLE hContext) {
    guarded_void("DestroyContext", [&] {
      if (Context* c = from_handle<Context>(hContext)) c->device()->destroy_context(c);
    });
  }

  static gpup_status SubmitCommand(GPUPDDI_HANDLE hContext, const GPUPDDI_ARG_SUBMITCOMMAND* args) {
    return guarded("SubmitCommand", [&]() -> gpup_status {
      Context* c = from_handle<Context>(hContext);
      return c ? c->submit(args) : GPUP_STATUS_INVALID_HANDLE;
    });
  }
};

// A whole GpupKmdDriverEntry: driver_entry_prologue, then DdiEntryPoints<...>::fill on success.
template <typename Adapter, typename Device, typename Context>
gpup_status driver_entry(const GPUPDDI_CALLBACKS* pCallbacks, GPUPDDI_DRIVER_FUNCS* pFuncs, const char* driver_name) {
  const gpup_status s = driver_entry_prologue(pCallbacks, pFuncs, driver_name);
  if (s != GPUP_STATUS_SUCCESS) return s;
  DdiEntryPoints<Adapter, Device, Context>::fill(pFuncs);
  return GPUP_STATUS_SUCCESS;
}

}  // namespace gpup::kmd
