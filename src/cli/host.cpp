// gpup host start | stop | status
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include <fmt/format.h>

#include "cli/cli.h"
#include "host/control/client.h"
#include "host/control/json_lines.h"

namespace gpup::cli {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

static constexpr auto kStartTimeout = 30s;
static constexpr auto kStopTimeout = 15s;

static std::string absolute(const std::string& p) {
  std::error_code ec;
  auto a = fs::absolute(p, ec);
  return ec ? p : a.lexically_normal().string();
}

static std::string find_gpupd() {
  std::string beside = self_dir() + "/gpupd";
  if (::access(beside.c_str(), X_OK) == 0) return beside;
  if (const char* path = std::getenv("PATH")) {
    std::string dirs = path;
    size_t start = 0;
    while (start <= dirs.size()) {
      size_t end = dirs.find(':', start);
      if (end == std::string::npos) end = dirs.size();
      std::string candidate = (end > start ? dirs.substr(start, end - start) : std::string(".")) + "/gpupd";
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
      start = end + 1;
    }
  }
  throw CliError(fmt::format("cannot find gpupd (looked beside {} and in $PATH)", self_dir()));
}

static std::string log_tail(const std::string& path, size_t lines) {
  std::ifstream in(path);
  std::deque<std::string> tail;
  std::string line;
  while (std::getline(in, line)) {
    tail.push_back(line);
    if (tail.size() > lines) tail.pop_front();
  }
  std::string out;
  for (auto& l : tail) out += "  " + l + "\n";
  return out;
}

// Whether pid names a live process (a zombie counts as gone: it has finished).
static bool alive(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string content((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  auto paren = content.rfind(')');
  if (paren != std::string::npos && paren + 2 < content.size()) return content[paren + 2] != 'Z';
  return true;
}

int cmd_host_start(const Context& ctx, const std::string& config, const std::string& vmwp, bool foreground) {
  auto running = control::call(ctx.socket(), json{{"op", "status"}}, 2s);
  if (running.ok()) {
    std::cout << fmt::format("gpupd is already running (pid {}) on {}\n", u64(*running, "pid"), ctx.runtime_dir);
    return 0;
  }
  std::string gpupd = find_gpupd();
  std::vector<std::string> args = {gpupd, "--foreground", "--runtime-dir", absolute(ctx.runtime_dir), "--state-dir",
                                   absolute(ctx.state_dir)};
  if (!config.empty()) {
    args.push_back("--config");
    args.push_back(absolute(config));
  }
  if (!vmwp.empty()) {
    args.push_back("--vmwp");
    args.push_back(absolute(vmwp));
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  if (foreground) {
    ::execv(gpupd.c_str(), argv.data());
    throw CliError(fmt::format("cannot execute {}: {}", gpupd, std::strerror(errno)));
  }

  std::error_code ec;
  fs::create_directories(ctx.runtime_dir, ec);
  if (ec) throw CliError(fmt::format("cannot create {}: {}", ctx.runtime_dir, ec.message()));
  std::string log = ctx.log_file();
  int logfd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (logfd < 0) throw CliError(fmt::format("cannot open {}: {}", log, std::strerror(errno)));
  int nullfd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) throw CliError(fmt::format("fork: {}", std::strerror(errno)));
  if (pid == 0) {
    // The daemon: its own session, no terminal, output to the log.
    ::setsid();
    if (nullfd >= 0) ::dup2(nullfd, 0);
    ::dup2(logfd, 1);
    ::dup2(logfd, 2);
    ::execv(gpupd.c_str(), argv.data());
    std::fprintf(stderr, "gpup: cannot execute %s: %s\n", gpupd.c_str(), std::strerror(errno));
    ::_exit(127);
  }
  ::close(logfd);
  if (nullfd >= 0) ::close(nullfd);

  auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  std::string why;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      why = WIFEXITED(status) ? fmt::format("gpupd exited with status {} during start-up", WEXITSTATUS(status))
                              : fmt::format("gpupd was killed by signal {} during start-up", WTERMSIG(status));
      break;
    }
    auto st = control::call(ctx.socket(), json{{"op", "status"}}, 2s);
    if (st.ok() && u64(*st, "pid") == static_cast<uint64_t>(pid)) {
      std::cout << fmt::format("gpupd started (pid {}), runtime dir {}, log {}\n", pid, ctx.runtime_dir, log);
      return 0;
    }
    std::this_thread::sleep_for(50ms);
  }
  if (why.empty()) {
    why = fmt::format("gpupd (pid {}) did not answer within {} s; stopped it", pid, kStartTimeout.count());
    ::kill(pid, SIGTERM);
  }
  std::cerr << fmt::format("last lines of {}:\n{}", log, log_tail(log, 20));
  throw CliError(why);
}

int cmd_host_stop(const Context& ctx) {
  json r = call(ctx, json{{"op", "shutdown"}}, 10s);
  pid_t pid = static_cast<pid_t>(u64(r, "pid"));
  auto deadline = std::chrono::steady_clock::now() + kStopTimeout;
  while (pid > 0 && alive(pid)) {
    if (std::chrono::steady_clock::now() > deadline)
      throw CliError(fmt::format("gpupd (pid {}) did not exit within {} s", pid, kStopTimeout.count()));
    std::this_thread::sleep_for(20ms);
  }
  std::cout << fmt::format("gpupd stopped (pid {})\n", pid);
  return 0;
}

int cmd_host_status(const Context& ctx, bool as_json) {
  json s = call(ctx, json{{"op", "status"}});
  if (as_json) {
    std::cout << control::dump_json(s, 2) << "\n";
    return 0;
  }
  std::cout << fmt::format("gpupd {} running, pid {}, up {}{}\n", str(s, "version"), u64(s, "pid"),
                           format_duration(u64(s, "uptime_s")), flag(s, "shutting_down") ? " (shutting down)" : "");
  std::cout << fmt::format("  runtime dir  {}\n  state dir    {}\n  config       {}\n  adapters     {}\n"
                           "  vms          {} ({} running)\n",
                           str(s, "runtime_dir"), str(s, "state_dir"), str(s, "config"), u64(s, "adapters"),
                           u64(s, "vms"), u64(s, "vms_running"));
  return 0;
}

}  // namespace gpup::cli
