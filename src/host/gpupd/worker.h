// Supervision of one VM's worker process (gpup-vmwp), from gpupd's event loop.
//
// The worker runs guest work through the KMD, so gpupd treats it as semi-trusted: every line it
// sends is length-capped, parsed and type-checked; every request has a deadline; nothing waits on
// it synchronously. Protocol: see control/protocol.h.
//
// States:
//   starting    spawned, configure sent, waiting for {"event":"ready"} (ready_timeout)
//   running     ready; requests may be sent
//   restarting  exited unexpectedly; respawned after a backoff (backoff_min doubling to backoff_max,
//               back to backoff_min once a worker stayed up for stable_after)
//   stopping    asked to stop: shutdown request (or SIGTERM before ready), SIGKILL at stop_timeout
//   stopped     not running, on purpose
//   failed      gave up: the worker reported {"event":"error"} for its configuration, or it failed to
//               become ready max_start_failures times in a row; start() tries again
//   removed     its partition was reset (TDR or crash) tdr_limit_count times within
//               tdr_limit_window: not restarted until reset() (the operator's `gpup vm reset`)
//
// Resets. A worker whose device work ran past the TDR delay says {"event":"tdr",...} and exits with
// kWorkerExitReset; one that dies of a fault signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT), or
// exits with a failing status after ready (a jailed worker is pid 1, which its own abort() cannot
// kill), was ended by the work it ran; one that keeps the adapter past its yield deadline + TDR delay
// (vidsch.h "overdue") is killed. Each is a reset of the partition: counted, then the worker is
// restarted as after any unexpected exit (its guests got the device-lost error and reconnect).
// opts.resets_changed runs after each counted reset, a removal and reset(), so gpupd keeps the
// history (reset_history(), state.h) across its own restarts and gives it back with
// restore_resets() before the first start().
//
// Device time (vidsch.h): once ready the worker is attached to opts.vidsch with its partition's
// adapter, weight and cap; its {"sched":...} lines go to the scheduler and the scheduler's grants
// and yields go to it. It is detached when its process is gone.
// A worker that breaks the protocol (overlong or malformed line, an unknown or repeated event, reply
// to an id never issued, not draining its input) is killed with SIGKILL and handled as an exit.
// Signals go through a pidfd, so a recycled pid is never signalled.
//
// Jail: with opts.jails, the worker starts in its jail (jail.h): its own uid, namespaces and root,
// no capabilities; its cgroups are joined before it runs anything. gpupd owns the partition's VRD
// endpoint: it accepts each guest connection, lets in only root and the partition's allowed users
// and groups (SO_PEERCRED; the worker could not tell host users apart from inside its user
// namespace, and must not be the one deciding), and passes the socket with the guest's pid, uid and
// gid (GuestHandoff, control/protocol.h) on the worker's fd 4.
//
// CPU: with opts.cpu_cgroups usable, each process also joins its VM's cpu cgroup (cgroup.h), whose
// weight and cap are the partition's compute weight and max compute: what the OS enforces for the
// CPU device's kernels (which run in the worker) and the KMD's compiler, beside the scheduler's
// grants. An "update" with compute_weight / max_compute changes them once the worker accepted it.
//
// Memory limit: with opts.memory_cgroups usable, each process is moved into its VM's memory cgroup
// (cgroup.h) right after it is spawned and before it gets its configuration (so before it loads
// the KMD), limited to the partition's max VRAM + opts.memory_overhead. An "update" request that
// carries vm.max_vram moves the limit too (raised before the worker hears of it, lowered once it
// accepted). The cgroup is removed when the process is gone. Without a usable cgroup the worker
// still runs; describe()'s "memory_limit" says the limit is not enforced and why.
//
// Device memory above the partition's min (vram_pool.h): the worker asks with
//   {"ask":N,"op":"vram","need":BYTES,"want":BYTES}   (or without need/want: only what it holds)
// and gpupd answers at once, from opts.vram, with
//   {"answer":N,"ok":true,"granted":bool,"hold":H,"min":..,"max":..,"borrowable":B[,"error":why]}
// Asks are accepted once the worker is ready; everything it held returns when its process is gone.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "host/control/json_lines.h"
#include "host/control/protocol.h"
#include "host/gpupd/cgroup.h"
#include "host/gpupd/config.h"
#include "host/gpupd/event_loop.h"
#include "host/gpupd/jail.h"
#include "host/gpupd/state.h"
#include "host/gpupd/peer.h"
#include "host/gpupd/vidsch.h"
#include "host/gpupd/vram_pool.h"

