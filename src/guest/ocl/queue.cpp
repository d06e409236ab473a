// Command queues and every enqueue.
//
// A queue is one thunk context and one monitored fence. Each enqueued command appends its
// device commands to the queue's guest command buffer; a command whose event the application
// asked for is followed by a fence signal of the next value, and its event is that (queue, value)
// pair, complete when the fence page shows the value. Commands without events share the next
// signal (a flush or finish records one), so a run of them reaches the host as one batch. A
// read or write on an idle queue is a memcpy with no device command at all. The buffer crosses to the host only at a flush point: clFlush, clFinish, a blocking
// call, a wait on one of its events (clWaitForEvents, a status query of an unsubmitted event, a
// dependency of another queue), or when it holds kFlushBytes. Transfers between the application
// and buffers are memcpy on the buffer's shared section once the work before them completed;
// they never travel in messages.
//
// Out-of-order queues execute in order (a permitted implementation of out-of-order).

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <thread>

#include "guest/ocl/image_support.h"

namespace gpup::ocl {

namespace {

constexpr uint32_t kFlushBytes = 64 * 1024;
// The value of what a command without an event keeps alive until the next signal is recorded.
constexpr uint64_t kUnsignalled = UINT64_MAX;

cl_int queue_failure(cl_command_queue q, gpup_status s, const char* what) {
  log_failure(what, s);
  return cl_error_from_status(s);
}

// Functions named *_locked run with q->mu held.

void stamp_profiles(cl_command_queue q) {
  std::lock_guard lock(q->aux_mu);
  if (q->profiled.empty()) return;
  const uint64_t reached = q->completed();
  const uint64_t now = now_ns();
  auto it = q->profiled.begin();
  for (; it != q->profiled.end(); ++it) {
    cl_event e = *it;
    if (e->value > reached) break;
    if (e->t_submit == 0) e->t_submit = q->submitted_ns ? q->submitted_ns : now;
    // In order: a command starts once it was submitted and the one before it ended.
    if (e->t_start == 0) e->t_start = std::max(e->t_submit, q->last_end_ns);
    uint64_t expected = 0;
    e->t_end.compare_exchange_strong(expected, std::max(now, e->t_start));
    q->last_end_ns = e->t_end.load();
  }
  q->profiled.erase(q->profiled.begin(), it);
}

// Takes what completed work kept alive; the caller releases it with the lock dropped.
void retire_locked(cl_command_queue q, std::vector<Retained>* out) {
  const uint64_t reached = q->completed();
  while (!q->retained.empty() && q->retained.front().value <= reached) {
    out->push_back(std::move(q->retained.front()));
    q->retained.pop_front();
  }
  stamp_profiles(q);
}

void release_retired(std::vector<Retained>& retired) {
  for (auto& r : retired) {
    for (cl_mem m : r.mems) mem_release(m);
    for (cl_kernel k : r.kernels) kernel_release(k);
    for (cl_event e : r.events) event_release(e);
  }
  retired.clear();
}

// Records a fence signal of the next value; the commands since the last signal, and what they
// keep alive, complete with it.
cl_int signal_locked(cl_command_queue q) {
  const uint64_t value = q->next_value + 1;
  if (gpup_status s = GpupKmtCmdSignal(q->cmdbuf, q->fence, value); GPUP_FAILED(s))
    return queue_failure(q, s, "recording a fence signal");
  q->next_value = value;
  for (auto it = q->retained.rbegin(); it != q->retained.rend() && it->value == kUnsignalled; ++it) it->value = value;
  q->open_tail = false;
  return CL_SUCCESS;
}

// The value that completes everything recorded so far (sealing commands recorded without one).
cl_int last_value_locked(cl_command_queue q, uint64_t* out) {
  if (q->open_tail) {
    if (cl_int e = signal_locked(q); e != CL_SUCCESS) return e;
  }
  *out = q->next_value;
  return CL_SUCCESS;
}

bool in_failed_batch(cl_command_queue q, uint64_t value) {
  std::lock_guard lock(q->aux_mu);
  for (const auto& [first, last] : q->failed)
    if (value >= first && value <= last) return true;
  return false;
}

cl_int flush_locked(cl_command_queue q) {
  if (GpupKmtCmdBufCount(q->cmdbuf) == 0) return CL_SUCCESS;
  if (q->open_tail) {
    if (cl_int e = signal_locked(q); e != CL_SUCCESS) return e;
  }
  const uint64_t first_unsubmitted = q->submitted_value + 1;
  GPUPKMT_SUBMITCOMMAND sc{q->hw_context, 0, q->cmdbuf, 0};
  gpup_status s = GpupKmtSubmitCommand(&sc);
  GpupKmtCmdBufReset(q->cmdbuf);
  q->submitted_value = q->next_value;
  {
    std::lock_guard lock(q->aux_mu);
    q->submitted_ns = now_ns();
    for (cl_event e : q->profiled)
      if (e->t_submit == 0) e->t_submit = q->submitted_ns;
    // Nothing of a refused batch runs: its events fail, and waits for its values return at once
    // (the fence is not moved, so earlier work completes in its own time).
    if (GPUP_FAILED(s)) q->failed.emplace_back(first_unsubmitted, q->next_value);
  }
  if (GPUP_FAILED(s)) {
    q->error = queue_failure(q, s, "submitting a command buffer");
    return q->error;
  }
  return CL_SUCCESS;
}

// Waits for `value`, flushing first if it is not submitted yet. `locked`: the caller holds q->mu
// (only while nothing before `value` can wait for the application).
cl_int wait_value(cl_command_queue q, uint64_t value, bool locked = false) {
  if (q->completed() >= value) return q->error;
  if (value > q->submitted_value) {
    std::unique_lock lock(q->mu, std::defer_lock);
    if (!locked) lock.lock();
    if (value > q->submitted_value) {
      if (cl_int e = flush_locked(q); e != CL_SUCCESS) return e;
    }
  }
  if (in_failed_batch(q, value)) return q->error;
  // The thunk sleeps on the fence page first (no message, and the CPU goes to the host's threads
  // meanwhile); only longer waits cross.
  GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT w{q->fence, value, 0, -1};
  gpup_status s = GpupKmtWaitForSynchronizationObjectFromCpu(&w);
  if (GPUP_FAILED(s)) {
    q->error = queue_failure(q, s, "waiting for the device");
    return q->error;
  }
  return q->error;
}

// Checks a wait list (OpenCL's rules) without touching any queue.
cl_int check_wait_list(cl_command_queue q, cl_uint n, const cl_event* list) {
  if ((n == 0) != (list == nullptr)) return CL_INVALID_EVENT_WAIT_LIST;
  for (cl_uint i = 0; i < n; ++i) {
    if (!valid(list[i])) return CL_INVALID_EVENT_WAIT_LIST;
    if (list[i]->context != q->context) return CL_INVALID_CONTEXT;
  }
  return CL_SUCCESS;
}

// Makes sure other queues' events this queue will wait for are on their way (their queue's lock
// only; called before taking q->mu).
void flush_dependencies(cl_command_queue q, cl_uint n, const cl_event* list) {
  for (cl_uint i = 0; i < n; ++i) {
    cl_event e = list[i];
    if (e->queue == nullptr || e->queue == q) continue;
    std::lock_guard lock(e->queue->mu);
    if (e->value > e->queue->submitted_value) flush_locked(e->queue);
  }
}

// True when some of the work a new command of q would wait for may wait for the application
// (an unset user event, directly or through another queue): such work must not be waited for
// while holding q->mu, and a non-blocking host command is then deferred.
bool dependencies_pending(cl_command_queue q, cl_uint n, const cl_event* list) {
  if (q->completed() < q->user_gate) return true;
  for (cl_uint i = 0; i < n; ++i) {
    cl_event e = list[i];
    if (e->queue == nullptr) {
      if (e->user_status.load() > CL_COMPLETE) return true;
    } else if (e->queue != q && e->queue->completed() < e->value) {
      return true;
    }
  }
  return false;
}

// Appends the device-side waits for a wait list; the events are kept alive (their fences are
// destroyed with them) until the command completes.
cl_int append_waits_locked(cl_command_queue q, cl_uint n, const cl_event* list, Retained* keep) {
  for (cl_uint i = 0; i < n; ++i) {
    cl_event e = list[i];
    gpup_status s = GPUP_STATUS_SUCCESS;
    if (e->queue == nullptr) {
      if (e->user_status.load() <= CL_COMPLETE) continue;
      s = GpupKmtCmdWait(q->cmdbuf, e->user_fence, 1);
      uint64_t gate = q->user_gate.load();
      q->user_gate = std::max(gate, q->next_value + 1);  // the command being recorded
    } else if (e->queue != q) {
      if (e->queue->completed() >= e->value) continue;
      s = GpupKmtCmdWait(q->cmdbuf, e->queue->fence, e->value);
    } else {
      continue;
    }
    if (GPUP_FAILED(s)) return queue_failure(q, s, "recording a wait");
    event_retain(e);
    keep->events.push_back(e);
  }
  return CL_SUCCESS;
}

cl_event new_event(cl_command_queue q, cl_command_type type, uint64_t value) {
  auto* e = new _cl_event();
  e->context = q->context;
  context_retain(e->context);
  e->queue = q;
  queue_retain(q);
  e->command = type;
  e->value = value;
  e->profiling = (q->properties & CL_QUEUE_PROFILING_ENABLE) != 0;
  if (e->profiling) {
    e->t_queued = now_ns();
    std::lock_guard lock(q->aux_mu);
    q->profiled.push_back(e);  // not retained: event_release takes it out
  }
  return e;
}

void drop(Retained& keep) {
  for (cl_mem m : keep.mems) mem_release(m);
  for (cl_kernel k : keep.kernels) kernel_release(k);
  for (cl_event e : keep.events) event_release(e);
  keep = {};
}

// Ends a command and keeps `keep` alive until it completes. A command with an event signals its
// own fence value; one without shares the next signal recorded (another command's, or the one a
// flush or finish adds), so a run of queued commands is one batch with one signal for the host
// to apply. On failure `keep` is left to the caller and no event is made.
cl_int end_command_locked(cl_command_queue q, cl_command_type type, Retained& keep, cl_event* event_out) {
  if (event_out) {
    if (cl_int e = signal_locked(q); e != CL_SUCCESS) return e;
  } else {
    q->open_tail = true;
  }
  const uint64_t value = event_out ? q->next_value : kUnsignalled;
  if (!keep.mems.empty() || !keep.kernels.empty() || !keep.events.empty()) {
    keep.value = value;
    q->retained.push_back(std::move(keep));
    keep = {};
  }
  if (event_out) *event_out = new_event(q, type, value);
  // A full buffer is submitted; a refusal shows in the events of its batch.
  if (GpupKmtCmdBufSize(q->cmdbuf) >= kFlushBytes) flush_locked(q);
  return CL_SUCCESS;
}

// The frame of every device enqueue: validate the wait list, flush what it depends on, lock the
// queue, record the waits, run `body` (which appends commands and names what they keep alive),
// end the command.
template <typename Body>
cl_int enqueue_device(cl_command_queue q, cl_command_type type, cl_uint n, const cl_event* list, cl_event* event_out,
                      Body&& body) {
  if (cl_int e = check_wait_list(q, n, list); e != CL_SUCCESS) return e;
  flush_dependencies(q, n, list);
  std::vector<Retained> retired;
  Retained keep;
  cl_int err = CL_SUCCESS;
  {
    std::lock_guard lock(q->mu);
    retire_locked(q, &retired);
    err = append_waits_locked(q, n, list, &keep);
    if (err == CL_SUCCESS) err = body(keep);
    if (err == CL_SUCCESS) err = end_command_locked(q, type, keep, event_out);
  }
  drop(keep);  // what a failed enqueue had taken
  release_retired(retired);
  return err;
}

// Host-side commands (reads, writes, maps, unmaps) are memcpy on the shared section once the
// work before them completed. When that work can complete without the application's help, it is
// waited for and the memcpy done before the call returns (a non-blocking call may complete
// early). When it may wait for the application (an unset user event), the command is deferred:
// the device stream carries a fence signal (the host command may run), a wait on the queue's
// host fence (later device work waits for the memcpy) and the command's own signal, and a guest
// thread runs the memcpy when the device gets there. A blocking call then waits for that, without
// holding the queue.
using HostFn = std::function<cl_int()>;

struct DeferredOp {
  cl_command_queue queue;  // retained
  uint64_t ready_value;    // the device reached the command
  uint64_t host_value;     // signalled on the queue's host fence after `fn`
  HostFn fn;
  cl_mem mem;              // retained
  cl_event event;          // retained: failed if `fn` fails
};

struct HostOps {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<DeferredOp> ops;
  bool started = false;
};

HostOps& host_ops() {
  static auto* h = new HostOps();  // never destroyed: its thread may outlive main
  return *h;
}

void host_op_loop() {
  auto& h = host_ops();
  for (;;) {
    std::vector<DeferredOp> ready;
    {
      std::unique_lock lock(h.mu);
      h.cv.wait(lock, [&] { return !h.ops.empty(); });
      // In order per queue: only a queue's first pending op may run.
      std::vector<cl_command_queue> blocked;
      for (auto it = h.ops.begin(); it != h.ops.end();) {
        const bool earlier = std::find(blocked.begin(), blocked.end(), it->queue) != blocked.end();
        if (!earlier && it->queue->completed() >= it->ready_value) {
          ready.push_back(std::move(*it));
          it = h.ops.erase(it);
        } else {
          blocked.push_back(it->queue);
          ++it;
        }
      }
    }
    for (DeferredOp& op : ready) {
      const cl_int err = op.fn();
      if (err != CL_SUCCESS && op.event) op.event->failed.store(err);
      GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT sig{op.queue->host_fence, op.host_value, 0};
      if (gpup_status st = GpupKmtSignalSynchronizationObjectFromCpu(&sig); GPUP_FAILED(st))
        log_failure("releasing device work behind a host command", st);
      if (op.event) event_release(op.event);
      mem_release(op.mem);
      queue_release(op.queue);
    }
    if (ready.empty()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

// The command's event comes back in *ev_out (the caller releases it, outside the queue's lock,
// when the application did not ask for it).
cl_int defer_locked(cl_command_queue q, cl_command_type type, cl_mem m, HostFn fn, Retained& keep, cl_event* ev_out) {
  if (q->host_fence == 0) {
    GPUPKMT_CREATESYNCHRONIZATIONOBJECT cs{};
    cs.hDevice = q->context->hw_device;
    cs.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
    if (gpup_status s = GpupKmtCreateSynchronizationObject(&cs); GPUP_FAILED(s))
      return queue_failure(q, s, "creating a queue's host fence");
    q->host_fence = cs.hSyncObject;
  }
  if (cl_int e = signal_locked(q); e != CL_SUCCESS) return e;
  const uint64_t ready = q->next_value;
  if (gpup_status s = GpupKmtCmdWait(q->cmdbuf, q->host_fence, q->host_seq + 1); GPUP_FAILED(s))
    return queue_failure(q, s, "recording a host command");
  ++q->host_seq;
  cl_event ev = nullptr;
  if (cl_int e = end_command_locked(q, type, keep, &ev); e != CL_SUCCESS) return e;
  *ev_out = ev;
  if (cl_int e = flush_locked(q); e != CL_SUCCESS) return e;
  event_retain(ev);
  queue_retain(q);
  mem_retain(m);
  auto& h = host_ops();
  {
    std::lock_guard lock(h.mu);
    if (!h.started) {
      std::thread(host_op_loop).detach();
      h.started = true;
    }
    h.ops.push_back(DeferredOp{q, ready, q->host_seq, std::move(fn), m, ev});
  }
  h.cv.notify_one();
  return CL_SUCCESS;
}

// Nothing recorded and everything submitted has completed (its wait list added no waits).
bool idle_locked(cl_command_queue q) {
  return GpupKmtCmdBufCount(q->cmdbuf) == 0 && !q->open_tail && q->completed() >= q->next_value &&
         q->error.load() == CL_SUCCESS;
}

bool any_failed(cl_uint n, const cl_event* list) {
  for (cl_uint i = 0; i < n; ++i)
    if (event_status(list[i]) < 0) return true;
  return false;
}

cl_int enqueue_host(cl_command_queue q, cl_command_type type, cl_bool blocking, cl_mem m, cl_uint n,
                    const cl_event* list, cl_event* event_out, HostFn fn) {
  if (cl_int e = check_wait_list(q, n, list); e != CL_SUCCESS) return e;
  flush_dependencies(q, n, list);
  std::vector<Retained> retired;
  Retained keep;
  cl_int err = CL_SUCCESS;
  cl_event ev = nullptr;
  bool deferred = false;
  {
    std::lock_guard lock(q->mu);
    retire_locked(q, &retired);
    deferred = dependencies_pending(q, n, list);
    err = append_waits_locked(q, n, list, &keep);
    if (err == CL_SUCCESS && deferred) {
      err = defer_locked(q, type, m, std::move(fn), keep, &ev);
    } else if (err == CL_SUCCESS && idle_locked(q)) {
      // Nothing before it is pending: the memcpy runs now, with no command for the device, and
      // its event is complete from the start (the value the fence already passed).
      ev = new_event(q, type, q->next_value);
      ev->t_submit = ev->t_start = now_ns();
      err = fn();
      ev->t_end = now_ns();
      if (err != CL_SUCCESS) ev->failed.store(err);
    } else if (err == CL_SUCCESS) {
      // Everything before it completes on its own: wait here, keeping later commands of this
      // queue behind the memcpy.
      err = end_command_locked(q, type, keep, &ev);
      if (err == CL_SUCCESS) err = wait_value(q, q->next_value, /*locked=*/true);
      if (err == CL_SUCCESS) err = fn();
      retire_locked(q, &retired);
      if (err != CL_SUCCESS && ev) ev->failed.store(err);
    }
  }
  drop(keep);
  if (err == CL_SUCCESS && deferred && blocking) err = wait_value(q, ev->value);
  if (err == CL_SUCCESS && blocking && any_failed(n, list)) err = CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST;
  // Events are released outside the queue's lock.
  if (event_out && err == CL_SUCCESS) *event_out = ev;
  else if (ev) event_release(ev);
  release_retired(retired);
  return err;
}

bool readable_by_host(cl_mem m) { return (m->flags & (CL_MEM_HOST_WRITE_ONLY | CL_MEM_HOST_NO_ACCESS)) == 0; }
bool writable_by_host(cl_mem m) { return (m->flags & (CL_MEM_HOST_READ_ONLY | CL_MEM_HOST_NO_ACCESS)) == 0; }

cl_int check_buffer(cl_command_queue q, cl_mem m) {
  if (!valid(m) || m->type != CL_MEM_OBJECT_BUFFER) return CL_INVALID_MEM_OBJECT;
  if (m->context != q->context) return CL_INVALID_CONTEXT;
  return CL_SUCCESS;
}

bool in_range(size_t offset, size_t size, size_t total) { return offset <= total && size <= total - offset; }

// Runs fn on the bytes of a buffer (at its origin), bracketed by the backing's begin and end.
template <typename Fn>
cl_int with_bytes(cl_mem m, Fn&& fn) {
  uint8_t* base = nullptr;
  if (cl_int e = m->backing->begin(&base); e != CL_SUCCESS) return e;
  fn(base + m->origin);
  return m->backing->end();
}

bool ranges_overlap(size_t a, size_t as, size_t b, size_t bs) { return a < b + bs && b < a + as; }

// Records device copies of the rows of two rectangles: one copy when both are contiguous.
gpup_status copy_rows(GPUPKMT_CMDBUF* cb, uint64_t src_va, const Rect& s, uint64_t dst_va, const Rect& d) {
  if (contiguous(s) && contiguous(d))
    return GpupKmtCmdCopy(cb, src_va + s.offset(), dst_va + d.offset(), s.region[0] * s.region[1] * s.region[2]);
  gpup_status st = GPUP_STATUS_SUCCESS;
  for_each_row(s, d, [&](size_t so, size_t dof, size_t len) {
    if (GPUP_SUCCEEDED(st)) st = GpupKmtCmdCopy(cb, src_va + so, dst_va + dof, len);
  });
  return st;
}

// The device copy of a rectangle of rows between two memory objects (buffers or images).
cl_int enqueue_rows_copy(cl_command_queue q, cl_command_type type, cl_mem src, const Rect& s, cl_mem dst, const Rect& d,
                         cl_uint n, const cl_event* list, cl_event* ev) {
  return enqueue_device(q, type, n, list, ev, [&](Retained& keep) -> cl_int {
    if (gpup_status st = copy_rows(q->cmdbuf, src->va(), s, dst->va(), d); GPUP_FAILED(st))
      return queue_failure(q, st, "recording a copy");
    mem_retain(src);
    mem_retain(dst);
    keep.mems = {src, dst};
    return CL_SUCCESS;
  });
}

// The mapped region of a USE_HOST_PTR image in the application's memory and layout.
Rect host_map_rect(cl_mem m, const Rect& img) {
  Rect r = img;
  r.row_pitch = m->host_row_pitch;
  r.slice_pitch = m->host_slice_pitch ? m->host_slice_pitch : m->host_row_pitch * std::max<size_t>(1, m->desc.image_height);
  return r;
}


}  // namespace

// A rectangle from OpenCL's arguments (image_support.h).
cl_int make_rect(const size_t* origin, const size_t* region, size_t row_pitch, size_t slice_pitch, Rect* r) {
  if (origin == nullptr || region == nullptr) return CL_INVALID_VALUE;
  if (region[0] == 0 || region[1] == 0 || region[2] == 0) return CL_INVALID_VALUE;
  if (row_pitch == 0) row_pitch = region[0];
  else if (row_pitch < region[0]) return CL_INVALID_VALUE;
  size_t min_slice;
  if (__builtin_mul_overflow(region[1], row_pitch, &min_slice)) return CL_INVALID_VALUE;
  if (slice_pitch == 0) slice_pitch = min_slice;
  else if (slice_pitch < min_slice || slice_pitch % row_pitch != 0) return CL_INVALID_VALUE;
  *r = Rect{{origin[0], origin[1], origin[2]}, {region[0], region[1], region[2]}, row_pitch, slice_pitch};
  size_t a, b, c, d, e;
  if (__builtin_mul_overflow(origin[2] + region[2] - 1, slice_pitch, &a) || origin[2] + region[2] - 1 < origin[2] ||
      __builtin_mul_overflow(origin[1] + region[1] - 1, row_pitch, &b) || origin[1] + region[1] - 1 < origin[1] ||
      __builtin_add_overflow(a, b, &c) || __builtin_add_overflow(origin[0], region[0], &d) ||
      __builtin_add_overflow(c, d, &e))
    return CL_INVALID_VALUE;
  r->end = e;
  return CL_SUCCESS;
}

void queue_retain(cl_command_queue q) { q->refs.fetch_add(1, std::memory_order_relaxed); }

void queue_release(cl_command_queue q) {
  if (q->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  uint64_t last = 0;
  {
    std::lock_guard lock(q->mu);
    last_value_locked(q, &last);
  }
  wait_value(q, last);  // a released queue still finishes its work
  std::vector<Retained> retired;
  {
    std::lock_guard lock(q->mu);
    for (auto& r : q->retained) retired.push_back(std::move(r));
    q->retained.clear();
  }
  stamp_profiles(q);
  release_retired(retired);
  GPUPKMT_DESTROYCONTEXT dc{q->hw_context};
  GpupKmtDestroyContext(&dc);
  GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT ds{q->fence};
  GpupKmtDestroySynchronizationObject(&ds);
  if (q->host_fence != 0) {
    GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT dh{q->host_fence};
    GpupKmtDestroySynchronizationObject(&dh);
  }
  GpupKmtCmdBufDestroy(q->cmdbuf);
  cl_context c = q->context;
  q->magic = Magic::kDead;
  delete q;
  context_release(c);
}

void queue_retire(cl_command_queue q) {
  std::vector<Retained> retired;
  {
    std::lock_guard lock(q->mu);
    retire_locked(q, &retired);
  }
  release_retired(retired);
}

// Flushes q up to `value` and waits for it (events of the queue), holding no lock while waiting.
cl_int queue_wait(cl_command_queue q, uint64_t value) {
  const cl_int err = wait_value(q, value);
  queue_retire(q);
  return err;
}

cl_int queue_flush_to(cl_command_queue q, uint64_t value) {
  if (value <= q->submitted_value) return CL_SUCCESS;
  std::lock_guard lock(q->mu);
  if (value > q->submitted_value) return flush_locked(q);
  return CL_SUCCESS;
}

}  // namespace gpup::ocl

using namespace gpup::ocl;

namespace gpup::ocl::api {

namespace {

cl_command_queue create_queue(cl_context c, cl_device_id d, cl_command_queue_properties props,
                              std::vector<cl_queue_properties> array, cl_int* errcode_ret) {
  auto fail = [&](cl_int e) -> cl_command_queue {
    if (errcode_ret) *errcode_ret = e;
    return nullptr;
  };
  if (!valid(c)) return fail(CL_INVALID_CONTEXT);
  if (!valid(d) || std::find(c->devices.begin(), c->devices.end(), d) == c->devices.end())
    return fail(CL_INVALID_DEVICE);
  constexpr cl_command_queue_properties kKnown = CL_QUEUE_OUT_OF_ORDER_EXEC_MODE_ENABLE | CL_QUEUE_PROFILING_ENABLE |
                                                 CL_QUEUE_ON_DEVICE | CL_QUEUE_ON_DEVICE_DEFAULT;
  if (props & ~kKnown) return fail(CL_INVALID_VALUE);
  if (props & (CL_QUEUE_ON_DEVICE | CL_QUEUE_ON_DEVICE_DEFAULT)) return fail(CL_INVALID_QUEUE_PROPERTIES);
  if (props & ~d->queue_properties) return fail(CL_INVALID_QUEUE_PROPERTIES);

  GPUPKMT_CREATECONTEXT cc{};
  cc.hDevice = c->hw_device;
  if (gpup_status s = GpupKmtCreateContext(&cc); GPUP_FAILED(s)) return fail(queue_failure(nullptr, s, "creating a queue"));
  GPUPKMT_CREATESYNCHRONIZATIONOBJECT cs{};
  cs.hDevice = c->hw_device;
  cs.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
  if (gpup_status s = GpupKmtCreateSynchronizationObject(&cs); GPUP_FAILED(s)) {
    GPUPKMT_DESTROYCONTEXT dc{cc.hContext};
    GpupKmtDestroyContext(&dc);
    return fail(queue_failure(nullptr, s, "creating a queue's fence"));
  }
  auto* q = new _cl_command_queue();
  q->context = c;
  context_retain(c);
  q->device = d;
  q->properties = props;
  q->properties_array = std::move(array);
  q->hw_context = cc.hContext;
  q->fence = cs.hSyncObject;
  q->fence_value = cs.pFenceValue;
  GpupKmtCmdBufCreate(&q->cmdbuf);
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return q;
}

template <typename T>
cl_int check_queue(cl_command_queue q) {
  return valid(q) ? CL_SUCCESS : CL_INVALID_COMMAND_QUEUE;
}

}  // namespace

cl_command_queue CreateCommandQueue(cl_context c, cl_device_id d, cl_command_queue_properties props,
                                    cl_int* errcode_ret) {
  return create_queue(c, d, props, {}, errcode_ret);
}

cl_command_queue CreateCommandQueueWithProperties(cl_context c, cl_device_id d, const cl_queue_properties* props,
                                                  cl_int* errcode_ret) {
  cl_command_queue_properties bits = 0;
  std::vector<cl_queue_properties> array;
  if (props != nullptr) {
    size_t i = 0;
    for (; props[i] != 0; i += 2) {
      switch (props[i]) {
        case CL_QUEUE_PROPERTIES: bits = props[i + 1]; break;
        case CL_QUEUE_SIZE:
          if (errcode_ret) *errcode_ret = CL_INVALID_QUEUE_PROPERTIES;  // only for device queues
          return nullptr;
        default:
          if (errcode_ret) *errcode_ret = CL_INVALID_VALUE;
          return nullptr;
      }
    }
    array.assign(props, props + i + 1);
  }
  return create_queue(c, d, bits, std::move(array), errcode_ret);
}

cl_int RetainCommandQueue(cl_command_queue q) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  queue_retain(q);
  return CL_SUCCESS;
}

cl_int ReleaseCommandQueue(cl_command_queue q) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  {
    std::lock_guard lock(q->mu);
    flush_locked(q);  // an implicit flush, as OpenCL requires
  }
  queue_release(q);
  return CL_SUCCESS;
}

cl_int GetCommandQueueInfo(cl_command_queue q, cl_command_queue_info param, size_t n, void* v, size_t* ret) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  switch (param) {
    case CL_QUEUE_CONTEXT: return info_value(n, v, ret, q->context);
    case CL_QUEUE_DEVICE: return info_value(n, v, ret, q->device);
    case CL_QUEUE_REFERENCE_COUNT: return info_value(n, v, ret, cl_uint(q->refs.load()));
    case CL_QUEUE_PROPERTIES: return info_value(n, v, ret, q->properties);
    case CL_QUEUE_PROPERTIES_ARRAY: return info_array(n, v, ret, q->properties_array);
    case CL_QUEUE_SIZE: return CL_INVALID_COMMAND_QUEUE;  // not a device queue
    case CL_QUEUE_DEVICE_DEFAULT: return info_value(n, v, ret, cl_command_queue{nullptr});
    default: return CL_INVALID_VALUE;
  }
}

cl_int SetCommandQueueProperty(cl_command_queue q, cl_command_queue_properties, cl_bool,
                               cl_command_queue_properties*) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  return CL_INVALID_OPERATION;  // removed in OpenCL 1.1
}

cl_int SetDefaultDeviceCommandQueue(cl_context c, cl_device_id, cl_command_queue) {
  if (!valid(c)) return CL_INVALID_CONTEXT;
  return CL_INVALID_OPERATION;  // no device queues
}

cl_int Flush(cl_command_queue q) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  std::lock_guard lock(q->mu);
  return flush_locked(q);
}

