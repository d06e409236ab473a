// End-to-end tests: a real host (gpupd + one gpup-vmwp per VM, the OpenCL KMD on PoCL's CPU
// device) started through the `gpup` CLI on private runtime/state directories, and guests that
// are separate processes started with `gpup run`.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "e2e_host.h"
#include "host/gpupd/config.h"  // kDefaultWorkerMemoryOverhead

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// Child, Host, Run and host_pid_of are shared with the jail suite (e2e_host.h).
using gpup::e2e::Child;
using gpup::e2e::Host;
using gpup::e2e::host_pid_of;
using gpup::e2e::Run;

const char* kPoclConfig = R"TOML(
[[adapter]]
name = "pocl0"
kmd = "opencl"
)TOML";

class E2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    host_ = new Host(kPoclConfig);
    auto r = host_->gpup({"host", "start", "--config", host_->config()});
    ASSERT_EQ(r.code, 0) << r.out;
    r = host_->gpup({"vm", "add", "a", "--max-vram", "256MiB"});
    ASSERT_EQ(r.code, 0) << r.out;
    r = host_->gpup({"vm", "add", "b", "--max-vram", "512MiB"});
    ASSERT_EQ(r.code, 0) << r.out;
  }
  static void TearDownTestSuite() {
    delete host_;
    host_ = nullptr;
  }
  void SetUp() override {
    if (!host_) GTEST_SKIP() << "host did not start";
  }
  static void expect_host_alive() {
    auto r = host_->gpup({"host", "status"});
    EXPECT_EQ(r.code, 0) << r.out;
  }
  static Host* host_;
};
Host* E2E::host_ = nullptr;

TEST_F(E2E, GuestProcessRunsRealWorkThroughThePartition) {
  auto r = host_->run_guest("a", {"full"});
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("RESULTS 12288 elements checked, 0 wrong"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("partition budget 256 MiB"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("PAGETABLELEVELDESC[0]"), std::string::npos) << r.out;
}

TEST_F(E2E, StreamTransportCarriesTheSameWork) {
  auto r = host_->run_guest("b", {"full"}, {{"GPUP_TRANSPORT", "stream"}});
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("0 wrong"), std::string::npos) << r.out;
}

TEST_F(E2E, MessageOfExactly128KiBPassesAndOneMoreByteIsRefusedOnAStream) {
  auto r = host_->run_guest("a", {"limit"}, {{"GPUP_TRANSPORT", "stream"}});
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("refused before sending"), std::string::npos) << r.out;
}

