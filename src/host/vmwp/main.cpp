// gpup-vmwp: the worker process of one VM partition. Spawned and supervised by gpupd, which
// configures it over a control socket (JSON lines, see docs/ARCHITECTURE.md); it then serves the
// VM's VRD endpoint, one thread per guest process connected to it. It runs sandboxed
// (seccomp_policy.h): rlimits before the KMD is loaded, the seccomp filter before it reports ready;
// gpupd has put it in its memory cgroup before sending the configuration.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <list>
#include <mutex>
#include <thread>

#include "channel/channel.h"
#include "common/log.h"
#include "host/vmwp/seccomp_policy.h"
#include "host/vmwp/worker.h"

namespace gpup::vmwp {
namespace {

constexpr size_t kMaxControlLine = 1 << 20;

// Reads newline-delimited JSON from gpupd.
class LineReader {
 public:
  explicit LineReader(int fd) : fd_(fd) {}
  // 1: a line; 0: EOF; -1: error or an over-long line.
  int next(std::string& line) {
    for (;;) {
      auto nl = buf_.find('\n');
      if (nl != std::string::npos) {
        line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return 1;
      }
      if (buf_.size() > kMaxControlLine) return -1;
      char tmp[4096];
      ssize_t n = ::read(fd_, tmp, sizeof tmp);
      if (n == 0) return 0;
      if (n < 0) {
        if (errno == EINTR) continue;
        return -1;
      }
      buf_.append(tmp, static_cast<size_t>(n));
    }
  }
  bool buffered() const { return buf_.find('\n') != std::string::npos; }

