#include "host/gpupd/worker.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "channel/channel.h"
#include "common/units.h"
#include <spdlog/spdlog.h>

extern char** environ;

namespace gpup::gpupd {

using control::json;
using namespace std::chrono_literals;

// pidfd system calls directly: glibc 2.36's <sys/pidfd.h> lacks C linkage for C++.
static int sys_pidfd_open(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0u)); }
static int sys_pidfd_send_signal(int pidfd, int sig) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0u));
}

// After the worker closed its control channel, how long it may take to exit.
static constexpr auto kExitGrace = 2000ms;

const char* to_string(WorkerState s) {
  switch (s) {
    case WorkerState::kStopped: return "stopped";
    case WorkerState::kStarting: return "starting";
    case WorkerState::kRunning: return "running";
    case WorkerState::kRestarting: return "restarting";
    case WorkerState::kStopping: return "stopping";
    case WorkerState::kFailed: return "failed";
    case WorkerState::kRemoved: return "removed";
  }
  return "?";
}

std::string describe_wait_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const char* abbrev = ::sigabbrev_np(WTERMSIG(status));
    return fmt::format("killed by signal {} ({}){}", WTERMSIG(status), abbrev ? abbrev : "?",
                       WCOREDUMP(status) ? ", core dumped" : "");
  }
  return fmt::format("wait status {:#x}", status);
}

Worker::Worker(EventLoop& loop, const WorkerOptions& opts, std::string vm, ConfigureFn configure)
    : loop_(loop), opts_(opts), vm_(std::move(vm)), configure_(std::move(configure)), backoff_(opts.backoff_min) {}

