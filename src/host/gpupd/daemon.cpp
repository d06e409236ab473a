#include "host/gpupd/daemon.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/units.h"
#include "host/gpupd/admission.h"
#include "host/gpupd/driver_store.h"

namespace gpup::gpupd {

using control::json;

static Error sys_error(const std::string& what) {
  return make_error(GPUP_STATUS_INTERNAL, fmt::format("{}: {}", what, std::strerror(errno)));
}

static Error refuse(std::string msg) { return make_error(GPUP_STATUS_INVALID_PARAMETER, std::move(msg)); }

void block_daemon_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

// mkdir -p: missing components are created with mode; existing ones are left as they are.
static Status mkdirs(const std::string& dir, mode_t mode) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    std::string part = dir.substr(0, pos);
    if (::mkdir(part.c_str(), mode) != 0 && errno != EEXIST)
      return make_error(GPUP_STATUS_ACCESS_DENIED, fmt::format("cannot create directory {}: {}", part, std::strerror(errno)));
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return make_error(GPUP_STATUS_ACCESS_DENIED, fmt::format("{} is not a directory", dir));
  return {};
}

// ---------------------------------------------------------------------------------------------
// Operator credentials

std::string operator_refusal(const Peer& p, const Config& config) {
  if (p.uid == 0) return {};
  if (!config.admin_gid)
    return fmt::format("permission denied: uid {} is not root, and no admin_group is configured", p.uid);
  const gid_t admin = *config.admin_gid;
  if (p.gid == admin || std::find(p.groups.begin(), p.groups.end(), admin) != p.groups.end()) return {};
  return fmt::format("permission denied: uid {} is not root and not in the admin group {}", p.uid, config.admin_group);
}

// ---------------------------------------------------------------------------------------------
// PidFile

Result<PidFile> PidFile::acquire(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!fd) return sys_error("cannot open pid file " + path);
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) return sys_error("cannot lock pid file " + path);
    char buf[32] = {};
    ssize_t n = ::pread(fd.get(), buf, sizeof buf - 1, 0);
    std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("?");
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    auto slash = path.rfind('/');
    return make_error(GPUP_STATUS_ALREADY_EXISTS,
                      fmt::format("another gpupd (pid {}) is running on runtime dir {}", control::printable(pid, 20),
                                  slash == std::string::npos ? std::string(".") : path.substr(0, slash)));
  }
  std::string text = fmt::format("{}\n", ::getpid());
  if (::ftruncate(fd.get(), 0) != 0 || ::pwrite(fd.get(), text.data(), text.size(), 0) != ssize_t(text.size()))
    return sys_error("cannot write pid file " + path);
  PidFile p;
  p.path_ = path;
  p.fd_ = std::move(fd);
  return p;
}

PidFile::~PidFile() {
  // Unlinked while still locked, so no second gpupd can take over a file about to vanish.
  if (fd_) ::unlink(path_.c_str());
}

// ---------------------------------------------------------------------------------------------
// Start-up and shutdown

Daemon::Daemon(DaemonOptions opts) : opts_(std::move(opts)), started_(std::chrono::steady_clock::now()) {}

Daemon::~Daemon() {
  // Workers first (they are killed if still alive), then the adapters (pfnStopAdapter).
  vms_.clear();
  for (auto& [id, c] : clients_) {
    loop_.unwatch(c.fd.get());
    loop_.cancel_timer(c.deadline);
  }
  clients_.clear();
  if (listen_fd_) {
    loop_.unwatch(listen_fd_.get());
    listen_fd_.reset();
    ::unlink(socket_path_.c_str());
  }
  adapters_.clear();
}

Result<std::unique_ptr<Daemon>> Daemon::create(DaemonOptions opts) {
  block_daemon_signals();
  std::unique_ptr<Daemon> d(new Daemon(std::move(opts)));
  if (Status s = d->init(); !s.ok()) return s.error();
  return d;
}

