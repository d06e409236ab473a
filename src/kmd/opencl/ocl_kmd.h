// kmd_opencl internals: the KMD objects behind the DDI handles of libgpup_kmd_opencl.so.
//
// Object graph (ownership follows the arrows; handles given to the host are raw pointers to
// these objects, tagged, see kmd_support.h):
//
//   Adapter ── cl_context (one per adapter), the chosen cl_device_id and its DeviceFacts,
//     │        the cl_samplers of sampler arguments (one per distinct descriptor)
//     ├── ProcessTable: Process objects (worker / VM / host processes, VM data)
//     └── Device (per pfnCreateDevice; belongs to a Process)
//           ├── private in-order cl_command_queue: Lock/Unlock maps, zero-fill of new buffers
//           ├── Allocation: a cl_mem (plus cached sub-buffers), or a built Program; an image
//           │     allocation also holds a cl_image over the same host memory
//           └── Context: an in-order cl_command_queue, event callbacks and a completion thread
//
// Threads and locks
//   The host never calls DDIs concurrently for one object, except pfnSubmitCommand, which may
//   overlap with completion callbacks (ddi.h). Even so every container that more than one object
//   reaches is locked: Adapter::mu (devices), Device::mu (its allocations and contexts),
//   Device::queue_mu (its private queue), Allocation::sub_mu (sub-buffer cache), Program::mu (kernel cache),
//   Kernel::set_mu (clSetKernelArg + clEnqueueNDRangeKernel on a cl_kernel shared by contexts),
//   Context::submit_mu (one submission at a time), Adapter::sampler_mu (sampler cache),
//   Context::pending_mu (its submissions in flight), Context::Hub::mu (what event callbacks reach
//   the context through). Lock order: submit_mu -> Program::mu | Kernel::set_mu |
//   Allocation::sub_mu | Adapter::sampler_mu | pending_mu | Hub::mu; no other nesting. No lock is
//   held while calling the host or, for pending_mu and Hub::mu, OpenCL.
//
//   Completions: every command of a submission gets an event, and the last one a CL_COMPLETE
//   callback (the queue is in order: when the last command has ended, so have the others). The
//   callback, on an OpenCL runtime thread, reads every event's status without waiting and calls
//   pfnNotifySubmissionComplete, exactly once per submission and in submission order (a
//   submission finished before an older one waits for it). Each Context also owns a thread for
//   what callbacks do not report: a callback OpenCL runs inside SubmitCommand or DestroyContext
//   (inside clSetEventCallback when the event has already completed; completions never run inside
//   a DDI call of the context), a submission whose callback could not be set, and failed ones
//   (PoCL 3.1 runs no CL_COMPLETE callback for a failed command), which it finds by looking at the
//   oldest submission's last event every 20 ms while it is pending.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "kmd/opencl/cl_raii.h"
#include "kmd/opencl/kmd_support.h"

namespace gpup::kmd::ocl {

// What the device is, read once at StartAdapter.
struct DeviceFacts {
  cl_platform_id platform = nullptr;
  cl_device_id device = nullptr;
  GPUPDDI_DEVICEINFO info{};
  GPUP_OCL_UMD_INFO umd{};
  uint64_t align_bytes = 1;           // CL_DEVICE_MEM_BASE_ADDR_ALIGN / 8
  uint32_t max_dims = 3;
  uint64_t max_work_item_sizes[3] = {1, 1, 1};
  uint64_t max_parameter_size = 256;
  bool unified_memory = false;        // CL_DEVICE_HOST_UNIFIED_MEMORY
  InfoList device_info;               // GPUP_OCL_QUERY_DEVICE_INFO's answer
  // Image formats per type and access (empty without image support or without host-unified
  // memory, see Device::create_image), and their GPUP_OCL_QUERY_IMAGE_FORMATS encoding.
  ImageFormats image_formats;
  InfoList image_formats_list;
};

// Every clGetDeviceInfo parameter the device answers, as GPUP_OCL_QUERY_DEVICE_INFO lists them.
InfoList read_device_info_list(cl_device_id device);

class Device;
class Context;

// A kernel of a program, shared by every context that dispatches it.
struct Kernel {
  enum class ArgKind { kBuffer, kLocal, kValue, kImage, kSampler, kUnsupported, kUnknown };
  ClKernel kernel;
  std::string name;
  std::vector<ArgKind> kinds;   // one per CL_KERNEL_NUM_ARGS
  // kImage arguments: the CL_MEM_OBJECT_IMAGE* type the parameter declares and its
  // CL_KERNEL_ARG_ACCESS_QUALIFIER (0 for other kinds).
  std::vector<uint32_t> image_types;
  std::vector<uint32_t> access;
  uint64_t work_group_size = 0; // CL_KERNEL_WORK_GROUP_SIZE
  std::mutex set_mu;            // held across clSetKernelArg... + clEnqueueNDRangeKernel
};

// A built program: an executable (SOURCE, BINARY, LINK), or a compiled object or library (COMPILE,
// LINK -create-library), which exist only to be linked by the guest and cannot be dispatched.
class Program {
 public:
  Program(ClProgram program, cl_program_binary_type binary_type)
      : program_(std::move(program)), binary_type_(binary_type) {}
  // The kernel named name, created on first use and cached. NOT_FOUND when the program has no
  // such kernel, INVALID_PARAMETER when the program is not an executable.
  Result<std::shared_ptr<Kernel>> kernel(const std::string& name, cl_device_id device);
  // What GPUP_OCL_PROGRAM_INFO says about the program: every kernel of an executable (which this
  // also creates and caches for dispatches), and the binary when it is at most max_binary bytes.
  Result<ProgramDescription> describe(cl_device_id device, const DeviceFacts& facts, uint64_t max_binary);