Worker::~Worker() {
  loop_.cancel_timer(ready_timer_);
  loop_.cancel_timer(kill_timer_);
  loop_.cancel_timer(restart_timer_);
  for (auto& [id, p] : pending_) loop_.cancel_timer(p.timer);
  if (control_) loop_.unwatch(control_.get());
  if (pidfd_) loop_.unwatch(pidfd_.get());
  if (pid_ > 0) {
    signal(SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    spdlog::info("vm {}: worker pid {} killed: {}", vm_, pid_, describe_wait_status(status));
    (void)leave_memory_cgroup();
    leave_cpu_and_pids_cgroups();
    release_vram();
  }
  detach_scheduler();
  close_endpoint();
  if (opts_.jails) opts_.jails->release(vm_);
}

void Worker::set_state(WorkerState s) {
  if (state_ == s) return;
  WorkerState old = state_;
  state_ = s;
  if (old == WorkerState::kStarting && s != WorkerState::kStarting) {
    for (auto& cb : settled_waiters_) loop_.post(std::move(cb));
    settled_waiters_.clear();
  }
}

void Worker::when_settled(std::function<void()> cb) {
  if (state_ == WorkerState::kStarting) settled_waiters_.push_back(std::move(cb));
  else loop_.post(std::move(cb));
}

void Worker::deliver(ReplyFn cb, Result<json> r) {
  loop_.post([cb = std::move(cb), r = std::move(r)]() mutable { cb(std::move(r)); });
}

json Worker::describe() const {
  json j{{"state", to_string(state_)}, {"restarts", restarts_}};
  if (pid_ > 0) j["pid"] = pid_;
  if (!last_error_.empty()) j["last_error"] = last_error_;
  if (!last_exit_.empty()) j["last_exit"] = last_exit_;
  if (pid_ > 0) {
    json m{{"enforced", !cgroup_dir_.empty()}};
    if (!cgroup_dir_.empty()) {
      m["bytes"] = memory_limit_;
      m["hierarchy"] = to_string(opts_.memory_cgroups->version());
      m["cgroup"] = cgroup_dir_;
    } else {
      m["reason"] = memory_note_;
    }
    j["memory_limit"] = std::move(m);
    json c{{"enforced", !cpu_cgroup_dir_.empty()}};
    if (!cpu_cgroup_dir_.empty()) {
      c["weight"] = sched_weight_;
      c["max_percent"] = sched_cap_;
      c["hierarchy"] = to_string(opts_.cpu_cgroups->version());
      c["cgroup"] = cpu_cgroup_dir_;
    } else {
      c["reason"] = cpu_note_;
    }
    j["cpu_limit"] = std::move(c);
  }
  if (pid_ > 0 && ready_seen_ && opts_.vram) {
    auto a = opts_.vram->query(vm_);
    j["vram"] = json{{"min", a.min}, {"hold", a.hold}, {"borrowed", a.hold - std::min(a.hold, a.min)},
                     {"borrowable", a.borrowable}};
  }
  if (sched_attached_) {
    auto u = opts_.vidsch->usage(vm_, EventLoop::Clock::now());
    j["device"] = json{{"state", u.holding ? "holding" : u.throttled ? "throttled" : u.waiting ? "waiting" : "idle"},
                       {"scheduled_ns", u.scheduled_ns}, {"grants", u.grants}, {"yields", u.yields},
                       {"busy_ns", busy_us_ * 1000}};
  }
  j["jail"] = describe_jail();
  const auto now = EventLoop::Clock::now();
  size_t recent = 0;
  for (auto t : resets_)
    if (now - t < opts_.tdr_limit_window) ++recent;
  json rs{{"recent", recent}, {"total", resets_total_}, {"limit", opts_.tdr_limit_count},
          {"window_s", opts_.tdr_limit_window.count()}};
  if (!last_reset_.empty()) rs["last"] = last_reset_;
  j["resets"] = std::move(rs);
  return j;
}

// What confines the live process, as the kernel reports it (/proc/PID/status), not as asked.
json Worker::describe_jail() const {
  if (!opts_.jails) return json{{"enabled", false}, {"reason", "gpupd runs workers unconfined (no jail configured)"}};
  json j{{"enabled", true}, {"namespaces", Jails::namespaces()}, {"landlock_abi", opts_.jails->landlock_abi()}};
  if (pid_ <= 0) return j;
  j["uid"] = jail_id_;
  j["gid"] = jail_id_;
  if (!pids_cgroup_dir_.empty()) j["max_tasks"] = opts_.max_tasks;
  FILE* f = std::fopen(fmt::format("/proc/{}/status", pid_).c_str(), "re");
  if (!f) return j;
  char line[512];
  while (std::fgets(line, sizeof line, f)) {
    unsigned long v = 0;
    unsigned long long caps = 0;
    if (std::sscanf(line, "Seccomp: %lu", &v) == 1)
      j["seccomp"] = v == 2 ? "filter" : v == 1 ? "strict" : "none";
    else if (std::sscanf(line, "NoNewPrivs: %lu", &v) == 1)
      j["no_new_privs"] = v == 1;
    else if (std::sscanf(line, "CapEff: %llx", &caps) == 1)
      j["cap_effective"] = fmt::format("{:016x}", caps);
    else if (std::sscanf(line, "CapBnd: %llx", &caps) == 1)
      j["cap_bounding"] = fmt::format("{:016x}", caps);
    else if (std::sscanf(line, "Uid: %lu", &v) == 1)
      j["uid_seen"] = v;
  }
  std::fclose(f);
  return j;
}

void Worker::release_vram() {
  if (opts_.vram) opts_.vram->release_all(vm_);
}

uint64_t Worker::memory_limit_for(uint64_t max_vram) const {
  return max_vram > UINT64_MAX - opts_.memory_overhead ? UINT64_MAX : max_vram + opts_.memory_overhead;
}

// Puts the fresh process in its VM's cgroup of one controller, which prepare makes (or reuses)
// and configures; a cgroup it could not join is removed again. The error says why it runs
// without one.
Result<std::string> Worker::enter_cgroup(VmCgroups* cgroups, const char* controller,
                                         const std::function<Result<std::string>()>& prepare) {
  if (!cgroups)
    return make_error(GPUP_STATUS_NOT_SUPPORTED, fmt::format("no {} cgroup configured for workers", controller));
  if (cgroups->version() == CgroupVersion::kNone)
    return make_error(GPUP_STATUS_NOT_SUPPORTED,
                      fmt::format("no usable {} cgroup: {}", controller, cgroups->unavailable_reason()));
  auto dir = prepare();
  if (!dir.ok()) return dir.error();
  if (Status joined = cgroups->add_process(*dir, pid_); !joined.ok()) {
    (void)cgroups->remove(*dir);
    return joined.error();
  }
  return dir;
}

// Called with a fresh, still unconfigured process: nothing of the KMD is loaded yet.
void Worker::join_memory_cgroup(uint64_t max_vram) {
  cgroup_dir_.clear();
  memory_limit_ = 0;
  const uint64_t limit = memory_limit_for(max_vram);
  auto dir = enter_cgroup(opts_.memory_cgroups.get(), "memory",
                          [&] { return opts_.memory_cgroups->prepare(vm_, limit); });
  if (!dir.ok()) {
    memory_note_ = dir.error().message;
    spdlog::warn("vm {}: worker pid {} runs without a memory limit: {}", vm_, pid_, memory_note_);
    return;
  }
  cgroup_dir_ = *dir;
  memory_limit_ = limit;
  oom_kills_at_join_ = opts_.memory_cgroups->oom_kills(cgroup_dir_);
  memory_note_.clear();
  spdlog::info("vm {}: worker pid {} in memory cgroup {} ({}), limit {} (max VRAM {} + overhead {})", vm_, pid_,
               cgroup_dir_, to_string(opts_.memory_cgroups->version()), format_size(limit), format_size(max_vram),
               format_size(opts_.memory_overhead));
}

std::string Worker::leave_memory_cgroup() {
  if (cgroup_dir_.empty()) return {};
  std::string note;
  if (opts_.memory_cgroups->oom_kills(cgroup_dir_) > oom_kills_at_join_)
    note = fmt::format(" (out of memory: its cgroup reached the limit of {})", format_size(memory_limit_));
  empty_and_remove(opts_.memory_cgroups.get(), cgroup_dir_);
  memory_limit_ = 0;
  return note;
}

void Worker::join_cpu_cgroup() {
  cpu_cgroup_dir_.clear();
  auto dir = enter_cgroup(opts_.cpu_cgroups.get(), "cpu",
                          [&] { return opts_.cpu_cgroups->prepare(vm_, sched_weight_, sched_cap_); });
  if (!dir.ok()) {
    cpu_note_ = dir.error().message;
    spdlog::warn("vm {}: worker pid {} runs without a cpu weight or cap from the OS: {}", vm_, pid_, cpu_note_);
    return;
  }
  cpu_cgroup_dir_ = *dir;
  cpu_note_.clear();
  spdlog::info("vm {}: worker pid {} in cpu cgroup {} ({}), weight {}, max {}% of {} cpu(s)", vm_, pid_, cpu_cgroup_dir_,
               to_string(opts_.cpu_cgroups->version()), sched_weight_, sched_cap_, opts_.cpu_cgroups->cpus());
}

void Worker::leave_cpu_and_pids_cgroups() {
  empty_and_remove(opts_.cpu_cgroups.get(), cpu_cgroup_dir_);
  empty_and_remove(opts_.pids_cgroups.get(), pids_cgroup_dir_);
}

void Worker::join_pids_cgroup() {
  pids_cgroup_dir_.clear();
  auto dir = enter_cgroup(opts_.pids_cgroups.get(), "pids", [&] { return opts_.pids_cgroups->prepare(vm_, opts_.max_tasks); });
  if (!dir.ok()) {
    spdlog::warn("vm {}: worker pid {} runs without a bound on its tasks: {}", vm_, pid_, dir.error().message);
    return;
  }
  pids_cgroup_dir_ = *dir;
}

void Worker::empty_and_remove(VmCgroups* cgroups, std::string& dir) {
  if (dir.empty() || !cgroups) return;
  auto killed = cgroups->kill_all(dir);
  if (!killed.ok())
    spdlog::error("vm {}: {}", vm_, killed.error().message);
  else if (*killed > 0)
    spdlog::warn("vm {}: killed {} process(es) its worker left in {}", vm_, *killed, dir);
  if (Status s = cgroups->remove(dir); !s.ok())
    spdlog::warn("vm {}: {} (it is reused at the next start)", vm_, s.error().message);
  dir.clear();
}

void Worker::change_cpu_limits(uint32_t weight, uint32_t max_percent) {
  sched_weight_ = weight;
  sched_cap_ = max_percent;
  if (sched_attached_) opts_.vidsch->configure(vm_, weight, max_percent, EventLoop::Clock::now());
  if (cpu_cgroup_dir_.empty()) return;
  if (Status s = opts_.cpu_cgroups->set(cpu_cgroup_dir_, weight, max_percent); !s.ok())
    spdlog::warn("vm {}: cpu weight and cap stay as they were: {}", vm_, s.error().message);
}

void Worker::change_memory_limit(uint64_t limit) {
  if (cgroup_dir_.empty() || limit == memory_limit_) return;
  if (Status s = opts_.memory_cgroups->set_limit(cgroup_dir_, limit); !s.ok()) {
    spdlog::warn("vm {}: memory limit stays {}: {}", vm_, format_size(memory_limit_), s.error().message);
    return;
  }
  spdlog::info("vm {}: worker memory limit {} -> {}", vm_, format_size(memory_limit_), format_size(limit));
  memory_limit_ = limit;
}

void Worker::reset() {
  resets_.clear();
  removed_why_.clear();
  if (state_ == WorkerState::kRemoved) {
    set_state(WorkerState::kStopped);
    spdlog::info("vm {}: reset by the operator; starting its worker again", vm_);
  }
  resets_changed();  // kept as no longer removed before anything runs
  start();
}

void Worker::resets_changed() {
  if (opts_.resets_changed) opts_.resets_changed(vm_);
}

ResetHistory Worker::reset_history() const {
  ResetHistory h;
  h.total = resets_total_;
  h.last = last_reset_;
  const auto now = EventLoop::Clock::now();
  const auto wall = std::chrono::system_clock::now();
  for (auto t : resets_) {
    if (now - t >= opts_.tdr_limit_window) continue;
    const auto at = wall - std::chrono::duration_cast<std::chrono::system_clock::duration>(now - t);
    // Rounded, not cut: a time read back (restore_resets) comes out as the same second.
    const auto secs = std::chrono::round<std::chrono::seconds>(at.time_since_epoch()).count();
    h.times.push_back(static_cast<uint64_t>(std::max<int64_t>(secs, 1)));
  }
  // The newest tdr_limit_count decide the limit; the file takes no more than twice that (state.h).
  if (h.times.size() > opts_.tdr_limit_count)
    h.times.erase(h.times.begin(), h.times.end() - static_cast<ptrdiff_t>(opts_.tdr_limit_count));
  if (state_ == WorkerState::kRemoved) h.removed = removed_why_;
  return h;
}

void Worker::restore_resets(const ResetHistory& h) {
  resets_total_ = h.total;
  last_reset_ = h.last;
  resets_.clear();
  const auto now = EventLoop::Clock::now();
  const auto wall = std::chrono::system_clock::now();
  for (uint64_t s : h.times) {
    const std::chrono::system_clock::time_point at{std::chrono::seconds(std::min(s, kMaxResetTime))};
    // One ahead of the clock (set back since it was written) counts as now rather than never.
    const auto age = at < wall ? wall - at : std::chrono::system_clock::duration::zero();
    if (age >= opts_.tdr_limit_window) continue;
    resets_.push_back(now - std::chrono::duration_cast<EventLoop::Clock::duration>(age));
  }
  // More than the limit (it was lowered since): the newest tdr_limit_count, so the next reset removes.
  if (resets_.size() > opts_.tdr_limit_count)
    resets_.erase(resets_.begin(), resets_.end() - static_cast<ptrdiff_t>(opts_.tdr_limit_count));
  if (h.removed.empty() || state_ != WorkerState::kStopped) return;
  removed_why_ = h.removed;
  last_error_ = fmt::format("{}, before gpupd restarted; `gpup vm reset {}` brings it back", h.removed, vm_);
  spdlog::warn("vm {}: {}; not started", vm_, last_error_);
  set_state(WorkerState::kRemoved);
}

void Worker::start() {
  switch (state_) {
    case WorkerState::kStopped:
    case WorkerState::kFailed:
      start_failures_ = 0;
      backoff_ = opts_.backoff_min;
      last_error_.clear();
      spawn();
      break;
    case WorkerState::kRestarting:
      loop_.cancel_timer(restart_timer_);
      restart_timer_ = 0;
      spawn();
      break;
    default:
      break;  // already starting, running or stopping
  }
}

void Worker::spawn() {
  ready_seen_ = false;
  config_error_ = false;
  stop_requested_ = false;
  kill_reason_.clear();
  reader_ = control::LineReader(control::kMaxWorkerLine);
  out_.clear();

  reset_pending_ = false;
  busy_us_ = 0;
  auto cfg = configure_();
  if (!cfg) {
    last_error_ = cfg.error().message;
    spdlog::error("vm {}: cannot start its worker: {}", vm_, last_error_);
    set_state(WorkerState::kFailed);
    return;
  }
  endpoint_ = cfg->endpoint;
  sched_adapter_ = cfg->vm.adapter;
  sched_weight_ = cfg->vm.compute_weight;
  sched_cap_ = cfg->vm.max_compute;

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return start_failed(fmt::format("socketpair: {}", std::strerror(errno)));
  UniqueFd ours(sv[0]), theirs(sv[1]);
  int fl = ::fcntl(ours.get(), F_GETFL);
  if (fl < 0 || ::fcntl(ours.get(), F_SETFL, fl | O_NONBLOCK) != 0)
    return start_failed(fmt::format("fcntl: {}", std::strerror(errno)));

  int gv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, gv) != 0)
    return start_failed(fmt::format("socketpair: {}", std::strerror(errno)));
  UniqueFd guests_ours(gv[0]), guests_theirs(gv[1]);
  if (::fcntl(guests_ours.get(), F_SETFL, O_NONBLOCK) != 0) return start_failed(fmt::format("fcntl: {}", std::strerror(errno)));
  allow_uids_ = cfg->vm.allow_users;
  allow_gids_ = cfg->vm.allow_groups;
  if (Status l = listen_endpoint(*cfg); !l.ok()) return start_failed(l.error().message);

  std::string fd_arg = std::to_string(control::kWorkerControlFd);
  std::vector<std::string> args = {opts_.vmwp_path, "--vm", vm_, "--control-fd", fd_arg};
  pid_t pid = -1;
  UniqueFd pidfd;
  if (opts_.jails) {
    Jails::Spawn js;
    js.vm = vm_;
    js.program = opts_.vmwp_path;
    js.argv = args;
    js.kmd = cfg->adapter.kmd;
    js.needs = opts_.jails->needs(cfg->vm.adapter);
    js.fds = {{theirs.get(), control::kWorkerControlFd}, {guests_theirs.get(), control::kWorkerGuestFd}};
    // Into its cgroups before it runs a single instruction of its own.
    auto started = opts_.jails->spawn(js, [&](pid_t child) -> Status {
      pid_ = child;
      join_memory_cgroup(cfg->vm.max_vram);
      join_cpu_cgroup();
      join_pids_cgroup();
      return {};
    });
    if (!started.ok()) {
      pid_ = -1;
      (void)leave_memory_cgroup();
      leave_cpu_and_pids_cgroups();
      return start_failed(fmt::format("cannot start the worker in its jail: {}", started.error().message));
    }
    pid = started->pid;
    pidfd = std::move(started->pidfd);
    jail_id_ = started->id;
  } else {
    // Unconfined (no jail configured): fd 0 = /dev/null, 1 and 2 = gpupd's, 3 = its control
    // socket, 4 = its guest socket, nothing else; default signal dispositions, an empty signal
    // mask and its own process group, so a terminal's ^C reaches gpupd, which stops workers in order.
    if (theirs.get() == control::kWorkerControlFd || theirs.get() == control::kWorkerGuestFd) {
      // dup2 onto itself would not clear close-on-exec; move it out of the way first.
      theirs = UniqueFd(::fcntl(theirs.get(), F_DUPFD_CLOEXEC, control::kWorkerGuestFd + 1));
      if (!theirs) return start_failed(fmt::format("fcntl: {}", std::strerror(errno)));
    }
    if (guests_theirs.get() == control::kWorkerGuestFd || guests_theirs.get() == control::kWorkerControlFd) {
      guests_theirs = UniqueFd(::fcntl(guests_theirs.get(), F_DUPFD_CLOEXEC, control::kWorkerGuestFd + 1));
      if (!guests_theirs) return start_failed(fmt::format("fcntl: {}", std::strerror(errno)));
    }
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    ::posix_spawn_file_actions_init(&fa);
    ::posix_spawnattr_init(&attr);
    ::posix_spawn_file_actions_adddup2(&fa, theirs.get(), control::kWorkerControlFd);
    ::posix_spawn_file_actions_adddup2(&fa, guests_theirs.get(), control::kWorkerGuestFd);
    ::posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    ::posix_spawn_file_actions_addclosefrom_np(&fa, control::kWorkerGuestFd + 1);
    sigset_t empty, defaults;
    sigemptyset(&empty);
    sigemptyset(&defaults);
    for (int s : {SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGQUIT, SIGCHLD, SIGUSR1, SIGUSR2}) sigaddset(&defaults, s);
    ::posix_spawnattr_setsigmask(&attr, &empty);
    ::posix_spawnattr_setsigdefault(&attr, &defaults);
    ::posix_spawnattr_setpgroup(&attr, 0);
    ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int rc = ::posix_spawn(&pid, opts_.vmwp_path.c_str(), &fa, &attr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&fa);
    ::posix_spawnattr_destroy(&attr);
    if (rc != 0) return start_failed(fmt::format("cannot execute {}: {}", opts_.vmwp_path, std::strerror(rc)));
    pidfd = UniqueFd(sys_pidfd_open(pid));
    if (!pidfd) {
      int err = errno;
      ::kill(pid, SIGKILL);  // still our unreaped child: the pid cannot have been reused
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
      return start_failed(fmt::format("pidfd_open: {}", std::strerror(err)));
    }
    jail_id_ = 0;
  }
  theirs.reset();
  guests_theirs.reset();
  guests_ = std::move(guests_ours);
  pid_ = pid;
  pidfd_ = std::move(pidfd);
  control_ = std::move(ours);
  set_state(WorkerState::kStarting);
  spdlog::info("vm {}: worker started, pid {}", vm_, pid_);

  Status w1 = loop_.watch(pidfd_.get(), EPOLLIN, [this](uint32_t) { on_exit(); });
  Status w2 = loop_.watch(control_.get(), EPOLLIN, [this](uint32_t ev) { on_control(ev); });
  if (!w1.ok() || !w2.ok()) {
    spdlog::error("vm {}: {}", vm_, (!w1.ok() ? w1 : w2).error().message);
    signal(SIGKILL);
    // Without a pidfd watch the exit would go unnoticed: reap synchronously (SIGKILL is prompt).
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    loop_.unwatch(pidfd_.get());
    loop_.unwatch(control_.get());
    pidfd_.reset();
    control_.reset();
    pid_ = -1;
    return start_failed("cannot watch the worker's fds");
  }
  ready_timer_ = loop_.add_timer(opts_.ready_timeout, [this] {
    ready_timer_ = 0;
    violation(fmt::format("did not report ready within {} ms", opts_.ready_timeout.count()));
  });
  if (!opts_.jails) {
    join_memory_cgroup(cfg->vm.max_vram);
    join_cpu_cgroup();
    join_pids_cgroup();
  }
  send(to_json(*cfg));
}

