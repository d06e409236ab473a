// Unit tests of gpupd's pieces: configuration, persistent state, admission, the worker
// supervisor driven against fake_vmwp, and who may use the operator socket.
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include "common/units.h"
#include "host/control/client.h"
#include "host/gpupd/admission.h"
#include "host/gpupd/config.h"
#include "host/gpupd/daemon.h"
#include "host/gpupd/event_loop.h"
#include "host/gpupd/state.h"
#include "host/gpupd/worker.h"

namespace gpup::gpupd {
namespace {

using control::json;
using control::VmSpec;
using namespace std::chrono_literals;

constexpr uint64_t GiB = 1ull << 30, MiB = 1ull << 20;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/gpupd-ut-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d))
      if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") out.push_back(e->d_name);
    ::closedir(d);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Config

TEST(GpupdConfig, ParsesAdaptersAndKmdConfig) {
  auto c = parse_config(R"(
[[adapter]]
name = "pocl0"
kmd = "opencl"
[adapter.config]
platform = "Portable Computing Language"
device = 0
fast = true

[[adapter]]
name = "mock1"
kmd = "/opt/gpup/libgpup_kmd_mock.so"
)",
                        "/etc/gpup/gpupd.toml");
  ASSERT_TRUE(c.ok()) << c.error().message;
  ASSERT_EQ(c->adapters.size(), 2u);
  EXPECT_EQ(c->adapters[0].name, "pocl0");
  EXPECT_EQ(c->adapters[0].kmd, "opencl");
  EXPECT_EQ(c->adapters[0].config_text(), "platform=Portable Computing Language\ndevice=0\nfast=true\n");
  EXPECT_EQ(c->adapters[1].kmd, "/opt/gpup/libgpup_kmd_mock.so");
  EXPECT_EQ(c->adapters[1].config_text(), "");
}

TEST(GpupdConfig, DefaultIsOnePoclAdapter) {
  Config c = default_config();
  ASSERT_EQ(c.adapters.size(), 1u);
  EXPECT_EQ(c.adapters[0].name, "pocl0");
  EXPECT_EQ(c.adapters[0].kmd, "opencl");
  EXPECT_TRUE(c.adapters[0].config.empty());
  auto empty = parse_config("", "empty.toml");
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->adapters.empty());
}

TEST(GpupdConfig, UnknownKeyIsNamedWithFileAndLine) {
  auto c = parse_config("[[adapter]]\nname = \"a\"\nkmd = \"mock\"\nkmdd = \"x\"\n", "/etc/gpup/gpupd.toml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().message,
            "/etc/gpup/gpupd.toml: adapter[0].kmdd: unknown key (expected name, kmd, config) (line 4)");
  auto top = parse_config("adapters = []\n", "g.toml");
  ASSERT_FALSE(top.ok());
  EXPECT_EQ(top.error().message,
            "g.toml: adapters: unknown key (expected [[adapter]] tables, worker_memory_overhead, tdr_delay_ms, "
            "tdr_limit_count, tdr_limit_window_s, scheduler_quantum_ms, admin_group, worker_id_base or "
            "worker_id_count) (line 1)");
}

TEST(GpupdConfig, SchedulerAndTdrSettings) {
  auto d = parse_config("", "g.toml");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->tdr_delay_ms, 2000u);
  EXPECT_EQ(d->tdr_limit_count, 5u);
  EXPECT_EQ(d->tdr_limit_window_s, 60u);
  EXPECT_EQ(d->scheduler_quantum_ms, 10u);
  auto c = parse_config("tdr_delay_ms = 500\ntdr_limit_count = 2\ntdr_limit_window_s = 30\nscheduler_quantum_ms = 4\n",
                        "g.toml");
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_EQ(c->tdr_delay_ms, 500u);
  EXPECT_EQ(c->tdr_limit_count, 2u);
  EXPECT_EQ(c->tdr_limit_window_s, 30u);
  EXPECT_EQ(c->scheduler_quantum_ms, 4u);
  auto low = parse_config("tdr_delay_ms = 10\n", "g.toml");
  ASSERT_FALSE(low.ok());
  EXPECT_EQ(low.error().message, "g.toml: tdr_delay_ms: 10 is outside 100 .. 600000 (line 1)");
  auto type = parse_config("tdr_limit_count = \"5\"\n", "g.toml");
  ASSERT_FALSE(type.ok());
  EXPECT_EQ(type.error().message, "g.toml: tdr_limit_count: expected an integer, got string (line 1)");
}

TEST(GpupdConfig, WorkerIdRange) {
  auto d = parse_config("", "g.toml");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->worker_id_base, 1900000000u);
  EXPECT_EQ(d->worker_id_count, 65536u);
  auto c = parse_config("worker_id_base = 100000\nworker_id_count = 1000\n", "g.toml");
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_EQ(c->worker_id_base, 100000u);
  EXPECT_EQ(c->worker_id_count, 1000u);
  // The extremes that are still accepted: the lowest base, the largest count, a range ending at the limit.
  auto low = parse_config("worker_id_base = 65537\nworker_id_count = 16777216\n", "g.toml");
  ASSERT_TRUE(low.ok()) << low.error().message;
  EXPECT_EQ(low->worker_id_base, 65537u);
  EXPECT_EQ(low->worker_id_count, 16777216u);
  auto top = parse_config("worker_id_base = 4294901758\nworker_id_count = 65536\n", "g.toml");
  ASSERT_TRUE(top.ok()) << top.error().message;
  EXPECT_EQ(uint64_t{top->worker_id_base} + top->worker_id_count, 4294967294u);

  const std::pair<const char*, const char*> bad[] = {
      {"worker_id_base = 65536\n", "g.toml: worker_id_base: 65536 is outside 65537 .. 4294967293 (line 1)"},
      {"worker_id_base = 1000\n", "g.toml: worker_id_base: 1000 is outside 65537 .. 4294967293 (line 1)"},
      {"worker_id_base = -1\n", "g.toml: worker_id_base: -1 is outside 65537 .. 4294967293 (line 1)"},
      {"worker_id_base = 4294967294\n", "g.toml: worker_id_base: 4294967294 is outside 65537 .. 4294967293 (line 1)"},
      {"worker_id_base = \"1900000000\"\n", "g.toml: worker_id_base: expected an integer, got string (line 1)"},
      {"worker_id_count = 0\n", "g.toml: worker_id_count: 0 is outside 1 .. 16777216 (line 1)"},
      {"worker_id_count = 16777217\n", "g.toml: worker_id_count: 16777217 is outside 1 .. 16777216 (line 1)"},
      {"worker_id_count = 1.5\n", "g.toml: worker_id_count: expected an integer, got float (line 1)"},
      {"worker_id_count = 65536\nworker_id_base = 4294901759\n",
       "g.toml: worker_id_base: 4294901759 + worker_id_count 65536 ends at 4294967295, past 4294967294 ((uid_t)-2) "
       "(line 2)"},
      {"worker_id_base = 4294967293\n",
       "g.toml: worker_id_base: 4294967293 + worker_id_count 65536 ends at 4295032829, past 4294967294 ((uid_t)-2) "
       "(line 1)"},
  };
  for (const auto& [text, error] : bad) {
    auto r = parse_config(text, "g.toml");
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.error().message, error);
  }
}

