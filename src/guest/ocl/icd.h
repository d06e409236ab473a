// libgpupocl: the guest's user-mode driver, an OpenCL ICD (cl_khr_icd) on top of libgpupkmt.
//
// Every OpenCL object here is a guest-local object whose first member is the ICD dispatch table
// pointer the loader (ocl-icd) dispatches through. Device work is translated into gpup command
// buffers and submitted through the thunks; nothing of the host device is visible except what the
// partition's worker lets through. The objects and their host counterparts:
//
//   cl_platform_id     the gpup platform (one per process)
//   cl_device_id       one per adapter of the partition; the partition, not the host device
//   cl_context         guest-only; all contexts share one thunk device per adapter
//   cl_command_queue   a thunk context (one engine queue) with a monitored fence; enqueues are
//                      batched into a guest command buffer, submitted at flush points
//   cl_mem (buffer)    a CPU-visible allocation mapped at a GPU VA; the guest reads and writes its
//                      bytes through the shared mapping (shared section)
//   cl_mem (image)     a CPU-visible image allocation (DDI 1.1): pixels in a tight linear layout,
//                      shared like a buffer's bytes; the KMD's image object over them
//   cl_sampler         guest-only: its properties travel with each dispatch
//   cl_program         a program allocation built by the host KMD; its kernel table comes back with
//                      the build, so kernel queries cross nothing
//   cl_kernel          guest-only: arguments are kept locally and travel with each dispatch
//   cl_event           a (queue fence, value) pair read from the fence page, or a user event backed
//                      by a monitored fence the guest signals
//
// Locking: each object has its own mutex where it has mutable state; the queue mutex covers its
// command buffer. Locks are never held across a thunk that waits for the device except a queue's
// own (finish) and never two queues' at once.
#pragma once

#define CL_TARGET_OPENCL_VERSION 300
#define CL_USE_DEPRECATED_OPENCL_1_0_APIS
#define CL_USE_DEPRECATED_OPENCL_1_1_APIS
#define CL_USE_DEPRECATED_OPENCL_1_2_APIS
#define CL_USE_DEPRECATED_OPENCL_2_0_APIS
#include <CL/cl.h>
#include <CL/cl_icd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "gpup/kmd_opencl.h"
#include "gpup/kmt.h"

namespace gpup::ocl {

extern const cl_icd_dispatch kDispatch;

enum class Magic : uint32_t {
  kPlatform = 0x50505031,
  kDevice = 0x50505032,
  kContext = 0x50505033,
  kQueue = 0x50505034,
  kMem = 0x50505035,
  kProgram = 0x50505036,
  kKernel = 0x50505037,
  kEvent = 0x50505038,
  kSampler = 0x50505039,
  kDead = 0xdeaddead,
};

// The common head of every ICD object: the loader reads `dispatch` at offset 0.
struct IcdObject {
  const cl_icd_dispatch* dispatch = &kDispatch;
  Magic magic;
  std::atomic<uint32_t> refs{1};
  explicit IcdObject(Magic m) : magic(m) {}
};

// cl_int helpers for clGet*Info: writes `size` bytes of `value` when the caller asked for it.
cl_int info_bytes(size_t param_value_size, void* param_value, size_t* param_value_size_ret, const void* value,
                  size_t size);
template <typename T>
cl_int info_value(size_t n, void* p, size_t* ret, const T& v) {
  return info_bytes(n, p, ret, &v, sizeof v);
}
inline cl_int info_string(size_t n, void* p, size_t* ret, std::string_view s) {
  std::string z(s);
  return info_bytes(n, p, ret, z.c_str(), z.size() + 1);
}
template <typename T>
cl_int info_array(size_t n, void* p, size_t* ret, const std::vector<T>& v) {
  return info_bytes(n, p, ret, v.data(), v.size() * sizeof(T));
}

// Maps a thunk failure onto the OpenCL error a native implementation gives for it.
cl_int cl_error_from_status(gpup_status s, cl_int out_of_memory_error = CL_OUT_OF_RESOURCES);

void log_failure(const char* what, gpup_status s);

uint64_t now_ns();

}  // namespace gpup::ocl

