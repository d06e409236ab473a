#include "host/gpupd/cgroup.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "host/control/protocol.h"

namespace gpup::gpupd {

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::vector<std::string> split(std::string_view s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    size_t p = s.find(sep, start);
    out.emplace_back(s.substr(start, p == std::string_view::npos ? std::string_view::npos : p - start));
    if (p == std::string_view::npos) return out;
    start = p + 1;
  }
}

bool has_word(std::string_view list, std::string_view word) {
  std::istringstream in{std::string(list)};
  std::string w;
  while (in >> w)
    if (w == word) return true;
  return false;
}

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      int v = 0;
      bool ok = true;
      for (size_t k = 1; k <= 3; ++k) {
        char c = s[i + k];
        ok = ok && c >= '0' && c <= '7';
        v = v * 8 + (c - '0');
      }
      if (ok) {
        out.push_back(static_cast<char>(v));
        i += 3;
        continue;
      }
    }
    out.push_back(s[i]);
  }
  return out;
}

struct Mount {
  std::string root;   // the path inside the hierarchy that is mounted
  std::string point;  // where
};

// The first cgroup2 mount, and the first v1 mount carrying the controller (possibly with others).
void find_mounts(const std::string& mountinfo, std::string_view controller, Mount* v2, Mount* v1) {
  std::istringstream in(mountinfo);
  std::string line;
  while (std::getline(in, line)) {
    auto dash = line.find(" - ");
    if (dash == std::string::npos) continue;
    std::istringstream pre(line.substr(0, dash));
    std::string id, parent, dev, root, point;
    if (!(pre >> id >> parent >> dev >> root >> point)) continue;
    std::istringstream post(line.substr(dash + 3));
    std::string fstype, source, superopts;
    if (!(post >> fstype >> source >> superopts)) continue;
    if (fstype == "cgroup2" && v2->point.empty()) {
      *v2 = Mount{unescape(root), unescape(point)};
    } else if (fstype == "cgroup" && v1->point.empty()) {
      for (const auto& opt : split(superopts, ','))
        if (opt == controller) *v1 = Mount{unescape(root), unescape(point)};
    }
  }
}

// gpupd's cgroup paths from /proc/self/cgroup: in the v2 hierarchy ("0::<path>") and in the v1
// hierarchy carrying the controller ("<id>:cpu,cpuacct:<path>").
struct SelfPaths {
  std::optional<std::string> v2;
  std::optional<std::string> v1;
};
SelfPaths self_paths(const std::string& self_cgroup, std::string_view controller) {
  SelfPaths out;
  std::istringstream in(self_cgroup);
  std::string line;
  while (std::getline(in, line)) {
    auto c1 = line.find(':');
    auto c2 = c1 == std::string::npos ? std::string::npos : line.find(':', c1 + 1);
    if (c2 == std::string::npos) continue;
    std::string controllers = line.substr(c1 + 1, c2 - c1 - 1);
    std::string path = line.substr(c2 + 1);
    if (line.compare(0, c1, "0") == 0 && controllers.empty()) out.v2 = path;
    for (const auto& c : split(controllers, ','))
      if (c == controller) out.v1 = path;
  }
  return out;
}

// The directory of a cgroup path (as /proc/self/cgroup names it) under a mount of its hierarchy;
// empty when the mount does not show that path (a mount of another subtree).
std::string dir_under(const Mount& m, const std::string& prefix, const std::string& path) {
  std::string root = m.root == "/" ? "" : m.root;
  if (path.compare(0, root.size(), root) != 0 || (path.size() > root.size() && path[root.size()] != '/')) return {};
  std::string rel = path.substr(root.size());
  std::string point = m.point == "/" ? "" : m.point;
  std::string dir = prefix + point + rel;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

// cgroupfs makes a new cgroup's control files itself; in a fake tree (create) they are made here.
Status write_file(const std::string& path, const std::string& value, bool create = false) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC | O_TRUNC | (create ? O_CREAT : 0), 0644);
  if (fd < 0) return make_error(GPUP_STATUS_INTERNAL, fmt::format("cannot open {}: {}", path, std::strerror(errno)));
  ssize_t n;
  do {
    n = ::write(fd, value.data(), value.size());
  } while (n < 0 && errno == EINTR);
  int err = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(value.size()))
    return make_error(GPUP_STATUS_INTERNAL,
                      fmt::format("cannot write '{}' to {}: {}", value, path, n < 0 ? std::strerror(err) : "short write"));
  return {};
}

