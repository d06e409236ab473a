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

// Everything else fails with EPERM. Derived from what the worker, its KMD (PoCL, its LLVM and
// hwloc) and the linker PoCL runs for each kernel build were seen to call (strace of a worker
// running the samples, clinfo, PyOpenCL and the differential programs), plus their near relatives
// glibc may pick instead (openat/open, stat variants, the *at forms). Not here, on purpose: every
// way to make a socket or reach another process or the kernel's configuration (socket, socketpair,
// connect, bind, listen, accept, ptrace, process_vm_*, mount, unshare, setns, bpf, keyctl,
// perf_event_open, io_uring, kexec, modules, userfaultfd, ...).
constexpr const char* kAllowed[] = {
    // memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore", "mlock", "munlock",
    "get_mempolicy", "set_mempolicy", "mbind", "membarrier",
    // files (inside the jail's view; Landlock bounds writes and exec)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "open", "openat", "creat", "close", "close_range", "lseek", "stat", "fstat", "lstat", "newfstatat", "statx",
    "statfs", "fstatfs", "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64", "getcwd",
    "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "chmod", "fchmod", "fchmodat", "umask", "ftruncate", "truncate", "fallocate", "fsync", "fdatasync", "flock",
    "fadvise64", "utimensat", "copy_file_range", "sendfile", "fcntl", "dup", "dup2", "dup3", "pipe", "pipe2",
    // fds the worker makes or was given: memfds, eventfds, the sockets it inherited or received
    "memfd_create", "eventfd2", "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "recvmsg", "sendmsg", "recvfrom", "sendto", "shutdown", "getsockopt", "getsockname",
    "getpeername",
    // threads, processes (its own pid namespace), signals
    "vfork", "execve", "wait4", "waitid", "exit", "exit_group", "set_tid_address", "set_robust_list",
    "get_robust_list", "rseq", "futex", "futex_waitv", "arch_prctl", "prctl", "gettid", "getpid", "getppid",
    "kill", "tgkill", "tkill", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "sigaltstack",
    "restart_syscall", "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam",
    "sched_getscheduler", "sched_get_priority_max", "sched_get_priority_min", "getpriority", "setpriority",
    // time and identity
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time", "times", "getrusage",
    "getrlimit", "prlimit64", "sysinfo", "uname", "getrandom", "getuid", "geteuid", "getgid", "getegid",
    "getresuid", "getresgid", "getgroups", "capget",
};

struct FilterDeleter {
  void operator()(void* ctx) const { seccomp_release(static_cast<scmp_filter_ctx>(ctx)); }
};

Error seccomp_error(const std::string& what, int rc) {
  return make_error(GPUP_STATUS_INTERNAL, fmt::format("seccomp: {}: {}", what, std::strerror(-rc)));
}

}  // namespace

std::span<const char* const> worker_allowed_syscalls() { return kAllowed; }

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
  std::unique_ptr<void, FilterDeleter> ctx(seccomp_init(SCMP_ACT_ERRNO(EPERM)));
  if (!ctx) return make_error(GPUP_STATUS_INTERNAL, "seccomp: cannot create a filter");
  scmp_filter_ctx f = ctx.get();
  int rc;
  // Every thread (PoCL's and LLVM's exist by now), no privilege gain through exec, and a syscall
  // of another ABI ends the process rather than slipping past rules written for this one.
  if ((rc = seccomp_attr_set(f, SCMP_FLTATR_CTL_TSYNC, 1)) < 0) return seccomp_error("TSYNC", rc);
  if ((rc = seccomp_attr_set(f, SCMP_FLTATR_CTL_NNP, 1)) < 0) return seccomp_error("no_new_privs", rc);
  // A binary tree of syscall numbers, not a list of ~150 compares, on every call (futex included).
  if ((rc = seccomp_attr_set(f, SCMP_FLTATR_CTL_OPTIMIZE, 2)) < 0) return seccomp_error("optimize", rc);
  if ((rc = seccomp_attr_set(f, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)) < 0)
    return seccomp_error("bad-arch action", rc);

  for (const char* name : kAllowed) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // not a syscall on this architecture
    if ((rc = seccomp_rule_add(f, SCMP_ACT_ALLOW, nr, 0)) < 0) return seccomp_error(name, rc);
  }
  // clone (threads; fork and vfork for the linker) without a namespace flag. clone3 keeps its
  // flags in memory a filter cannot read, so it reports "not implemented" and glibc uses clone.
  constexpr scmp_datum_t kNamespaceFlags =
      CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP;
  if ((rc = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, kNamespaceFlags, 0))) < 0)
    return seccomp_error("clone", rc);
  if ((rc = seccomp_rule_add(f, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0)) < 0) return seccomp_error("clone3", rc);
  // Only the query form of personality() (execution domains can re-enable READ_IMPLIES_EXEC and
  // address-space layouts that weaken ASLR).
  if ((rc = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(personality), 1, SCMP_A0(SCMP_CMP_EQ, 0xffffffffUL))) < 0)
    return seccomp_error("personality", rc);
  // ioctl, but not pushing input into a terminal the worker's stderr may share with an operator's
  // shell: those two requests fail with EACCES (the default action, EPERM, cannot be a rule's),
  // whatever high bits a caller sets (the kernel ignores them; the mask does too).
  for (unsigned long req : {static_cast<unsigned long>(TIOCSTI), static_cast<unsigned long>(TIOCLINUX)})
    if ((rc = seccomp_rule_add(f, SCMP_ACT_ERRNO(EACCES), SCMP_SYS(ioctl), 1,
                               SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffUL, req))) < 0)
      return seccomp_error("ioctl", rc);
  // Every other request: a condition that always holds, as libseccomp lets an unconditional rule
  // override the refusals above (SeccompPolicy.EscapeRoutesFailWithEperm checks they hold).
  if ((rc = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, SCMP_A0(SCMP_CMP_GE, 0))) < 0)
    return seccomp_error("ioctl", rc);
  // LeakSanitizer stops the world with ptrace at exit.
  if (kSanitizerBuild && (rc = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(ptrace), 0)) < 0)
    return seccomp_error("ptrace", rc);

  if ((rc = seccomp_load(f)) < 0) return seccomp_error("load", rc);
  return {};
}

}  // namespace gpup::vmwp