TEST(GpupdConfig, AdminGroupIsResolvedWhenLoaded) {
  std::vector<std::string> asked;
  GroupLookup lookup = [&](const std::string& name) -> Result<std::optional<gid_t>> {
    asked.push_back(name);
    if (name == "gpup") return std::optional<gid_t>(4242);
    if (name == "broken") return make_error(GPUP_STATUS_INTERNAL, "cannot look up group 'broken': Input/output error");
    return std::optional<gid_t>();
  };
  auto none = parse_config("", "g.toml", lookup);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->admin_group, "");
  EXPECT_FALSE(none->admin_gid.has_value());
  EXPECT_TRUE(asked.empty()) << "nothing is looked up without an admin_group";

  auto c = parse_config("admin_group = \"gpup\"\n", "g.toml", lookup);
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_EQ(c->admin_group, "gpup");
  ASSERT_TRUE(c->admin_gid.has_value());
  EXPECT_EQ(*c->admin_gid, 4242u);
  EXPECT_EQ(asked, std::vector<std::string>{"gpup"});

  const std::pair<const char*, const char*> bad[] = {
      {"admin_group = \"gpupp\"\n", "g.toml: admin_group: no group named 'gpupp' (line 1)"},
      {"admin_group = \"broken\"\n", "g.toml: admin_group: cannot look up group 'broken': Input/output error (line 1)"},
      {"admin_group = 4242\n", "g.toml: admin_group: expected a string, got integer (line 1)"},
      {"admin_group = \"\"\n",
       "g.toml: admin_group: must be a group name (1-256 characters, no spaces, control characters or ':') (line 1)"},
      {"admin_group = \"gp up\"\n",
       "g.toml: admin_group: must be a group name (1-256 characters, no spaces, control characters or ':') (line 1)"},
      {"admin_group = \"a:b\"\n",
       "g.toml: admin_group: must be a group name (1-256 characters, no spaces, control characters or ':') (line 1)"},
  };
  for (const auto& [text, error] : bad) {
    auto r = parse_config(text, "g.toml", lookup);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.error().message, error);
  }
}

TEST(GpupdConfig, AdminGroupFromTheSystemGroupDatabase) {
  // root (gid 0) is in every group database; the other name in none.
  auto root = lookup_group("root");
  ASSERT_TRUE(root.ok()) << root.error().message;
  ASSERT_TRUE(root->has_value());
  EXPECT_EQ(**root, 0u);
  auto missing = lookup_group("gpup-no-such-group-7f3a");
  ASSERT_TRUE(missing.ok()) << missing.error().message;
  EXPECT_FALSE(missing->has_value());

  auto c = parse_config("admin_group = \"root\"\n", "g.toml");
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_EQ(c->admin_gid, std::optional<gid_t>(0));
  auto unknown = parse_config("\nadmin_group = \"gpup-no-such-group-7f3a\"\n", "/etc/gpup/gpupd.toml");
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().message, "/etc/gpup/gpupd.toml: admin_group: no group named 'gpup-no-such-group-7f3a' (line 2)");
}

TEST(GpupdConfig, BadTypeIsNamed) {
  auto c = parse_config("[[adapter]]\nname = \"a\"\nkmd = 3\n", "g.toml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().message, "g.toml: adapter[0].kmd: expected a string, got integer (line 3)");
  auto v = parse_config("[[adapter]]\nname = \"a\"\nkmd = \"m\"\n[adapter.config]\nlist = [1, 2]\n", "g.toml");
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.error().message, "g.toml: adapter[0].config.list: expected a string, integer or boolean, got array (line 5)");
  auto t = parse_config("adapter = 5\n", "g.toml");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.error().message.find("g.toml: adapter: expected an array of tables"), std::string::npos);
}

TEST(GpupdConfig, MissingDuplicateAndInvalidValuesAreRefused) {
  auto missing = parse_config("[[adapter]]\nname = \"a\"\n", "g.toml");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message.find("g.toml: adapter[0].kmd: missing"), std::string::npos);
  auto dup = parse_config("[[adapter]]\nname = \"a\"\nkmd = \"m\"\n[[adapter]]\nname = \"a\"\nkmd = \"m\"\n", "g.toml");
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().message, "g.toml: adapter[1].name: adapter 'a' is defined twice (line 5)");
  auto name = parse_config("[[adapter]]\nname = \"a b\"\nkmd = \"m\"\n", "g.toml");
  ASSERT_FALSE(name.ok());
  EXPECT_NE(name.error().message.find("g.toml: adapter[0].name: adapter name 'a b' is invalid"), std::string::npos);
  auto nl = parse_config("[[adapter]]\nname = \"a\"\nkmd = \"m\"\n[adapter.config]\nx = \"1\\n2\"\n", "g.toml");
  ASSERT_FALSE(nl.ok());
  EXPECT_NE(nl.error().message.find("adapter[0].config.x: value must not contain line breaks"), std::string::npos);
}

TEST(GpupdConfig, SyntaxErrorNamesFileAndPosition) {
  auto c = parse_config("[[adapter]\nname = \"a\"\n", "g.toml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().message.rfind("g.toml: line 1, column", 0), 0u) << c.error().message;
}

TEST(GpupdConfig, ExampleFileParses) {
  auto c = load_config(GPUPD_EXAMPLE_CONFIG);
  ASSERT_TRUE(c.ok()) << c.error().message;
  ASSERT_GE(c->adapters.size(), 1u);
  EXPECT_EQ(c->adapters[0].name, "pocl0");
  EXPECT_EQ(c->worker_id_base, 1900000000u);
  EXPECT_EQ(c->worker_id_count, 65536u);
  auto missing = load_config("/nonexistent/gpupd.toml");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().message, "/nonexistent/gpupd.toml: cannot open the configuration file");
}

// ---------------------------------------------------------------------------------------------
// Persistent state

VmSpec spec(const std::string& name, const std::string& adapter, uint64_t min, uint64_t max) {
  return VmSpec{name, control::new_guid(), adapter, min, max, max, 100, 100, false};
}

TEST(GpupdState, RoundTripsThroughTheFile) {
  TempDir dir;
  std::string path = dir.file("partitions.json");
  PersistentState s;
  s.luids = {{"pocl0", 0x1234}, {"mock1", 0x5678}};
  s.partitions = {spec("a", "pocl0", 0, GiB), spec("b", "mock1", MiB, 2 * MiB)};
  s.partitions[1].secure = true;
  s.partitions[1].compute_weight = 300;
  s.partitions[1].max_compute = 50;
  ASSERT_TRUE(save_state(path, s).ok());
  auto back = load_state(path);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(*back, s);
}

TEST(GpupdState, MissingFileIsEmptyState) {
  TempDir dir;
  auto s = load_state(dir.file("partitions.json"));
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(s->partitions.empty());
  EXPECT_TRUE(s->luids.empty());
}

TEST(GpupdState, AtomicWriteReplacesAndLeavesNoTemporaries) {
  TempDir dir;
  std::string path = dir.file("partitions.json");
  ASSERT_TRUE(write_file_atomic(path, "first\n").ok());
  ASSERT_TRUE(write_file_atomic(path, "second\n").ok());
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "second\n");
  EXPECT_EQ(list_dir(dir.path()), std::vector<std::string>{"partitions.json"});
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
}

TEST(GpupdState, FailedWriteKeepsTheOldFile) {
  TempDir dir;
  std::string path = dir.file("partitions.json");
  ASSERT_TRUE(write_file_atomic(path, "old\n").ok());
  // A directory where the file should go makes rename fail after the temporary was written.
  std::string blocked = dir.file("sub");
  ASSERT_EQ(::mkdir(blocked.c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((blocked + "/x").c_str(), 0755), 0);
  Status s = write_file_atomic(blocked, "new\n");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(list_dir(dir.path()).size(), 2u) << "no temporary file left behind";
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "old\n");
}

TEST(GpupdState, CorruptFileIsRefusedNamingIt) {
  TempDir dir;
  std::string path = dir.file("partitions.json");
  ASSERT_TRUE(write_file_atomic(path, "{\"version\":1,\"partitions\":[").ok());
  auto s = load_state(path);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("state file " + path + " is corrupt"), std::string::npos) << s.error().message;
  EXPECT_NE(s.error().message.find("will not start"), std::string::npos);
}

