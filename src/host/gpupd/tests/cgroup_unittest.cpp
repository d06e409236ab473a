// Memory and cpu cgroups for workers (cgroup.h): detection, limits, weights and caps against fake
// v1, v2 and hybrid trees built in a temp directory, the worker supervisor moving a process into
// its memory cgroup, and the same code against this machine's real cgroup fs (skipped, saying why,
// when it is not writable).
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>

#include "host/gpupd/cgroup.h"
#include "host/gpupd/event_loop.h"
#include "host/gpupd/worker.h"

namespace gpup::gpupd {
namespace {

using control::json;
using namespace std::chrono_literals;

constexpr uint64_t MiB = 1ull << 20;

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// A fake cgroup tree: files are plain files written by the test, mount points are under root().
class FakeTree {
 public:
  FakeTree() {
    char tmpl[] = "/tmp/gpupd-cg-XXXXXX";
    root_ = ::mkdtemp(tmpl);
  }
  ~FakeTree() { std::system(("rm -rf '" + root_ + "'").c_str()); }
  const std::string& root() const { return root_; }
  std::string path(const std::string& p) const { return root_ + p; }
  void file(const std::string& p, const std::string& content) {
    std::string full = path(p);
    std::system(("mkdir -p '" + full.substr(0, full.rfind('/')) + "'").c_str());
    std::ofstream(full) << content;
  }
  CgroupEnv env(const std::string& mountinfo, const std::string& self_cgroup) const {
    return CgroupEnv{mountinfo, self_cgroup, root_};
  }

 private:
  std::string root_;
};

const char* kHybridMounts =
    "30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "34 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
const char* kHybridSelf = "9:name=systemd:/\n4:memory:/svc/host1\n1:cpu:/\n0::/\n";

TEST(GpupdCgroup, HybridWithoutV2MemoryFallsBackToV1) {
  FakeTree t;
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n");
  t.file("/sys/fs/cgroup/unified/cgroup.subtree_control", "");
  t.file("/sys/fs/cgroup/memory/svc/host1/memory.limit_in_bytes", "9223372036854771712\n");
  auto site = find_memory_cgroup(t.env(kHybridMounts, kHybridSelf));
  EXPECT_EQ(site.version, CgroupVersion::kV1) << site.reason;
  EXPECT_EQ(site.own, t.path("/sys/fs/cgroup/memory/svc/host1"));
  // cgroup2 being mounted is not enough: nothing was enabled there.
  EXPECT_EQ(slurp(t.path("/sys/fs/cgroup/unified/cgroup.subtree_control")), "");
}

TEST(GpupdCgroup, HybridWithV2MemoryUsesV2) {
  FakeTree t;
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "memory pids\n");
  t.file("/sys/fs/cgroup/unified/cgroup.subtree_control", "memory\n");
  t.file("/sys/fs/cgroup/memory/svc/host1/memory.limit_in_bytes", "max\n");
  auto site = find_memory_cgroup(t.env(kHybridMounts, kHybridSelf));
  EXPECT_EQ(site.version, CgroupVersion::kV2) << site.reason;
  EXPECT_EQ(site.own, t.path("/sys/fs/cgroup/unified"));
}

TEST(GpupdCgroup, PureV2DelegatesTheControllerAndSetsLimits) {
  FakeTree t;
  const char* mounts = "30 22 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
  const std::string own = "/sys/fs/cgroup/system.slice/gpupd.service";
  t.file("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n");
  t.file(own + "/cgroup.controllers", "memory pids\n");
  t.file(own + "/cgroup.subtree_control", "");
  auto m = MemoryCgroups::create(t.env(mounts, "0::/system.slice/gpupd.service\n"), "gpupd.42");
  ASSERT_EQ(m->version(), CgroupVersion::kV2) << m->unavailable_reason();
  EXPECT_EQ(slurp(t.path(own + "/cgroup.subtree_control")), "+memory");

  auto dir = m->prepare("alpha", 768 * MiB);
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(*dir, t.path(own + "/gpupd.42/alpha"));
  EXPECT_EQ(slurp(*dir + "/memory.max"), std::to_string(768 * MiB));
  EXPECT_EQ(slurp(t.path(own + "/gpupd.42/cgroup.subtree_control")), "+memory");
  ASSERT_TRUE(m->add_process(*dir, 1234).ok());
  EXPECT_EQ(slurp(*dir + "/cgroup.procs"), "1234");

  // Lowering below what is in use is refused and leaves the limit.
  std::ofstream(*dir + "/memory.current") << 600 * MiB << "\n";
  auto low = m->set_limit(*dir, 512 * MiB);
  ASSERT_FALSE(low.ok());
  EXPECT_EQ(low.status(), GPUP_STATUS_QUOTA_EXCEEDED);
  EXPECT_EQ(*m->limit(*dir), 768 * MiB);
  ASSERT_TRUE(m->set_limit(*dir, 1024 * MiB).ok());
  EXPECT_EQ(*m->limit(*dir), 1024 * MiB);

  std::ofstream(*dir + "/memory.events") << "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n";
  EXPECT_EQ(m->oom_kills(*dir), 1u);
  ASSERT_TRUE(m->remove(*dir).ok());
  EXPECT_FALSE(is_dir(*dir));
  m.reset();  // the instance cgroup goes with the last user
  EXPECT_FALSE(is_dir(t.path(own + "/gpupd.42")));
  EXPECT_TRUE(is_dir(t.path(own)));
}

TEST(GpupdCgroup, V2WhoseControllerCannotBeDelegatedFallsBackToV1) {
  FakeTree t;
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "memory\n");
  t.file("/sys/fs/cgroup/unified/svc/cgroup.controllers", "memory\n");
  // A directory where the file should be: the write fails, as it does on a cgroup with processes.
  ::mkdir(t.path("/sys/fs/cgroup/unified/svc/cgroup.subtree_control").c_str(), 0755);
  t.file("/sys/fs/cgroup/memory/svc/host1/memory.limit_in_bytes", "max\n");
  auto site = find_memory_cgroup(t.env(kHybridMounts, "4:memory:/svc/host1\n0::/svc\n"));
  EXPECT_EQ(site.version, CgroupVersion::kV1) << site.reason;
  EXPECT_EQ(site.own, t.path("/sys/fs/cgroup/memory/svc/host1"));
}