Status Daemon::init() {
  if (Status s = loop_.ok(); !s.ok()) return s;
  if (Status s = mkdirs(opts_.runtime_dir, 0755); !s.ok()) return s;
  if (Status s = mkdirs(opts_.state_dir, 0755); !s.ok()) return s;
  if (Status s = mkdirs(fmt::format("{}/{}", opts_.runtime_dir, control::kVmsDirName), 0755); !s.ok()) return s;

  auto pid = PidFile::acquire(control::pid_file_path(opts_.runtime_dir));
  if (!pid) return pid.error();
  pidfile_ = std::move(*pid);

  socket_path_ = control::socket_path(opts_.runtime_dir);
  if (socket_path_.size() > control::kUnixPathMax)
    return refuse(fmt::format("socket path {} is longer than the {}-byte unix socket limit; use a shorter "
                              "--runtime-dir",
                              socket_path_, control::kUnixPathMax));

  state_path_ = fmt::format("{}/{}", opts_.state_dir, control::kStateFileName);
  auto state = load_state(state_path_, opts_.config.tdr_limit_count);
  if (!state) return state.error();
  luids_ = state->luids;
  spdlog::info("state {}: {} partition(s)", state_path_, state->partitions.size());

  // Adapters, each with a LUID that stays the same across restarts.
  bool new_luids = false;
  for (const auto& ac : opts_.config.adapters) {
    auto it = luids_.find(ac.name);
    if (it == luids_.end()) {
      it = luids_.emplace(ac.name, derive_luid(ac.name, luids_)).first;
      new_luids = true;
    }
    Adapter a = open_adapter(ac, it->second);
    if (a.info.state == AdapterState::kReady && opts_.worker.jails) {
      // What its workers' jails must hold besides the libraries (jail.h); a KMD that declares
      // nonsense gets no workers.
      auto needs = parse_jail_needs(a.info.sandbox_needs);
      if (needs) {
        opts_.worker.jails->set_needs(a.info.name, std::move(*needs));
      } else {
        a.info.state = AdapterState::kFailed;
        a.info.error = fmt::format("KMD {}: {}", a.info.driver_name, needs.error().message);
      }
    }
    if (a.info.state == AdapterState::kReady)
      spdlog::info("adapter {}: {} on {} ({}), {} of memory, luid {:#x}{}", a.info.name, a.info.driver_name,
                   a.info.device_name, a.info.device_vendor, format_size(a.info.total_vram), a.info.luid,
                   a.info.paravirtualization ? "" : ", not partitionable (no ParavirtualizationSupported)");
    else
      spdlog::error("adapter {}: failed: {}", a.info.name, a.info.error);
    adapters_.push_back(std::move(a));
  }
  for (auto& vm : state->partitions) {
    std::string name = vm.name;
    auto h = state->resets.find(name);
    vms_.emplace(name, Vm{std::move(vm), nullptr, false, h == state->resets.end() ? ResetHistory{} : h->second});
  }
  if (new_luids)
    if (Status s = persist(specs()); !s.ok()) return s;

  // Operator socket. Any socket file left here is stale: the pid-file lock proves no gpupd runs.
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, socket_path_.c_str(), socket_path_.size() + 1);
  ::unlink(socket_path_.c_str());
  listen_fd_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!listen_fd_) return sys_error("socket");
  // The file is created 0600 (root's only) or, with an admin group, 0660 and then given to that
  // group; never wider. Both happen before listen(), so nobody connects while the group is root's.
  const std::optional<gid_t> admin_gid = opts_.config.admin_gid;
  mode_t old_mask = ::umask(admin_gid ? 0117 : 0177);
  int rc = ::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  int bind_errno = errno;
  ::umask(old_mask);
  if (rc != 0) {
    errno = bind_errno;
    return sys_error("cannot bind " + socket_path_);
  }
  if (admin_gid && ::lchown(socket_path_.c_str(), static_cast<uid_t>(-1), *admin_gid) != 0)
    return sys_error(fmt::format("cannot give {} to the admin group {} (gid {})", socket_path_,
                                 opts_.config.admin_group, *admin_gid));
  if (::listen(listen_fd_.get(), 64) != 0) return sys_error("listen");
  if (Status s = loop_.watch(listen_fd_.get(), EPOLLIN, [this](uint32_t) { on_accept(); }); !s.ok()) return s;

  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  signal_fd_ = UniqueFd(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!signal_fd_) return sys_error("signalfd");
  if (Status s = loop_.watch(signal_fd_.get(), EPOLLIN, [this](uint32_t) { on_signal(); }); !s.ok()) return s;

  // One arbiter for the memory of every adapter, reading the partitions' current settings.
  opts_.worker.vram = std::make_shared<VramArbiter>([this] { return specs(); }, [this](const std::string& adapter) {
    const AdapterInfo* a = find_adapter(adapter);
    return a ? a->total_vram : uint64_t{0};
  });
  // One device-time scheduler for every adapter, ticked by a loop timer at its next deadline.
  SchedPolicy policy;
  policy.quantum = std::chrono::milliseconds(opts_.config.scheduler_quantum_ms);
  policy.tdr_delay = std::chrono::milliseconds(opts_.config.tdr_delay_ms);
  opts_.worker.vidsch = std::make_shared<VidSch>(policy);
  opts_.worker.vidsch->set_wakeup_hook([this](std::optional<VidSch::TimePoint> at) {
    loop_.cancel_timer(vidsch_timer_);
    vidsch_timer_ = 0;
    if (!at) return;
    const auto now = EventLoop::Clock::now();
    const auto delay = *at > now ? std::chrono::ceil<std::chrono::milliseconds>(*at - now) : std::chrono::milliseconds(0);
    vidsch_timer_ = loop_.add_timer(delay, [this] {
      vidsch_timer_ = 0;
      opts_.worker.vidsch->tick(EventLoop::Clock::now());
    });
  });
  opts_.worker.tdr_limit_count = opts_.config.tdr_limit_count;
  opts_.worker.tdr_limit_window = std::chrono::seconds(opts_.config.tdr_limit_window_s);
  // Resets and removals survive a restart of gpupd: written as they happen. A failed write is
  // logged (persist) and the partition carries on; the next change writes everything again.
  opts_.worker.resets_changed = [this](const std::string&) { (void)persist(specs()); };
  for (auto& [name, vm] : vms_) start_worker(vm);
  spdlog::info("gpupd {} listening on {} for {} ({} adapter(s), {} vm(s))", kVersion, socket_path_,
               admin_gid ? fmt::format("root and group {} (gid {})", opts_.config.admin_group, *admin_gid)
                         : std::string("root only"),
               adapters_.size(), vms_.size());
  return {};
}

