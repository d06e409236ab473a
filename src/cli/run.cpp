// gpup run --vm NAME -- CMD [ARGS...]: runs a guest program in a partition.
//
// The guest finds its partition through the environment: GPUP_VRD=unix:<endpoint> (the VM's VRD
// endpoint, where its gpup-vmwp listens) and GPUP_VM=<name>, and its OpenCL ICD loader is pointed at
// gpup's ICD (OCL_ICD_VENDORS=<the gpup-icd directory>, or $GPUP_ICD_DIR), so unmodified OpenCL
// programs see the partition as their one platform and device. gpup waits for it and exits with its
// exit status, or 128+signal when it was killed (127/126 when it cannot be executed, 125 when its
// sandbox cannot be set up).
//
// The guest runs in the partition's sandbox (sandbox.h) unless --no-sandbox; --allow-unsandboxed
// lets it run unconfined, with a warning, on a host that refuses the namespaces.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <thread>

#include <fmt/format.h>

#include "cli/cli.h"
#include "cli/sandbox.h"
#include "cli/terminal.h"

extern char** environ;

namespace gpup::cli {

namespace {

// What the guest process is started with.
struct GuestLaunch {
  std::vector<std::string> argv;
  std::map<std::string, std::string> env;
};

// The vendors directory the guest's ICD loader reads: $GPUP_ICD_DIR when set; else the one in the
// partition's HostDriverStore (where gpupd copied the KMD package's ICD and its manifest at VM
// start); else, for a KMD whose package carries no ICD, the build tree's.
std::string guest_icd_dir(const std::string& driver_store) {
  const char* icd_dir = std::getenv("GPUP_ICD_DIR");
  if (icd_dir && *icd_dir) return icd_dir;
  if (!driver_store.empty()) {
    std::string vendors = driver_store + "/OpenCL/vendors";
    struct stat st {};
    if (::stat(vendors.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return vendors;
  }
  return GPUP_DEFAULT_ICD_DIR;
}

// Where the program is on the host: as given when it names a path, else the first executable
// of that name on PATH (empty when there is none; exec reports it).
std::string program_path(const std::string& program, const std::string& path) {
  if (program.find('/') != std::string::npos) return program;
  size_t at = 0;
  while (at <= path.size()) {
    const size_t end = std::min(path.find(':', at), path.size());
    std::string dir = path.substr(at, end - at);
    std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + program;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    at = end + 1;
  }
  return {};
}

// This gpup executable (its tree holds the ICD's libraries when run from a build).
std::string self_exe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

volatile sig_atomic_t g_child = 0;

void forward_signal(int sig) {
  if (g_child > 0) ::kill(g_child, sig);
}

}  // namespace

int cmd_run(const Context& ctx, const std::string& vm_name, const std::vector<std::string>& command,
            const RunOptions& opts) {
  if (command.empty()) throw CliError("run: no command given (gpup run --vm NAME -- CMD [ARGS...])");
  json vm = call(ctx, json{{"op", "vm.show"}, {"name", vm_name}, {"stats", false}});
  std::string state = str(vm, "state");
  // A worker being (re)started after a reset or crash is back within its backoff (at most 5 s)
  // plus its start-up: wait for it rather than fail.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while ((state == "restarting" || state == "starting") && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    vm = call(ctx, json{{"op", "vm.show"}, {"name", vm_name}, {"stats", false}});
    state = str(vm, "state");
  }
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
  launch.env["OCL_ICD_VENDORS"] = guest_icd_dir(str(vm, "driver_store"));

  std::unique_ptr<Sandbox> sandbox;
  std::unique_ptr<TerminalProxy> terminal;
  if (opts.sandbox) {
    SandboxOptions so;
    so.network = opts.network;
    so.runtime_dir = ctx.runtime_dir;
    // gpupd's own view of its state directory (it may differ from this shell's $GPUP_STATE_DIR).
    so.state_dir = str(call(ctx, json{{"op", "status"}}), "state_dir");
    if (so.state_dir.empty()) so.state_dir = ctx.state_dir;
    so.endpoint = endpoint;
    so.driver_store = str(vm, "driver_store");
    so.icd_dir = launch.env["OCL_ICD_VENDORS"];
    so.visible = {program_path(launch.argv.front(), launch.env["PATH"]), self_exe()};
    terminal = TerminalProxy::open();
    if (terminal) {
      so.terminal = terminal->slave();
      so.terminal_fds = terminal->replaced();
    }
    sandbox = std::make_unique<Sandbox>(so);
    sandbox->prepare();
    for (const auto& [k, v] : sandbox->env_overrides()) launch.env[k] = v;
  }

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
  // Unconfined, the guest is in gpup's process group: ^C and ^\ reach it, and gpup just waits.
  // Sandboxed, it has a session of its own: keys typed reach it through its pty when gpup's stdin
  // is a terminal (raw meanwhile), and the signals a terminal gives gpup otherwise are passed on.
  // A SIGTERM or SIGHUP sent to gpup alone is passed on either way.
  struct sigaction ign {}, fwd {}, old_int {}, old_quit {}, old_term {}, old_hup {};
  ign.sa_handler = SIG_IGN;
  fwd.sa_handler = forward_signal;
  ::sigaction(SIGINT, sandbox ? &fwd : &ign, &old_int);
  ::sigaction(SIGQUIT, sandbox ? &fwd : &ign, &old_quit);
  ::sigaction(SIGTERM, &fwd, &old_term);
  ::sigaction(SIGHUP, &fwd, &old_hup);

  std::fflush(nullptr);
  pid_t pid = -1;
  if (sandbox) {
    pid = sandbox->start(argv.data(), envp.data(), errpipe[1]);
    if (pid < 0) {
      int e = errno;
      if (!opts.allow_unsandboxed) {
        ::close(errpipe[0]);
        ::close(errpipe[1]);
        throw CliError(fmt::format("sandbox: cannot create the guest's namespaces: {} (gpup run --allow-unsandboxed "
                                   "runs it unconfined; --no-sandbox never confines)",
                                   std::strerror(e)),
                       125);
      }
      std::fprintf(stderr, "gpup: warning: sandbox unavailable (%s); running the guest unconfined\n", std::strerror(e));
      sandbox.reset();
      terminal.reset();
      ::sigaction(SIGINT, &ign, nullptr);
      ::sigaction(SIGQUIT, &ign, nullptr);
    }
  }
  if (!sandbox) pid = ::fork();
  if (pid < 0) throw CliError(fmt::format("fork: {}", std::strerror(errno)));
  if (pid == 0) {
    ::close(errpipe[0]);
    ::sigaction(SIGINT, &old_int, nullptr);
    ::sigaction(SIGQUIT, &old_quit, nullptr);
    ::sigaction(SIGTERM, &old_term, nullptr);
    ::sigaction(SIGHUP, &old_hup, nullptr);
    ::execvpe(argv[0], argv.data(), envp.data());
    SandboxReport r;
    r.exec_failed = 1;
    r.err = errno;
    ssize_t ignored = ::write(errpipe[1], &r, sizeof r);
    (void)ignored;
    ::_exit(127);
  }
  g_child = pid;
  if (terminal) terminal->start();
  ::close(errpipe[1]);
  SandboxReport report;
  ssize_t n;
  while ((n = ::read(errpipe[0], &report, sizeof report)) < 0 && errno == EINTR) {
  }
  ::close(errpipe[0]);

  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  g_child = 0;
  if (terminal) terminal->finish();
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGQUIT, &old_quit, nullptr);
  ::sigaction(SIGTERM, &old_term, nullptr);
  ::sigaction(SIGHUP, &old_hup, nullptr);
  if (n == sizeof report && report.exec_failed)  // as a shell does: 127 for a command not found, 126 otherwise
    throw CliError(fmt::format("cannot execute {}: {}", command[0], std::strerror(report.err)),
                   report.err == ENOENT ? 127 : 126);
  if (n == sizeof report) {
    report.what[sizeof report.what - 1] = '\0';
    throw CliError(fmt::format("sandbox: {}: {}", report.what, std::strerror(report.err)), 125);
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace gpup::cli
