// Integration tests of gpupd and the gpup CLI: a real gpupd on private runtime/state directories,
// started and driven through the gpup binary, with fake_vmwp (src/host/gpupd/tests) as the VM
// worker and the mock KMD plugins (src/kmd/mock) as adapters.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>
#include <sys/un.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "host/control/client.h"
#include "host/control/protocol.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

struct Out {
  int code = -1;
  std::string out, err;
};

// In a forked child: adds env and execs argv (exit 126 when it cannot).
[[noreturn]] void exec_with(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env) {
  for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  ::execv(args[0], args.data());
  ::_exit(126);
}

// Runs argv with env added, stdout and stderr captured; kills it after timeout.
Out run(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env,
        std::chrono::milliseconds timeout = 60s) {
  int o[2], e[2];
  if (::pipe2(o, O_CLOEXEC) != 0 || ::pipe2(e, O_CLOEXEC) != 0) std::abort();
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(o[1], 1);
    ::dup2(e[1], 2);
    exec_with(argv, env);
  }
  ::close(o[1]);
  ::close(e[1]);
  Out r;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  pollfd fds[2] = {{o[0], POLLIN, 0}, {e[0], POLLIN, 0}};
  int open = 2;
  while (open > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      ::kill(pid, SIGKILL);
      r.err += "[killed by the test: timeout]";
      break;
    }
    if (::poll(fds, 2, static_cast<int>(left.count())) <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[4096];
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(n));
      } else {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open;
      }
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) ::close(f.fd);
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

bool alive(pid_t pid) {
  if (::kill(pid, 0) != 0) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  auto p = s.rfind(')');
  return p == std::string::npos || p + 2 >= s.size() || s[p + 2] != 'Z';
}

const char* kMockConfig = R"(
[[adapter]]
name = "mock0"
kmd = "mock"

[[adapter]]
name = "nopv0"
kmd = "mock_nopv"

[[adapter]]
name = "broken0"
kmd = "mock_missing"

[[adapter]]
name = "nosecure0"
kmd = "mock_nosecure"
)";

constexpr uint64_t MiB = 1ull << 20, GiB = 1ull << 30;

class GpupHost : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gpit-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    env_ = {{"GPUP_RUNTIME_DIR", dir_ + "/run"},
            {"GPUP_STATE_DIR", dir_ + "/state"},
            {"GPUP_KMD_PATH", GPUP_KMD_DIR},
            {"GPUP_LOG", "info"}};
    config_ = dir_ + "/gpupd.toml";
  }
  void TearDown() override {
    // Whatever a test left running goes: gpupd by its pid file, then the directory.
    std::ifstream pidf(dir_ + "/run/gpupd.pid");
    pid_t pid = 0;
    if (pidf >> pid && pid > 0 && alive(pid)) {
      gpup({"host", "stop"});
      if (alive(pid)) ::kill(pid, SIGKILL);
    }
    if (HasFailure()) {
      std::ifstream log(dir_ + "/run/gpupd.log");
      std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
      std::cerr << "---- gpupd.log ----\n" << text << "-------------------\n";
    }
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  void require_mocks() {
    if (!GPUP_IT_HAVE_MOCKS) GTEST_SKIP() << "the mock KMD plugins (src/kmd/mock) are not part of this build";
    for (const char* lib : {"libgpup_kmd_mock.so", "libgpup_kmd_mock_nopv.so", "libgpup_kmd_mock_missing.so",
                            "libgpup_kmd_mock_nosecure.so"})
      if (!fs::exists(fs::path(GPUP_KMD_DIR) / lib)) GTEST_SKIP() << lib << " is not built in " << GPUP_KMD_DIR;
  }
  Out gpup(std::vector<std::string> args, std::chrono::milliseconds timeout = 60s) {
    args.insert(args.begin(), GPUP_CLI);
    return run(args, env_, timeout);
  }
  json gpup_json(std::vector<std::string> args) {
    args.push_back("--json");
    Out r = gpup(args);
    EXPECT_EQ(r.code, 0) << r.err;
    return json::parse(r.out, nullptr, false);
  }
  void start(const std::string& config = kMockConfig) {
    std::ofstream(config_) << config;
    Out r = gpup({"host", "start", "--config", config_, "--vmwp", FAKE_VMWP});
    ASSERT_EQ(r.code, 0) << r.out << r.err;
  }
  json vm(const std::string& name) {
    for (const auto& v : gpup_json({"vm", "list"}))
      if (v["name"] == name) return v;
    return json();
  }
  // Polls vm list until pred(vm) holds.
  bool wait_vm(const std::string& name, const std::function<bool(const json&)>& pred, std::chrono::seconds t = 10s) {
    auto deadline = std::chrono::steady_clock::now() + t;
    while (std::chrono::steady_clock::now() < deadline) {
      json v = vm(name);
      if (!v.is_null() && pred(v)) return true;
      std::this_thread::sleep_for(50ms);
    }
    return false;
  }
  json adapter(const std::string& name) {
    for (const auto& a : gpup_json({"adapters"}))
      if (a["name"] == name) return a;
    return json();
  }
  std::string run_dir() const { return dir_ + "/run"; }
  std::string state_file() const { return dir_ + "/state/partitions.json"; }
  json state() {
    std::ifstream in(state_file());
    return json::parse(in, nullptr, false);
  }
  // The partition's entry in the state file.
  json persisted(const std::string& name) {
    json s = state();
    if (s.is_object() && s["partitions"].is_array())
      for (const auto& p : s["partitions"])
        if (p["name"] == name) return p;
    return json();
  }
  // How many workers gpupd ever spawned for the VM, from its log (kept across gpupd restarts).
  size_t spawns(const std::string& name) {
    std::ifstream log(run_dir() + "/gpupd.log");
    std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
    const std::string line = "vm " + name + ": worker started, pid ";
    size_t n = 0;
    for (auto at = text.find(line); at != std::string::npos; at = text.find(line, at + 1)) ++n;
    return n;
  }

  std::string dir_, config_;
  std::map<std::string, std::string> env_;
};