Status Worker::listen_endpoint(const control::ConfigureMessage& cfg) {
  close_endpoint();
  const std::string& path = cfg.endpoint;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path)
    return make_error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("endpoint {} is too long", path));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return make_error(GPUP_STATUS_INTERNAL, fmt::format("socket: {}", std::strerror(errno)));
  ::unlink(path.c_str());
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("bind {}: {}", path, std::strerror(errno)));
  if (Status m = apply_endpoint_mode(path); !m.ok()) return m;
  if (::listen(fd.get(), 128) != 0) return make_error(GPUP_STATUS_INTERNAL, fmt::format("listen: {}", std::strerror(errno)));
  listener_ = std::move(fd);
  if (Status w = loop_.watch(listener_.get(), EPOLLIN, [this](uint32_t) { on_guest_connect(); }); !w.ok()) {
    listener_.reset();
    return w;
  }
  return {};
}

// The file mode is the first gate, the SO_PEERCRED check on every connection the real one: root
// only (0600); one allowed group and no users (root:group 0660); otherwise open to all.
Status Worker::apply_endpoint_mode(const std::string& path) const {
  mode_t mode = 0600;
  gid_t group = 0;
  if (allow_uids_.empty() && allow_gids_.size() == 1) {
    mode = 0660;
    group = allow_gids_[0];
  } else if (!allow_uids_.empty() || !allow_gids_.empty()) {
    mode = 0666;
  }
  if (::chown(path.c_str(), 0, group) != 0 && ::geteuid() == 0)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("chown {}: {}", path, std::strerror(errno)));
  if (::chmod(path.c_str(), mode) != 0)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("chmod {}: {}", path, std::strerror(errno)));
  return {};
}