TEST(GpupdState, InvalidContentIsRefusedNamingIt) {
  TempDir dir;
  std::string path = dir.file("partitions.json");
  json j = to_json(PersistentState{{}, {spec("a", "pocl0", 0, GiB)}});
  j["partitions"][0]["min_vram"] = "lots";
  ASSERT_TRUE(write_file_atomic(path, j.dump()).ok());
  auto s = load_state(path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().message, "state file " + path +
                                   " is invalid: partitions[0].min_vram: expected a non-negative integer, got string; "
                                   "gpupd will not start until it is repaired or moved away");

  j = to_json(PersistentState{{}, {spec("a", "pocl0", 0, GiB), spec("a", "pocl0", 0, GiB)}});
  ASSERT_TRUE(write_file_atomic(path, j.dump()).ok());
  EXPECT_FALSE(load_state(path).ok());
  j = to_json(PersistentState{});
  j["version"] = 7;
  ASSERT_TRUE(write_file_atomic(path, j.dump()).ok());
  EXPECT_FALSE(load_state(path).ok());
}

ResetHistory history(uint64_t total, std::string last, std::vector<uint64_t> times, std::string removed = "") {
  return ResetHistory{total, std::move(last), std::move(times), std::move(removed)};
}

TEST(GpupdState, ResetHistoriesRoundTripAndOnlyRealOnesAreWritten) {
  TempDir dir;
  std::string path = dir.file("partitions.json");
  PersistentState s;
  s.luids = {{"mock0", 0x1234}};
  s.partitions = {spec("a", "mock0", 0, GiB), spec("b", "mock0", 0, GiB), spec("c", "mock0", 0, GiB)};
  s.resets["a"] = history(7, "TDR: work of saxpy (pid 42) ran 2004 ms, past the TDR delay", {1700000000, 1700000000, 1700000005},
                          "removed after 3 resets within 60 s (last: TDR: work of saxpy (pid 42) ran 2004 ms, past the "
                          "TDR delay)");
  s.resets["b"] = history(1, "the worker killed by signal 11 (SEGV) while running guest work", {});
  ASSERT_TRUE(save_state(path, s).ok());
  auto back = load_state(path);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(*back, s);

  json j = to_json(s);
  EXPECT_EQ(j["partitions"][0]["resets"],
            json::parse(R"j({"total":7,"last":"TDR: work of saxpy (pid 42) ran 2004 ms, past the TDR delay",
                            "times":[1700000000,1700000000,1700000005],
                            "removed":"removed after 3 resets within 60 s (last: TDR: work of saxpy (pid 42) ran 2004 ms, past the TDR delay)"})j"));
  EXPECT_EQ(j["partitions"][1]["resets"], json::parse(R"({"total":1,"times":[],
                            "last":"the worker killed by signal 11 (SEGV) while running guest work"})"));
  EXPECT_FALSE(j["partitions"][2].contains("resets")) << "no history: nothing written";
  s.resets["c"] = ResetHistory{};
  s.resets["gone"] = history(3, "x", {});
  j = to_json(s);
  EXPECT_FALSE(j["partitions"][2].contains("resets")) << "an empty history is no history";
  EXPECT_EQ(j.dump().find("gone"), std::string::npos) << "nor one of a partition not in the file";
}

TEST(GpupdState, FileWithoutResetHistoriesLoads) {
  // As gpupd wrote it before reset histories were kept.
  TempDir dir;
  std::string path = dir.file("partitions.json");
  ASSERT_TRUE(write_file_atomic(path, R"({"version":1,"adapters":{"mock0":{"luid":4660}},"partitions":[
    {"name":"v1","guid":"0b6c3c5e-6f7e-4e3a-9d0f-1a2b3c4d5e6f","adapter":"mock0","min_vram":0,
     "max_vram":1073741824,"optimal_vram":1073741824,"compute_weight":100,"max_compute":100,"secure":false}]})")
                  .ok());
  auto s = load_state(path);
  ASSERT_TRUE(s.ok()) << s.error().message;
  ASSERT_EQ(s->partitions.size(), 1u);
  EXPECT_EQ(s->partitions[0].name, "v1");
  EXPECT_TRUE(s->resets.empty());
}

TEST(GpupdState, BadResetHistoriesAreRefusedNamingTheField) {
  TempDir dir;
  std::string path = dir.file("partitions.json");
  PersistentState good{{{"mock0", 0x1234}}, {spec("a", "mock0", 0, GiB)}, {}};
  good.resets["a"] = history(3, "TDR", {1700000000, 1700000001}, "removed after 3 resets");
  const json base = to_json(good);
  // Loads with tdr_limit_count (default 5: at most 10 times).
  auto refused = [&](const std::function<void(json&)>& change, uint32_t limit = control::kDefaultTdrLimitCount) {
    json j = base;
    change(j["partitions"][0]["resets"]);
    EXPECT_TRUE(write_file_atomic(path, control::dump_json(j)).ok());
    auto s = load_state(path, limit);
    if (s.ok()) return std::string("loaded");
    const std::string prefix = "state file " + path + " is invalid: ";
    const std::string suffix = "; gpupd will not start until it is repaired or moved away";
    std::string m = s.error().message;
    EXPECT_EQ(m.rfind(prefix, 0), 0u) << m;
    EXPECT_TRUE(m.ends_with(suffix)) << m;
    return m.substr(prefix.size(), m.size() - prefix.size() - suffix.size());
  };
  EXPECT_EQ(refused([](json&) {}), "loaded");
  EXPECT_EQ(refused([](json& r) { r = json::array(); }), "partitions[0].resets: expected an object, got array");
  EXPECT_EQ(refused([](json& r) { r["total"] = "3"; }), "partitions[0].resets.total: expected a non-negative integer, got string");
  EXPECT_EQ(refused([](json& r) { r.erase("total"); }), "partitions[0].resets.total: missing");
  EXPECT_EQ(refused([](json& r) { r.erase("times"); }), "partitions[0].resets.times: missing");
  EXPECT_EQ(refused([](json& r) { r["when"] = 1; }), "partitions[0].resets.when: unknown field");
  EXPECT_EQ(refused([](json& r) { r["times"] = 1700000000; }), "partitions[0].resets.times: expected an array, got integer");
  EXPECT_EQ(refused([](json& r) { r["times"] = json::array({1700000000, "soon"}); }),
            "partitions[0].resets.times[1]: expected seconds since the epoch in 1..7258118400, got string");
  EXPECT_EQ(refused([](json& r) { r["times"] = json::array({0}); }),
            "partitions[0].resets.times[0]: expected seconds since the epoch in 1..7258118400, got 0");
  EXPECT_EQ(refused([](json& r) { r["times"] = json::array({-5}); }),
            "partitions[0].resets.times[0]: expected seconds since the epoch in 1..7258118400, got negative integer");
  EXPECT_EQ(refused([](json& r) { r["times"] = json::array({7258118401ull}); }),
            "partitions[0].resets.times[0]: expected seconds since the epoch in 1..7258118400, got 7258118401");
  EXPECT_EQ(refused([](json& r) { r["times"] = json::array({1.5}); }),
            "partitions[0].resets.times[0]: expected seconds since the epoch in 1..7258118400, got number with a fraction");
  EXPECT_EQ(refused([](json& r) { r["times"] = json::array({1700000005, 1700000000}); }),
            "partitions[0].resets.times[1]: earlier than the time before it (they are oldest first)");
  EXPECT_EQ(refused([](json& r) { r["total"] = 1; }), "partitions[0].resets: 2 reset times but a total of 1");
  // At most 2 * tdr_limit_count times: gpupd keeps tdr_limit_count at most.
  auto many = [](size_t n) {
    return [n](json& r) {
      r["times"] = json::array();
      for (size_t i = 0; i < n; ++i) r["times"].push_back(1700000000 + i);
      r["total"] = n;
    };
  };
  EXPECT_EQ(refused(many(10)), "loaded");
  EXPECT_EQ(refused(many(11)), "partitions[0].resets.times: more than 10 items");
  EXPECT_EQ(refused(many(4), 2), "loaded");
  EXPECT_EQ(refused(many(5), 2), "partitions[0].resets.times: more than 4 items");
  // Reasons: strings, capped, printable, and not empty when present.
  EXPECT_EQ(refused([](json& r) { r["last"] = 5; }), "partitions[0].resets.last: expected a string, got integer");
  EXPECT_EQ(refused([](json& r) { r["last"] = std::string(kMaxResetReasonLength, 'x'); }), "loaded");
  EXPECT_EQ(refused([](json& r) { r["last"] = std::string(kMaxResetReasonLength + 1, 'x'); }),
            "partitions[0].resets.last: longer than 2048 bytes");
  EXPECT_EQ(refused([](json& r) { r["removed"] = std::string(100000, 'x'); }),
            "partitions[0].resets.removed: longer than 2048 bytes");
  EXPECT_EQ(refused([](json& r) { r["last"] = "TDR \\n \xc3\xa9"; }), "loaded") << "a backslash, n and UTF-8 are printable";
  EXPECT_EQ(refused([](json& r) { r["last"] = "TDR\n\x1b[2J"; }), "partitions[0].resets.last: contains control characters");
  EXPECT_EQ(refused([](json& r) { r["removed"] = std::string("a\x7f"); }),
            "partitions[0].resets.removed: contains control characters");
  EXPECT_EQ(refused([](json& r) { r["removed"] = ""; }), "partitions[0].resets.removed: empty");
  EXPECT_EQ(refused([](json& r) { r["removed"] = true; }), "partitions[0].resets.removed: expected a string, got boolean");
}