int Daemon::run() {
  loop_.run();
  finish_shutdown();
  return 0;
}

void Daemon::on_signal() {
  signalfd_siginfo si;
  while (::read(signal_fd_.get(), &si, sizeof si) == sizeof si) {
    if (si.ssi_signo == SIGHUP) {
      spdlog::info("SIGHUP ignored (configuration is read at start only)");
      continue;
    }
    if (shutting_down_) {
      spdlog::warn("{} again: killing the workers now", ::sigabbrev_np(static_cast<int>(si.ssi_signo)));
      for (auto& [name, vm] : vms_) vm.worker.reset();
      loop_.stop();
      return;
    }
    begin_shutdown(fmt::format("SIG{}", ::sigabbrev_np(static_cast<int>(si.ssi_signo))));
  }
}

void Daemon::begin_shutdown(const std::string& why) {
  if (shutting_down_) return;
  shutting_down_ = true;
  spdlog::info("shutting down ({}): stopping {} worker(s)", why, vms_.size());
  // New connections get "not running" from now on.
  loop_.unwatch(listen_fd_.get());
  listen_fd_.reset();
  ::unlink(socket_path_.c_str());

  workers_stopping_ = 0;
  for (auto& [name, vm] : vms_) {
    if (!vm.worker) continue;
    ++workers_stopping_;
    vm.worker->stop([this] {
      if (--workers_stopping_ == 0) loop_.stop();
    });
  }
  if (workers_stopping_ == 0) {
    loop_.stop();
    return;
  }
  // Worker::stop escalates to SIGKILL itself; this only guards against a process that even
  // SIGKILL does not end (stuck in the kernel).
  shutdown_timer_ = loop_.add_timer(opts_.worker.stop_timeout + std::chrono::seconds(5), [this] {
    spdlog::error("workers did not exit in time; leaving");
    loop_.stop();
  });
}

void Daemon::finish_shutdown() {
  loop_.cancel_timer(shutdown_timer_);
  // Best effort: answers still queued for clients (e.g. the reply to "shutdown").
  for (auto& [id, c] : clients_)
    if (!c.out.empty()) (void)control::flush_some(c.fd.get(), c.out);
  for (auto& [name, vm] : vms_) {
    vm.worker.reset();
    ::rmdir(control::vm_dir(opts_.runtime_dir, name).c_str());
  }
  if (listen_fd_) {
    loop_.unwatch(listen_fd_.get());
    listen_fd_.reset();
    ::unlink(socket_path_.c_str());
  }
  spdlog::info("gpupd stopped");
}

// ---------------------------------------------------------------------------------------------
// Partitions and workers

const AdapterInfo* Daemon::find_adapter(const std::string& name) const {
  for (const auto& a : adapters_)
    if (a.info.name == name) return &a.info;
  return nullptr;
}

std::vector<control::VmSpec> Daemon::specs() const {
  std::vector<control::VmSpec> out;
  for (const auto& [name, vm] : vms_) out.push_back(vm.spec);
  return out;
}

Status Daemon::persist(const std::vector<control::VmSpec>& specs) {
  PersistentState s{luids_, specs, {}};
  for (const auto& spec : specs) {
    auto it = vms_.find(spec.name);
    if (it == vms_.end()) continue;  // being added: no history yet
    const Vm& vm = it->second;
    ResetHistory h = vm.worker ? vm.worker->reset_history() : vm.resets;
    if (!h.empty()) s.resets.emplace(spec.name, std::move(h));
  }
  Status st = save_state(state_path_, s);
  if (!st.ok()) spdlog::error("{}", st.error().message);
  return st;
}

