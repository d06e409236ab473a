// The exported C API of libgpupkmt (gpup/kmt.h): argument checks, the process-wide session
// (connected lazily, once) and the exception boundary. The work is in Session (objects.cpp).
//
// Process-wide state: one Session per process, created by the first thunk or GpupKmtConnect and
// dropped by GpupKmtDisconnect (the next thunk then connects again). A session whose connection
// was lost stays in place, so every later call keeps returning CONNECTION_LOST until
// GpupKmtDisconnect. A forked child starts without a session (its first thunk connects as a new
// guest process); the parent's is abandoned in the child, never touched there.
#include <pthread.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include <fmt/format.h>

#include "guest/kmt/guard.h"
#include "guest/kmt/session.h"

namespace gpup::kmt {
namespace {

struct Global {
  std::mutex mu;                     // serializes connecting; guards `session`
  std::shared_ptr<Session> session;  // null: not connected
};

// Never destroyed: application threads and the receiver may still run while the process exits,
// and the exit then simply closes the channel (the host cleans up after a closed connection).
std::atomic<Global*> g_global{nullptr};

void after_fork_child() {
  // The parent's mutex may be held by a thread that does not exist here, and its channel belongs
  // to the parent: leave both alone and start afresh.
  g_global.store(new Global, std::memory_order_release);
}

Global& global() {
  static Global* const first = [] {
    auto* g = new Global;
    g_global.store(g, std::memory_order_release);
    pthread_atfork(nullptr, nullptr, &after_fork_child);
    return g;
  }();
  (void)first;
  return *g_global.load(std::memory_order_acquire);
}

gpup_status options_from_env(channel::ChannelOptions& o) {
  const char* t = std::getenv("GPUP_TRANSPORT");
  if (!t || !*t || std::strcmp(t, "auto") == 0) {
    o.transport = channel::Transport::kAuto;
  } else if (std::strcmp(t, "shm") == 0) {
    o.transport = channel::Transport::kSharedMemory;
  } else if (std::strcmp(t, "stream") == 0) {
    o.transport = channel::Transport::kStream;
  } else {
    return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPUP_TRANSPORT=\"{}\": expected shm, stream or auto", t));
  }
  return GPUP_STATUS_SUCCESS;
}

// The process's session, connecting first if there is none. `endpoint` NULL or empty: $GPUP_VRD.
gpup_status acquire(const char* endpoint, std::shared_ptr<Session>& out) {
  Global& g = global();
  std::lock_guard lk(g.mu);  // held while connecting: concurrent first calls share one connection
  if (!g.session) {
    std::string ep = endpoint ? endpoint : "";
    if (ep.empty()) {
      const char* env = std::getenv("GPUP_VRD");
      if (!env || !*env)
        return fail(GPUP_STATUS_CONNECTION_LOST,
                    "GPUP_VRD is not set: this process has no VRD endpoint to reach its GPU (gpup run sets it, "
                    "e.g. GPUP_VRD=unix:/run/gpup/vms/NAME/vrd.sock)");
      ep = env;
    }
    channel::ChannelOptions options;
    if (gpup_status st = options_from_env(options); st < 0) return st;
    auto s = Session::connect(ep, options);
    if (!s) return fail(s.error());
    g.session = std::move(*s);
  }
  out = g.session;
  return GPUP_STATUS_SUCCESS;
}

// A thunk: NULL check, session, exception boundary. After a connection loss every thunk fails
// CONNECTION_LOST, including those answered locally (the adapters are gone with the VRD).
template <typename A, typename F>
gpup_status thunk(const char* name, A* args, F&& f, bool after_loss = false) noexcept {
  return guarded(name, [&]() -> gpup_status {
    if (!args) return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{}: NULL argument", name));
    std::shared_ptr<Session> s;
    if (gpup_status st = acquire(nullptr, s); st < 0) return st;
    if (!after_loss && s->lost()) return s->lost_error();
    return f(*s);
  });
}

}  // namespace
}  // namespace gpup::kmt

using gpup::kmt::Session;
using gpup::kmt::thunk;

GPUPKMT_EXPORT const char* GpupKmtGetLastErrorMessage(void) { return gpup::kmt::last_error_text(); }

GPUPKMT_EXPORT gpup_status GpupKmtConnect(const char* endpoint) {
  return gpup::kmt::guarded("GpupKmtConnect", [&]() -> gpup_status {
    std::shared_ptr<Session> s;
    if (gpup_status st = gpup::kmt::acquire(endpoint, s); st < 0) return st;
    // Already connected (to whatever endpoint): fine, unless that connection is lost.
    return s->lost() ? s->lost_error() : GPUP_STATUS_SUCCESS;
  });
}

GPUPKMT_EXPORT void GpupKmtDisconnect(void) {
  (void)gpup::kmt::guarded("GpupKmtDisconnect", []() -> gpup_status {
    std::shared_ptr<Session> s;
    {
      auto& g = gpup::kmt::global();
      std::lock_guard lk(g.mu);
      s = std::move(g.session);
    }
    // Outside the lock: wakes every call in flight with CONNECTION_LOST and joins the receiver.
    // Calls in flight keep the Session alive until they return; the last one frees it.
    if (s) s->shutdown();
    return GPUP_STATUS_SUCCESS;
  });
}

