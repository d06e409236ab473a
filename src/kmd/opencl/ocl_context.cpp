// kmd_opencl: contexts, submission, completion.
#include <algorithm>
#include <chrono>
#include <utility>

#include "kmd/opencl/ocl_kmd.h"

namespace gpup::kmd::ocl {

namespace {

constexpr size_t kMaxKernelName = 256;
constexpr uint32_t kMaxCommands = 1u << 16;

// One command, checked and resolved to OpenCL objects, ready to enqueue.
struct PreparedArg {
  uint32_t kind = 0;  // GPUPDDI_KERNEL_ARG_KIND
  size_t size = 0;
  std::vector<unsigned char> value;  // VALUE: the bytes, zero-padded to the device's max parameter size
  cl_mem mem = nullptr;              // BUFFER: the buffer or sub-buffer; IMAGE: the image
  cl_sampler sampler = nullptr;      // SAMPLER: the adapter's cached sampler
};

struct Prepared {
  uint32_t type = 0;
  // COPY / FILL
  cl_mem src = nullptr, dst = nullptr;
  uint64_t src_offset = 0, dst_offset = 0, size = 0;
  uint32_t pattern_size = 0;
  unsigned char pattern[GPUPDDI_MAX_FILL_PATTERN] = {};
  // DISPATCH
  std::shared_ptr<Kernel> kernel;
  std::vector<PreparedArg> args;
  cl_uint dims = 0;
  size_t offset[3] = {}, global[3] = {}, local[3] = {};
  bool has_local = false;
};

Error invalid(std::string why) { return Error(GPUP_STATUS_INVALID_PARAMETER, std::move(why)); }

cl_int set_arg(cl_kernel k, cl_uint index, const PreparedArg& a) {
  switch (a.kind) {
    case GPUPDDI_ARG_VALUE:
      return clSetKernelArg(k, index, a.size, a.value.data());
    case GPUPDDI_ARG_BUFFER:
      return clSetKernelArg(k, index, sizeof(cl_mem), &a.mem);
    case GPUPDDI_ARG_LOCAL:
      return clSetKernelArg(k, index, a.size, nullptr);
    case GPUPDDI_ARG_NULL_BUFFER:
      return clSetKernelArg(k, index, sizeof(cl_mem), nullptr);
    case GPUPDDI_ARG_IMAGE:
      return clSetKernelArg(k, index, sizeof(cl_mem), &a.mem);
    case GPUPDDI_ARG_SAMPLER:
      return clSetKernelArg(k, index, sizeof(cl_sampler), &a.sampler);
    default:
      return CL_INVALID_ARG_VALUE;
  }
}

const char* kind_name(Kernel::ArgKind k) {
  switch (k) {
    case Kernel::ArgKind::kBuffer: return "a __global/__constant pointer";
    case Kernel::ArgKind::kLocal: return "a __local pointer";
    case Kernel::ArgKind::kValue: return "a value";
    case Kernel::ArgKind::kImage: return "an image";
    case Kernel::ArgKind::kSampler: return "a sampler";
    case Kernel::ArgKind::kUnsupported: return "a pipe/queue/event or an image type without allocations (not supported)";
    case Kernel::ArgKind::kUnknown: return "of unknown kind (no argument info)";
  }
  return "?";
}

class Preparer {
 public:
  Preparer(Device* device, const DeviceFacts& facts) : device_(device), facts_(facts) {}

  Status prepare(const GPUPDDI_COMMAND& cmd, Prepared* out) {
    out->type = cmd.Type;
    switch (cmd.Type) {
      case GPUPDDI_COMMAND_COPY: return prepare_copy(cmd.u.Copy, out);
      case GPUPDDI_COMMAND_FILL: return prepare_fill(cmd.u.Fill, out);
      case GPUPDDI_COMMAND_DISPATCH: return prepare_dispatch(cmd.u.Dispatch, out);
      default: return invalid(fmt::format("unknown command type {}", cmd.Type));
    }
  }

