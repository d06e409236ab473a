// Internal to libgpupkmt: the connection of one guest process to its VM's worker (gpup-vmwp) and
// the guest-side object state that lets many thunks finish without crossing: local adapter
// handles, Lock refcounts, fence values in a shared page, host-signalled CPU waits, cached device
// state (the crossing budget at the head of gpup/kmt.h).
//
// Threads
//   - Any number of application threads call Session methods concurrently.
//   - One receiver thread per Session (started by connect(), joined by shutdown()) reads every
//     message from the host: it completes waiting callers by transaction id and applies
//     notifications. It never blocks on anything but the channel and mu_.
//   - mu_ guards every table below and the lost state; it is held only for short, non-blocking
//     sections, never across a channel call. A LockState::mu is held across the round trips of
//     Lock/Unlock/DestroyAllocation of that one allocation; lock order is LockState::mu -> mu_.
//
// Errors
//   Every method returning gpup_status has, when it returns a failure (< 0), stored the
//   explanation as this thread's last error (fail()). Positive statuses (TIMEOUT) are outcomes.
//
// Ownership
//   The Session owns the channel, the receiver thread, the fence page mapping and every Lock
//   mapping; all are released by the destructor (after shutdown()). Callers hold it by
//   shared_ptr for the duration of a thunk, so a concurrent GpupKmtDisconnect never frees it
//   under them: they get CONNECTION_LOST instead.
#pragma once

#include <spdlog/logger.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "channel/channel.h"
#include "common/result.h"
#include "gpup/kmt.h"
#include "protocol/codec.h"

namespace gpup::kmt {

// --- errors and logging --------------------------------------------------------------------------

// Stores `text` (or the generic text of `status` when empty) as the calling thread's last error
// and returns `status`.
gpup_status fail(gpup_status status, std::string text);
inline gpup_status fail(const Error& e) { return fail(e.status, e.message); }
// The calling thread's last error text; valid until the next failure on this thread.
const char* last_error_text();
// Restores a saved text (after a best-effort cleanup call that may have overwritten it).
void set_last_error_text(std::string text);

// The library's own logger ("gpupkmt", stderr, level from $GPUP_LOG, default warn). It is not
// registered with spdlog, so it never clashes with the application's loggers.
spdlog::logger& logger();

// --- memory mappings ------------------------------------------------------------------------------

// An owned mmap() region, unmapped on destruction or reset().
class Mapping {
 public:
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;
  ~Mapping() { reset(); }

  // Private zero-filled read/write memory of `len` bytes (len > 0). NO_MEMORY on failure.
  static gpup_status anonymous(size_t len, Mapping& out);
  // MAP_SHARED view of the first `len` bytes of `fd` (len > 0). The file must be at least `len`
  // bytes long (checked with fstat, so a short section cannot SIGBUS us later): else
  // PROTOCOL_ERROR naming `what`.
  static gpup_status shared(int fd, size_t len, int prot, const char* what, Mapping& out);

  void* data() const { return addr_; }
  size_t size() const { return len_; }
  explicit operator bool() const { return addr_ != nullptr; }
  void reset();

 private:
  void* addr_ = nullptr;
  size_t len_ = 0;
};

// --- replies -------------------------------------------------------------------------------------

// A reply to a SYNC request. `msg` refers into `bytes` (already checked by proto::decode). For an
// error reply `msg.fixed` is empty and `msg.tail` is the host's text (or, for BUILD_FAILED, the
// build output).
struct Reply {
  std::vector<uint8_t> bytes;
  proto::Message msg;