TEST_F(E2E, OneByteOverAMessageGoesThroughASharedSection) {
  auto r = host_->run_guest("a", {"limit"});
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("LIMIT exactly 128 KiB passed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("went through a shared section"), std::string::npos) << r.out;
}

TEST_F(E2E, BulkPrivateDataAndOutputTravelThroughSharedSections) {
  auto base = host_->stats("a");
  ASSERT_FALSE(base.empty());
  auto r = host_->run_guest("a", {"bulk"});
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("BULK-ESCAPE 1048576 bytes, checksum"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("dispatch 0 wrong"), std::string::npos) << r.out;
  // On a stream channel the same calls are refused before anything is sent, naming the size.
  auto s = host_->run_guest("b", {"bulk"}, {{"GPUP_TRANSPORT", "stream"}});
  EXPECT_EQ(s.code, 0) << s.out;
  EXPECT_NE(s.out.find("BULK refused on the stream transport"), std::string::npos) << s.out;
  auto after = host_->stats("a");
  EXPECT_EQ(after["allocations"], base["allocations"]);
  EXPECT_EQ(after["vram"], base["vram"]);
  expect_host_alive();
}

TEST_F(E2E, BadHandlesGetClearErrorsAndEveryoneCarriesOn) {
  auto b = host_->guest("b", {"full"});  // another partition working at the same time
  auto r = host_->run_guest("a", {"bad-handles"});
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("FORGED INVALID_HANDLE"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("WRONG-TYPE OBJECT_TYPE_MISMATCH"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("STALE INVALID_HANDLE"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("PAGE-FAULT GPU_PAGE_FAULT"), std::string::npos) << r.out;
  EXPECT_EQ(b->wait(), 0) << b->output();
  auto again = host_->run_guest("a", {"full"});
  EXPECT_EQ(again.code, 0) << again.out;
  expect_host_alive();
}

TEST_F(E2E, HostileGuestSpeakingRawProtocolIsRefusedAndLeavesNothing) {
  auto base = host_->stats("a");
  ASSERT_FALSE(base.empty());
  auto b = host_->guest("b", {"full"});  // another partition works meanwhile
  auto c = host_->gpup({"run", "--vm", "a", "--", GPUP_HOSTILE});
  EXPECT_EQ(c.code, 0) << c.out;
  EXPECT_NE(c.out.find("HOSTILE all refused, connection intact"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("FLOOD 4096 sync objects, then QUOTA_EXCEEDED"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("SECTIONS 64 registered, then QUOTA_EXCEEDED; all abuse refused"), std::string::npos) << c.out;
  EXPECT_EQ(b->wait(), 0) << b->output();
  auto after = host_->stats("a");
  EXPECT_EQ(after["allocations"], base["allocations"]);
  EXPECT_EQ(after["sync_objects"], base["sync_objects"]);
  EXPECT_EQ(after["vram"], base["vram"]);
  expect_host_alive();
}

TEST_F(E2E, ClientsThatNeverHandshakeDoNotLockOthersOut) {
  auto shown = host_->gpup({"vm", "show", "a", "--json"});
  ASSERT_EQ(shown.code, 0) << shown.out;
  const std::string endpoint = nlohmann::json::parse(shown.out).at("endpoint").get<std::string>();
  std::vector<int> stalled;
  for (int i = 0; i < 3; ++i) {  // connected, silent: each would hold a serial handshake 5 s
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, endpoint.c_str(), sizeof addr.sun_path - 1);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
    stalled.push_back(fd);
  }
  auto r = host_->run_guest("a", {"limit"});
  for (int fd : stalled) close(fd);
  EXPECT_EQ(r.code, 0) << r.out;
}

TEST_F(E2E, AnotherProcesssHandlesAndGpuVaAreNotReachable) {
  auto holder = host_->guest("a", {"hold"});
  ASSERT_TRUE(holder->wait_for("READY", 60s)) << holder->output();
  std::istringstream in(holder->output().substr(holder->output().find("READY") + 6));
  std::string handle, va;
  in >> handle >> va;
  auto r = host_->run_guest("a", {"foreign", handle, va});
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("FOREIGN-VA GPU_PAGE_FAULT"), std::string::npos) << r.out;
  holder->close_stdin();
  EXPECT_EQ(holder->wait(), 0) << holder->output();
  EXPECT_NE(holder->output().find("INTACT 0 changed"), std::string::npos) << holder->output();
}

TEST_F(E2E, GuestKilledMidWorkLeavesNothingBehind) {
  auto base = host_->stats("a");
  ASSERT_FALSE(base.empty());
  auto busy = host_->guest("a", {"busy"});
  ASSERT_TRUE(busy->wait_for("BUSY", 60s)) << busy->output();
  auto during = host_->stats("a");
  EXPECT_GE(during["allocations"], base["allocations"] + 8);
  EXPECT_GE(during["vram"], base["vram"] + (8u << 20));
  // Kill the guest process itself (gpup run's child), not the launcher.
  ASSERT_TRUE(busy->wait_for("\n", 5s));
  pid_t guest_pid = host_pid_of(std::stoi(busy->output().substr(busy->output().find("BUSY") + 5)));
  ASSERT_GT(guest_pid, 0);
  ASSERT_EQ(kill(guest_pid, SIGKILL), 0);
  busy->wait();
  std::map<std::string, uint64_t> after;
  for (int i = 0; i < 100; ++i) {
    after = host_->stats("a");
    if (after["allocations"] == base["allocations"] && after["vram"] == base["vram"] && after["devices"] == base["devices"]) break;
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_EQ(after["allocations"], base["allocations"]);
  EXPECT_EQ(after["devices"], base["devices"]);
  EXPECT_EQ(after["contexts"], base["contexts"]);
  EXPECT_EQ(after["sync_objects"], base["sync_objects"]);
  EXPECT_EQ(after["vram"], base["vram"]);
  EXPECT_EQ(after["processes"], base["processes"]);
  expect_host_alive();
}

// The worker sandbox (src/host/vmwp/seccomp_policy.h, src/host/gpupd/cgroup.h): the running
// worker has its seccomp filter and rlimits, sits in its VM's memory cgroup nested under gpupd's
// own, limited to max VRAM + the default overhead (512 MiB; 4 GiB in sanitizer builds), the limit follows `vm set --max-vram`
// and the cgroup goes with the partition.
std::string proc_field(pid_t pid, const std::string& file, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/" + file);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) {
      std::string v = line.substr(key.size());
      return v.substr(std::min(v.size(), v.find_first_not_of(" \t")));
    }
  return {};
}

std::string read_trimmed(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

TEST_F(E2E, WorkerRunsUnderItsSeccompPolicyRlimitsAndMemoryCgroup) {
  constexpr uint64_t MiB = 1ull << 20;
  auto shown = host_->gpup({"vm", "show", "a", "--json"});
  ASSERT_EQ(shown.code, 0) << shown.out;
  auto vm = nlohmann::json::parse(shown.out);
  const pid_t worker = vm.at("pid").get<pid_t>();
  EXPECT_EQ(proc_field(worker, "status", "Seccomp:"), "2");
  EXPECT_EQ(proc_field(worker, "status", "NoNewPrivs:"), "1");
  rlimit core{};
  ASSERT_EQ(prlimit(worker, RLIMIT_CORE, nullptr, &core), 0) << std::strerror(errno);
  EXPECT_EQ(core.rlim_max, 0u);

  const auto& mem = vm.at("memory_limit");
  if (!mem.at("enforced").get<bool>()) {
    // Only acceptable when this machine gives gpupd no writable memory cgroup.
    std::string v1;
    std::ifstream in("/proc/self/cgroup");
    for (std::string l; std::getline(in, l);)
      if (l.find(":memory:") != std::string::npos) v1 = "/sys/fs/cgroup/memory" + l.substr(l.find(":memory:") + 8);
    bool writable = !v1.empty() && access((v1 + "/memory.limit_in_bytes").c_str(), F_OK) == 0 &&
                    access(v1.c_str(), W_OK) == 0;
    ASSERT_FALSE(writable) << "memory cgroup " << v1 << " is writable but the limit is not enforced: " << mem.dump();
    GTEST_SKIP() << "no writable memory cgroup here: " << mem.value("reason", std::string());
  }
  const std::string cgroup = mem.at("cgroup").get<std::string>();
  const bool v2 = mem.at("hierarchy").get<std::string>() == "cgroup v2";
  const uint64_t overhead = gpup::gpupd::kDefaultWorkerMemoryOverhead;
  EXPECT_EQ(mem.at("bytes").get<uint64_t>(), 256 * MiB + overhead);
  const std::string limit_file = cgroup + (v2 ? "/memory.max" : "/memory.limit_in_bytes");
  EXPECT_EQ(read_trimmed(limit_file), std::to_string(256 * MiB + overhead));

  // Nested under gpupd's own memory cgroup, as <own>/gpupd.<pid>/<vm>.
  const std::string gpupd_pid = read_trimmed(host_->runtime_dir() + "/gpupd.pid");
  ASSERT_FALSE(gpupd_pid.empty());
  std::string gpupd_cg, worker_cg;
  for (auto [pid, out] : {std::pair<std::string, std::string*>{gpupd_pid, &gpupd_cg},
                          std::pair<std::string, std::string*>{std::to_string(worker), &worker_cg}}) {
    std::ifstream in("/proc/" + pid + "/cgroup");
    std::string l;
    while (std::getline(in, l)) {
      if (v2 && l.rfind("0::", 0) == 0) *out = l.substr(3);
      if (!v2 && l.find(":memory:") != std::string::npos) *out = l.substr(l.find(":memory:") + 8);
    }
  }
  std::string expected = (gpupd_cg == "/" ? "" : gpupd_cg) + "/gpupd." + gpupd_pid + "/a";
  EXPECT_EQ(worker_cg, expected);
  EXPECT_EQ(cgroup.substr(cgroup.size() - std::min(cgroup.size(), expected.size())), expected) << cgroup;

  // The limit follows the partition's max VRAM.
  auto r = host_->gpup({"vm", "set", "a", "--max-vram", "300MiB"});
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(read_trimmed(limit_file), std::to_string(300 * MiB + overhead));
  r = host_->gpup({"vm", "set", "a", "--max-vram", "256MiB"});
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(read_trimmed(limit_file), std::to_string(256 * MiB + overhead));

  // Real kernels still build and run in the sandboxed worker.
  auto g = host_->run_guest("a", {"full"});
  EXPECT_EQ(g.code, 0) << g.out;
  EXPECT_NE(g.out.find("0 wrong"), std::string::npos) << g.out;

  // A removed partition's cgroup is gone with its worker.
  r = host_->gpup({"vm", "add", "sandboxed", "--max-vram", "64MiB"});
  ASSERT_EQ(r.code, 0) << r.out;
  auto c = nlohmann::json::parse(host_->gpup({"vm", "show", "sandboxed", "--json"}).out);
  const std::string c_cgroup = c.at("memory_limit").value("cgroup", std::string());
  ASSERT_FALSE(c_cgroup.empty()) << c.dump();
  EXPECT_TRUE(fs::is_directory(c_cgroup));
  r = host_->gpup({"vm", "remove", "sandboxed"});
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_FALSE(fs::exists(c_cgroup));
  expect_host_alive();
}

// VidMm's minimum guarantee, on a mock adapter of 256 MiB shared by two partitions: a (min 64 MiB)
// and b (no min, max = the whole adapter). b borrowing everything it can never takes a's min; b's
// refusal is the same out-of-memory as the max cap; what b borrowed returns once it frees it.
// Its own host, so the pool is not shared with the E2E suite's partitions (ctest: e2e_vidmm).
const char* kMockVidMmConfig = R"TOML(
[[adapter]]
name = "mock0"
kmd = "mock"

[adapter.config]
memory = 268435456
)TOML";

nlohmann::json json_of(const Run& r) {
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  return j.is_discarded() ? nlohmann::json::object() : j;
}

uint64_t field(const std::string& out, const std::string& key) {
  auto p = out.find(key + "=");
  return p == std::string::npos ? UINT64_MAX : std::stoull(out.substr(p + key.size() + 1));
}

TEST(VidMm, MinReservationHoldsWhileAnotherPartitionTakesAllFreeMemory) {
  constexpr uint64_t MiB = 1ull << 20;
  Host host(kMockVidMmConfig);
  auto r = host.gpup({"host", "start", "--config", host.config()});
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_EQ((r = host.gpup({"vm", "add", "a", "--min-vram", "64MiB", "--max-vram", "128MiB"})).code, 0) << r.out;
  ASSERT_EQ((r = host.gpup({"vm", "add", "b", "--max-vram", "256MiB"})).code, 0) << r.out;

  // b takes everything it can, 16 MiB at a time, and keeps it.
  auto b = host.guest("b", {"fill", "16"});
  ASSERT_TRUE(b->wait_for("VMI ", 60s)) << b->output();
  ASSERT_TRUE(b->wait_for("\n", 5s));
  const std::string& bout = b->output();
  EXPECT_NE(bout.find("FILLED " + std::to_string(192 * MiB) + " QUOTA_EXCEEDED"), std::string::npos) << bout;
  EXPECT_NE(bout.find("above its min of 0 B plus what it could borrow"), std::string::npos) << bout;
  EXPECT_NE(bout.find("64 MiB their reserved mins"), std::string::npos) << bout;
  EXPECT_EQ(field(bout, "budget"), 192 * MiB) << bout;
  EXPECT_EQ(field(bout, "usage"), 192 * MiB) << bout;
  EXPECT_EQ(field(bout, "reservation"), 0u) << bout;

  auto shown = json_of(host.gpup({"vm", "show", "b", "--json"}));
  EXPECT_EQ(shown["vram"].value("borrowed", uint64_t{0}), 192 * MiB) << shown.dump();
  EXPECT_EQ(shown["stats"].value("vram_borrowed", uint64_t{0}), 192 * MiB) << shown.dump();
  EXPECT_GE(shown["stats"].value("vram_refused", uint64_t{0}), 1u) << shown.dump();
  auto adapters = json_of(host.gpup({"adapters", "--json"}));
  ASSERT_TRUE(adapters.is_array() && !adapters.empty()) << adapters.dump();
  EXPECT_EQ(adapters[0].value("borrowed_vram", uint64_t{0}), 192 * MiB) << adapters.dump();

  // a still gets its whole min...
  auto a = host.run_guest("a", {"alloc", "64", "16"});
  EXPECT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("ALLOCATED " + std::to_string(64 * MiB)), std::string::npos) << a.out;
  EXPECT_EQ(field(a.out, "budget"), 64 * MiB) << a.out;
  EXPECT_EQ(field(a.out, "reservation"), 64 * MiB) << a.out;
  EXPECT_EQ(field(a.out, "available"), 64 * MiB) << a.out;
  // ...but nothing above it while b borrows the rest.
  a = host.run_guest("a", {"alloc", "80", "16"});
  EXPECT_NE(a.out.find("REFUSED " + std::to_string(64 * MiB) + " QUOTA_EXCEEDED"), std::string::npos) << a.out;
  // Nor can a min be raised into what b borrows now.
  r = host.gpup({"vm", "set", "a", "--min-vram", "96MiB"});
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("192 MiB borrowed"), std::string::npos) << r.out;

  // b frees everything; what it borrowed goes back to the pool.
  b->close_stdin();
  EXPECT_EQ(b->wait(30s), 0) << b->output();
  EXPECT_NE(b->output().find("FREED"), std::string::npos) << b->output();
  uint64_t borrowed = UINT64_MAX;
  for (int i = 0; i < 100 && borrowed != 0; ++i) {
    std::this_thread::sleep_for(100ms);
    borrowed = json_of(host.gpup({"adapters", "--json"}))[0].value("borrowed_vram", UINT64_MAX);
  }
  EXPECT_EQ(borrowed, 0u);
  shown = json_of(host.gpup({"vm", "show", "b", "--json"}));
  EXPECT_EQ(shown["stats"].value("vram_used", UINT64_MAX), 0u) << shown.dump();

  // Now a may borrow up to its max.
  a = host.run_guest("a", {"alloc", "128", "16"});
  EXPECT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("ALLOCATED " + std::to_string(128 * MiB)), std::string::npos) << a.out;
  EXPECT_EQ(field(a.out, "budget"), 128 * MiB) << a.out;
}