// ------------------------------------------------------------------------------------------------
// The OpenCL objects.

struct _cl_platform_id : gpup::ocl::IcdObject {
  _cl_platform_id() : IcdObject(gpup::ocl::Magic::kPlatform) {}
  std::string version;  // "OpenCL X.Y gpup <version>"
  std::vector<cl_device_id> devices;
};

struct _cl_device_id : gpup::ocl::IcdObject {
  _cl_device_id() : IcdObject(gpup::ocl::Magic::kDevice) {}
  cl_platform_id platform = nullptr;
  GPUPKMT_HANDLE adapter = 0;
  uint64_t budget = 0;        // the partition's max VRAM
  bool coherent = false;      // CacheCoherentMemorySupported: the mapping is the device memory
  bool persistent_maps = false;  // coherent and on shared memory: buffers stay locked
  std::map<cl_device_info, std::vector<uint8_t>> info;  // what clGetDeviceInfo answers
  // GPUP_OCL_IMAGE_FORMATS_KEY(type, access) -> the host device's formats (empty: no images)
  std::map<uint32_t, std::vector<cl_image_format>> image_formats;
  bool images = false;

  // Cached scalars of `info`, used by validation.
  cl_device_type type = CL_DEVICE_TYPE_DEFAULT;
  uint64_t max_alloc = 0;
  uint32_t mem_base_addr_align = 1024;  // bits
  size_t max_work_group_size = 1;
  size_t max_work_item_sizes[3] = {1, 1, 1};
  uint32_t max_work_item_dims = 3;
  cl_command_queue_properties queue_properties = 0;
  bool non_uniform_work_groups = false;
  bool linker_available = false;
  uint32_t opencl_major = 1, opencl_minor = 2;

  // The GPU virtual address arena of this process (one reservation, handed out locally).
  std::mutex va_mu;
  uint64_t va_base = 0, va_size = 0;
  std::map<uint64_t, uint64_t> va_free;  // start -> size, coalesced
  uint64_t va_alloc(uint64_t size);
  void va_release(uint64_t va, uint64_t size);

  template <typename T>
  T scalar(cl_device_info param, T fallback) const {
    auto it = info.find(param);
    if (it == info.end() || it->second.size() != sizeof(T)) return fallback;
    T v;
    std::memcpy(&v, it->second.data(), sizeof v);
    return v;
  }
};

namespace gpup::ocl {
class BufferPool;
}

struct _cl_context : gpup::ocl::IcdObject {
  _cl_context();
  ~_cl_context();
  std::vector<cl_device_id> devices;
  // The context's own thunk device: its allocations, programs, queues and fences live there, so
  // a fault in one context's work (which resets its device) leaves other contexts alone.
  GPUPKMT_HANDLE hw_device = 0;
  std::vector<cl_context_properties> properties;  // as given, 0-terminated, or empty
  void(CL_CALLBACK* notify)(const char*, const void*, size_t, void*) = nullptr;
  void* notify_data = nullptr;
  std::mutex mu;
  std::vector<std::pair<void(CL_CALLBACK*)(cl_context, void*), void*>> destructors;
  // Released buffers' allocations, for reuse (memory.cpp); emptied before hw_device goes.
  std::unique_ptr<gpup::ocl::BufferPool> buffer_pool;
};