TEST(GpupdState, LongOrUnprintableReasonsAreCutWhenWritten) {
  TempDir dir;
  std::string path = dir.file("partitions.json");
  PersistentState s{{}, {spec("a", "mock0", 0, GiB)}, {}};
  std::string long_utf8;
  while (long_utf8.size() < 3 * kMaxResetReasonLength) long_utf8 += "\xc3\xa9";  // é
  s.resets["a"] = history(1, "bad\tprocess\x1b name", {}, long_utf8);
  ASSERT_TRUE(save_state(path, s).ok());
  auto back = load_state(path);
  ASSERT_TRUE(back.ok()) << back.error().message;
  const ResetHistory& h = back->resets.at("a");
  EXPECT_EQ(h.last, "bad?process? name");
  EXPECT_LE(h.removed.size(), kMaxResetReasonLength);
  EXPECT_GT(h.removed.size(), kMaxResetReasonLength - 8);
  EXPECT_TRUE(h.removed.ends_with("\xc3\xa9...")) << "cut between characters, never inside one";
}

TEST(GpupdState, LuidsAreStableAndDistinct) {
  std::map<std::string, uint64_t> none;
  uint64_t a = derive_luid("pocl0", none);
  EXPECT_EQ(a, derive_luid("pocl0", none));
  EXPECT_NE(a, 0u);
  EXPECT_LT(a, 1ull << 63);
  EXPECT_NE(a, derive_luid("pocl1", none));
  std::map<std::string, uint64_t> taken{{"other", a}};
  EXPECT_NE(derive_luid("pocl0", taken), a);
}

// ---------------------------------------------------------------------------------------------
// Admission

AdapterInfo adapter(const std::string& name, uint64_t total, bool pv = true, bool secure = true) {
  AdapterInfo a;
  a.name = name;
  a.state = AdapterState::kReady;
  a.driver_name = "kmd_test";
  a.total_vram = total;
  a.paravirtualization = pv;
  a.secure_capable = secure;
  return a;
}

Result<VmSpec> add(const json& req, const std::vector<AdapterInfo>& adapters, const std::vector<VmSpec>& existing) {
  auto r = parse_vm_request(req, true);
  if (!r) return r.error();
  std::vector<const AdapterInfo*> ptrs;
  for (const auto& a : adapters) ptrs.push_back(&a);
  return admit_new_vm(*r, ptrs, existing, control::new_guid());
}

TEST(GpupdAdmission, DefaultsTakeTheWholeAdapter) {
  auto vm = add(json{{"name", "v1"}}, {adapter("pocl0", 4 * GiB)}, {});
  ASSERT_TRUE(vm.ok()) << vm.error().message;
  EXPECT_EQ(vm->adapter, "pocl0");
  EXPECT_EQ(vm->min_vram, 0u);
  EXPECT_EQ(vm->max_vram, 4 * GiB);
  EXPECT_EQ(vm->optimal_vram, 4 * GiB);
  EXPECT_EQ(vm->compute_weight, 100u);
  EXPECT_EQ(vm->max_compute, 100u);
  EXPECT_FALSE(vm->secure);
  EXPECT_TRUE(control::parse_guid(vm->guid));
}

TEST(GpupdAdmission, SizesAcceptUnits) {
  auto vm = add(json{{"name", "v1"}, {"min_vram", "256MiB"}, {"max_vram", "1.5 GiB"}, {"optimal_vram", 512 * MiB}},
                {adapter("pocl0", 4 * GiB)}, {});
  ASSERT_TRUE(vm.ok()) << vm.error().message;
  EXPECT_EQ(vm->min_vram, 256 * MiB);
  EXPECT_EQ(vm->max_vram, 3 * GiB / 2);
  EXPECT_EQ(vm->optimal_vram, 512 * MiB);
  auto bad = add(json{{"name", "v1"}, {"max_vram", "12 parsecs"}}, {adapter("pocl0", 4 * GiB)}, {});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().message, "max_vram: '12 parsecs' is not a size (use bytes or a unit: 512MiB, 1.5GiB)");
  auto neg = add(json{{"name", "v1"}, {"min_vram", -5}}, {adapter("pocl0", 4 * GiB)}, {});
  ASSERT_FALSE(neg.ok());
  EXPECT_EQ(neg.error().message, "min_vram: expected a size, got negative integer");
}

TEST(GpupdAdmission, NamesAreChecked) {
  std::vector<AdapterInfo> a{adapter("pocl0", GiB)};
  EXPECT_TRUE(add(json{{"name", "ok-name_1.x"}}, a, {}).ok());
  for (const std::string& bad : std::vector<std::string>{"", "a b", "../x", ".", "..", "-rf", std::string(65, 'v'), "ü"}) {
    auto r = add(json{{"name", bad}}, a, {});
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.error().message.find("is invalid"), std::string::npos) << r.error().message;
  }
  auto wrongtype = add(json{{"name", 5}}, a, {});
  ASSERT_FALSE(wrongtype.ok());
  EXPECT_EQ(wrongtype.error().message, "vm.name: expected a string, got integer");
  auto unknown = add(json{{"name", "v"}, {"max_vrma", 5}}, a, {});
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().message, "vm.max_vrma: unknown field");
}

TEST(GpupdAdmission, MaxBelowMinAndOptimalOutsideAreRefused) {
  std::vector<AdapterInfo> a{adapter("pocl0", 4 * GiB)};
  auto r = add(json{{"name", "v"}, {"min_vram", "256MiB"}, {"max_vram", "128MiB"}}, a, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message, "max 128 MiB is less than min 256 MiB");
  r = add(json{{"name", "v"}, {"min_vram", "256MiB"}, {"max_vram", "1GiB"}, {"optimal_vram", "128MiB"}}, a, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message, "optimal 128 MiB must lie between min 256 MiB and max 1 GiB");
  r = add(json{{"name", "v"}, {"max_vram", "8GiB"}}, a, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message, "max 8 GiB exceeds adapter pocl0's 4 GiB");
  r = add(json{{"name", "v"}, {"max_vram", 0}}, a, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message, "max 0 B: a partition needs some memory");
}