cl_int Finish(cl_command_queue q) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  uint64_t last = 0;
  {
    std::lock_guard lock(q->mu);
    if (last_value_locked(q, &last) != CL_SUCCESS) return CL_OUT_OF_RESOURCES;
  }
  cl_int err = queue_wait(q, last);
  return err == CL_SUCCESS ? CL_SUCCESS : CL_OUT_OF_RESOURCES;
}

// ------------------------------------------------------------------------------------------------
// Buffers

cl_int EnqueueReadBuffer(cl_command_queue q, cl_mem m, cl_bool blocking, size_t offset, size_t size, void* ptr, cl_uint n,
                         const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_buffer(q, m); e != CL_SUCCESS) return e;
  if (ptr == nullptr || !in_range(offset, size, m->size)) return CL_INVALID_VALUE;
  if (!readable_by_host(m)) return CL_INVALID_OPERATION;
  return enqueue_host(q, CL_COMMAND_READ_BUFFER, blocking, m, n, list, ev, [=]() -> cl_int {
    return with_bytes(m, [&](uint8_t* p) {
      std::memcpy(ptr, p + offset, size);
    });
  });
}

cl_int EnqueueWriteBuffer(cl_command_queue q, cl_mem m, cl_bool blocking, size_t offset, size_t size, const void* ptr,
                          cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_buffer(q, m); e != CL_SUCCESS) return e;
  if (ptr == nullptr || !in_range(offset, size, m->size)) return CL_INVALID_VALUE;
  if (!writable_by_host(m)) return CL_INVALID_OPERATION;
  return enqueue_host(q, CL_COMMAND_WRITE_BUFFER, blocking, m, n, list, ev, [=]() -> cl_int {
    return with_bytes(m, [&](uint8_t* p) {
      std::memcpy(p + offset, ptr, size);
    });
  });
}