void Worker::close_endpoint() {
  if (!listener_) return;
  loop_.unwatch(listener_.get());
  listener_.reset();
}

bool Worker::guest_allowed(const Peer& p, std::string* why) const {
  auto listed = [](const std::vector<uint32_t>& ids, uint32_t id) { return std::find(ids.begin(), ids.end(), id) != ids.end(); };
  if (p.uid == 0 || listed(allow_uids_, p.uid) || listed(allow_gids_, p.gid)) return true;
  for (gid_t g : p.groups)
    if (listed(allow_gids_, g)) return true;
  *why = fmt::format("access denied: uid {} is not root and not allowed on partition {} (gpup vm set {} "
                     "--allow-user/--allow-group)",
                     p.uid, vm_, vm_);
  return false;
}

void Worker::on_guest_connect() {
  for (;;) {
    UniqueFd c(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!c) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
        spdlog::warn("vm {}: accept: {}", vm_, std::strerror(errno));
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;
    }
    auto peer = read_peer(c.get());
    if (!peer.ok()) {
      spdlog::warn("vm {}: guest connection refused: {}", vm_, peer.error().message);
      channel::refuse_on_socket(c.get(), GPUP_STATUS_ACCESS_DENIED);
      continue;
    }
    std::string why;
    if (!guest_allowed(*peer, &why)) {
      spdlog::warn("vm {}: guest connection refused: {}: {}", vm_, to_string(*peer), why);
      channel::refuse_on_socket(c.get(), GPUP_STATUS_ACCESS_DENIED);
      continue;
    }
    const ucred cr{peer->pid, peer->uid, peer->gid};
    if (!guests_ || (state_ != WorkerState::kRunning && state_ != WorkerState::kStarting)) continue;
    uint8_t data[control::kGuestHandoffSize];
    control::encode(control::GuestHandoff{cr.pid, cr.uid, cr.gid}, data);
    const int sent_fd = c.get();
    if (send_with_fds(guests_.get(), data, sizeof data, std::span<const int>(&sent_fd, 1), MSG_DONTWAIT) !=
        ssize_t(sizeof data))
      spdlog::warn("vm {}: guest pid {} dropped: the worker does not take connections ({})", vm_, cr.pid,
                   std::strerror(errno));
  }
}

