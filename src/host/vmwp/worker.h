// gpup-vmwp core: the VRD backend of one VM partition.
//
// The worker terminates the channels of its VM's guest processes, decodes and validates every
// message, translates guest handles and GPU virtual addresses into KMD objects, and drives the
// device through the KMD DDI. It keeps, per guest process, a handle table, a GPU VA space and a
// KMD "VM process" object; per context, a queue that orders submissions, GPU waits and GPU
// signals; per sync object, a monitored fence whose value is published in the guest's fence page.
//
// Threads and locking
//   - One thread per guest connection calls GuestProcess::handle() for each message it receives.
//   - KMD completion callbacks (any KMD thread) only enqueue; the completion thread applies them.
//   - Worker::mu_ guards the whole object graph of every process; handlers and the completion
//     thread hold it while they run. Messages to guests are sent with it held (see the note in
//     worker.cpp about guests that stop reading).
//
// Object graph: process -> devices -> {contexts, allocations, sync objects}, and process ->
// sections (guest-owned shared memory for bulk private data and output). Destroying a device
// destroys its children (contexts first, so no work still uses an allocation); closing a process
// (disconnect, or the guest died) destroys everything it had, in that order, then unmaps its
// sections, and then destroys its KMD process object.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "common/result.h"
#include "gpup/ddi.h"
#include "host/control/protocol.h"
#include "host/kmd_loader/kmd_loader.h"
#include "host/vmwp/handle_table.h"
#include "host/vmwp/tdr_watchdog.h"
#include "host/vmwp/va_space.h"
#include "protocol/codec.h"

namespace gpup::vmwp {

// The partition and adapter this worker serves: gpupd's configure message (control/protocol.h),
// converted by worker_config(); tests build one directly.
struct WorkerConfig {
  std::string vm_name;
  GPUPDDI_GUID vm_guid{};
  std::string adapter_name;
  uint64_t adapter_luid = 0;
  std::string kmd;         // plugin path or name
  std::string kmd_config;  // "key=value" lines
  uint64_t min_vram = 0;
  uint64_t max_vram = 0;   // 0: the device's memory
  uint64_t optimal_vram = 0;
  uint32_t compute_weight = control::kDefaultComputeWeight;
  uint32_t max_compute = control::kMaxComputePercent;
  bool secure = false;
  // Device work running longer than this is reset (TdrWatchdog); 0: work is not timed.
  uint32_t tdr_delay_ms = control::kDefaultTdrDelayMs;
  // A program build running longer than this resets the partition too; 0: builds are not timed.
  uint32_t build_timeout_s = control::kDefaultBuildTimeoutS;
};

// From a configure message configure_from_json accepted (names, GUID and ranges checked there).
WorkerConfig worker_config(const control::ConfigureMessage& m);
std::string guid_to_string(const GPUPDDI_GUID& g);

// gpupd's arbiter of the adapter's memory, as the worker reaches it (main.cpp: the control
// channel). The partition uses its min without asking; above it, it must hold a grant. hold is
// absolute (the min included): what gpupd counts for this partition.
class VramBroker {
 public:
  struct Grant {
    bool granted = false;     // hold covers need
    uint64_t hold = 0;        // what the partition holds now
    uint64_t borrowable = 0;  // what it could add right now
    std::string why;          // when refused: the numbers
  };
  virtual ~VramBroker() = default;
  // Round trips to gpupd (an error when it does not answer): to hold `want` in all, at least
  // `need`; or only what is held and borrowable now.
  virtual Result<Grant> ask(uint64_t need, uint64_t want) = 0;
  virtual Result<Grant> query() = 0;
  // Gives back everything above hold; does not wait for the answer.
  virtual void release(uint64_t hold) = 0;
};

// gpupd's device-time scheduler (gpupd/vidsch.h), as the worker reaches it (main.cpp: the control
// channel). Without a grant the worker hands no work to the KMD; it says it wants the device, and
// Worker::on_grant() / on_yield() bring gpupd's answers. Calls come with Worker::mu_ held and must
// not block.
class DeviceTimeLink {
 public:
  virtual ~DeviceTimeLink() = default;
  virtual void want() = 0;
  // busy_us: all the time the worker had device work in flight so far; more: work is waiting.
  virtual void release(uint64_t busy_us, bool more) = 0;
  // Device work ran past the TDR delay and the partition's guests were told; what is the tdr event
  // (control::TdrEvent, encoded): the context, its process and how long it ran. The worker cannot
  // take its work back from a KMD without pfnResetEngine, so this ends the process: it does not
  // return.
  [[noreturn]] virtual void reset(const nlohmann::json& what) = 0;
};

// Borrowing goes in steps of at least this much. Memory is given back (hysteresis) once, for two
// release ticks in a row, more than two steps above what is in use stay unused (one step is kept),
// or everything borrowed is unused (use back within the min).
inline constexpr uint64_t kVramGranule = 16ull << 20;

// How the worker reaches one guest process: the channel, seen through what the core needs.
class GuestLink {
 public:
  virtual ~GuestLink() = default;
  virtual gpup_status send(const proto::Encoded& msg) = 0;  // thread-safe
  virtual gpup_status send_fd(uint64_t id, int fd) = 0;
  // Collects the fd the guest passed with `id` (Channel::receive_fd). NOT_SUPPORTED without fd
  // passing; TIMEOUT when none arrived in time.
  virtual gpup_status receive_fd(uint64_t id, UniqueFd& out, int timeout_ms) {
    (void)id, (void)out, (void)timeout_ms;
    return GPUP_STATUS_NOT_SUPPORTED;
  }
  virtual bool shares_memory() const = 0;
  virtual int peer_pid() const { return -1; }
};

struct Allocation;
struct Section;
struct Device;
struct Context;
struct SyncObject;
class Worker;

// Fence page shared with one guest (read-only there): header, then fence values.
class FencePage {
 public:
  static constexpr uint32_t kSlots = 4096;
  Status create();
  int fd() const { return fd_.get(); }
  // The guest maps the page: every set() then also wakes guest threads sleeping on the slot.
  void shared_with_guest() { shared_ = true; }
  void set(uint32_t slot, uint64_t value);
  void bump_state_counter(uint32_t counter);
  ~FencePage();