Result<control::ConfigureMessage> Daemon::configure_message(const std::string& name) {
  auto it = vms_.find(name);
  if (it == vms_.end()) return refuse(fmt::format("vm {} no longer exists", name));
  const auto& spec = it->second.spec;
  const AdapterInfo* a = find_adapter(spec.adapter);
  if (!a) return refuse(fmt::format("adapter {} is not in the configuration ({})", spec.adapter, opts_.config.source));
  if (a->state != AdapterState::kReady) return refuse(a->not_partitionable_reason());
  if (!a->paravirtualization) return refuse(a->not_partitionable_reason());
  if (a->kmd_path.empty() || a->kmd_path.front() != '/')
    return refuse(fmt::format("adapter {}: KMD path '{}' is not absolute", a->name, a->kmd_path));

  std::string dir = control::vm_dir(opts_.runtime_dir, name);
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) return sys_error("cannot create " + dir);
  std::string endpoint = control::vm_endpoint(opts_.runtime_dir, name);
  ::unlink(endpoint.c_str());  // a stale endpoint from an earlier worker of this VM
  // The guest's files of the KMD package (its UMD), into the VM's HostDriverStore.
  if (Status st = prepare_vm_store(name, a->kmd_path, dir + "/" + kDriverStoreDirName); !st.ok()) return st.error();

  control::ConfigureMessage m;
  m.vm = spec;
  m.adapter = control::AdapterSpec{a->name, a->luid, a->kmd_path, a->config_text};
  m.endpoint = endpoint;
  m.log_level = std::string(spdlog::level::to_string_view(spdlog::get_level()).data(),
                            spdlog::level::to_string_view(spdlog::get_level()).size());
  m.tdr_delay_ms = opts_.config.tdr_delay_ms;
  return m;
}

Worker& Daemon::ensure_worker(Vm& vm) {
  if (!vm.worker) {
    std::string name = vm.spec.name;
    vm.worker = std::make_unique<Worker>(loop_, opts_.worker, name, [this, name] { return configure_message(name); });
    if (!vm.resets.empty()) vm.worker->restore_resets(vm.resets);
    vm.resets = {};
  }
  return *vm.worker;
}

// A partition persisted as removed is left so (Worker::start does not start a removed worker).
void Daemon::start_worker(Vm& vm) { ensure_worker(vm).start(); }

// ---------------------------------------------------------------------------------------------
// Operator socket

// How long a refused connection is kept open for its peer to read why.
static constexpr std::chrono::milliseconds kRefusedLinger{1000};

void Daemon::on_accept() {
  for (;;) {
    UniqueFd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!fd) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) spdlog::error("accept: {}", std::strerror(errno));
      return;
    }
    // Who connected decides before anything it sent is read.
    auto peer = read_peer(fd.get());
    std::string refusal;
    if (!peer) {
      refusal = "permission denied: cannot read the caller's credentials";
      spdlog::warn("operator socket: refused a connection: {}", peer.error().message);
    } else if (refusal = operator_refusal(*peer, opts_.config); !refusal.empty()) {
      spdlog::warn("operator socket: refused {}: {}", to_string(*peer), refusal);
    }
    if (clients_.size() >= opts_.max_clients) {
      std::string msg = control::encode_line(
          json{{"ok", false}, {"error", refusal.empty() ? std::string("gpupd is busy: too many connections") : refusal}});
      (void)control::flush_some(fd.get(), msg);
      continue;
    }
    uint64_t id = next_client_++;
    Client& c = clients_[id];
    c.fd = std::move(fd);
    if (peer) c.peer = std::move(*peer);
    if (Status s = loop_.watch(c.fd.get(), EPOLLIN, [this, id](uint32_t ev) { on_client(id, ev); }); !s.ok()) {
      spdlog::error("{}", s.error().message);
      clients_.erase(id);
      continue;
    }
    if (!refusal.empty()) {
      refuse_client(id, refusal);
      continue;
    }
    arm_client_deadline(id);
  }
}

// The refusal goes out at once and nothing the peer sends is parsed. The connection stays open a
// moment, its input read and dropped, until the peer closes: closed at once, it could make the
// peer's write of its request fail (EPIPE) or its read end in a reset before it sees why.
void Daemon::refuse_client(uint64_t id, const std::string& why) {
  Client& c = clients_.at(id);
  c.refused = true;
  c.out = control::encode_line(json{{"ok", false}, {"error", why}});
  auto done = control::flush_some(c.fd.get(), c.out);
  if (!done || !*done) return close_client(id);  // a new socket takes one short line, or the peer is gone
  ::shutdown(c.fd.get(), SHUT_WR);
  c.deadline = loop_.add_timer(std::min(opts_.client_timeout, kRefusedLinger), [this, id] {
    auto it = clients_.find(id);
    if (it == clients_.end()) return;
    it->second.deadline = 0;
    close_client(id);
  });
}

void Daemon::drain_refused(uint64_t id) {
  int fd = clients_.at(id).fd.get();
  char buf[4096];
  // Bounded per wake-up so a peer that keeps writing cannot hold the loop; the deadline ends it.
  for (int i = 0; i < 16; ++i) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) continue;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    return close_client(id);  // closed by the peer, or an error
  }
}

void Daemon::arm_client_deadline(uint64_t id) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  loop_.cancel_timer(it->second.deadline);
  it->second.deadline = loop_.add_timer(opts_.client_timeout, [this, id] {
    auto c = clients_.find(id);
    if (c == clients_.end()) return;
    c->second.deadline = 0;
    spdlog::debug("client {}: idle for {} ms; closed", id, opts_.client_timeout.count());
    close_client(id);
  });
}

