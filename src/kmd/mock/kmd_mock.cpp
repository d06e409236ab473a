// libgpup_kmd_mock*.so: a complete KMD over host memory, for tests of the host and of the DDI.
//
// It reports a made-up, self-consistent device (1 GiB of "device memory" by default, 256 MiB
// largest allocation, 128-byte sub-buffer alignment) and implements every DDI, including the
// optional pfnLock/pfnUnlock, pfnEscape (the GPUP_OCL_* escapes of gpup/kmd_opencl.h) and
// pfnResetEngine. Allocations are the host's backing store (CpuVisible) or calloc'd memory,
// counted against the device memory size (NO_MEMORY beyond it). Copy and fill are memcpy and
// pattern stores; dispatch runs the fixed kernel set of mock_kernels.h.
//
// Images (DDI 1.1): image allocations are checked like kmd_opencl's (parse_image_desc, and a
// format from the mock's small list: CL_R / CL_UNSIGNED_INT32 2D images) and are plain memory in
// the linear layout of kmd_opencl.h; the image kernels of mock_kernels.h read and write them.
// The mock does not claim CL_DEVICE_IMAGE_SUPPORT in its device info: it cannot run arbitrary
// image code, only those kernels.
//
// Submission checks match kmd_opencl's (ocl_kmd.h): allocations of the context's device only,
// non-empty ranges, at most 65536 commands, sub-buffer offsets aligned to 128 bytes, everything
// checked before anything is queued; an empty submission is a fence.
//
// Completion: every context owns a worker thread that runs its submissions in order and calls
// pfnNotifySubmissionComplete exactly once per submission, never on the submitting thread.
// pfnResetEngine(hContext) completes that context's running and queued submissions with
// CONTEXT_RESET_GUILTY; with hContext NULL every context's get CONTEXT_RESET_INNOCENT. The
// contexts stay usable.
//
// Variants (compile definitions, see CMakeLists.txt): GPUP_MOCK_PARAVIRTUALIZATION and
// GPUP_MOCK_IOMMU_SECURE (the DRIVERCAPS bits, default 1), GPUP_MOCK_OMIT_CREATE_CONTEXT (leave
// Context.pfnCreateContext NULL), GPUP_MOCK_REPORTED_MAJOR (claim another DDI major).
//
// Config keys: memory=<bytes of device memory>, name=<device name>.
//
// Locks: Adapter::mu_ (devices), Device::mu_ (allocations, contexts), Context::mu_ (queue).
// Order Adapter::mu_ -> Device::mu_ -> Context::mu_ (only pfnResetEngine nests them). No lock
// is held while calling the host.
#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <thread>

#include "kmd/mock/mock_kernels.h"
#include "kmd/opencl/kmd_support.h"

#ifndef GPUP_MOCK_PARAVIRTUALIZATION
#define GPUP_MOCK_PARAVIRTUALIZATION 1
#endif
#ifndef GPUP_MOCK_IOMMU_SECURE
#define GPUP_MOCK_IOMMU_SECURE 1
#endif
#ifndef GPUP_MOCK_OMIT_CREATE_CONTEXT
#define GPUP_MOCK_OMIT_CREATE_CONTEXT 0
#endif
#ifndef GPUP_MOCK_REPORTED_MAJOR
#define GPUP_MOCK_REPORTED_MAJOR GPUPDDI_VERSION_MAJOR
#endif
#ifndef GPUP_MOCK_DRIVER_NAME
#define GPUP_MOCK_DRIVER_NAME "kmd_mock"
#endif

