// Memory cgroups for gpupd's workers: each gpup-vmwp runs in a cgroup of its own whose limit is
// the partition's max VRAM plus a fixed overhead (the KMD, PoCL and its in-process LLVM).
//
// Where: nested under gpupd's own memory cgroup, never elsewhere, as
//   <gpupd's cgroup>/<instance>/<vm>        instance = "gpupd.<pid>" (one per gpupd, so hosts
//                                           sharing a cgroup — tests, several runtime dirs — do
//                                           not collide; a dead gpupd's empty ones are removed)
// Which hierarchy: cgroup v2 when its memory controller is usable there — "memory" listed in
// cgroup.controllers of the v2 root and of gpupd's own v2 cgroup, and either already in that
// cgroup's cgroup.subtree_control or enabled there now — else the v1 "memory" hierarchy, else
// none (workers then run without a limit; Worker::describe() says why).
//   v2: memory.max (+ memory.swap.max = 0 when present), cgroup.procs
//   v1: memory.limit_in_bytes (+ memory.memsw.limit_in_bytes when present), cgroup.procs
//
// Everything is found from the text of /proc/self/mountinfo and /proc/self/cgroup plus a path
// prefix put before every mount point, so tests run the same code against fake trees in a temp
// directory. Used only from gpupd's event-loop thread.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "common/result.h"

namespace gpup::gpupd {

enum class CgroupVersion { kNone, kV1, kV2 };
const char* to_string(CgroupVersion v);  // "none", "cgroup v1", "cgroup v2"

struct CgroupEnv {
  std::string mountinfo;    // text of /proc/self/mountinfo
  std::string self_cgroup;  // text of /proc/self/cgroup
  // Put before every mount point. Non-empty only for fake trees, whose control files are plain
  // files: removing a cgroup there deletes them first (cgroupfs itself ignores them on rmdir).
  std::string prefix;
  static CgroupEnv from_proc();
};

// The memory cgroup gpupd itself is in, and the hierarchy to nest workers' cgroups under.
struct MemoryCgroupSite {
  CgroupVersion version = CgroupVersion::kNone;
  std::string own;     // gpupd's own cgroup directory (with the prefix)
  std::string reason;  // with kNone: why neither hierarchy is usable; else empty
};
// Looks, does not change anything except enabling "+memory" in the own v2 cgroup's
// cgroup.subtree_control when the controller is available there but not yet delegated.
MemoryCgroupSite find_memory_cgroup(const CgroupEnv& env);

class MemoryCgroups {
 public:
  // Never fails: an unusable site gives version() kNone and unavailable_reason().
  static std::shared_ptr<MemoryCgroups> create(const CgroupEnv& env, const std::string& instance);
  ~MemoryCgroups();  // removes <own>/<instance> if empty (workers remove their own first)
  MemoryCgroups(const MemoryCgroups&) = delete;
  MemoryCgroups& operator=(const MemoryCgroups&) = delete;

  CgroupVersion version() const { return site_.version; }
  const std::string& unavailable_reason() const { return site_.reason; }
  const std::string& own() const { return site_.own; }
  std::string vm_dir(const std::string& vm) const;  // <own>/<instance>/<vm>

  // Creates <own>/<instance>/<vm> (reusing it if present), sets its limit and returns it.
  Result<std::string> prepare(const std::string& vm, uint64_t limit);
  // Raises or lowers the limit of a cgroup made by prepare(). Refuses to go below what the
  // cgroup uses now (v1 would fail, v2 would reclaim and then kill the worker).
  Status set_limit(const std::string& dir, uint64_t limit);
  Result<uint64_t> limit(const std::string& dir) const;
  Status add_process(const std::string& dir, pid_t pid);
  // How many processes the kernel's OOM killer has killed in it (0 when not reported).
  uint64_t oom_kills(const std::string& dir) const;
  // rmdir; fails (EBUSY) while a process is still in it.
  Status remove(const std::string& dir);

 private:
  MemoryCgroups(MemoryCgroupSite site, std::string instance, bool fake);
  Status ensure_base();
  void remove_stale_instances();

  MemoryCgroupSite site_;
  std::string instance_;
  std::string base_;
  bool fake_;
  bool base_ready_ = false;
};

}  // namespace gpup::gpupd