 private:
  UniqueFd fd_;
  void* map_ = nullptr;
  size_t size_ = 0;
  bool shared_ = false;
};

struct Counts {
  uint32_t processes = 0, devices = 0, contexts = 0, allocations = 0, sync_objects = 0, va_mappings = 0;
  uint32_t sections = 0;
  uint64_t vram_used = 0, submissions = 0, faults = 0, section_bytes = 0;
};

class GuestProcess {
 public:
  GuestProcess(Worker& worker, std::unique_ptr<GuestLink> link, uint64_t id);
  ~GuestProcess();

  // Decodes, validates and executes one message from the guest, replying to SYNC ones. Returns
  // an error only when the connection must be dropped (e.g. no Hello first).
  Status handle(std::span<const uint8_t> bytes);
  // Destroys everything the process holds. Idempotent.
  void close();

  uint64_t id() const { return id_; }
  // Adds this process (one process, its objects by type, mappings, submissions, faults) to c;
  // memory is left to the caller. Worker::mu_ held.
  void add_counts(Counts& c) const;
  bool open() const { return hello_done_ && !closed_; }

 private:
  friend class Worker;
  // A reply's fixed part and tail; status is SUCCESS or a positive non-error (PENDING).
  struct Reply {
    std::vector<uint8_t> fixed;
    std::vector<uint8_t> tail;
    gpup_status status = GPUP_STATUS_SUCCESS;
  };
  template <typename T>
  static Reply reply(const T& fixed, std::vector<uint8_t> tail = {}, gpup_status status = GPUP_STATUS_SUCCESS) {
    Reply r;
    r.fixed.assign(reinterpret_cast<const uint8_t*>(&fixed), reinterpret_cast<const uint8_t*>(&fixed) + sizeof fixed);
    r.tail = std::move(tail);
    r.status = status;
    return r;
  }

  // Handlers run with Worker::mu_ held. Each returns the reply or an error for the guest.
  Result<Reply> on_sync(const proto::Message& m);
  void on_async(const proto::Message& m);
  Status on_hello(const proto::Message& m);
  template <typename T>
  Result<Reply> destroy_object(uint32_t handle, void (GuestProcess::*destroy)(const std::shared_ptr<T>&));
  void send_reply(const proto::Message& m, const Reply& r);

  Status check_adapter(uint64_t luid) const;
  // Guest-owned sections (see schema.def RegisterSection).
  Result<Reply> register_section(const proto::Message& m);
  void destroy_section_locked(const std::shared_ptr<Section>& s);
  // Private data of a CreateAllocation/Escape: the tail, or a private copy of the referenced
  // section bytes (copied once, before the KMD sees them: the guest may write the section at any
  // time). `what` names the request in errors.
  Result<std::span<const uint8_t>> private_data(const proto::Message& m, const proto::SectionRef& ref,
                                                std::vector<uint8_t>& copy, const char* what);
  // Checks an output reference (or the inline capacity) and returns the capacity; `out_section`
  // is set when the output goes to a section.
  Result<uint32_t> output_capacity(const proto::SectionRef& ref, uint32_t inline_size, size_t inline_room,
                                   std::shared_ptr<Section>& out_section, const char* what);
  Result<std::shared_ptr<Section>> section_range(const proto::SectionRef& ref, const char* what, const char* field);
  void destroy_device_locked(const std::shared_ptr<Device>& dev);
  void destroy_context_locked(const std::shared_ptr<Context>& ctx);
  void destroy_allocation_locked(const std::shared_ptr<Allocation>& alloc);
  void destroy_sync_locked(const std::shared_ptr<SyncObject>& sync);
  void fault_context_locked(const std::shared_ptr<Context>& ctx, gpup_status status, uint64_t submission_id,
                            const std::string& why);
  void submit_locked(const proto::Message& m);
  void notify(proto::Op op, const void* fixed, size_t size, std::span<const uint8_t> tail = {});
  void publish_fence_locked(SyncObject& s);