  template <typename T>
  T fixed() const {
    return msg.as<T>();
  }
  std::span<const uint8_t> tail() const { return msg.tail; }
  gpup_status status() const { return msg.header.status; }
};

// Runs on the receiver thread, with mu_ held, when a successful reply (status >= 0, fixed part
// present) for the call arrives, before the caller is woken. Used to register created objects and
// seed fence copies in order with the notifications that follow the reply (a ContextError for a
// context whose CreateContext reply the caller has not yet seen). Must not block; must check the
// reply itself (the caller validates it again and reports errors).
using OnReply = std::function<void(const proto::Message&)>;

// --- guest-side objects -------------------------------------------------------------------------

struct DeviceObj {
  uint64_t adapter_luid = 0;
  // Cached execution state (GetDeviceState). Valid while the fence page's device_state_counter
  // equals state_counter; notifications overwrite it.
  uint32_t state = GPUPKMT_DEVICESTATE_NORMAL;
  gpup_status reason = GPUP_STATUS_SUCCESS;
  uint32_t state_counter = 0;
  // First error a ContextError reported on one of the device's contexts (sticky): the device then
  // reports RESET with this reason and its CPU waits fail with it.
  gpup_status error = GPUP_STATUS_SUCCESS;
  std::string error_text;
};

struct ContextObj {
  uint32_t device = 0;
  gpup_status error = GPUP_STATUS_SUCCESS;  // sticky, from ContextError
  std::string error_text;
};

// Lock state of one allocation. `mu` serializes Lock/Unlock/Destroy of this allocation (held
// across their round trips); the fields are guarded by it.
struct LockState {
  std::mutex mu;
  uint32_t count = 0;     // nesting depth; 0 = not locked
  bool copied = false;    // stream: `map` is a private copy written back by the last Unlock
  bool destroyed = false; // the allocation is gone; every later call fails INVALID_HANDLE
  uint64_t size = 0;      // as the host reported it at Lock
  Mapping map;
};

struct AllocationObj {
  uint32_t device = 0;
  std::shared_ptr<LockState> lock = std::make_shared<LockState>();
};

struct SyncObj {
  uint32_t device = 0;
  uint32_t slot = 0;
};

// A shared section this process owns and has registered with the host (RegisterSection): bulk
// private data and output of CreateAllocation/Escape travel through it. Used by one call at a
// time; the mapping (and with it the memory) goes with the object.
struct GuestSection {
  uint32_t handle = 0;  // the host's section handle
  uint64_t size = 0;
  Mapping map;
};

// --- the session -----------------------------------------------------------------------------------

class Session {
 public:
  // Connects to `endpoint`, starts the receiver thread and runs Hello (version negotiation,
  // adapter list, fence page). Errors: CONNECTION_LOST (no VRD answers), VERSION_MISMATCH and any
  // other error reply to Hello (with the host's text), PROTOCOL_ERROR (a reply that does not
  // validate), INVALID_PARAMETER (bad endpoint). The error text is also the thread's last error.
  static Result<std::shared_ptr<Session>> connect(const std::string& endpoint,
                                                  const channel::ChannelOptions& options);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Fails every pending and later call with CONNECTION_LOST, closes the channel and joins the
  // receiver thread. Idempotent; any thread except the receiver.
  void shutdown();
  // True once the connection is lost (or shut down): every thunk then fails CONNECTION_LOST.
  bool lost() const { return lost_flag_.load(std::memory_order_acquire); }
  gpup_status lost_error();  // fail(CONNECTION_LOST, the recorded reason)

  // --- thunks (see gpup/kmt.h for the contracts; arguments already checked non-NULL) ------------
  gpup_status enum_adapters(GPUPKMT_ENUMADAPTERS* a);
  gpup_status open_adapter(GPUPKMT_OPENADAPTERFROMLUID* a);
  gpup_status close_adapter(const GPUPKMT_CLOSEADAPTER* a);
  gpup_status query_adapter_info(GPUPKMT_QUERYADAPTERINFO* a);
  gpup_status create_device(GPUPKMT_CREATEDEVICE* a);
  gpup_status destroy_device(const GPUPKMT_DESTROYDEVICE* a);
  gpup_status create_context(GPUPKMT_CREATECONTEXT* a);
  gpup_status destroy_context(const GPUPKMT_DESTROYCONTEXT* a);
  gpup_status create_allocation(GPUPKMT_CREATEALLOCATION* a);
  gpup_status destroy_allocation(const GPUPKMT_DESTROYALLOCATION* a);
  gpup_status lock(GPUPKMT_LOCK* a);
  gpup_status unlock(const GPUPKMT_UNLOCK* a);
  gpup_status reserve_gpu_va(GPUPKMT_RESERVEGPUVA* a);
  gpup_status map_gpu_va(const GPUPKMT_MAPGPUVA* a);
  gpup_status free_gpu_va(const GPUPKMT_FREEGPUVA* a);
  gpup_status submit_command(GPUPKMT_SUBMITCOMMAND* a);
  gpup_status create_sync_object(GPUPKMT_CREATESYNCHRONIZATIONOBJECT* a);
  gpup_status destroy_sync_object(const GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT* a);
  gpup_status signal_from_cpu(const GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT* a);
  gpup_status signal_from_gpu(const GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT* a);
  gpup_status wait_from_cpu(const GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT* a);
  gpup_status wait_from_gpu(const GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT* a);
  gpup_status escape(GPUPKMT_ESCAPE* a);
  gpup_status get_device_state(GPUPKMT_GETDEVICESTATE* a);
  gpup_status query_video_memory_info(GPUPKMT_QUERYVIDEOMEMORYINFO* a);
  gpup_status query_statistics(GPUPKMT_QUERYSTATISTICS* a);
  void channel_stats(GPUPKMT_CHANNELSTATS* out) const;