cl_int EnqueueReadBufferRect(cl_command_queue q, cl_mem m, cl_bool blocking, const size_t* buffer_origin,
                             const size_t* host_origin, const size_t* region, size_t buffer_row_pitch,
                             size_t buffer_slice_pitch, size_t host_row_pitch, size_t host_slice_pitch, void* ptr,
                             cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_buffer(q, m); e != CL_SUCCESS) return e;
  if (ptr == nullptr) return CL_INVALID_VALUE;
  Rect b, h;
  if (cl_int e = make_rect(buffer_origin, region, buffer_row_pitch, buffer_slice_pitch, &b); e != CL_SUCCESS) return e;
  if (cl_int e = make_rect(host_origin, region, host_row_pitch, host_slice_pitch, &h); e != CL_SUCCESS) return e;
  if (b.end > m->size) return CL_INVALID_VALUE;
  if (!readable_by_host(m)) return CL_INVALID_OPERATION;
  return enqueue_host(q, CL_COMMAND_READ_BUFFER_RECT, blocking, m, n, list, ev, [=]() -> cl_int {
    return with_bytes(m, [&](uint8_t* p) {
      for_each_row(b, h, [&](size_t bo, size_t ho, size_t len) { std::memcpy(static_cast<uint8_t*>(ptr) + ho, p + bo, len); });
    });
  });
}