namespace gpup::gpupd {

struct WorkerOptions {
  std::string vmwp_path;
  std::chrono::milliseconds ready_timeout{20000};
  std::chrono::milliseconds request_timeout{5000};
  std::chrono::milliseconds stop_timeout{5000};
  std::chrono::milliseconds backoff_min{100};
  std::chrono::milliseconds backoff_max{5000};
  std::chrono::milliseconds stable_after{10000};
  unsigned max_start_failures = 5;
  size_t max_pending = 64;
  // Shared by every worker of one gpupd; null: no memory limit is set (describe() says so).
  std::shared_ptr<MemoryCgroups> memory_cgroups;
  // Shared by every worker; null: no CPU weight or cap is set by the OS (the scheduler still is).
  std::shared_ptr<CpuCgroups> cpu_cgroups;
  // Shared by every worker; null: no bound on a worker's tasks but its memory cgroup.
  std::shared_ptr<PidsCgroups> pids_cgroups;
  uint64_t max_tasks = kDefaultWorkerMaxTasks;
  // Worker memory limit = partition max VRAM + this (config.h: worker_memory_overhead).
  uint64_t memory_overhead = kDefaultWorkerMemoryOverhead;
  // The device-memory arbiter of every adapter; null: a worker may grow to its max unasked.
  std::shared_ptr<VramArbiter> vram;
  // The device-time scheduler of every adapter; null: a worker always holds its device.
  std::shared_ptr<VidSch> vidsch;
  unsigned tdr_limit_count = control::kDefaultTdrLimitCount;
  std::chrono::seconds tdr_limit_window{control::kDefaultTdrLimitWindowS};
  // Runs with the VM's name, from inside the worker's call, when its reset history or removed
  // state changed (a reset counted, the partition removed, reset()); gpupd persists it. It must
  // not destroy the worker. Null: nothing is kept.
  std::function<void(const std::string& vm)> resets_changed;
  // The worker jail (jail.h); null: workers run unconfined (unit tests of supervision only;
  // describe() says so).
  std::shared_ptr<Jails> jails;
};

enum class WorkerState { kStopped, kStarting, kRunning, kRestarting, kStopping, kFailed, kRemoved };
const char* to_string(WorkerState s);

// "exited with status 3", "killed by signal 9 (KILL)"
std::string describe_wait_status(int status);

class Worker {
 public:
  // Builds the configure message for each (re)start, so a restart picks up current settings. An
  // error (e.g. the adapter failed) puts the worker in state failed without spawning anything.
  using ConfigureFn = std::function<Result<control::ConfigureMessage>()>;
  using ReplyFn = std::function<void(Result<control::json>)>;

  Worker(EventLoop& loop, const WorkerOptions& opts, std::string vm, ConfigureFn configure);
  ~Worker();  // SIGKILLs and reaps a live process
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // From stopped or failed: clears the failure count and spawns. From restarting: spawns now.
  // Not from removed: that takes reset().
  void start();
  // Forgets the partition's resets and starts it again (from removed, or any state start() takes).
  void reset();
  // The partition's resets with wall-clock times (those within the window), and why it is removed.
  ResetHistory reset_history() const;
  // Before the first start(): takes back a history from reset_history() of an earlier gpupd. Times
  // outside the window are dropped (one ahead of the clock counts as now); a removed partition
  // stays removed, and start() leaves it so.
  void restore_resets(const ResetHistory& h);
  // Stops the worker; done runs (from the loop) once no process is left.
  void stop(std::function<void()> done);
  // Sends {"op":op,"id":N,...args}; cb gets the whole reply object on {"ok":true}, an error with
  // the worker's message on {"ok":false}, TIMEOUT after request_timeout, or an error when the
  // worker is not running or exits first. cb always runs from the loop, never inside this call.
  void request(const std::string& op, control::json args, ReplyFn cb);
  // cb runs (from the loop) once the worker is no longer starting.
  void when_settled(std::function<void()> cb);

  WorkerState state() const { return state_; }
  pid_t pid() const { return pid_; }
  unsigned restarts() const { return restarts_; }
  const std::string& last_error() const { return last_error_; }
  // {"state":..,"pid":..,"restarts":..,"last_error":..,"last_exit":..,
  //  "memory_limit":{"enforced":bool,"bytes":..,"hierarchy":..,"cgroup":..,"reason":..},
  //  "vram":{"min":..,"hold":..,"borrowed":..,"borrowable":..},  (vram: while it runs, with an arbiter)
  //  "device":{"state":"holding|waiting|throttled|idle","scheduled_ns":..,"grants":..,"yields":..,
  //            "busy_ns":..},  (while attached to the scheduler; busy_ns: as the worker last said)
  //  "resets":{"recent":N,"total":N,"last":"why"}}
  // (absent fields omitted; "reason" says why a limit is not enforced)
  control::json describe() const;
  // The memory cgroup of the live process, or empty.
  const std::string& memory_cgroup() const { return cgroup_dir_; }

