// The guest sandbox of `gpup run --vm NAME`: what a guest partition on this host is.
//
// The guest runs in new user, mount, pid, ipc and (unless --network) network namespaces, with
// no_new_privs, no capabilities and a seccomp filter (sandbox_policy(): the reviewed list). It sees:
//   /                      the host's file system, read-only (nosuid, nodev)
//   /etc                   a tmpfs holding only the host's entries on kEtcAllowed (sandbox.cpp):
//                          accounts without passwords, name resolution, the dynamic linker's
//                          cache, certificates, locale and interpreter settings; no shadow files,
//                          no ssh or TLS keys, no sudoers, no gpup configuration
//   its working directory  read-write (unless it is "/"); one inside gpupd's runtime or state
//                          directory, or under /run, is refused
//   /run                   a tmpfs: no host service's socket (but /etc/resolv.conf's target)
//   /tmp, /dev/shm         private tmpfs
//   /dev                   a tmpfs with null zero full random urandom tty only
//   /proc                  its own pid namespace's
//   <runtime dir>          a tmpfs holding only vms/NAME/vrd.sock (its VRD endpoint) and
//                          vms/NAME/HostDriverStore (read-only): no gpupd.sock, no other partition
//   /etc/OpenCL/vendors    a tmpfs listing only the gpup ICD
//   host ICD libraries     each library a host .icd names is covered by an unreadable empty file
//
// Processes: gpup (parent, outside) → init (pid 1 inside: builds the mounts, pivots into the new
// root, reaps, forwards SIGTERM/SIGHUP/SIGINT/SIGQUIT/SIGUSR1/SIGUSR2) → the guest (pid 2: starts
// a session of its own, with its own pty as controlling terminal when gpup run has a terminal,
// drops capabilities, sets no_new_privs, loads the filter, execs). init exits with the guest's status
// (128+signal when it was killed), so gpup run's exit status is the guest's either way.
//
// Threading: gpup is single-threaded; the child side runs between clone and exec and uses only
// what prepare() computed (plus plain system calls and the seccomp library in the guest).
#pragma once
#include <array>
#include <string>
#include <utility>
#include <vector>

namespace gpup::cli {

struct SandboxOptions {
  bool network = false;          // keep the host's network namespace and allow IP sockets
  std::string runtime_dir;       // gpupd's runtime directory (hidden but for this VM's files)
  std::string state_dir;         // gpupd's state directory (hidden)
  std::string endpoint;          // this VM's VRD endpoint (a unix socket inside runtime_dir)
  std::string driver_store;      // this VM's HostDriverStore (may be empty or missing)
  std::string icd_dir;           // the vendors directory whose .icd files the guest's loader gets
  std::string host_vendors_dir = "/etc/OpenCL/vendors";  // the host's, replaced inside
  // Host paths the guest must see even where they live under /tmp (which is private inside): its
  // program and gpup's own tree (the ICD's libraries). Each keeps the /tmp entry holding it
  // visible, read-only.
  std::vector<std::string> visible;
  // The guest's own terminal (terminal.h): the slave it makes its controlling terminal and puts on
  // the fds marked here; -1: none (it still gets a session of its own, with no terminal).
  int terminal = -1;
  std::array<bool, 3> terminal_fds{};
};

// How the child side reports a failure before exec, through a close-on-exec pipe.
struct SandboxReport {
  int exec_failed = 0;  // 1: the program could not be executed (err), 0: sandbox set-up failed
  int err = 0;          // errno
  char what[240] = {};  // the step that failed ("mount tmpfs on /dev")
};

class Sandbox {
 public:
  explicit Sandbox(SandboxOptions opts) : opts_(std::move(opts)) {}
  ~Sandbox();

  // In gpup, before anything is started: resolves paths, reads the ICD files, finds the host's ICD
  // libraries, makes the scratch directory. Throws CliError.
  void prepare();

  // The environment changes the guest needs inside (OCL_ICD_VENDORS=/etc/OpenCL/vendors).
  std::vector<std::pair<std::string, std::string>> env_overrides() const;

  // Starts init and the guest. Returns init's pid (its exit status is the guest's) or -1 with
  // errno set when the namespaces cannot be created. report_fd: the write end of a close-on-exec
  // pipe for a SandboxReport.
  pid_t start(char* const argv[], char* const envp[], int report_fd);

  // The host libraries hidden inside, for messages and tests.
  const std::vector<std::string>& hidden_libraries() const { return hidden_libs_; }

 private:
  [[noreturn]] void child_init(char* const argv[], char* const envp[], int report_fd, int sync_fd);
  bool build_root(int report_fd);

  SandboxOptions opts_;
  std::string scratch_;  // host directory the child mounts its scratch tmpfs on
  std::string cwd_;
  std::string runtime_dir_, state_dir_, endpoint_, store_;
  std::string resolv_target_;  // /etc/resolv.conf's target when it lives under /run
  std::vector<std::pair<std::string, std::string>> icd_files_;  // name, content
  std::vector<std::string> hidden_libs_;
  std::vector<std::string> tmp_kept_;  // entries of the host's /tmp shown inside, read-only
  // What the guest's /etc holds of the host's: paths below /etc (kEtcAllowed), their kind, and a
  // symlink's target.
  struct EtcEntry {
    std::string path;  // "passwd", "ssl/certs"
    char kind;         // 'd' directory, 'f' file, 'l' symlink
    std::string target;
  };
  std::vector<EtcEntry> etc_;
  bool vendors_replaced_ = false;
};

// Sets no_new_privs, drops every capability (bounding set included) and loads the guest's seccomp
// filter: ptrace, process_vm_*, mount and the new mount API, pivot_root, chroot, unshare, setns,
// namespace-creating clone flags, bpf, perf_event_open, kexec, module loading, keyctl/add_key/
// request_key, userfaultfd, and the ioctls TIOCSTI and TIOCLINUX (typing into a terminal) fail
// with EPERM; clone3 with ENOSYS (so callers fall back to clone,
// whose flags can be checked); socket() of any family but AF_UNIX with EPERM (with network, also
// AF_INET, AF_INET6 and route netlink).
// Returns 0 or an errno.
int enter_guest_policy(bool network, const char** failed_step);

}  // namespace gpup::cli