// ---------------------------------------------------------------------------------------------
// VidSch and fault isolation: device time shared by weight and cap, TDR per partition, a crashing
// worker contained, a killed guest contained. The guests are an unmodified OpenCL program
// (cl_sched_guest.cpp). One host for the suite, with a TDR limit of 2 resets per minute.

const char* kVidSchConfig = R"TOML(
tdr_limit_count = 2
[[adapter]]
name = "pocl0"
kmd = "opencl"
)TOML";

// utime + stime of a process, in seconds.
double cpu_seconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(stat.substr(close + 2));
  std::string f;
  double ticks = 0;
  for (int i = 3; i <= 15 && rest >> f; ++i)
    if (i == 14 || i == 15) ticks += std::stod(f);  // utime, stime
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

class VidSchE2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    host_ = new Host(kVidSchConfig);
    auto r = host_->gpup({"host", "start", "--config", host_->config()});
    ASSERT_EQ(r.code, 0) << r.out;
  }
  static void TearDownTestSuite() {
    delete host_;
    host_ = nullptr;
  }
  void SetUp() override {
    if (!host_) GTEST_SKIP() << "host did not start";
  }
  static void add(const std::string& vm, std::vector<std::string> opts = {}) {
    std::vector<std::string> args = {"vm", "add", vm, "--max-vram", "256MiB"};
    args.insert(args.end(), opts.begin(), opts.end());
    auto r = host_->gpup(args);
    ASSERT_EQ(r.code, 0) << r.out;
  }
  static std::unique_ptr<Child> cl(const std::string& vm, std::vector<std::string> args) {
    return host_->guest(vm, std::move(args), {}, GPUP_CL_GUEST);
  }
  static nlohmann::json show(const std::string& vm) { return json_of(host_->gpup({"vm", "show", vm, "--json"})); }
  static pid_t worker_pid(const std::string& vm) { return show(vm).value("pid", -1); }
  // A cl_sched_guest that ended well: exit 0 and its success line.
  static void expect_success(Child& c, const std::string& line) {
    EXPECT_EQ(c.wait(60s), 0) << c.output();
    EXPECT_NE(c.output().find(line), std::string::npos) << c.output();
  }
  // Waits until the partition's worker runs (after a reset it is restarted).
  static nlohmann::json wait_running(const std::string& vm) {
    nlohmann::json j;
    for (int i = 0; i < 200; ++i) {
      j = show(vm);
      if (j.value("state", "") == "running") break;
      std::this_thread::sleep_for(100ms);
    }
    return j;
  }
  static Host* host_;
};
Host* VidSchE2E::host_ = nullptr;