namespace gpup::kmd::mock {
namespace {

constexpr uint64_t kDefaultMemory = 1ull << 30;
constexpr uint64_t kMaxAlloc = 256ull << 20;
constexpr uint64_t kLocalMem = 32 << 10;
constexpr uint32_t kAlignBytes = 128;
constexpr uint64_t kMaxWorkGroup = 256;
constexpr uint64_t kMaxParameterSize = 1024;
constexpr size_t kMaxKernelName = 256;
constexpr uint32_t kMaxCommands = 1u << 16;
// OpenCL's codes, so a mock build result reads like a real one.
constexpr int32_t kClBuildProgramFailure = -11;
constexpr int32_t kClInvalidBinary = -42;
constexpr int32_t kClLinkProgramFailure = -17;

// ---------------------------------------------------------------------------------------------
// Kernels

enum class Param { kBuffer, kInt, kUlong, kLocal, kImageRead, kImageWrite, kSampler };

struct BufferView {
  unsigned char* base = nullptr;  // NULL for a NULL buffer
  uint64_t size = 0;
};

// An image argument: the allocation's memory and its checked layout.
struct ImageView {
  unsigned char* base = nullptr;
  ImageLayout layout;
};

struct Launch {
  uint32_t dims = 1;
  uint64_t offset[3] = {};
  uint64_t global[3] = {1, 1, 1};
  BufferView buffers[4];
  uint64_t values[4] = {};
  ImageView images[4];
  GPUP_OCL_SAMPLER_DESC samplers[4] = {};
  const std::atomic<gpup_status>* reset = nullptr;
};

// Runs body(gid0) over the whole ND range; a non-SUCCESS result stops it. Every 64 Ki items it
// checks for an engine reset.
template <typename Body>
gpup_status for_each_item(const Launch& l, Body&& body) {
  uint64_t count = 0;
  for (uint64_t k = 0; k < l.global[2]; ++k) {
    for (uint64_t j = 0; j < l.global[1]; ++j) {
      for (uint64_t i = 0; i < l.global[0]; ++i) {
        if ((++count & 0xffff) == 0 && l.reset->load() != GPUP_STATUS_SUCCESS) return l.reset->load();
        if (gpup_status s = body(l.offset[0] + i); s != GPUP_STATUS_SUCCESS) return s;
      }
    }
  }
  return GPUP_STATUS_SUCCESS;
}

template <typename T>
T* element(const BufferView& b, uint64_t index) {
  if (b.base == nullptr || index >= b.size / sizeof(T)) return nullptr;
  return reinterpret_cast<T*>(b.base + index * sizeof(T));
}

gpup_status run_add_i32(const Launch& l) {
  const int32_t v = static_cast<int32_t>(l.values[1]);
  return for_each_item(l, [&](uint64_t gid) -> gpup_status {
    int32_t* p = element<int32_t>(l.buffers[0], gid);
    if (p == nullptr) return GPUP_STATUS_DEVICE_ERROR;
    int32_t x;
    std::memcpy(&x, p, sizeof(x));
    x = static_cast<int32_t>(static_cast<uint32_t>(x) + static_cast<uint32_t>(v));  // wraps like OpenCL
    std::memcpy(p, &x, sizeof(x));
    return GPUP_STATUS_SUCCESS;
  });
}

gpup_status run_copy_i32(const Launch& l) {
  return for_each_item(l, [&](uint64_t gid) -> gpup_status {
    const int32_t* s = element<int32_t>(l.buffers[0], gid);
    int32_t* d = element<int32_t>(l.buffers[1], gid);
    if (s == nullptr || d == nullptr) return GPUP_STATUS_DEVICE_ERROR;
    std::memmove(d, s, sizeof(int32_t));
    return GPUP_STATUS_SUCCESS;
  });
}

gpup_status run_or_null_i32(const Launch& l) {
  return for_each_item(l, [&](uint64_t gid) -> gpup_status {
    int32_t* d = element<int32_t>(l.buffers[0], gid);
    if (d == nullptr) return GPUP_STATUS_DEVICE_ERROR;
    int32_t v = -1;
    if (l.buffers[1].base != nullptr) {
      const int32_t* s = element<int32_t>(l.buffers[1], gid);
      if (s == nullptr) return GPUP_STATUS_DEVICE_ERROR;
      std::memcpy(&v, s, sizeof(v));
    }
    std::memcpy(d, &v, sizeof(v));
    return GPUP_STATUS_SUCCESS;
  });
}

gpup_status run_spin(const Launch& l) {
  const uint64_t iterations = l.values[1];
  return for_each_item(l, [&](uint64_t gid) -> gpup_status {
    uint64_t* out = element<uint64_t>(l.buffers[0], gid);
    if (out == nullptr) return GPUP_STATUS_DEVICE_ERROR;
    uint64_t x = gid;
    for (uint64_t i = 0; i < iterations; ++i) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      if ((i & 0xfffff) == 0xfffff && l.reset->load() != GPUP_STATUS_SUCCESS) return l.reset->load();
    }
    std::memcpy(out, &x, sizeof(x));
    return GPUP_STATUS_SUCCESS;
  });
}

// Pixel (x, y) of a 2D CL_R / CL_UNSIGNED_INT32 image, or nullptr when the image is not one or
// the pixel is outside it (a device fault).
unsigned char* pixel_u32(const ImageView& v, uint64_t x, uint64_t y) {
  const ImageLayout& l = v.layout;
  if (v.base == nullptr || l.image_type != cl_values::kImage2D || l.channel_order != cl_values::kR ||
      l.channel_type != cl_values::kUnsignedInt32 || x >= l.width || y >= l.height) {
    return nullptr;
  }
  return v.base + y * l.row_pitch + x * 4;  // inside l.bytes, checked at allocation
}

gpup_status run_image_read_u32(const Launch& l) {
  const GPUP_OCL_SAMPLER_DESC& s = l.samplers[1];
  if (s.NormalizedCoords != 0 || s.FilterMode != cl_values::kFilterNearest) return GPUP_STATUS_DEVICE_ERROR;
  const uint64_t w = l.images[0].layout.width;
  return for_each_item(l, [&](uint64_t gid) -> gpup_status {
    const unsigned char* px = w != 0 ? pixel_u32(l.images[0], gid % w, gid / w) : nullptr;
    uint32_t* out = element<uint32_t>(l.buffers[2], gid);
    if (px == nullptr || out == nullptr) return GPUP_STATUS_DEVICE_ERROR;
    std::memcpy(out, px, 4);
    return GPUP_STATUS_SUCCESS;
  });
}

gpup_status run_image_write_u32(const Launch& l) {
  const uint32_t add = static_cast<uint32_t>(l.values[2]);
  const uint64_t w = l.images[0].layout.width;
  return for_each_item(l, [&](uint64_t gid) -> gpup_status {
    unsigned char* px = w != 0 ? pixel_u32(l.images[0], gid % w, gid / w) : nullptr;
    const uint32_t* in = element<uint32_t>(l.buffers[1], gid);
    if (px == nullptr || in == nullptr) return GPUP_STATUS_DEVICE_ERROR;
    uint32_t v;
    std::memcpy(&v, in, 4);
    v += add;
    std::memcpy(px, &v, 4);
    return GPUP_STATUS_SUCCESS;
  });
}

gpup_status run_fault(const Launch&) { return GPUP_STATUS_DEVICE_ERROR; }

struct ParamDef {
  Param kind;
  const char* type;  // the OpenCL C type, as CL_KERNEL_ARG_TYPE_NAME says it
  const char* name;
};

struct KernelDef {
  const char* name;
  std::initializer_list<ParamDef> params;
  gpup_status (*run)(const Launch&);
};

const std::array<KernelDef, 7> kKernels = {{
    {"add_i32", {{Param::kBuffer, "int*", "b"}, {Param::kInt, "int", "v"}}, run_add_i32},
    {"copy_i32", {{Param::kBuffer, "int*", "src"}, {Param::kBuffer, "int*", "dst"}}, run_copy_i32},
    {"or_null_i32",
     {{Param::kBuffer, "int*", "dst"}, {Param::kBuffer, "int*", "src"}, {Param::kLocal, "int*", "scratch"}},
     run_or_null_i32},
    {"spin", {{Param::kBuffer, "ulong*", "out"}, {Param::kUlong, "ulong", "iterations"}}, run_spin},
    {"fault", {{Param::kBuffer, "int*", "b"}}, run_fault},
    {"image_read_u32",
     {{Param::kImageRead, "image2d_t", "img"}, {Param::kSampler, "sampler_t", "s"}, {Param::kBuffer, "uint*", "out"}},
     run_image_read_u32},
    {"image_write_u32",
     {{Param::kImageWrite, "image2d_t", "img"}, {Param::kBuffer, "uint*", "in"}, {Param::kInt, "uint", "add"}},
     run_image_write_u32},
}};

const KernelDef* find_kernel(std::string_view name) {
  for (const KernelDef& k : kKernels) {
    if (name == k.name) return &k;
  }
  return nullptr;
}

bool is_ident(unsigned char c) { return std::isalnum(c) || c == '_'; }

// The names declared as "[__]kernel void NAME" in text, in order.
std::vector<std::string> declared_kernels(std::string_view text) {
  std::vector<std::string> tokens;
  size_t i = 0;
  while (i < text.size()) {
    if (!is_ident(static_cast<unsigned char>(text[i]))) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && is_ident(static_cast<unsigned char>(text[j]))) ++j;
    tokens.emplace_back(text.substr(i, j - i));
    i = j;
  }
  std::vector<std::string> names;
  for (size_t t = 0; t + 2 < tokens.size(); ++t) {
    if ((tokens[t] == "kernel" || tokens[t] == "__kernel") && tokens[t + 1] == "void") names.push_back(tokens[t + 2]);
  }
  return names;
}

