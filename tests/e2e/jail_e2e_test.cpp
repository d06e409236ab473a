// The worker jail, proven by attack. On PoCL's CPU device a guest's kernel is native code in its
// partition's worker (gpup-vmwp), and OpenCL C there takes inline assembly: cl_attack_guest's
// kernels make raw system calls from inside the worker. Each test runs one attack as the guest of
// partition `attacker` and asserts that its EFFECT did not happen — a file on the host, a secret
// obtained, a process left running, a signal delivered, another partition's memory or endpoint
// reached, gpupd's partitions changed, a cgroup limit or sysctl moved, a kernel cache poisoned —
// not merely that a call returned an error. Two more check that a local user other than the
// host's may neither use a partition nor manage them.
//
// The attacks are real. Their targets are files and directories named with a random tag (removed
// when an attack succeeds), this suite's own gpupd and workers (checked to be ours before any
// signal or write), the attacker worker's own memory cgroup limits and
// /proc/sys/kernel/domainname (both restored at once if they moved). A host of its own (ctest:
// e2e_jail); a test whose attack took the host down (today: most of them) gets it back in the
// next SetUp.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "e2e_host.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using gpup::e2e::Child;
using gpup::e2e::Host;
using gpup::e2e::Run;
using json = nlohmann::json;

// A long TDR delay: an attack that waits on a socket must not be reset for slowness. Workers that
// an attack crashes never retire the partition.
const char* kJailConfig = R"TOML(
tdr_delay_ms = 10000
tdr_limit_count = 1000
[[adapter]]
name = "pocl0"
kmd = "opencl"
)TOML";

constexpr int kNobody = 65534;

// A name no one else uses: every file and process an attack may create carries it.
std::string unique_tag() {
  std::random_device rd;
  std::ostringstream s;
  s << "gpup-jail-probe-" << getpid() << "-" << std::hex << rd() << rd();
  return s.str();
}

bool exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

std::string read_trimmed(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string hex(const std::string& bytes) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (unsigned char c : bytes) {
    s += d[c >> 4];
    s += d[c & 15];
  }
  return s;
}

// cl_attack_guest's hash of what a read attack got (it prints no more than 8 bytes of it).
uint64_t fnv1a64(const std::string& bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// "RESULT name=value" of cl_attack_guest; nothing when the attack did not get that far.
std::optional<long long> result(const std::string& out, const std::string& name) {
  auto p = out.find("RESULT " + name + "=");
  if (p == std::string::npos) return std::nullopt;
  return std::stoll(out.substr(p + 8 + name.size()));
}

// The rest of the line after `key` ("DATA ", "REPLY ", "ADDR ").
std::string field(const std::string& out, const std::string& key) {
  auto p = out.find("\n" + key);
  if (p == std::string::npos) return {};
  p += 1 + key.size();
  return out.substr(p, out.find('\n', p) - p);
}

std::string cmdline(pid_t pid) {
  std::string s = slurp("/proc/" + std::to_string(pid) + "/cmdline");
  std::replace(s.begin(), s.end(), '\0', ' ');
  return s;
}

// Live (not zombie) processes whose command line contains `token`.
std::vector<pid_t> processes_with(const std::string& token) {
  std::vector<pid_t> found;
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::string name = e.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    pid_t pid = std::stoi(name);
    if (pid != getpid() && cmdline(pid).find(token) != std::string::npos) found.push_back(pid);
  }
  return found;
}

std::string proc_status(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(key, 0) == 0) {
      auto v = line.substr(key.size());
      return v.substr(std::min(v.size(), v.find_first_not_of(" \t")));
    }
  return {};
}

bool alive(pid_t pid) {
  if (pid <= 0 || kill(pid, 0) != 0) return false;
  auto state = proc_status(pid, "State:");
  return !state.empty() && state[0] != 'Z';
}

json json_of(const Run& r) {
  auto j = json::parse(r.out, nullptr, false);
  return j.is_discarded() ? json::object() : j;
}