// Two partitions with weights 3:1 saturate the device: the adapter time gpupd granted them, and
// the CPU time their workers (where the CPU device's kernels run) used, split 75/25.
TEST_F(VidSchE2E, WeightsThreeToOneShareTheDeviceThreeToOne) {
  add("heavy", {"--compute-weight", "300"});
  add("light", {"--compute-weight", "100"});
  auto h = cl("heavy", {"spin", "12"});
  auto l = cl("light", {"spin", "12"});
  ASSERT_TRUE(h->wait_for("WARM", 60s)) << h->output();
  ASSERT_TRUE(l->wait_for("WARM", 60s)) << l->output();
  std::this_thread::sleep_for(500ms);
  const pid_t hp = worker_pid("heavy"), lp = worker_pid("light");
  auto sched = [](const nlohmann::json& j) { return static_cast<double>(j["device"].value("scheduled_ns", uint64_t{0})); };
  const double h0 = sched(show("heavy")), l0 = sched(show("light"));
  const double hc0 = cpu_seconds(hp), lc0 = cpu_seconds(lp);
  std::this_thread::sleep_for(4s);
  const double h1 = sched(show("heavy")), l1 = sched(show("light"));
  const double hc1 = cpu_seconds(hp), lc1 = cpu_seconds(lp);
  ASSERT_FALSE(h->wait_for("SPIN", 0ms)) << "the window must end while both still run: " << h->output();
  ASSERT_FALSE(l->wait_for("SPIN", 0ms)) << "the window must end while both still run: " << l->output();
  const double share = (h1 - h0) / ((h1 - h0) + (l1 - l0));
  const double cpu_share = (hc1 - hc0) / ((hc1 - hc0) + (lc1 - lc0));
  EXPECT_NEAR(share, 0.75, 0.075) << "device time granted: heavy " << (h1 - h0) / 1e9 << " s, light " << (l1 - l0) / 1e9 << " s";
  EXPECT_NEAR(cpu_share, 0.75, 0.075) << "worker CPU time: heavy " << hc1 - hc0 << " s, light " << lc1 - lc0 << " s";
  EXPECT_EQ(h->wait(60s), 0) << h->output();
  EXPECT_EQ(l->wait(60s), 0) << l->output();
  EXPECT_NE(h->output().find(" ok"), std::string::npos) << h->output();
  EXPECT_NE(l->output().find(" ok"), std::string::npos) << l->output();
  std::cout << "[ shares   ] device time " << share << ", worker CPU " << cpu_share << " (target 0.75)\n";
}