// ---------------------------------------------------------------------------------------------
// What the guest's ICD learns: device info records and program info

// OpenCL's values for the few names used here (the mock does not include the OpenCL headers).
constexpr uint32_t kClDeviceType = 0x1000, kClDeviceMaxComputeUnits = 0x1002, kClDeviceMaxWorkItemDimensions = 0x1003,
                   kClDeviceMaxWorkGroupSize = 0x1004, kClDeviceMaxWorkItemSizes = 0x1005, kClDeviceAddressBits = 0x100D,
                   kClDeviceMaxMemAllocSize = 0x1010, kClDeviceMaxParameterSize = 0x1017,
                   kClDeviceMemBaseAddrAlign = 0x1019, kClDeviceGlobalMemSize = 0x101F,
                   kClDeviceMaxConstantBufferSize = 0x1020, kClDeviceLocalMemSize = 0x1023, kClDeviceName = 0x102B,
                   kClDeviceVendor = 0x102C, kClDriverVersion = 0x102D, kClDeviceProfile = 0x102E,
                   kClDeviceVersion = 0x102F, kClDeviceExtensions = 0x1030, kClDeviceOpenClCVersion = 0x103D;
constexpr uint64_t kClDeviceTypeAccelerator = 1 << 3;
constexpr uint32_t kClArgAddressGlobal = 0x119B, kClArgAddressLocal = 0x119C, kClArgAddressPrivate = 0x119E;
constexpr uint32_t kClArgAccessReadOnly = 0x11A0, kClArgAccessWriteOnly = 0x11A1, kClArgAccessNone = 0x11A3;
constexpr uint32_t kClBinaryCompiledObject = 0x1, kClBinaryLibrary = 0x2, kClBinaryExecutable = 0x4;

template <typename T>
std::vector<unsigned char> raw(const T& v) {
  std::vector<unsigned char> out(sizeof(T));
  std::memcpy(out.data(), &v, sizeof(T));
  return out;
}
std::vector<unsigned char> raw_string(std::string_view s) {  // with its NUL, as clGetDeviceInfo
  std::vector<unsigned char> out(s.begin(), s.end());
  out.push_back(0);
  return out;
}

// A small, plausible clGetDeviceInfo answer set for the made-up device.
InfoList synthetic_device_info(const GPUPDDI_DEVICEINFO& info, const GPUP_OCL_UMD_INFO& umd) {
  std::map<uint32_t, std::vector<unsigned char>> r;
  r[kClDeviceType] = raw(kClDeviceTypeAccelerator);
  r[kClDeviceMaxComputeUnits] = raw(info.ComputeUnits);
  r[kClDeviceMaxWorkItemDimensions] = raw(umd.MaxWorkItemDimensions);
  r[kClDeviceMaxWorkGroupSize] = raw(uint64_t{info.MaxWorkGroupSize});
  r[kClDeviceMaxWorkItemSizes] = raw(umd.MaxWorkItemSizes);
  r[kClDeviceAddressBits] = raw(umd.AddressBits);
  r[kClDeviceMaxMemAllocSize] = raw(info.MaxAllocSize);
  r[kClDeviceMaxParameterSize] = raw(umd.MaxParameterSize);
  r[kClDeviceMemBaseAddrAlign] = raw(info.MemBaseAddrAlignBits);
  r[kClDeviceGlobalMemSize] = raw(info.GlobalMemSize);
  r[kClDeviceMaxConstantBufferSize] = raw(umd.MaxConstantBufferSize);
  r[kClDeviceLocalMemSize] = raw(info.LocalMemSize);
  r[kClDeviceName] = raw_string(info.Name);
  r[kClDeviceVendor] = raw_string(info.Vendor);
  r[kClDriverVersion] = raw_string(info.DriverVersion);
  r[kClDeviceProfile] = raw_string("FULL_PROFILE");
  r[kClDeviceVersion] = raw_string(umd.DeviceVersion);
  r[kClDeviceExtensions] = raw_string(umd.Extensions);
  r[kClDeviceOpenClCVersion] = raw_string(umd.OpenCLCVersion);
  return encode_info_list(r);
}

// GPUP_OCL_PROGRAM_INFO of a mock program: its kernels as the table above declares them, and
// its text as the binary (a mock "binary" is read as text again).
ProgramDescription describe_program(uint32_t binary_type, const std::vector<const KernelDef*>& kernels,
                                    const std::string& text) {
  ProgramDescription d;
  d.binary_type = binary_type;
  for (const KernelDef* k : kernels) {
    KernelDescription kd;
    kd.name = k->name;
    kd.info.WorkGroupSize = kMaxWorkGroup;
    kd.info.PreferredWorkGroupSizeMultiple = 1;
    for (const ParamDef& p : k->params) {
      ArgDescription a;
      a.type_name = p.type;
      a.name = p.name;
      GPUP_OCL_KERNEL_ARG_INFO& ai = a.info;
      ai.AccessQualifier = kClArgAccessNone;
      switch (p.kind) {
        case Param::kBuffer:
          ai.AddressQualifier = kClArgAddressGlobal;
          ai.Kind = GPUPDDI_ARG_BUFFER;
          ai.ValueSize = 8;
          break;
        case Param::kLocal:
          ai.AddressQualifier = kClArgAddressLocal;
          ai.Kind = GPUPDDI_ARG_LOCAL;
          break;
        case Param::kImageRead:
        case Param::kImageWrite:
          ai.AddressQualifier = kClArgAddressGlobal;  // images are __global objects, as PoCL says
          ai.AccessQualifier = p.kind == Param::kImageRead ? kClArgAccessReadOnly : kClArgAccessWriteOnly;
          ai.Kind = GPUPDDI_ARG_IMAGE;
          ai.ValueSize = 8;
          break;
        case Param::kSampler:
          ai.AddressQualifier = kClArgAddressPrivate;
          ai.Kind = GPUPDDI_ARG_SAMPLER;
          ai.ValueSize = 8;
          break;
        case Param::kInt:
        case Param::kUlong:
          ai.AddressQualifier = kClArgAddressPrivate;
          ai.Kind = GPUPDDI_ARG_VALUE;
          ai.ValueSize = p.kind == Param::kInt ? 4 : 8;  // the mock takes exactly the type's size
          break;
      }
      kd.args.push_back(std::move(a));
    }
    d.kernels.push_back(std::move(kd));
  }
  d.binary.assign(text.begin(), text.end());
  d.binary_size = d.binary.size();
  return d;
}

