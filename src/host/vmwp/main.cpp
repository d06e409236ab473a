// gpup-vmwp: the worker process of one VM partition. Started by gpupd in its jail (gpupd's
// jail.h: own uid, namespaces and root, no capabilities, its cgroups already joined) and
// configured over a control socket on fd 3 (JSON lines; every line is a record of
// control/protocol.h, read and written only through its codec). It then serves the guests gpupd
// accepted on the VM's VRD endpoint and hands over on fd 4, one thread per guest process. It adds
// its own confinement (seccomp_policy.h): rlimits before the KMD is loaded, the seccomp allow-list
// before it reports ready.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <list>
#include <map>
#include <mutex>
#include <thread>

#include "channel/channel.h"
#include "common/log.h"
#include "host/control/protocol.h"
#include "host/vmwp/seccomp_policy.h"
#include "host/vmwp/worker.h"

namespace gpup::vmwp {
namespace {

// Lines from gpupd, in control/json_lines.h's framing (the fd blocks: poll() says when to read).
class ControlReader {
 public:
  explicit ControlReader(int fd) : fd_(fd) {}
  // 1: a line; 0: EOF; -1: a read error or an over-long line.
  int next(std::string& line) {
    for (;;) {
      if (auto l = lines_.pop()) {
        line = std::move(*l);
        return 1;
      }
      char tmp[16384];
      ssize_t n = ::read(fd_, tmp, sizeof tmp);
      if (n == 0) return 0;
      if (n < 0) {
        if (errno == EINTR) continue;
        return -1;
      }
      if (!lines_.append(std::string_view(tmp, static_cast<size_t>(n))).ok()) return -1;
    }
  }
  bool buffered() const { return lines_.has_line(); }

 private:
  int fd_;
  control::LineReader lines_{control::kMaxToWorkerLine};
};

// Serializes whole lines from the control loop and from guest threads asking for memory.
std::mutex g_write_mu;

void write_line(int fd, const control::json& j) {
  const std::string s = control::encode_line(j);
  std::lock_guard l(g_write_mu);
  const char* p = s.data();
  size_t left = s.size();
  while (left) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    p += n;
    left -= static_cast<size_t>(n);
  }
}

// Every line to gpupd is one of control/protocol.h's records, written by its encoder.
template <typename Message>
void send(int fd, const Message& m) {
  write_line(fd, control::to_json(m));
}

// The worker's side of gpupd's memory arbiter (control::VramAsk / VramAnswer): a guest thread
// writes its ask and waits; the control loop hands it gpupd's answer.
class GpupdVramBroker : public VramBroker {
 public:
  explicit GpupdVramBroker(int fd) : fd_(fd) {}

  Result<Grant> ask(uint64_t need, uint64_t want) override { return round_trip(control::VramAsk{0, false, need, want}); }
  Result<Grant> query() override { return round_trip(control::VramAsk{0, true, 0, 0}); }
  void release(uint64_t hold) override {
    control::VramAsk a{0, false, hold, hold};
    {
      std::lock_guard l(mu_);
      if (closed_) return;
      a.id = next_++;  // its answer is not waited for
    }
    send(fd_, a);
  }
  // From the control loop.
  void on_answer(const control::VramAnswer& a) {
    std::lock_guard l(mu_);
    auto it = waiting_.find(a.id);
    if (it == waiting_.end()) return;  // a release, or a request that timed out
    it->second = a;
    cv_.notify_all();
  }
  // gpupd is gone or the worker stops: nobody waits any more.
  void close() {
    std::lock_guard l(mu_);
    closed_ = true;
    cv_.notify_all();
  }

 private:
  static constexpr auto kTimeout = std::chrono::seconds(5);

