// Events: status from the fence page, waits, user events, callbacks and profiling.
//
// A command's event is (queue, fence value): its status is read from the shared fence page (no
// crossing); a wait crosses once, after flushing the queue if the command is still in the guest's
// command buffer. A user event is a monitored fence of its own that device commands wait for;
// clSetUserEventStatus signals it (one crossing). Callbacks are fired by one guest thread.
#include <algorithm>
#include <condition_variable>
#include <thread>

#include "guest/ocl/icd.h"

namespace gpup::ocl {

cl_int queue_wait(cl_command_queue q, uint64_t value);  // queue.cpp
cl_int queue_flush_to(cl_command_queue q, uint64_t value);

namespace {

// Callbacks pending on events that have not reached their trigger yet.
struct CallbackThread {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<cl_event> watched;  // retained
  bool started = false;
};
CallbackThread& callbacks() {
  static auto* t = new CallbackThread();  // never destroyed: the thread may outlive main
  return *t;
}

void fire_ready(cl_event e, cl_int status) {
  std::vector<std::tuple<cl_int, void(CL_CALLBACK*)(cl_event, cl_int, void*), void*>> ready;
  {
    std::lock_guard lock(e->mu);
    auto it = std::stable_partition(e->callbacks.begin(), e->callbacks.end(),
                                    [&](const auto& cb) { return status > std::get<0>(cb); });
    ready.assign(it, e->callbacks.end());
    e->callbacks.erase(it, e->callbacks.end());
  }
  for (auto& [trigger, fn, data] : ready) fn(e, status < 0 ? status : trigger, data);
}

bool has_callbacks(cl_event e) {
  std::lock_guard lock(e->mu);
  return !e->callbacks.empty();
}

void callback_loop() {
  auto& t = callbacks();
  for (;;) {
    std::vector<cl_event> batch;
    {
      std::unique_lock lock(t.mu);
      t.cv.wait(lock, [&] { return !t.watched.empty(); });
      batch = t.watched;
    }
    for (cl_event e : batch) fire_ready(e, event_status(e));
    std::vector<cl_event> done;
    {
      std::lock_guard lock(t.mu);
      auto it = std::stable_partition(t.watched.begin(), t.watched.end(), [](cl_event e) { return has_callbacks(e); });
      done.assign(it, t.watched.end());
      t.watched.erase(it, t.watched.end());
    }
    for (cl_event e : done) event_release(e);
    // Events of device work complete within microseconds to seconds; a short sleep keeps this
    // thread cheap without a crossing per poll.
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

void watch(cl_event e) {
  auto& t = callbacks();
  {
    std::lock_guard lock(t.mu);
    if (!t.started) {
      std::thread(callback_loop).detach();
      t.started = true;
    }
    event_retain(e);
    t.watched.push_back(e);
  }
  t.cv.notify_one();
}

}  // namespace

void event_retain(cl_event e) { e->refs.fetch_add(1, std::memory_order_relaxed); }

void event_release(cl_event e) {
  if (e->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  if (e->profiling && e->queue) {
    std::lock_guard lock(e->queue->aux_mu);
    auto& list = e->queue->profiled;
    list.erase(std::remove(list.begin(), list.end(), e), list.end());
  }
  if (e->user_fence != 0) {
    GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT d{e->user_fence};
    GpupKmtDestroySynchronizationObject(&d);
  }
  cl_command_queue q = e->queue;
  cl_context c = e->context;
  e->magic = Magic::kDead;
  delete e;
  if (q) queue_release(q);
  context_release(c);
}

// Takes no queue lock: it is called from callbacks and helper threads while other threads wait.
cl_int event_status(cl_event e) {
  if (e->queue == nullptr) return e->user_status.load();
  if (cl_int f = e->failed.load(); f < 0) return f;
  cl_command_queue q = e->queue;
  {
    std::lock_guard lock(q->aux_mu);
    for (const auto& [first, last] : q->failed) {
      if (e->value >= first && e->value <= last) {
        e->failed.store(q->error.load());
        return q->error.load();
      }
    }
  }
  if (q->completed() >= e->value) return CL_COMPLETE;
  GPUPKMT_GETDEVICESTATE ds{q->context->hw_device, 0, GPUP_STATUS_SUCCESS};
  if (GPUP_SUCCEEDED(GpupKmtGetDeviceState(&ds)) && ds.State != GPUPKMT_DEVICESTATE_NORMAL) {
    e->failed.store(CL_OUT_OF_RESOURCES);  // a failed command stays failed
    return CL_OUT_OF_RESOURCES;
  }
  // Work held back by a user event the application has not set is still queued.
  if (q->completed() < q->user_gate) return CL_QUEUED;
  return e->value <= q->submitted_value ? CL_SUBMITTED : CL_QUEUED;
}

cl_int wait_events(cl_uint n, const cl_event* list) {
  bool failed = false;
  for (cl_uint i = 0; i < n; ++i) {
    cl_event e = list[i];
    if (e->queue == nullptr) {
      if (e->user_status.load() > CL_COMPLETE) {
        GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT w{e->user_fence, 1, 0, -1};
        GpupKmtWaitForSynchronizationObjectFromCpu(&w);
      }
    } else if (queue_wait(e->queue, e->value) != CL_SUCCESS) {
      failed = true;
    }
    if (event_status(e) < 0) failed = true;
    event_retain(e);  // a callback may release it
    if (has_callbacks(e)) fire_ready(e, event_status(e));
    event_release(e);
  }
  return failed ? CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST : CL_SUCCESS;
}

}  // namespace gpup::ocl

using namespace gpup::ocl;

namespace gpup::ocl::api {

cl_int WaitForEvents(cl_uint n, const cl_event* list) {
  if (n == 0 || list == nullptr) return CL_INVALID_VALUE;
  for (cl_uint i = 0; i < n; ++i) {
    if (!valid(list[i])) return CL_INVALID_EVENT;
    if (list[i]->context != list[0]->context) return CL_INVALID_CONTEXT;
  }
  return wait_events(n, list);
}

cl_int GetEventInfo(cl_event e, cl_event_info param, size_t n, void* v, size_t* ret) {
  if (!valid(e)) return CL_INVALID_EVENT;
  switch (param) {
    case CL_EVENT_COMMAND_QUEUE: return info_value(n, v, ret, e->queue);
    case CL_EVENT_CONTEXT: return info_value(n, v, ret, e->context);
    case CL_EVENT_COMMAND_TYPE: return info_value(n, v, ret, e->command);
    case CL_EVENT_REFERENCE_COUNT: return info_value(n, v, ret, cl_uint(e->refs.load()));
    case CL_EVENT_COMMAND_EXECUTION_STATUS: {
      // A status query is a flush point: a command still in the guest's buffer must progress.
      if (e->queue) queue_flush_to(e->queue, e->value);
      cl_int s = event_status(e);
      event_retain(e);  // a callback may release it
      if (has_callbacks(e)) fire_ready(e, s);
      event_release(e);
      return info_value(n, v, ret, s);
    }
    default: return CL_INVALID_VALUE;
  }
}

cl_int RetainEvent(cl_event e) {
  if (!valid(e)) return CL_INVALID_EVENT;
  event_retain(e);
  return CL_SUCCESS;
}

cl_int ReleaseEvent(cl_event e) {
  if (!valid(e)) return CL_INVALID_EVENT;
  event_release(e);
  return CL_SUCCESS;
}

cl_event CreateUserEvent(cl_context c, cl_int* errcode_ret) {
  if (!valid(c)) {
    if (errcode_ret) *errcode_ret = CL_INVALID_CONTEXT;
    return nullptr;
  }
  GPUPKMT_CREATESYNCHRONIZATIONOBJECT cs{};
  cs.hDevice = c->hw_device;
  cs.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
  if (gpup_status s = GpupKmtCreateSynchronizationObject(&cs); GPUP_FAILED(s)) {
    log_failure("creating a user event", s);
    if (errcode_ret) *errcode_ret = cl_error_from_status(s);
    return nullptr;
  }
  auto* e = new _cl_event();
  e->context = c;
  context_retain(c);
  e->command = CL_COMMAND_USER;
  e->user_fence = cs.hSyncObject;
  e->user_status = CL_SUBMITTED;
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return e;
}

cl_int SetUserEventStatus(cl_event e, cl_int status) {
  if (!valid(e) || e->queue != nullptr) return CL_INVALID_EVENT;
  if (status > CL_COMPLETE) return CL_INVALID_VALUE;
  // CL_RUNNING marks the status being set, so a second call fails while the signal is on its way.
  cl_int expected = CL_SUBMITTED;
  if (!e->user_status.compare_exchange_strong(expected, CL_RUNNING)) return CL_INVALID_OPERATION;
  // Commands waiting for it run either way; a negative status only shows in its own status.
  GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT sig{e->user_fence, 1, 0};
  if (gpup_status s = GpupKmtSignalSynchronizationObjectFromCpu(&sig); GPUP_FAILED(s)) {
    e->user_status.store(CL_SUBMITTED);
    log_failure("signalling a user event", s);
    return cl_error_from_status(s);
  }
  e->user_status.store(status);
  event_retain(e);  // a callback may release it
  fire_ready(e, status);
  event_release(e);
  return CL_SUCCESS;
}

cl_int SetEventCallback(cl_event e, cl_int trigger, void(CL_CALLBACK* fn)(cl_event, cl_int, void*), void* user_data) {
  if (!valid(e)) return CL_INVALID_EVENT;
  if (fn == nullptr || (trigger != CL_COMPLETE && trigger != CL_SUBMITTED && trigger != CL_RUNNING))
    return CL_INVALID_VALUE;
  {
    std::lock_guard lock(e->mu);
    e->callbacks.emplace_back(trigger, fn, user_data);
  }
  if (e->queue) queue_flush_to(e->queue, e->value);  // the callback must come without a later flush
  const cl_int s = event_status(e);
  event_retain(e);  // a callback may release it
  if (s <= trigger) fire_ready(e, s);
  if (has_callbacks(e)) watch(e);
  event_release(e);
  return CL_SUCCESS;
}

cl_int GetEventProfilingInfo(cl_event e, cl_profiling_info param, size_t n, void* v, size_t* ret) {
  if (!valid(e)) return CL_INVALID_EVENT;
  if (e->queue == nullptr || !e->profiling) return CL_PROFILING_INFO_NOT_AVAILABLE;
  if (event_status(e) != CL_COMPLETE) return CL_PROFILING_INFO_NOT_AVAILABLE;
  queue_retire(e->queue);  // stamps the end of what completed
  const uint64_t end = e->t_end.load();
  if (end == 0) return CL_PROFILING_INFO_NOT_AVAILABLE;
  switch (param) {
    case CL_PROFILING_COMMAND_QUEUED: return info_value(n, v, ret, cl_ulong(e->t_queued));
    case CL_PROFILING_COMMAND_SUBMIT: return info_value(n, v, ret, cl_ulong(std::max(e->t_queued, e->t_submit)));
    case CL_PROFILING_COMMAND_START:
      return info_value(n, v, ret, cl_ulong(std::max({e->t_queued, e->t_submit, e->t_start})));
    case CL_PROFILING_COMMAND_END:
    case CL_PROFILING_COMMAND_COMPLETE: return info_value(n, v, ret, cl_ulong(end));
    default: return CL_INVALID_VALUE;
  }
}

}  // namespace gpup::ocl::api