  // Guest-local adapter handles: kAdapterHandleBase + index into the Hello list.
  static constexpr GPUPKMT_HANDLE kAdapterHandleBase = 0x1000;
  // Upper bound on the fence slots a Hello reply may announce (the stream transport keeps a local
  // array of this many values).
  static constexpr uint32_t kMaxFenceSlots = 1u << 22;
  // How long to wait for a section fd the host says it has passed (it is sent before the reply).
  static constexpr int kFdTimeoutMs = 10000;
  // Shared sections kept for reuse once a call is done, and the largest one kept; sizes are
  // rounded up to kSectionGranularity so that sections of similar calls are interchangeable.
  static constexpr size_t kMaxIdleSections = 2;
  static constexpr uint64_t kMaxCachedSectionBytes = uint64_t{16} << 20;
  static constexpr uint64_t kSectionGranularity = uint64_t{256} << 10;

 private:
  // A SYNC request waiting for its reply; lives on the caller's stack, registered in pending_.
  // Fields guarded by mu_; the receiver (or lose()) sets `done` and notifies with mu_ held.
  struct PendingCall {
    proto::Op op{};
    OnReply on_reply;
    bool done = false;
    bool lost = false;  // completed by lose(), no reply
    std::vector<uint8_t> bytes;
    proto::Message msg;
    std::condition_variable cv;
  };
  // A CPU wait registered with the host (WaitFromCpu event_id); on the waiter's stack, registered
  // in waiters_ until it returns. Fields guarded by mu_.
  struct Waiter {
    uint64_t event_id = 0;
    GPUPKMT_HANDLE sync_object = 0;
    GPUPKMT_HANDLE device = 0;
    bool done = false;
    gpup_status status = GPUP_STATUS_SUCCESS;
    std::string text;
    std::condition_variable cv;
  };

  explicit Session(std::unique_ptr<channel::Channel> ch);
  gpup_status hello();

  // Sends a SYNC request and waits (without limit; CONNECTION_LOST ends it) for its reply. Returns
  // the reply status: SUCCESS; PENDING only when `allow_pending`; an error (< 0) for an error
  // reply (last error = its text; `out` still holds the reply, e.g. a build log) or a transport
  // failure. Any other positive status is a PROTOCOL_ERROR.
  template <typename Req>
  gpup_status call(const Req& req, std::span<const uint8_t> tail, Reply& out, OnReply on_reply = {},
                   bool allow_pending = false) {
    static_assert(proto::RequestTraits<Req>::kind == proto::Kind::SYNC);
    auto enc = proto::encode_request(req, next_txn_.fetch_add(1, std::memory_order_relaxed), tail);
    if (!enc) return fail(enc.error());
    return exchange(proto::RequestTraits<Req>::op, *enc, out, std::move(on_reply), allow_pending);
  }
  // Sends an ASYNC message (no reply).
  template <typename Req>
  gpup_status post(const Req& req, std::span<const uint8_t> tail = {}) {
    static_assert(proto::RequestTraits<Req>::kind == proto::Kind::ASYNC);
    auto enc = proto::encode_request(req, 0, tail);
    if (!enc) return fail(enc.error());
    return send_encoded(*enc);
  }
  gpup_status exchange(proto::Op op, const proto::Encoded& enc, Reply& out, OnReply on_reply,
                       bool allow_pending);

  // Where one CreateAllocation/Escape's private data and output travel: inline, or (what does
  // not fit a message) in a shared section held for the duration of the call. The destructor
  // hands the section back (cache or unregister).
  struct Bulk {
    explicit Bulk(Session* s) : session(s) {}
    ~Bulk();
    Bulk(const Bulk&) = delete;
    Bulk& operator=(const Bulk&) = delete;
    Session* session;
    std::span<const uint8_t> tail;  // inline private data
    uint32_t inline_output = 0;     // the request's output_size
    proto::SectionRef private_data{};
    proto::SectionRef output{};
    std::unique_ptr<GuestSection> section;
  };
  // Plans a call's bulk data (see "Bulk data" in gpup/kmt.h): MESSAGE_TOO_LARGE for private data
  // over the limit, or on a stream channel over a message; otherwise a section is acquired and the
  // private data copied into it when needed.
  gpup_status prepare_bulk(proto::Op op, std::span<const uint8_t> priv, uint32_t out_capacity, Bulk& b);
  // Copies section output (`written` bytes, no reply tail allowed) to the caller's buffer.
  gpup_status copy_section_output(const char* op, uint32_t written, std::span<const uint8_t> tail, const Bulk& b,
                                  void* out, uint32_t* out_written);
  // An idle section of at least `size` bytes, or a new one (memfd, sealed, passed, registered).
  gpup_status acquire_section(uint64_t size, std::unique_ptr<GuestSection>& out);
  // Keeps the section for reuse, or unregisters it (cache full, too large, or the session lost).
  // Leaves the thread's last error text as it was.
  void release_section(std::unique_ptr<GuestSection> s);
  gpup_status send_encoded(const proto::Encoded& enc);