// ---------------------------------------------------------------------------------------------
// Objects

class Device;
class Context;

class Allocation final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kAllocation;
  Allocation() : KmdObject(kTag) {}
  ~Allocation() override { std::free(owned_); }

  GPUPDDI_ALLOCATIONFLAGS flags{};
  uint64_t size = 0;
  unsigned char* base = nullptr;  // the backing store or owned_
  unsigned char* owned_ = nullptr;
  std::vector<std::string> kernels;  // programs: the declared kernel names
  bool executable = false;           // programs: not a compiled object or library
  ImageLayout layout;                // Flags.Image
};

// A command resolved to host pointers, ready for the worker.
struct Command {
  uint32_t type = 0;
  unsigned char* src = nullptr;
  unsigned char* dst = nullptr;
  uint64_t size = 0;
  uint32_t pattern_size = 0;
  unsigned char pattern[GPUPDDI_MAX_FILL_PATTERN] = {};
  const KernelDef* kernel = nullptr;
  Launch launch;
};

struct Submission {
  uint64_t id = 0;
  std::vector<Command> commands;
  std::atomic<gpup_status> reset{GPUP_STATUS_SUCCESS};  // set by pfnResetEngine
};

class Adapter;

class Context final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kContext;
  Context(Device* device, GPUPDDI_SYSTEM_HANDLE system_context)
      : KmdObject(kTag), device_(device), system_context_(system_context) {
    worker_ = std::thread([this] { run(); });
  }
  // Waits until every submission has run and been reported, then joins the worker.
  ~Context() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  gpup_status submit(const GPUPDDI_ARG_SUBMITCOMMAND* args);
  // Completes the running and queued submissions with status instead of running them further.
  void reset(gpup_status status) {
    std::lock_guard lock(mu_);
    if (running_) running_->reset.store(status);
    for (auto& s : queue_) s->reset.store(status);
  }
  Device* device() const { return device_; }

 private:
  Status prepare(const GPUPDDI_COMMAND& in, Command* out);
  Result<BufferView> buffer(const GPUPDDI_BUFFER_REF& ref, const char* what);
  void run();

  Device* const device_;
  const GPUPDDI_SYSTEM_HANDLE system_context_;
  std::mutex submit_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Submission>> queue_;
  std::shared_ptr<Submission> running_;
  bool stopping_ = false;
  std::thread worker_;
};

class Device final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kDevice;
  Device(Adapter* adapter, Process* process) : KmdObject(kTag), adapter(adapter), process(process) {}
  ~Device() override {
    OwnedObjects<Context> contexts;
    {
      std::lock_guard lock(mu_);
      contexts.swap(contexts_);
    }
    contexts.clear();
    std::lock_guard lock(mu_);
    while (!allocations_.empty()) release(allocations_.begin());
  }

  gpup_status create_allocation(GPUPDDI_ARG_CREATEALLOCATION* args);
  void destroy_allocation(GPUPDDI_HANDLE h) {
    std::lock_guard lock(mu_);
    auto it = allocations_.find(static_cast<const KmdObject*>(h));
    if (it == allocations_.end()) {
      log_message(GPUPDDI_LOG_ERROR, "DestroyAllocation: unknown allocation");
      return;
    }
    release(it);
  }
  Allocation* find_allocation(GPUPDDI_HANDLE h) { return find_owned(mu_, allocations_, static_cast<const KmdObject*>(h)); }
  // The backing store is the memory, so Lock and Unlock only check their arguments.
  gpup_status lock(GPUPDDI_HANDLE h) { return check_lockable(h); }
  gpup_status unlock(GPUPDDI_HANDLE h) { return check_lockable(h); }
  gpup_status create_context(GPUPDDI_ARG_CREATECONTEXT* args);
  void destroy_context(Context* c) {
    take(mu_, contexts_, c, "DestroyContext: unknown context");  // destroyed outside mu_
  }
  void reset_all(gpup_status status) {
    std::lock_guard lock(mu_);
    for (auto& [key, c] : contexts_) c->reset(status);
  }

  Adapter* const adapter;
  Process* const process;

 private:
  using AllocMap = OwnedObjects<Allocation>;
  void release(AllocMap::iterator it);
  gpup_status check_lockable(GPUPDDI_HANDLE h) {
    Allocation* a = find_allocation(h);
    if (a == nullptr) return GPUP_STATUS_INVALID_HANDLE;
    return a->flags.CpuVisible ? GPUP_STATUS_SUCCESS : GPUP_STATUS_INVALID_PARAMETER;
  }

  std::mutex mu_;
  AllocMap allocations_;
  OwnedObjects<Context> contexts_;
};