void Worker::start_failed(const std::string& why) {
  last_error_ = why;
  spdlog::error("vm {}: worker start failed: {}", vm_, why);
  ++start_failures_;
  if (start_failures_ >= opts_.max_start_failures) {
    last_error_ = fmt::format("worker failed to start {} times in a row; last: {}", start_failures_, why);
    set_state(WorkerState::kFailed);
    return;
  }
  set_state(WorkerState::kRestarting);
  restart_timer_ = loop_.add_timer(backoff_, [this] {
    restart_timer_ = 0;
    ++restarts_;
    spawn();
  });
  backoff_ = std::min(backoff_ * 2, opts_.backoff_max);
}

void Worker::signal(int sig) {
  if (pidfd_ && sys_pidfd_send_signal(pidfd_.get(), sig) != 0 && errno != ESRCH)
    spdlog::error("vm {}: pidfd_send_signal({}): {}", vm_, sig, std::strerror(errno));
}

void Worker::send(const json& msg) {
  if (!control_) return;
  out_ += control::encode_line(msg);
  if (out_.size() > 4 * control::kMaxToWorkerLine) return violation("does not read its control channel");
  auto done = control::flush_some(control_.get(), out_);
  if (!done) return close_control("control channel write failed: " + done.error().message);
  loop_.set_events(control_.get(), *done ? EPOLLIN : EPOLLIN | EPOLLOUT);
}

void Worker::close_control(const std::string& why) {
  if (!control_) return;
  loop_.unwatch(control_.get());
  control_.reset();
  fail_pending(fmt::format("vm {}: worker {}", vm_, why));
  // The process should follow; if it lingers, it is killed.
  if (pid_ > 0 && !kill_timer_)
    kill_timer_ = loop_.add_timer(kExitGrace, [this] {
      kill_timer_ = 0;
      spdlog::warn("vm {}: worker pid {} closed its control channel but did not exit; killing it", vm_, pid_);
      signal(SIGKILL);
    });
}

void Worker::violation(const std::string& why) {
  std::string msg = fmt::format("worker pid {} {}", pid_, why);
  spdlog::error("vm {}: {}; killing it", vm_, msg);
  if (kill_reason_.empty()) kill_reason_ = msg;
  signal(SIGKILL);
  close_control(why);
}

void Worker::fail_pending(const std::string& why) {
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& [id, p] : pending) {
    loop_.cancel_timer(p.timer);
    deliver(std::move(p.cb), make_error(GPUP_STATUS_CONNECTION_LOST, why));
  }
}

