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
//   install_worker_seccomp()   once the KMD is loaded, the adapter started and the VRD endpoint
//                              listening, before "ready"; on every thread (TSYNC), with
//                              no_new_privs. PoCL still compiles kernels afterwards (LLVM in the
//                              process, the linker started with vfork+exec), so this is a deny
//                              list: an allow list would have to track every syscall LLVM, glibc
//                              and PoCL's threads may make, and a miss kills a VM's work. What it
//                              denies is what a taken-over worker would use to leave its sandbox,
//                              reach other processes or the network, or attack the kernel.
//                              Denied calls fail with EPERM (clone3 with ENOSYS, so glibc falls
//                              back to clone, whose flags can be checked); syscalls of another
//                              ABI (32-bit, x32) kill the process.
//
// Adding to the worker: a syscall it newly needs that is on the list below needs a reason here
// and a test in vmwp_unittest (SeccompPolicy.*).
#pragma once
#include <span>

#include "common/result.h"

namespace gpup::vmwp {

Status apply_worker_rlimits();
Status install_worker_seccomp();

// The syscalls denied outright, by name (socket, socketpair, clone and personality are denied
// only for some arguments; clone3 is "not implemented"). For the documentation and tests.
std::span<const char* const> worker_denied_syscalls();

inline constexpr unsigned long kWorkerMaxOpenFiles = 16384;

}  // namespace gpup::vmwp