class Adapter final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kAdapter;
  Adapter() : KmdObject(kTag) {}
  ~Adapter() override {
    OwnedObjects<Device> devices;
    {
      std::lock_guard lock(mu_);
      devices.swap(devices_);
    }
    devices.clear();
    processes.clear();
  }

  static Result<std::unique_ptr<Adapter>> start(const char* config);

  gpup_status query(const GPUPDDI_ARG_QUERYADAPTERINFO* args);
  const GPUPDDI_DEVICEINFO& device_info() const { return info; }
  gpup_status create_device(GPUPDDI_ARG_CREATEDEVICE* args) {
    if (!arg_ok(args) || args->Flags != 0) return GPUP_STATUS_INVALID_PARAMETER;
    Process* process = processes.find(args->hKmdProcess);
    if (process == nullptr) return GPUP_STATUS_INVALID_HANDLE;
    if (!process->may_create_devices()) return GPUP_STATUS_INVALID_PARAMETER;
    args->hDevice = adopt(mu_, devices_, std::make_unique<Device>(this, process));
    return GPUP_STATUS_SUCCESS;
  }
  void destroy_device(Device* d) {
    take(mu_, devices_, d, "DestroyDevice: unknown device");  // destroyed outside mu_
  }
  static constexpr bool kCanResetEngine = true;
  gpup_status reset_engine(const GPUPDDI_ARG_RESETENGINE* args) {
    if (!arg_ok(args) || args->NodeOrdinal != 0) return GPUP_STATUS_INVALID_PARAMETER;
    if (args->hContext != nullptr) {
      Context* c = from_handle<Context>(args->hContext);
      if (c == nullptr) return GPUP_STATUS_INVALID_HANDLE;
      log_message(GPUPDDI_LOG_INFO, "ResetEngine: resetting one context");
      c->reset(GPUP_STATUS_CONTEXT_RESET_GUILTY);
      return GPUP_STATUS_SUCCESS;
    }
    log_message(GPUPDDI_LOG_INFO, "ResetEngine: resetting the engine");
    std::lock_guard lock(mu_);
    for (auto& [key, d] : devices_) d->reset_all(GPUP_STATUS_CONTEXT_RESET_INNOCENT);
    return GPUP_STATUS_SUCCESS;
  }

  GPUPDDI_DEVICEINFO info{};
  GPUP_OCL_UMD_INFO umd{};
  InfoList device_info_list;  // GPUP_OCL_QUERY_DEVICE_INFO
  ImageFormats image_formats; // what image allocations may use
  InfoList image_formats_list;  // GPUP_OCL_QUERY_IMAGE_FORMATS
  std::atomic<uint64_t> memory_used{0};
  ProcessTable processes;

 private:
  std::mutex mu_;
  OwnedObjects<Device> devices_;
};

// ---------------------------------------------------------------------------------------------
// Adapter

gpup_status Adapter::query(const GPUPDDI_ARG_QUERYADAPTERINFO* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->pOutputDataWritten != nullptr) *args->pOutputDataWritten = 0;
  switch (args->Type) {
    case GPUPDDI_QAITYPE_UMDRIVERPRIVATE:
      return handle_umd_private_query(args, umd, device_info_list, image_formats_list);
    case GPUPDDI_QAITYPE_DRIVERCAPS: {
      GPUPDDI_DRIVERCAPS caps{};
      caps.WDDMVersion = 0x3000;
      caps.MemoryManagementCaps.ParavirtualizationSupported = GPUP_MOCK_PARAVIRTUALIZATION;
      caps.MemoryManagementCaps.IoMmuSecureModeSupported = GPUP_MOCK_IOMMU_SECURE;
      caps.ComputeOnly = 1;
      caps.SupportPerEngineTDR = 1;
      caps.NodeCount = 1;
      caps.MaxAllocationSize = info.MaxAllocSize;
      return write_query_output(args, caps);
    }
    case GPUPDDI_QAITYPE_QUERYSEGMENT:
      return write_query_output(args, standard_segments(info.GlobalMemSize));
    case GPUPDDI_QAITYPE_DEVICEINFO:
      return write_query_output(args, info);
    case GPUPDDI_QAITYPE_GPUMMUCAPS:
      return write_query_output(args, standard_mmu_caps(true));
    case GPUPDDI_QAITYPE_PAGETABLELEVELDESC:
      return answer_page_table_level(args);
    case GPUPDDI_QAITYPE_GPUPCAPS:
      return write_query_output(args, GPUPDDI_GPUPCAPS{});
    default:
      logf(GPUPDDI_LOG_WARN, "QueryAdapterInfo: unsupported type {}", args->Type);
      return GPUP_STATUS_NOT_SUPPORTED;
  }
}

Result<std::unique_ptr<Adapter>> Adapter::start(const char* config) {
  static constexpr std::array<std::string_view, 2> kKeys = {"memory", "name"};
  auto cfg = parse_config(config, kKeys);
  if (!cfg) return cfg.error();
  uint64_t memory = kDefaultMemory;
  if (auto it = cfg->find("memory"); it != cfg->end()) {
    if (!parse_u64(it->second, &memory) || memory < (1u << 20)) {
      return Error(GPUP_STATUS_INVALID_PARAMETER,
                   fmt::format("config memory='{}' is not a byte count of at least 1 MiB", printable(it->second)));
    }
  }
  auto a = std::make_unique<Adapter>();
  GPUPDDI_DEVICEINFO& info = a->info;
  auto name = cfg->find("name");
  copy_fixed_string(info.Name, name != cfg->end() ? name->second : std::string("gpup mock device"));
  copy_fixed_string(info.Vendor, "gpup");
  copy_fixed_string(info.DriverVersion, "1.0");
  copy_fixed_string(info.Platform, "gpup mock platform");
  info.GlobalMemSize = memory;
  info.MaxAllocSize = std::min(kMaxAlloc, memory);
  info.LocalMemSize = kLocalMem;
  info.ComputeUnits = 4;
  info.MaxWorkGroupSize = kMaxWorkGroup;
  info.MemBaseAddrAlignBits = kAlignBytes * 8;

  GPUP_OCL_UMD_INFO& umd = a->umd;
  umd.ContractVersion = GPUP_OCL_CONTRACT_VERSION;
  umd.ProgramFormats =
      GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_SOURCE) | GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_BINARY) |
      GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_COMPILE) | GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_LINK);
  umd.AddressBits = 64;
  umd.MaxWorkItemDimensions = 3;
  for (auto& s : umd.MaxWorkItemSizes) s = kMaxWorkGroup;
  umd.MaxParameterSize = kMaxParameterSize;
  umd.MaxConstantBufferSize = 64 << 10;
  copy_fixed_string(umd.DeviceVersion, "OpenCL 1.2 gpup-mock");
  copy_fixed_string(umd.OpenCLCVersion, "OpenCL C 1.2");
  a->device_info_list = synthetic_device_info(info, umd);
  // The one format the mock's image kernels handle, for 2D images of every access.
  for (uint64_t access : {cl_values::kMemReadWrite, cl_values::kMemReadOnly, cl_values::kMemWriteOnly}) {
    a->image_formats.set(cl_values::kImage2D, access, {{cl_values::kR, cl_values::kUnsignedInt32}});
  }
  a->image_formats_list = a->image_formats.encode();
  logf(GPUPDDI_LOG_INFO, "mock adapter started: '{}', {} MiB", info.Name, memory >> 20);
  return a;
}