// A lone partition capped at 20% stays under 25% of the device, though nothing else wants it.
TEST_F(VidSchE2E, CapHoldsALonePartitionToItsShare) {
  add("capped", {"--max-compute", "20"});
  auto g = cl("capped", {"spin", "8"});
  ASSERT_TRUE(g->wait_for("WARM", 60s)) << g->output();
  std::this_thread::sleep_for(500ms);
  const pid_t wp = worker_pid("capped");
  auto sched = [](const nlohmann::json& j) { return static_cast<double>(j["device"].value("scheduled_ns", uint64_t{0})); };
  const auto t0 = std::chrono::steady_clock::now();
  const double s0 = sched(show("capped")), c0 = cpu_seconds(wp);
  std::this_thread::sleep_for(4s);
  const double s1 = sched(show("capped")), c1 = cpu_seconds(wp);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_FALSE(g->wait_for("SPIN", 0ms)) << g->output();
  const double share = (s1 - s0) / 1e9 / wall;
  const double cpu_share = (c1 - c0) / (wall * static_cast<double>(sysconf(_SC_NPROCESSORS_ONLN)));
  EXPECT_LE(share, 0.25) << "device time granted over " << wall << " s";
  EXPECT_LE(cpu_share, 0.25) << "worker CPU " << c1 - c0 << " s over " << wall << " s";
  EXPECT_GE(share, 0.05) << "it must still run";
  EXPECT_EQ(g->wait(60s), 0) << g->output();
  std::cout << "[ cap      ] device time " << share << ", worker CPU " << cpu_share << " (cap 0.20)\n";
}