TEST(GpupdAdmission, MinMustFitWhatIsLeft) {
  // 3.8 GiB adapter with 2.5 GiB already reserved by two partitions.
  uint64_t total = 3 * GiB + 819 * MiB;  // 3.8 GiB as format_size prints it
  std::vector<AdapterInfo> a{adapter("pocl0", total), adapter("other", 8 * GiB)};
  std::vector<VmSpec> existing{spec("a", "pocl0", 2 * GiB, 3 * GiB), spec("b", "pocl0", GiB / 2, GiB),
                               spec("c", "other", 4 * GiB, 8 * GiB)};
  auto r = add(json{{"name", "v"}, {"adapter", "pocl0"}, {"min_vram", "2GiB"}, {"max_vram", "3GiB"}}, a, existing);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message,
            "min 2 GiB does not fit: adapter pocl0 has 3.8 GiB, 2.5 GiB already reserved by other partitions");
  EXPECT_EQ(reserved_vram(existing, "pocl0"), 5 * GiB / 2);
  // What is left (1.3 GiB) does fit, exactly.
  auto fits = add(json{{"name", "v"}, {"adapter", "pocl0"}, {"min_vram", total - 5 * GiB / 2}}, a, existing);
  ASSERT_TRUE(fits.ok()) << fits.error().message;
  auto over = add(json{{"name", "v"}, {"adapter", "pocl0"}, {"min_vram", total - 5 * GiB / 2 + 1}}, a, existing);
  EXPECT_FALSE(over.ok());
}

TEST(GpupdAdmission, AdapterChoiceAndRefusals) {
  std::vector<AdapterInfo> a{adapter("nopv", 4 * GiB, false), adapter("pocl0", 4 * GiB, true, false)};
  auto picked = add(json{{"name", "v"}}, a, {});
  ASSERT_TRUE(picked.ok());
  EXPECT_EQ(picked->adapter, "pocl0") << "the first partitionable adapter";
  auto nopv = add(json{{"name", "v"}, {"adapter", "nopv"}}, a, {});
  ASSERT_FALSE(nopv.ok());
  EXPECT_EQ(nopv.error().message,
            "adapter nopv: KMD kmd_test does not declare ParavirtualizationSupported; it cannot be partitioned");
  auto unknown = add(json{{"name", "v"}, {"adapter", "gpu9"}}, a, {});
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().message, "unknown adapter 'gpu9' (configured: nopv, pocl0)");
  auto secure = add(json{{"name", "v"}, {"adapter", "pocl0"}, {"secure", true}}, a, {});
  ASSERT_FALSE(secure.ok());
  EXPECT_EQ(secure.error().message,
            "adapter pocl0: KMD kmd_test does not declare IoMmuSecureModeSupported; a secure partition cannot run on it");
  auto dup = add(json{{"name", "v"}}, a, {spec("v", "pocl0", 0, GiB)});
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().message, "vm v already exists");
  AdapterInfo failed = adapter("broken", 0);
  failed.state = AdapterState::kFailed;
  failed.error = "KMD lacks pfnSubmitCommand";
  auto f = add(json{{"name", "v"}}, {failed}, {});
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().message, "adapter broken failed: KMD lacks pfnSubmitCommand");
  auto compute = add(json{{"name", "v"}, {"max_compute", 150}}, a, {});
  ASSERT_FALSE(compute.ok());
  EXPECT_EQ(compute.error().message, "vm.max_compute: 150 is outside 1..100");
  auto weight = add(json{{"name", "v"}, {"compute_weight", 0}}, a, {});
  ASSERT_FALSE(weight.ok());
  EXPECT_EQ(weight.error().message, "vm.compute_weight: 0 is outside 1..10000");
}

TEST(GpupdAdmission, ChangesAreCheckedAgainstTheOthers) {
  AdapterInfo a = adapter("pocl0", 4 * GiB);
  std::vector<VmSpec> all{spec("a", "pocl0", GiB, 2 * GiB), spec("b", "pocl0", 2 * GiB, 4 * GiB)};
  auto change = [&](const json& j) {
    auto r = parse_vm_request(j, false);
    if (!r) return Result<VmSpec>(r.error());
    return admit_vm_change(all[0], *r, &a, all);
  };
  auto ok = change(json{{"max_vram", "1GiB"}});
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  EXPECT_EQ(ok->max_vram, GiB);
  EXPECT_EQ(ok->optimal_vram, GiB) << "optimal was at max and follows it";
  auto grow = change(json{{"min_vram", "3GiB"}, {"max_vram", "3GiB"}});
  ASSERT_FALSE(grow.ok());
  EXPECT_EQ(grow.error().message, "min 3 GiB does not fit: adapter pocl0 has 4 GiB, 2 GiB already reserved by other partitions");
  auto renamed = parse_vm_request(json{{"name", "x"}}, false);
  ASSERT_FALSE(renamed.ok());
  EXPECT_EQ(renamed.error().message, "vm.name: unknown field");
  auto secure = change(json{{"secure", true}});
  ASSERT_FALSE(secure.ok());
  EXPECT_NE(secure.error().message.find("secure cannot be changed"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Worker supervision against fake_vmwp

class GpupdWorker : public ::testing::Test {
 protected:
  void SetUp() override {
    opts_.vmwp_path = FAKE_VMWP_PATH;
    opts_.ready_timeout = 5000ms;
    opts_.request_timeout = 2000ms;
    opts_.stop_timeout = 2000ms;
    opts_.backoff_min = 50ms;
    opts_.backoff_max = 200ms;
    opts_.max_start_failures = 3;
  }

  Worker::ConfigureFn configure(const std::string& vm, uint64_t max = GiB) {
    return [this, vm, max]() -> Result<control::ConfigureMessage> {
      control::ConfigureMessage m;
      m.vm = VmSpec{vm, control::new_guid(), "mock0", 0, max, max, weight_, 100, false};
      m.adapter = control::AdapterSpec{"mock0", 42, "/nonexistent/libgpup_kmd_mock.so", "a=b\n"};
      ::mkdir((dir_.path() + "/" + vm).c_str(), 0755);
      m.endpoint = dir_.path() + "/" + vm + "/vrd.sock";
      m.log_level = "info";
      spec_ = m.vm;
      return m;
    };
  }

  // Runs the loop until pred holds or the timeout passes.
  bool run_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 5000ms) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      loop_.add_timer(10ms, [this] { loop_.stop(); });
      loop_.run();
    }
    return true;
  }

  Result<json> request(Worker& w, const std::string& op, json args = json::object()) {
    std::optional<Result<json>> got;
    w.request(op, std::move(args), [&](Result<json> r) { got = std::move(r); });
    EXPECT_TRUE(run_until([&] { return got.has_value(); }));
    return got ? *got : Result<json>(make_error(GPUP_STATUS_TIMEOUT, "no answer"));
  }

  TempDir dir_;
  EventLoop loop_;
  WorkerOptions opts_;
  VmSpec spec_;
  uint32_t weight_ = 100;  // fake_vmwp's tdr* and fault* reset their partition while it is 1
};

TEST_F(GpupdWorker, StartsAnswersStatsAndStops) {
  Worker w(loop_, opts_, "v1", configure("v1", 256 * MiB));
  w.start();
  EXPECT_EQ(w.state(), WorkerState::kStarting);
  bool settled = false;
  w.when_settled([&] { settled = true; });
  ASSERT_TRUE(run_until([&] { return settled; }));
  ASSERT_EQ(w.state(), WorkerState::kRunning) << w.last_error();
  EXPECT_GT(w.pid(), 0);

  auto stats = request(w, "stats");
  ASSERT_TRUE(stats.ok()) << stats.error().message;
  auto clean = control::sanitize_worker_stats((*stats)["stats"]);
  ASSERT_TRUE(clean.ok()) << clean.error().message;
  EXPECT_EQ((*clean)["vram_max"], 256 * MiB);

  VmSpec next = spec_;
  next.max_vram = next.optimal_vram = 128 * MiB;
  ASSERT_TRUE(request(w, "update", json{{"vm", control::to_json(next)}}).ok());
  auto after = request(w, "stats");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ((*after)["stats"]["vram_max"], 128 * MiB);

  bool stopped = false;
  w.stop([&] { stopped = true; });
  ASSERT_TRUE(run_until([&] { return stopped; }));
  EXPECT_EQ(w.state(), WorkerState::kStopped);
  EXPECT_EQ(w.pid(), -1);
  EXPECT_EQ(w.restarts(), 0u);
}