TEST_F(GpupHost, StartStatusSecondDaemonAndStop) {
  Out down = gpup({"host", "status"});
  EXPECT_EQ(down.code, 1);
  EXPECT_EQ(down.err, "gpup: gpupd is not running (no socket at " + run_dir() + "/gpupd.sock)\n");

  start("");  // no adapters: runs without any KMD
  json s = gpup_json({"host", "status"});
  pid_t pid = s["pid"].get<pid_t>();
  EXPECT_TRUE(alive(pid));
  EXPECT_EQ(s["adapters"], 0);
  EXPECT_EQ(s["runtime_dir"], run_dir());
  Out human = gpup({"host", "status"});
  EXPECT_EQ(human.code, 0);
  EXPECT_NE(human.out.find("running, pid " + std::to_string(pid)), std::string::npos) << human.out;

  struct stat st {};
  ASSERT_EQ(::stat((run_dir() + "/gpupd.sock").c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "root only without an admin_group";

  Out again = gpup({"host", "start"});
  EXPECT_EQ(again.code, 0);
  EXPECT_NE(again.out.find("already running (pid " + std::to_string(pid) + ")"), std::string::npos) << again.out;

  Out second = run({GPUPD_BIN, "--foreground", "--runtime-dir", run_dir(), "--state-dir", dir_ + "/state",
                    "--config", config_},
                   env_);
  EXPECT_EQ(second.code, 1);
  EXPECT_NE(second.err.find("another gpupd (pid " + std::to_string(pid) + ") is running on runtime dir " + run_dir()),
            std::string::npos)
      << second.err;

  Out stop = gpup({"host", "stop"});
  EXPECT_EQ(stop.code, 0) << stop.err;
  EXPECT_FALSE(alive(pid));
  EXPECT_FALSE(fs::exists(run_dir() + "/gpupd.sock"));
  EXPECT_FALSE(fs::exists(run_dir() + "/gpupd.pid"));
  Out stopped = gpup({"host", "stop"});
  EXPECT_EQ(stopped.code, 1);
  EXPECT_NE(stopped.err.find("gpupd is not running"), std::string::npos);
}

TEST_F(GpupHost, OperatorSocketRejectsBadRequests) {
  start("");
  std::string sock = run_dir() + "/gpupd.sock";
  auto call = [&](const json& req) { return gpup::control::call(sock, req, 5s); };
  auto unknown = call(json{{"op", "format-disk"}});
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().message, "unknown op 'format-disk'");
  auto noop = call(json{{"verb", "status"}});
  ASSERT_FALSE(noop.ok());
  EXPECT_EQ(noop.error().message, "request.op: missing");
  auto extra = call(json{{"op", "status"}, {"force", true}});
  ASSERT_FALSE(extra.ok());
  EXPECT_EQ(extra.error().message, "request.force: unknown field");
  auto badvm = call(json{{"op", "vm.add"}, {"vm", {{"name", "v"}, {"max_vram", 1.5}}}});
  ASSERT_FALSE(badvm.ok());
  EXPECT_EQ(badvm.error().message, "max_vram: expected a size, got number with a fraction");

  // Raw bytes: a line that is not JSON, then one over the 64 KiB limit.
  auto raw = [&](const std::string& bytes) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock.c_str());
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    (void)::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    std::string reply;
    char buf[4096];
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t n;
    while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) {
      reply.append(buf, static_cast<size_t>(n));
      if (reply.find('\n') != std::string::npos && bytes.size() < 1000) break;
    }
    ::close(fd);
    return reply;
  };
  EXPECT_EQ(raw("hello\n"), "{\"error\":\"bad request: invalid JSON at byte 1\",\"ok\":false}\n");
  EXPECT_EQ(raw("[1]\n"), "{\"error\":\"bad request: expected a JSON object, got array\",\"ok\":false}\n");
  std::string huge = "{\"op\":\"" + std::string(gpup::control::kMaxRequestLine + 10, 'x');
  EXPECT_EQ(raw(huge), "{\"error\":\"bad request: line longer than the 65536-byte limit\",\"ok\":false}\n")
      << "answered, then dropped";
  EXPECT_EQ(gpup({"host", "status"}).code, 0) << "gpupd carries on";
}