 private:
  // The buffer allocation behind ref, with the range inside it.
  Result<Allocation*> buffer(const GPUPDDI_BUFFER_REF& ref, const char* what) {
    Allocation* a = device_->find_allocation(ref.hAllocation);
    if (a == nullptr) return Error(GPUP_STATUS_INVALID_HANDLE, fmt::format("{}: not an allocation of this device", what));
    if (!a->mem) return invalid(fmt::format("{}: a program allocation is not a buffer", what));
    if (ref.Offset > a->size || ref.Size > a->size - ref.Offset) {
      return Error(GPUP_STATUS_OUT_OF_RANGE,
                   fmt::format("{}: [{}, +{}) outside the {}-byte allocation", what, ref.Offset, ref.Size, a->size));
    }
    if (ref.Size == 0) return invalid(fmt::format("{}: empty range", what));
    return a;
  }

  // The cl_image behind an IMAGE argument: the whole of an image allocation of this device,
  // of the image type the parameter declares, with access flags that allow the parameter's
  // access qualifier (as clSetKernelArg should, but not every implementation does).
  Result<cl_mem> image_arg(const GPUPDDI_BUFFER_REF& ref, uint32_t want_type, uint32_t access) {
    Allocation* a = device_->find_allocation(ref.hAllocation);
    if (a == nullptr) return Error(GPUP_STATUS_INVALID_HANDLE, "not an allocation of this device");
    if (!a->image) return invalid("the allocation is not an image allocation");
    if (ref.Offset != 0 || ref.Size != a->size) {
      return invalid(fmt::format("[{}, +{}) is not the whole {}-byte allocation", ref.Offset, ref.Size, a->size));
    }
    if (a->layout.image_type != want_type) {
      return invalid(fmt::format("an image of type {:#x} given for a parameter of type {:#x}", a->layout.image_type,
                                 want_type));
    }
    const uint64_t flags = a->layout.access;
    const bool readable = flags != CL_MEM_WRITE_ONLY, writable = flags != CL_MEM_READ_ONLY;
    const bool ok = access == CL_KERNEL_ARG_ACCESS_READ_ONLY    ? readable
                    : access == CL_KERNEL_ARG_ACCESS_WRITE_ONLY ? writable
                                                                : readable && writable;
    if (!ok) return invalid(fmt::format("image access flags {:#x} do not allow the parameter's access {:#x}", flags, access));
    return a->image.get();
  }

  Status prepare_copy(const GPUPDDI_COPY& c, Prepared* out) {
    auto src = buffer(c.Src, "copy source");
    if (!src) return src.error();
    auto dst = buffer(c.Dst, "copy destination");
    if (!dst) return dst.error();
    if (c.Src.Size != c.Dst.Size) return invalid(fmt::format("copy of {} bytes into {}", c.Src.Size, c.Dst.Size));
    if (*src == *dst && c.Src.Offset < c.Dst.Offset + c.Dst.Size && c.Dst.Offset < c.Src.Offset + c.Src.Size) {
      return invalid("copy source and destination overlap");
    }
    out->src = (*src)->mem.get();
    out->dst = (*dst)->mem.get();
    out->src_offset = c.Src.Offset;
    out->dst_offset = c.Dst.Offset;
    out->size = c.Src.Size;
    return {};
  }

  Status prepare_fill(const GPUPDDI_FILL& f, Prepared* out) {
    const uint32_t ps = f.PatternSize;
    if (ps == 0 || ps > GPUPDDI_MAX_FILL_PATTERN || (ps & (ps - 1)) != 0) {
      return invalid(fmt::format("fill pattern size {} is not a power of two up to {}", ps, GPUPDDI_MAX_FILL_PATTERN));
    }
    auto dst = buffer(f.Dst, "fill destination");
    if (!dst) return dst.error();
    if (f.Dst.Offset % ps != 0 || f.Dst.Size % ps != 0) {
      return invalid(fmt::format("fill offset {} / size {} not multiples of the pattern size {}", f.Dst.Offset,
                                 f.Dst.Size, ps));
    }
    out->dst = (*dst)->mem.get();
    out->dst_offset = f.Dst.Offset;
    out->size = f.Dst.Size;
    out->pattern_size = ps;
    std::memcpy(out->pattern, f.Pattern, ps);
    return {};
  }