// A worker borrowing device memory above its min through the control channel; everything it
// borrowed returns the moment its process is gone.
TEST_F(GpupdWorker, BorrowedMemoryReturnsWhenTheWorkerDies) {
  std::vector<VmSpec> specs = {VmSpec{"borrow1", control::new_guid(), "mock0", 0, 256 * MiB, 256 * MiB, 100, 100, false},
                               VmSpec{"other", control::new_guid(), "mock0", 64 * MiB, 64 * MiB, 64 * MiB, 100, 100, false}};
  auto arbiter = std::make_shared<VramArbiter>([&] { return specs; }, [](const std::string&) { return 128 * MiB; });
  opts_.vram = arbiter;
  Worker w(loop_, opts_, "borrow1", configure("borrow1", 256 * MiB));
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRunning; }));
  // It wanted 96 MiB; 64 MiB is what other's min leaves.
  ASSERT_TRUE(run_until([&] { return arbiter->borrowed("borrow1") == 64 * MiB; }));
  auto stats = request(w, "stats");
  ASSERT_TRUE(stats.ok()) << stats.error().message;
  EXPECT_EQ(control::sanitize_worker_stats((*stats)["stats"])->value("vram_held", uint64_t{0}), 64 * MiB);
  EXPECT_EQ(w.describe()["vram"]["borrowed"], 64 * MiB);
  EXPECT_EQ(w.describe()["vram"]["borrowable"], 0u);
  EXPECT_EQ(arbiter->query("other").hold, 64 * MiB);

  ASSERT_EQ(::kill(w.pid(), SIGKILL), 0);
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRestarting; }));
  EXPECT_EQ(arbiter->borrowed("borrow1"), 0u);
  EXPECT_EQ(arbiter->borrowed_on("mock0"), 0u);
  bool stopped = false;
  w.stop([&] { stopped = true; });
  ASSERT_TRUE(run_until([&] { return stopped; }));
}

TEST_F(GpupdWorker, KilledWorkerIsRestarted) {
  Worker w(loop_, opts_, "v1", configure("v1"));
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRunning; }));
  pid_t first = w.pid();
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRestarting; }));
  EXPECT_NE(w.describe()["last_error"].get<std::string>().find("killed by signal 9 (KILL)"), std::string::npos);
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRunning; }));
  EXPECT_NE(w.pid(), first);
  EXPECT_EQ(w.restarts(), 1u);
}

TEST_F(GpupdWorker, ConfigurationErrorFailsWithoutRestart) {
  Worker w(loop_, opts_, "fail1", configure("fail1"));
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kFailed; }));
  EXPECT_EQ(w.last_error(), "fake worker refuses vm fail1");
  EXPECT_EQ(w.restarts(), 0u);
  EXPECT_EQ(w.pid(), -1);
}

TEST_F(GpupdWorker, CrashingBeforeReadyGivesUpAfterBoundedRetries) {
  Worker w(loop_, opts_, "crash1", configure("crash1"));
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kFailed; }));
  EXPECT_EQ(w.restarts(), 2u) << "3 attempts in all";
  EXPECT_NE(w.last_error().find("failed to start 3 times in a row"), std::string::npos) << w.last_error();
  EXPECT_NE(w.last_error().find("exited with status 3"), std::string::npos) << w.last_error();
}

TEST_F(GpupdWorker, OverlongLineGetsTheWorkerKilledAndRestarted) {
  Worker w(loop_, opts_, "junk1", configure("junk1"));
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRunning; }));
  pid_t first = w.pid();
  auto stats = request(w, "stats");
  ASSERT_FALSE(stats.ok());
  EXPECT_NE(stats.error().message.find("limit"), std::string::npos) << stats.error().message;
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRunning && w.pid() != first; }));
  EXPECT_EQ(w.restarts(), 1u);
}

TEST_F(GpupdWorker, MissingProgramFailsCleanly) {
  opts_.vmwp_path = "/nonexistent/gpup-vmwp";
  Worker w(loop_, opts_, "v1", configure("v1"));
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kFailed; }));
  EXPECT_NE(w.last_error().find("cannot execute /nonexistent/gpup-vmwp"), std::string::npos) << w.last_error();
}

// Seconds since the epoch, now.
uint64_t wall_now() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

// Each reset is counted and reported to the hook; at the limit the partition is removed. Its history
// goes to a new Worker (as to a restarted gpupd): still removed, not started, until reset().
TEST_F(GpupdWorker, ResetsAreKeptAndARestoredRemovedPartitionIsNotStarted) {
  opts_.tdr_limit_count = 2;
  std::vector<std::string> changed;
  opts_.resets_changed = [&](const std::string& vm) { changed.push_back(vm); };
  weight_ = 1;
  const uint64_t before = wall_now();
  ResetHistory h;
  {
    Worker w(loop_, opts_, "tdr1", configure("tdr1"));
    w.start();
    ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRemoved; })) << to_string(w.state());
    EXPECT_EQ(changed, (std::vector<std::string>{"tdr1", "tdr1"})) << "once per reset, the last one removing it";
    EXPECT_EQ(w.restarts(), 1u);
    EXPECT_EQ(w.pid(), -1);
    h = w.reset_history();
  }
  EXPECT_EQ(h.total, 2u);
  EXPECT_EQ(h.last.rfind("TDR: work of fake-guest (pid ", 0), 0u) << h.last;
  ASSERT_EQ(h.times.size(), 2u);
  for (uint64_t t : h.times) {
    EXPECT_GE(t, before - 1);
    EXPECT_LE(t, wall_now() + 1);
  }
  EXPECT_EQ(h.removed, "removed after 2 resets within 60 s (last: " + h.last + ")");

  changed.clear();
  weight_ = 100;  // it would run now, if it were started
  Worker again(loop_, opts_, "tdr1", configure("tdr1"));
  again.restore_resets(h);
  EXPECT_EQ(again.state(), WorkerState::kRemoved);
  EXPECT_EQ(again.last_error(), h.removed + ", before gpupd restarted; `gpup vm reset tdr1` brings it back");
  again.start();
  EXPECT_FALSE(run_until([&] { return again.state() != WorkerState::kRemoved || again.pid() > 0; }, 300ms))
      << "a removed partition is not started";
  json resets = again.describe()["resets"];
  EXPECT_EQ(resets["recent"], 2);
  EXPECT_EQ(resets["total"], 2);
  EXPECT_EQ(resets["last"], h.last);
  EXPECT_EQ(again.reset_history(), h) << "handed on unchanged";
  EXPECT_TRUE(changed.empty()) << "restoring is no change";

  again.reset();
  EXPECT_EQ(changed, std::vector<std::string>{"tdr1"});
  ResetHistory cleared = again.reset_history();
  EXPECT_EQ(cleared.removed, "");
  EXPECT_TRUE(cleared.times.empty());
  EXPECT_EQ(cleared.total, 2u) << "the total and the last reason stay";
  EXPECT_EQ(cleared.last, h.last);
  ASSERT_TRUE(run_until([&] { return again.state() == WorkerState::kRunning; })) << again.last_error();
  EXPECT_EQ(again.last_error(), "");
}