TEST(GpupdCgroup, V1LimitsKeepMemswAboveTheLimit) {
  FakeTree t;
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "");
  t.file("/sys/fs/cgroup/memory/svc/host1/memory.limit_in_bytes", "max\n");
  auto m = MemoryCgroups::create(t.env(kHybridMounts, kHybridSelf), "gpupd.7");
  ASSERT_EQ(m->version(), CgroupVersion::kV1) << m->unavailable_reason();
  auto dir = m->prepare("b", 300 * MiB);
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(*dir, t.path("/sys/fs/cgroup/memory/svc/host1/gpupd.7/b"));
  EXPECT_EQ(slurp(*dir + "/memory.limit_in_bytes"), std::to_string(300 * MiB));
  std::ofstream(*dir + "/memory.memsw.limit_in_bytes") << 300 * MiB;
  ASSERT_TRUE(m->set_limit(*dir, 200 * MiB).ok());
  EXPECT_EQ(slurp(*dir + "/memory.limit_in_bytes"), std::to_string(200 * MiB));
  EXPECT_EQ(slurp(*dir + "/memory.memsw.limit_in_bytes"), std::to_string(200 * MiB));
  std::ofstream(*dir + "/memory.usage_in_bytes") << 150 * MiB;
  EXPECT_FALSE(m->set_limit(*dir, 100 * MiB).ok());
  std::ofstream(*dir + "/memory.oom_control") << "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
  EXPECT_EQ(m->oom_kills(*dir), 2u);
}

TEST(GpupdCgroup, NoUsableHierarchySaysWhy) {
  FakeTree t;
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n");
  const char* mounts = "40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
  auto m = MemoryCgroups::create(t.env(mounts, "0::/\n"), "gpupd.1");
  EXPECT_EQ(m->version(), CgroupVersion::kNone);
  EXPECT_NE(m->unavailable_reason().find("has no memory controller"), std::string::npos) << m->unavailable_reason();
  EXPECT_NE(m->unavailable_reason().find("no cgroup v1 memory hierarchy"), std::string::npos);
  EXPECT_FALSE(m->prepare("x", MiB).ok());
}

TEST(GpupdCgroup, MountOfASubtreeMapsPathsAndRefusesOthers) {
  FakeTree t;
  // A container: its memory hierarchy is mounted from /docker/abc.
  const char* mounts = "34 30 0:31 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
  t.file("/sys/fs/cgroup/memory/gpup/memory.limit_in_bytes", "max\n");
  auto inside = find_memory_cgroup(t.env(mounts, "4:memory:/docker/abc/gpup\n"));
  EXPECT_EQ(inside.version, CgroupVersion::kV1) << inside.reason;
  EXPECT_EQ(inside.own, t.path("/sys/fs/cgroup/memory/gpup"));
  auto outside = find_memory_cgroup(t.env(mounts, "4:memory:/docker/other\n"));
  EXPECT_EQ(outside.version, CgroupVersion::kNone);
  EXPECT_NE(outside.reason.find("not visible"), std::string::npos) << outside.reason;
}

TEST(GpupdCgroup, EscapedMountPointsAreDecoded) {
  FakeTree t;
  const char* mounts = "34 30 0:31 / /cg\\040mem rw - cgroup cgroup rw,memory,nosuid\n";
  t.file("/cg mem/memory.limit_in_bytes", "max\n");
  auto site = find_memory_cgroup(t.env(mounts, "4:memory:/\n"));
  EXPECT_EQ(site.version, CgroupVersion::kV1) << site.reason;
  EXPECT_EQ(site.own, t.path("/cg mem"));
}

