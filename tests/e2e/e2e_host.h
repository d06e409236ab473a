// What the end-to-end suites share: a child process with its output captured, and a real host
// (gpupd + one gpup-vmwp per VM) started through the `gpup` CLI on private runtime/state
// directories. Used by e2e_test.cpp and jail_e2e_test.cpp; needs GPUP_CLI, GPUP_GUEST,
// GPUP_KMD_DIR and GPUP_BUILD_DIR from the build.
#pragma once
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace gpup::e2e {

// A child process with its stdout (and stderr) captured through a pipe, stdin a pipe too.
// run_as >= 0: the child drops to that uid and gid, with no supplementary groups, before exec.
class Child {
 public:
  Child(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env = {}, int run_as = -1) {
    int out[2], in[2];
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(in, O_CLOEXEC) != 0) std::abort();
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], 1);
      dup2(out[1], 2);
      dup2(in[0], 0);
      for (auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
      if (run_as >= 0 && (setgroups(0, nullptr) != 0 || setgid(static_cast<gid_t>(run_as)) != 0 ||
                          setuid(static_cast<uid_t>(run_as)) != 0))
        _exit(126);
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    close(out[1]);
    close(in[0]);
    out_ = out[0];
    in_ = in[1];
  }
  ~Child() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) close(out_);
    if (in_ >= 0) close(in_);
  }
  pid_t pid() const { return pid_; }
  void close_stdin() {
    if (in_ >= 0) close(in_);
    in_ = -1;
  }
  // Reads output until `needle` appears or the timeout passes; returns whether it appeared.
  bool wait_for(const std::string& needle, std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (output_.find(needle) == std::string::npos) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0 || !read_some(static_cast<int>(left.count()))) return output_.find(needle) != std::string::npos;
    }
    return true;
  }
  // Waits for exit (killing it after the timeout); returns the exit code, 128+signal if killed.
  int wait(std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    for (;;) {
      read_some(50);
      pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        output_ += "\n[killed by the test: timeout]\n";
        break;
      }
    }
    reaped_ = true;
    while (read_some(0)) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  const std::string& output() const { return output_; }

 private:
  bool read_some(int timeout_ms) {
    pollfd p{out_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[4096];
    ssize_t n = read(out_, buf, sizeof buf);
    if (n <= 0) return false;
    output_.append(buf, static_cast<size_t>(n));
    return true;
  }
  pid_t pid_ = -1;
  int out_ = -1, in_ = -1;
  bool reaped_ = false;
  std::string output_;
};

// The host's pid of a guest that printed its own pid: gpup run's sandbox gives the guest a pid
// namespace, so the number it knows is the last one of its NSpid line.
// Every sandboxed guest is pid 2 in its own namespace: `command` (a part of the command line,
// arguments joined by spaces) tells them apart.
inline pid_t host_pid_of(pid_t guest_pid, const std::string& command = "guest_e2e") {
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    std::string name = e.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream in(e.path() / "status");
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("NSpid:", 0) != 0) continue;
      std::istringstream ids(line.substr(6));
      std::vector<pid_t> v;
      for (pid_t id; ids >> id;) v.push_back(id);
      if (v.size() >= 2 && v.back() == guest_pid && v.back() != v.front()) {
        // a guest of this test's host: its parent is a sandbox init (pid 1 inside)
        std::ifstream cmd(e.path() / "cmdline");
        std::string line, arg;
        while (std::getline(cmd, arg, '\0')) line += (line.empty() ? "" : " ") + arg;
        if (line.find(command) != std::string::npos) return v.front();
      }
      break;
    }
  }
  return guest_pid;  // not in a pid namespace (gpup run --no-sandbox)
}

struct Run {
  int code;
  std::string out;
};

class Host {
 public:
  explicit Host(const std::string& config_toml) {
    char tmpl[] = "/tmp/gpup-e2e-XXXXXX";
    dir_ = mkdtemp(tmpl);
    env_ = {{"GPUP_RUNTIME_DIR", dir_ + "/run"}, {"GPUP_STATE_DIR", dir_ + "/state"}, {"GPUP_LOG", "info"},
            {"POCL_CACHE_DIR", std::string(GPUP_BUILD_DIR) + "/pocl-cache"}, {"GPUP_KMD_PATH", GPUP_KMD_DIR}};
    config_ = dir_ + "/gpupd.toml";
    std::ofstream(config_) << config_toml;
  }
  ~Host() {
    gpup({"host", "stop"});
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  Run gpup(std::vector<std::string> args, std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
    args.insert(args.begin(), GPUP_CLI);
    Child c(args, env_);
    int code = c.wait(timeout);
    return {code, c.output()};
  }
  std::unique_ptr<Child> guest(const std::string& vm, std::vector<std::string> args,
                               std::map<std::string, std::string> extra_env = {}, const std::string& program = GPUP_GUEST) {
    std::vector<std::string> argv = {GPUP_CLI, "run", "--vm", vm, "--", program};
    argv.insert(argv.end(), args.begin(), args.end());
    auto env = env_;
    for (auto& [k, v] : extra_env) env[k] = v;
    return std::make_unique<Child>(argv, env);
  }
  Run run_guest(const std::string& vm, std::vector<std::string> args, std::map<std::string, std::string> extra_env = {}) {
    auto c = guest(vm, std::move(args), std::move(extra_env));
    int code = c->wait();
    return {code, c->output()};
  }
  // The VM's totals as its worker reports them (through QueryStatistics from a guest).
  std::map<std::string, uint64_t> stats(const std::string& vm) {
    auto r = run_guest(vm, {"stats"});
    std::map<std::string, uint64_t> m;
    auto pos = r.out.find("STATS ");
    if (pos == std::string::npos) return m;
    std::istringstream in(r.out.substr(pos + 6, r.out.find('\n', pos) - pos - 6));
    std::string kv;
    while (in >> kv) {
      auto eq = kv.find('=');
      if (eq != std::string::npos) m[kv.substr(0, eq)] = std::stoull(kv.substr(eq + 1));
    }
    return m;
  }
  const std::string& config() const { return config_; }
  std::string runtime_dir() const { return dir_ + "/run"; }
  // The host's private directory (runtime, state and config below it).
  const std::string& dir() const { return dir_; }
  // The environment every gpup command and guest of this host gets.
  const std::map<std::string, std::string>& env() const { return env_; }

 private:
  std::string dir_, config_;
  std::map<std::string, std::string> env_;
};

}  // namespace gpup::e2e
