#include "host/vmwp/seccomp_policy.h"

#include <errno.h>
#include <sched.h>
#include <seccomp.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include <fmt/format.h>

namespace gpup::vmwp {

namespace {

// LeakSanitizer stops the world with ptrace at exit; sanitizer builds keep ptrace (and
// dumpability, which it needs too) so `make test-asan` still reports leaks. Release builds do not.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitizerBuild = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitizerBuild = true;
#else
constexpr bool kSanitizerBuild = false;
#endif
#else
constexpr bool kSanitizerBuild = false;
#endif

constexpr const char* kDenied[] = {
    // other processes: debugging, reading or writing their memory, taking their fds
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    // the file system view and namespaces
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "unshare", "setns",
    // large kernel attack surface the worker never needs
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "fanotify_init",
    // kernel and machine state
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "sethostname", "setdomainname", "iopl", "ioperm", "mknod", "mknodat", "vhangup", "uselib",
    // kernel keyrings
    "keyctl", "add_key", "request_key",
};

struct FilterDeleter {
  void operator()(void* ctx) const { seccomp_release(static_cast<scmp_filter_ctx>(ctx)); }
};

Error seccomp_error(const std::string& what, int rc) {
  return make_error(GPUP_STATUS_INTERNAL, fmt::format("seccomp: {}: {}", what, std::strerror(-rc)));
}

}  // namespace

std::span<const char* const> worker_denied_syscalls() { return kDenied; }

Status apply_worker_rlimits() {
  rlimit core{0, 0};
  if (::setrlimit(RLIMIT_CORE, &core) != 0)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("setrlimit(RLIMIT_CORE): {}", std::strerror(errno)));
  rlimit files{};
  if (::getrlimit(RLIMIT_NOFILE, &files) != 0)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("getrlimit(RLIMIT_NOFILE): {}", std::strerror(errno)));
  rlim_t bound = std::min<rlim_t>(files.rlim_max, kWorkerMaxOpenFiles);
  files.rlim_cur = files.rlim_max = bound;
  if (::setrlimit(RLIMIT_NOFILE, &files) != 0)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("setrlimit(RLIMIT_NOFILE): {}", std::strerror(errno)));
  if (!kSanitizerBuild && ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("prctl(PR_SET_DUMPABLE): {}", std::strerror(errno)));
  return {};
}

Status install_worker_seccomp() {
  std::unique_ptr<void, FilterDeleter> ctx(seccomp_init(SCMP_ACT_ALLOW));
  if (!ctx) return make_error(GPUP_STATUS_INTERNAL, "seccomp: cannot create a filter");
  scmp_filter_ctx f = ctx.get();
  int rc;
  // Every thread (PoCL's and LLVM's exist by now), no privilege gain through exec, and a syscall
  // of another ABI ends the process rather than slipping past rules written for this one.
  if ((rc = seccomp_attr_set(f, SCMP_FLTATR_CTL_TSYNC, 1)) < 0) return seccomp_error("TSYNC", rc);
  if ((rc = seccomp_attr_set(f, SCMP_FLTATR_CTL_NNP, 1)) < 0) return seccomp_error("no_new_privs", rc);
  if ((rc = seccomp_attr_set(f, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)) < 0)
    return seccomp_error("bad-arch action", rc);

  const uint32_t eperm = SCMP_ACT_ERRNO(EPERM);
  for (const char* name : kDenied) {
    if (kSanitizerBuild && std::strcmp(name, "ptrace") == 0) continue;
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // not a syscall on this architecture
    if ((rc = seccomp_rule_add(f, eperm, nr, 0)) < 0) return seccomp_error(name, rc);
  }
  // Sockets: the worker needs AF_UNIX only (its VRD endpoint, fd passing); no network, no
  // netlink, no raw packets.
  for (int nr : {SCMP_SYS(socket), SCMP_SYS(socketpair)})
    if ((rc = seccomp_rule_add(f, eperm, nr, 1, SCMP_A0(SCMP_CMP_NE, AF_UNIX))) < 0)
      return seccomp_error("socket", rc);
  // Threads and fork/vfork (the linker) go through clone; new namespaces do not. clone3 keeps its
  // flags in memory a filter cannot read, so it reports "not implemented" and glibc uses clone.
  for (unsigned long flag : {CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET,
                             CLONE_NEWCGROUP})
    if ((rc = seccomp_rule_add(f, eperm, SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, flag, flag))) < 0)
      return seccomp_error("clone", rc);
  if ((rc = seccomp_rule_add(f, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0)) < 0) return seccomp_error("clone3", rc);
  // Only the query form of personality() (execution domains can re-enable READ_IMPLIES_EXEC and
  // address-space layouts that weaken ASLR).
  if ((rc = seccomp_rule_add(f, eperm, SCMP_SYS(personality), 1, SCMP_A0(SCMP_CMP_NE, 0xffffffffUL))) < 0)
    return seccomp_error("personality", rc);
  // Pushing input into a terminal the worker's stderr may share with an operator's shell.
  for (unsigned long req : {static_cast<unsigned long>(TIOCSTI), static_cast<unsigned long>(TIOCLINUX)})
    if ((rc = seccomp_rule_add(f, eperm, SCMP_SYS(ioctl), 1, SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffUL, req))) < 0)
      return seccomp_error("ioctl", rc);

  if ((rc = seccomp_load(f)) < 0) return seccomp_error("load", rc);
  return {};
}

}  // namespace gpup::vmwp