TEST(GpupdCgroup, InstancesOfDeadGpupdsAreRemoved) {
  FakeTree t;
  const std::string own = "/sys/fs/cgroup/memory/svc/host1";
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "");
  t.file(own + "/memory.limit_in_bytes", "max\n");
  t.file(own + "/gpupd.999999999/a/memory.limit_in_bytes", "1\n");  // above any pid_max: gone
  std::string alive = "gpupd." + std::to_string(::getppid());
  t.file(own + "/" + alive + "/a/memory.limit_in_bytes", "1\n");
  t.file(own + "/unrelated/memory.limit_in_bytes", "1\n");
  auto m = MemoryCgroups::create(t.env(kHybridMounts, kHybridSelf), "gpupd." + std::to_string(::getpid()));
  ASSERT_EQ(m->version(), CgroupVersion::kV1);
  EXPECT_FALSE(is_dir(t.path(own + "/gpupd.999999999")));
  EXPECT_TRUE(is_dir(t.path(own + "/" + alive + "/a")));
  EXPECT_TRUE(is_dir(t.path(own + "/unrelated")));
}

// ---------------------------------------------------------------------------------------------
// CPU cgroups: the partition's compute weight and cap.

// This machine's layout: cpu and cpuacct in hierarchies of their own, a cgroup2 mount without
// controllers.
const char* kSeparateCpuMounts =
    "30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "32 30 0:29 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
    "33 30 0:30 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
    "34 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
const char* kSeparateCpuSelf = "4:memory:/svc/host1\n3:cpuset:/\n2:cpuacct:/svc\n1:cpu:/svc\n0::/\n";

TEST(GpupdCpuCgroup, V1SeparateHierarchyMapsWeightAndCap) {
  FakeTree t;
  const std::string own = "/sys/fs/cgroup/cpu/svc";
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "");
  t.file("/sys/fs/cgroup/unified/cgroup.subtree_control", "");
  t.file(own + "/cpu.shares", "1024\n");
  t.file("/sys/fs/cgroup/cpuacct/svc/cpuacct.usage", "123\n");
  auto c = CpuCgroups::create(t.env(kSeparateCpuMounts, kSeparateCpuSelf), "gpupd.42", 2);
  ASSERT_EQ(c->version(), CgroupVersion::kV1) << c->unavailable_reason();
  EXPECT_EQ(c->own(), t.path(own));
  EXPECT_EQ(c->cpus(), 2u);
  EXPECT_EQ(slurp(t.path("/sys/fs/cgroup/unified/cgroup.subtree_control")), "");

  // The defaults: v1's default shares, no cap.
  auto dir = c->prepare("alpha", 100, 100);
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(*dir, t.path(own + "/gpupd.42/alpha"));
  EXPECT_EQ(*dir, c->vm_dir("alpha"));
  EXPECT_EQ(slurp(*dir + "/cpu.shares"), "1024");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_period_us"), "100000");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "-1");

  // Half of 2 CPUs is one CPU's worth.
  ASSERT_TRUE(c->set(*dir, 250, 50).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.shares"), "2560");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "100000");
  ASSERT_TRUE(c->set(*dir, 1, 1).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.shares"), "10");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "2000");
  ASSERT_TRUE(c->set(*dir, 10000, 99).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.shares"), "102400");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "198000");
  // Out of range: clamped to the range, not refused.
  ASSERT_TRUE(c->set(*dir, 0, 0).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.shares"), "10");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "2000");
  ASSERT_TRUE(c->set(*dir, 20000, 250).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.shares"), "102400");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "-1");

  // Prepared again (a restarted worker): the same cgroup, the new values.
  auto again = c->prepare("alpha", 200, 25);
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ(*again, *dir);
  EXPECT_EQ(slurp(*dir + "/cpu.shares"), "2048");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "50000");

  ASSERT_TRUE(c->add_process(*dir, 4321).ok());
  EXPECT_EQ(slurp(*dir + "/cgroup.procs"), "4321");
  // cpuacct in a hierarchy of its own is not under this cgroup: no usage from here.
  auto usage = c->usage_ns(*dir);
  ASSERT_FALSE(usage.ok());
  EXPECT_EQ(usage.status(), GPUP_STATUS_NOT_SUPPORTED);
  EXPECT_NE(usage.error().message.find("cpuacct"), std::string::npos) << usage.error().message;

  // The instance stays while a VM's cgroup is in it, whole.
  auto other = c->prepare("beta", 100, 100);
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE(c->remove(*dir).ok());
  EXPECT_FALSE(is_dir(*dir));
  EXPECT_FALSE(c->remove(t.path(own + "/gpupd.42")).ok());
  EXPECT_TRUE(is_dir(*other));
  ASSERT_TRUE(c->remove(*other).ok());
  ASSERT_TRUE(c->remove(*other).ok());  // already gone
  c.reset();
  EXPECT_FALSE(is_dir(t.path(own + "/gpupd.42")));
  EXPECT_TRUE(is_dir(t.path(own)));
}

TEST(GpupdCpuCgroup, V1CoMountedWithCpuacctGivesUsage) {
  FakeTree t;
  // cpuset comes first and has "cpu" in its name only: not the hierarchy.
  const char* mounts =
      "33 30 0:30 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
      "31 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n";
  const std::string own = "/sys/fs/cgroup/cpu,cpuacct/system.slice/gpupd.service";
  t.file("/sys/fs/cgroup/cpuset/cpu.shares", "1024\n");
  t.file(own + "/cpu.shares", "1024\n");
  auto c = CpuCgroups::create(t.env(mounts, "3:cpuset:/\n2:cpu,cpuacct:/system.slice/gpupd.service\n"), "gpupd.9", 4);
  ASSERT_EQ(c->version(), CgroupVersion::kV1) << c->unavailable_reason();
  EXPECT_EQ(c->own(), t.path(own));
  auto dir = c->prepare("a", 50, 75);
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(slurp(*dir + "/cpu.shares"), "512");
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "300000");  // 75% of 4 CPUs
  std::ofstream(*dir + "/cpuacct.usage") << "987654321\n";
  auto usage = c->usage_ns(*dir);
  ASSERT_TRUE(usage.ok()) << usage.error().message;
  EXPECT_EQ(*usage, 987654321u);
}

TEST(GpupdCpuCgroup, V1CapStaysWithinWhatGpupdsCgroupAllows) {
  FakeTree t;
  const std::string top = "/sys/fs/cgroup/cpu";
  const std::string own = top + "/svc";
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "");
  t.file(top + "/cpu.shares", "1024\n");
  t.file(top + "/cpu.cfs_quota_us", "-1\n");
  t.file(top + "/cpu.cfs_period_us", "100000\n");
  // gpupd itself may use 1.5 CPUs, measured over 200 ms.
  t.file(own + "/cpu.shares", "1024\n");
  t.file(own + "/cpu.cfs_quota_us", "300000\n");
  t.file(own + "/cpu.cfs_period_us", "200000\n");
  auto c = CpuCgroups::create(t.env(kSeparateCpuMounts, kSeparateCpuSelf), "gpupd.3", 4);
  ASSERT_EQ(c->version(), CgroupVersion::kV1) << c->unavailable_reason();
  auto dir = c->prepare("a", 100, 25);  // one CPU: within
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "100000");
  ASSERT_TRUE(c->set(*dir, 100, 80).ok());  // 3.2 CPUs: v1 would refuse it
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "150000");
  ASSERT_TRUE(c->set(*dir, 100, 100).ok());  // unlimited is inherited, never refused
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "-1");
  // The tightest ancestor counts, above gpupd's own cgroup too.
  std::ofstream(t.path(top + "/cpu.cfs_quota_us")) << "120000\n";
  ASSERT_TRUE(c->set(*dir, 100, 50).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), "120000");
}