std::optional<uint64_t> read_u64(const std::string& path) {
  std::string t = read_text(path);
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  if (t == "max") return UINT64_MAX;
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
  if (ec != std::errc() || p != t.data() + t.size() || t.empty()) return std::nullopt;
  return v;
}

// cgroup v1's signed values (cpu.cfs_quota_us is -1 when unlimited).
std::optional<int64_t> read_i64(const std::string& path) {
  std::string t = read_text(path);
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  int64_t v = 0;
  auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
  if (ec != std::errc() || p != t.data() + t.size() || t.empty()) return std::nullopt;
  return v;
}

// "key value" lines (memory.events, memory.oom_control, cpu.stat); nullopt when the key is absent.
std::optional<uint64_t> keyed(const std::string& path, const std::string& key) {
  std::istringstream in(read_text(path));
  std::string k;
  uint64_t v;
  while (in >> k >> v)
    if (k == key) return v;
  return std::nullopt;
}

uint64_t keyed_value(const std::string& path, const std::string& key) { return keyed(path, key).value_or(0); }

bool has_subdirs(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return false;
  bool found = false;
  while (dirent* e = ::readdir(d)) {
    std::string child = dir + "/" + e->d_name;
    struct stat st;
    if (e->d_name[0] != '.' && ::lstat(child.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) found = true;
  }
  ::closedir(d);
  return found;
}

// Where the controller's cgroups for workers go. v1_probe: a control file every cgroup of the
// controller's v1 hierarchy has (so a directory with it is gpupd's cgroup as seen from here).
CgroupSite find_site(const CgroupEnv& env, std::string_view controller, const std::string& v1_probe) {
  Mount v2, v1;
  find_mounts(env.mountinfo, controller, &v2, &v1);
  SelfPaths self = self_paths(env.self_cgroup, controller);

  std::vector<std::string> why;
  // cgroup v2: the controller has to exist in the hierarchy and reach gpupd's cgroup.
  if (v2.point.empty() || !self.v2) {
    why.push_back("no cgroup v2 hierarchy");
  } else {
    std::string top = env.prefix + v2.point;
    std::string own = dir_under(v2, env.prefix, *self.v2);
    if (!has_word(read_text(top + "/cgroup.controllers"), controller)) {
      why.push_back(fmt::format("cgroup v2 at {} has no {} controller", top, controller));
    } else if (own.empty() || !has_word(read_text(own + "/cgroup.controllers"), controller)) {
      why.push_back(fmt::format("cgroup v2: {} controller not available in gpupd's cgroup {}", controller, own));
    } else if (::access(own.c_str(), W_OK) != 0) {
      why.push_back(fmt::format("cgroup v2: gpupd's cgroup {} is not writable", own));
    } else {
      // Children get the controller only when the parent delegates it. A non-root cgroup with
      // processes in it (gpupd's, usually) cannot start delegating: then v2 is not usable here.
      std::string subtree = own + "/cgroup.subtree_control";
      bool delegated = has_word(read_text(subtree), controller);
      if (!delegated) delegated = write_file(subtree, fmt::format("+{}", controller)).ok();
      if (delegated) return CgroupSite{CgroupVersion::kV2, own, ""};
      why.push_back(fmt::format("cgroup v2: cannot enable the {} controller in {}", controller, subtree));
    }
  }
  // cgroup v1: the controller's hierarchy, mounted, writable at gpupd's cgroup.
  if (v1.point.empty() || !self.v1) {
    why.push_back(fmt::format("no cgroup v1 {} hierarchy", controller));
  } else {
    std::string own = dir_under(v1, env.prefix, *self.v1);
    if (own.empty() || !exists(own + "/" + v1_probe)) {
      why.push_back(
          fmt::format("cgroup v1: gpupd's {} cgroup {} is not visible under {}", controller, *self.v1, v1.point));
    } else if (::access(own.c_str(), W_OK) != 0) {
      why.push_back(fmt::format("cgroup v1: gpupd's {} cgroup {} is not writable", controller, own));
    } else {
      return CgroupSite{CgroupVersion::kV1, own, ""};
    }
  }
  std::string reason;
  for (const auto& w : why) reason += (reason.empty() ? "" : "; ") + w;
  return CgroupSite{CgroupVersion::kNone, "", reason};
}

}  // namespace