void Daemon::close_client(uint64_t id) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  loop_.unwatch(it->second.fd.get());
  loop_.cancel_timer(it->second.deadline);
  clients_.erase(it);
}

void Daemon::on_client(uint64_t id, uint32_t events) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  Client& c = it->second;
  if (c.refused) return drain_refused(id);
  if (events & EPOLLOUT) {
    auto done = control::flush_some(c.fd.get(), c.out);
    if (!done) return close_client(id);
    if (!*done) return;
    if (c.eof) return close_client(id);
    loop_.set_events(c.fd.get(), EPOLLIN);
    return next_request(id);
  }
  if (c.busy) {
    // Only a hang-up or an error can be reported while a request is in progress (no events are
    // asked for). The reply has nowhere to go: drop the client; the request still completes.
    if (events & (EPOLLHUP | EPOLLERR)) close_client(id);
    return;
  }
  if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
  std::string err;
  auto outcome = control::read_lines(c.fd.get(), c.in, &err, control::kMaxRequestLine + 1);
  if (outcome == control::ReadOutcome::kError) {
    spdlog::warn("client {}: {}; closing", id, err);
    // Answer what can be answered, then drop the connection.
    c.out += control::encode_line(json{{"ok", false}, {"error", "bad request: " + err}});
    (void)control::flush_some(c.fd.get(), c.out);
    return close_client(id);
  }
  if (outcome == control::ReadOutcome::kEof) c.eof = true;
  next_request(id);
}

void Daemon::next_request(uint64_t id) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  Client& c = it->second;
  if (c.busy) return;
  auto line = c.in.pop();
  if (!line) {
    if (c.eof) return close_client(id);
    return;
  }
  c.busy = true;
  loop_.cancel_timer(c.deadline);
  c.deadline = 0;
  loop_.set_events(c.fd.get(), 0);  // one request at a time; the rest waits in the kernel
  auto req = control::parse_object_line(*line);
  if (!req) return send_reply(id, refuse("bad request: " + req.error().message));
  Peer peer = c.peer;  // a reply may close the client, and c with it, while dispatch runs
  dispatch(peer, *req, replier(id));
}

Daemon::Reply Daemon::replier(uint64_t id) {
  return [this, id](Result<json> r) { send_reply(id, std::move(r)); };
}

void Daemon::send_reply(uint64_t id, Result<json> r) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;  // the client went away meanwhile
  Client& c = it->second;
  json reply = r.ok() ? json{{"ok", true}, {"result", std::move(r.value())}} : json{{"ok", false}, {"error", r.error().message}};
  c.out += control::encode_line(reply);
  c.busy = false;
  arm_client_deadline(id);  // bounds both the write and the wait for a next request
  auto done = control::flush_some(c.fd.get(), c.out);
  if (!done) return close_client(id);
  if (!*done) {
    loop_.set_events(c.fd.get(), EPOLLOUT);
    return;
  }
  if (c.eof && !c.in.has_line()) return close_client(id);
  loop_.set_events(c.fd.get(), EPOLLIN);
  if (c.in.has_line()) loop_.post([this, id] { next_request(id); });
}

// Operator requests. Each is {"op":...} plus:
//   status                         -> {pid, version, uptime_s, adapters, vms, runtime_dir, state_dir, config}
//   adapters                       -> [adapter, ...]                     (adapters_json)
//   vm.add    {"vm":{name, adapter?, min_vram?, max_vram?, optimal_vram?, compute_weight?,
//                    max_compute?, secure?}}  (sizes: bytes or "256MiB") -> vm, once its worker settled
//   vm.list                        -> [vm, ...]                          (vm_json)
//   vm.show   {"name", "stats"?:bool=true}  -> vm + "stats" (or "stats_error")
//   vm.set    {"name", "vm":{min_vram?, max_vram?, optimal_vram?, compute_weight?, max_compute?}}
//                                  -> vm, after the worker applied it (pfnSetVirtualMachineData)
//   vm.remove {"name"}             -> {"removed": name}, after its worker stopped
//   vm.start  {"name"}             -> vm (restarts a failed or stopped worker; not a removed one)
//   vm.reset  {"name"}             -> vm (forgets its recent resets, starts a removed partition again)
//   shutdown                       -> {"pid"}; gpupd then stops its workers and exits 0
// A new op needs: an entry here, its handler validating every field (ObjectReader::only), a CLI
// command and a test; one that changes anything, an entry in changes_state.

// Ops that change partitions, workers or gpupd itself: each request is logged with who sent it.
static bool changes_state(std::string_view op) {
  return op == "vm.add" || op == "vm.set" || op == "vm.remove" || op == "vm.start" || op == "vm.reset" ||
         op == "shutdown";
}

