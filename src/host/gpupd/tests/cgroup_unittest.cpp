// Memory cgroups for workers (cgroup.h): detection and limits against fake v1, v2 and hybrid trees
// built in a temp directory, the worker supervisor moving a process into its cgroup, and the same
// code against this machine's real cgroup fs (skipped, saying why, when it is not writable).
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

}  // namespace
}  // namespace gpup::gpupd