 private:
  void add_kernel(std::shared_ptr<Kernel> kernel);

  ClProgram program_;
  const cl_program_binary_type binary_type_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Kernel>> kernels_;
};

class Allocation final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kAllocation;
  Allocation() : KmdObject(kTag) {}

  // The cl_mem for [offset, offset + size): the buffer itself when that is all of it, else a
  // cached sub-buffer. The caller checked the range and alignment.
  Result<cl_mem> range_mem(uint64_t offset, uint64_t size);

  GPUPDDI_ALLOCATIONFLAGS flags{};
  uint64_t size = 0;
  void* system_memory = nullptr;      // CpuVisible: the host's backing store (USE_HOST_PTR)
  ClMem mem;                          // buffers (image allocations too: COPY / FILL use it)
  // Flags.Image: the cl_image over system_memory, with the layout it was made with. Declared
  // after mem, so released first; both live exactly as long as the allocation.
  ClMem image;
  ImageLayout layout;
  std::unique_ptr<Program> program;   // Flags.Program

 private:
  static constexpr size_t kMaxSubBuffers = 256;
  std::mutex sub_mu_;
  std::map<std::pair<uint64_t, uint64_t>, ClMem> sub_buffers_;
};

// Pending work of one submission, in its context's queue of submissions.
struct PendingSubmission {
  uint64_t id = 0;
  std::vector<ClEvent> events;  // one per queued command, or the marker of an empty submission
  gpup_status forced = GPUP_STATUS_SUCCESS;  // DEVICE_ERROR when queuing failed half way
  bool callback = false;  // a CL_COMPLETE callback is set on the last event
  bool finished = false;  // the last event has ended: its callback ran, or the completion thread saw it
};

class Context final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kContext;
  Context(Device* device, GPUPDDI_SYSTEM_HANDLE system_context, ClQueue queue);
  // Waits for all queued work (clFinish), delivers every outstanding completion, joins the
  // completion thread and waits for event callbacks still running.
  ~Context() override;

  // pfnSubmitCommand: validates every command (allocations must belong to this context's
  // device; at most 65536 commands; BUFFER_REF ranges non-empty), then queues them all. A
  // failure before anything is queued is returned; if OpenCL refuses a command after earlier
  // ones were queued, the submission is accepted and completes with DEVICE_ERROR. An empty
  // submission completes after everything queued before it (a fence).
  gpup_status submit(const GPUPDDI_ARG_SUBMITCOMMAND* args);
  Device* device() const { return device_; }

 private:
  // What an event callback reaches the context through. Shared with every callback set, so it
  // outlives the context when a callback never runs (PoCL 3.1 runs no CL_COMPLETE callback for a
  // failed command); `context` is null once the context is being destroyed.
  struct Hub {
    std::mutex mu;
    std::condition_variable cv;
    Context* context = nullptr;
    int running = 0;  // callbacks using context right now
  };
  // A callback's user data, freed by the callback. A callback that never runs (a failed
  // command's, on PoCL 3.1) keeps its ticket and a reference to the hub: a few dozen bytes per
  // failed submission, which fault the guest's context, for the life of the worker.
  struct Ticket {
    std::shared_ptr<Hub> hub;
    uint64_t id = 0;
  };
  static void CL_CALLBACK on_last_complete(cl_event event, cl_int status, void* user_data);
  // Marks submission id finished; delivers it (and what follows it) unless this thread is inside
  // a DDI call of this context.
  void mark_finished(uint64_t id);
  // Reports, in order, the finished submissions at the front of pending_.
  void deliver_finished();
  void completion_loop();

  Device* const device_;
  const GPUPDDI_SYSTEM_HANDLE system_context_;
  ClQueue queue_;
  std::mutex submit_mu_;
  std::shared_ptr<Hub> hub_;

  std::mutex pending_mu_;
  std::condition_variable pending_cv_;
  std::deque<PendingSubmission> pending_;
  bool delivering_ = false;    // a thread is delivering (or the completion thread looks at the front)
  bool thread_idle_ = false;   // the completion thread waits with nothing pending, without a timeout
  bool stopping_ = false;
  std::thread completion_thread_;
};