// A worker's field of `vm show --json`: at the top level today, under "worker" if it moves there.
json worker_field(const json& vm, const std::string& key) {
  if (vm.contains("worker") && vm["worker"].is_object() && vm["worker"].contains(key)) return vm["worker"][key];
  return vm.contains(key) ? vm[key] : json();
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Whether a refusal says what it is, rather than failing for some unrelated reason.
bool says_refused(const std::string& out) {
  const std::string l = lower(out);
  for (const char* w : {"denied", "refused", "not allowed", "permission", "eacces", "eperm", "access"})
    if (l.find(w) != std::string::npos) return true;
  return false;
}

// Runs `undo` when the scope ends, however it ends (an ASSERT included).
struct Cleanup {
  std::function<void()> undo;
  ~Cleanup() {
    if (undo) undo();
  }
};

// Writes a new file `name` in dir as uid (and the gid of the same number), from a child process
// that opens dir as root first (another process's /proc/PID/root takes root's ptrace access).
bool write_as(uid_t uid, const std::string& dir, const std::string& name, const std::string& text) {
  const pid_t pid = fork();
  if (pid == 0) {
    const int dfd = open(dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) _exit(1);
    if (setgroups(0, nullptr) != 0 || setgid(uid) != 0 || setuid(uid) != 0) _exit(2);
    const int fd = openat(dfd, name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) _exit(3);
    const bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    close(fd);
    _exit(ok ? 0 : 4);
  }
  int status = 0;
  return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Whether uid can execute every one of paths (a tree inside a directory only root may search,
// such as a checkout made with mktemp -d, is out of another user's reach).
bool can_execute_as(uid_t uid, std::initializer_list<const char*> paths) {
  const pid_t pid = fork();
  if (pid == 0) {
    if (setgroups(0, nullptr) != 0 || setgid(uid) != 0 || setuid(uid) != 0) _exit(2);
    for (const char* p : paths)
      if (access(p, X_OK) != 0) _exit(1);
    _exit(0);
  }
  int status = 0;
  return pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Removes `path` if an attack created it; says whether it existed.
bool remove_if_created(const std::string& path) {
  if (!exists(path)) return false;
  std::error_code ec;
  fs::remove(path, ec);
  return true;
}

class JailE2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    host_ = new Host(kJailConfig);
    // gpupd creates a real runtime directory (/run/gpup) 0755; mkdtemp made this one 0700. Opened
    // the same way, only the endpoints' own checks stand between another local user and them.
    chmod(host_->dir().c_str(), 0755);
    auto r = host_->gpup({"host", "start", "--config", host_->config()});
    ASSERT_EQ(r.code, 0) << r.out;
    for (const char* vm : {"attacker", "victim"}) {
      r = host_->gpup({"vm", "add", vm, "--max-vram", "256MiB"});
      ASSERT_EQ(r.code, 0) << r.out;
    }
  }
  static void TearDownTestSuite() {
    // A gpupd an attack killed leaves its workers' cgroups behind; the next gpupd's start removes
    // them, so start one before the last stop.
    if (host_ && host_->gpup({"host", "status"}).code != 0) restart_host();
    delete host_;
    host_ = nullptr;
  }
  void SetUp() override {
    if (!host_) GTEST_SKIP() << "host did not start";
    ensure_host();
  }

  // After an attack that succeeded (gpupd killed, a partition removed), the host as the suite
  // expects it: gpupd running, both partitions there and running.
  static void ensure_host() {
    if (host_->gpup({"host", "status"}).code != 0) {
      std::cout << "[ recover  ] gpupd is gone; starting it again\n";
      auto r = restart_host();
      ASSERT_EQ(r.code, 0) << r.out;
    }
    for (const char* vm : {"attacker", "victim"}) {
      auto r = host_->gpup({"vm", "show", vm, "--json"});
      if (r.code != 0) {
        std::cout << "[ recover  ] partition " << vm << " is gone; adding it again\n";
        r = host_->gpup({"vm", "add", vm, "--max-vram", "256MiB"});
        ASSERT_EQ(r.code, 0) << r.out;
      }
      auto j = wait_running(vm);
      ASSERT_EQ(j.value("state", ""), "running") << j.dump();
    }
  }
  // Starts gpupd again once the last one has fully gone (reaped, not a zombie): the new one's
  // start then removes the cgroups the old one left.
  static gpup::e2e::Run restart_host() {
    const pid_t old = gpupd_pid();
    for (int i = 0; i < 100 && old > 0 && exists("/proc/" + std::to_string(old)); ++i) std::this_thread::sleep_for(100ms);
    return host_->gpup({"host", "start", "--config", host_->config()});
  }
  static json show(const std::string& vm) { return json_of(host_->gpup({"vm", "show", vm, "--json"})); }
  static json wait_running(const std::string& vm) {
    json j;
    for (int i = 0; i < 300; ++i) {
      j = show(vm);
      if (j.value("state", "") == "running" && worker_field(j, "pid").is_number()) break;
      std::this_thread::sleep_for(100ms);
    }
    return j;
  }
  static pid_t gpupd_pid() {
    const std::string s = read_trimmed(host_->runtime_dir() + "/gpupd.pid");
    return s.empty() ? -1 : std::stoi(s);
  }
  // This suite's gpupd: the pid file's process, started on this host's runtime directory.
  static pid_t our_gpupd() {
    const pid_t pid = gpupd_pid();
    if (pid <= 0 || cmdline(pid).find("--runtime-dir " + host_->runtime_dir()) == std::string::npos) return -1;
    return pid;
  }
  // Whether `pid` descends from this suite's gpupd (a jail may put a process between them).
  static bool descends_from_gpupd(pid_t pid) {
    const pid_t gpupd = our_gpupd();
    for (int depth = 0; gpupd > 0 && pid > 1 && depth < 8; ++depth) {
      const std::string parent = proc_status(pid, "PPid:");
      if (parent.empty()) return false;
      if ((pid = std::stoi(parent)) == gpupd) return true;
    }
    return false;
  }
  // The process that runs `vm`'s kernels, as the host sees it: the gpup-vmwp of that VM below
  // this suite's gpupd, else the pid gpupd reports if it descends from gpupd; -1 when neither.
  static pid_t our_worker(const std::string& vm) {
    for (pid_t p : processes_with("--vm " + vm + " "))
      if (cmdline(p).find("gpup-vmwp") != std::string::npos && descends_from_gpupd(p)) return p;
    const json pid = worker_field(show(vm), "pid");
    return pid.is_number() && descends_from_gpupd(pid.get<pid_t>()) ? pid.get<pid_t>() : -1;
  }
  static bool listed(const std::string& vm) {
    for (const auto& v : json_of(host_->gpup({"vm", "list", "--json"})))
      if (v.value("name", "") == vm) return true;
    return false;
  }

  // One attack from partition `attacker`. Its output goes to the log: what the kernel's system
  // calls returned is the evidence a report needs.
  static gpup::e2e::Run attack(const std::vector<std::string>& args) {
    auto c = host_->guest("attacker", args, {}, GPUP_CL_ATTACK);
    const int code = c->wait(120s);
    std::cout << "[ attack   ] " << args[0] << " (exit " << code << ")\n";
    std::istringstream lines(c->output());
    for (std::string l; std::getline(lines, l);) std::cout << "[          ]   " << l.substr(0, 300) << "\n";
    return {code, c->output()};
  }
  // The attack got as far as running kernels in the attacker's worker: otherwise a pass would
  // only say the program broke.
  static void expect_kernels_ran(const gpup::e2e::Run& r) {
    EXPECT_NE(r.out.find("WORKER pid="), std::string::npos) << "no kernel ran, so nothing was tested:\n" << r.out;
  }

  static Host* host_;
};
Host* JailE2E::host_ = nullptr;

// A kernel creating files where the host keeps its configuration and root's home.
TEST_F(JailE2E, KernelCannotWriteHostFiles) {
  const std::string tag = unique_tag();
  for (const std::string dir : {"/etc", "/root"}) {
    const std::string path = dir + "/" + tag;
    Cleanup undo{[&] { remove_if_created(path); }};
    auto r = attack({"write-file", path});
    expect_kernels_ran(r);
    EXPECT_FALSE(exists(path)) << path << " was created on the host from a guest kernel:\n" << r.out;
  }
}

// A kernel reading /etc/shadow: not a byte of the host's file may come back.
TEST_F(JailE2E, KernelCannotReadHostSecrets) {
  const std::string shadow = slurp("/etc/shadow");
  if (shadow.empty()) GTEST_SKIP() << "no /etc/shadow on this host";
  auto r = attack({"read-file", "/etc/shadow", "4096"});
  expect_kernels_ran(r);
  const long long n = result(r.out, "read").value_or(-1);
  const std::string prefix = n > 0 ? shadow.substr(0, static_cast<size_t>(n)) : std::string();
  char want[17];
  std::snprintf(want, sizeof want, "%016llx", static_cast<unsigned long long>(fnv1a64(prefix)));
  const bool obtained = n > 0 && field(r.out, "DATA ") == hex(prefix.substr(0, 8)) && field(r.out, "DATA-FNV1A64 ") == want;
  EXPECT_FALSE(obtained) << "a guest kernel read " << n << " bytes of the host's /etc/shadow:\n" << r.out;
}

// Another partition's worker memory through /proc/PID/mem: the victim's buffer stays as it was.
TEST_F(JailE2E, KernelCannotWriteAnotherPartitionsMemory) {
  auto victim = host_->guest("victim", {"hold", "victim-data", "90"}, {}, GPUP_CL_ATTACK);
  ASSERT_TRUE(victim->wait_for("HOLDING", 90s)) << victim->output();
  const std::string addr = field(victim->output(), "ADDR ");
  ASSERT_FALSE(addr.empty()) << victim->output();
  const pid_t worker = our_worker("victim");
  ASSERT_GT(worker, 0) << "the victim's worker is not this host's";
  auto r = attack({"proc-mem", std::to_string(worker), addr, hex("owned-by-attacker")});
  expect_kernels_ran(r);
  victim->close_stdin();
  victim->wait(60s);
  EXPECT_NE(victim->output().find("INTACT 1"), std::string::npos)
      << "the victim's buffer changed under another partition's kernel:\n" << victim->output() << "\nattacker:\n" << r.out;
}

// The victim's VRD endpoint: no connection, or, if one is made, no channel (the channel-layer
// handshake's answer, "GPCW" with status 0, must not come back).
TEST_F(JailE2E, KernelCannotOpenAChannelToAnotherPartition) {
  const std::string endpoint = show("victim").value("endpoint", "");
  ASSERT_FALSE(endpoint.empty());
  // Hello: magic "GPCH", channel version 1, transport 2 (stream), ring_bytes 0, reserved 0.
  auto r = attack({"connect", endpoint, "hex:47504348010002000000000000000000"});
  expect_kernels_ran(r);
  const std::string reply = field(r.out, "REPLY ");
  const bool channel = reply.size() >= 48 && reply.substr(0, 8) == "47504357" && reply.substr(16, 8) == "00000000";
  EXPECT_FALSE(channel) << "a guest kernel got a channel to the victim's worker (" << endpoint << "):\n" << r.out;
}

// gpupd's operator socket: a kernel asking gpupd to remove another partition changes nothing.
TEST_F(JailE2E, KernelCannotReachGpupdsControlSocket) {
  ASSERT_TRUE(listed("victim"));
  const std::string request = R"({"op":"vm.remove","name":"victim"})" "\n";
  auto r = attack({"connect", host_->runtime_dir() + "/gpupd.sock", request});
  expect_kernels_ran(r);
  EXPECT_TRUE(listed("victim")) << "a guest kernel removed partition victim through gpupd.sock:\n" << r.out;
}

// The worker's own memory cgroup: its limits, read by the host, do not move. Raised by 1 GiB each;
// on cgroup v1 the memory+swap limit first, since the kernel keeps it at or above the memory one.
TEST_F(JailE2E, KernelCannotRaiseItsMemoryCgroupLimit) {
  const json mem = worker_field(show("attacker"), "memory_limit");
  if (!mem.is_object() || !mem.value("enforced", false))
    GTEST_SKIP() << "no memory cgroup on this host: " << mem.dump();
  const std::string cgroup = mem.value("cgroup", "");
  const bool v2 = mem.value("hierarchy", "") == "cgroup v2";
  std::vector<std::string> files;
  for (const char* f : v2 ? std::vector<const char*>{"memory.max", "memory.swap.max"}
                          : std::vector<const char*>{"memory.memsw.limit_in_bytes", "memory.limit_in_bytes"})
    if (exists(cgroup + "/" + f)) files.push_back(cgroup + "/" + f);
  std::vector<std::string> before, args = {"cgroup-write"};
  for (const auto& f : files) {
    before.push_back(read_trimmed(f));
    const bool number = !before.back().empty() && std::isdigit(static_cast<unsigned char>(before.back()[0]));
    args.push_back(f);
    args.push_back(number ? std::to_string(std::stoull(before.back()) + (1ull << 30)) : "max");
  }
  ASSERT_FALSE(files.empty()) << cgroup;
  Cleanup undo{[&] {  // in reverse: the memory limit back down before memory+swap
    for (size_t i = files.size(); i-- > 0;)
      if (read_trimmed(files[i]) != before[i]) std::ofstream(files[i]) << before[i];
  }};
  auto r = attack(args);
  expect_kernels_ran(r);
  for (size_t i = 0; i < files.size(); ++i)
    EXPECT_EQ(read_trimmed(files[i]), before[i]) << "a guest kernel moved its worker's " << files[i] << ":\n" << r.out;
}

// A sysctl (/proc/sys/kernel/domainname: harmless, and restored at once if the attack moves it).
TEST_F(JailE2E, KernelCannotChangeASysctl) {
  const std::string path = "/proc/sys/kernel/domainname";
  const std::string before = read_trimmed(path);
  ASSERT_FALSE(before.empty());
  // Where the host itself cannot write it (/proc/sys mounted read-only), a refusal proves nothing.
  if (access(path.c_str(), W_OK) != 0) GTEST_SKIP() << path << " is not writable on this host";
  Cleanup undo{[&] {
    if (read_trimmed(path) != before) std::ofstream(path) << before;
  }};
  auto r = attack({"sysctl-write", path, unique_tag()});
  expect_kernels_ran(r);
  EXPECT_EQ(read_trimmed(path), before) << "a guest kernel changed the host's " << path << ":\n" << r.out;
}

// PoCL's kernel caches on the host (gpupd's $POCL_CACHE_DIR, and root's default one): a file
// there is code every process using the cache may dlopen. The attack makes missing directories
// first, so a cache directory planted where there was none counts as poisoning too.
TEST_F(JailE2E, KernelCannotPoisonTheHostsKernelCaches) {
  const std::string tag = unique_tag();
  std::vector<std::string> paths, missing;  // missing: directories absent before, deepest first
  for (const auto& dir : std::vector<std::string>{host_->env().at("POCL_CACHE_DIR"), "/root/.cache/pocl/kcache"}) {
    paths.push_back(dir + "/" + tag);
    for (fs::path p = dir; p != p.root_path() && !exists(p.string()); p = p.parent_path()) missing.push_back(p.string());
  }
  Cleanup undo{[&] {  // what the attack made; a directory only while empty (PoCL may use it now)
    for (const auto& p : paths) remove_if_created(p);
    for (const auto& d : missing) rmdir(d.c_str());
  }};
  std::vector<std::string> args = {"cache-poison"};
  args.insert(args.end(), paths.begin(), paths.end());
  auto r = attack(args);
  expect_kernels_ran(r);
  for (const auto& p : paths) EXPECT_FALSE(exists(p)) << p << " was created from a guest kernel:\n" << r.out;
  for (const auto& d : missing) EXPECT_FALSE(exists(d)) << d << " was created from a guest kernel:\n" << r.out;
}

// A program binary built natively on the host's PoCL (so it carries native code), whose kernel
// writes a host file, loaded with clCreateProgramWithBinary. Refused outright is as good as
// harmless; a file on the host is not.
TEST_F(JailE2E, NativeProgramBinaryCannotWriteHostFiles) {
  const std::string tag = unique_tag();
  // In the build directory: the guest's sandbox sees the host's files (read-only) but its own /tmp.
  const std::string bin = std::string(GPUP_BUILD_DIR) + "/" + tag + ".bin";
  const std::string native_cache = host_->dir() + "/native-pocl-cache";
  const std::string path = "/etc/" + tag + "-binary";
  Cleanup undo{[&] {
    std::error_code ec;
    fs::remove(bin, ec);
    fs::remove_all(native_cache, ec);
    remove_if_created(path);
  }};
  Child native({GPUP_CL_ATTACK, "make-binary", bin}, {{"POCL_CACHE_DIR", native_cache}});
  ASSERT_EQ(native.wait(120s), 0) << native.output();
  auto r = attack({"binary-write-file", bin, path});
  EXPECT_NE(r.out.find("RESULT create_with_binary="), std::string::npos) << r.out;
  EXPECT_FALSE(exists(path)) << path << " was created by a kernel loaded from a native binary:\n" << r.out;
}

// The environment that points the thunk library straight at partition vm's endpoint and the ICD
// at its driver store (no sandbox between): empty when vm shows no endpoint.
std::map<std::string, std::string> direct_env(const json& vm) {
  const std::string endpoint = vm.value("endpoint", ""), store = vm.value("driver_store", "");
  if (endpoint.empty()) return {};
  return {{"GPUP_VRD", "unix:" + endpoint}, {"OCL_ICD_VENDORS", store + "/OpenCL/vendors"}, {"GPUP_OCL_DEBUG", "1"}};
}

// A local user other than the host's (uid 65534) reaching a partition: directly through its
// endpoint with the thunk library, and through `gpup run --no-sandbox`. Refused with a clear
// error, and no kernel runs (the write-file kernel would leave its file).
TEST_F(JailE2E, OtherLocalUserCannotUseAPartition) {
  if (!can_execute_as(kNobody, {GPUP_CLI, GPUP_CL_ATTACK}))
    GTEST_SKIP() << "user nobody cannot reach this build tree (a directory above it is closed to other users)";
  const auto direct = direct_env(show("victim"));
  ASSERT_FALSE(direct.empty());
  // Control: the host's own user gets a kernel run this way, so a refusal below is the user's.
  Child control({GPUP_CL_ATTACK, "read-file", "/dev/null", "16"}, direct);
  control.wait(120s);
  ASSERT_NE(control.output().find("WORKER pid="), std::string::npos) << control.output();

  const std::string tag = unique_tag();
  const std::string path1 = "/tmp/" + tag + "-direct", path2 = "/tmp/" + tag + "-cli";
  Cleanup undo{[&] {
    remove_if_created(path1);
    remove_if_created(path2);
  }};
  Child as_nobody({GPUP_CL_ATTACK, "write-file", path1}, direct, kNobody);
  const int code = as_nobody.wait(120s);
  std::cout << "[ nobody   ] direct (exit " << code << "): " << as_nobody.output() << "\n";
  EXPECT_FALSE(exists(path1)) << "uid 65534 ran a kernel in partition victim:\n" << as_nobody.output();
  EXPECT_EQ(as_nobody.output().find("WORKER pid="), std::string::npos) << as_nobody.output();
  EXPECT_TRUE(says_refused(as_nobody.output())) << "no clear refusal:\n" << as_nobody.output();

  auto env = host_->env();
  env["GPUP_OCL_DEBUG"] = "1";
  Child cli({GPUP_CLI, "run", "--no-sandbox", "--vm", "victim", "--", GPUP_CL_ATTACK, "write-file", path2}, env, kNobody);
  const int cli_code = cli.wait(120s);
  std::cout << "[ nobody   ] gpup run (exit " << cli_code << "): " << cli.output() << "\n";
  EXPECT_NE(cli_code, 0) << cli.output();
  EXPECT_FALSE(exists(path2)) << "uid 65534 ran a kernel in partition victim through gpup run:\n" << cli.output();
  EXPECT_EQ(cli.output().find("WORKER pid="), std::string::npos) << cli.output();
  EXPECT_TRUE(says_refused(cli.output())) << "no clear refusal:\n" << cli.output();
}

// The operator allows that user: its kernel runs; revoked, it is refused again at once.
TEST_F(JailE2E, AllowedLocalUserRunsUntilRevoked) {
  if (!can_execute_as(kNobody, {GPUP_CLI, GPUP_CL_ATTACK}))
    GTEST_SKIP() << "user nobody cannot reach this build tree (a directory above it is closed to other users)";
  const auto direct = direct_env(show("victim"));
  ASSERT_FALSE(direct.empty());
  Cleanup undo{[&] { host_->gpup({"vm", "set", "victim", "--allow-user", "none"}); }};
  auto set = host_->gpup({"vm", "set", "victim", "--allow-user", std::to_string(kNobody)});
  ASSERT_EQ(set.code, 0) << set.out;
  Child allowed({GPUP_CL_ATTACK, "read-file", "/dev/null", "16"}, direct, kNobody);
  allowed.wait(120s);
  EXPECT_NE(allowed.output().find("WORKER pid="), std::string::npos) << "an allowed user was refused:\n"
                                                                       << allowed.output();
  auto revoke = host_->gpup({"vm", "set", "victim", "--allow-user", "none"});
  ASSERT_EQ(revoke.code, 0) << revoke.out;
  Child refused({GPUP_CL_ATTACK, "read-file", "/dev/null", "16"}, direct, kNobody);
  refused.wait(120s);
  EXPECT_EQ(refused.output().find("WORKER pid="), std::string::npos) << "a revoked user ran a kernel:\n"
                                                                       << refused.output();
  EXPECT_TRUE(says_refused(refused.output())) << refused.output();
}

// The same user asking gpupd to remove a partition.
TEST_F(JailE2E, OtherLocalUserCannotManagePartitions) {
  if (!can_execute_as(kNobody, {GPUP_CLI, GPUP_CL_ATTACK}))
    GTEST_SKIP() << "user nobody cannot reach this build tree (a directory above it is closed to other users)";
  Child c({GPUP_CLI, "vm", "remove", "victim"}, host_->env(), kNobody);
  const int code = c.wait(60s);
  std::cout << "[ nobody   ] vm remove victim (exit " << code << "): " << c.output() << "\n";
  EXPECT_NE(code, 0) << c.output();
  EXPECT_TRUE(says_refused(c.output())) << "no clear refusal:\n" << c.output();
  EXPECT_TRUE(listed("victim")) << "uid 65534 removed partition victim:\n" << c.output();
}

// A kernel starting a program: it must not touch the host's files, nor leave a process behind
// once its guest has ended, nor once the host has stopped.
TEST_F(JailE2E, KernelStartedProcessesDoNotTouchTheHostOrSurvive) {
  const std::string tag = unique_tag();
  const std::string marker = "/tmp/" + tag;
  // The tag in sh's command line is how this test finds (and ends) what the attack started.
  const std::string script = "touch " + marker + "; while :; do sleep 1; done # " + tag;
  // A process left in the attacker worker's cgroups keeps gpupd from removing them when it stops:
  // once it is gone, the test removes them (rmdir: only empty ones), and their gpupd.<pid> parent
  // if that gpupd is gone too.
  std::vector<std::string> cgroups;
  const json attacker = show("attacker");
  for (const char* key : {"memory_limit", "cpu_limit"}) {
    const json c = worker_field(attacker, key);
    if (c.is_object() && c.value("enforced", false)) cgroups.push_back(c.value("cgroup", ""));
  }
  Cleanup undo{[&] {
    for (int i = 0; i < 50 && !processes_with(tag).empty(); ++i) {
      for (pid_t p : processes_with(tag)) kill(p, SIGKILL);
      std::this_thread::sleep_for(100ms);
    }
    remove_if_created(marker);
    const bool host_down = host_->gpup({"host", "status"}).code != 0;
    for (const auto& c : cgroups) {
      if (c.empty()) continue;
      for (int i = 0; i < 20 && exists(c) && rmdir(c.c_str()) != 0; ++i) std::this_thread::sleep_for(100ms);
      const std::string parent = fs::path(c).parent_path().string();
      if (host_down && fs::path(parent).filename().string().rfind("gpupd.", 0) == 0) rmdir(parent.c_str());
    }
  }};
  auto r = attack({"exec", "/bin/sh", "-c", script});
  expect_kernels_ran(r);
  std::this_thread::sleep_for(2s);
  EXPECT_FALSE(exists(marker)) << "a process started by a guest kernel wrote " << marker << ":\n" << r.out;
  auto left = processes_with(tag);
  EXPECT_TRUE(left.empty()) << left.size() << " process(es) started by a guest kernel outlived the guest, e.g. pid "
                            << (left.empty() ? 0 : left[0]) << ": " << (left.empty() ? "" : cmdline(left[0]));
  auto stop = host_->gpup({"host", "stop"});
  EXPECT_EQ(stop.code, 0) << stop.out;
  std::this_thread::sleep_for(1s);
  left = processes_with(tag);
  EXPECT_TRUE(left.empty()) << left.size() << " process(es) started by a guest kernel outlived the host, e.g. pid "
                            << (left.empty() ? 0 : left[0]) << ": " << (left.empty() ? "" : cmdline(left[0]));
}

// Signals: SIGKILL to another partition's worker and to gpupd. Both keep their pid, and the
// victim's worker was not restarted.
TEST_F(JailE2E, KernelCannotSignalGpupdOrAnotherPartition) {
  const pid_t gpupd = our_gpupd();
  ASSERT_GT(gpupd, 0) << "gpupd of this host not found";
  const pid_t worker = our_worker("victim");
  ASSERT_GT(worker, 0) << "the victim's worker is not this host's";
  const json before = show("victim");
  ASSERT_TRUE(worker_field(before, "restarts").is_number()) << before.dump();

  auto r = attack({"kill", std::to_string(worker), std::to_string(SIGKILL)});
  expect_kernels_ran(r);
  std::this_thread::sleep_for(1500ms);  // gpupd notices a dead worker and restarts it at once
  const json after = wait_running("victim");
  EXPECT_TRUE(alive(worker)) << "the victim's worker " << worker << " died:\n" << r.out;
  EXPECT_EQ(worker_field(after, "pid"), worker_field(before, "pid")) << after.dump();
  EXPECT_EQ(worker_field(after, "restarts"), worker_field(before, "restarts")) << after.dump();

  r = attack({"kill", std::to_string(gpupd), std::to_string(SIGKILL)});
  expect_kernels_ran(r);
  std::this_thread::sleep_for(500ms);
  EXPECT_TRUE(alive(gpupd)) << "gpupd " << gpupd << " died:\n" << r.out;
  EXPECT_EQ(gpupd_pid(), gpupd);
  EXPECT_EQ(host_->gpup({"host", "status"}).code, 0);
}

// A device program whose build would take minutes, in a partition whose builds may take 3 s: the
// build is stopped by resetting that partition only. Its guest's clBuildProgram fails with a log
// that says why, the partition comes back with a new worker whose scratch and kernel cache hold
// nothing of the old build, and the other partition's worker and data are untouched.
TEST_F(JailE2E, BuildPastTheTimeoutResetsOnlyItsPartition) {
  // Room for the compiler's memory while it runs (the build, not the memory limit, must stop it).
  auto r = host_->gpup({"vm", "set", "attacker", "--build-timeout", "3", "--max-vram", "1GiB"});
  ASSERT_EQ(r.code, 0) << r.out;
  Cleanup restore{[] { host_->gpup({"vm", "set", "attacker", "--build-timeout", "300", "--max-vram", "256MiB"}); }};
  EXPECT_EQ(show("attacker").value("build_timeout_s", 0), 3);

  auto victim = host_->guest("victim", {"hold", "victim-data", "120"}, {}, GPUP_CL_ATTACK);
  ASSERT_TRUE(victim->wait_for("HOLDING", 90s)) << victim->output();
  const pid_t victim_worker = our_worker("victim");
  ASSERT_GT(victim_worker, 0);
  const json attacker_before = show("attacker");
  const pid_t old_worker = our_worker("attacker");
  ASSERT_GT(old_worker, 0);
  const uint64_t resets_before = attacker_before["resets"].value("total", uint64_t{0});
  // Files standing for what the build leaves in the worker's scratch and kernel cache, written as
  // the worker's own uid (the jail's mounts take no file of an id they do not map, root's included).
  const json jail_uid = worker_field(attacker_before, "jail")["uid"];
  ASSERT_TRUE(jail_uid.is_number_unsigned()) << attacker_before.dump();
  const std::string marker = "gpup-build-leftover-" + unique_tag();
  for (const char* dir : {"/tmp/", "/cache/"}) {
    const std::string where = "/proc/" + std::to_string(old_worker) + "/root" + dir;
    ASSERT_TRUE(write_as(jail_uid.get<uid_t>(), where, marker, "partial build output\n")) << "cannot plant " << where << marker;
    ASSERT_TRUE(exists(where + marker));
  }

  const auto t0 = std::chrono::steady_clock::now();
  r = attack({"heavy-build", "20"});
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_NE(r.out.find("BUILDING depth=20"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("RESULT build=-11 "), std::string::npos) << "expected CL_BUILD_PROGRAM_FAILURE:\n" << r.out;
  EXPECT_NE(r.out.find("build timeout of 3 s"), std::string::npos) << "the build log does not say why:\n" << r.out;
  EXPECT_GE(took, 3s);
  EXPECT_LT(took, 60s) << "the build was not stopped near its 3 s timeout";

  // gpupd sees the old worker end and starts a new one.
  json after;
  for (int i = 0; i < 300; ++i) {
    after = wait_running("attacker");
    if (after["resets"].value("total", uint64_t{0}) > resets_before && worker_field(after, "pid") != worker_field(attacker_before, "pid"))
      break;
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(after.value("state", ""), "running") << after.dump();
  EXPECT_EQ(after["resets"].value("total", uint64_t{0}), resets_before + 1) << after.dump();
  EXPECT_NE(after["resets"].value("last", "").find("program build"), std::string::npos) << after.dump();
  EXPECT_FALSE(alive(old_worker)) << "the worker that ran the build is still there";
  const pid_t new_worker = our_worker("attacker");
  ASSERT_GT(new_worker, 0);
  EXPECT_NE(new_worker, old_worker);
  // The new worker's scratch and kernel cache are new: what the old one's held is gone.
  for (const char* dir : {"/tmp/", "/cache/"}) {
    const std::string root = "/proc/" + std::to_string(new_worker) + "/root" + dir;
    EXPECT_TRUE(fs::is_directory(root)) << root;
    EXPECT_FALSE(exists(root + marker)) << dir << marker << " outlived the worker that was reset";
  }

  // The partition builds again.
  ASSERT_EQ(host_->gpup({"vm", "set", "attacker", "--build-timeout", "300"}).code, 0);
  r = attack({"heavy-build", "0"});
  EXPECT_NE(r.out.find("RESULT build=0 "), std::string::npos) << r.out;

  victim->close_stdin();
  victim->wait(60s);
  EXPECT_NE(victim->output().find("INTACT 1"), std::string::npos) << victim->output();
  EXPECT_TRUE(alive(victim_worker)) << "the other partition's worker was reset too";
  EXPECT_EQ(our_worker("victim"), victim_worker);
}

}  // namespace
