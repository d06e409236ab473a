// gpupd: the gpup host daemon. See daemon.h for what it does and config.h for its configuration.
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "common/log.h"
#include "common/units.h"
#include "host/control/protocol.h"
#include "host/gpupd/daemon.h"

namespace {

using namespace gpup;

// fds 0-2 must be open, or a socket could land on one and be clobbered by stdio use.
void ensure_std_fds() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    int n = ::open("/dev/null", O_RDWR);
    if (n >= 0 && n != fd) {
      ::dup2(n, fd);
      ::close(n);
    }
  }
}

std::string self_dir() {
  char buf[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  std::string p(buf, static_cast<size_t>(n));
  return p.substr(0, p.rfind('/'));
}

std::string absolute(const std::string& p) {
  std::error_code ec;
  auto a = std::filesystem::absolute(p, ec);
  return ec ? p : a.lexically_normal().string();
}

// Detaches into the background (new session, stdio to <runtime-dir>/gpupd.log). The parent waits
// for the child to report start-up through a pipe and exits 0 or prints the failure and exits 1.
// Returns the pipe's write end in the child.
int daemonize(const std::string& runtime_dir) {
  std::error_code ec;
  std::filesystem::create_directories(runtime_dir, ec);
  std::string log = runtime_dir + "/" + control::kLogFileName;
  int logfd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (logfd < 0) {
    std::fprintf(stderr, "gpupd: cannot open %s: %s\n", log.c_str(), std::strerror(errno));
    std::exit(1);
  }
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) {
    std::fprintf(stderr, "gpupd: pipe: %s\n", std::strerror(errno));
    std::exit(1);
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    std::fprintf(stderr, "gpupd: fork: %s\n", std::strerror(errno));
    std::exit(1);
  }
  if (pid > 0) {
    ::close(p[1]);
    std::string msg;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(p[0], buf, sizeof buf)) != 0) {
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) break;
      msg.append(buf, static_cast<size_t>(n));
    }
    if (msg == "ok") std::_Exit(0);
    if (msg.empty()) msg = "exited during start-up; see " + log;
    std::fprintf(stderr, "gpupd: %s\n", msg.c_str());
    std::_Exit(1);
  }
  ::close(p[0]);
  ::setsid();
  int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null >= 0) ::dup2(null, 0);
  ::dup2(logfd, 1);
  ::dup2(logfd, 2);
  if (null > 2) ::close(null);
  ::close(logfd);
  return p[1];
}

void notify(int fd, const std::string& msg) {
  if (fd < 0) return;
  ssize_t ignored = ::write(fd, msg.data(), msg.size());
  (void)ignored;
  ::close(fd);
}

}  // namespace