cl_int EnqueueWriteBufferRect(cl_command_queue q, cl_mem m, cl_bool blocking, const size_t* buffer_origin,
                              const size_t* host_origin, const size_t* region, size_t buffer_row_pitch,
                              size_t buffer_slice_pitch, size_t host_row_pitch, size_t host_slice_pitch,
                              const void* ptr, cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_buffer(q, m); e != CL_SUCCESS) return e;
  if (ptr == nullptr) return CL_INVALID_VALUE;
  Rect b, h;
  if (cl_int e = make_rect(buffer_origin, region, buffer_row_pitch, buffer_slice_pitch, &b); e != CL_SUCCESS) return e;
  if (cl_int e = make_rect(host_origin, region, host_row_pitch, host_slice_pitch, &h); e != CL_SUCCESS) return e;
  if (b.end > m->size) return CL_INVALID_VALUE;
  if (!writable_by_host(m)) return CL_INVALID_OPERATION;
  return enqueue_host(q, CL_COMMAND_WRITE_BUFFER_RECT, blocking, m, n, list, ev, [=]() -> cl_int {
    return with_bytes(m, [&](uint8_t* p) {
      for_each_row(b, h, [&](size_t bo, size_t ho, size_t len) { std::memcpy(p + bo, static_cast<const uint8_t*>(ptr) + ho, len); });
    });
  });
}