const char* to_string(CgroupVersion v) {
  switch (v) {
    case CgroupVersion::kNone: return "none";
    case CgroupVersion::kV1: return "cgroup v1";
    case CgroupVersion::kV2: return "cgroup v2";
  }
  return "?";
}

CgroupEnv CgroupEnv::from_proc() {
  return CgroupEnv{read_text("/proc/self/mountinfo"), read_text("/proc/self/cgroup"), ""};
}

MemoryCgroupSite find_memory_cgroup(const CgroupEnv& env) { return find_site(env, "memory", "memory.limit_in_bytes"); }

CpuCgroupSite find_cpu_cgroup(const CgroupEnv& env) { return find_site(env, "cpu", "cpu.shares"); }

// The root cgroup of the pids hierarchy has no pids.* files: probe for what every cgroup has.
CgroupSite find_pids_cgroup(const CgroupEnv& env) { return find_site(env, "pids", "cgroup.procs"); }

// ---------------------------------------------------------------------------------------------
// VmCgroups: <own>/<instance>/<vm> of one controller.

VmCgroups::VmCgroups(const char* controller, CgroupSite site, std::string instance, bool fake)
    : controller_(controller), site_(std::move(site)), instance_(std::move(instance)), fake_(fake) {
  if (site_.version != CgroupVersion::kNone) base_ = site_.own + "/" + instance_;
}

VmCgroups::~VmCgroups() {
  if (base_ready_) (void)remove(base_);
}

std::string VmCgroups::vm_dir(const std::string& vm) const { return base_.empty() ? "" : base_ + "/" + vm; }

// Instances are "gpupd.<pid>"; those of a gpupd that is gone are removed with their VMs' cgroups
// (empty ones only: rmdir refuses a cgroup with a process in it).
void VmCgroups::remove_stale_instances() {
  DIR* d = ::opendir(site_.own.c_str());
  if (!d) return;
  std::vector<std::string> stale;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.rfind("gpupd.", 0) != 0 || name == instance_) continue;
    int pid = 0;
    auto [p, ec] = std::from_chars(name.data() + 6, name.data() + name.size(), pid);
    if (ec != std::errc() || p != name.data() + name.size() || pid <= 0) continue;
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;
    stale.push_back(site_.own + "/" + name);
  }
  ::closedir(d);
  for (const auto& dir : stale) {
    if (DIR* s = ::opendir(dir.c_str())) {
      std::vector<std::string> children;
      while (dirent* e = ::readdir(s)) {
        std::string child = dir + "/" + e->d_name;
        struct stat st;
        if (e->d_name[0] != '.' && ::lstat(child.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) children.push_back(child);
      }
      ::closedir(s);
      for (const auto& c : children) (void)remove(c);
    }
    if (remove(dir).ok()) spdlog::info("removed the {} cgroup {} of a gpupd that is gone", controller_, dir);
  }
}

Status VmCgroups::ensure_base() {
  if (base_.empty())
    return make_error(GPUP_STATUS_NOT_SUPPORTED, fmt::format("no {} cgroup: {}", controller_, site_.reason));
  if (base_ready_) return {};
  if (::mkdir(base_.c_str(), 0755) != 0 && errno != EEXIST)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("cannot create {}: {}", base_, std::strerror(errno)));
  if (site_.version == CgroupVersion::kV2) {
    // The instance cgroup holds no process, so it may pass the controller on to the VMs.
    std::string subtree = base_ + "/cgroup.subtree_control";
    if (!has_word(read_text(subtree), controller_)) {
      if (Status s = write_file(subtree, fmt::format("+{}", controller_), fake_); !s.ok()) return s;
    }
  }
  base_ready_ = true;
  return {};
}