void Worker::request(const std::string& op, json args, ReplyFn cb) {
  if (state_ != WorkerState::kRunning || !control_)
    return deliver(std::move(cb), make_error(GPUP_STATUS_BUSY, fmt::format("vm {}: worker is {}", vm_, to_string(state_))));
  if (pending_.size() >= opts_.max_pending)
    return deliver(std::move(cb),
                   make_error(GPUP_STATUS_BUSY, fmt::format("vm {}: {} requests already waiting for the worker", vm_,
                                                            pending_.size())));
  // The request as the worker will decode it (control::WorkerRequest): gpupd's own callers are
  // held to the codec too, and what follows reads its typed settings.
  const uint64_t id = next_id_;
  json line = args.is_object() ? std::move(args) : json::object();
  line["op"] = op;
  line["id"] = id;
  auto req = control::worker_request_from_json(line);
  if (!req)
    return deliver(std::move(cb), make_error(GPUP_STATUS_INVALID_PARAMETER,
                                             fmt::format("vm {}: bad request to the worker: {}", vm_, req.error().message)));
  ++next_id_;
  if (req->op == control::WorkerOp::kUpdate && !cgroup_dir_.empty()) {
    // More room before the worker may use it; less only once it has accepted the smaller budget.
    uint64_t before = memory_limit_;
    uint64_t after = memory_limit_for(req->vm->max_vram);
    if (after > before) change_memory_limit(after);
    cb = [this, alive = std::weak_ptr<int>(alive_), before, after, pid = pid_, cb = std::move(cb)](Result<json> r) {
      if (!alive.expired() && pid == pid_) change_memory_limit(r.ok() ? after : before);
      cb(std::move(r));
    };
  }
  if (req->op == control::WorkerOp::kUpdate) {
    // Device time and the OS's CPU share follow once the worker has accepted the settings.
    const uint32_t weight = req->vm->compute_weight, cap = req->vm->max_compute;
    cb = [this, alive = std::weak_ptr<int>(alive_), weight, cap, pid = pid_, cb = std::move(cb)](Result<json> r) {
      if (!alive.expired() && pid == pid_ && r.ok()) change_cpu_limits(weight, cap);
      cb(std::move(r));
    };
    // Who may connect changes at once: the endpoint is gpupd's, not the worker's.
    allow_uids_ = req->vm->allow_users;
    allow_gids_ = req->vm->allow_groups;
    if (listener_)
      if (Status m = apply_endpoint_mode(endpoint_); !m.ok()) spdlog::warn("vm {}: {}", vm_, m.error().message);
  }
  Pending p{op, std::move(cb), 0};
  p.timer = loop_.add_timer(opts_.request_timeout, [this, id] {
    auto it = pending_.find(id);
    if (it == pending_.end()) return;
    Pending late = std::move(it->second);
    pending_.erase(it);
    spdlog::warn("vm {}: worker did not answer '{}' (id {}) within {} ms", vm_, late.op, id,
                 opts_.request_timeout.count());
    deliver(std::move(late.cb),
            make_error(GPUP_STATUS_TIMEOUT, fmt::format("vm {}: worker did not answer '{}' within {} ms", vm_, late.op,
                                                        opts_.request_timeout.count())));
  });
  pending_.emplace(id, std::move(p));
  send(control::to_json(*req));
}

void Worker::on_control(uint32_t events) {
  if (events & EPOLLOUT) {
    auto done = control::flush_some(control_.get(), out_);
    if (!done) return close_control("control channel write failed: " + done.error().message);
    if (*done) loop_.set_events(control_.get(), EPOLLIN);
  }
  if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
  std::string err;
  auto outcome = control::read_lines(control_.get(), reader_, &err);
  while (control_) {
    auto line = reader_.pop();
    if (!line) break;
    handle_line(*line);
  }
  if (!control_) return;  // a line was a violation
  // After its tdr event the worker ends at once, lines gpupd sent meanwhile unread (a reset).
  if (outcome != control::ReadOutcome::kAgain && reset_pending_) return close_control("ended itself to reset its partition");
  if (outcome == control::ReadOutcome::kError) return violation("broke the control framing: " + err);
  if (outcome == control::ReadOutcome::kEof) {
    if (reader_.partial_size()) spdlog::warn("vm {}: worker's last line was unterminated; dropped", vm_);
    close_control("closed its control channel");
  }
}