// " NAME" for the partition a request names (vm.add: vm.name), for the log; "" if none.
static std::string request_target(const json& req) {
  const json* name = nullptr;
  if (auto it = req.find("name"); it != req.end()) {
    name = &*it;
  } else if (auto vm = req.find("vm"); vm != req.end() && vm->is_object()) {
    if (auto n = vm->find("name"); n != vm->end()) name = &*n;
  }
  if (!name || !name->is_string()) return {};
  return " " + control::printable(name->get_ref<const std::string&>(), 64);
}

void Daemon::dispatch(const Peer& peer, const json& req, Reply reply) {
  control::ObjectReader r(req, "request");
  auto op = r.str("op", 64);
  if (!op) return reply(refuse(r.error()));
  if (changes_state(*op)) spdlog::info("{}{} requested by {}", *op, request_target(req), to_string(peer));
  if (shutting_down_ && *op != "status") return reply(refuse("gpupd is shutting down"));

  auto simple = [&](std::initializer_list<std::string_view> fields) {
    r.only(fields);
    if (!r.ok()) reply(refuse(r.error()));
    return r.ok();
  };
  if (*op == "status") {
    if (simple({"op"})) reply(status_json());
  } else if (*op == "adapters") {
    if (simple({"op"})) reply(adapters_json());
  } else if (*op == "vm.list") {
    if (simple({"op"})) {
      json list = json::array();
      for (const auto& [name, vm] : vms_) list.push_back(vm_json(vm));
      reply(list);
    }
  } else if (*op == "vm.add") {
    op_vm_add(req, std::move(reply));
  } else if (*op == "vm.show") {
    op_vm_show(req, std::move(reply));
  } else if (*op == "vm.set") {
    op_vm_set(req, std::move(reply));
  } else if (*op == "vm.remove") {
    op_vm_remove(req, std::move(reply));
  } else if (*op == "vm.start" || *op == "vm.reset") {
    op_vm_start(req, std::move(reply));
  } else if (*op == "shutdown") {
    if (simple({"op"})) {
      reply(json{{"pid", ::getpid()}});
      loop_.post([this] { begin_shutdown("shutdown request"); });
    }
  } else {
    spdlog::warn("unknown op '{}' from {} refused", control::printable(*op, 64), to_string(peer));
    reply(refuse(fmt::format("unknown op '{}'", control::printable(*op, 64))));
  }
}

json Daemon::status_json() const {
  auto up = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - started_).count();
  size_t running = 0;
  for (const auto& [name, vm] : vms_)
    if (vm.worker && vm.worker->state() == WorkerState::kRunning) ++running;
  return json{{"pid", ::getpid()},
              {"version", kVersion},
              {"uptime_s", up},
              {"adapters", adapters_.size()},
              {"vms", vms_.size()},
              {"vms_running", running},
              {"runtime_dir", opts_.runtime_dir},
              {"state_dir", opts_.state_dir},
              {"config", opts_.config.source},
              {"shutting_down", shutting_down_}};
}

json Daemon::adapters_json() const {
  auto all = specs();
  json list = json::array();
  for (const auto& ad : adapters_) {
    const AdapterInfo& a = ad.info;
    uint64_t reserved = reserved_vram(all, a.name);
    size_t count = 0;
    for (const auto& vm : all) count += vm.adapter == a.name;
    json j{{"name", a.name},
           {"luid", a.luid},
           {"kmd", a.kmd},
           {"kmd_path", a.kmd_path},
           {"driver", a.driver_name},
           {"device", json{{"name", a.device_name},
                           {"vendor", a.device_vendor},
                           {"version", a.device_version},
                           {"platform", a.platform},
                           {"compute_units", a.compute_units}}},
           {"state", to_string(a.state)},
           {"partitionable", a.partitionable()},
           {"secure_capable", a.secure_capable},
           {"live_migration", a.live_migration},
           {"total_vram", a.total_vram},
           {"reserved_vram", reserved},
           {"available_vram", a.total_vram > reserved ? a.total_vram - reserved : 0},
           {"borrowed_vram", opts_.worker.vram ? opts_.worker.vram->borrowed_on(a.name) : 0},
           {"partitions", count}};
    if (a.state == AdapterState::kFailed) j["error"] = a.error;
    if (!a.partitionable()) j["reason"] = a.not_partitionable_reason();
    list.push_back(std::move(j));
  }
  return list;
}

json Daemon::vm_json(const Vm& vm) const {
  json j = control::to_json(vm.spec);
  j["endpoint"] = control::vm_endpoint(opts_.runtime_dir, vm.spec.name);
  j["driver_store"] = control::vm_dir(opts_.runtime_dir, vm.spec.name) + "/" + kDriverStoreDirName;
  if (vm.worker) {
    j.update(vm.worker->describe());
  } else {
    j["state"] = to_string(WorkerState::kStopped);
    j["restarts"] = 0;
  }
  if (const AdapterInfo* a = find_adapter(vm.spec.adapter)) j["adapter_luid"] = a->luid;
  return j;
}