  // Receiver thread.
  void receive_loop();
  // Hands a reply to its caller; false (connection to be dropped) if no call waits for it.
  bool deliver(std::vector<uint8_t>&& bytes, const proto::Message& m, std::string& why);
  void on_notification(const proto::Message& m);
  // Marks the session lost (first caller wins; `why` becomes the text of every CONNECTION_LOST),
  // wakes every waiting call and CPU wait, shuts the channel down. Logged unless `expected`.
  void lose(const std::string& why, bool expected = false);

  // --- helpers; mu_ held where the name ends in _locked --------------------------------------------
  bool adapter_luid_locked(GPUPKMT_HANDLE h, uint64_t* luid) const;
  // INVALID_HANDLE, or OBJECT_TYPE_MISMATCH when h names an object of another type. mu_ held.
  gpup_status bad_handle_locked(const char* kind, GPUPKMT_HANDLE h) const;
  template <typename Req>
  gpup_status gpu_fence_op(GPUPKMT_HANDLE context, GPUPKMT_HANDLE sync_object, uint64_t value);
  gpup_status adapter_luid(GPUPKMT_HANDLE h, uint64_t* luid);
  // Why waits on the device's sync objects fail (SUCCESS if they do not).
  static gpup_status device_failure(const DeviceObj& d, std::string* text);
  void complete_waiter_locked(Waiter& w, gpup_status status, const std::string& text);
  void fail_waiters_locked(const std::function<bool(const Waiter&)>& match, gpup_status status,
                           const std::string& text);
  uint64_t fence_value(uint32_t slot) const;
  // Sleeps on the slot (shared page or local copy) until it reaches value (true) or `until`.
  bool sleep_on_page(uint32_t slot, uint64_t value, std::chrono::steady_clock::time_point until) const;
  // How long a CPU wait sleeps on its fence slot before it asks the host to signal it:
  // $GPUP_FENCE_SLEEP_MS (0 .. 60000; 0: ask at once), 20 ms by default. Set at construction.
  std::chrono::milliseconds page_wait_{20};
  void raise_local_fence(uint32_t slot, uint64_t value);  // stream only: atomic max
  gpup_status map_section(uint64_t section, uint64_t size, Mapping& out);
  gpup_status fetch_copy(GPUPKMT_HANDLE allocation, uint64_t size, Mapping& out);
  gpup_status write_back(GPUPKMT_HANDLE allocation, const Mapping& data, uint64_t size);
  void unlock_quietly(GPUPKMT_HANDLE device, GPUPKMT_HANDLE allocation);

  // Immutable after connect().
  std::unique_ptr<channel::Channel> ch_;
  bool shares_memory_ = false;
  uint32_t version_ = 0;
  std::vector<proto::AdapterDesc> adapters_;
  uint32_t fence_slots_ = 0;
  Mapping fence_page_;                          // shared memory: the host's fence page (read-only)
  std::unique_ptr<uint64_t[]> local_fences_;    // otherwise: values kept from notifications
  const uint64_t* fence_values_ = nullptr;      // one of the two
  const uint32_t* page_state_counter_ = nullptr;  // in the fence page; nullptr without one

  std::thread receiver_;
  std::mutex shutdown_mu_;  // serializes shutdown()/join

  std::atomic<uint64_t> next_txn_{1};
  std::atomic<uint64_t> next_event_{1};
  std::atomic<uint64_t> next_submission_{1};
  std::atomic<uint64_t> messages_sent_{0};
  std::atomic<uint64_t> round_trips_{0};
  std::atomic<uint64_t> notifications_{0};
  std::atomic<bool> lost_flag_{false};  // mirrors lost_ for lock-free checks
  std::atomic<uint64_t> next_fd_id_{1};  // ids of fds passed to the host

  // Idle shared sections (at most kMaxIdleSections). sections_mu_ is a leaf lock, never held
  // across a channel call.
  std::mutex sections_mu_;
  std::vector<std::unique_ptr<GuestSection>> idle_sections_;

  mutable std::mutex mu_;
  bool lost_ = false;
  std::string lost_text_;
  std::unordered_map<uint64_t, PendingCall*> pending_;  // by txn; entries live on callers' stacks
  std::unordered_map<uint64_t, Waiter*> waiters_;       // by event id; on waiters' stacks
  std::vector<uint32_t> adapter_refs_;                  // open count per Hello adapter
  std::unordered_map<GPUPKMT_HANDLE, DeviceObj> devices_;
  std::unordered_map<GPUPKMT_HANDLE, ContextObj> contexts_;
  std::unordered_map<GPUPKMT_HANDLE, AllocationObj> allocations_;
  std::unordered_map<GPUPKMT_HANDLE, SyncObj> syncs_;
};

}  // namespace gpup::kmt