// Every line is one record of control/protocol.h, picked by its leading key and taken only whole
// by that record's decoder; anything else, or a record out of turn, is a violation. Whatever a line
// says applies to this worker's own partition (vm_) only.
void Worker::handle_line(const std::string& line) {
  auto msg = control::parse_object_line(line);
  if (!msg) return violation("sent a malformed line: " + msg.error().message);
  control::ObjectReader r(*msg, "");

  if (r.has("event")) {
    auto event = r.str("event", 16);
    if (!event) return violation("sent a bad event: " + r.error());
    const bool starting = state_ == WorkerState::kStarting;
    if (*event == "ready" || *event == "error") {
      // The answer to configure: once, before anything else.
      if (ready_seen_) return violation(fmt::format("sent a second answer to its configuration ('{}')", *event));
      if (!starting) return;  // stop() came first: its SIGTERM is on the way
      loop_.cancel_timer(ready_timer_);
      ready_timer_ = 0;
      if (*event == "error") {
        auto e = control::error_event_from_json(*msg);
        if (!e) return violation("sent a bad error event: " + e.error().message);
        config_error_ = true;
        last_error_ = control::printable(e->message, control::kMaxMessageLength);
        spdlog::error("vm {}: worker refused its configuration: {}", vm_, last_error_);
        return close_control("reported an error");
      }
      auto ready = control::ready_event_from_json(*msg);
      if (!ready) return violation("sent a bad ready event: " + ready.error().message);
      if (ready->endpoint != endpoint_)
        return violation(fmt::format("reported endpoint '{}', not '{}'", control::printable(ready->endpoint), endpoint_));
      ready_seen_ = true;
      ready_at_ = EventLoop::Clock::now();
      last_error_.clear();
      if (opts_.vram) opts_.vram->attach(vm_);
      attach_scheduler();
      spdlog::info("vm {}: worker pid {} ready at {}", vm_, pid_, endpoint_);
      set_state(WorkerState::kRunning);
      return;
    }
    if (!ready_seen_) return violation(fmt::format("sent event '{}' before ready", control::printable(*event, 16)));
    if (*event == "tdr") return handle_tdr_event(*msg);
    return violation(fmt::format("sent an unknown event '{}'", control::printable(*event, 16)));
  }

  if (r.has("ask")) return handle_ask(*msg);
  if (r.has("sched")) return handle_sched(*msg);

  if (r.has("reply")) {
    // The request it answers decides what the reply must hold (stats for stats).
    auto id = r.u64("reply");
    if (!id) return violation("sent a bad reply: " + r.error());
    auto it = pending_.find(*id);
    auto op = it == pending_.end() ? std::nullopt : control::worker_op_from_string(it->second.op);
    auto reply = control::worker_reply_from_json(*msg, op);
    if (!reply) return violation("sent a bad reply: " + reply.error().message);
    if (it == pending_.end()) {
      if (*id >= next_id_) return violation(fmt::format("replied to request {}, which was never sent", *id));
      spdlog::debug("vm {}: late reply to request {} ignored", vm_, *id);
      return;
    }
    Pending p = std::move(it->second);
    pending_.erase(it);
    loop_.cancel_timer(p.timer);
    // The callback sees the reply as decoded (stats sanitized), not the worker's text.
    if (reply->ok) return deliver(std::move(p.cb), control::to_json(*reply));
    return deliver(std::move(p.cb), make_error(GPUP_STATUS_INVALID_PARAMETER,
                                               control::printable(reply->error, control::kMaxMessageLength)));
  }
  violation("sent a line that is neither an event, an ask, a scheduler line nor a reply");
}

// A worker asking for device memory above its min; answered at once (nothing waits on it).
void Worker::handle_ask(const json& msg) {
  auto ask = control::vram_ask_from_json(msg);
  if (!ask) return violation("sent a bad ask: " + ask.error().message);
  if (!ready_seen_) return violation("asked before it was ready");
  control::VramAnswer a;
  a.id = ask->id;
  if (!opts_.vram) {
    // No arbiter: nothing is shared to protect; the worker's max is its only limit.
    a.granted = true;
    a.hold = ask->want;
    return send(control::to_json(a));
  }
  VramArbiter::Answer ans = ask->query ? opts_.vram->query(vm_) : opts_.vram->request(vm_, ask->need, ask->want);
  a.granted = ans.granted;
  a.hold = ans.hold;
  a.min = ans.min;
  a.max = ans.max;
  a.borrowable = ans.borrowable;
  if (!ans.granted) {
    a.why = ans.why;
    spdlog::info("vm {}: device memory refused: {}", vm_, ans.why);
  } else if (!ask->query) {
    spdlog::debug("vm {}: device memory held {} (asked {} at least {})", vm_, format_size(ans.hold),
                  format_size(ask->want), format_size(ask->need));
  }
  send(control::to_json(a));
}

void Worker::attach_scheduler() {
  if (!opts_.vidsch || sched_attached_) return;
  VidSch::Hooks h;
  h.grant = [this] { send(control::to_json(control::SchedNotice{control::SchedNotice::Kind::kGrant})); };
  h.yield = [this](std::chrono::microseconds after, bool if_idle) {
    const auto us = std::clamp<int64_t>(after.count(), 0, static_cast<int64_t>(control::kMaxYieldAfterUs));
    send(control::to_json(control::SchedNotice{control::SchedNotice::Kind::kYield, static_cast<uint64_t>(us), if_idle}));
  };
  h.overdue = [this](const std::string& why) {
    // A worker that keeps the adapter this long is hung or hostile: end it as a TDR would.
    reset_pending_ = true;
    last_reset_ = "TDR: worker " + why;
    violation(why + " (TDR)");
  };
  opts_.vidsch->attach(vm_, sched_adapter_, sched_weight_, sched_cap_, std::move(h), EventLoop::Clock::now());
  sched_attached_ = true;
}

void Worker::detach_scheduler() {
  if (!sched_attached_) return;
  sched_attached_ = false;
  opts_.vidsch->detach(vm_, EventLoop::Clock::now());
}

void Worker::handle_sched(const json& msg) {
  auto s = control::sched_request_from_json(msg);
  if (!s) return violation("sent a bad scheduler line: " + s.error().message);
  if (!ready_seen_) return violation("sent a scheduler line before it was ready");
  if (!sched_attached_) return;  // no scheduler: it holds its device anyway
  const auto now = EventLoop::Clock::now();
  if (s->kind == control::SchedRequest::Kind::kWant) {
    opts_.vidsch->want(vm_, now);
  } else {
    busy_us_ = s->busy_us;
    opts_.vidsch->release(vm_, s->more, now);
  }
}

void Worker::handle_tdr_event(const json& msg) {
  auto ev = control::tdr_event_from_json(msg);
  if (!ev) return violation("sent a bad tdr event: " + ev.error().message);
  reset_pending_ = true;
  const std::string who = fmt::format("{}{}", ev->process ? control::printable(*ev->process) : "a guest",
                                      ev->pid ? fmt::format(" (pid {})", *ev->pid) : "");
  if (ev->kind == control::TdrEvent::Kind::kBuild)
    last_reset_ = fmt::format("TDR: a program build of {} ran {} ms, past the build timeout of {} s", who,
                              ev->running_ms, ev->build_timeout_s);
  else
    last_reset_ = fmt::format("TDR: work of {} ran {} ms, past the TDR delay", who, ev->running_ms);
  spdlog::error("vm {}: {}; the partition is reset", vm_, last_reset_);
}

bool Worker::count_reset(const std::string& why) {
  const auto now = EventLoop::Clock::now();
  std::erase_if(resets_, [&](auto t) { return now - t >= opts_.tdr_limit_window; });
  resets_.push_back(now);
  ++resets_total_;
  last_reset_ = why;
  if (resets_.size() < opts_.tdr_limit_count) return false;
  removed_why_ = fmt::format("removed after {} resets within {} s (last: {})", resets_.size(),
                             opts_.tdr_limit_window.count(), why);
  last_error_ = fmt::format("{}; `gpup vm reset {}` brings it back", removed_why_, vm_);
  spdlog::error("vm {}: {}", vm_, last_error_);
  return true;
}