// An endless kernel in one partition is reset within the TDR delay (2 s) + 1 s; its guest gets
// the error (now and on later calls); another partition's work completes, correct, during and
// after it, and the reset partition runs again once its worker is back.
TEST_F(VidSchE2E, EndlessKernelIsResetWithinTheTdrDelayWhileOthersRunOn) {
  add("hung");
  add("bystander");
  const pid_t bystander_worker = worker_pid("bystander");
  auto b = cl("bystander", {"spin", "8"});
  ASSERT_TRUE(b->wait_for("WARM", 60s)) << b->output();
  auto h = cl("hung", {"hang"});
  ASSERT_TRUE(h->wait_for("HANG started", 60s)) << h->output();
  const auto started = std::chrono::steady_clock::now();
  ASSERT_TRUE(h->wait_for("HANG later", 10s)) << h->output();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  EXPECT_EQ(h->wait(10s), 0) << h->output();
  const auto& out = h->output();
  auto ms = out.find("HANG err=");
  ASSERT_NE(ms, std::string::npos) << out;
  EXPECT_EQ(out.find("HANG err=0 "), std::string::npos) << out;
  const double reset_ms = std::stod(out.substr(out.find("ms=", ms) + 3));
  EXPECT_LE(reset_ms, 3000) << out;
  EXPECT_GE(reset_ms, 1900) << "reset before the TDR delay: " << out;
  EXPECT_LE(waited, 3.5) << out;
  expect_success(*b, " ok");

  auto hj = wait_running("hung");
  EXPECT_EQ(hj["resets"].value("total", 0), 1) << hj.dump();
  EXPECT_NE(hj["resets"].value("last", "").find("TDR"), std::string::npos) << hj.dump();
  auto bj = show("bystander");
  EXPECT_EQ(bj.value("pid", -1), bystander_worker) << "the other partition's worker was not touched";
  EXPECT_EQ(bj["resets"].value("total", -1), 0) << bj.dump();
  auto after = cl("bystander", {"check"});
  EXPECT_EQ(after->wait(60s), 0) << after->output();
  auto again = cl("hung", {"check"});
  expect_success(*again, "CHECK ok");
}