class Adapter;

// GPUPDDI_QAITYPE_SANDBOXNEEDS text for the platform this process has started (ocl_sandbox.cpp);
// cfg is the adapter's parsed config (sandbox_ro, sandbox_dev, sandbox_exec).
Result<std::string> sandbox_needs(const std::map<std::string, std::string>& cfg);

class Device final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kDevice;
  Device(Adapter* adapter, Process* process, ClQueue queue)
      : KmdObject(kTag), adapter(adapter), process(process), queue_(std::move(queue)) {}
  ~Device() override;

  gpup_status create_allocation(GPUPDDI_ARG_CREATEALLOCATION* args);
  void destroy_allocation(GPUPDDI_HANDLE h);
  gpup_status lock(GPUPDDI_HANDLE h);
  gpup_status unlock(GPUPDDI_HANDLE h);
  gpup_status create_context(GPUPDDI_ARG_CREATECONTEXT* args);
  // Removes the context from this device and destroys it (see ~Context).
  void destroy_context(Context* context);
  // The live allocation behind h that belongs to this device, or nullptr.
  Allocation* find_allocation(GPUPDDI_HANDLE h);

  Adapter* const adapter;
  Process* const process;

 private:
  // Flags.Program allocations (ocl_program.cpp).
  gpup_status create_program(GPUPDDI_ARG_CREATEALLOCATION* args, Allocation* alloc);
  // Flags.Image allocations: the buffer and the image over pSystemMemory.
  gpup_status create_image(GPUPDDI_ARG_CREATEALLOCATION* args, Allocation* alloc);

  std::mutex mu_;        // allocations_, contexts_
  std::mutex queue_mu_;  // queue_
  ClQueue queue_;        // private: Lock/Unlock and zero-fill of new buffers
  OwnedObjects<Allocation> allocations_;
  OwnedObjects<Context> contexts_;  // destroyed before allocations_
};

class Adapter final : public KmdObject {
 public:
  static constexpr ObjectTag kTag = ObjectTag::kAdapter;
  Adapter() : KmdObject(kTag) {}
  ~Adapter() override;

  // Picks the platform and device named by config and creates the cl_context.
  static Result<std::unique_ptr<Adapter>> start(const char* config);

  gpup_status query(const GPUPDDI_ARG_QUERYADAPTERINFO* args);
  const GPUPDDI_DEVICEINFO& device_info() const { return facts.info; }
  gpup_status create_device(GPUPDDI_ARG_CREATEDEVICE* args);
  void destroy_device(Device* device);
  // pfnResetEngine stays NULL: OpenCL cannot abort a running kernel.
  static constexpr bool kCanResetEngine = false;

  // The cl_sampler for a (checked) sampler descriptor, created on first use and kept until the
  // adapter stops: at most kMaxSamplers distinct ones (there are only 20 valid descriptors).
  Result<cl_sampler> sampler(const GPUP_OCL_SAMPLER_DESC& desc);

  DeviceFacts facts;
  std::string sandbox_needs_text;  // GPUPDDI_QAITYPE_SANDBOXNEEDS's answer (ocl_sandbox.cpp)
  ClContext context;
  ProcessTable processes;

 private:
  static constexpr size_t kMaxSamplers = 64;
  std::mutex sampler_mu_;
  std::map<std::tuple<uint32_t, uint32_t, uint32_t>, ClSampler> samplers_;
  std::mutex mu_;
  OwnedObjects<Device> devices_;  // destroyed first
};

// Maps an OpenCL error of an allocation or enqueue call to the gpup status the guest sees.
gpup_status status_from_cl(cl_int err);

}  // namespace gpup::kmd::ocl
