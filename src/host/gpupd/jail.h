// The worker jail: how gpupd starts each gpup-vmwp so that the guest work it runs reaches nothing
// of the host. On a CPU device a guest's kernels are native code inside the worker (OpenCL C takes
// inline assembly, program binaries are native code), so the worker is exactly as untrusted as its
// guest and gets what a VM would: nothing but its paravirtual device.
//
// What a jailed worker has, set up here between clone and exec (trusted code, before the worker
// has read any guest input):
//   ids           its own uid and gid, one per partition from worker_id_base..+count (config.h),
//                 never gpupd's; no supplementary groups
//   namespaces    new user, mount, pid (it is pid 1: when it exits, the kernel kills everything it
//                 started), ipc, uts (hostname "gpup-<vm>"), network (loopback only, down) and
//                 cgroup (entered after gpupd has put it in its cgroups, so it sees only its own)
//   root          a tmpfs of its own (pivot_root; read-only once built) holding, read-only:
//                   its program and the KMD plugin (at their real paths),
//                   the directories of the shared libraries gpupd has loaded (the KMDs' device
//                   runtimes among them: gpupd starts every adapter itself), /etc/ld.so.cache,
//                   what the KMD declares (GPUPDDI_QAITYPE_SANDBOXNEEDS, ddi.h): ro paths, exec
//                   programs, dev nodes;
//                 every symbolic link on the way to those paths, recreated; /proc of its own pid
//                 namespace with /proc/sys read-only; /dev with null zero full random urandom
//                 (and declared device nodes); and writable, size-bounded, its own only:
//                   /cache  its compiled-kernel cache (HOME, XDG_CACHE_HOME, $GPUP_CACHE_DIR)
//                   /tmp    scratch (noexec)
//                 both tmpfs, so they die with the worker, count against its memory cgroup and are
//                 never another partition's or the host user's.
//   capabilities  none: empty bounding, ambient, effective, permitted and inheritable sets,
//                 securebits locked (no root semantics after exec), no_new_privs
//   Landlock      (where the kernel has it) reads anywhere in its root, writes only under /cache
//                 and /tmp, executes only its program, the declared programs and their ELF
//                 interpreters, no TCP, no signals or abstract sockets outside its own domain
//   environment   built here: PATH, HOME, TMPDIR, XDG_CACHE_HOME, GPUP_CACHE_DIR, the KMD's env
//                 lines, and the variables it lists in passenv (plus sanitizer options)
//   fds           0 = /dev/null, 1 and 2 = gpupd's, then the ones the caller passes; nothing else
// The worker adds its seccomp allow-list itself (vmwp/seccomp_policy.h) once its KMD is loaded.
//
// The child side runs in gpupd after clone (gpupd has threads: PoCL's), so it allocates nothing and
// uses system calls only; everything it needs is computed into a JailPlan first.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "host/gpupd/config.h"

namespace gpup::gpupd {

// GPUPDDI_QAITYPE_SANDBOXNEEDS, parsed (ddi.h has the format).
struct JailNeeds {
  std::vector<std::string> ro, exec, dev;
  std::vector<std::pair<std::string, std::string>> env;
  std::vector<std::string> passenv;
};
Result<JailNeeds> parse_jail_needs(std::string_view text);

inline constexpr uint64_t kDefaultJailCacheBytes = 512ull << 20, kDefaultJailScratchBytes = 256ull << 20;
inline constexpr const char* kJailCacheDir = "/cache";

struct JailOptions {
  uint32_t id_base = kDefaultWorkerIdBase;
  uint32_t id_count = kDefaultWorkerIdCount;
  uint64_t cache_bytes = kDefaultJailCacheBytes;
  uint64_t scratch_bytes = kDefaultJailScratchBytes;
  std::string stage_dir;  // an empty directory of gpupd's that each worker's root is mounted on
};

// One per gpupd: the ids handed to partitions and the shared library directories every worker sees.
class Jails {
 public:
  explicit Jails(JailOptions opts);
  // The uid (= gid) of vm's worker: the same for as long as vm exists; the lowest free one first.
  Result<uint32_t> id_for(const std::string& vm);
  void release(const std::string& vm);
  const JailOptions& options() const { return opts_; }
  // What each adapter's KMD declared (GPUPDDI_QAITYPE_SANDBOXNEEDS); null for an unknown adapter.
  void set_needs(const std::string& adapter, JailNeeds needs) { needs_[adapter] = std::move(needs); }
  const JailNeeds* needs(const std::string& adapter) const {
    auto it = needs_.find(adapter);
    return it == needs_.end() ? nullptr : &it->second;
  }

  // Everything a worker's jail holds and does, computed in the parent.
  struct Spawn {
    std::string vm;
    std::string program;            // gpup-vmwp (absolute)
    std::vector<std::string> argv;  // argv[0] included
    std::string kmd;                // the KMD plugin (absolute)
    const JailNeeds* needs = nullptr;
    std::vector<std::pair<int, int>> fds;  // (fd in gpupd, fd number in the worker), numbers >= 3
  };
  // Starts the worker in its jail. before_start runs in gpupd once the process exists (ids mapped)
  // and before it does anything: put it in its cgroups there. An error from it, or from the set-up
  // in the child, kills the child and is returned with the step that failed.
  struct Started {
    pid_t pid = -1;
    UniqueFd pidfd;
    uint32_t id = 0;
  };
  Result<Started> spawn(const Spawn& s, const std::function<Status(pid_t)>& before_start);

  // What describe() shows of a jail: ids, namespaces, root, landlock.
  static std::vector<std::string> namespaces();
  int landlock_abi() const { return landlock_abi_; }

 private:
  JailOptions opts_;
  std::map<std::string, uint32_t> ids_;
  std::map<std::string, JailNeeds> needs_;
  int landlock_abi_ = 0;
};

// Real path of p with every symbolic link met on the way recorded as (link path, link text), in
// the order met; empty when p does not exist. For building the jail's view; tests use it too.
std::string resolve_with_links(const std::string& p, std::vector<std::pair<std::string, std::string>>& links);

}  // namespace gpup::gpupd