cl_int EnqueueCopyBuffer(cl_command_queue q, cl_mem src, cl_mem dst, size_t src_offset, size_t dst_offset, size_t size,
                         cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_buffer(q, src); e != CL_SUCCESS) return e;
  if (cl_int e = check_buffer(q, dst); e != CL_SUCCESS) return e;
  if (size == 0 || !in_range(src_offset, size, src->size) || !in_range(dst_offset, size, dst->size))
    return CL_INVALID_VALUE;
  if (src->backing == dst->backing &&
      ranges_overlap(src->origin + src_offset, size, dst->origin + dst_offset, size))
    return CL_MEM_COPY_OVERLAP;
  return enqueue_device(q, CL_COMMAND_COPY_BUFFER, n, list, ev, [&](Retained& keep) -> cl_int {
    if (gpup_status s = GpupKmtCmdCopy(q->cmdbuf, src->va() + src_offset, dst->va() + dst_offset, size); GPUP_FAILED(s))
      return queue_failure(q, s, "recording a copy");
    mem_retain(src);
    mem_retain(dst);
    keep.mems = {src, dst};
    return CL_SUCCESS;
  });
}

cl_int EnqueueCopyBufferRect(cl_command_queue q, cl_mem src, cl_mem dst, const size_t* src_origin,
                             const size_t* dst_origin, const size_t* region, size_t src_row_pitch,
                             size_t src_slice_pitch, size_t dst_row_pitch, size_t dst_slice_pitch, cl_uint n,
                             const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_buffer(q, src); e != CL_SUCCESS) return e;
  if (cl_int e = check_buffer(q, dst); e != CL_SUCCESS) return e;
  Rect s, d;
  if (cl_int e = make_rect(src_origin, region, src_row_pitch, src_slice_pitch, &s); e != CL_SUCCESS) return e;
  if (cl_int e = make_rect(dst_origin, region, dst_row_pitch, dst_slice_pitch, &d); e != CL_SUCCESS) return e;
  if (s.end > src->size || d.end > dst->size) return CL_INVALID_VALUE;
  if (src == dst) {
    if (src_row_pitch != dst_row_pitch || src_slice_pitch != dst_slice_pitch) return CL_INVALID_VALUE;
    bool overlap = true;
    for (int i = 0; i < 3; ++i)
      if (!ranges_overlap(src_origin[i], region[i], dst_origin[i], region[i])) overlap = false;
    if (overlap) return CL_MEM_COPY_OVERLAP;
  }
  return enqueue_rows_copy(q, CL_COMMAND_COPY_BUFFER_RECT, src, s, dst, d, n, list, ev);
}

cl_int EnqueueFillBuffer(cl_command_queue q, cl_mem m, const void* pattern, size_t pattern_size, size_t offset,
                         size_t size, cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_buffer(q, m); e != CL_SUCCESS) return e;
  if (pattern == nullptr || pattern_size == 0 || pattern_size > 128 || (pattern_size & (pattern_size - 1)) != 0)
    return CL_INVALID_VALUE;
  if (offset % pattern_size != 0 || size % pattern_size != 0 || !in_range(offset, size, m->size))
    return CL_INVALID_VALUE;
  return enqueue_device(q, CL_COMMAND_FILL_BUFFER, n, list, ev, [&](Retained& keep) -> cl_int {
    if (size == 0) return CL_SUCCESS;
    if (gpup_status s = GpupKmtCmdFill(q->cmdbuf, m->va() + offset, size, pattern, static_cast<uint32_t>(pattern_size));
        GPUP_FAILED(s))
      return queue_failure(q, s, "recording a fill");
    mem_retain(m);
    keep.mems = {m};
    return CL_SUCCESS;
  });
}