namespace gpup::ocl {

// An allocation and its GPU VA, shared by a buffer and its sub-buffers; destroyed with the last.
struct Backing {
  cl_device_id device = nullptr;
  GPUPKMT_HANDLE hw_device = 0;  // the context's thunk device
  GPUPKMT_HANDLE allocation = 0;
  uint64_t va = 0;
  uint64_t size = 0;       // bytes the guest asked for
  uint64_t va_size = 0;    // page-rounded
  std::mutex mu;
  uint8_t* mapping = nullptr;  // after the first host access: the locked bytes
  bool image = false;
  ~Backing();
  // The shared mapping, locking the allocation on first use (coherent devices on shared memory).
  cl_int map(uint8_t** out);
  // Host access to the bytes, bracketing it: on a coherent device over shared memory the mapping
  // stays locked and begin/end cost nothing; otherwise (a stream transport, a device keeping its
  // own copy) each access is a Lock, which makes the bytes current, and an Unlock, which
  // publishes them.
  cl_int begin(uint8_t** out);
  cl_int end();
};

// Released buffers' allocations, kept by their context for the next buffer of the same size. A
// new allocation costs round trips (create, GPU VA map, the first lock) and fresh pages that both
// the guest's and the host's mappings fault in one by one; a program that creates and releases
// same-sized buffers in a loop (tiles, per-frame inputs) then pays that every time, where a native
// driver reuses its memory. The pool keeps at most a small share of the partition's budget; a
// failed allocation empties it and tries once more, so pooled bytes never cost a program memory
// it could otherwise have had. Only whole buffers are pooled (not images): an allocation is put
// back when its last memory object goes, after every command using it has completed, and its
// contents are left as they are (OpenCL leaves a new buffer's contents undefined; the bytes are
// this context's own).
class BufferPool {
 public:
  BufferPool();  // registers it with the process's pools
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  ~BufferPool() { close(); }

  // Sets the limits from the device: min(budget / 8, 64 MiB) and 32 allocations; GPUP_OCL_POOL=0
  // turns the pool off.
  void configure(uint64_t budget);
  // A pooled allocation of exactly `size` bytes, or null.
  std::shared_ptr<Backing> take(uint64_t size);
  // Keeps b (its only owner) if it fits, evicting the oldest; otherwise destroys it.
  void put(std::shared_ptr<Backing> b);
  // Destroys every pooled allocation; true if there was any.
  bool clear();
  // clear() on every pool of the process (an allocation failed for want of memory, which any
  // context's pool may be holding); true if any held something.
  static bool clear_all();
  // Leaves the process's pools and clears: before the context's thunk device goes, so that no
  // clear_all destroys an allocation of a device already destroyed.
  void close();

 private:
  std::mutex mu_;
  std::deque<std::shared_ptr<Backing>> free_;  // oldest first
  uint64_t bytes_ = 0;
  uint64_t max_bytes_ = 0;
  size_t max_count_ = 0;
};

// Something a submitted command keeps alive until the fence passes its value.
struct Retained {
  uint64_t value = 0;
  std::vector<cl_mem> mems;
  std::vector<cl_kernel> kernels;
  std::vector<cl_event> events;  // wait-list events: their fences must outlive the wait
};

}  // namespace gpup::ocl

struct _cl_mem : gpup::ocl::IcdObject {
  _cl_mem() : IcdObject(gpup::ocl::Magic::kMem) {}
  cl_context context = nullptr;
  cl_mem_object_type type = CL_MEM_OBJECT_BUFFER;
  cl_mem_flags flags = 0;
  size_t size = 0;
  void* host_ptr = nullptr;  // USE_HOST_PTR: the application's memory
  cl_mem parent = nullptr;   // sub-buffers: retained
  size_t origin = 0;         // offset in the backing
  std::vector<cl_mem_properties> properties;
  std::shared_ptr<gpup::ocl::Backing> backing;
  // Images: the format and the geometry of the linear layout in the backing (image.cpp).
  cl_image_format format{};
  cl_image_desc desc{};        // as created; pitches are those of the backing
  size_t element_size = 0;
  size_t host_row_pitch = 0, host_slice_pitch = 0;  // USE_HOST_PTR: the application's layout
  std::mutex mu;
  uint32_t map_count = 0;
  struct MapRecord {
    void* pointer;
    size_t offset, size;
    cl_map_flags flags;
    bool locked;  // holds a Lock of the backing until the unmap
    // Images: the mapped region (pixels) and, for USE_HOST_PTR, what to publish at the unmap.
    size_t origin[3], region[3];
  };
  std::vector<MapRecord> maps;  // outstanding maps, for unmap
  std::vector<std::pair<void(CL_CALLBACK*)(cl_mem, void*), void*>> destructors;

  uint64_t va() const { return backing->va + origin; }
  bool is_image() const { return type != CL_MEM_OBJECT_BUFFER; }
};