TEST(GpupdCpuCgroup, PureV2DelegatesTheControllerAndMapsWeightAndCap) {
  FakeTree t;
  const char* mounts = "30 22 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
  const std::string own = "/sys/fs/cgroup/system.slice/gpupd.service";
  t.file("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n");
  t.file(own + "/cgroup.controllers", "cpu memory pids\n");
  t.file(own + "/cgroup.subtree_control", "");
  auto c = CpuCgroups::create(t.env(mounts, "0::/system.slice/gpupd.service\n"), "gpupd.42", 4);
  ASSERT_EQ(c->version(), CgroupVersion::kV2) << c->unavailable_reason();
  EXPECT_EQ(c->own(), t.path(own));
  EXPECT_EQ(slurp(t.path(own + "/cgroup.subtree_control")), "+cpu");

  auto dir = c->prepare("alpha", 300, 25);
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(*dir, t.path(own + "/gpupd.42/alpha"));
  EXPECT_EQ(slurp(t.path(own + "/gpupd.42/cgroup.subtree_control")), "+cpu");
  EXPECT_EQ(slurp(*dir + "/cpu.weight"), "300");
  EXPECT_EQ(slurp(*dir + "/cpu.max"), "100000 100000");  // 25% of 4 CPUs
  ASSERT_TRUE(c->set(*dir, 100, 100).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.weight"), "100");
  EXPECT_EQ(slurp(*dir + "/cpu.max"), "max 100000");
  ASSERT_TRUE(c->set(*dir, 0, 1).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.weight"), "1");
  EXPECT_EQ(slurp(*dir + "/cpu.max"), "4000 100000");
  ASSERT_TRUE(c->set(*dir, 10001, 100).ok());
  EXPECT_EQ(slurp(*dir + "/cpu.weight"), "10000");

  EXPECT_FALSE(c->usage_ns(*dir).ok());  // no cpu.stat
  std::ofstream(*dir + "/cpu.stat") << "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
  auto usage = c->usage_ns(*dir);
  ASSERT_TRUE(usage.ok()) << usage.error().message;
  EXPECT_EQ(*usage, 1500000u);
  ASSERT_TRUE(c->add_process(*dir, 77).ok());
  EXPECT_EQ(slurp(*dir + "/cgroup.procs"), "77");
  ASSERT_TRUE(c->remove(*dir).ok());
  c.reset();
  EXPECT_FALSE(is_dir(t.path(own + "/gpupd.42")));
}

TEST(GpupdCpuCgroup, V2MemoryAndCpuShareTheVmsCgroup) {
  FakeTree t;
  const char* mounts = "30 22 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
  const std::string own = "/sys/fs/cgroup/gpupd";
  t.file("/sys/fs/cgroup/cgroup.controllers", "cpu memory\n");
  t.file(own + "/cgroup.controllers", "cpu memory\n");
  t.file(own + "/cgroup.subtree_control", "cpu memory\n");
  auto env = t.env(mounts, "0::/gpupd\n");
  auto m = MemoryCgroups::create(env, "gpupd.8");
  auto c = CpuCgroups::create(env, "gpupd.8", 2);
  ASSERT_EQ(m->version(), CgroupVersion::kV2) << m->unavailable_reason();
  ASSERT_EQ(c->version(), CgroupVersion::kV2) << c->unavailable_reason();
  auto mdir = m->prepare("vm", 64 * MiB);
  auto cdir = c->prepare("vm", 200, 50);
  ASSERT_TRUE(mdir.ok() && cdir.ok());
  EXPECT_EQ(*mdir, *cdir);
  EXPECT_EQ(slurp(*mdir + "/memory.max"), std::to_string(64 * MiB));
  EXPECT_EQ(slurp(*cdir + "/cpu.max"), "100000 100000");
  ASSERT_TRUE(m->add_process(*mdir, 5).ok());
  ASSERT_TRUE(c->add_process(*cdir, 5).ok());
  // Whichever goes first removes it; the other finds it gone.
  ASSERT_TRUE(m->remove(*mdir).ok());
  ASSERT_TRUE(c->remove(*cdir).ok());
  EXPECT_FALSE(is_dir(*cdir));
  m.reset();
  c.reset();
  EXPECT_FALSE(is_dir(t.path(own + "/gpupd.8")));
}

TEST(GpupdCpuCgroup, HybridUsesV2OnlyWhenItHasTheCpuController) {
  FakeTree t;
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "memory pids\n");
  t.file("/sys/fs/cgroup/unified/cgroup.subtree_control", "");
  t.file("/sys/fs/cgroup/cpu/cpu.shares", "1024\n");
  auto v1 = find_cpu_cgroup(t.env(kHybridMounts, kHybridSelf));
  EXPECT_EQ(v1.version, CgroupVersion::kV1) << v1.reason;
  EXPECT_EQ(v1.own, t.path("/sys/fs/cgroup/cpu"));
  EXPECT_EQ(slurp(t.path("/sys/fs/cgroup/unified/cgroup.subtree_control")), "");  // nothing enabled

  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "cpu memory pids\n");
  auto v2 = find_cpu_cgroup(t.env(kHybridMounts, kHybridSelf));
  EXPECT_EQ(v2.version, CgroupVersion::kV2) << v2.reason;
  EXPECT_EQ(v2.own, t.path("/sys/fs/cgroup/unified"));
  EXPECT_EQ(slurp(t.path("/sys/fs/cgroup/unified/cgroup.subtree_control")), "+cpu");

  // v2 whose own cgroup cannot delegate (it holds processes): v1.
  t.file("/sys/fs/cgroup/unified/svc/cgroup.controllers", "cpu\n");
  ::mkdir(t.path("/sys/fs/cgroup/unified/svc/cgroup.subtree_control").c_str(), 0755);
  auto busy = find_cpu_cgroup(t.env(kHybridMounts, "1:cpu:/\n0::/svc\n"));
  EXPECT_EQ(busy.version, CgroupVersion::kV1) << busy.reason;
}