void* EnqueueMapBuffer(cl_command_queue q, cl_mem m, cl_bool blocking, cl_map_flags flags, size_t offset, size_t size,
                       cl_uint n, const cl_event* list, cl_event* ev, cl_int* errcode_ret) {
  auto fail = [&](cl_int e) -> void* {
    if (errcode_ret) *errcode_ret = e;
    return nullptr;
  };
  if (!valid(q)) return fail(CL_INVALID_COMMAND_QUEUE);
  if (cl_int e = check_buffer(q, m); e != CL_SUCCESS) return fail(e);
  if (size == 0 || !in_range(offset, size, m->size)) return fail(CL_INVALID_VALUE);
  // Unknown bits and READ together with WRITE_INVALIDATE_REGION are accepted, as the host
  // implementation accepts them; READ wins over invalidation.
  if ((flags & CL_MAP_READ) && !readable_by_host(m)) return fail(CL_INVALID_OPERATION);
  if ((flags & (CL_MAP_WRITE | CL_MAP_WRITE_INVALIDATE_REGION)) && !writable_by_host(m))
    return fail(CL_INVALID_OPERATION);
  // A USE_HOST_PTR buffer maps to the application's memory, made current when the map command
  // runs. Otherwise the buffer's own bytes are the map: on a coherent device over shared memory
  // the persistent mapping; else a Lock taken when the command runs (after the work before it, so
  // such a map completes before it returns) and held until the unmap.
  uint8_t* h = static_cast<uint8_t*>(m->host_ptr);
  const bool persistent = m->backing->device->persistent_maps;
  const bool hold_lock = h == nullptr && !persistent;
  uint8_t* p = nullptr;
  if (h == nullptr && persistent) {
    if (cl_int e = m->backing->map(&p); e != CL_SUCCESS) return fail(e);
    p += m->origin;
  }
  const bool refresh = h != nullptr && ((flags & CL_MAP_READ) || !(flags & CL_MAP_WRITE_INVALIDATE_REGION));
  auto locked = std::make_shared<uint8_t*>(nullptr);
  cl_int err = enqueue_host(q, CL_COMMAND_MAP_BUFFER, hold_lock ? CL_TRUE : blocking, m, n, list, ev, [=]() -> cl_int {
    if (refresh) return with_bytes(m, [&](uint8_t* bytes) { std::memcpy(h + offset, bytes + offset, size); });
    if (hold_lock) return m->backing->begin(locked.get());
    return CL_SUCCESS;
  });
  void* result = h ? h + offset : hold_lock ? (*locked ? *locked + m->origin + offset : nullptr) : p + offset;
  if (err == CL_SUCCESS) {
    std::lock_guard lock(m->mu);
    ++m->map_count;
    m->maps.push_back({result, offset, size, flags, hold_lock});
  }
  if (err != CL_SUCCESS) return fail(err);
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return result;
}

cl_int EnqueueUnmapMemObject(cl_command_queue q, cl_mem m, void* mapped, cl_uint n, const cl_event* list,
                             cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (!valid(m)) return CL_INVALID_MEM_OBJECT;
  if (m->context != q->context) return CL_INVALID_CONTEXT;
  _cl_mem::MapRecord rec{};
  {
    std::lock_guard lock(m->mu);
    auto it = std::find_if(m->maps.begin(), m->maps.end(), [&](const auto& r) { return r.pointer == mapped; });
    if (it == m->maps.end()) return CL_INVALID_VALUE;
    rec = *it;
    m->maps.erase(it);
  }
  // USE_HOST_PTR: publish what the application wrote into the mapped range of its memory; a map
  // that holds a Lock publishes by unlocking.
  const bool publish = m->host_ptr != nullptr && (rec.flags & (CL_MAP_WRITE | CL_MAP_WRITE_INVALIDATE_REGION)) != 0;
  const cl_int err = enqueue_host(q, CL_COMMAND_UNMAP_MEM_OBJECT, CL_FALSE, m, n, list, ev, [=]() -> cl_int {
    cl_int err = CL_SUCCESS;
    if (publish && m->is_image()) {
      const Rect img = image_rect(m, rec.origin, rec.region);
      const Rect hr = host_map_rect(m, img);
      auto* h = static_cast<uint8_t*>(m->host_ptr);
      err = with_bytes(m, [&](uint8_t* bytes) {
        for_each_row(img, hr, [&](size_t io, size_t ho, size_t len) { std::memcpy(bytes + io, h + ho, len); });
      });
    } else if (publish)
      err = with_bytes(m, [&](uint8_t* bytes) { std::memcpy(bytes + rec.offset, rec.pointer, rec.size); });
    else if (rec.locked)
      err = m->backing->end();
    std::lock_guard lock(m->mu);
    if (m->map_count > 0) --m->map_count;
    return err;
  });
  if (err != CL_SUCCESS && err != CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST) {
    std::lock_guard lock(m->mu);  // not unmapped: the application may try again
    m->maps.push_back(rec);
  }
  return err;
}

cl_int EnqueueMigrateMemObjects(cl_command_queue q, cl_uint num, const cl_mem* mems, cl_mem_migration_flags flags,
                                cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (num == 0 || mems == nullptr) return CL_INVALID_VALUE;
  if (flags & ~cl_mem_migration_flags(CL_MIGRATE_MEM_OBJECT_HOST | CL_MIGRATE_MEM_OBJECT_CONTENT_UNDEFINED))
    return CL_INVALID_VALUE;
  for (cl_uint i = 0; i < num; ++i) {
    if (!valid(mems[i])) return CL_INVALID_MEM_OBJECT;
    if (mems[i]->context != q->context) return CL_INVALID_CONTEXT;
  }
  // One memory for host and device: nothing moves.
  return enqueue_device(q, CL_COMMAND_MIGRATE_MEM_OBJECTS, n, list, ev, [](Retained&) { return CL_SUCCESS; });
}

// ------------------------------------------------------------------------------------------------
// Kernels

cl_int EnqueueNDRangeKernel(cl_command_queue q, cl_kernel k, cl_uint work_dim, const size_t* offset,
                            const size_t* global, const size_t* local, cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (!valid(k)) return CL_INVALID_KERNEL;
  if (k->program->context != q->context) return CL_INVALID_CONTEXT;
  cl_device_id d = q->device;
  if (work_dim < 1 || work_dim > d->max_work_item_dims) return CL_INVALID_WORK_DIMENSION;
  // The host implementation's rules (OpenCL 2.1+): a NULL or empty global size launches nothing,
  // and a local size with a 0 leaves the choice to the device.
  bool empty = global == nullptr;
  for (cl_uint i = 0; !empty && i < work_dim; ++i) {
    if (global[i] == 0) empty = true;
    else if (offset && global[i] + offset[i] < global[i]) return CL_INVALID_GLOBAL_OFFSET;
  }
  if (local != nullptr && std::find(local, local + work_dim, size_t{0}) != local + work_dim) local = nullptr;
  const GPUP_OCL_KERNEL_INFO& ki = k->meta->info;
  const bool required = ki.CompileWorkGroupSize[0] != 0;
  if (local != nullptr) {
    size_t product = 1;
    for (cl_uint i = 0; i < work_dim; ++i) {
      if (local[i] > d->max_work_item_sizes[i]) return CL_INVALID_WORK_GROUP_SIZE;
      if (required && local[i] != ki.CompileWorkGroupSize[i]) return CL_INVALID_WORK_GROUP_SIZE;
      if (!empty && !d->non_uniform_work_groups && global[i] % local[i] != 0) return CL_INVALID_WORK_GROUP_SIZE;
      product *= local[i];
    }
    if (product > d->max_work_group_size || (ki.WorkGroupSize != 0 && product > ki.WorkGroupSize))
      return CL_INVALID_WORK_GROUP_SIZE;
  } else if (required) {
    return CL_INVALID_WORK_GROUP_SIZE;  // reqd_work_group_size needs the matching local size
  }
  if (cl_int e = check_wait_list(q, n, list); e != CL_SUCCESS) return e;
  if (empty) return enqueue_device(q, CL_COMMAND_NDRANGE_KERNEL, n, list, ev, [](Retained&) { return CL_SUCCESS; });

  // Snapshot the arguments: later clSetKernelArg calls must not change this launch.
  std::vector<GPUPKMT_KERNEL_ARG> args;
  std::vector<cl_mem> mems;
  std::vector<std::vector<uint8_t>> values;
  {
    std::lock_guard lock(k->mu);
    args.reserve(k->args.size());
    values.reserve(k->args.size());
    for (const ArgValue& a : k->args) {
      if (!a.set) return CL_INVALID_KERNEL_ARGS;
      GPUPKMT_KERNEL_ARG g{};
      g.Kind = a.kind;
      switch (a.kind) {
        case GPUPDDI_ARG_VALUE:
        case GPUPDDI_ARG_SAMPLER:
          values.push_back(a.bytes);
          g.Size = static_cast<uint32_t>(a.bytes.size());
          g.pValue = values.back().data();
          break;
        case GPUPDDI_ARG_LOCAL: g.Size = a.local_size; break;
        case GPUPDDI_ARG_BUFFER:
          if (!valid(a.mem)) return CL_INVALID_KERNEL_ARGS;
          g.VirtualAddress = a.mem->va();
          g.BufferSize = a.mem->size;
          mems.push_back(a.mem);
          break;
        case GPUPDDI_ARG_IMAGE:  // the whole image allocation
          if (!valid(a.mem)) return CL_INVALID_KERNEL_ARGS;
          g.VirtualAddress = a.mem->backing->va;
          g.BufferSize = a.mem->backing->size;
          mems.push_back(a.mem);
          break;
        default: break;
      }
      args.push_back(g);
    }
  }
  GPUPKMT_DISPATCH dispatch{};
  dispatch.hProgram = k->build->allocation;
  dispatch.pKernelName = k->meta->name.c_str();
  dispatch.WorkDim = work_dim;
  dispatch.ArgCount = static_cast<uint32_t>(args.size());
  dispatch.pArgs = args.data();
  for (cl_uint i = 0; i < 3; ++i) {
    dispatch.GlobalSize[i] = i < work_dim ? global[i] : 1;
    dispatch.GlobalOffset[i] = i < work_dim && offset ? offset[i] : 0;
    dispatch.LocalSize[i] = local ? (i < work_dim ? local[i] : 1) : 0;
  }
  return enqueue_device(q, CL_COMMAND_NDRANGE_KERNEL, n, list, ev, [&](Retained& keep) -> cl_int {
    if (gpup_status s = GpupKmtCmdDispatch(q->cmdbuf, &dispatch); GPUP_FAILED(s))
      return queue_failure(q, s, "recording a dispatch");
    for (cl_mem m : mems) mem_retain(m);
    kernel_retain(k);
    keep.mems = std::move(mems);
    keep.kernels = {k};
    return CL_SUCCESS;
  });
}