GPUPKMT_EXPORT gpup_status GpupKmtEnumAdapters(GPUPKMT_ENUMADAPTERS* p) {
  return thunk("GpupKmtEnumAdapters", p, [&](Session& s) { return s.enum_adapters(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtOpenAdapterFromLuid(GPUPKMT_OPENADAPTERFROMLUID* p) {
  return thunk("GpupKmtOpenAdapterFromLuid", p, [&](Session& s) { return s.open_adapter(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtCloseAdapter(const GPUPKMT_CLOSEADAPTER* p) {
  return thunk("GpupKmtCloseAdapter", p, [&](Session& s) { return s.close_adapter(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtQueryAdapterInfo(GPUPKMT_QUERYADAPTERINFO* p) {
  return thunk("GpupKmtQueryAdapterInfo", p, [&](Session& s) { return s.query_adapter_info(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtCreateDevice(GPUPKMT_CREATEDEVICE* p) {
  return thunk("GpupKmtCreateDevice", p, [&](Session& s) { return s.create_device(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtDestroyDevice(const GPUPKMT_DESTROYDEVICE* p) {
  return thunk("GpupKmtDestroyDevice", p, [&](Session& s) { return s.destroy_device(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtCreateContext(GPUPKMT_CREATECONTEXT* p) {
  return thunk("GpupKmtCreateContext", p, [&](Session& s) { return s.create_context(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtDestroyContext(const GPUPKMT_DESTROYCONTEXT* p) {
  return thunk("GpupKmtDestroyContext", p, [&](Session& s) { return s.destroy_context(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtCreateAllocation(GPUPKMT_CREATEALLOCATION* p) {
  return thunk("GpupKmtCreateAllocation", p, [&](Session& s) { return s.create_allocation(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtDestroyAllocation(const GPUPKMT_DESTROYALLOCATION* p) {
  return thunk("GpupKmtDestroyAllocation", p, [&](Session& s) { return s.destroy_allocation(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtLock(GPUPKMT_LOCK* p) {
  return thunk("GpupKmtLock", p, [&](Session& s) { return s.lock(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtUnlock(const GPUPKMT_UNLOCK* p) {
  return thunk("GpupKmtUnlock", p, [&](Session& s) { return s.unlock(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtReserveGpuVirtualAddress(GPUPKMT_RESERVEGPUVA* p) {
  return thunk("GpupKmtReserveGpuVirtualAddress", p, [&](Session& s) { return s.reserve_gpu_va(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtMapGpuVirtualAddress(const GPUPKMT_MAPGPUVA* p) {
  return thunk("GpupKmtMapGpuVirtualAddress", p, [&](Session& s) { return s.map_gpu_va(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtFreeGpuVirtualAddress(const GPUPKMT_FREEGPUVA* p) {
  return thunk("GpupKmtFreeGpuVirtualAddress", p, [&](Session& s) { return s.free_gpu_va(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtSubmitCommand(GPUPKMT_SUBMITCOMMAND* p) {
  return thunk("GpupKmtSubmitCommand", p, [&](Session& s) { return s.submit_command(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtCreateSynchronizationObject(GPUPKMT_CREATESYNCHRONIZATIONOBJECT* p) {
  return thunk("GpupKmtCreateSynchronizationObject", p, [&](Session& s) { return s.create_sync_object(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtDestroySynchronizationObject(const GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT* p) {
  return thunk("GpupKmtDestroySynchronizationObject", p, [&](Session& s) { return s.destroy_sync_object(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtSignalSynchronizationObjectFromCpu(const GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT* p) {
  return thunk("GpupKmtSignalSynchronizationObjectFromCpu", p, [&](Session& s) { return s.signal_from_cpu(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtSignalSynchronizationObjectFromGpu(const GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT* p) {
  return thunk("GpupKmtSignalSynchronizationObjectFromGpu", p, [&](Session& s) { return s.signal_from_gpu(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtWaitForSynchronizationObjectFromCpu(const GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT* p) {
  return thunk("GpupKmtWaitForSynchronizationObjectFromCpu", p, [&](Session& s) { return s.wait_from_cpu(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtWaitForSynchronizationObjectFromGpu(const GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT* p) {
  return thunk("GpupKmtWaitForSynchronizationObjectFromGpu", p, [&](Session& s) { return s.wait_from_gpu(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtEscape(GPUPKMT_ESCAPE* p) {
  return thunk("GpupKmtEscape", p, [&](Session& s) { return s.escape(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtGetDeviceState(GPUPKMT_GETDEVICESTATE* p) {
  return thunk("GpupKmtGetDeviceState", p, [&](Session& s) { return s.get_device_state(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtQueryVideoMemoryInfo(GPUPKMT_QUERYVIDEOMEMORYINFO* p) {
  return thunk("GpupKmtQueryVideoMemoryInfo", p, [&](Session& s) { return s.query_video_memory_info(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtQueryStatistics(GPUPKMT_QUERYSTATISTICS* p) {
  return thunk("GpupKmtQueryStatistics", p, [&](Session& s) { return s.query_statistics(p); });
}
GPUPKMT_EXPORT gpup_status GpupKmtGetChannelStats(GPUPKMT_CHANNELSTATS* p) {
  const auto stats = [&](Session& s) -> gpup_status {
    s.channel_stats(p);
    return GPUP_STATUS_SUCCESS;
  };
  return thunk("GpupKmtGetChannelStats", p, stats, /*after_loss=*/true);  // works on a lost connection too
}