  Result<Grant> round_trip(control::VramAsk ask) {
    std::unique_lock l(mu_);
    if (closed_) return Error(GPUP_STATUS_CONNECTION_LOST, "the control channel to gpupd is closed");
    const uint64_t id = next_++;
    ask.id = id;
    waiting_[id] = std::nullopt;
    l.unlock();
    send(fd_, ask);
    l.lock();
    cv_.wait_for(l, kTimeout, [&] { return closed_ || waiting_[id].has_value(); });
    std::optional<control::VramAnswer> a = std::move(waiting_[id]);
    waiting_.erase(id);
    if (!a) return Error(GPUP_STATUS_TIMEOUT, closed_ ? "the control channel to gpupd closed" : "no answer within 5 s");
    return Grant{a->granted, a->hold, a->borrowable, a->why};
  }

  int fd_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t next_ = 1;
  bool closed_ = false;
  std::map<uint64_t, std::optional<control::VramAnswer>> waiting_;
};

// The worker's side of gpupd's device-time scheduler (control::SchedRequest / SchedNotice): wants
// and releases go out as they happen; grants and yields come in through the control loop.
class GpupdDeviceTimeLink : public DeviceTimeLink {
 public:
  explicit GpupdDeviceTimeLink(int fd) : fd_(fd) {}
  void want() override { send(fd_, control::SchedRequest{control::SchedRequest::Kind::kWant}); }
  void release(uint64_t busy_us, bool more) override {
    send(fd_, control::SchedRequest{control::SchedRequest::Kind::kRelease, std::min(busy_us, control::kMaxBusyUs), more});
  }
  void reset(const control::json& tdr_event) override {
    write_line(fd_, tdr_event);  // control::TdrEvent, encoded by Worker::on_hang
    // The hung work cannot be taken back from the KMD: the partition is reset by ending this
    // process (its guests were told), and gpupd starts a new worker.
    std::_Exit(control::kWorkerExitReset);
  }

 private:
  int fd_;
};

class ChannelLink : public GuestLink {
 public:
  // pid: the guest's, in the host's pid namespace, as gpupd's SO_PEERCRED saw it (the worker, in
  // a pid namespace of its own, cannot see it); -1 when unknown.
  ChannelLink(channel::Channel& ch, int pid) : ch_(ch), pid_(pid) {}
  gpup_status send(const proto::Encoded& msg) override {
    auto parts = msg.parts();
    return ch_.send(std::span<const std::span<const uint8_t>>(parts.data(), parts.size()));
  }
  gpup_status send_fd(uint64_t id, int fd) override { return ch_.send_fd(id, fd); }
  gpup_status receive_fd(uint64_t id, UniqueFd& out, int timeout_ms) override {
    return ch_.shares_memory() ? ch_.receive_fd(id, out, timeout_ms) : GPUP_STATUS_NOT_SUPPORTED;
  }
  bool shares_memory() const override { return ch_.shares_memory(); }
  int peer_pid() const override { return pid_ > 0 ? pid_ : ch_.peer_pid(); }

 private:
  channel::Channel& ch_;
  int pid_;
};

struct Connection {
  UniqueFd socket;                            // until the handshake has run
  int pid = -1;                               // the guest's, from gpupd
  std::mutex mu;                              // guards channel against shutdown() from the main loop
  std::unique_ptr<channel::Channel> channel;
  bool stopping = false;
  std::thread thread;
  std::atomic<bool> done{false};

