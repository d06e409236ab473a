// The sandbox policy of gpup-vmwp, reviewed here beside the worker's code.
//
// The worker runs guest kernels as native code when its device is a CPU (PoCL), so it is treated
// as the process most likely to be taken over. Its policy, applied by main.cpp:
//
//   apply_worker_rlimits()     at start, before anything of the KMD is loaded:
//     RLIMIT_CORE   0            no core files (they would hold guest data)
//     RLIMIT_NOFILE 16384        allocations and sections are fds; bounded, not unlimited
//     RLIMIT_NPROC  unchanged    counted per user across the whole host, so a value here would
//                                say little about the worker; the memory cgroup bounds it instead
//     RLIMIT_FSIZE  unchanged    sections are memfds, and RLIMIT_FSIZE applies to them: any bound
//                                below the partition's max VRAM would break large allocations
//     not dumpable               a guest running as the same user cannot ptrace or read the
//                                worker's memory through /proc (also keeps core dumps off)
//
//   install_worker_seccomp()   once the KMD is loaded and the adapter started, before "ready"; on
//                              every thread (TSYNC), with no_new_privs. An allow-list (kAllowed in
//                              the .cpp, derived from what the worker, PoCL with its LLVM, and the
//                              linker PoCL runs per kernel build call); anything else fails with
//                              EPERM. No new sockets of any family and no connect/bind/listen/
//                              accept: the worker only uses the sockets gpupd gave it and those it
//                              receives. clone only without namespace flags (clone3 is "not
//                              implemented", so glibc falls back to clone, whose flags can be
//                              checked); personality only as a query; ioctl but not TIOCSTI or
//                              TIOCLINUX (EACCES). Syscalls of another ABI (32-bit, x32) kill the process.
//                              execve is allowed: Landlock (gpupd's jail.h) bounds it to the
//                              programs the KMD declared.
//
// Adding to the worker: a syscall it newly needs goes on the allow-list with a reason, and
// vmwp_unittest's SeccompPolicy.* keeps the escape routes off it.
#pragma once
#include <span>

#include "common/result.h"

namespace gpup::vmwp {

Status apply_worker_rlimits();
Status install_worker_seccomp();

// The syscalls allowed without conditions, by name (clone and personality are allowed only with
// some arguments, ioctl with all but two). For the documentation and tests.
std::span<const char* const> worker_allowed_syscalls();

inline constexpr unsigned long kWorkerMaxOpenFiles = 16384;

}  // namespace gpup::vmwp