Result<std::string> VmCgroups::make_vm_dir(const std::string& vm) {
  if (Status s = ensure_base(); !s.ok()) return s.error();
  std::string dir = vm_dir(vm);
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("cannot create {}: {}", dir, std::strerror(errno)));
  return dir;
}

Status VmCgroups::add_process(const std::string& dir, pid_t pid) {
  return write_file(dir + "/cgroup.procs", std::to_string(pid), fake_);
}

Result<size_t> VmCgroups::kill_all(const std::string& dir) {
  if (fake_) return size_t{0};  // a fake tree's cgroup.procs lists no process of its own
  if (exists(dir + "/cgroup.kill")) (void)write_file(dir + "/cgroup.kill", "1");
  size_t signalled = 0;
  for (int round = 0; round < 100; ++round) {
    bool any = false;
    const std::string procs = read_text(dir + "/cgroup.procs");
    for (const auto& word : split(procs, '\n')) {
      if (word.empty()) continue;
      char* end = nullptr;
      long pid = std::strtol(word.c_str(), &end, 10);
      if (pid <= 0 || *end != '\0') continue;
      any = true;
      // Through a pidfd: the pid is this process's from here on, whatever exits meanwhile.
      int fd = static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0u));
      if (fd < 0) continue;
      if (::syscall(SYS_pidfd_send_signal, fd, SIGKILL, nullptr, 0u) == 0) ++signalled;
      ::close(fd);
    }
    if (!any) return signalled;
    ::usleep(1000 * (round < 10 ? 1 : 10));  // killed processes leave the list once reaped
  }
  return make_error(GPUP_STATUS_BUSY, fmt::format("processes are still in {} after killing them", dir));
}

Status VmCgroups::remove(const std::string& dir) {
  // A fake tree's control files are ordinary files; cgroupfs would not need this. Kept while
  // the cgroup has children (rmdir fails then, as on cgroupfs, and the cgroup stays whole).
  if (fake_ && !has_subdirs(dir)) {
    if (DIR* d = ::opendir(dir.c_str())) {
      std::vector<std::string> files;
      while (dirent* e = ::readdir(d)) {
        std::string f = dir + "/" + e->d_name;
        struct stat st;
        if (::lstat(f.c_str(), &st) == 0 && S_ISREG(st.st_mode)) files.push_back(f);
      }
      ::closedir(d);
      for (const auto& f : files) ::unlink(f.c_str());
    }
  }
  if (::rmdir(dir.c_str()) != 0 && errno != ENOENT)
    return make_error(GPUP_STATUS_BUSY, fmt::format("cannot remove {}: {}", dir, std::strerror(errno)));
  if (dir == base_) base_ready_ = false;
  return {};
}

// ---------------------------------------------------------------------------------------------
// MemoryCgroups

std::shared_ptr<MemoryCgroups> MemoryCgroups::create(const CgroupEnv& env, const std::string& instance) {
  auto site = find_memory_cgroup(env);
  std::shared_ptr<MemoryCgroups> m(new MemoryCgroups(std::move(site), instance, !env.prefix.empty()));
  if (m->version() != CgroupVersion::kNone) m->remove_stale_instances();
  return m;
}

MemoryCgroups::MemoryCgroups(CgroupSite site, std::string instance, bool fake)
    : VmCgroups("memory", std::move(site), std::move(instance), fake) {}

Result<std::string> MemoryCgroups::prepare(const std::string& vm, uint64_t limit) {
  auto dir = make_vm_dir(vm);
  if (!dir.ok()) return dir;
  if (Status s = set_limit(*dir, limit); !s.ok()) return s.error();
  return dir;
}