int main(int argc, char** argv) {
  ensure_std_fds();
  CLI::App app{"gpupd: the gpup host daemon (partitions, adapters and VM workers)"};
  std::string config_path;
  std::string runtime_dir = control::default_runtime_dir();
  std::string state_dir = control::default_state_dir();
  std::string vmwp = self_dir() + "/gpup-vmwp";
  bool foreground = false;
  app.add_option("--config", config_path, "TOML configuration file (default: one PoCL adapter, pocl0)");
  app.add_option("--runtime-dir", runtime_dir, "socket, pid file and VM endpoints ($GPUP_RUNTIME_DIR or /run/gpup)");
  app.add_option("--state-dir", state_dir, "persistent partitions ($GPUP_STATE_DIR or /var/lib/gpup)");
  app.add_option("--vmwp", vmwp, "the VM worker program (default: gpup-vmwp beside gpupd)");
  app.add_flag("--foreground", foreground, "stay attached and log to stderr");
  CLI11_PARSE(app, argc, argv);

  gpupd::DaemonOptions opts;
  opts.runtime_dir = absolute(runtime_dir);
  opts.state_dir = absolute(state_dir);
  opts.worker.vmwp_path = absolute(vmwp);
  if (config_path.empty()) {
    opts.config = gpupd::default_config();
  } else {
    auto cfg = gpupd::load_config(absolute(config_path));
    if (!cfg) {
      std::fprintf(stderr, "gpupd: %s\n", cfg.error().message.c_str());
      return 1;
    }
    opts.config = std::move(*cfg);
  }

  int ready_fd = foreground ? -1 : daemonize(opts.runtime_dir);
  init_logging("gpupd");
  gpupd::block_daemon_signals();
  spdlog::info("gpupd {} starting (pid {}), config {}, runtime dir {}, state dir {}, worker {}", gpupd::kVersion,
               ::getpid(), opts.config.source, opts.runtime_dir, opts.state_dir, opts.worker.vmwp_path);
  // Each worker's memory cgroup nests under gpupd's own (cgroup.h); found after daemonizing, as the
  // instance name carries gpupd's final pid.
  opts.worker.memory_overhead = opts.config.worker_memory_overhead;
  opts.worker.memory_cgroups =
      gpupd::MemoryCgroups::create(gpupd::CgroupEnv::from_proc(), "gpupd." + std::to_string(::getpid()));
  if (opts.worker.memory_cgroups->version() == gpupd::CgroupVersion::kNone)
    spdlog::warn("workers run without a memory limit: {}", opts.worker.memory_cgroups->unavailable_reason());
  else
    spdlog::info("worker memory limits: {} under {}, max VRAM + {}", to_string(opts.worker.memory_cgroups->version()),
                 opts.worker.memory_cgroups->own(), format_size(opts.worker.memory_overhead));

  // And its cpu cgroup: the OS's side of the partition's compute weight and cap.
  opts.worker.cpu_cgroups =
      gpupd::CpuCgroups::create(gpupd::CgroupEnv::from_proc(), "gpupd." + std::to_string(::getpid()), 0);
  if (opts.worker.cpu_cgroups->version() == gpupd::CgroupVersion::kNone)
    spdlog::warn("workers run without an OS cpu weight or cap: {}", opts.worker.cpu_cgroups->unavailable_reason());
  else
    spdlog::info("worker cpu weights and caps: {} under {}", to_string(opts.worker.cpu_cgroups->version()),
                 opts.worker.cpu_cgroups->own());

  // And its pids cgroup: a bound on its tasks, and the list of what to kill when it exits.
  opts.worker.pids_cgroups = gpupd::PidsCgroups::create(gpupd::CgroupEnv::from_proc(), "gpupd." + std::to_string(::getpid()));
  if (opts.worker.pids_cgroups->version() == gpupd::CgroupVersion::kNone)
    spdlog::warn("workers run without a bound on their tasks: {}", opts.worker.pids_cgroups->unavailable_reason());

  // Every worker runs in its jail (jail.h), its root built on this empty directory.
  gpupd::JailOptions jail;
  jail.id_base = opts.config.worker_id_base;
  jail.id_count = opts.config.worker_id_count;
  jail.stage_dir = opts.runtime_dir + "/jail";
  if (::mkdir(jail.stage_dir.c_str(), 0700) != 0 && errno != EEXIST) {
    spdlog::critical("cannot create {}: {}", jail.stage_dir, std::strerror(errno));
    notify(ready_fd, "cannot create the jail directory");
    return 1;
  }
  opts.worker.jails = std::make_shared<gpupd::Jails>(jail);
  spdlog::info("workers are jailed: ids {}..{}, namespaces user mount pid ipc uts network cgroup, landlock ABI {}",
               jail.id_base, uint64_t{jail.id_base} + jail.id_count - 1, opts.worker.jails->landlock_abi());

  auto daemon = gpupd::Daemon::create(std::move(opts));
  if (!daemon) {
    spdlog::critical("{}", daemon.error().message);
    notify(ready_fd, daemon.error().message);
    return 1;
  }
  notify(ready_fd, "ok");
  return (*daemon)->run();
}