  Status prepare_dispatch(const GPUPDDI_DISPATCH& d, Prepared* out) {
    Allocation* prog = device_->find_allocation(d.hProgram);
    if (prog == nullptr) return Error(GPUP_STATUS_INVALID_HANDLE, "dispatch: hProgram is not an allocation of this device");
    if (!prog->program) return invalid("dispatch: hProgram is not a program allocation");
    if (d.pKernelName == nullptr) return invalid("dispatch: no kernel name");
    const size_t name_len = strnlen(d.pKernelName, kMaxKernelName);
    if (name_len == 0 || name_len == kMaxKernelName) return invalid("dispatch: kernel name empty or too long");
    const std::string name(d.pKernelName, name_len);
    auto kernel = prog->program->kernel(name, facts_.device);
    if (!kernel) return kernel.error();
    Kernel& k = **kernel;

    if (d.WorkDim < 1 || d.WorkDim > facts_.max_dims) {
      return invalid(fmt::format("dispatch '{}': WorkDim {} outside 1..{}", name, d.WorkDim, facts_.max_dims));
    }
    bool any_local = false;
    for (uint32_t i = 0; i < d.WorkDim; ++i) any_local |= d.LocalSize[i] != 0;
    uint64_t group = 1;
    for (uint32_t i = 0; i < d.WorkDim; ++i) {
      if (d.GlobalSize[i] == 0 || d.GlobalOffset[i] > SIZE_MAX - d.GlobalSize[i]) {
        return invalid(fmt::format("dispatch '{}': dimension {} offset {} size {} invalid", name, i, d.GlobalOffset[i],
                                   d.GlobalSize[i]));
      }
      if (any_local) {
        const uint64_t l = d.LocalSize[i];
        if (l == 0 || l > facts_.max_work_item_sizes[i] || d.GlobalSize[i] % l != 0) {
          return invalid(fmt::format("dispatch '{}': local size {} in dimension {} (global {}, device max {})", name,
                                     l, i, d.GlobalSize[i], facts_.max_work_item_sizes[i]));
        }
        group *= l;  // each factor <= max work-item size, so no overflow in 3 dimensions
      }
      out->offset[i] = d.GlobalOffset[i];
      out->global[i] = d.GlobalSize[i];
      out->local[i] = d.LocalSize[i];
    }
    if (any_local && group > k.work_group_size) {
      return invalid(fmt::format("dispatch '{}': work-group of {} items exceeds the kernel's {}", name, group,
                                 k.work_group_size));
    }
    out->dims = d.WorkDim;
    out->has_local = any_local;

    if (d.ArgCount != k.kinds.size()) {
      return invalid(fmt::format("dispatch '{}': {} arguments given, the kernel takes {}", name, d.ArgCount, k.kinds.size()));
    }
    if (d.ArgCount > 0 && d.pArgs == nullptr) return invalid("dispatch: no argument array");
    uint64_t local_bytes = 0;
    out->args.resize(d.ArgCount);
    for (uint32_t i = 0; i < d.ArgCount; ++i) {
      const GPUPDDI_KERNEL_ARG& a = d.pArgs[i];
      PreparedArg& p = out->args[i];
      p.kind = a.Kind;
      const Kernel::ArgKind want = k.kinds[i];
      if (want == Kernel::ArgKind::kUnsupported || want == Kernel::ArgKind::kUnknown) {
        return Error(GPUP_STATUS_NOT_SUPPORTED,
                     fmt::format("dispatch '{}': argument {} is {}", name, i, kind_name(want)));
      }
      const bool match = (a.Kind == GPUPDDI_ARG_VALUE && want == Kernel::ArgKind::kValue) ||
                         ((a.Kind == GPUPDDI_ARG_BUFFER || a.Kind == GPUPDDI_ARG_NULL_BUFFER) &&
                          want == Kernel::ArgKind::kBuffer) ||
                         (a.Kind == GPUPDDI_ARG_LOCAL && want == Kernel::ArgKind::kLocal) ||
                         (a.Kind == GPUPDDI_ARG_IMAGE && want == Kernel::ArgKind::kImage) ||
                         (a.Kind == GPUPDDI_ARG_SAMPLER && want == Kernel::ArgKind::kSampler);
      if (!match) {
        return invalid(fmt::format("dispatch '{}': argument {} of kind {} given for {}", name, i, a.Kind, kind_name(want)));
      }
      switch (a.Kind) {
        case GPUPDDI_ARG_VALUE:
          if (a.pValue == nullptr || a.Size == 0 || a.Size > facts_.max_parameter_size) {
            return invalid(fmt::format("dispatch '{}': value argument {} of {} bytes", name, i, a.Size));
          }
          p.size = a.Size;
          // Padded with zeros: an implementation that reads the parameter's full type size
          // (a 12-byte float3) must not read past the guest's bytes.
          p.value.assign(std::max<size_t>(a.Size, facts_.max_parameter_size), 0);
          std::memcpy(p.value.data(), a.pValue, a.Size);
          break;
        case GPUPDDI_ARG_BUFFER: {
          auto alloc = buffer(a.Buffer, "buffer argument");
          if (!alloc) return alloc.error();
          if (a.Buffer.Offset % facts_.align_bytes != 0) {
            return invalid(fmt::format("dispatch '{}': argument {} offset {} is not a multiple of the device's {}-byte "
                                       "base address alignment",
                                       name, i, a.Buffer.Offset, facts_.align_bytes));
          }
          auto mem = (*alloc)->range_mem(a.Buffer.Offset, a.Buffer.Size);
          if (!mem) return mem.error();
          p.mem = *mem;
          break;
        }
        case GPUPDDI_ARG_LOCAL:
          if (a.Size == 0) return invalid(fmt::format("dispatch '{}': local argument {} of 0 bytes", name, i));
          local_bytes += a.Size;
          p.size = a.Size;
          break;
        case GPUPDDI_ARG_NULL_BUFFER:
          break;
        case GPUPDDI_ARG_IMAGE: {
          auto image = image_arg(a.Buffer, k.image_types[i], k.access[i]);
          if (!image) {
            return Error(image.error().status,
                         fmt::format("dispatch '{}': image argument {}: {}", name, i, image.error().message));
          }
          p.mem = *image;
          break;
        }
        case GPUPDDI_ARG_SAMPLER: {
          auto desc = parse_sampler_desc(a.pValue, a.Size);
          if (!desc) return invalid(fmt::format("dispatch '{}': argument {}: {}", name, i, desc.error().message));
          auto sampler = device_->adapter->sampler(*desc);
          if (!sampler) return sampler.error();
          p.sampler = *sampler;
          break;
        }
      }
    }
    if (local_bytes > facts_.info.LocalMemSize) {
      return invalid(fmt::format("dispatch '{}': {} bytes of local memory, the device has {}", name, local_bytes,
                                 facts_.info.LocalMemSize));
    }
    // Let OpenCL check the sizes now, so a bad one fails the submission before anything is queued.
    // The arguments are set again, under the same lock, right before the kernel is enqueued.
    std::lock_guard lock(k.set_mu);
    for (cl_uint i = 0; i < out->args.size(); ++i) {
      if (cl_int err = set_arg(k.kernel.get(), i, out->args[i]); err != CL_SUCCESS) {
        const gpup_status s = status_from_cl(err);
        return Error(s == GPUP_STATUS_NO_MEMORY ? s : GPUP_STATUS_INVALID_PARAMETER,
                     fmt::format("dispatch '{}': argument {}: {} ({})", name, i, cl_error_name(err), err));
      }
    }
    out->kernel = *kernel;
    return {};
  }

