// Cgroups for gpupd's workers: each gpup-vmwp runs in a memory cgroup of its own whose limit is
// the partition's max VRAM plus a fixed overhead (the KMD, PoCL and its in-process LLVM), and in a
// cpu cgroup of its own that carries the partition's compute weight and compute cap.
//
// Where: nested under gpupd's own cgroup of that controller, never elsewhere, as
//   <gpupd's cgroup>/<instance>/<vm>        instance = "gpupd.<pid>" (one per gpupd, so hosts
//                                           sharing a cgroup — tests, several runtime dirs — do
//                                           not collide; a dead gpupd's empty ones are removed)
// Which hierarchy, per controller: cgroup v2 when the controller is usable there — listed in
// cgroup.controllers of the v2 root and of gpupd's own v2 cgroup, and either already in that
// cgroup's cgroup.subtree_control or enabled there now — else the v1 hierarchy carrying it, else
// none (workers then run without it; Worker::describe() says why). Under v2 both controllers use
// the same directories: the first remove() of a VM's cgroup removes it, the second finds it gone.
//   memory v2: memory.max (+ memory.swap.max = 0 when present), cgroup.procs
//   memory v1: memory.limit_in_bytes (+ memory.memsw.limit_in_bytes when present), cgroup.procs
//   cpu v2:    cpu.weight, cpu.max, cgroup.procs; usage from cpu.stat
//   cpu v1:    cpu.shares, cpu.cfs_period_us, cpu.cfs_quota_us (possibly co-mounted with cpuacct,
//              which alone gives usage: cpuacct.usage), cgroup.procs
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

// The cgroup of one controller gpupd itself is in, and the hierarchy to nest workers' cgroups under.
struct CgroupSite {
  CgroupVersion version = CgroupVersion::kNone;
  std::string own;     // gpupd's own cgroup directory (with the prefix)
  std::string reason;  // with kNone: why neither hierarchy is usable; else empty
};
using MemoryCgroupSite = CgroupSite;
using CpuCgroupSite = CgroupSite;

// Both look and change nothing, except enabling the controller ("+memory", "+cpu") in the own v2
// cgroup's cgroup.subtree_control when it is available there but not yet delegated. The v1 cpu
// hierarchy may be co-mounted with others ("cpu,cpuacct").
MemoryCgroupSite find_memory_cgroup(const CgroupEnv& env);
CpuCgroupSite find_cpu_cgroup(const CgroupEnv& env);
CgroupSite find_pids_cgroup(const CgroupEnv& env);

// What the memory and cpu cgroups of workers share: <own>/<instance>/<vm> of one controller.
class VmCgroups {
 public:
  VmCgroups(const VmCgroups&) = delete;
  VmCgroups& operator=(const VmCgroups&) = delete;

  CgroupVersion version() const { return site_.version; }
  const std::string& unavailable_reason() const { return site_.reason; }
  const std::string& own() const { return site_.own; }
  std::string vm_dir(const std::string& vm) const;  // <own>/<instance>/<vm>

  Status add_process(const std::string& dir, pid_t pid);  // cgroup.procs
  // Kills every process in dir (a worker's, when it exits or is restarted, so nothing it started
  // outlives it): cgroup v2's cgroup.kill where the kernel has it, then SIGKILL through a pidfd
  // to each pid cgroup.procs still lists, until it lists none (v1, or a v2 without cgroup.kill;
  // a process forking meanwhile lands in the same cgroup and is caught by the next round).
  // Returns how many processes it signalled itself.
  Result<size_t> kill_all(const std::string& dir);
  // rmdir; fails (EBUSY) while a process is still in it; succeeds when it is already gone.
  Status remove(const std::string& dir);

 protected:
  VmCgroups(const char* controller, CgroupSite site, std::string instance, bool fake);
  ~VmCgroups();  // removes <own>/<instance> if empty (workers remove their own first)
  // Creates <own>/<instance>/<vm>, reusing it if present.
  Result<std::string> make_vm_dir(const std::string& vm);
  void remove_stale_instances();

  const char* controller_;  // "memory", "cpu"
  CgroupSite site_;
  std::string instance_;
  std::string base_;
  bool fake_;
  bool base_ready_ = false;

 private:
  Status ensure_base();
};

class MemoryCgroups : public VmCgroups {
 public:
  // Never fails: an unusable site gives version() kNone and unavailable_reason().
  static std::shared_ptr<MemoryCgroups> create(const CgroupEnv& env, const std::string& instance);

  // Creates <own>/<instance>/<vm> (reusing it if present), sets its limit and returns it.
  Result<std::string> prepare(const std::string& vm, uint64_t limit);
  // Raises or lowers the limit of a cgroup made by prepare(). Refuses to go below what the
  // cgroup uses now (v1 would fail, v2 would reclaim and then kill the worker).
  Status set_limit(const std::string& dir, uint64_t limit);
  Result<uint64_t> limit(const std::string& dir) const;
  // How many processes the kernel's OOM killer has killed in it (0 when not reported).
  uint64_t oom_kills(const std::string& dir) const;

 private:
  MemoryCgroups(CgroupSite site, std::string instance, bool fake);
};

// The number of tasks (processes and threads) a worker may have: pids.max, v1 or v2.
class PidsCgroups : public VmCgroups {
 public:
  static std::shared_ptr<PidsCgroups> create(const CgroupEnv& env, const std::string& instance);
  // Creates <own>/<instance>/<vm> (reusing it if present), sets pids.max and returns it.
  Result<std::string> prepare(const std::string& vm, uint64_t max_tasks);

 private:
  PidsCgroups(CgroupSite site, std::string instance, bool fake);
};
inline constexpr uint64_t kDefaultWorkerMaxTasks = 4096;

// A partition's compute weight (1..10000, 100 by default) and compute cap (1..100 percent of the
// host's CPUs) as the kernel's CPU scheduler sees them:
//   v2: cpu.weight = weight (the same scale); cpu.max = "<quota> 100000", quota = percent of
//       cpus × 100000 µs, or "max 100000" at 100 percent
//   v1: cpu.shares = max(2, weight × 1024 / 100) (1024 is v1's default as 100 is ours);
//       cpu.cfs_period_us = 100000; cpu.cfs_quota_us = the same quota, or -1 at 100 percent — at
//       most what an ancestor (gpupd's own cgroup, say) allows, which v1 refuses to exceed
class CpuCgroups : public VmCgroups {
 public:
  // Never fails: an unusable site gives version() kNone and unavailable_reason(). The cap is a
  // share of cpus CPUs (0: the online ones).
  static std::shared_ptr<CpuCgroups> create(const CgroupEnv& env, const std::string& instance, unsigned cpus);

  unsigned cpus() const { return cpus_; }
  // Creates <own>/<instance>/<vm> (reusing it if present), applies weight and cap, returns it.
  Result<std::string> prepare(const std::string& vm, uint32_t weight, uint32_t max_percent);
  // Applies weight and cap (each clamped to its range) to a cgroup made by prepare().
  Status set(const std::string& dir, uint32_t weight, uint32_t max_percent);
  // CPU time its processes have used, in ns. v1 has it only with cpuacct co-mounted with cpu
  // (cpuacct.usage); v1's cpu.stat has none: NOT_SUPPORTED.
  Result<uint64_t> usage_ns(const std::string& dir) const;

 private:
  CpuCgroups(CgroupSite site, std::string instance, bool fake, unsigned cpus);
  unsigned cpus_;
};

}  // namespace gpup::gpupd