cl_int EnqueueTask(cl_command_queue q, cl_kernel k, cl_uint n, const cl_event* list, cl_event* ev) {
  const size_t one = 1;
  return EnqueueNDRangeKernel(q, k, 1, nullptr, &one, &one, n, list, ev);
}

cl_int EnqueueNativeKernel(cl_command_queue q, void(CL_CALLBACK*)(void*), void*, size_t, cl_uint, const cl_mem*,
                           const void**, cl_uint, const cl_event*, cl_event*) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  return CL_INVALID_OPERATION;  // CL_EXEC_NATIVE_KERNEL: guest code never runs on the host
}

// ------------------------------------------------------------------------------------------------
// Markers, barriers, waits

cl_int EnqueueMarkerWithWaitList(cl_command_queue q, cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  return enqueue_device(q, CL_COMMAND_MARKER, n, list, ev, [](Retained&) { return CL_SUCCESS; });
}

cl_int EnqueueBarrierWithWaitList(cl_command_queue q, cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  return enqueue_device(q, CL_COMMAND_BARRIER, n, list, ev, [](Retained&) { return CL_SUCCESS; });
}

cl_int EnqueueMarker(cl_command_queue q, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (ev == nullptr) return CL_INVALID_VALUE;
  return EnqueueMarkerWithWaitList(q, 0, nullptr, ev);
}

cl_int EnqueueBarrier(cl_command_queue q) { return EnqueueBarrierWithWaitList(q, 0, nullptr, nullptr); }

cl_int EnqueueWaitForEvents(cl_command_queue q, cl_uint n, const cl_event* list) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (n == 0 || list == nullptr) return CL_INVALID_VALUE;
  for (cl_uint i = 0; i < n; ++i) {
    if (!valid(list[i])) return CL_INVALID_EVENT;
    if (list[i]->context != q->context) return CL_INVALID_CONTEXT;
  }
  return enqueue_device(q, CL_COMMAND_BARRIER, n, list, nullptr, [](Retained&) { return CL_SUCCESS; });
}


// ------------------------------------------------------------------------------------------------
// Images: the pixels are the backing's bytes in a linear layout (image.cpp), so host transfers
// are row memcpys on the shared section and device copies and fills are rows of buffer commands.

namespace {

cl_int check_image(cl_command_queue q, cl_mem m) {
  if (!valid(m) || !m->is_image()) return CL_INVALID_MEM_OBJECT;
  if (m->context != q->context) return CL_INVALID_CONTEXT;
  return CL_SUCCESS;
}

// A host rectangle of `region` with the application's pitches: OpenCL's rules (0 is tight; a row
// pitch below the region's row, a slice pitch below the region's slice, are CL_INVALID_VALUE).
cl_int host_pitches(cl_mem m, const size_t* region, size_t row_pitch, size_t slice_pitch, Rect* out) {
  const size_t row = region[0] * m->element_size;
  if (row_pitch != 0 && row_pitch < row) return CL_INVALID_VALUE;
  const size_t rp = row_pitch ? row_pitch : row;
  const bool slices = image_has_slices(m->type);
  if (!slices) {
    slice_pitch = 0;  // unused, as the host implementation treats it
  } else {
    const size_t min_slice = m->type == CL_MEM_OBJECT_IMAGE1D_ARRAY ? rp : rp * region[1];
    if (slice_pitch != 0 && slice_pitch < min_slice) return CL_INVALID_VALUE;
  }
  *out = host_rect(m, region, rp, slice_pitch);
  return CL_SUCCESS;
}

// A buffer's side of an image <-> buffer copy: the region's rows packed tightly from `offset`.
cl_int buffer_rect(cl_mem image, cl_mem buffer, size_t offset, const size_t* region, Rect* out) {
  Rect r = host_rect(image, region, 0, 0);
  size_t end = 0;
  if (__builtin_add_overflow(offset, r.end, &end) || end > buffer->size) return CL_INVALID_VALUE;
  r.origin[0] = offset;
  r.end = end;
  *out = r;
  return CL_SUCCESS;
}

}  // namespace

cl_int EnqueueReadImage(cl_command_queue q, cl_mem m, cl_bool blocking, const size_t* origin, const size_t* region,
                        size_t row_pitch, size_t slice_pitch, void* ptr, cl_uint n, const cl_event* list,
                        cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_image(q, m); e != CL_SUCCESS) return e;
  if (ptr == nullptr) return CL_INVALID_VALUE;
  if (cl_int e = check_image_region(m, origin, region); e != CL_SUCCESS) return e;
  Rect h;
  if (cl_int e = host_pitches(m, region, row_pitch, slice_pitch, &h); e != CL_SUCCESS) return e;
  if (!readable_by_host(m)) return CL_INVALID_OPERATION;
  const Rect img = image_rect(m, origin, region);
  return enqueue_host(q, CL_COMMAND_READ_IMAGE, blocking, m, n, list, ev, [=]() -> cl_int {
    return with_bytes(m, [&](uint8_t* p) {
      for_each_row(img, h, [&](size_t io, size_t ho, size_t len) { std::memcpy(static_cast<uint8_t*>(ptr) + ho, p + io, len); });
    });
  });
}

cl_int EnqueueWriteImage(cl_command_queue q, cl_mem m, cl_bool blocking, const size_t* origin, const size_t* region,
                         size_t row_pitch, size_t slice_pitch, const void* ptr, cl_uint n, const cl_event* list,
                         cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_image(q, m); e != CL_SUCCESS) return e;
  if (ptr == nullptr) return CL_INVALID_VALUE;
  if (cl_int e = check_image_region(m, origin, region); e != CL_SUCCESS) return e;
  Rect h;
  if (cl_int e = host_pitches(m, region, row_pitch, slice_pitch, &h); e != CL_SUCCESS) return e;
  if (!writable_by_host(m)) return CL_INVALID_OPERATION;
  const Rect img = image_rect(m, origin, region);
  return enqueue_host(q, CL_COMMAND_WRITE_IMAGE, blocking, m, n, list, ev, [=]() -> cl_int {
    return with_bytes(m, [&](uint8_t* p) {
      for_each_row(img, h, [&](size_t io, size_t ho, size_t len) { std::memcpy(p + io, static_cast<const uint8_t*>(ptr) + ho, len); });
    });
  });
}