// A kernel that crashes its worker (a write to an address no buffer has: SIGSEGV in the worker)
// ends only that partition: its guest gets an error in bounded time, the other partition's
// concurrent work is correct, and the crashed partition reconnects and runs again.
TEST_F(VidSchE2E, KernelThatCrashesItsWorkerEndsOnlyThatPartition) {
  add("crashy");
  add("neighbour");
  const pid_t neighbour_worker = worker_pid("neighbour");
  auto n = cl("neighbour", {"spin", "6"});
  ASSERT_TRUE(n->wait_for("WARM", 60s)) << n->output();
  auto c = cl("crashy", {"crash"});
  ASSERT_TRUE(c->wait_for("CRASH started", 60s)) << c->output();
  ASSERT_TRUE(c->wait_for("CRASH later", 10s)) << c->output();
  EXPECT_EQ(c->wait(10s), 0) << c->output();
  EXPECT_EQ(c->output().find("CRASH err=0 "), std::string::npos) << c->output();
  expect_success(*n, " ok");
  auto cj = wait_running("crashy");
  EXPECT_EQ(cj["resets"].value("total", 0), 1) << cj.dump();
#ifdef GPUP_SANITIZER_BUILD
  // AddressSanitizer takes the SIGSEGV, reports it and exits with a failing status (the worker is
  // pid 1 of its namespace, so the abort it then raises at itself is ignored).
  EXPECT_NE(cj.value("last_exit", "").find(" status "), std::string::npos) << cj.dump();
#else
  EXPECT_NE(cj.value("last_exit", "").find("signal"), std::string::npos) << cj.dump();
#endif
  EXPECT_EQ(worker_pid("neighbour"), neighbour_worker);
  auto again = cl("crashy", {"check"});
  expect_success(*again, "CHECK ok");
}