  Worker& w_;
  std::unique_ptr<GuestLink> link_;
  const uint64_t id_;
  bool hello_done_ = false;
  bool closed_ = false;
  uint32_t version_ = 0;
  uint32_t pid_ = 0;
  std::string name_;
  GPUPDDI_HANDLE kmd_process_ = nullptr;
  HandleTable handles_;
  VaSpace va_;
  FencePage fence_page_;
  std::vector<bool> fence_slots_used_;
  uint64_t next_section_ = 2;  // section 1 is the fence page
  uint64_t vram_used_ = 0;
  uint64_t submissions_ = 0;
  uint64_t faults_ = 0;
  size_t cpu_waits_ = 0;
  uint32_t unknown_ops_logged_ = 0;
  uint32_t sections_ = 0;        // registered guest sections
  uint64_t section_bytes_ = 0;   // their bytes
  // The fd of the RegisterSection being handled, collected by handle() before Worker::mu_ is
  // taken (so a guest that never sends it stalls only its own connection).
  UniqueFd incoming_fd_;
  // Why gpupd refused device memory for the CreateAllocation being handled (set with the fd above).
  std::string vram_refusal_;
  gpup_status incoming_fd_status_ = GPUP_STATUS_SUCCESS;
  std::string incoming_fd_error_;
  std::set<std::shared_ptr<Device>> devices_;  // roots of the object graph
};

class Worker {
 public:
  explicit Worker(WorkerConfig config);
  ~Worker();

  // Loads the KMD, starts the adapter, checks it may be partitioned, creates the worker-process
  // object (VirtualMachineWorkerProcess) and calls SetVirtualMachineData.
  Status start();
  // New partition settings: SetVirtualMachineData again.
  Status update(const WorkerConfig& config);
  // Closes every guest process and stops the adapter.
  void stop();

  // Device memory above the min goes through broker (not owned; set before guests connect, kept
  // until stop()). Without one the partition may grow to its max unasked.
  void set_vram_broker(VramBroker* broker) { broker_ = broker; }
  // Called regularly from the control loop: gives gpupd back memory borrowed and no longer used.
  void release_idle_vram();

  // Device time comes from gpupd's scheduler (not owned; set before guests connect). Without a link
  // the worker always holds the device, and a hang the TDR watchdog (started by start() when
  // tdr_delay_ms is set) finds is only logged: resetting the partition is the link's job.
  void set_device_time_link(DeviceTimeLink* link);
  // gpupd's lines (vidsch.h): the device is this partition's; release it once `after` has passed
  // since the grant and the work in flight is done (or at once when idle, with if_idle).
  void on_grant();
  void on_yield(std::chrono::microseconds after, bool if_idle);

  std::shared_ptr<GuestProcess> connect(std::unique_ptr<GuestLink> link);
  void disconnect(const std::shared_ptr<GuestProcess>& p);

  nlohmann::json stats_json();
  Counts totals();
  const WorkerConfig& config() const { return config_; }
  const kmd::AdapterCaps& caps() const { return caps_; }

 private:
  friend class GuestProcess;
  friend struct Context;