  void shutdown() {
    std::lock_guard l(mu);
    stopping = true;
    if (channel) channel->shutdown();
    else if (socket) ::shutdown(socket.get(), SHUT_RDWR);  // ends a handshake in progress
  }
};

// Runs on the connection's own thread: the channel handshake (bounded by the channel's handshake
// timeout) happens here, so a slow or hostile client cannot hold up the accept loop.
void serve(Worker& worker, Connection& conn) {
  auto ch = channel::accept_on_socket(std::move(conn.socket));
  if (!ch.ok()) {
    spdlog::warn("guest connection refused during the channel handshake: {}", ch.error().describe());
    conn.done = true;
    return;
  }
  {
    std::lock_guard l(conn.mu);
    conn.channel = std::move(*ch);
    if (conn.stopping) conn.channel->shutdown();
  }
  auto process = worker.connect(std::make_unique<ChannelLink>(*conn.channel, conn.pid));
  std::vector<uint8_t> msg;
  for (;;) {
    gpup_status st = conn.channel->receive(msg);
    if (st != GPUP_STATUS_SUCCESS) break;  // CONNECTION_LOST: the guest closed or died
    auto r = process->handle(msg);
    if (!r.ok()) {
      spdlog::warn("dropping guest connection: {}", r.error().describe());
      break;
    }
  }
  worker.disconnect(process);
  conn.channel->shutdown();
  conn.done = true;
}

// One guest connection gpupd accepted (control/protocol.h GuestHandoff): 1 with sock and pid set,
// 0 when gpupd closed the socket, -1 on a malformed message (ignored).
int receive_guest(int fd, UniqueFd& sock, int& pid) {
  uint8_t data[control::kGuestHandoffSize];
  std::vector<UniqueFd> fds;
  ReceivedFds info;
  const ssize_t n = receive_with_fds(fd, data, sizeof data, &fds, 1, MSG_DONTWAIT, &info);
  if (n == 0) return 0;
  if (n < 0) return errno == EAGAIN || errno == EINTR ? -1 : 0;
  if (n != ssize_t(sizeof data) || info.extra || info.fds_truncated || info.data_truncated || fds.size() != 1)
    return -1;
  sock = std::move(fds.front());
  pid = control::decode_guest_handoff(data).pid;
  return 1;
}

int run(const std::string& vm, int control_fd) {
  // gpupd gone: this worker goes (SIGKILL: as pid 1 of its namespace, it ignores the others unless
  // it handles them); a SIGTERM from gpupd before it is configured ends it.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  signal(SIGTERM, [](int) { std::_Exit(0); });
  signal(SIGPIPE, SIG_IGN);
  const int guest_fd = control::kWorkerGuestFd;
  ControlReader from_gpupd(control_fd);
  auto refuse = [control_fd](const std::string& why) {
    send(control_fd, control::ErrorEvent{why});
    return 1;
  };
  std::string line;
  if (from_gpupd.next(line) != 1) {
    spdlog::error("no configuration from gpupd");
    return 1;
  }
  auto msg = control::parse_object_line(line);
  auto configured = msg ? control::configure_from_json(*msg) : Result<control::ConfigureMessage>(msg.error());
  if (!configured) return refuse("bad configure: " + configured.error().message);
  control::ConfigureMessage cfg = std::move(*configured);
  spdlog::set_level(spdlog::level::from_str(cfg.log_level));
  if (cfg.vm.name != vm) return refuse("configure names another VM");
  if (auto s = apply_worker_rlimits(); !s.ok()) return refuse(s.error().message);

  Worker worker(worker_config(cfg));
  GpupdVramBroker broker(control_fd);
  worker.set_vram_broker(&broker);
  GpupdDeviceTimeLink device_time(control_fd);
  worker.set_device_time_link(&device_time);
  if (auto s = worker.start(); !s.ok()) {
    spdlog::error("{}", s.error().describe());
    return refuse(s.error().message);
  }
  // gpupd listens on the endpoint and checks who connects; accepted guests arrive on guest_fd.
  // From here on guest work runs: the KMD is loaded and its threads exist (TSYNC covers them).
  if (auto s = install_worker_seccomp(); !s.ok()) {
    spdlog::error("{}", s.error().message);
    return refuse(s.error().message);
  }
  send(control_fd, control::ReadyEvent{cfg.endpoint, static_cast<uint32_t>(getpid())});

  std::list<Connection> connections;
  bool running = true;
  auto last_release_tick = std::chrono::steady_clock::now();
  while (running) {
    for (auto it = connections.begin(); it != connections.end();) {
      if (it->done) {
        it->thread.join();
        it = connections.erase(it);
      } else {
        ++it;
      }
    }
    pollfd fds[2] = {{guest_fd, POLLIN, 0}, {control_fd, POLLIN, 0}};
    // About four release ticks a second, however busy the loop is.
    if (auto now = std::chrono::steady_clock::now(); now - last_release_tick >= std::chrono::milliseconds(250)) {
      last_release_tick = now;
      worker.release_idle_vram();
    }
    int n = from_gpupd.buffered() ? 1 : poll(fds, 2, 250);
    if (n < 0 && errno != EINTR) break;
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      UniqueFd sock;
      int pid = -1;
      int r = receive_guest(guest_fd, sock, pid);
      if (r == 1) {
        auto& c = connections.emplace_back();
        c.socket = std::move(sock);
        c.pid = pid;
        c.thread = std::thread([&worker, &c] { serve(worker, c); });
      } else if (r == 0) {
        spdlog::info("guest socket from gpupd closed; shutting down");
        break;
      }
    }
    if ((fds[1].revents & (POLLIN | POLLHUP | POLLERR)) || from_gpupd.buffered()) {
      int r = from_gpupd.next(line);
      if (r != 1) {
        spdlog::info("control channel closed; shutting down");
        break;
      }
      // gpupd's lines, by their leading key: answers, scheduler notices, requests.
      auto in = control::parse_object_line(line);
      if (!in) {
        spdlog::warn("ignoring a malformed control line from gpupd: {}", in.error().message);
        continue;
      }
      if (in->contains("answer")) {
        auto a = control::vram_answer_from_json(*in);
        if (a) broker.on_answer(*a);
        else spdlog::warn("ignoring a malformed answer from gpupd: {}", a.error().message);
        continue;
      }
      if (in->contains("sched")) {
        auto notice = control::sched_notice_from_json(*in);
        if (!notice) spdlog::warn("ignoring a malformed scheduler line from gpupd: {}", notice.error().message);
        else if (notice->kind == control::SchedNotice::Kind::kGrant) worker.on_grant();
        else worker.on_yield(std::chrono::microseconds(notice->after_us), notice->if_idle);
        continue;
      }
      auto req = control::worker_request_from_json(*in);
      if (!req) {
        // A request gpupd numbered gets the reason; anything else is not a request to answer.
        control::ObjectReader id_reader(*in, "request");
        if (auto id = id_reader.u64("id", 1)) send(control_fd, control::WorkerReply{*id, false, req.error().message, {}});
        else spdlog::warn("ignoring a malformed control line from gpupd: {}", req.error().message);
        continue;
      }
      control::WorkerReply rep{req->id, true, {}, std::nullopt};
      switch (req->op) {
        case control::WorkerOp::kStats:
          rep.stats = worker.stats_json();
          break;
        case control::WorkerOp::kUpdate: {
          // New settings of this partition, on the adapter it was configured with.
          control::ConfigureMessage next = cfg;
          next.vm = *req->vm;
          Status s = next.vm.name != cfg.vm.name || next.vm.guid != cfg.vm.guid || next.vm.adapter != cfg.vm.adapter
                         ? Status(Error(GPUP_STATUS_INVALID_PARAMETER, "update names another partition or adapter"))
                         : worker.update(worker_config(next));
          if (s.ok()) cfg = std::move(next);
          else rep = control::WorkerReply{req->id, false, s.error().message, std::nullopt};
          break;
        }
        case control::WorkerOp::kShutdown:
          running = false;
          break;
      }
      send(control_fd, rep);
    }
  }
  broker.close();  // a guest thread waiting for gpupd gives up
  for (auto& c : connections) c.shutdown();
  for (auto& c : connections) c.thread.join();
  worker.stop();
  return 0;
}

}  // namespace
}  // namespace gpup::vmwp

int main(int argc, char** argv) {
  CLI::App app{"gpup-vmwp: the worker process of one gpup VM partition (started by gpupd)"};
  std::string vm;
  int control_fd = -1;
  app.add_option("--vm", vm, "partition name")->required();
  app.add_option("--control-fd", control_fd, "control socket inherited from gpupd")->required();
  CLI11_PARSE(app, argc, argv);
  gpup::init_logging("vmwp:" + vm);
  return gpup::vmwp::run(vm, control_fd);
}