Status MemoryCgroups::set_limit(const std::string& dir, uint64_t limit) {
  const bool v2 = site_.version == CgroupVersion::kV2;
  const std::string usage_file = dir + (v2 ? "/memory.current" : "/memory.usage_in_bytes");
  if (auto usage = read_u64(usage_file); usage && *usage > limit)
    return make_error(GPUP_STATUS_QUOTA_EXCEEDED,
                      fmt::format("{} uses {} bytes now, more than the new limit of {} bytes", dir, *usage, limit));
  const std::string value = std::to_string(limit);
  if (v2) {
    if (Status s = write_file(dir + "/memory.max", value, fake_); !s.ok()) return s;
    // Swap would let the worker go past its limit; best effort (absent without swap accounting).
    if (exists(dir + "/memory.swap.max")) (void)write_file(dir + "/memory.swap.max", "0");
    return {};
  }
  // v1 wants memsw >= limit at every step: raise memsw first, lower it last.
  const std::string memsw = dir + "/memory.memsw.limit_in_bytes";
  const bool has_memsw = exists(memsw);
  auto old = read_u64(dir + "/memory.limit_in_bytes");
  bool raising = !old || limit >= *old;
  if (has_memsw && raising) (void)write_file(memsw, value);
  if (Status s = write_file(dir + "/memory.limit_in_bytes", value, fake_); !s.ok()) return s;
  if (has_memsw && !raising) (void)write_file(memsw, value);
  return {};
}

Result<uint64_t> MemoryCgroups::limit(const std::string& dir) const {
  std::string file = dir + (site_.version == CgroupVersion::kV2 ? "/memory.max" : "/memory.limit_in_bytes");
  auto v = read_u64(file);
  if (!v) return make_error(GPUP_STATUS_INTERNAL, "cannot read " + file);
  return *v;
}

uint64_t MemoryCgroups::oom_kills(const std::string& dir) const {
  if (site_.version == CgroupVersion::kV2) return keyed_value(dir + "/memory.events", "oom_kill");
  return keyed_value(dir + "/memory.oom_control", "oom_kill");
}

// ---------------------------------------------------------------------------------------------
// CpuCgroups

namespace {

constexpr uint64_t kCfsPeriodUs = 100000;

// The tightest cap (µs per kCfsPeriodUs) of gpupd's own v1 cpu cgroup and its ancestors, up to
// the top of the hierarchy; nullopt when none is capped. v1 refuses (EINVAL) a quota above an
// ancestor's, and such a cap could not take effect anyway.
std::optional<uint64_t> v1_ancestor_quota(std::string dir) {
  std::optional<uint64_t> tightest;
  while (!dir.empty() && exists(dir + "/cpu.cfs_quota_us")) {
    auto quota = read_i64(dir + "/cpu.cfs_quota_us");
    auto period = read_i64(dir + "/cpu.cfs_period_us");
    if (quota && *quota > 0 && period && *period > 0) {
      uint64_t q = static_cast<uint64_t>(*quota) * kCfsPeriodUs / static_cast<uint64_t>(*period);
      if (!tightest || q < *tightest) tightest = q;
    }
    auto slash = dir.rfind('/');
    if (slash == std::string::npos || slash == 0) break;
    dir.resize(slash);
  }
  return tightest;
}

}  // namespace

std::shared_ptr<CpuCgroups> CpuCgroups::create(const CgroupEnv& env, const std::string& instance, unsigned cpus) {
  if (cpus == 0) {
    long online = ::sysconf(_SC_NPROCESSORS_ONLN);
    cpus = online > 0 ? static_cast<unsigned>(online) : 1;
  }
  auto site = find_cpu_cgroup(env);
  std::shared_ptr<CpuCgroups> c(new CpuCgroups(std::move(site), instance, !env.prefix.empty(), cpus));
  if (c->version() != CgroupVersion::kNone) c->remove_stale_instances();
  return c;
}

CpuCgroups::CpuCgroups(CgroupSite site, std::string instance, bool fake, unsigned cpus)
    : VmCgroups("cpu", std::move(site), std::move(instance), fake), cpus_(cpus) {}

Result<std::string> CpuCgroups::prepare(const std::string& vm, uint32_t weight, uint32_t max_percent) {
  auto dir = make_vm_dir(vm);
  if (!dir.ok()) return dir;
  if (Status s = set(*dir, weight, max_percent); !s.ok()) return s.error();
  return dir;
}