void Worker::on_exit() {
  int status = 0;
  pid_t r;
  while ((r = ::waitpid(pid_, &status, WNOHANG)) < 0 && errno == EINTR) {
  }
  if (r == 0) return;  // spurious wake-up; the pidfd stays readable until the child is reaped
  // What it wrote before it died (a tdr event, say) is read before its exit is judged: the exit
  // and the last lines may reach the loop in either order.
  if (control_) on_control(EPOLLIN);
  std::string desc = r < 0 ? fmt::format("could not be reaped: {}", std::strerror(errno)) : describe_wait_status(status);
  pid_t old_pid = pid_;
  desc += leave_memory_cgroup();
  leave_cpu_and_pids_cgroups();
  release_vram();  // whatever it borrowed is free again
  detach_scheduler();

  loop_.unwatch(pidfd_.get());
  pidfd_.reset();
  guests_.reset();
  pid_ = -1;
  if (control_) {
    loop_.unwatch(control_.get());
    control_.reset();
  }
  loop_.cancel_timer(ready_timer_);
  loop_.cancel_timer(kill_timer_);
  ready_timer_ = kill_timer_ = 0;
  fail_pending(fmt::format("vm {}: worker {}", vm_, desc));

  if (stop_requested_) {
    close_endpoint();
    spdlog::info("vm {}: worker pid {} stopped ({})", vm_, old_pid, desc);
    set_state(WorkerState::kStopped);
    for (auto& cb : stop_waiters_) loop_.post(std::move(cb));
    stop_waiters_.clear();
    return;
  }
  last_exit_ = desc;
  if (config_error_) {
    close_endpoint();
    spdlog::error("vm {}: worker pid {} {}; vm failed: {}", vm_, old_pid, desc, last_error_);
    set_state(WorkerState::kFailed);
    return;
  }
  spdlog::warn("vm {}: worker pid {} {} unexpectedly", vm_, old_pid, desc);
  const bool fault_signal = r > 0 && WIFSIGNALED(status) &&
                            (WTERMSIG(status) == SIGSEGV || WTERMSIG(status) == SIGBUS || WTERMSIG(status) == SIGILL ||
                             WTERMSIG(status) == SIGFPE || WTERMSIG(status) == SIGABRT);
  const bool reset_exit = r > 0 && WIFEXITED(status) && WEXITSTATUS(status) == control::kWorkerExitReset;
  // A jailed worker is pid 1 of its namespace, where a fatal signal it sends itself (abort(), a
  // sanitizer's report) is ignored: it then ends with a failing status instead. After ready, a
  // worker exits on its own only when something failed, so that counts as the work's fault too.
  const bool failed_exit = r > 0 && WIFEXITED(status) && WEXITSTATUS(status) != 0;
  if (ready_seen_ && (reset_pending_ || reset_exit || fault_signal || failed_exit)) {
    std::string why = reset_pending_ ? last_reset_ : fmt::format("the worker {} while running guest work", desc);
    const bool removed = count_reset(why);
    if (removed) {
      close_endpoint();
      set_state(WorkerState::kRemoved);
    }
    resets_changed();  // kept before the worker restarts (or as removed)
    if (removed) return;
  }
  if (ready_seen_) {
    if (EventLoop::Clock::now() - ready_at_ >= opts_.stable_after) {
      start_failures_ = 0;
      backoff_ = opts_.backoff_min;
    }
    // A protocol violation already said why the worker was killed.
    last_error_ = kill_reason_.empty() ? fmt::format("worker pid {} {}", old_pid, desc)
                                       : fmt::format("{} ({})", kill_reason_, desc);
    set_state(WorkerState::kRestarting);
    restart_timer_ = loop_.add_timer(backoff_, [this] {
      restart_timer_ = 0;
      ++restarts_;
      spawn();
    });
    backoff_ = std::min(backoff_ * 2, opts_.backoff_max);
    return;
  }
  start_failed(kill_reason_.empty() ? fmt::format("worker pid {} {} before it was ready", old_pid, desc)
                                    : fmt::format("{} ({})", kill_reason_, desc));
}

void Worker::stop(std::function<void()> done) {
  stop_requested_ = true;
  switch (state_) {
    case WorkerState::kStopped:
    case WorkerState::kFailed:
    case WorkerState::kRemoved:
      loop_.post(std::move(done));
      return;
    case WorkerState::kRestarting:
      loop_.cancel_timer(restart_timer_);
      restart_timer_ = 0;
      set_state(WorkerState::kStopped);
      loop_.post(std::move(done));
      return;
    case WorkerState::kStopping:
      stop_waiters_.push_back(std::move(done));
      return;
    case WorkerState::kStarting:
    case WorkerState::kRunning:
      break;
  }
  stop_waiters_.push_back(std::move(done));
  bool was_running = state_ == WorkerState::kRunning && control_;
  set_state(WorkerState::kStopping);
  if (was_running) {
    // Only the exit matters; the reply is for the log.
    uint64_t id = next_id_++;
    Pending p{"shutdown", [vm = vm_](Result<json> r) {
                if (!r.ok()) spdlog::debug("vm {}: shutdown request: {}", vm, r.error().message);
              },
              0};
    pending_.emplace(id, std::move(p));
    send(control::to_json(control::WorkerRequest{control::WorkerOp::kShutdown, id, std::nullopt}));
  } else {
    signal(SIGTERM);
  }
  loop_.cancel_timer(kill_timer_);
  kill_timer_ = loop_.add_timer(opts_.stop_timeout, [this] {
    kill_timer_ = 0;
    spdlog::warn("vm {}: worker pid {} did not stop within {} ms; killing it", vm_, pid_, opts_.stop_timeout.count());
    signal(SIGKILL);
  });
}

}  // namespace gpup::gpupd