cl_int EnqueueCopyImage(cl_command_queue q, cl_mem src, cl_mem dst, const size_t* src_origin, const size_t* dst_origin,
                        const size_t* region, cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_image(q, src); e != CL_SUCCESS) return e;
  if (cl_int e = check_image(q, dst); e != CL_SUCCESS) return e;
  if (src->format.image_channel_order != dst->format.image_channel_order ||
      src->format.image_channel_data_type != dst->format.image_channel_data_type)
    return CL_IMAGE_FORMAT_MISMATCH;
  if (cl_int e = check_image_region(src, src_origin, region); e != CL_SUCCESS) return e;
  if (cl_int e = check_image_region(dst, dst_origin, region); e != CL_SUCCESS) return e;
  if (src == dst) {
    bool overlap = true;
    for (int i = 0; i < 3; ++i)
      if (!ranges_overlap(src_origin[i], region[i], dst_origin[i], region[i])) overlap = false;
    if (overlap) return CL_MEM_COPY_OVERLAP;
  }
  const Rect s = image_rect(src, src_origin, region), d = image_rect(dst, dst_origin, region);
  return enqueue_rows_copy(q, CL_COMMAND_COPY_IMAGE, src, s, dst, d, n, list, ev);
}

cl_int EnqueueCopyImageToBuffer(cl_command_queue q, cl_mem src, cl_mem dst, const size_t* src_origin,
                                const size_t* region, size_t dst_offset, cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_image(q, src); e != CL_SUCCESS) return e;
  if (cl_int e = check_buffer(q, dst); e != CL_SUCCESS) return e;
  if (cl_int e = check_image_region(src, src_origin, region); e != CL_SUCCESS) return e;
  Rect b;
  if (cl_int e = buffer_rect(src, dst, dst_offset, region, &b); e != CL_SUCCESS) return e;
  const Rect s = image_rect(src, src_origin, region);
  return enqueue_rows_copy(q, CL_COMMAND_COPY_IMAGE_TO_BUFFER, src, s, dst, b, n, list, ev);
}

cl_int EnqueueCopyBufferToImage(cl_command_queue q, cl_mem src, cl_mem dst, size_t src_offset, const size_t* dst_origin,
                                const size_t* region, cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_buffer(q, src); e != CL_SUCCESS) return e;
  if (cl_int e = check_image(q, dst); e != CL_SUCCESS) return e;
  if (cl_int e = check_image_region(dst, dst_origin, region); e != CL_SUCCESS) return e;
  Rect b;
  if (cl_int e = buffer_rect(dst, src, src_offset, region, &b); e != CL_SUCCESS) return e;
  const Rect d = image_rect(dst, dst_origin, region);
  return enqueue_rows_copy(q, CL_COMMAND_COPY_BUFFER_TO_IMAGE, src, b, dst, d, n, list, ev);
}

cl_int EnqueueFillImage(cl_command_queue q, cl_mem m, const void* color, const size_t* origin, const size_t* region,
                        cl_uint n, const cl_event* list, cl_event* ev) {
  if (!valid(q)) return CL_INVALID_COMMAND_QUEUE;
  if (cl_int e = check_image(q, m); e != CL_SUCCESS) return e;
  if (color == nullptr) return CL_INVALID_VALUE;
  if (cl_int e = check_image_region(m, origin, region); e != CL_SUCCESS) return e;
  uint8_t pixel[16] = {};
  if (!pack_pixel(m->format, color, pixel)) return CL_INVALID_VALUE;
  const size_t e = m->element_size;
  // A fill pattern is a power of two bytes; 3-byte pixels do not exist among OpenCL's formats.
  if ((e & (e - 1)) != 0) return CL_INVALID_VALUE;
  const Rect r = image_rect(m, origin, region);
  return enqueue_device(q, CL_COMMAND_FILL_IMAGE, n, list, ev, [&](Retained& keep) -> cl_int {
    gpup_status st = GPUP_STATUS_SUCCESS;
    if (contiguous(r)) {
      st = GpupKmtCmdFill(q->cmdbuf, m->va() + r.offset(), r.region[0] * r.region[1] * r.region[2], pixel,
                          static_cast<uint32_t>(e));
    } else {
      for_each_row(r, r, [&](size_t off, size_t, size_t len) {
        if (GPUP_SUCCEEDED(st)) st = GpupKmtCmdFill(q->cmdbuf, m->va() + off, len, pixel, static_cast<uint32_t>(e));
      });
    }
    if (GPUP_FAILED(st)) return queue_failure(q, st, "recording an image fill");
    mem_retain(m);
    keep.mems = {m};
    return CL_SUCCESS;
  });
}

void* EnqueueMapImage(cl_command_queue q, cl_mem m, cl_bool blocking, cl_map_flags flags, const size_t* origin,
                      const size_t* region, size_t* row_pitch, size_t* slice_pitch, cl_uint n, const cl_event* list,
                      cl_event* ev, cl_int* errcode_ret) {
  auto fail = [&](cl_int e) -> void* {
    if (errcode_ret) *errcode_ret = e;
    return nullptr;
  };
  if (!valid(q)) return fail(CL_INVALID_COMMAND_QUEUE);
  if (cl_int e = check_image(q, m); e != CL_SUCCESS) return fail(e);
  if (cl_int e = check_image_region(m, origin, region); e != CL_SUCCESS) return fail(e);
  const bool slices = image_has_slices(m->type);
  if (row_pitch == nullptr || (slices && slice_pitch == nullptr)) return fail(CL_INVALID_VALUE);
  if ((flags & CL_MAP_READ) && !readable_by_host(m)) return fail(CL_INVALID_OPERATION);
  if ((flags & (CL_MAP_WRITE | CL_MAP_WRITE_INVALIDATE_REGION)) && !writable_by_host(m))
    return fail(CL_INVALID_OPERATION);
  // As buffers (EnqueueMapBuffer): USE_HOST_PTR maps the application's memory in its own layout;
  // otherwise the backing's bytes, persistently mapped or locked until the unmap.
  const Rect img = image_rect(m, origin, region);
  uint8_t* h = static_cast<uint8_t*>(m->host_ptr);
  const Rect hr = h ? host_map_rect(m, img) : Rect{};
  const size_t host_offset = hr.offset();
  const bool persistent = m->backing->device->persistent_maps;
  const bool hold_lock = h == nullptr && !persistent;
  uint8_t* p = nullptr;
  if (h == nullptr && persistent) {
    if (cl_int e = m->backing->map(&p); e != CL_SUCCESS) return fail(e);
  }
  const bool refresh = h != nullptr && ((flags & CL_MAP_READ) || !(flags & CL_MAP_WRITE_INVALIDATE_REGION));
  auto locked = std::make_shared<uint8_t*>(nullptr);
  cl_int err = enqueue_host(q, CL_COMMAND_MAP_IMAGE, hold_lock ? CL_TRUE : blocking, m, n, list, ev, [=]() -> cl_int {
    if (refresh)
      return with_bytes(m, [&](uint8_t* bytes) {
        for_each_row(img, hr, [&](size_t io, size_t ho, size_t len) { std::memcpy(h + ho, bytes + io, len); });
      });
    if (hold_lock) return m->backing->begin(locked.get());
    return CL_SUCCESS;
  });
  if (err != CL_SUCCESS) return fail(err);
  void* result = h ? h + host_offset : hold_lock ? *locked + img.offset() : p + img.offset();
  const size_t rp = h ? hr.row_pitch : img.row_pitch;
  const size_t sp = h ? hr.slice_pitch : img.slice_pitch;
  *row_pitch = rp;
  if (slice_pitch) *slice_pitch = slices ? sp : 0;
  {
    std::lock_guard lock(m->mu);
    ++m->map_count;
    _cl_mem::MapRecord rec{result, 0, 0, flags, hold_lock, {}, {}};
    std::copy_n(origin, 3, rec.origin);
    std::copy_n(region, 3, rec.region);
    m->maps.push_back(rec);
  }
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return result;
}

}  // namespace gpup::ocl::api