void Daemon::op_vm_add(const json& req, Reply reply) {
  control::ObjectReader r(req, "request");
  r.only({"op", "vm"});
  const json* vmj = r.object("vm");
  if (!r.ok()) return reply(refuse(r.error()));
  auto request = parse_vm_request(*vmj, /*for_add=*/true);
  if (!request) return reply(request.error());
  std::string endpoint = control::vm_endpoint(opts_.runtime_dir, request->name);
  if (endpoint.size() > control::kUnixPathMax)
    return reply(refuse(fmt::format("vm {}: its endpoint {} would be longer than the {}-byte unix socket limit; "
                                    "use a shorter name or runtime dir",
                                    request->name, endpoint, control::kUnixPathMax)));
  std::vector<const AdapterInfo*> adapters;
  for (const auto& a : adapters_) adapters.push_back(&a.info);
  auto all = specs();
  auto spec = admit_new_vm(*request, adapters, all, control::new_guid());
  if (spec && opts_.worker.vram)  // the min must also fit what running partitions borrow now
    if (Status s = opts_.worker.vram->check_min(spec->name, spec->adapter, spec->min_vram); !s.ok()) spec = s.error();
  if (!spec) {
    spdlog::info("vm.add {} refused: {}", request->name, spec.error().message);
    return reply(spec.error());
  }
  all.push_back(*spec);
  if (Status s = persist(all); !s.ok()) return reply(s.error());
  std::string name = spec->name;
  Vm& vm = vms_.emplace(name, Vm{std::move(*spec), nullptr, false}).first->second;
  spdlog::info("vm {} added on adapter {}: min {}, max {}, optimal {}, weight {}, max compute {}%{}", name,
               vm.spec.adapter, format_size(vm.spec.min_vram), format_size(vm.spec.max_vram),
               format_size(vm.spec.optimal_vram), vm.spec.compute_weight, vm.spec.max_compute,
               vm.spec.secure ? ", secure" : "");
  start_worker(vm);
  vm.worker->when_settled([this, name, reply = std::move(reply)] {
    auto it = vms_.find(name);
    if (it == vms_.end()) return reply(refuse(fmt::format("vm {} was removed meanwhile", name)));
    reply(vm_json(it->second));
  });
}

void Daemon::op_vm_show(const json& req, Reply reply) {
  control::ObjectReader r(req, "request");
  r.only({"op", "name", "stats"});
  auto name = r.str("name", 256);
  auto want_stats = r.opt_boolean("stats");
  if (!r.ok()) return reply(refuse(r.error()));
  auto it = vms_.find(*name);
  if (it == vms_.end()) return reply(refuse(fmt::format("no vm named '{}'", control::printable(*name, 64))));
  json j = vm_json(it->second);
  Worker* w = it->second.worker.get();
  if (!want_stats.value_or(true)) return reply(j);
  if (!w || w->state() != WorkerState::kRunning) {
    j["stats_error"] = fmt::format("worker is {}", w ? to_string(w->state()) : "stopped");
    return reply(j);
  }
  w->request("stats", json::object(), [this, j = std::move(j), reply = std::move(reply),
                                        vm = *name](Result<json> r) mutable {
    if (!r.ok()) {
      j["stats_error"] = r.error().message;
      return reply(j);
    }
    auto it = r->find("stats");
    auto stats = it == r->end() ? Result<json>(refuse("reply has no stats")) : control::sanitize_worker_stats(*it);
    if (!stats) {
      spdlog::warn("vm {}: worker sent bad stats: {}", vm, stats.error().message);
      j["stats_error"] = "worker sent bad stats: " + stats.error().message;
    } else {
      j["stats"] = std::move(*stats);
    }
    reply(j);
  });
}