Status CpuCgroups::set(const std::string& dir, uint32_t weight, uint32_t max_percent) {
  if (site_.version == CgroupVersion::kNone)
    return make_error(GPUP_STATUS_NOT_SUPPORTED, "no cpu cgroup: " + site_.reason);
  // VmSpec has checked both already; a clamped value still says what was meant.
  weight = std::clamp(weight, control::kMinComputeWeight, control::kMaxComputeWeight);
  max_percent = std::clamp(max_percent, control::kMinComputePercent, control::kMaxComputePercent);
  const bool capped = max_percent < control::kMaxComputePercent;
  // Percent of all the CPUs: 50% of 4 CPUs is 2 CPUs' worth, 200000 µs every 100000 µs.
  uint64_t quota = uint64_t{max_percent} * cpus_ * kCfsPeriodUs / 100;
  if (site_.version == CgroupVersion::kV2) {
    if (Status s = write_file(dir + "/cpu.weight", std::to_string(weight), fake_); !s.ok()) return s;
    // v2 holds a child to its ancestors' cpu.max itself.
    std::string max = capped ? fmt::format("{} {}", quota, kCfsPeriodUs) : fmt::format("max {}", kCfsPeriodUs);
    return write_file(dir + "/cpu.max", max, fake_);
  }
  // v1's default of 1024 shares is our default weight of 100; 2 is its least.
  uint64_t shares = std::max<uint64_t>(2, uint64_t{weight} * 1024 / 100);
  if (Status s = write_file(dir + "/cpu.shares", std::to_string(shares), fake_); !s.ok()) return s;
  if (Status s = write_file(dir + "/cpu.cfs_period_us", std::to_string(kCfsPeriodUs), fake_); !s.ok()) return s;
  if (capped) {
    if (auto ceiling = v1_ancestor_quota(site_.own); ceiling && quota > *ceiling) {
      spdlog::info("{}: a cap of {}% of {} CPUs ({} µs per {} µs) is above what gpupd's cpu cgroup {} (or one "
                   "above it) allows; capping at {} µs",
                   dir, max_percent, cpus_, quota, kCfsPeriodUs, site_.own, *ceiling);
      quota = *ceiling;
    }
  }
  return write_file(dir + "/cpu.cfs_quota_us", capped ? std::to_string(quota) : "-1", fake_);
}

Result<uint64_t> CpuCgroups::usage_ns(const std::string& dir) const {
  if (site_.version == CgroupVersion::kNone)
    return make_error(GPUP_STATUS_NOT_SUPPORTED, "no cpu cgroup: " + site_.reason);
  if (site_.version == CgroupVersion::kV2) {
    auto usec = keyed(dir + "/cpu.stat", "usage_usec");
    if (!usec) return make_error(GPUP_STATUS_INTERNAL, fmt::format("cannot read usage_usec from {}/cpu.stat", dir));
    return *usec * 1000;
  }
  const std::string file = dir + "/cpuacct.usage";
  if (!exists(file))
    return make_error(GPUP_STATUS_NOT_SUPPORTED,
                      fmt::format("no CPU usage for {}: the cgroup v1 cpu hierarchy is not co-mounted with cpuacct, "
                                  "and its cpu.stat counts only throttling",
                                  dir));
  auto ns = read_u64(file);
  if (!ns) return make_error(GPUP_STATUS_INTERNAL, "cannot read " + file);
  return *ns;
}

// ---------------------------------------------------------------------------------------------
// PidsCgroups

std::shared_ptr<PidsCgroups> PidsCgroups::create(const CgroupEnv& env, const std::string& instance) {
  std::shared_ptr<PidsCgroups> p(new PidsCgroups(find_pids_cgroup(env), instance, !env.prefix.empty()));
  if (p->version() != CgroupVersion::kNone) p->remove_stale_instances();
  return p;
}

PidsCgroups::PidsCgroups(CgroupSite site, std::string instance, bool fake)
    : VmCgroups("pids", std::move(site), std::move(instance), fake) {}

Result<std::string> PidsCgroups::prepare(const std::string& vm, uint64_t max_tasks) {
  auto dir = make_vm_dir(vm);
  if (!dir.ok()) return dir;
  if (Status s = write_file(*dir + "/pids.max", std::to_string(max_tasks), fake_); !s.ok()) return s.error();
  return dir;
}

}  // namespace gpup::gpupd