 private:
  void spawn();
  void on_control(uint32_t events);
  void on_exit();
  void handle_line(const std::string& line);
  void handle_ask(const control::json& msg);
  void handle_sched(const control::json& msg);
  void handle_tdr_event(const control::json& msg);
  void attach_scheduler();
  void detach_scheduler();
  // Counts a reset of the partition; true when that reaches the limit (the worker is not restarted).
  bool count_reset(const std::string& why);
  void release_vram();
  void violation(const std::string& why);
  void send(const control::json& msg);
  void signal(int sig);
  void close_control(const std::string& why);
  void fail_pending(const std::string& why);
  void start_failed(const std::string& why);
  // The VRD endpoint: gpupd listens, checks who connects (SO_PEERCRED against the partition's
  // allowed users and groups) and hands accepted connections to the worker on its guest socket.
  Status listen_endpoint(const control::ConfigureMessage& cfg);
  void close_endpoint();
  Status apply_endpoint_mode(const std::string& path) const;
  void on_guest_connect();
  bool guest_allowed(const Peer& p, std::string* why) const;
  control::json describe_jail() const;
  void set_state(WorkerState s);
  void deliver(ReplyFn cb, Result<control::json> r);
  uint64_t memory_limit_for(uint64_t max_vram) const;
  Result<std::string> enter_cgroup(VmCgroups* cgroups, const char* controller,
                                   const std::function<Result<std::string>()>& prepare);
  void join_memory_cgroup(uint64_t max_vram);
  // Removes the cgroup of a process that is gone; says if the OOM killer ended it.
  std::string leave_memory_cgroup();
  void change_memory_limit(uint64_t limit);

  struct Pending {
    std::string op;
    ReplyFn cb;
    EventLoop::TimerId timer = 0;
  };

  EventLoop& loop_;
  WorkerOptions opts_;
  std::string vm_;
  ConfigureFn configure_;

  WorkerState state_ = WorkerState::kStopped;
  pid_t pid_ = -1;
  UniqueFd pidfd_;
  UniqueFd control_;
  UniqueFd guests_;     // SOCK_SEQPACKET to the worker's fd 4: one accepted guest socket a message
  UniqueFd listener_;   // the VRD endpoint
  std::vector<uint32_t> allow_uids_, allow_gids_;
  uint32_t jail_id_ = 0;  // the jailed process's uid and gid; 0 when unjailed
  control::LineReader reader_{control::kMaxWorkerLine};
  std::string out_;
  std::string endpoint_;
  bool ready_seen_ = false;
  bool config_error_ = false;
  bool stop_requested_ = false;
  EventLoop::Clock::time_point ready_at_{};

  EventLoop::TimerId ready_timer_ = 0, kill_timer_ = 0, restart_timer_ = 0;
  std::map<uint64_t, Pending> pending_;
  uint64_t next_id_ = 1;

  unsigned restarts_ = 0;
  unsigned start_failures_ = 0;
  std::chrono::milliseconds backoff_;
  std::string last_error_;
  std::string last_exit_;
  std::string kill_reason_;  // why gpupd killed the current process, if it did
  std::vector<std::function<void()>> settled_waiters_;
  std::vector<std::function<void()>> stop_waiters_;

  // Device time and resets.
  std::string sched_adapter_;
  uint32_t sched_weight_ = control::kDefaultComputeWeight, sched_cap_ = control::kMaxComputePercent;
  bool sched_attached_ = false;
  uint64_t busy_us_ = 0;        // the worker's last report
  bool reset_pending_ = false;  // this process reset its partition (tdr event, or overdue kill)
  std::vector<EventLoop::Clock::time_point> resets_;  // within the window
  uint64_t resets_total_ = 0;
  std::string last_reset_;
  std::string removed_why_;  // while removed: "removed after N resets ..." (without the remedy)
  void resets_changed();

  std::string cpu_cgroup_dir_;  // the live process's cpu cgroup, empty when none
  std::string cpu_note_;        // why none
  void join_cpu_cgroup();
  void leave_cpu_and_pids_cgroups();
  std::string pids_cgroup_dir_;  // the live process's pids cgroup, empty when none
  void join_pids_cgroup();
  // Kills whatever is left in dir (nothing, for a jailed worker: its pid namespace went with it),
  // then removes it.
  void empty_and_remove(VmCgroups* cgroups, std::string& dir);
  void change_cpu_limits(uint32_t weight, uint32_t max_percent);

  std::string cgroup_dir_;      // the live process's memory cgroup, empty when none
  uint64_t memory_limit_ = 0;   // what cgroup_dir_ is limited to
  uint64_t oom_kills_at_join_ = 0;
  std::string memory_note_;     // why no limit is enforced
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);  // callbacks posted to the loop check it
};

}  // namespace gpup::gpupd