  static void on_log(GPUPDDI_SYSTEM_HANDLE sys, int level, const char* msg);
  static void on_complete(GPUPDDI_SYSTEM_HANDLE ctx, uint64_t submission, gpup_status status);
  void completion_loop();
  void drain_completions_locked();
  void apply_completion_locked(uint64_t context_id, uint64_t submission, gpup_status status);
  void pump_locked(Context& ctx);
  // Device time (DeviceTimeLink): may work enter the KMD now; ask for the device; give it back
  // when the yield asks for it and nothing is in flight.
  bool may_submit_locked();
  void need_device_locked();
  void maybe_release_locked();
  // Wakes the completion thread at `at` (it re-checks the yield then); nullopt: no timed wake.
  void set_wakeup_locked(std::optional<std::chrono::steady_clock::time_point> at);
  bool work_ready_locked() const;
  void inflight_changed_locked(Context& ctx, int delta);
  // The TDR watchdog found ctx running too long: tell every guest, then reset (ends the process).
  void on_hang(const TdrWatchdog::Hang& hang);
  // A program build (the KMD's CreateAllocation of a program, for message m of p) is timed by the
  // watchdog from build_began_locked() to build_ended(id) (id 0: not timed). One that runs past
  // the partition's build timeout cannot be stopped inside the KMD: on_build_hang() answers its
  // guest and resets the partition, and build_ended() of that build never returns.
  uint64_t build_began_locked(GuestProcess& p, const proto::Message& m);
  void build_ended(uint64_t id);
  void on_build_hang(const TdrWatchdog::Hang& hang);
  uint64_t busy_ns_locked() const;
  void fence_changed_locked(SyncObject& s);
  Counts totals_locked();
  // What the partition may use now: its max, or, with a broker, min(max, max(min, hold)).
  uint64_t vram_limit_locked() const;
  // Before a CreateAllocation of size takes mu_: borrows from gpupd when it would not fit what is
  // held, and counts size as pending (so no release takes it away) until the handler runs. Returns
  // what it counted; *why is gpupd's reason when it refused.
  uint64_t reserve_vram(uint64_t size, std::string* why);
  // Before QueryVideoMemoryInfo takes mu_: fresh numbers from gpupd.
  void refresh_vram();
  GPUPDDI_ARG_SETVIRTUALMACHINEDATA vm_data() const;

  WorkerConfig config_;
  GPUPDDI_CALLBACKS callbacks_{};
  std::shared_ptr<kmd::Driver> driver_;
  GPUPDDI_HANDLE adapter_ = nullptr;
  GPUPDDI_HANDLE kmd_worker_process_ = nullptr;
  kmd::AdapterCaps caps_{};
  uint64_t device_memory_ = 0;

  std::timed_mutex mu_;  // the object graph of every process
  std::map<uint64_t, std::shared_ptr<GuestProcess>> processes_;
  std::map<uint64_t, Context*> contexts_;  // by context id (the KMD's hSystemContext)
  uint64_t next_process_id_ = 1;
  uint64_t next_context_id_ = 1;
  uint64_t next_submission_ = 1;
  uint64_t vram_used_ = 0;
  uint32_t state_counter_ = 1;

  // Device memory above the min (VramBroker). hold/borrowable as gpupd last said, under mu_;
  // pending: bytes reserve_vram() let through whose handler has not run yet.
  VramBroker* broker_ = nullptr;
  std::mutex ask_mu_;  // one request to gpupd at a time; never taken with mu_ held
  uint64_t vram_hold_ = 0;
  uint64_t vram_borrowable_ = 0;
  uint64_t vram_pending_ = 0;
  unsigned vram_idle_ticks_ = 0;
  uint64_t vram_refused_ = 0;  // allocations gpupd refused memory for

  // Device time. granted_: the device is this partition's (always, without a link); yield_at_:
  // when gpupd wants it back (with yield_if_idle_: or as soon as nothing is in flight or ready).
  DeviceTimeLink* time_link_ = nullptr;
  bool granted_ = true;
  bool want_sent_ = false;
  std::chrono::steady_clock::time_point granted_at_{};
  std::optional<std::chrono::steady_clock::time_point> yield_at_;
  bool yield_if_idle_ = false;
  std::optional<std::chrono::steady_clock::time_point> idle_since_;  // idle with yield_if_idle_
  std::chrono::steady_clock::time_point idle_began_{};  // when inflight_total_ last fell to 0
  int64_t gap_ewma_ns_ = 0;                             // usual idle gap before more work
  uint64_t inflight_total_ = 0;  // batches in the KMD, all contexts
  uint64_t busy_ns_ = 0;         // time with work in the KMD, up to busy_since_
  std::chrono::steady_clock::time_point busy_since_{};
  uint64_t grants_ = 0;
  std::atomic<int64_t> yield_deadline_ns_{0};  // yield_at_ for the completion thread's wait; 0: none
  std::unique_ptr<TdrWatchdog> watchdog_;
  // Builds in flight (the watchdog's thread reads them without mu_, which the build holds).
  struct Build {
    GuestLink* link = nullptr;  // the building guest's: it stays open while its handler runs
    proto::Op op{};
    uint64_t txn = 0;
    uint32_t pid = 0;
    std::string process;
    uint32_t timeout_s = 0;
  };
  std::mutex builds_mu_;
  std::map<uint64_t, Build> builds_;
  uint64_t next_build_id_ = 1;  // under mu_

  // Completions from KMD threads.
  struct Completion {
    uint64_t context_id, submission;
    gpup_status status;
  };
  std::mutex cq_mu_;
  std::condition_variable cq_cv_;
  std::deque<Completion> cq_;
  bool cq_stop_ = false;
  std::thread completion_thread_;
};

}  // namespace gpup::vmwp