struct _cl_sampler : gpup::ocl::IcdObject {
  _cl_sampler();
  cl_context context = nullptr;  // retained
  cl_bool normalized = CL_TRUE;
  cl_addressing_mode addressing = CL_ADDRESS_CLAMP;
  cl_filter_mode filter = CL_FILTER_NEAREST;
  std::vector<cl_sampler_properties> properties;
};

namespace gpup::ocl {

struct ArgMeta {
  GPUP_OCL_KERNEL_ARG_INFO info{};
  std::string type_name, name;
};

struct KernelMeta {
  GPUP_OCL_KERNEL_INFO info{};
  std::string name, attributes;
  std::vector<ArgMeta> args;
};

// What one build (compile, link) produced on the host.
struct Build {
  cl_build_status status = CL_BUILD_NONE;
  std::string options;
  std::string log;
  cl_program_binary_type binary_type = CL_PROGRAM_BINARY_TYPE_NONE;
  GPUPKMT_HANDLE allocation = 0;  // the program allocation (0 when not built)
  std::vector<KernelMeta> kernels;
  bool table_complete = true;     // false: the answer was cut, ask again with more room
  std::vector<uint8_t> binary;    // may be empty while binary_size is not
  uint64_t binary_size = 0;
  cl_device_id device = nullptr;
  GPUPKMT_HANDLE hw_device = 0;  // the context's thunk device
  // What was built, to ask the host again for a binary that did not fit the first answer.
  uint32_t format = 0;
  std::vector<uint8_t> content;
  ~Build();
};

}  // namespace gpup::ocl

struct _cl_program : gpup::ocl::IcdObject {
  _cl_program() : IcdObject(gpup::ocl::Magic::kProgram) {}
  cl_context context = nullptr;
  std::vector<cl_device_id> devices;
  std::string source;                 // from source
  std::vector<uint8_t> input_binary;  // from binary
  std::mutex mu;
  std::shared_ptr<gpup::ocl::Build> build;  // the latest; kernels keep theirs
  std::atomic<uint32_t> kernels_attached{0};
  std::vector<std::pair<void(CL_CALLBACK*)(cl_program, void*), void*>> release_callbacks;
};

namespace gpup::ocl {

struct ArgValue {
  bool set = false;
  uint32_t kind = 0;  // GPUPDDI_ARG_*
  std::vector<uint8_t> bytes;
  cl_mem mem = nullptr;
  uint32_t local_size = 0;
};

}  // namespace gpup::ocl

struct _cl_kernel : gpup::ocl::IcdObject {
  _cl_kernel() : IcdObject(gpup::ocl::Magic::kKernel) {}
  cl_program program = nullptr;  // retained
  std::shared_ptr<gpup::ocl::Build> build;
  const gpup::ocl::KernelMeta* meta = nullptr;
  std::mutex mu;
  std::vector<gpup::ocl::ArgValue> args;
};

struct _cl_command_queue : gpup::ocl::IcdObject {
  _cl_command_queue() : IcdObject(gpup::ocl::Magic::kQueue) {}
  cl_context context = nullptr;  // retained
  cl_device_id device = nullptr;
  cl_command_queue_properties properties = 0;
  std::vector<cl_queue_properties> properties_array;
  GPUPKMT_HANDLE hw_context = 0;
  GPUPKMT_HANDLE fence = 0;
  const volatile uint64_t* fence_value = nullptr;

  // mu guards the command buffer and what is recorded in it. It is never held while waiting for
  // the device, except by a host command whose dependencies are all complete or on their way.
  std::mutex mu;
  GPUPKMT_CMDBUF* cmdbuf = nullptr;
  uint64_t next_value = 0;               // last value signalled in the command stream
  bool open_tail = false;                // commands recorded since that signal (no event asked)
  std::deque<gpup::ocl::Retained> retained;
  GPUPKMT_HANDLE host_fence = 0;         // deferred host commands (created on first use)
  uint64_t host_seq = 0;
  std::atomic<uint64_t> submitted_value{0};  // last value in a submitted command buffer
  std::atomic<uint64_t> user_gate{0};        // last value recorded behind an unset user event
  std::atomic<cl_int> error{CL_SUCCESS};     // the device reported this queue's work failed
  // aux_mu guards the rest; it is a leaf lock (no thunk call, no other lock inside).
  std::mutex aux_mu;
  uint64_t submitted_ns = 0;             // when submitted_value was submitted
  uint64_t last_end_ns = 0;              // profiling: the end of the last stamped command
  std::vector<cl_event> profiled;        // events waiting for their end timestamp (not retained)
  std::vector<std::pair<uint64_t, uint64_t>> failed;  // fence values of batches that never ran