 private:
  int fd_;
  std::string buf_;
};

void write_line(int fd, const nlohmann::json& j) {
  std::string s = j.dump() + "\n";
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

class ChannelLink : public GuestLink {
 public:
  explicit ChannelLink(channel::Channel& ch) : ch_(ch) {}
  gpup_status send(const proto::Encoded& msg) override {
    auto parts = msg.parts();
    return ch_.send(std::span<const std::span<const uint8_t>>(parts.data(), parts.size()));
  }
  gpup_status send_fd(uint64_t id, int fd) override { return ch_.send_fd(id, fd); }
  gpup_status receive_fd(uint64_t id, UniqueFd& out, int timeout_ms) override {
    return ch_.shares_memory() ? ch_.receive_fd(id, out, timeout_ms) : GPUP_STATUS_NOT_SUPPORTED;
  }
  bool shares_memory() const override { return ch_.shares_memory(); }
  int peer_pid() const override { return ch_.peer_pid(); }

 private:
  channel::Channel& ch_;
};

struct Connection {
  UniqueFd socket;                            // until the handshake has run
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
  auto process = worker.connect(std::make_unique<ChannelLink>(*conn.channel));
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

int run(const std::string& vm, int control_fd) {
  prctl(PR_SET_PDEATHSIG, SIGTERM);
  signal(SIGPIPE, SIG_IGN);
  LineReader control(control_fd);
  std::string line;
  if (control.next(line) != 1) {
    spdlog::error("no configuration from gpupd");
    return 1;
  }
  nlohmann::json cfg = nlohmann::json::parse(line, nullptr, false);
  if (cfg.is_discarded() || cfg.value("op", "") != "configure") {
    write_line(control_fd, {{"event", "error"}, {"message", "first control message is not a valid configure"}});
    return 1;
  }
  if (cfg.contains("log_level") && cfg["log_level"].is_string())
    spdlog::set_level(spdlog::level::from_str(cfg["log_level"].get<std::string>()));
  auto config = parse_worker_config(cfg);
  if (!config.ok()) {
    write_line(control_fd, {{"event", "error"}, {"message", config.error().message}});
    return 1;
  }
  if (config->vm_name != vm) {
    write_line(control_fd, {{"event", "error"}, {"message", "configure names another VM"}});
    return 1;
  }
  const std::string endpoint = cfg.value("endpoint", std::string());
  if (endpoint.empty()) {
    write_line(control_fd, {{"event", "error"}, {"message", "configure has no endpoint"}});
    return 1;
  }

  if (auto s = apply_worker_rlimits(); !s.ok()) {
    write_line(control_fd, {{"event", "error"}, {"message", s.error().message}});
    return 1;
  }

  Worker worker(*config);
  if (auto s = worker.start(); !s.ok()) {
    spdlog::error("{}", s.error().describe());
    write_line(control_fd, {{"event", "error"}, {"message", s.error().message}});
    return 1;
  }
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(endpoint).parent_path(), ec);
  auto listener = channel::Listener::listen_unix(endpoint);
  if (!listener.ok()) {
    write_line(control_fd, {{"event", "error"}, {"message", listener.error().message}});
    return 1;
  }
  chmod(endpoint.c_str(), 0666);
  // The loop only accepts; a client gone between poll() and accept4() must not block it.
  fcntl(listener->fd(), F_SETFL, fcntl(listener->fd(), F_GETFL) | O_NONBLOCK);
  // From here on guest work runs: the KMD is loaded and its threads exist (TSYNC covers them).
  if (auto s = install_worker_seccomp(); !s.ok()) {
    spdlog::error("{}", s.error().message);
    write_line(control_fd, {{"event", "error"}, {"message", s.error().message}});
    return 1;
  }
  write_line(control_fd, {{"event", "ready"}, {"endpoint", endpoint}, {"pid", getpid()}});

  std::list<Connection> connections;
  bool running = true;
  while (running) {
    for (auto it = connections.begin(); it != connections.end();) {
      if (it->done) {
        it->thread.join();
        it = connections.erase(it);
      } else {
        ++it;
      }
    }
    pollfd fds[2] = {{listener->fd(), POLLIN, 0}, {control_fd, POLLIN, 0}};
    int n = control.buffered() ? 1 : poll(fds, 2, 500);
    if (n < 0 && errno != EINTR) break;
    if (fds[0].revents & POLLIN) {
      UniqueFd sock(::accept4(listener->fd(), nullptr, nullptr, SOCK_CLOEXEC));
      if (sock) {
        auto& c = connections.emplace_back();
        c.socket = std::move(sock);
        c.thread = std::thread([&worker, &c] { serve(worker, c); });
      } else if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
        spdlog::warn("accept: {}", std::strerror(errno));
      }
    }
    if ((fds[1].revents & (POLLIN | POLLHUP | POLLERR)) || control.buffered()) {
      int r = control.next(line);
      if (r != 1) {
        spdlog::info("control channel closed; shutting down");
        break;
      }
      auto req = nlohmann::json::parse(line, nullptr, false);
      // gpupd numbers every request from 1; anything else is not a request to answer.
      if (req.is_discarded() || !req.is_object() || !req.contains("id") || !req["id"].is_number_unsigned() ||
          req["id"].get<uint64_t>() == 0) {
        spdlog::warn("ignoring a malformed control line from gpupd");
        continue;
      }
      const std::string op = req.value("op", "");
      nlohmann::json rep = {{"reply", req.value("id", 0)}, {"ok", true}};
      if (op == "stats") {
        rep["stats"] = worker.stats_json();
      } else if (op == "update") {
        nlohmann::json merged = {{"vm", req.value("vm", nlohmann::json::object())}, {"adapter", cfg["adapter"]}};
        auto c = parse_worker_config(merged);
        auto s = c.ok() ? worker.update(*c) : Status(c.error());
        if (!s.ok()) rep = {{"reply", req.value("id", 0)}, {"ok", false}, {"error", s.error().message}};
      } else if (op == "shutdown") {
        running = false;
      } else {
        rep = {{"reply", req.value("id", 0)}, {"ok", false}, {"error", "unknown op " + op}};
      }
      write_line(control_fd, rep);
    }
  }
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