void Daemon::op_vm_set(const json& req, Reply reply) {
  control::ObjectReader r(req, "request");
  r.only({"op", "name", "vm"});
  auto name = r.str("name", 256);
  const json* vmj = r.object("vm");
  if (!r.ok()) return reply(refuse(r.error()));
  auto it = vms_.find(*name);
  if (it == vms_.end()) return reply(refuse(fmt::format("no vm named '{}'", control::printable(*name, 64))));
  Vm& vm = it->second;
  if (vm.busy) return reply(refuse(fmt::format("vm {}: another change is in progress", vm.spec.name)));
  auto change = parse_vm_request(*vmj, /*for_add=*/false);
  if (!change) return reply(change.error());
  auto next = admit_vm_change(vm.spec, *change, find_adapter(vm.spec.adapter), specs());
  if (!next) return reply(next.error());
  if (next->min_vram > vm.spec.min_vram && opts_.worker.vram)
    if (Status s = opts_.worker.vram->check_min(vm.spec.name, vm.spec.adapter, next->min_vram); !s.ok())
      return reply(s.error());
  if (*next == vm.spec) return reply(vm_json(vm));

  const control::VmSpec previous = vm.spec;
  vm.spec = *next;
  if (Status s = persist(specs()); !s.ok()) {
    vm.spec = previous;
    return reply(s.error());
  }
  spdlog::info("vm {} changed: min {}, max {}, optimal {}, weight {}, max compute {}%", vm.spec.name,
               format_size(vm.spec.min_vram), format_size(vm.spec.max_vram), format_size(vm.spec.optimal_vram),
               vm.spec.compute_weight, vm.spec.max_compute);
  if (!vm.worker || vm.worker->state() != WorkerState::kRunning) return reply(vm_json(vm));  // applied at next start

  vm.busy = true;
  std::string vname = vm.spec.name;
  vm.worker->request("update", json{{"vm", control::to_json(vm.spec)}},
                     [this, vname, reply = std::move(reply)](Result<json> r) mutable {
                       auto it = vms_.find(vname);
                       if (it == vms_.end()) return reply(refuse(fmt::format("vm {} was removed meanwhile", vname)));
                       Vm& vm = it->second;
                       if (r.ok()) {
                         vm.busy = false;
                         return reply(vm_json(vm));
                       }
                       // The settings are the operator's, not the worker's: one that does not apply
                       // them (its KMD refused, or it did not answer) is restarted with them, so a
                       // worker cannot keep its partition's old weight, cap or memory by refusing.
                       const std::string why = r.error().message;
                       spdlog::warn("vm {}: the worker did not apply the new settings ({}); restarting it with them",
                                    vname, why);
                       vm.worker->stop([this, vname, why, reply = std::move(reply)]() mutable {
                         auto it = vms_.find(vname);
                         if (it == vms_.end()) return reply(refuse(fmt::format("vm {} was removed meanwhile", vname)));
                         it->second.worker->start();
                         it->second.worker->when_settled([this, vname, why, reply = std::move(reply)] {
                           auto it = vms_.find(vname);
                           if (it == vms_.end()) return reply(refuse(fmt::format("vm {} was removed meanwhile", vname)));
                           it->second.busy = false;
                           json j = vm_json(it->second);
                           j["note"] = fmt::format("the worker did not apply the new settings ({}); it was restarted with them",
                                                   why);
                           reply(j);
                         });
                       });
                     });
}

void Daemon::op_vm_remove(const json& req, Reply reply) {
  control::ObjectReader r(req, "request");
  r.only({"op", "name"});
  auto name = r.str("name", 256);
  if (!r.ok()) return reply(refuse(r.error()));
  auto it = vms_.find(*name);
  if (it == vms_.end()) return reply(refuse(fmt::format("no vm named '{}'", control::printable(*name, 64))));
  Vm& vm = it->second;
  if (vm.busy) return reply(refuse(fmt::format("vm {}: another change is in progress", vm.spec.name)));
  vm.busy = true;
  std::string vname = *name;
  auto finish = [this, vname, reply = std::move(reply)] {
    auto it = vms_.find(vname);
    if (it == vms_.end()) return reply(refuse(fmt::format("vm {} was removed meanwhile", vname)));
    std::vector<control::VmSpec> rest;
    for (const auto& [n, v] : vms_)
      if (n != vname) rest.push_back(v.spec);
    if (Status s = persist(rest); !s.ok()) {
      it->second.busy = false;
      return reply(s.error());
    }
    vms_.erase(it);
    std::string dir = control::vm_dir(opts_.runtime_dir, vname);
    ::unlink(control::vm_endpoint(opts_.runtime_dir, vname).c_str());
    remove_store(dir + "/" + kDriverStoreDirName);
    ::rmdir(dir.c_str());
    spdlog::info("vm {} removed", vname);
    reply(json{{"removed", vname}});
  };
  if (vm.worker) vm.worker->stop(std::move(finish));
  else loop_.post(std::move(finish));
}

void Daemon::op_vm_start(const json& req, Reply reply) {
  control::ObjectReader r(req, "request");
  r.only({"op", "name"});
  auto op = r.str("op", 64);
  auto name = r.str("name", 256);
  if (!r.ok()) return reply(refuse(r.error()));
  auto it = vms_.find(*name);
  if (it == vms_.end()) return reply(refuse(fmt::format("no vm named '{}'", control::printable(*name, 64))));
  if (it->second.busy) return reply(refuse(fmt::format("vm {}: another change is in progress", *name)));
  Worker& w = ensure_worker(it->second);
  if (*op == "vm.reset") {
    w.reset();
  } else {
    if (w.state() == WorkerState::kRemoved)
      return reply(refuse(fmt::format("vm {} is removed: {}", *name, w.last_error())));
    w.start();
  }
  std::string vname = *name;
  it->second.worker->when_settled([this, vname, reply = std::move(reply)] {
    auto it = vms_.find(vname);
    if (it == vms_.end()) return reply(refuse(fmt::format("vm {} was removed meanwhile", vname)));
    reply(vm_json(it->second));
  });
}

}  // namespace gpup::gpupd