// Restored resets within the window count toward the limit; older ones are dropped, and one ahead
// of the clock (set back since) counts as now. A fault signal is a reset too.
TEST_F(GpupdWorker, RestoredResetsCountTowardTheLimit) {
  opts_.tdr_limit_count = 3;
  opts_.tdr_limit_window = 60s;
  weight_ = 1;
  const uint64_t now = wall_now();
  Worker w(loop_, opts_, "fault1", configure("fault1"));
  w.restore_resets(history(9, "earlier", {now - 3600, now - 10, now + 1000}));
  EXPECT_EQ(w.state(), WorkerState::kStopped);
  EXPECT_EQ(w.describe()["resets"]["recent"], 2);
  ResetHistory kept = w.reset_history();
  ASSERT_EQ(kept.times.size(), 2u);
  EXPECT_NEAR(static_cast<double>(kept.times[0]), static_cast<double>(now - 10), 2.0);
  EXPECT_NEAR(static_cast<double>(kept.times[1]), static_cast<double>(wall_now()), 2.0);
  w.start();
  ASSERT_TRUE(run_until([&] { return w.state() == WorkerState::kRemoved; })) << to_string(w.state());
  EXPECT_EQ(w.restarts(), 0u) << "one reset reached the limit";
  ResetHistory h = w.reset_history();
  EXPECT_EQ(h.total, 10u);
  EXPECT_EQ(h.last, "the worker killed by signal 4 (ILL) while running guest work");
  EXPECT_EQ(h.times.size(), 3u);
  EXPECT_EQ(h.removed, "removed after 3 resets within 60 s (last: " + h.last + ")");

  // More recent times than the limit (it was lowered since gpupd wrote them): the newest count.
  Worker lowered(loop_, opts_, "v1", configure("v1"));
  lowered.restore_resets(history(5, "x", {now - 50, now - 40, now - 30, now - 20, now - 10}));
  EXPECT_EQ(lowered.describe()["resets"]["recent"], 3);
  EXPECT_EQ(lowered.reset_history().times, (std::vector<uint64_t>{now - 30, now - 20, now - 10}));
}

TEST_F(GpupdWorker, RequestsToAStoppedWorkerFail) {
  Worker w(loop_, opts_, "v1", configure("v1"));
  auto r = request(w, "stats");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message, "vm v1: worker is stopped");
}

// ---------------------------------------------------------------------------------------------
// Who may use the operator socket

TEST(GpupdOperatorAccess, RootAndTheAdminGroupOnly) {
  Config none = default_config();
  Config admin = default_config();
  admin.admin_group = "gpup";
  admin.admin_gid = 4242;
  Peer root{42, 0, 0, {}, "gpup"};
  EXPECT_EQ(operator_refusal(root, none), "");
  EXPECT_EQ(operator_refusal(root, admin), "");
  Peer user{43, 1000, 1000, {24, 25}, "gpup"};
  EXPECT_EQ(operator_refusal(user, none), "permission denied: uid 1000 is not root, and no admin_group is configured");
  EXPECT_EQ(operator_refusal(user, admin), "permission denied: uid 1000 is not root and not in the admin group gpup");
  Peer member = user;
  member.groups.push_back(4242);
  EXPECT_EQ(operator_refusal(member, admin), "") << "a supplementary group";
  EXPECT_NE(operator_refusal(member, none), "") << "no admin group: groups do not matter";
  Peer primary{44, 1000, 4242, {}, ""};
  EXPECT_EQ(operator_refusal(primary, admin), "") << "the gid";
  EXPECT_EQ(to_string(user), "pid 43, uid 1000, gid 1000 (gpup)");
  EXPECT_EQ(to_string(primary), "pid 44, uid 1000, gid 4242");
}

TEST(GpupdOperatorAccess, ReadsThePeersCredentials) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  auto p = read_peer(a.get());
  ASSERT_TRUE(p.ok()) << p.error().message;
  EXPECT_EQ(p->pid, ::getpid());
  EXPECT_EQ(p->uid, ::geteuid());
  EXPECT_EQ(p->gid, ::getegid());
  std::vector<gid_t> groups(static_cast<size_t>(::getgroups(0, nullptr)));
  groups.resize(static_cast<size_t>(::getgroups(static_cast<int>(groups.size()), groups.data())));
  std::sort(groups.begin(), groups.end());
  std::sort(p->groups.begin(), p->groups.end());
  EXPECT_EQ(p->groups, groups);
  EXPECT_EQ(p->comm, std::string("gpupd_unittest").substr(0, 15));
}

// Records what gpupd logs, with its level.
class LogCapture : public spdlog::sinks::base_sink<std::mutex> {
 public:
  // Lines at level whose text holds every one of parts.
  size_t count(spdlog::level::level_enum level, std::initializer_list<std::string> parts) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t n = 0;
    for (const auto& [l, text] : lines_) {
      bool all = l == level;
      for (const auto& p : parts) all = all && text.find(p) != std::string::npos;
      n += all;
    }
    return n;
  }
  std::string dump() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string out;
    for (const auto& [l, text] : lines_) out += fmt::format("[{}] {}\n", spdlog::level::to_string_view(l), text);
    return out;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& m) override {
    lines_.emplace_back(m.level, std::string(m.payload.data(), m.payload.size()));
  }
  void flush_() override {}

 private:
  std::vector<std::pair<spdlog::level::level_enum, std::string>> lines_;
};

// The ids a test client takes in its own process before it connects.
struct Ids {
  uid_t uid;
  gid_t gid;
  std::vector<gid_t> groups;
};

// The lowest gid (uid) from `from` that the host does not know.
gid_t unused_gid(gid_t from) {
  while (::getgrgid(from)) ++from;
  return from;
}
uid_t unused_uid(uid_t from) {
  while (::getpwuid(from)) ++from;
  return from;
}

// A real gpupd (no adapters, fake_vmwp) on a private runtime directory, serving from a thread,
// with one persisted partition, "keep", whose adapter is not configured (so no worker runs).
// Needs root: the clients are forked children that drop to other ids.
class GpupdOperatorSocket : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root: clients run as other users";
    // The clients' ids must reach the socket: mkdtemp made the directory 0700.
    ASSERT_EQ(::chmod(dir_.path().c_str(), 0755), 0);
    ASSERT_EQ(::mkdir(dir_.file("state").c_str(), 0755), 0);
    PersistentState s;
    s.luids = {{"mock0", 0x1234}};
    s.partitions = {VmSpec{"keep", control::new_guid(), "mock0", 0, GiB, GiB, 100, 100, false}};
    ASSERT_TRUE(save_state(dir_.file("state/partitions.json"), s).ok());
    ::pthread_sigmask(SIG_BLOCK, nullptr, &old_mask_);
    log_ = std::make_shared<LogCapture>();
    old_level_ = spdlog::get_level();
    spdlog::set_level(spdlog::level::info);
    spdlog::default_logger()->sinks().push_back(log_);
  }
  void TearDown() override {
    stop();
    if (!log_) return;
    auto& sinks = spdlog::default_logger()->sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), log_), sinks.end());
    spdlog::set_level(old_level_);
    if (HasFailure()) std::cerr << "---- gpupd log ----\n" << log_->dump() << "-------------------\n";
  }

  Config config() const {
    Config c;
    c.source = "test";
    return c;
  }
  void start(Config c) {
    DaemonOptions opts;
    opts.config = std::move(c);
    opts.runtime_dir = dir_.file("run");
    opts.state_dir = dir_.file("state");
    opts.worker.vmwp_path = FAKE_VMWP_PATH;
    opts.client_timeout = 5000ms;
    auto d = Daemon::create(std::move(opts));
    ASSERT_TRUE(d.ok()) << d.error().message;
    daemon_ = std::move(*d);
    ASSERT_EQ(::chmod(dir_.file("run").c_str(), 0755), 0);  // whatever the umask made it
    thread_ = std::thread([this] { daemon_->run(); });
  }
  void stop() {
    if (!thread_.joinable()) return;
    if (!control::call(sock(), json{{"op", "shutdown"}}, 5000ms).ok()) ::kill(::getpid(), SIGTERM);
    thread_.join();
    daemon_.reset();
    // Daemon::create blocked SIGTERM, SIGINT and SIGHUP for its signalfd; the other tests get them back.
    ::pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
  }
  std::string sock() const { return dir_.file("run/gpupd.sock"); }

  // As root, from this process.
  Result<json> call(const json& req) { return control::call(sock(), req, 5000ms); }
  std::vector<std::string> vm_names() {
    auto r = call(json{{"op", "vm.list"}});
    EXPECT_TRUE(r.ok()) << r.error().message;
    std::vector<std::string> names;
    if (r.ok())
      for (const auto& v : *r) names.push_back(v.value("name", ""));
    return names;
  }

  // Sends one request line from a child process running as ids and returns what it read: the
  // reply line, then "<eof>" if gpupd closed the connection right after it (until_eof), or
  // "connect: <reason>". *pid gets the child's pid.
  std::string call_as(const Ids& ids, const json& req, bool until_eof = false, pid_t* pid = nullptr) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) return "pipe failed";
    pid_t child = ::fork();
    if (child == 0) {
      ::close(p[0]);
      std::string out = [&]() -> std::string {
        if (::setgroups(ids.groups.size(), ids.groups.data()) != 0 || ::setgid(ids.gid) != 0 || ::setuid(ids.uid) != 0)
          return std::string("cannot change ids: ") + std::strerror(errno);
        int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock().c_str());
        if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
          return std::string("connect: ") + std::strerror(errno);
        timeval tv{5, 0};
        ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        std::string line = control::encode_line(req);
        if (::send(fd, line.data(), line.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(line.size()))
          return std::string("send: ") + std::strerror(errno);
        std::string reply;
        char buf[4096];
        for (;;) {
          ssize_t n = ::recv(fd, buf, sizeof buf, 0);
          if (n == 0) return reply + "<eof>";
          if (n < 0) return reply + "recv: " + std::strerror(errno);
          reply.append(buf, static_cast<size_t>(n));
          if (!until_eof && reply.find('\n') != std::string::npos) return reply;
        }
      }();
      (void)!::write(p[1], out.data(), out.size());
      ::_exit(0);
    }
    ::close(p[1]);
    if (pid) *pid = child;
    std::string out;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(p[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
    ::close(p[0]);
    int status = 0;
    ::waitpid(child, &status, 0);
    return out;
  }

  static std::string refusal_line(const std::string& error) {
    return control::encode_line(json{{"ok", false}, {"error", error}});
  }

  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  std::thread thread_;
  sigset_t old_mask_{};
  std::shared_ptr<LogCapture> log_;
  spdlog::level::level_enum old_level_ = spdlog::level::info;
};