  uint64_t completed() const { return __atomic_load_n(fence_value, __ATOMIC_ACQUIRE); }
};

struct _cl_event : gpup::ocl::IcdObject {
  _cl_event() : IcdObject(gpup::ocl::Magic::kEvent) {}
  cl_context context = nullptr;  // retained
  cl_command_queue queue = nullptr;  // retained; null for user events
  cl_command_type command = 0;
  uint64_t value = 0;            // the queue fence value that completes it
  // User events: a monitored fence signalled to 1 by clSetUserEventStatus.
  GPUPKMT_HANDLE user_fence = 0;
  std::atomic<cl_int> user_status{CL_SUBMITTED};
  std::atomic<cl_int> failed{0};  // negative: the command failed with this error
  // Profiling (guest-observed times, ns).
  bool profiling = false;
  uint64_t t_queued = 0, t_submit = 0, t_start = 0;
  std::atomic<uint64_t> t_end{0};
  std::mutex mu;
  std::vector<std::tuple<cl_int, void(CL_CALLBACK*)(cl_event, cl_int, void*), void*>> callbacks;
};

namespace gpup::ocl {

// Object checks: the handle is one of ours, of the right kind, and alive.
template <typename T>
bool valid(T* obj, Magic m) {
  return obj != nullptr && obj->magic == m;
}
inline bool valid(cl_platform_id p) { return valid(p, Magic::kPlatform); }
inline bool valid(cl_device_id d) { return valid(d, Magic::kDevice); }
inline bool valid(cl_context c) { return valid(c, Magic::kContext); }
inline bool valid(cl_command_queue q) { return valid(q, Magic::kQueue); }
inline bool valid(cl_mem m) { return valid(m, Magic::kMem); }
inline bool valid(cl_program p) { return valid(p, Magic::kProgram); }
inline bool valid(cl_kernel k) { return valid(k, Magic::kKernel); }
inline bool valid(cl_event e) { return valid(e, Magic::kEvent); }
inline bool valid(cl_sampler s) { return valid(s, Magic::kSampler); }

// Partition (platform.cpp)
cl_platform_id platform();       // nullptr when there is no partition to talk to
cl_int ensure_platform();        // connects on first use
void context_retain(cl_context c);
void context_release(cl_context c);

// Memory (memory.cpp)
void mem_retain(cl_mem m);
void mem_release(cl_mem m);
cl_int check_mem_flags(cl_mem_flags flags);  // buffers' and images' creation flags
// A backing of `size` bytes mapped at a GPU VA of the context's device; `image` (a
// GPUP_OCL_IMAGE_DESC) makes it an image allocation.
cl_int make_backing(cl_context c, size_t size, const GPUP_OCL_IMAGE_DESC* image, std::shared_ptr<Backing>* out);

// Programs (program.cpp)
void program_retain(cl_program p);
void program_release(cl_program p);
void kernel_retain(cl_kernel k);
void kernel_release(cl_kernel k);

// Queues and events (queue.cpp, event.cpp)
void queue_retain(cl_command_queue q);
void queue_release(cl_command_queue q);
void event_retain(cl_event e);
void event_release(cl_event e);
cl_int event_status(cl_event e);
// Waits until the events completed; flushes their queues first.
cl_int wait_events(cl_uint n, const cl_event* events);
// Fires the callbacks of events whose status reached their trigger; called after status changes.
void event_poll_callbacks(cl_event e);
void start_callback_thread();
void queue_retire(cl_command_queue q);  // with q->mu held: drop what completed work kept alive

}  // namespace gpup::ocl