TEST(GpupdCpuCgroup, NoUsableHierarchySaysWhy) {
  FakeTree t;
  // Nothing mounted at all.
  auto bare = CpuCgroups::create(t.env("", ""), "gpupd.1", 2);
  EXPECT_EQ(bare->version(), CgroupVersion::kNone);
  EXPECT_EQ(bare->unavailable_reason(), "no cgroup v2 hierarchy; no cgroup v1 cpu hierarchy");
  EXPECT_EQ(bare->vm_dir("x"), "");
  auto dir = bare->prepare("x", 100, 100);
  ASSERT_FALSE(dir.ok());
  EXPECT_EQ(dir.status(), GPUP_STATUS_NOT_SUPPORTED);
  EXPECT_NE(dir.error().message.find("no cpu cgroup: no cgroup v2"), std::string::npos) << dir.error().message;
  EXPECT_EQ(bare->set("/nonexistent", 100, 100).status(), GPUP_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(bare->usage_ns("/nonexistent").status(), GPUP_STATUS_NOT_SUPPORTED);

  // v2 without cpu, and only a memory v1 hierarchy.
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "memory pids\n");
  const char* mounts =
      "34 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
      "40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
  auto no_cpu = find_cpu_cgroup(t.env(mounts, "4:memory:/\n0::/\n"));
  EXPECT_EQ(no_cpu.version, CgroupVersion::kNone);
  EXPECT_NE(no_cpu.reason.find("has no cpu controller"), std::string::npos) << no_cpu.reason;
  EXPECT_NE(no_cpu.reason.find("no cgroup v1 cpu hierarchy"), std::string::npos) << no_cpu.reason;

  // v2 has cpu but does not pass it to gpupd's cgroup; the v1 cpu hierarchy does not show it.
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "cpu memory pids\n");
  t.file("/sys/fs/cgroup/unified/svc/cgroup.controllers", "memory\n");
  const char* container = "31 30 0:28 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
                          "40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
  auto hidden = find_cpu_cgroup(t.env(container, "1:cpu:/docker/other\n0::/svc\n"));
  EXPECT_EQ(hidden.version, CgroupVersion::kNone);
  EXPECT_NE(hidden.reason.find("cpu controller not available in gpupd's cgroup"), std::string::npos) << hidden.reason;
  EXPECT_NE(hidden.reason.find("cpu cgroup /docker/other is not visible under /sys/fs/cgroup/cpu"), std::string::npos)
      << hidden.reason;
}