  Device* device_;
  const DeviceFacts& facts_;
};

// CL_EVENT_COMMAND_EXECUTION_STATUS of event (negative when the command failed), or the error of
// the query itself.
cl_int execution_status(cl_event event) {
  cl_int exec = CL_COMPLETE;
  const cl_int err = clGetEventInfo(event, CL_EVENT_COMMAND_EXECUTION_STATUS, sizeof(exec), &exec, nullptr);
  return err == CL_SUCCESS ? exec : err;
}

cl_int enqueue(cl_command_queue q, const Prepared& p, cl_event* event) {
  switch (p.type) {
    case GPUPDDI_COMMAND_COPY:
      return clEnqueueCopyBuffer(q, p.src, p.dst, p.src_offset, p.dst_offset, p.size, 0, nullptr, event);
    case GPUPDDI_COMMAND_FILL:
      return clEnqueueFillBuffer(q, p.dst, p.pattern, p.pattern_size, p.dst_offset, p.size, 0, nullptr, event);
    case GPUPDDI_COMMAND_DISPATCH: {
      Kernel& k = *p.kernel;
      std::lock_guard lock(k.set_mu);
      for (cl_uint i = 0; i < p.args.size(); ++i) {
        if (cl_int err = set_arg(k.kernel.get(), i, p.args[i]); err != CL_SUCCESS) return err;
      }
      return clEnqueueNDRangeKernel(q, k.kernel.get(), p.dims, p.offset, p.global, p.has_local ? p.local : nullptr, 0,
                                    nullptr, event);
    }
    default:
      return CL_INVALID_VALUE;
  }
}

}  // namespace

namespace {

// The context whose DDI call (SubmitCommand, DestroyContext) this thread is in: an event callback
// that OpenCL runs on this thread, inside clSetEventCallback or clFinish, must not report a
// completion from inside the DDI call.
thread_local const Context* t_in_ddi = nullptr;

class InDdi {
 public:
  explicit InDdi(const Context* c) : saved_(t_in_ddi) { t_in_ddi = c; }
  ~InDdi() { t_in_ddi = saved_; }
  InDdi(const InDdi&) = delete;
  InDdi& operator=(const InDdi&) = delete;