// ---------------------------------------------------------------------------------------------
// Device

void Device::release(AllocMap::iterator it) {
  Allocation& a = *it->second;
  if (!a.flags.Program && !a.flags.CpuVisible) adapter->memory_used.fetch_sub(a.size);
  allocations_.erase(it);
}

gpup_status Device::create_allocation(GPUPDDI_ARG_CREATEALLOCATION* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  args->OutputDataWritten = 0;
  const GPUPDDI_ALLOCATIONFLAGS f = args->Flags;
  if (f.Reserved != 0) return GPUP_STATUS_INVALID_PARAMETER;
  auto alloc = std::make_unique<Allocation>();
  alloc->flags = f;
  if (f.Image) {
    if (f.Program || !f.CpuVisible || args->pSystemMemory == nullptr) return GPUP_STATUS_INVALID_PARAMETER;
    if (args->Size == 0 || args->Size > adapter->info.MaxAllocSize) return GPUP_STATUS_INVALID_PARAMETER;
    auto layout = parse_image_desc(args->pPrivateDriverData, args->PrivateDriverDataSize, args->Size, f.ReadOnly != 0);
    if (!layout) {
      logf(GPUPDDI_LOG_WARN, "CreateAllocation: {}", layout.error().message);
      return layout.error().status;
    }
    if (!adapter->image_formats.supports(layout->image_type, layout->access, layout->channel_order,
                                         layout->channel_type)) {
      logf(GPUPDDI_LOG_WARN, "CreateAllocation: image format (order {:#x}, type {:#x}) of type {:#x} not supported",
           layout->channel_order, layout->channel_type, layout->image_type);
      return GPUP_STATUS_INVALID_PARAMETER;
    }
    alloc->layout = *layout;
    alloc->base = static_cast<unsigned char*>(args->pSystemMemory);
    alloc->size = args->Size;
  } else if (f.Program) {
    if (f.CpuVisible || args->pSystemMemory != nullptr) return GPUP_STATUS_INVALID_PARAMETER;
    auto image = parse_program_desc(args->pPrivateDriverData, args->PrivateDriverDataSize);
    if (!image) {
      logf(GPUPDDI_LOG_WARN, "CreateAllocation: {}", image.error().message);
      return image.error().status;
    }
    // What the mock "builds": SOURCE and BINARY content is text; COMPILE keeps the texts of
    // the headers and the main source, in that order, as its object; LINK joins its inputs.
    std::string text;
    uint32_t binary_type = kClBinaryExecutable;
    switch (image->format) {
      case GPUP_OCL_PROGRAM_SOURCE:
      case GPUP_OCL_PROGRAM_BINARY:
        text.assign(image->content.begin(), image->content.end());
        break;
      case GPUP_OCL_PROGRAM_COMPILE:
        for (size_t i = 1; i <= image->entries.size(); ++i) {
          const auto& data = image->entries[i % image->entries.size()].data;  // headers, then entry 0
          text.append(data.begin(), data.end());
          text.push_back('\n');
        }
        binary_type = kClBinaryCompiledObject;
        break;
      case GPUP_OCL_PROGRAM_LINK:
        for (const auto& e : image->entries) {
          text.append(e.data.begin(), e.data.end());
          text.push_back('\n');
        }
        if (image->options.find("-create-library") != std::string::npos) binary_type = kClBinaryLibrary;
        break;
    }
    std::vector<std::string> names;
    std::string log;
    if (binary_type == kClBinaryExecutable) {
      names = declared_kernels(text);
      for (const std::string& n : names) {
        if (find_kernel(n) == nullptr) {
          log += fmt::format("mock: kernel '{}' is not one the mock device can run\n", printable(n));
        }
      }
      if (names.empty()) log += "mock: no kernel declarations found\n";
    }
    const bool failed = !log.empty();
    const int32_t build_error = !failed                                    ? 0
                                : image->format == GPUP_OCL_PROGRAM_BINARY ? kClInvalidBinary
                                : image->format == GPUP_OCL_PROGRAM_LINK   ? kClLinkProgramFailure
                                                                           : kClBuildProgramFailure;
    if (failed) {
      log += fmt::format("mock: known kernels:");
      for (const KernelDef& k : kKernels) log += fmt::format(" {}", k.name);
      log += "\n";
      args->OutputDataWritten =
          write_program_output(args->pOutputData, args->OutputDataSize, image->version, build_error, log, nullptr);
      return GPUP_STATUS_BUILD_FAILED;
    }
    std::vector<const KernelDef*> defs;
    for (const std::string& n : names) defs.push_back(find_kernel(n));
    const ProgramDescription described = describe_program(binary_type, defs, text);
    args->OutputDataWritten =
        write_program_output(args->pOutputData, args->OutputDataSize, image->version, 0, log, &described);
    alloc->kernels = std::move(names);
    alloc->executable = binary_type == kClBinaryExecutable;
  } else {
    if (args->Size == 0 || args->Size > adapter->info.MaxAllocSize) return GPUP_STATUS_INVALID_PARAMETER;
    if (args->PrivateDriverDataSize != 0) return GPUP_STATUS_INVALID_PARAMETER;
    if (f.CpuVisible != (args->pSystemMemory != nullptr)) return GPUP_STATUS_INVALID_PARAMETER;
    if (f.CpuVisible) {
      alloc->base = static_cast<unsigned char*>(args->pSystemMemory);
    } else {
      const uint64_t used = adapter->memory_used.fetch_add(args->Size) + args->Size;
      if (used > adapter->info.GlobalMemSize) {
        adapter->memory_used.fetch_sub(args->Size);
        return GPUP_STATUS_NO_MEMORY;
      }
      alloc->owned_ = static_cast<unsigned char*>(std::calloc(1, args->Size));
      if (alloc->owned_ == nullptr) {
        adapter->memory_used.fetch_sub(args->Size);
        return GPUP_STATUS_NO_MEMORY;
      }
      alloc->base = alloc->owned_;
    }
    alloc->size = args->Size;
  }
  args->hAllocation = adopt(mu_, allocations_, std::move(alloc));
  return GPUP_STATUS_SUCCESS;
}