TEST(GpupdCpuCgroup, InstancesOfDeadGpupdsAreRemoved) {
  FakeTree t;
  const std::string own = "/sys/fs/cgroup/cpu/svc";
  t.file("/sys/fs/cgroup/unified/cgroup.controllers", "");
  t.file(own + "/cpu.shares", "1024\n");
  t.file(own + "/gpupd.999999999/a/cpu.shares", "1024\n");  // above any pid_max: gone
  std::string alive = "gpupd." + std::to_string(::getppid());
  t.file(own + "/" + alive + "/a/cpu.shares", "1024\n");
  t.file(own + "/unrelated/cpu.shares", "1024\n");
  // The memory hierarchy's instance of the same dead gpupd is MemoryCgroups' to remove.
  t.file("/sys/fs/cgroup/memory/svc/host1/gpupd.999999999/a/memory.limit_in_bytes", "1\n");
  auto c = CpuCgroups::create(t.env(kSeparateCpuMounts, kSeparateCpuSelf), "gpupd." + std::to_string(::getpid()), 1);
  ASSERT_EQ(c->version(), CgroupVersion::kV1);
  EXPECT_FALSE(is_dir(t.path(own + "/gpupd.999999999")));
  EXPECT_TRUE(is_dir(t.path(own + "/" + alive + "/a")));
  EXPECT_TRUE(is_dir(t.path(own + "/unrelated")));
  EXPECT_TRUE(is_dir(t.path("/sys/fs/cgroup/memory/svc/host1/gpupd.999999999/a")));
}

// ---------------------------------------------------------------------------------------------
// The supervisor puts each worker process in its cgroup, moves the limit, removes it at exit.

class GpupdWorkerCgroup : public ::testing::Test {
 protected:
  void SetUp() override {
    opts_.vmwp_path = FAKE_VMWP_PATH;
    opts_.ready_timeout = 5000ms;
    opts_.request_timeout = 2000ms;
    opts_.stop_timeout = 2000ms;
    opts_.memory_overhead = 100 * MiB;
    tree_.file("/sys/fs/cgroup/unified/cgroup.controllers", "");
    tree_.file(own_ + "/memory.limit_in_bytes", "max\n");
  }
  Worker::ConfigureFn configure(const std::string& vm, uint64_t max) {
    return [this, vm, max]() -> Result<control::ConfigureMessage> {
      control::ConfigureMessage m;
      m.vm = control::VmSpec{vm, control::new_guid(), "mock0", 0, max, max, 100, 100, false};
      m.adapter = control::AdapterSpec{"mock0", 42, "/nonexistent/libgpup_kmd_mock.so", "a=b\n"};
      ::mkdir(tree_.path("/" + vm).c_str(), 0755);
      m.endpoint = tree_.path("/" + vm + "/vrd.sock");
      m.log_level = "info";
      spec_ = m.vm;
      return m;
    };
  }
  bool run_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 5000ms) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      loop_.add_timer(10ms, [this] { loop_.stop(); });
      loop_.run();
    }
    return true;
  }
  Result<json> request(Worker& w, const std::string& op, json args) {
    std::optional<Result<json>> got;
    w.request(op, std::move(args), [&](Result<json> r) { got = std::move(r); });
    EXPECT_TRUE(run_until([&] { return got.has_value(); }));
    return got ? *got : Result<json>(make_error(GPUP_STATUS_TIMEOUT, "no answer"));
  }

  FakeTree tree_;
  const std::string own_ = "/sys/fs/cgroup/memory/svc/host1";
  EventLoop loop_;
  WorkerOptions opts_;
  control::VmSpec spec_;
};