TEST_F(GpupdOperatorSocket, RootOnlyWithoutAnAdminGroup) {
  ASSERT_NO_FATAL_FAILURE(start(config()));
  struct stat st {};
  ASSERT_EQ(::stat(sock().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(st.st_uid, 0u);
  ASSERT_EQ(vm_names(), std::vector<std::string>{"keep"});

  const Ids nobody{65534, 65534, {}};
  EXPECT_EQ(call_as(nobody, json{{"op", "vm.list"}}), "connect: Permission denied") << "the file mode keeps it out";

  // Past the file mode (widened by mistake here), gpupd refuses the connection itself, before
  // reading what was sent, and closes it.
  ASSERT_EQ(::chmod(sock().c_str(), 0666), 0);
  const std::string refused =
      refusal_line("permission denied: uid 65534 is not root, and no admin_group is configured") + "<eof>";
  pid_t pid = 0;
  EXPECT_EQ(call_as(nobody, json{{"op", "vm.remove"}, {"name", "keep"}}, true, &pid), refused);
  EXPECT_EQ(log_->count(spdlog::level::warn, {fmt::format("operator socket: refused pid {}, uid 65534, gid 65534", pid),
                                              "is not root"}),
            1u);
  EXPECT_EQ(call_as(nobody, json{{"op", "vm.add"}, {"vm", {{"name", "intruder"}}}}, true), refused);
  EXPECT_EQ(call_as(nobody, json{{"op", "shutdown"}}, true), refused);
  EXPECT_EQ(log_->count(spdlog::level::warn, {"operator socket: refused", "uid 65534"}), 3u);
  EXPECT_EQ(log_->count(spdlog::level::info, {"requested by"}), 0u) << "refused requests are never read";

  // Nothing changed: the partition is there, in gpupd and on disk, and gpupd still serves.
  EXPECT_EQ(vm_names(), std::vector<std::string>{"keep"});
  auto state = load_state(dir_.file("state/partitions.json"));
  ASSERT_TRUE(state.ok()) << state.error().message;
  ASSERT_EQ(state->partitions.size(), 1u);
  EXPECT_EQ(state->partitions[0].name, "keep");

  // Root's request of the same does change it, and says who asked.
  auto removed = call(json{{"op", "vm.remove"}, {"name", "keep"}});
  ASSERT_TRUE(removed.ok()) << removed.error().message;
  EXPECT_EQ(vm_names(), std::vector<std::string>{});
  EXPECT_EQ(log_->count(spdlog::level::info,
                        {fmt::format("vm.remove keep requested by pid {}, uid 0, gid 0 (gpupd_unittest)", ::getpid())}),
            1u);
  EXPECT_EQ(log_->count(spdlog::level::info, {"vm.list", "requested by"}), 0u) << "reading changes nothing";
}

TEST_F(GpupdOperatorSocket, AdminGroupMembersAreLetIn) {
  // Ids the host does not know: the group exists only in this config, so /etc/group stays as it is.
  const gid_t admin = unused_gid(3990000);
  const gid_t other = unused_gid(admin + 1);
  const uid_t user = unused_uid(3990000);
  Config c = config();
  c.admin_group = "gpup-ut";
  c.admin_gid = admin;
  ASSERT_NO_FATAL_FAILURE(start(c));
  struct stat st {};
  ASSERT_EQ(::stat(sock().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_EQ(st.st_uid, 0u);
  EXPECT_EQ(st.st_gid, admin);

  // A member by a supplementary group.
  const Ids member{user, other, {admin}};
  std::string listed = call_as(member, json{{"op", "vm.list"}});
  auto reply = control::parse_object_line(listed.substr(0, listed.find('\n')));
  ASSERT_TRUE(reply.ok()) << listed;
  EXPECT_EQ((*reply)["ok"], true) << listed;
  ASSERT_EQ((*reply)["result"].size(), 1u) << listed;
  EXPECT_EQ((*reply)["result"][0]["name"], "keep");
  // A member by its gid.
  std::string status = call_as(Ids{user, admin, {}}, json{{"op", "status"}});
  EXPECT_EQ(status.rfind("{\"ok\":true,", 0), 0u) << status;

  // Anyone else: kept out by the file mode and, past it, by gpupd.
  const Ids outsider{user, other, {}};
  EXPECT_EQ(call_as(outsider, json{{"op", "status"}}), "connect: Permission denied");
  ASSERT_EQ(::chmod(sock().c_str(), 0666), 0);
  EXPECT_EQ(call_as(outsider, json{{"op", "vm.remove"}, {"name", "keep"}}, true),
            refusal_line(fmt::format("permission denied: uid {} is not root and not in the admin group gpup-ut", user)) +
                "<eof>");
  EXPECT_EQ(vm_names(), std::vector<std::string>{"keep"});

  // A member's change goes through, logged with who asked.
  pid_t pid = 0;
  std::string removed = call_as(member, json{{"op", "vm.remove"}, {"name", "keep"}}, false, &pid);
  EXPECT_EQ(removed, "{\"ok\":true,\"result\":{\"removed\":\"keep\"}}\n");
  EXPECT_EQ(vm_names(), std::vector<std::string>{});
  EXPECT_EQ(log_->count(spdlog::level::info, {fmt::format("vm.remove keep requested by pid {}, uid {}, gid {} "
                                                          "(gpupd_unittest)",
                                                          pid, user, other)}),
            1u);
}

}  // namespace
}  // namespace gpup::gpupd