TEST_F(GpupHost, BadConfigAndCorruptStateKeepGpupdFromStarting) {
  std::ofstream(config_) << "[[adapter]]\nname = \"a\"\nkmd = 3\n";
  Out bad = gpup({"host", "start", "--config", config_, "--vmwp", FAKE_VMWP});
  EXPECT_EQ(bad.code, 1);
  EXPECT_NE(bad.err.find(config_ + ": adapter[0].kmd: expected a string, got integer (line 3)"), std::string::npos)
      << bad.err;

  fs::create_directories(dir_ + "/state");
  std::ofstream(state_file()) << "{\"version\":1,\"partitions\":[{";
  std::ofstream(config_) << "";
  Out corrupt = gpup({"host", "start", "--config", config_, "--vmwp", FAKE_VMWP});
  EXPECT_EQ(corrupt.code, 1);
  EXPECT_NE(corrupt.err.find("state file " + state_file() + " is corrupt"), std::string::npos) << corrupt.err;
  EXPECT_NE(corrupt.err.rfind("gpup: gpupd exited with status 1 during start-up"), std::string::npos) << corrupt.err;
  std::ifstream kept(state_file());
  std::string text((std::istreambuf_iterator<char>(kept)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "{\"version\":1,\"partitions\":[{") << "the state file is never reset";
}

TEST_F(GpupHost, AdaptersReportStateAndPartitionability) {
  require_mocks();
  start();
  json mock = adapter("mock0");
  EXPECT_EQ(mock["state"], "ready");
  EXPECT_EQ(mock["partitionable"], true);
  EXPECT_EQ(mock["total_vram"], GiB);
  EXPECT_EQ(mock["available_vram"], GiB);
  EXPECT_NE(mock["luid"].get<uint64_t>(), 0u);
  EXPECT_EQ(fs::path(mock["kmd_path"].get<std::string>()).filename(), "libgpup_kmd_mock.so");

  json nopv = adapter("nopv0");
  EXPECT_EQ(nopv["state"], "ready");
  EXPECT_EQ(nopv["partitionable"], false);
  EXPECT_EQ(nopv["reason"], "adapter nopv0: KMD " + nopv["driver"].get<std::string>() +
                                " does not declare ParavirtualizationSupported; it cannot be partitioned");

  json broken = adapter("broken0");
  EXPECT_EQ(broken["state"], "failed");
  EXPECT_NE(broken["error"].get<std::string>().find("lacks mandatory DDI Context.pfnCreateContext"),
            std::string::npos)
      << broken;

  Out table = gpup({"adapters"});
  EXPECT_EQ(table.code, 0);
  EXPECT_EQ(table.out.rfind("NAME ", 0), 0u) << table.out;
  EXPECT_NE(table.out.find("mock0"), std::string::npos);
  EXPECT_NE(table.out.find("note: adapter nopv0: KMD"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("note: adapter broken0 failed:"), std::string::npos) << table.out;
  EXPECT_EQ(gpup_json({"host", "status"})["adapters"], 4) << "a failed adapter does not stop gpupd";
}

TEST_F(GpupHost, VmAddListShow) {
  require_mocks();
  start();
  Out add = gpup({"vm", "add", "v1", "--adapter", "mock0", "--min-vram", "256MiB", "--max-vram", "512 MiB",
                  "--compute-weight", "200", "--max-compute", "50"});
  ASSERT_EQ(add.code, 0) << add.err;
  EXPECT_NE(add.out.find("vm v1 added on adapter mock0: min 256 MiB, max 512 MiB, optimal 512 MiB"),
            std::string::npos)
      << add.out;

  json v = vm("v1");
  EXPECT_EQ(v["state"], "running");
  EXPECT_EQ(v["restarts"], 0);
  EXPECT_EQ(v["min_vram"], 256 * MiB);
  EXPECT_EQ(v["compute_weight"], 200);
  EXPECT_EQ(v["max_compute"], 50);
  EXPECT_EQ(v["secure"], false);
  EXPECT_EQ(v["guid"].get<std::string>().size(), 36u);
  EXPECT_EQ(v["endpoint"], run_dir() + "/vms/v1/vrd.sock");
  EXPECT_EQ(v["adapter_luid"], adapter("mock0")["luid"]);
  struct stat st {};
  ASSERT_EQ(::stat(v["endpoint"].get<std::string>().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));

  json shown = gpup_json({"vm", "show", "v1"});
  ASSERT_TRUE(shown.contains("stats")) << shown;
  EXPECT_EQ(shown["stats"]["vram_max"], 512 * MiB);
  EXPECT_EQ(shown["stats"]["processes"][0]["name"], "fake-guest");

  Out human = gpup({"vm", "show", "v1"});
  EXPECT_EQ(human.code, 0);
  EXPECT_NE(human.out.find("vram used     4 KiB of 512 MiB"), std::string::npos) << human.out;
  EXPECT_NE(human.out.find("fake-guest"), std::string::npos) << human.out;
  EXPECT_NE(human.out.find("totals        0 allocations, 0 contexts, 1 devices, 1 processes, 0 sync_objects"),
            std::string::npos)
      << human.out;
  Out list = gpup({"vm", "list"});
  EXPECT_EQ(list.code, 0);
  EXPECT_NE(list.out.find("v1    mock0    running"), std::string::npos) << list.out;

  json a = adapter("mock0");
  EXPECT_EQ(a["reserved_vram"], 256 * MiB);
  EXPECT_EQ(a["available_vram"], GiB - 256 * MiB);
  EXPECT_EQ(a["partitions"], 1);

  Out missing = gpup({"vm", "show", "nope"});
  EXPECT_EQ(missing.code, 1);
  EXPECT_EQ(missing.err, "gpup: no vm named 'nope'\n");
}

TEST_F(GpupHost, VmAddRefusals) {
  require_mocks();
  start();
  std::string driver = adapter("nopv0")["driver"];
  Out nopv = gpup({"vm", "add", "v1", "--adapter", "nopv0"});
  EXPECT_EQ(nopv.code, 1);
  EXPECT_EQ(nopv.err, "gpup: adapter nopv0: KMD " + driver +
                          " does not declare ParavirtualizationSupported; it cannot be partitioned\n");

  ASSERT_EQ(gpup({"vm", "add", "big", "--adapter", "mock0", "--min-vram", "768MiB"}).code, 0);
  Out full = gpup({"vm", "add", "v2", "--adapter", "mock0", "--min-vram", "512MiB"});
  EXPECT_EQ(full.code, 1);
  EXPECT_EQ(full.err,
            "gpup: min 512 MiB does not fit: adapter mock0 has 1 GiB, 768 MiB already reserved by other partitions\n");
  Out dup = gpup({"vm", "add", "big", "--adapter", "mock0"});
  EXPECT_EQ(dup.err, "gpup: vm big already exists\n");
  Out order = gpup({"vm", "add", "v3", "--adapter", "mock0", "--min-vram", "128MiB", "--max-vram", "64MiB"});
  EXPECT_EQ(order.err, "gpup: max 64 MiB is less than min 128 MiB\n");
  Out unknown = gpup({"vm", "add", "v3", "--adapter", "gpu7"});
  EXPECT_EQ(unknown.err, "gpup: unknown adapter 'gpu7' (configured: mock0, nopv0, broken0, nosecure0)\n");
  Out broken = gpup({"vm", "add", "v3", "--adapter", "broken0"});
  EXPECT_EQ(broken.code, 1);
  EXPECT_EQ(broken.err.rfind("gpup: adapter broken0 failed: ", 0), 0u) << broken.err;
  Out secure = gpup({"vm", "add", "v3", "--adapter", "nosecure0", "--secure"});
  EXPECT_EQ(secure.err, "gpup: adapter nosecure0: KMD " + adapter("nosecure0")["driver"].get<std::string>() +
                            " does not declare IoMmuSecureModeSupported; a secure partition cannot run on it\n");
  Out size = gpup({"vm", "add", "v3", "--max-vram", "12 parsecs"});
  EXPECT_EQ(size.err, "gpup: --max-vram: '12 parsecs' is not a size (use bytes or a unit: 256MiB, 1.5GiB)\n");
  Out name = gpup({"vm", "add", "../evil"});
  EXPECT_EQ(name.code, 1);
  EXPECT_NE(name.err.find("vm name '../evil' is invalid"), std::string::npos) << name.err;
  Out weight = gpup({"vm", "add", "v3", "--adapter", "mock0", "--compute-weight", "0"});
  EXPECT_EQ(weight.err, "gpup: vm.compute_weight: 0 is outside 1..10000\n");

  json list = gpup_json({"vm", "list"});
  ASSERT_EQ(list.size(), 1u) << "only the admitted partition exists";
  EXPECT_EQ(adapter("nosecure0")["partitions"], 0);
}

TEST_F(GpupHost, PartitionsSurviveARestart) {
  require_mocks();
  start();
  ASSERT_EQ(gpup({"vm", "add", "v1", "--adapter", "mock0", "--max-vram", "256MiB"}).code, 0);
  ASSERT_EQ(gpup({"vm", "add", "v2", "--adapter", "nosecure0", "--min-vram", "1MiB"}).code, 0);
  json before = gpup_json({"vm", "list"});
  uint64_t luid = adapter("mock0")["luid"];
  ASSERT_EQ(gpup({"host", "stop"}).code, 0);
  EXPECT_TRUE(fs::exists(state_file()));

  start();
  json after = gpup_json({"vm", "list"});
  ASSERT_EQ(after.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(after[i]["name"], before[i]["name"]);
    EXPECT_EQ(after[i]["guid"], before[i]["guid"]);
    EXPECT_EQ(after[i]["max_vram"], before[i]["max_vram"]);
    EXPECT_EQ(after[i]["min_vram"], before[i]["min_vram"]);
  }
  EXPECT_TRUE(wait_vm("v1", [](const json& v) { return v["state"] == "running"; }));
  EXPECT_TRUE(wait_vm("v2", [](const json& v) { return v["state"] == "running"; }));
  EXPECT_EQ(adapter("mock0")["luid"], luid) << "LUIDs are stable across restarts";
}

TEST_F(GpupHost, KilledWorkerIsRestarted) {
  require_mocks();
  start();
  ASSERT_EQ(gpup({"vm", "add", "v1", "--adapter", "mock0"}).code, 0);
  json v = vm("v1");
  ASSERT_EQ(v["state"], "running");
  pid_t first = v["pid"];
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  ASSERT_TRUE(wait_vm("v1", [&](const json& v) {
    return v["state"] == "running" && v.contains("pid") && v["pid"].get<pid_t>() != first;
  }));
  v = vm("v1");
  EXPECT_EQ(v["restarts"], 1);
  EXPECT_NE(v["last_exit"].get<std::string>().find("killed by signal 9"), std::string::npos) << v;
  json shown = gpup_json({"vm", "show", "v1"});
  EXPECT_TRUE(shown.contains("stats")) << shown;
}

// A partition removed after repeated resets stays removed across gpupd restarts, its history kept,
// until `gpup vm reset`; then it runs, and stays running across the next restart. fake_vmwp's tdr*
// reports a TDR and exits 75 right after each ready, fault* dies of SIGILL, while their compute
// weight is 1.
TEST_F(GpupHost, QuarantineSurvivesARestart) {
  require_mocks();
  const std::string config = std::string("tdr_limit_count = 2\ntdr_limit_window_s = 3600\n") + kMockConfig;
  start(config);
  ASSERT_EQ(gpup({"vm", "add", "tdr1", "--adapter", "mock0", "--compute-weight", "1"}).code, 0);
  ASSERT_EQ(gpup({"vm", "add", "fault1", "--adapter", "mock0", "--compute-weight", "1"}).code, 0);
  ASSERT_TRUE(wait_vm("tdr1", [](const json& v) { return v["state"] == "removed"; }));
  ASSERT_TRUE(wait_vm("fault1", [](const json& v) { return v["state"] == "removed"; }));
  json t = vm("tdr1");
  EXPECT_FALSE(t.contains("pid"));
  EXPECT_EQ(t["resets"]["recent"], 2);
  EXPECT_EQ(t["resets"]["total"], 2);
  const std::string last = t["resets"]["last"];
  EXPECT_EQ(last.rfind("TDR: work of fake-guest (pid ", 0), 0u) << t;
  const std::string why = "removed after 2 resets within 3600 s (last: " + last + ")";
  EXPECT_EQ(t["last_error"], why + "; `gpup vm reset tdr1` brings it back");
  json f = vm("fault1");
  EXPECT_EQ(f["resets"]["last"], "the worker killed by signal 4 (ILL) while running guest work") << f;
  EXPECT_EQ(spawns("tdr1"), 2u);
  EXPECT_EQ(spawns("fault1"), 2u);

  // On disk as soon as it happened, with the times of both resets.
  json p = persisted("tdr1");
  ASSERT_TRUE(p["resets"].is_object()) << state();
  EXPECT_EQ(p["resets"]["total"], 2);
  EXPECT_EQ(p["resets"]["last"], last);
  EXPECT_EQ(p["resets"]["removed"], why);
  ASSERT_EQ(p["resets"]["times"].size(), 2u);
  const auto now_s = std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::system_clock::now().time_since_epoch()).count();
  for (const auto& at : p["resets"]["times"]) EXPECT_LE(std::abs(at.get<int64_t>() - now_s), 120) << p;
  EXPECT_TRUE(persisted("fault1")["resets"].contains("removed")) << state();

  // A new gpupd: both still removed, their workers never started.
  ASSERT_EQ(gpup({"host", "stop"}).code, 0);
  start(config);
  std::this_thread::sleep_for(500ms);  // well past the restart backoff, had anything been started
  t = vm("tdr1");
  EXPECT_EQ(t["state"], "removed") << t;
  EXPECT_FALSE(t.contains("pid")) << t;
  EXPECT_EQ(t["restarts"], 0);
  EXPECT_EQ(t["last_error"], why + ", before gpupd restarted; `gpup vm reset tdr1` brings it back");
  EXPECT_EQ(t["resets"]["recent"], 2) << "resets within the window still count";
  EXPECT_EQ(t["resets"]["total"], 2);
  EXPECT_EQ(t["resets"]["last"], last);
  EXPECT_EQ(vm("fault1")["state"], "removed");
  EXPECT_EQ(spawns("tdr1"), 2u) << "no worker started for a removed partition";
  EXPECT_EQ(spawns("fault1"), 2u);
  EXPECT_EQ(gpup_json({"host", "status"})["vms_running"], 0);
  Out shown = gpup({"vm", "show", "tdr1"});
  EXPECT_EQ(shown.code, 0);
  EXPECT_NE(shown.out.find("2 in the last 3600 s (removed at 2), 2 in all; last: " + last), std::string::npos)
      << shown.out;
  EXPECT_NE(shown.out.find("before gpupd restarted"), std::string::npos) << shown.out;
  Out refused = gpup({"vm", "start", "tdr1"});
  EXPECT_EQ(refused.code, 1);
  EXPECT_NE(refused.err.find("vm tdr1 is removed: " + why), std::string::npos) << refused.err;
  EXPECT_EQ(spawns("tdr1"), 2u);

  // The operator lets it run (weight 100: fake_vmwp serves) and resets it.
  ASSERT_EQ(gpup({"vm", "set", "tdr1", "--compute-weight", "100"}).code, 0);
  Out reset = gpup({"vm", "reset", "tdr1"});
  ASSERT_EQ(reset.code, 0) << reset.err;
  t = vm("tdr1");
  EXPECT_EQ(t["state"], "running") << t;
  ASSERT_TRUE(t.contains("pid")) << t;
  const pid_t worker = t["pid"];
  EXPECT_TRUE(alive(worker));
  EXPECT_EQ(spawns("tdr1"), 3u);
  EXPECT_FALSE(t.contains("last_error")) << t;
  EXPECT_EQ(t["resets"]["recent"], 0);
  EXPECT_EQ(t["resets"]["total"], 2) << "the total stays";
  p = persisted("tdr1");
  EXPECT_FALSE(p["resets"].contains("removed")) << p;
  EXPECT_TRUE(p["resets"]["times"].empty()) << p;
  EXPECT_EQ(p["resets"]["total"], 2);
  EXPECT_EQ(p["compute_weight"], 100);

  // And after another restart it runs: not removed, nothing recent; fault1 was not reset.
  ASSERT_EQ(gpup({"host", "stop"}).code, 0);
  EXPECT_FALSE(alive(worker));
  start(config);
  ASSERT_TRUE(wait_vm("tdr1", [&](const json& v) {
    return v["state"] == "running" && v.contains("pid") && v["pid"].get<pid_t>() != worker;
  })) << vm("tdr1");
  t = vm("tdr1");
  EXPECT_EQ(t["resets"]["recent"], 0);
  EXPECT_EQ(t["resets"]["total"], 2);
  EXPECT_EQ(t["resets"]["last"], last);
  EXPECT_EQ(spawns("tdr1"), 4u);
  EXPECT_EQ(vm("fault1")["state"], "removed");
  EXPECT_EQ(spawns("fault1"), 2u);
}

TEST_F(GpupHost, VmSetReachesTheWorker) {
  require_mocks();
  start();
  ASSERT_EQ(gpup({"vm", "add", "v1", "--adapter", "mock0", "--max-vram", "512MiB"}).code, 0);
  Out set = gpup({"vm", "set", "v1", "--max-vram", "256MiB", "--compute-weight", "50"});
  ASSERT_EQ(set.code, 0) << set.err;
  json shown = gpup_json({"vm", "show", "v1"});
  EXPECT_EQ(shown["max_vram"], 256 * MiB);
  EXPECT_EQ(shown["optimal_vram"], 256 * MiB);
  EXPECT_EQ(shown["compute_weight"], 50);
  EXPECT_EQ(shown["stats"]["vram_max"], 256 * MiB) << "the worker applied the update";
  EXPECT_EQ(shown["stats"]["totals"]["allocations"], 1) << "fake_vmwp counts updates there";
  EXPECT_EQ(shown["build_timeout_s"], 300) << "the default build timeout";
  Out timeout = gpup({"vm", "set", "v1", "--build-timeout", "60"});
  ASSERT_EQ(timeout.code, 0) << timeout.err;
  EXPECT_EQ(gpup_json({"vm", "show", "v1"})["build_timeout_s"], 60);
  EXPECT_NE(gpup({"vm", "show", "v1"}).out.find("build limit   60 s"), std::string::npos);
  EXPECT_EQ(gpup({"vm", "set", "v1", "--build-timeout", "0"}).err, "gpup: vm.build_timeout_s: 0 is outside 1..3600\n");

  // A worker that refuses its partition's new settings does not keep the old ones: it is
  // restarted with the new.
  ASSERT_EQ(gpup({"vm", "add", "refuse1", "--adapter", "mock0", "--max-vram", "128MiB"}).code, 0);
  const json before = vm("refuse1");
  ASSERT_TRUE(before.contains("pid")) << before;
  Out refused = gpup({"vm", "set", "refuse1", "--max-vram", "64MiB"});
  EXPECT_EQ(refused.code, 0) << refused.err;
  EXPECT_NE(refused.err.find("gpup: note: vm refuse1: the worker did not apply the new settings (fake KMD refuses the "
                             "settings); it was restarted with them"),
            std::string::npos)
      << refused.err;
  json after = gpup_json({"vm", "show", "refuse1"});
  EXPECT_EQ(after["max_vram"], 64 * MiB);
  EXPECT_EQ(after["state"], "running") << after;
  EXPECT_NE(after["pid"], before["pid"]) << "the worker was not restarted";
  EXPECT_EQ(after["stats"]["vram_max"], 64 * MiB) << "the new worker runs with the new settings";
  EXPECT_EQ(spawns("refuse1"), 2u);
  Out too_big = gpup({"vm", "set", "v1", "--min-vram", "2GiB", "--max-vram", "2GiB"});
  EXPECT_EQ(too_big.err, "gpup: max 2 GiB exceeds adapter mock0's 1 GiB\n");
}

TEST_F(GpupHost, WorkerFailuresAreReported) {
  require_mocks();
  start();
  Out add = gpup({"vm", "add", "fail1", "--adapter", "mock0"});
  EXPECT_EQ(add.code, 0) << "the partition exists even though its worker failed";
  EXPECT_NE(add.err.find("gpup: warning: vm fail1 is failed: fake worker refuses vm fail1"), std::string::npos)
      << add.err;
  json v = vm("fail1");
  EXPECT_EQ(v["state"], "failed");
  EXPECT_EQ(v["restarts"], 0);
  json shown = gpup_json({"vm", "show", "fail1"});
  EXPECT_EQ(shown["stats_error"], "worker is failed");
  Out again = gpup({"vm", "start", "fail1"});
  EXPECT_EQ(again.code, 0);
  EXPECT_EQ(vm("fail1")["state"], "failed");

  ASSERT_EQ(gpup({"vm", "add", "junk1", "--adapter", "mock0"}).code, 0);
  pid_t first = vm("junk1")["pid"];
  json junk = gpup_json({"vm", "show", "junk1"});
  // The first statistics request meets the junk line: the reason is the stats error of that
  // request or, when `vm list` above already asked (it collects memory use), the worker's last error.
  const std::string reason = junk.value("stats_error", std::string()) + " | " + junk.value("last_error", std::string());
  EXPECT_NE(reason.find("line longer than"), std::string::npos) << junk;
  EXPECT_TRUE(wait_vm("junk1", [&](const json& v) {
    return v["state"] == "running" && v.contains("pid") && v["pid"].get<pid_t>() != first;
  })) << "a worker breaking the protocol is killed and restarted";
  EXPECT_TRUE(alive(gpup_json({"host", "status"})["pid"].get<pid_t>()));
}

TEST_F(GpupHost, RunGivesTheGuestItsEndpoint) {
  require_mocks();
  start();
  ASSERT_EQ(gpup({"vm", "add", "v1", "--adapter", "mock0"}).code, 0);
  std::string endpoint = vm("v1")["endpoint"];
  Out ok = gpup({"run", "--vm", "v1", "--", "/bin/sh", "-c",
                 "test \"$GPUP_VRD\" = \"unix:" + endpoint + "\" && test \"$GPUP_VM\" = v1 && echo fine && exit 7"});
  EXPECT_EQ(ok.code, 7) << ok.err;
  EXPECT_EQ(ok.out, "fine\n");
  Out sig = gpup({"run", "--vm", "v1", "--", "/bin/sh", "-c", "kill -TERM $$"});
  EXPECT_EQ(sig.code, 128 + SIGTERM);
  Out missing = gpup({"run", "--vm", "v1", "--", "/nonexistent/program"});
  EXPECT_EQ(missing.code, 127);
  EXPECT_EQ(missing.err, "gpup: cannot execute /nonexistent/program: No such file or directory\n");
  Out unknown = gpup({"run", "--vm", "nope", "--", "/bin/true"});
  EXPECT_EQ(unknown.code, 1);
  EXPECT_EQ(unknown.err, "gpup: no vm named 'nope'\n");
  ASSERT_EQ(gpup({"vm", "add", "fail1", "--adapter", "mock0"}).code, 0);
  Out failed = gpup({"run", "--vm", "fail1", "--", "/bin/true"});
  EXPECT_EQ(failed.code, 1);
  EXPECT_EQ(failed.err, "gpup: vm fail1 is not running (state failed: fake worker refuses vm fail1)\n");
}

// `gpup run` from an operator's terminal (a pty the test holds): the guest tries to type into it
// (TIOCSTI on its stdin, stdout, stderr and /dev/tty) and must not get a byte into its input queue;
// its output still reaches the terminal, through the pty gpup gives it. The same guest run with
// --no-sandbox does get its bytes in, which shows the check can fail.
struct TerminalRun {
  int code = -1;
  std::string screen;    // what the operator's terminal showed
  std::string injected;  // what was left in the terminal's input queue afterwards
};

TerminalRun run_on_terminal(const std::vector<std::string>& argv, const std::map<std::string, std::string>& env) {
  TerminalRun r;
  const int master = ::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (master < 0 || ::grantpt(master) != 0 || ::unlockpt(master) != 0) return r;
  const std::string slave_name = ::ptsname(master);
  // The test's own handle on the terminal, raw so that any byte typed into it can be read.
  const int op = ::open(slave_name.c_str(), O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
  termios raw{};
  ::tcgetattr(op, &raw);
  ::cfmakeraw(&raw);
  ::tcsetattr(op, TCSANOW, &raw);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setsid();
    const int tty = ::open(slave_name.c_str(), O_RDWR);  // becomes the controlling terminal
    if (tty < 0) ::_exit(126);
    for (int fd = 0; fd < 3; ++fd) ::dup2(tty, fd);
    exec_with(argv, env);
  }
  char buf[4096];
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  for (;;) {
    pollfd p{master, POLLIN, 0};
    if (::poll(&p, 1, 50) > 0) {
      const ssize_t n = ::read(master, buf, sizeof buf);
      if (n > 0) r.screen.append(buf, static_cast<size_t>(n));
    }
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
  }
  for (pollfd p{master, POLLIN, 0}; ::poll(&p, 1, 100) > 0;) {
    const ssize_t n = ::read(master, buf, sizeof buf);
    if (n <= 0) break;
    r.screen.append(buf, static_cast<size_t>(n));
  }
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  for (ssize_t n; (n = ::read(op, buf, sizeof buf)) > 0;) r.injected.append(buf, static_cast<size_t>(n));
  ::close(op);
  ::close(master);
  return r;
}

TEST_F(GpupHost, RunGuestCannotTypeIntoTheOperatorsTerminal) {
  require_mocks();
  start();
  ASSERT_EQ(gpup({"vm", "add", "v1", "--adapter", "mock0"}).code, 0);
  // TIOCSTI is 0x5412; each attempt types one letter (perl's ioctl may write into its buffer, so
  // the letter printed is a copy).
  const std::string typist =
      "my $i = 0; for my $fh (\\*STDIN, \\*STDOUT, \\*STDERR) { my $l = chr(65 + $i++); my $c = $l; "
      "print ioctl($fh, 0x5412, $c) ? \"typed $l\\n\" : \"refused $l: $!\\n\"; } "
      "if (open(my $t, '+<', '/dev/tty')) { my $c = 'T'; print ioctl($t, 0x5412, $c) ? \"typed T\\n\" : "
      "\"refused T: $!\\n\"; } else { print \"no tty: $!\\n\"; } "
      "print -t STDIN ? \"stdin is a terminal\\n\" : \"stdin is not a terminal\\n\"; exit 3;";
  TerminalRun boxed = run_on_terminal({GPUP_CLI, "run", "--vm", "v1", "--", "/usr/bin/perl", "-e", typist}, env_);
  EXPECT_EQ(boxed.code, 3) << boxed.screen;
  EXPECT_EQ(boxed.injected, "") << "a sandboxed guest typed into the operator's terminal:\n" << boxed.screen;
  EXPECT_NE(boxed.screen.find("refused A: Operation not permitted"), std::string::npos) << boxed.screen;
  EXPECT_NE(boxed.screen.find("stdin is a terminal"), std::string::npos)
      << "the guest's pty did not carry its output or its terminal:\n" << boxed.screen;

  TerminalRun open = run_on_terminal({GPUP_CLI, "run", "--no-sandbox", "--vm", "v1", "--", "/usr/bin/perl", "-e", typist}, env_);
  EXPECT_EQ(open.code, 3) << open.screen;
  if (open.injected.empty() && open.screen.find("typed") == std::string::npos)
    GTEST_SKIP() << "this host refuses TIOCSTI to everyone (dev.tty.legacy_tiocsti = 0): the control run could not type";
  EXPECT_NE(open.injected.find('A'), std::string::npos) << "the control run's typing did not arrive:\n" << open.screen;
}

TEST_F(GpupHost, VmRemoveStopsTheWorkerAndFreesTheReservation) {
  require_mocks();
  start();
  ASSERT_EQ(gpup({"vm", "add", "v1", "--adapter", "mock0", "--min-vram", "512MiB"}).code, 0);
  pid_t worker = vm("v1")["pid"];
  Out rm = gpup({"vm", "remove", "v1"});
  ASSERT_EQ(rm.code, 0) << rm.err;
  EXPECT_EQ(rm.out, "vm v1 removed\n");
  EXPECT_FALSE(alive(worker));
  EXPECT_TRUE(gpup_json({"vm", "list"}).empty());
  EXPECT_FALSE(fs::exists(run_dir() + "/vms/v1"));
  EXPECT_EQ(adapter("mock0")["reserved_vram"], 0);
  std::ifstream state(state_file());
  json persisted = json::parse(state);
  EXPECT_TRUE(persisted["partitions"].empty());
}

TEST_F(GpupHost, SigtermStopsGpupdAndItsWorkers) {
  require_mocks();
  start();
  ASSERT_EQ(gpup({"vm", "add", "v1", "--adapter", "mock0"}).code, 0);
  pid_t worker = vm("v1")["pid"];
  pid_t daemon = gpup_json({"host", "status"})["pid"];
  ASSERT_EQ(::kill(daemon, SIGTERM), 0);
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (alive(daemon) && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(alive(daemon));
  EXPECT_FALSE(alive(worker));
  EXPECT_FALSE(fs::exists(run_dir() + "/gpupd.sock"));
  EXPECT_FALSE(fs::exists(run_dir() + "/gpupd.pid"));
}

}  // namespace