TEST_F(GpupdWorkerCgroup, WorkerJoinsItsCgroupWithTheLimitWhichFollowsMaxVram) {
  opts_.memory_cgroups = MemoryCgroups::create(tree_.env(kHybridMounts, kHybridSelf), "gpupd.5");
  ASSERT_EQ(opts_.memory_cgroups->version(), CgroupVersion::kV1);
  Worker w(loop_, opts_, "v1", configure("v1", 256 * MiB));
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRunning; })) << w.last_error();
  const std::string dir = tree_.path(own_ + "/gpupd.5/v1");
  EXPECT_EQ(w.memory_cgroup(), dir);
  EXPECT_EQ(slurp(dir + "/cgroup.procs"), std::to_string(w.pid()));
  EXPECT_EQ(slurp(dir + "/memory.limit_in_bytes"), std::to_string(356 * MiB));
  json d = w.describe();
  EXPECT_EQ(d["memory_limit"]["enforced"], true) << d.dump();
  EXPECT_EQ(d["memory_limit"]["bytes"], 356 * MiB);
  EXPECT_EQ(d["memory_limit"]["hierarchy"], "cgroup v1");
  EXPECT_EQ(d["memory_limit"]["cgroup"], dir);

  control::VmSpec bigger = spec_;
  bigger.max_vram = bigger.optimal_vram = 512 * MiB;
  ASSERT_TRUE(request(w, "update", json{{"vm", control::to_json(bigger)}}).ok());
  EXPECT_EQ(slurp(dir + "/memory.limit_in_bytes"), std::to_string(612 * MiB));
  control::VmSpec smaller = spec_;
  smaller.max_vram = smaller.optimal_vram = 128 * MiB;
  ASSERT_TRUE(request(w, "update", json{{"vm", control::to_json(smaller)}}).ok());
  EXPECT_EQ(slurp(dir + "/memory.limit_in_bytes"), std::to_string(228 * MiB));
  EXPECT_EQ(w.describe()["memory_limit"]["bytes"], 228 * MiB);

  bool stopped = false;
  w.stop([&] { stopped = true; });
  ASSERT_TRUE(run_until([&] { return stopped; }));
  EXPECT_FALSE(is_dir(dir));
}

TEST_F(GpupdWorkerCgroup, WithoutACgroupTheWorkerStillRunsAndSaysTheLimitIsNotEnforced) {
  opts_.memory_cgroups = MemoryCgroups::create(tree_.env("", ""), "gpupd.5");
  Worker w(loop_, opts_, "v1", configure("v1", 256 * MiB));
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRunning; })) << w.last_error();
  json m = w.describe()["memory_limit"];
  EXPECT_EQ(m["enforced"], false) << m.dump();
  EXPECT_NE(m["reason"].get<std::string>().find("no usable memory cgroup"), std::string::npos) << m.dump();
  EXPECT_TRUE(w.memory_cgroup().empty());
}

// ---------------------------------------------------------------------------------------------
// This machine's cgroup fs, through the same code.

TEST(GpupdCgroupReal, ProcessIsLimitedInANestedCgroupWhichIsRemovedAfterwards) {
  auto m = MemoryCgroups::create(CgroupEnv::from_proc(), "gpupd." + std::to_string(::getpid()));
  if (m->version() == CgroupVersion::kNone) GTEST_SKIP() << "no writable memory cgroup: " << m->unavailable_reason();
  auto dir = m->prepare("ut", 700 * MiB);
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(dir->rfind(m->own() + "/", 0), 0u) << *dir;
  EXPECT_EQ(*m->limit(*dir), 700 * MiB);

  pid_t child = ::fork();
  if (child == 0) {
    ::pause();
    ::_exit(0);
  }
  ASSERT_GT(child, 0);
  ASSERT_TRUE(m->add_process(*dir, child).ok());
  std::string cg = slurp("/proc/" + std::to_string(child) + "/cgroup");
  std::string rel = dir->substr(m->own().size());
  EXPECT_NE(cg.find(rel + "\n"), std::string::npos) << cg;
  EXPECT_FALSE(m->remove(*dir).ok());  // busy while the process is in it
  ASSERT_TRUE(m->set_limit(*dir, 900 * MiB).ok());
  EXPECT_EQ(*m->limit(*dir), 900 * MiB);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ASSERT_TRUE(m->remove(*dir).ok());
  EXPECT_FALSE(is_dir(*dir));
  std::string base = dir->substr(0, dir->rfind('/'));
  m.reset();
  EXPECT_FALSE(is_dir(base));
}