// A guest killed with SIGKILL while its kernels run: the other partition is not disturbed, and
// the killed guest's worker ends up holding nothing (and is not restarted).
TEST_F(VidSchE2E, GuestKilledWhileItsKernelsRunDoesNotDisturbOthers) {
  add("victim");
  add("survivor");
  const pid_t victim_worker = worker_pid("victim"), survivor_worker = worker_pid("survivor");
  auto s = cl("survivor", {"spin", "6"});
  auto v = cl("victim", {"spin", "30"});
  ASSERT_TRUE(v->wait_for("WARM", 60s)) << v->output();
  ASSERT_TRUE(s->wait_for("WARM", 60s)) << s->output();
  auto pos = v->output().find("PID ");
  ASSERT_NE(pos, std::string::npos) << v->output();
  const pid_t guest = host_pid_of(std::stoi(v->output().substr(pos + 4)), "cl_sched_guest spin 30");
  ASSERT_GT(guest, 1);
  ASSERT_EQ(kill(guest, SIGKILL), 0);
  v->wait(10s);
  expect_success(*s, " ok");
  nlohmann::json stats;
  for (int i = 0; i < 100; ++i) {
    stats = show("victim")["stats"];
    if (stats.is_object() && stats["totals"].value("processes", 1) == 0 && stats.value("vram_used", 1) == 0) break;
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_EQ(stats["totals"].value("processes", -1), 0) << stats.dump();
  EXPECT_EQ(stats["totals"].value("allocations", -1), 0) << stats.dump();
  EXPECT_EQ(stats.value("vram_used", -1), 0) << stats.dump();
  EXPECT_EQ(worker_pid("victim"), victim_worker) << "a guest's death is not a reset";
  EXPECT_EQ(worker_pid("survivor"), survivor_worker);
}

// A partition reset tdr_limit_count (2) times within the window is removed: no worker, guests and
// `vm start` are refused with the reason, until `gpup vm reset` brings it back.
TEST_F(VidSchE2E, RepeatedResetsRemoveThePartitionUntilTheOperatorResetsIt) {
  add("flaky");
  for (int i = 0; i < 2; ++i) {
    wait_running("flaky");
    auto c = cl("flaky", {"crash"});
    EXPECT_EQ(c->wait(60s), 0) << c->output();
  }
  nlohmann::json j;
  for (int i = 0; i < 100; ++i) {
    j = show("flaky");
    if (j.value("state", "") == "removed") break;
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(j.value("state", ""), "removed") << j.dump();
  EXPECT_NE(j.value("last_error", "").find("gpup vm reset flaky"), std::string::npos) << j.dump();
  auto refused = cl("flaky", {"check"});
  EXPECT_NE(refused->wait(60s), 0) << refused->output();
  EXPECT_NE(refused->output().find("removed"), std::string::npos) << refused->output();
  auto r = host_->gpup({"vm", "start", "flaky"});
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("removed"), std::string::npos) << r.out;
  r = host_->gpup({"vm", "reset", "flaky"});
  EXPECT_EQ(r.code, 0) << r.out;
  auto back = cl("flaky", {"check"});
  expect_success(*back, "CHECK ok");
  EXPECT_EQ(show("flaky")["resets"].value("recent", -1), 0);
}

}  // namespace