gpup_status Device::create_context(GPUPDDI_ARG_CREATECONTEXT* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->NodeOrdinal != 0 || args->Priority < -2 || args->Priority > 2 || args->Flags != 0 ||
      args->PrivateDriverDataSize != 0) {
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  args->hContext = adopt(mu_, contexts_, std::make_unique<Context>(this, args->hSystemContext));
  return GPUP_STATUS_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// Context

Error invalid(std::string why) { return Error(GPUP_STATUS_INVALID_PARAMETER, std::move(why)); }

Result<BufferView> Context::buffer(const GPUPDDI_BUFFER_REF& ref, const char* what) {
  Allocation* a = device_->find_allocation(ref.hAllocation);
  if (a == nullptr) return Error(GPUP_STATUS_INVALID_HANDLE, fmt::format("{}: not an allocation of this device", what));
  if (a->flags.Program) return invalid(fmt::format("{}: a program allocation is not a buffer", what));
  if (ref.Offset > a->size || ref.Size > a->size - ref.Offset) {
    return Error(GPUP_STATUS_OUT_OF_RANGE, fmt::format("{}: range outside the allocation", what));
  }
  if (ref.Size == 0) return invalid(fmt::format("{}: empty range", what));
  return BufferView{a->base + ref.Offset, ref.Size};
}

Status Context::prepare(const GPUPDDI_COMMAND& in, Command* out) {
  out->type = in.Type;
  switch (in.Type) {
    case GPUPDDI_COMMAND_COPY: {
      const GPUPDDI_COPY& c = in.u.Copy;
      auto src = buffer(c.Src, "copy source");
      if (!src) return src.error();
      auto dst = buffer(c.Dst, "copy destination");
      if (!dst) return dst.error();
      if (c.Src.Size != c.Dst.Size) return invalid("copy sizes differ");
      if (c.Src.hAllocation == c.Dst.hAllocation && c.Src.Offset < c.Dst.Offset + c.Dst.Size &&
          c.Dst.Offset < c.Src.Offset + c.Src.Size) {
        return invalid("copy source and destination overlap");
      }
      out->src = src->base;
      out->dst = dst->base;
      out->size = c.Src.Size;
      return {};
    }
    case GPUPDDI_COMMAND_FILL: {
      const GPUPDDI_FILL& f = in.u.Fill;
      const uint32_t ps = f.PatternSize;
      if (ps == 0 || ps > GPUPDDI_MAX_FILL_PATTERN || (ps & (ps - 1)) != 0) return invalid("bad fill pattern size");
      auto dst = buffer(f.Dst, "fill destination");
      if (!dst) return dst.error();
      if (f.Dst.Offset % ps != 0 || f.Dst.Size % ps != 0) return invalid("fill range not a multiple of the pattern");
      out->dst = dst->base;
      out->size = f.Dst.Size;
      out->pattern_size = ps;
      std::memcpy(out->pattern, f.Pattern, ps);
      return {};
    }
    case GPUPDDI_COMMAND_DISPATCH: {
      const GPUPDDI_DISPATCH& d = in.u.Dispatch;
      Allocation* prog = device_->find_allocation(d.hProgram);
      if (prog == nullptr) return Error(GPUP_STATUS_INVALID_HANDLE, "dispatch: hProgram is not an allocation");
      if (!prog->flags.Program) return invalid("dispatch: hProgram is not a program");
      if (!prog->executable) return invalid("dispatch: the program is a compiled object or library, not an executable");
      if (d.pKernelName == nullptr) return invalid("dispatch: no kernel name");
      const size_t len = strnlen(d.pKernelName, kMaxKernelName);
      if (len == 0 || len == kMaxKernelName) return invalid("dispatch: kernel name empty or too long");
      const std::string name(d.pKernelName, len);
      const KernelDef* k = find_kernel(name);
      if (k == nullptr || std::find(prog->kernels.begin(), prog->kernels.end(), name) == prog->kernels.end()) {
        return Error(GPUP_STATUS_NOT_FOUND, fmt::format("the program has no kernel '{}'", printable(name)));
      }
      Launch& l = out->launch;
      if (d.WorkDim < 1 || d.WorkDim > 3) return invalid("dispatch: WorkDim outside 1..3");
      bool any_local = false;
      for (uint32_t i = 0; i < d.WorkDim; ++i) any_local |= d.LocalSize[i] != 0;
      uint64_t group = 1;
      for (uint32_t i = 0; i < d.WorkDim; ++i) {
        if (d.GlobalSize[i] == 0 || d.GlobalOffset[i] > UINT64_MAX - d.GlobalSize[i]) {
          return invalid("dispatch: bad global offset/size");
        }
        if (any_local) {
          const uint64_t ls = d.LocalSize[i];
          if (ls == 0 || ls > kMaxWorkGroup || d.GlobalSize[i] % ls != 0) return invalid("dispatch: bad local size");
          group *= ls;
        }
        l.offset[i] = d.GlobalOffset[i];
        l.global[i] = d.GlobalSize[i];
      }
      if (group > kMaxWorkGroup) return invalid("dispatch: work-group too large");
      l.dims = d.WorkDim;
      const size_t nparams = k->params.size();
      if (d.ArgCount != nparams) {
        return invalid(fmt::format("dispatch '{}': {} arguments given, the kernel takes {}", name, d.ArgCount, nparams));
      }
      if (nparams > 0 && d.pArgs == nullptr) return invalid("dispatch: no argument array");
      uint64_t local_bytes = 0;
      size_t i = 0;
      for (const ParamDef& def : k->params) {
        const Param p = def.kind;
        const GPUPDDI_KERNEL_ARG& a = d.pArgs[i];
        switch (p) {
          case Param::kBuffer:
            if (a.Kind == GPUPDDI_ARG_NULL_BUFFER) {
              l.buffers[i] = BufferView{};
            } else if (a.Kind == GPUPDDI_ARG_BUFFER) {
              auto view = buffer(a.Buffer, "buffer argument");
              if (!view) return view.error();
              if (a.Buffer.Offset % kAlignBytes != 0) {
                return invalid(fmt::format("dispatch '{}': argument {} offset {} is not {}-byte aligned", name, i,
                                           a.Buffer.Offset, kAlignBytes));
              }
              l.buffers[i] = *view;
            } else {
              return invalid(fmt::format("dispatch '{}': argument {} must be a buffer", name, i));
            }
            break;
          case Param::kInt:
          case Param::kUlong: {
            const uint32_t want = p == Param::kInt ? 4 : 8;
            if (a.Kind != GPUPDDI_ARG_VALUE || a.Size != want || a.pValue == nullptr) {
              return invalid(fmt::format("dispatch '{}': argument {} must be a {}-byte value", name, i, want));
            }
            if (want == 4) {
              int32_t v;
              std::memcpy(&v, a.pValue, 4);
              l.values[i] = static_cast<uint32_t>(v);
            } else {
              std::memcpy(&l.values[i], a.pValue, 8);
            }
            break;
          }
          case Param::kLocal:
            if (a.Kind != GPUPDDI_ARG_LOCAL || a.Size == 0) {
              return invalid(fmt::format("dispatch '{}': argument {} must be a non-empty local buffer", name, i));
            }
            local_bytes += a.Size;
            break;
          case Param::kImageRead:
          case Param::kImageWrite: {
            if (a.Kind != GPUPDDI_ARG_IMAGE) return invalid(fmt::format("dispatch '{}': argument {} must be an image", name, i));
            Allocation* img = device_->find_allocation(a.Buffer.hAllocation);
            if (img == nullptr) {
              return Error(GPUP_STATUS_INVALID_HANDLE, fmt::format("dispatch '{}': argument {}: not an allocation", name, i));
            }
            if (!img->flags.Image) return invalid(fmt::format("dispatch '{}': argument {} is not an image allocation", name, i));
            if (a.Buffer.Offset != 0 || a.Buffer.Size != img->size) {
              return invalid(fmt::format("dispatch '{}': image argument {} is not the whole allocation", name, i));
            }
            const uint64_t access = img->layout.access;
            const bool allowed = p == Param::kImageRead ? access != cl_values::kMemWriteOnly
                                                        : access != cl_values::kMemReadOnly;
            if (img->layout.image_type != cl_values::kImage2D || !allowed) {
              return invalid(fmt::format("dispatch '{}': image argument {} has the wrong type or access", name, i));
            }
            l.images[i] = ImageView{img->base, img->layout};
            break;
          }
          case Param::kSampler: {
            if (a.Kind != GPUPDDI_ARG_SAMPLER) return invalid(fmt::format("dispatch '{}': argument {} must be a sampler", name, i));
            auto desc = parse_sampler_desc(a.pValue, a.Size);
            if (!desc) return invalid(fmt::format("dispatch '{}': argument {}: {}", name, i, desc.error().message));
            l.samplers[i] = *desc;
            break;
          }
        }
        ++i;
      }
      if (local_bytes > kLocalMem) return invalid("dispatch: too much local memory");
      out->kernel = k;
      return {};
    }
    default:
      return invalid(fmt::format("unknown command type {}", in.Type));
  }
}

gpup_status Context::submit(const GPUPDDI_ARG_SUBMITCOMMAND* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->CommandCount > kMaxCommands || (args->CommandCount > 0 && args->pCommands == nullptr)) {
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  std::lock_guard submit_lock(submit_mu_);
  auto sub = std::make_shared<Submission>();
  sub->id = args->SubmissionId;
  sub->commands.resize(args->CommandCount);
  for (uint32_t i = 0; i < args->CommandCount; ++i) {
    Status s = prepare(args->pCommands[i], &sub->commands[i]);
    if (!s) {
      logf(GPUPDDI_LOG_WARN, "SubmitCommand {}: command {}: {}", args->SubmissionId, i, s.error().message);
      return s.status();
    }
    sub->commands[i].launch.reset = &sub->reset;
  }
  {
    std::lock_guard lock(mu_);
    queue_.push_back(std::move(sub));
  }
  cv_.notify_one();
  return GPUP_STATUS_SUCCESS;
}

void Context::run() {
  for (;;) {
    std::shared_ptr<Submission> sub;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return !queue_.empty() || stopping_; });
      if (queue_.empty()) return;
      sub = queue_.front();
      queue_.pop_front();
      running_ = sub;
    }
    gpup_status status = GPUP_STATUS_SUCCESS;
    for (const Command& c : sub->commands) {
      if ((status = sub->reset.load()) != GPUP_STATUS_SUCCESS) break;
      switch (c.type) {
        case GPUPDDI_COMMAND_COPY:
          std::memmove(c.dst, c.src, c.size);
          break;
        case GPUPDDI_COMMAND_FILL:
          for (uint64_t off = 0; off < c.size; off += c.pattern_size) std::memcpy(c.dst + off, c.pattern, c.pattern_size);
          break;
        case GPUPDDI_COMMAND_DISPATCH:
          status = c.kernel->run(c.launch);
          break;
      }
      if (status != GPUP_STATUS_SUCCESS) break;
    }
    if (status == GPUP_STATUS_SUCCESS) status = sub->reset.load();
    {
      std::lock_guard lock(mu_);
      running_.reset();
    }
    notify_complete(system_context_, sub->id, status);
  }
}

}  // namespace
}  // namespace gpup::kmd::mock

extern "C" __attribute__((visibility("default"))) gpup_status GpupKmdDriverEntry(const GPUPDDI_CALLBACKS* pCallbacks,
                                                                                 GPUPDDI_DRIVER_FUNCS* pFuncs) {
  using namespace gpup::kmd::mock;
  const gpup_status s = gpup::kmd::driver_entry<Adapter, Device, Context>(pCallbacks, pFuncs, GPUP_MOCK_DRIVER_NAME);
  if (s != GPUP_STATUS_SUCCESS) return s;
  pFuncs->DdiVersion = (static_cast<uint32_t>(GPUP_MOCK_REPORTED_MAJOR) << 16) | GPUPDDI_VERSION_MINOR;
  if constexpr (GPUP_MOCK_OMIT_CREATE_CONTEXT) pFuncs->Context.pfnCreateContext = nullptr;
  return GPUP_STATUS_SUCCESS;
}
