// gpup run --vm NAME -- CMD [ARGS...]: runs a guest program in a partition.
//
// The guest finds its partition through the environment: GPUP_VRD=unix:<endpoint> (the VM's VRD
// endpoint, where its gpup-vmwp listens) and GPUP_VM=<name>, and its OpenCL ICD loader is pointed at
// gpup's ICD (OCL_ICD_VENDORS=<the gpup-icd directory>, or $GPUP_ICD_DIR), so unmodified OpenCL
// programs see the partition as their one platform and device. gpup waits for it and exits with its
// exit status, or 128+signal when it was killed (127/126 when it cannot be executed).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>

#include <fmt/format.h>

#include "cli/cli.h"

extern char** environ;

namespace gpup::cli {

namespace {

// What the guest process is started with.
struct GuestLaunch {
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;
};

// The sandbox seam. A guest partition on this host will be a sandboxed process group (namespaces,
// seccomp, a memory cgroup) that can reach nothing but its VRD endpoint. Its set-up belongs here:
// prepare() runs in gpup before fork (may fail with a CliError, may allocate), enter() runs in the
// child between fork and exec (async-signal-safe calls only; returns errno or 0). For now there is
// no confinement: the guest runs as a plain child process.
class Sandbox {
 public:
  void prepare(const GuestLaunch&) {}
  int enter() noexcept { return 0; }
};

volatile sig_atomic_t g_child = 0;

void forward_signal(int sig) {
  if (g_child > 0) ::kill(g_child, sig);
}

}  // namespace

int cmd_run(const Context& ctx, const std::string& vm_name, const std::vector<std::string>& command) {
  if (command.empty()) throw CliError("run: no command given (gpup run --vm NAME -- CMD [ARGS...])");
  json vm = call(ctx, json{{"op", "vm.show"}, {"name", vm_name}, {"stats", false}});
  std::string state = str(vm, "state");
  if (state != "running") {
    std::string why = str(vm, "last_error");
    throw CliError(fmt::format("vm {} is not running (state {}{})", vm_name, state, why.empty() ? "" : ": " + why));
  }
  std::string endpoint = str(vm, "endpoint");
  if (endpoint.empty()) throw CliError(fmt::format("vm {}: gpupd reported no endpoint", vm_name));

  GuestLaunch launch;
  launch.argv = command;
  for (char** e = environ; *e; ++e) {
    std::string kv = *e;
    auto eq = kv.find('=');
    if (eq != std::string::npos) launch.env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  launch.env["GPUP_VRD"] = "unix:" + endpoint;
  launch.env["GPUP_VM"] = vm_name;
  // The guest's OpenCL is the partition: its ICD loader sees gpup's ICD and no host platform.
  const char* icd_dir = std::getenv("GPUP_ICD_DIR");
  launch.env["OCL_ICD_VENDORS"] = icd_dir && *icd_dir ? icd_dir : GPUP_DEFAULT_ICD_DIR;

  Sandbox sandbox;
  sandbox.prepare(launch);

  // Everything the child needs is built before fork.
  std::vector<std::string> env_strings;
  for (const auto& [k, v] : launch.env) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp, argv;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  for (auto& a : launch.argv) argv.push_back(a.data());
  argv.push_back(nullptr);

  // exec failures come back through a close-on-exec pipe as an errno.
  int errpipe[2];
  if (::pipe2(errpipe, O_CLOEXEC) != 0) throw CliError(fmt::format("pipe: {}", std::strerror(errno)));
  // While the guest runs, ^C and ^\ go to it (same process group); gpup just waits. A SIGTERM or
  // SIGHUP sent to gpup alone is passed on.
  struct sigaction ign {}, fwd {}, old_int {}, old_quit {}, old_term {}, old_hup {};
  ign.sa_handler = SIG_IGN;
  fwd.sa_handler = forward_signal;
  ::sigaction(SIGINT, &ign, &old_int);
  ::sigaction(SIGQUIT, &ign, &old_quit);
  ::sigaction(SIGTERM, &fwd, &old_term);
  ::sigaction(SIGHUP, &fwd, &old_hup);

  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) throw CliError(fmt::format("fork: {}", std::strerror(errno)));
  if (pid == 0) {
    ::close(errpipe[0]);
    ::sigaction(SIGINT, &old_int, nullptr);
    ::sigaction(SIGQUIT, &old_quit, nullptr);
    ::sigaction(SIGTERM, &old_term, nullptr);
    ::sigaction(SIGHUP, &old_hup, nullptr);
    int err = sandbox.enter();
    if (err == 0) {
      ::execvpe(argv[0], argv.data(), envp.data());
      err = errno;
    }
    ssize_t ignored = ::write(errpipe[1], &err, sizeof err);
    (void)ignored;
    ::_exit(127);
  }
  g_child = pid;
  ::close(errpipe[1]);
  int exec_errno = 0;
  ssize_t n;
  while ((n = ::read(errpipe[0], &exec_errno, sizeof exec_errno)) < 0 && errno == EINTR) {
  }
  ::close(errpipe[0]);

  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  g_child = 0;
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGQUIT, &old_quit, nullptr);
  ::sigaction(SIGTERM, &old_term, nullptr);
  ::sigaction(SIGHUP, &old_hup, nullptr);
  if (n == sizeof exec_errno)  // as a shell does: 127 for a command not found, 126 otherwise
    throw CliError(fmt::format("cannot execute {}: {}", command[0], std::strerror(exec_errno)),
                   exec_errno == ENOENT ? 127 : 126);
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace gpup::cli
