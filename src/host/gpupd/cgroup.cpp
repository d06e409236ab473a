#include "host/gpupd/cgroup.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

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

// The first cgroup2 mount, and the first v1 mount carrying the memory controller.
void find_mounts(const std::string& mountinfo, Mount* v2, Mount* v1_memory) {
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
    } else if (fstype == "cgroup" && v1_memory->point.empty()) {
      for (const auto& opt : split(superopts, ','))
        if (opt == "memory") *v1_memory = Mount{unescape(root), unescape(point)};
    }
  }
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

// "key value" lines (memory.events, memory.oom_control).
uint64_t keyed_value(const std::string& path, const std::string& key) {
  std::istringstream in(read_text(path));
  std::string k;
  uint64_t v;
  while (in >> k >> v)
    if (k == key) return v;
  return 0;
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

MemoryCgroupSite find_memory_cgroup(const CgroupEnv& env) {
  Mount v2, v1;
  find_mounts(env.mountinfo, &v2, &v1);
  std::string v2_path, v1_path;
  bool v2_listed = false, v1_listed = false;
  std::istringstream in(env.self_cgroup);
  std::string line;
  while (std::getline(in, line)) {
    auto c1 = line.find(':');
    auto c2 = c1 == std::string::npos ? std::string::npos : line.find(':', c1 + 1);
    if (c2 == std::string::npos) continue;
    std::string controllers = line.substr(c1 + 1, c2 - c1 - 1);
    std::string path = line.substr(c2 + 1);
    if (line.compare(0, c1, "0") == 0 && controllers.empty()) {
      v2_path = path;
      v2_listed = true;
    }
    for (const auto& c : split(controllers, ','))
      if (c == "memory") {
        v1_path = path;
        v1_listed = true;
      }
  }

  std::vector<std::string> why;
  // cgroup v2: the controller has to exist in the hierarchy and reach gpupd's cgroup.
  if (v2.point.empty() || !v2_listed) {
    why.push_back("no cgroup v2 hierarchy");
  } else {
    std::string top = env.prefix + v2.point;
    std::string own = dir_under(v2, env.prefix, v2_path);
    if (!has_word(read_text(top + "/cgroup.controllers"), "memory")) {
      why.push_back(fmt::format("cgroup v2 at {} has no memory controller", top));
    } else if (own.empty() || !has_word(read_text(own + "/cgroup.controllers"), "memory")) {
      why.push_back(fmt::format("cgroup v2: memory controller not available in gpupd's cgroup {}", own));
    } else if (::access(own.c_str(), W_OK) != 0) {
      why.push_back(fmt::format("cgroup v2: gpupd's cgroup {} is not writable", own));
    } else {
      // Children get the controller only when the parent delegates it. A non-root cgroup with
      // processes in it (gpupd's, usually) cannot start delegating: then v2 is not usable here.
      std::string subtree = own + "/cgroup.subtree_control";
      bool delegated = has_word(read_text(subtree), "memory");
      if (!delegated) delegated = write_file(subtree, "+memory").ok();
      if (delegated) return MemoryCgroupSite{CgroupVersion::kV2, own, ""};
      why.push_back(fmt::format("cgroup v2: cannot enable the memory controller in {}", subtree));
    }
  }
  // cgroup v1: the memory hierarchy, mounted, writable at gpupd's cgroup.
  if (v1.point.empty() || !v1_listed) {
    why.push_back("no cgroup v1 memory hierarchy");
  } else {
    std::string own = dir_under(v1, env.prefix, v1_path);
    if (own.empty() || !exists(own + "/memory.limit_in_bytes")) {
      why.push_back(fmt::format("cgroup v1: gpupd's memory cgroup {} is not visible under {}", v1_path, v1.point));
    } else if (::access(own.c_str(), W_OK) != 0) {
      why.push_back(fmt::format("cgroup v1: gpupd's memory cgroup {} is not writable", own));
    } else {
      return MemoryCgroupSite{CgroupVersion::kV1, own, ""};
    }
  }
  std::string reason;
  for (const auto& w : why) reason += (reason.empty() ? "" : "; ") + w;
  return MemoryCgroupSite{CgroupVersion::kNone, "", reason};
}

std::shared_ptr<MemoryCgroups> MemoryCgroups::create(const CgroupEnv& env, const std::string& instance) {
  auto site = find_memory_cgroup(env);
  std::shared_ptr<MemoryCgroups> m(new MemoryCgroups(std::move(site), instance, !env.prefix.empty()));
  if (m->version() != CgroupVersion::kNone) m->remove_stale_instances();
  return m;
}

MemoryCgroups::MemoryCgroups(MemoryCgroupSite site, std::string instance, bool fake)
    : site_(std::move(site)), instance_(std::move(instance)), fake_(fake) {
  if (site_.version != CgroupVersion::kNone) base_ = site_.own + "/" + instance_;
}

MemoryCgroups::~MemoryCgroups() {
  if (base_ready_) (void)remove(base_);
}

std::string MemoryCgroups::vm_dir(const std::string& vm) const { return base_.empty() ? "" : base_ + "/" + vm; }

// Instances are "gpupd.<pid>"; those of a gpupd that is gone are removed with their VMs' cgroups
// (empty ones only: rmdir refuses a cgroup with a process in it).
void MemoryCgroups::remove_stale_instances() {
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
    if (remove(dir).ok()) spdlog::info("removed the memory cgroup {} of a gpupd that is gone", dir);
  }
}

Status MemoryCgroups::ensure_base() {
  if (base_.empty()) return make_error(GPUP_STATUS_NOT_SUPPORTED, "no memory cgroup: " + site_.reason);
  if (base_ready_) return {};
  if (::mkdir(base_.c_str(), 0755) != 0 && errno != EEXIST)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("cannot create {}: {}", base_, std::strerror(errno)));
  if (site_.version == CgroupVersion::kV2) {
    // The instance cgroup holds no process, so it may pass the controller on to the VMs.
    std::string subtree = base_ + "/cgroup.subtree_control";
    if (!has_word(read_text(subtree), "memory")) {
      if (Status s = write_file(subtree, "+memory", fake_); !s.ok()) return s;
    }
  }
  base_ready_ = true;
  return {};
}

Result<std::string> MemoryCgroups::prepare(const std::string& vm, uint64_t limit) {
  if (Status s = ensure_base(); !s.ok()) return s.error();
  std::string dir = vm_dir(vm);
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("cannot create {}: {}", dir, std::strerror(errno)));
  if (Status s = set_limit(dir, limit); !s.ok()) return s.error();
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

Status MemoryCgroups::add_process(const std::string& dir, pid_t pid) {
  return write_file(dir + "/cgroup.procs", std::to_string(pid), fake_);
}

uint64_t MemoryCgroups::oom_kills(const std::string& dir) const {
  if (site_.version == CgroupVersion::kV2) return keyed_value(dir + "/memory.events", "oom_kill");
  return keyed_value(dir + "/memory.oom_control", "oom_kill");
}

Status MemoryCgroups::remove(const std::string& dir) {
  if (fake_) {
    // A fake tree's control files are ordinary files; cgroupfs would not need this.
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

}  // namespace gpup::gpupd