 private:
  const Context* saved_;
};

// How long the completion thread waits for a callback before it looks at the event itself: PoCL
// 3.1 runs no CL_COMPLETE callback for a failed command, so failures are found by looking.
constexpr auto kLookAfter = std::chrono::milliseconds(20);

// The status of a finished submission: DEVICE_ERROR if queuing failed half way or any command
// failed. Every event is read, without waiting: the queue is in order, so when the last command
// has finished every earlier one has too. They must all be read: PoCL 3.1 fails the later commands
// of an in-order queue when an earlier one fails, but only those queued while it was pending, so
// a command that failed before the next one was queued leaves the last one CL_COMPLETE. Allocates
// nothing and cannot throw.
gpup_status finished_status(const PendingSubmission& p, cl_int* failure) {
  gpup_status status = p.forced;
  *failure = CL_SUCCESS;
  for (const ClEvent& e : p.events) {
    cl_event ev = e.get();
    cl_int exec = execution_status(ev);
    if (exec > CL_COMPLETE) {
      // Not finished although a later command of the queue is: not in-order after all. Wait for
      // it rather than guess.
      const cl_int err = clWaitForEvents(1, &ev);
      exec = err == CL_SUCCESS ? execution_status(ev) : err;
    }
    if (exec < 0) {
      status = GPUP_STATUS_DEVICE_ERROR;
      if (*failure == CL_SUCCESS) *failure = exec;
    }
  }
  return status;
}

}  // namespace

Context::Context(Device* device, GPUPDDI_SYSTEM_HANDLE system_context, ClQueue queue)
    : KmdObject(kTag),
      device_(device),
      system_context_(system_context),
      queue_(std::move(queue)),
      hub_(std::make_shared<Hub>()) {
  hub_->context = this;
  completion_thread_ = std::thread([this] { completion_loop(); });
}

Context::~Context() {
  {
    InDdi in_ddi(this);
    std::lock_guard lock(submit_mu_);
    if (cl_int err = clFinish(queue_.get()); err != CL_SUCCESS) {
      logf(GPUPDDI_LOG_ERROR, "DestroyContext: clFinish: {} ({})", cl_error_name(err), err);
    }
  }
  // Every command has ended; the completion thread reports what the callbacks have not.
  {
    std::lock_guard lock(pending_mu_);
    stopping_ = true;
  }
  pending_cv_.notify_all();
  completion_thread_.join();
  // Callbacks still running finish before the context goes; later ones find no context.
  std::unique_lock lock(hub_->mu);
  hub_->cv.wait(lock, [&] { return hub_->running == 0; });
  hub_->context = nullptr;
}

gpup_status Context::submit(const GPUPDDI_ARG_SUBMITCOMMAND* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->CommandCount > kMaxCommands || (args->CommandCount > 0 && args->pCommands == nullptr)) {
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  std::lock_guard lock(submit_mu_);
  // Phase 1: check and resolve everything; nothing is queued on failure.
  std::vector<Prepared> prepared(args->CommandCount);
  Preparer preparer(device_, device_->adapter->facts);
  for (uint32_t i = 0; i < args->CommandCount; ++i) {
    Status s = preparer.prepare(args->pCommands[i], &prepared[i]);
    if (!s) {
      logf(GPUPDDI_LOG_WARN, "SubmitCommand {}: command {}: {}", args->SubmissionId, i, s.error().message);
      return s.status();
    }
  }
  // Phase 2: queue. Every command gets an event, so that its status can be read at the end, but
  // only the last one is waited for (a CL_COMPLETE callback). Event callbacks OpenCL runs on this
  // thread meanwhile leave their reports to the completion thread.
  InDdi in_ddi(this);
  auto ticket = std::make_unique<Ticket>(Ticket{hub_, args->SubmissionId});
  PendingSubmission pending;
  pending.id = args->SubmissionId;
  for (size_t i = 0; i < prepared.size(); ++i) {
    ClEvent event;
    const cl_int err = enqueue(queue_.get(), prepared[i], event.out());
    if (err != CL_SUCCESS) {
      logf(GPUPDDI_LOG_WARN, "SubmitCommand {}: queuing command {}: {} ({})", args->SubmissionId, i,
           cl_error_name(err), err);
      if (pending.events.empty()) return status_from_cl(err);
      // Earlier commands are queued and cannot be taken back: the submission fails as a whole
      // once they have run.
      pending.forced = GPUP_STATUS_DEVICE_ERROR;
      break;
    }
    pending.events.push_back(std::move(event));
  }
  if (prepared.empty()) {
    // An empty submission completes when everything queued before it has.
    ClEvent marker;
    if (cl_int err = clEnqueueMarkerWithWaitList(queue_.get(), 0, nullptr, marker.out()); err != CL_SUCCESS) {
      logf(GPUPDDI_LOG_WARN, "SubmitCommand {}: marker: {} ({})", args->SubmissionId, cl_error_name(err), err);
      return status_from_cl(err);
    }
    pending.events.push_back(std::move(marker));
  }
  cl_event last = pending.events.back().get();
  pending.callback = true;
  bool wake = false;
  {
    std::lock_guard plock(pending_mu_);
    pending_.push_back(std::move(pending));
    wake = std::exchange(thread_idle_, false);
  }
  // The callback may run at once, here (inside clSetEventCallback) or on another thread.
  if (cl_int err = clSetEventCallback(last, CL_COMPLETE, &Context::on_last_complete, ticket.get());
      err == CL_SUCCESS) {
    (void)ticket.release();  // the callback's now
  } else {
    logf(GPUPDDI_LOG_WARN, "SubmitCommand {}: clSetEventCallback: {} ({}); waiting for the event instead",
         args->SubmissionId, cl_error_name(err), err);
    std::lock_guard plock(pending_mu_);
    for (PendingSubmission& p : pending_) {
      if (p.id == args->SubmissionId) p.callback = false;
    }
    wake = true;
  }
  clFlush(queue_.get());
  if (wake) pending_cv_.notify_one();
  return GPUP_STATUS_SUCCESS;
}

void CL_CALLBACK Context::on_last_complete(cl_event, cl_int, void* user_data) {
  std::unique_ptr<Ticket> ticket(static_cast<Ticket*>(user_data));
  Hub& hub = *ticket->hub;
  Context* context = nullptr;
  {
    std::lock_guard lock(hub.mu);
    context = hub.context;
    if (context == nullptr) return;
    ++hub.running;
  }
  context->mark_finished(ticket->id);
  {
    std::lock_guard lock(hub.mu);
    --hub.running;
  }
  hub.cv.notify_all();
}

void Context::mark_finished(uint64_t id) {
  {
    std::lock_guard lock(pending_mu_);
    for (PendingSubmission& p : pending_) {
      if (p.id == id) {
        p.finished = true;
        break;
      }
    }
  }
  if (t_in_ddi == this) {
    pending_cv_.notify_one();  // the completion thread reports it
  } else {
    deliver_finished();
  }
}

void Context::deliver_finished() {
  std::unique_lock lock(pending_mu_);
  if (delivering_) return;  // whoever delivers looks at the front again before stopping
  delivering_ = true;
  while (!pending_.empty() && pending_.front().finished) {
    PendingSubmission p = std::move(pending_.front());
    pending_.pop_front();
    lock.unlock();
    cl_int failure = CL_SUCCESS;
    const gpup_status status = finished_status(p, &failure);
    if (status != GPUP_STATUS_SUCCESS) {
      try {
        logf(GPUPDDI_LOG_WARN, "submission {} failed on the device ({} {})", p.id, cl_error_name(failure), failure);
      } catch (...) {  // a log line is not worth the process
      }
    }
    p.events.clear();
    notify_complete(system_context_, p.id, status);
    lock.lock();
  }
  delivering_ = false;
  if (stopping_) pending_cv_.notify_all();
}

// Reports what callbacks do not: submissions without a callback (it could not be set: waits for
// the last event), failed ones (PoCL 3.1 runs no callback for a failed command: found by looking
// at the last event of the oldest submission every kLookAfter while it is pending, and at once at
// the next one after a failure, since the commands queued behind a failed one fail too), ones
// whose callback ran inside a DDI call or never ran although the event ended a kLookAfter ago,
// and, once the context is being destroyed and all its work has ended, everything left.
void Context::completion_loop() {
  bool look_now = false;       // the last look found a failure
  bool seen_complete = false;  // ... or found submission seen_id complete, its callback not run yet
  uint64_t seen_id = 0;
  std::unique_lock lock(pending_mu_);
  for (;;) {
    if (pending_.empty()) {
      if (stopping_) return;
      thread_idle_ = true;
      pending_cv_.wait(lock);
      thread_idle_ = false;
      continue;
    }
    if (delivering_) {
      pending_cv_.wait_for(lock, kLookAfter);
      continue;
    }
    if (!pending_.front().finished) {
      const uint64_t id = pending_.front().id;
      if (pending_.front().callback && !stopping_ && !look_now) {
        if (pending_cv_.wait_for(lock, kLookAfter) == std::cv_status::no_timeout) continue;
        if (pending_.empty() || delivering_ || pending_.front().id != id || pending_.front().finished) continue;
      }
      // Holding the delivery turn keeps the front where it is while the lock is released.
      delivering_ = true;
      const bool wait = !pending_.front().callback || stopping_;
      cl_event last = pending_.front().events.back().get();
      lock.unlock();
      if (wait) clWaitForEvents(1, &last);
      const cl_int exec = execution_status(last);
      lock.lock();
      delivering_ = false;
      const bool stale = exec == CL_COMPLETE && seen_complete && seen_id == id;
      if (wait || exec < 0 || stale) pending_.front().finished = true;
      look_now = exec < 0;
      seen_complete = exec == CL_COMPLETE;
      seen_id = id;
    }
    lock.unlock();
    deliver_finished();
    lock.lock();
  }
}

}  // namespace gpup::kmd::ocl