TEST(GpupdCpuCgroupReal, ProcessRunsInANestedCpuCgroupWithItsWeightAndCap) {
  auto c = CpuCgroups::create(CgroupEnv::from_proc(), "gpupd." + std::to_string(::getpid()), 0);
  if (c->version() == CgroupVersion::kNone) GTEST_SKIP() << "no writable cpu cgroup: " << c->unavailable_reason();
  ASSERT_GE(c->cpus(), 1u);
  const bool v2 = c->version() == CgroupVersion::kV2;
  auto dir = c->prepare("ut", 250, 50);
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(dir->rfind(c->own() + "/", 0), 0u) << *dir;
  const uint64_t quota = 50ull * c->cpus() * 1000;  // half of the CPUs, per 100 ms
  if (v2) {
    EXPECT_EQ(slurp(*dir + "/cpu.weight"), "250");
    EXPECT_EQ(slurp(*dir + "/cpu.max"), std::to_string(quota) + " 100000");
  } else {
    EXPECT_EQ(slurp(*dir + "/cpu.shares"), "2560");
    EXPECT_EQ(slurp(*dir + "/cpu.cfs_period_us"), "100000");
    // Lower only when gpupd's own cgroup is capped below it.
    if (slurp(c->own() + "/cpu.cfs_quota_us") == "-1")
      EXPECT_EQ(slurp(*dir + "/cpu.cfs_quota_us"), std::to_string(quota));
    else
      EXPECT_LE(std::stoll(slurp(*dir + "/cpu.cfs_quota_us")), static_cast<long long>(quota));
  }

  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t child = ::fork();
  if (child == 0) {
    // Some CPU time once in the cgroup, then sleep.
    char b;
    if (::read(ready[0], &b, 1) != 1) ::_exit(1);
    auto until = std::chrono::steady_clock::now() + 20ms;
    while (std::chrono::steady_clock::now() < until) {
    }
    ::pause();
    ::_exit(0);
  }
  ASSERT_GT(child, 0);
  ::close(ready[0]);
  ASSERT_TRUE(c->add_process(*dir, child).ok());
  ASSERT_EQ(::write(ready[1], "x", 1), 1);
  ::close(ready[1]);
  std::string cg = slurp("/proc/" + std::to_string(child) + "/cgroup");
  std::string rel = dir->substr(c->own().size());
  EXPECT_NE(cg.find(rel + "\n"), std::string::npos) << cg;
  EXPECT_EQ(slurp(*dir + "/cgroup.procs"), std::to_string(child));
  EXPECT_FALSE(c->remove(*dir).ok());  // busy while the process is in it

  // Changed while the process runs in it.
  ASSERT_TRUE(c->set(*dir, 100, 100).ok());
  EXPECT_EQ(slurp(*dir + (v2 ? "/cpu.max" : "/cpu.cfs_quota_us")), v2 ? "max 100000" : "-1");
  EXPECT_EQ(slurp(*dir + (v2 ? "/cpu.weight" : "/cpu.shares")), v2 ? "100" : "1024");

  std::this_thread::sleep_for(100ms);
  auto usage = c->usage_ns(*dir);
  if (usage.ok()) {
    EXPECT_GT(*usage, 0u);
  } else {
    // v1 with cpuacct in a hierarchy of its own (this is how the build machine is set up).
    EXPECT_FALSE(v2) << usage.error().message;
    EXPECT_EQ(usage.status(), GPUP_STATUS_NOT_SUPPORTED) << usage.error().message;
  }
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ASSERT_TRUE(c->remove(*dir).ok());
  EXPECT_FALSE(is_dir(*dir));
  std::string base = dir->substr(0, dir->rfind('/'));
  c.reset();
  EXPECT_FALSE(is_dir(base));
}


// A worker's pids cgroup bounds its tasks, and kill_all ends every process in it, grandchildren
// that left their parent included.
TEST(GpupdPidsCgroupReal, TasksAreBoundedAndKillAllEndsEveryProcess) {
  auto p = PidsCgroups::create(CgroupEnv::from_proc(), "gpupd." + std::to_string(::getpid()));
  if (p->version() == CgroupVersion::kNone) GTEST_SKIP() << "no writable pids cgroup: " << p->unavailable_reason();
  auto dir = p->prepare("ut", 64);
  ASSERT_TRUE(dir.ok()) << dir.error().message;
  EXPECT_EQ(slurp(*dir + "/pids.max"), "64");

  int go[2], report[2];
  ASSERT_EQ(::pipe(go), 0);
  ASSERT_EQ(::pipe(report), 0);
  pid_t child = ::fork();
  if (child == 0) {
    char c;
    if (::read(go[0], &c, 1) != 1) ::_exit(1);
    for (int i = 0; i < 3; ++i) {
      pid_t g = ::fork();
      if (g == 0) {
        ::setsid();  // leaves its parent's session, as an escaping process would
        for (;;) ::pause();
      }
      ssize_t ignored = ::write(report[1], &g, sizeof g);
      (void)ignored;
    }
    for (;;) ::pause();
  }
  ASSERT_GT(child, 0);
  ASSERT_TRUE(p->add_process(*dir, child).ok());
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  std::vector<pid_t> grandchildren(3);
  for (auto& g : grandchildren) ASSERT_EQ(::read(report[0], &g, sizeof g), ssize_t(sizeof g));

  auto killed = p->kill_all(*dir);
  ASSERT_TRUE(killed.ok()) << killed.error().message;
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  for (pid_t g : grandchildren) {
    // Reparented and reaped elsewhere: gone, or a zombie on its way out.
    bool dead = false;
    for (int i = 0; i < 200 && !dead; ++i) {
      std::string st = slurp("/proc/" + std::to_string(g) + "/stat");
      dead = st.empty() || st.find(") Z") != std::string::npos;
      if (!dead) ::usleep(10000);
    }
    EXPECT_TRUE(dead) << "grandchild " << g << " survived kill_all";
  }
  EXPECT_TRUE(slurp(*dir + "/cgroup.procs").empty());
  EXPECT_TRUE(p->remove(*dir).ok());
}

}  // namespace
}  // namespace gpup::gpupd
