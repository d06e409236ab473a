#include "host/gpupd/jail.h"

#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <linux/capability.h>
#include <linux/landlock.h>
#include <linux/mount.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <set>

#include <fmt/format.h>

extern char** environ;

namespace gpup::gpupd {

// Landlock constants newer than the installed headers may know (values from the kernel's UAPI).
#ifndef LANDLOCK_ACCESS_FS_REFER
#define LANDLOCK_ACCESS_FS_REFER (1ULL << 13)
#endif
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif
#ifndef LANDLOCK_ACCESS_FS_IOCTL_DEV
#define LANDLOCK_ACCESS_FS_IOCTL_DEV (1ULL << 15)
#endif
#ifndef LANDLOCK_CREATE_RULESET_VERSION
#define LANDLOCK_CREATE_RULESET_VERSION (1U << 0)
#endif
constexpr uint64_t kLandlockNetBindTcp = 1ULL << 0, kLandlockNetConnectTcp = 1ULL << 1;
constexpr uint64_t kLandlockScopeAbstractUnix = 1ULL << 0, kLandlockScopeSignal = 1ULL << 1;

namespace {

// ----- parsing the KMD's needs --------------------------------------------------------------

bool safe_path(std::string_view p) {
  if (p.empty() || p[0] != '/' || p.size() > 4096) return false;
  for (char c : p)
    if (static_cast<unsigned char>(c) < 0x20) return false;
  return p.find("/../") == std::string_view::npos && !p.ends_with("/..");
}

bool env_name(std::string_view n) {
  if (n.empty() || n.size() > 128) return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  return !std::isdigit(static_cast<unsigned char>(n[0]));
}

// ----- the plan: everything the child does, as C strings ------------------------------------

struct Bind {
  std::string src, dst;  // dst: under the stage
  unsigned long remount = 0;
  bool file = false;
  // A detached copy of src's mount made by gpupd before the clone (open_tree), which the child
  // attaches at dst: gpupd looks src up with all its rights, so a build tree or library behind a
  // directory only root may search (a 0700 checkout, /root) is shown as well.
  int tree = -1;
};

struct Plan {
  std::string stage;
  std::vector<std::string> dirs;  // to create under the stage, parents first
  std::vector<Bind> binds;
  std::vector<std::pair<std::string, std::string>> links;  // (text, path under the stage)
  std::vector<std::pair<std::string, std::string>> devs;  // (host node, path under the stage)
  unsigned long dev_remount = 0;
  // Paths inside the new root relative to it ("./proc"; the child works from there), computed
  // here: the child allocates nothing.
  std::string proc, dev, tmp, cache;
  std::vector<std::string> proc_ro;
  std::vector<std::pair<std::string, std::string>> dev_links;
  std::vector<std::string> dev_dirs;  // below /dev, made once its tmpfs is mounted
  std::string tmp_opts, cache_opts, root_opts, dev_opts;
  std::string hostname;
  uint32_t id = 0;
  std::vector<std::string> exec_paths;  // Landlock EXECUTE, as seen inside
  std::vector<std::string> dev_paths;   // Landlock read/write/ioctl, inside
  std::string program;
  std::vector<std::string> argv_s, envp_s;
  std::vector<char*> argv, envp;
  std::vector<std::pair<int, int>> fds;
  int landlock_abi = 0;
};

struct Report {
  int err = 0;
  char step[200] = {};
};

// ----- the child side: system calls only ----------------------------------------------------

[[noreturn]] void fail(int rfd, const char* step, const char* arg = nullptr) {
  Report r;
  r.err = errno;
  size_t n = 0;
  for (const char* s : {step, arg ? ": " : nullptr, arg})
    for (; s && *s && n + 1 < sizeof r.step; ++s) r.step[n++] = *s;
  ssize_t ignored = ::write(rfd, &r, sizeof r);
  (void)ignored;
  ::_exit(127);
}

long sys_landlock_create_ruleset(const void* attr, size_t size, uint32_t flags) {
  return ::syscall(__NR_landlock_create_ruleset, attr, size, flags);
}

struct RulesetAttr {
  uint64_t handled_access_fs;
  uint64_t handled_access_net;
  uint64_t scoped;
};

uint64_t landlock_fs_rights(int abi) {
  uint64_t all = LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_READ_FILE |
                 LANDLOCK_ACCESS_FS_READ_DIR | LANDLOCK_ACCESS_FS_REMOVE_DIR | LANDLOCK_ACCESS_FS_REMOVE_FILE |
                 LANDLOCK_ACCESS_FS_MAKE_CHAR | LANDLOCK_ACCESS_FS_MAKE_DIR | LANDLOCK_ACCESS_FS_MAKE_REG |
                 LANDLOCK_ACCESS_FS_MAKE_SOCK | LANDLOCK_ACCESS_FS_MAKE_FIFO | LANDLOCK_ACCESS_FS_MAKE_BLOCK |
                 LANDLOCK_ACCESS_FS_MAKE_SYM;
  if (abi >= 2) all |= LANDLOCK_ACCESS_FS_REFER;
  if (abi >= 3) all |= LANDLOCK_ACCESS_FS_TRUNCATE;
  if (abi >= 5) all |= LANDLOCK_ACCESS_FS_IOCTL_DEV;
  return all;
}

void landlock_allow(int rfd, int ruleset, const char* path, uint64_t rights) {
  int fd = ::open(path, O_PATH | O_CLOEXEC);
  if (fd < 0) fail(rfd, "landlock: open", path);
  landlock_path_beneath_attr a{};
  a.allowed_access = rights;
  a.parent_fd = fd;
  if (::syscall(__NR_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &a, 0) != 0)
    fail(rfd, "landlock: add rule", path);
  ::close(fd);
}

void apply_landlock(int rfd, const Plan& p) {
  const int abi = p.landlock_abi;
  if (abi <= 0) return;
  const uint64_t all = landlock_fs_rights(abi);
  RulesetAttr attr{all, abi >= 4 ? kLandlockNetBindTcp | kLandlockNetConnectTcp : 0,
                   abi >= 6 ? kLandlockScopeAbstractUnix | kLandlockScopeSignal : 0};
  const size_t size = abi >= 6 ? sizeof(RulesetAttr) : abi >= 4 ? 2 * sizeof(uint64_t) : sizeof(uint64_t);
  int ruleset = static_cast<int>(sys_landlock_create_ruleset(&attr, size, 0));
  if (ruleset < 0) fail(rfd, "landlock: create ruleset");
  const uint64_t read = LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR;
  const uint64_t write = all & ~(LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_MAKE_CHAR |
                                 LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_IOCTL_DEV);
  landlock_allow(rfd, ruleset, "/", read);
  landlock_allow(rfd, ruleset, kJailCacheDir, write);
  landlock_allow(rfd, ruleset, "/tmp", write);
  for (const auto& e : p.exec_paths)
    landlock_allow(rfd, ruleset, e.c_str(), LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_READ_FILE);
  const uint64_t dev = LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_WRITE_FILE |
                       (abi >= 3 ? LANDLOCK_ACCESS_FS_TRUNCATE : 0) | (abi >= 5 ? LANDLOCK_ACCESS_FS_IOCTL_DEV : 0);
  for (const auto& d : p.dev_paths) landlock_allow(rfd, ruleset, d.c_str(), dev);
  if (::syscall(__NR_landlock_restrict_self, ruleset, 0) != 0) fail(rfd, "landlock: restrict self");
  ::close(ruleset);
}

void make_file(int rfd, const char* path) {
  int fd = ::open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0 && errno != EEXIST) fail(rfd, "create", path);
  if (fd >= 0) ::close(fd);
}

void drop_privileges(int rfd, uint32_t id) {
  // Locked securebits: no root semantics for uid 0 after exec, no capabilities kept or raised.
  constexpr unsigned long kBits = (1UL << 0) | (1UL << 1) |  // NOROOT (+locked)
                                  (1UL << 2) | (1UL << 3) |  // NO_SETUID_FIXUP (+locked)
                                  (1UL << 5) |               // KEEP_CAPS_LOCKED
                                  (1UL << 6) | (1UL << 7);   // NO_CAP_AMBIENT_RAISE (+locked)
  if (::prctl(PR_SET_SECUREBITS, kBits, 0, 0, 0) != 0) fail(rfd, "prctl(PR_SET_SECUREBITS)");
  for (int cap = 0; cap <= 63; ++cap)
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) fail(rfd, "drop the capability bounding set");
  if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) fail(rfd, "clear ambient capabilities");
  // Raw system calls: glibc's setxid wrappers would wait for threads that do not exist here.
  if (::syscall(SYS_setgroups, 0, nullptr) != 0) fail(rfd, "setgroups");
  if (::syscall(SYS_setresgid, id, id, id) != 0) fail(rfd, "setresgid");
  if (::syscall(SYS_setresuid, id, id, id) != 0) fail(rfd, "setresuid");
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capset, &hdr, data) != 0) fail(rfd, "capset");
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail(rfd, "prctl(PR_SET_NO_NEW_PRIVS)");
}

[[noreturn]] void child(const Plan& p, int rfd, int sync_fd) {
  // gpupd gone: so is the worker (and, as it is pid 1, everything in its namespace).
  ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  // Out of the way of the fd numbers the worker gets.
  rfd = ::fcntl(rfd, F_DUPFD_CLOEXEC, 900);
  if (rfd < 0) ::_exit(127);
  char go = 0;
  if (::read(sync_fd, &go, 1) != 1 || go != 1) ::_exit(127);  // gpupd could not finish its part
  ::close(sync_fd);
  // gpupd has put this process in its cgroups: they become the root of what it can see.
  if (::unshare(CLONE_NEWCGROUP) != 0) fail(rfd, "unshare(CLONE_NEWCGROUP)");

  int devnull = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (devnull < 0 || ::dup2(devnull, 0) != 0) fail(rfd, "stdin from /dev/null");
  ::close(devnull);
  const char* st = p.stage.c_str();
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) fail(rfd, "make mounts private");
  if (::mount("gpup-jail", st, "tmpfs", MS_NOSUID | MS_NODEV, p.root_opts.c_str()) != 0)
    fail(rfd, "mount the root tmpfs on", st);
  // Everything inside is reached from here ("./usr/lib"): the directories above the stage may be
  // closed to the jail's uid.
  if (::chdir(st) != 0) fail(rfd, "chdir", st);
  // Files in the jail's own tmpfs are made as its uid (the only one its user namespace maps); host
  // paths come as mounts gpupd opened (Bind::tree), or are the kernel's (/proc, /dev nodes).
  const long jail_fsuid = p.id;
  ::syscall(SYS_setfsuid, jail_fsuid);
  ::syscall(SYS_setfsgid, jail_fsuid);
  // Its writable places, bounded, its own; mounted before the host paths are shown, as one of
  // those may live under /tmp (a build tree there) and must not be covered.
  for (const std::string* d : {&p.tmp, &p.cache})
    if (::mkdir(d->c_str(), 0755) != 0 && errno != EEXIST) fail(rfd, "mkdir", d->c_str());
  if (::mount("tmpfs", p.tmp.c_str(), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, p.tmp_opts.c_str()) != 0)
    fail(rfd, "mount /tmp");
  if (::mount("tmpfs", p.cache.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, p.cache_opts.c_str()) != 0)
    fail(rfd, "mount", kJailCacheDir);
  for (const auto& d : p.dirs)
    if (::mkdir(d.c_str(), 0755) != 0 && errno != EEXIST) fail(rfd, "mkdir", d.c_str());
  for (const auto& [text, path] : p.links)
    if (::symlink(text.c_str(), path.c_str()) != 0 && errno != EEXIST && errno != EROFS) fail(rfd, "symlink", path.c_str());
  for (const auto& b : p.binds)
    if (b.file) make_file(rfd, b.dst.c_str());
  for (const auto& b : p.binds) {
    if (::syscall(SYS_move_mount, b.tree, "", AT_FDCWD, b.dst.c_str(), MOVE_MOUNT_F_EMPTY_PATH) != 0)
      fail(rfd, "bind-mount", b.src.c_str());
    ::close(b.tree);
    if (::mount(nullptr, b.dst.c_str(), nullptr, MS_REMOUNT | MS_BIND | b.remount, nullptr) != 0)
      fail(rfd, "remount read-only", b.dst.c_str());
  }

  // /proc of its own pid namespace; the kernel's settings read-only.
  if (::mount("proc", p.proc.c_str(), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0) fail(rfd, "mount proc");
  for (const auto& s : p.proc_ro) {
    if (::mount(s.c_str(), s.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) {
      if (errno == ENOENT) continue;  // not shown in this proc at all
      fail(rfd, "bind", s.c_str());
    }
    if (::mount(nullptr, s.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                nullptr) != 0)
      fail(rfd, "remount read-only", s.c_str());
  }

  // A minimal /dev.
  if (::mount("tmpfs", p.dev.c_str(), "tmpfs", MS_NOSUID | MS_NOEXEC, p.dev_opts.c_str()) != 0)
    fail(rfd, "mount /dev");
  for (const auto& d : p.dev_dirs)
    if (::mkdir(d.c_str(), 0755) != 0 && errno != EEXIST) fail(rfd, "mkdir", d.c_str());
  for (const auto& [node, in] : p.devs) {
    make_file(rfd, in.c_str());
    if (::mount(node.c_str(), in.c_str(), nullptr, MS_BIND, nullptr) != 0) fail(rfd, "bind", node.c_str());
    if (::mount(nullptr, in.c_str(), nullptr, MS_REMOUNT | MS_BIND | p.dev_remount, nullptr) != 0)
      fail(rfd, "remount", node.c_str());
  }
  for (const auto& [target, link] : p.dev_links)
    if (::symlink(target.c_str(), link.c_str()) != 0 && errno != EEXIST) fail(rfd, "symlink", link.c_str());
  if (::mount(nullptr, p.dev.c_str(), nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=0755") != 0)
    fail(rfd, "remount /dev read-only");

  // Into it; the host's root is detached and gone from view.
  if (::syscall(SYS_pivot_root, ".", ".") != 0) fail(rfd, "pivot_root");
  if (::umount2(".", MNT_DETACH) != 0) fail(rfd, "detach the host's root");
  if (::chdir("/") != 0) fail(rfd, "chdir /");
  if (::mount(nullptr, "/", nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, nullptr) != 0)
    fail(rfd, "remount the root read-only");
  if (::sethostname(p.hostname.data(), p.hostname.size()) != 0) fail(rfd, "sethostname");

  // No terminal of the operator's; default signal dispositions and an empty mask (gpupd's are not
  // the worker's: ignored signals would survive exec).
  if (::setsid() < 0) fail(rfd, "setsid");
  for (int sig = 1; sig < 65; ++sig)
    if (sig != SIGKILL && sig != SIGSTOP) ::signal(sig, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  drop_privileges(rfd, p.id);
  // Credentials changed: the parent-death signal was cleared with them.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  apply_landlock(rfd, p);

  // fds: park the passed ones high (their numbers may collide with the targets), then place them;
  // every other one is closed by exec.
  int high = 1000;
  for (const auto& fd : p.fds)
    if (::dup3(fd.first, high++, O_CLOEXEC) < 0) fail(rfd, "dup3");
  high = 1000;
  for (const auto& fd : p.fds)
    if (::dup2(high++, fd.second) != fd.second) fail(rfd, "dup2");
  constexpr unsigned kCloseRangeCloexec = 1U << 2;
  if (::syscall(SYS_close_range, 3 + p.fds.size(), ~0U, kCloseRangeCloexec) != 0) fail(rfd, "close_range");
  ::execve(p.program.c_str(), p.argv.data(), p.envp.data());
  fail(rfd, "execve", p.program.c_str());
}

// ----- the parent side ----------------------------------------------------------------------

std::string dir_of(const std::string& p) {
  auto slash = p.rfind('/');
  return slash == std::string::npos || slash == 0 ? std::string("/") : p.substr(0, slash);
}

bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// The ELF interpreter a program asks for (PT_INTERP), or empty.
std::string elf_interpreter(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return {};
  Elf64_Ehdr eh{};
  if (::pread(fd.get(), &eh, sizeof eh, 0) != ssize_t(sizeof eh) || std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 ||
      eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phnum > 256)
    return {};
  for (unsigned i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph{};
    if (::pread(fd.get(), &ph, sizeof ph, static_cast<off_t>(eh.e_phoff + i * sizeof ph)) != ssize_t(sizeof ph))
      return {};
    if (ph.p_type != PT_INTERP || ph.p_filesz == 0 || ph.p_filesz > PATH_MAX) continue;
    std::string interp(ph.p_filesz, '\0');
    if (::pread(fd.get(), interp.data(), interp.size(), static_cast<off_t>(ph.p_offset)) != ssize_t(interp.size()))
      return {};
    interp.resize(std::strlen(interp.c_str()));
    return interp;
  }
  return {};
}

// The directories of every shared object loaded in gpupd: its own libraries and those of the
// KMDs and device runtimes it started (as named when loaded, and where they really are).
std::vector<std::string> loaded_library_dirs() {
  std::set<std::string> dirs;
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        const char* name = info->dlpi_name;
        if (!name || name[0] != '/') return 0;
        auto* dirs = static_cast<std::set<std::string>*>(data);
        dirs->insert(dir_of(name));
        char real[PATH_MAX];
        if (::realpath(name, real)) dirs->insert(dir_of(real));
        return 0;
      },
      &dirs);
  return {dirs.begin(), dirs.end()};
}

unsigned long source_flags(const std::string& path) {
  struct statvfs sv {};
  if (::statvfs(path.c_str(), &sv) != 0) return 0;
  unsigned long f = 0;
  // Flags a mount in another user namespace may not clear: keep the source's.
  if (sv.f_flag & ST_NOEXEC) f |= MS_NOEXEC;
  if (sv.f_flag & ST_NOATIME) f |= MS_NOATIME;
  if (sv.f_flag & ST_NODIRATIME) f |= MS_NODIRATIME;
  if (sv.f_flag & ST_RELATIME) f |= MS_RELATIME;
  return f;
}

int probe_landlock() {
  long abi = sys_landlock_create_ruleset(nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
  return abi > 0 ? static_cast<int>(std::min<long>(abi, 6)) : 0;
}

class PlanBuilder {
 public:
  explicit PlanBuilder(Plan& p) : p_(p) {}

  // Shows host path `path` (and the links leading to it) read-only; exec: may be mapped/executed.
  // Returns its real path, empty when it does not exist on this host (then nothing is shown).
  std::string show(const std::string& path, bool exec) {
    std::vector<std::pair<std::string, std::string>> links;
    std::string real = resolve_with_links(path, links);
    if (real.empty()) return real;
    for (auto& [link, text] : links) {
      add_dirs(dir_of(link));
      if (seen_links_.insert(link).second) p_.links.emplace_back(text, "." + link);
    }
    auto [it, inserted] = shown_.emplace(real, exec);
    if (!inserted) it->second = it->second || exec;
    return real;
  }

  void finish() {
    // Nested entries under a shown directory with the same or fewer rights are covered by it.
    for (const auto& [path, exec] : shown_) {
      bool covered = false;
      for (const auto& [other, other_exec] : shown_)
        if (other != path && path.rfind(other + "/", 0) == 0 && (other_exec || !exec)) covered = true;
      if (covered) continue;
      Bind b;
      b.src = path;
      b.dst = "." + path;
      b.file = !is_dir(path);
      b.remount = MS_RDONLY | MS_NOSUID | MS_NODEV | (exec ? 0 : MS_NOEXEC) | source_flags(path);
      add_dirs(b.file ? dir_of(path) : path);
      p_.binds.push_back(std::move(b));
    }
  }

  void add_dirs(const std::string& dir) {
    if (dir == "/" || dir.empty()) return;
    add_dirs(dir_of(dir));
    if (seen_dirs_.insert(dir).second) p_.dirs.push_back("." + dir);
  }

 private:
  Plan& p_;
  std::map<std::string, bool> shown_;
  std::set<std::string> seen_links_, seen_dirs_;
};

}  // namespace

std::string resolve_with_links(const std::string& p, std::vector<std::pair<std::string, std::string>>& links) {
  std::string todo = p;
  std::string cur;
  for (int hops = 0; hops < 40;) {
    size_t pos = 0;
    bool restarted = false;
    cur.clear();
    while (pos < todo.size()) {
      while (pos < todo.size() && todo[pos] == '/') ++pos;
      if (pos >= todo.size()) break;
      size_t end = todo.find('/', pos);
      if (end == std::string::npos) end = todo.size();
      std::string comp = todo.substr(pos, end - pos);
      pos = end;
      if (comp == ".") continue;
      if (comp == "..") {
        cur = dir_of(cur.empty() ? "/" : cur);
        if (cur == "/") cur.clear();
        continue;
      }
      std::string next = cur + "/" + comp;
      struct stat st {};
      if (::lstat(next.c_str(), &st) != 0) return {};
      if (S_ISLNK(st.st_mode)) {
        char buf[PATH_MAX];
        ssize_t n = ::readlink(next.c_str(), buf, sizeof buf - 1);
        if (n <= 0) return {};
        std::string text(buf, static_cast<size_t>(n));
        links.emplace_back(next, text);
        std::string rest = todo.substr(pos);
        todo = (text[0] == '/' ? text : (cur.empty() ? "" : cur) + "/" + text) + rest;
        ++hops;
        restarted = true;
        break;
      }
      cur = next;
    }
    if (!restarted) return cur.empty() ? "/" : cur;
  }
  return {};
}

Result<JailNeeds> parse_jail_needs(std::string_view text) {
  JailNeeds n;
  size_t line_no = 0;
  while (!text.empty()) {
    ++line_no;
    size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    if (line.empty()) continue;
    size_t sp = line.find(' ');
    std::string_view kind = line.substr(0, sp);
    std::string_view arg = sp == std::string_view::npos ? std::string_view() : line.substr(sp + 1);
    auto bad = [&](const char* why) {
      return make_error(GPUP_STATUS_INVALID_PARAMETER,
                        fmt::format("sandbox needs line {}: {} ('{}')", line_no, why, std::string(line.substr(0, 200))));
    };
    if (kind == "ro" || kind == "exec" || kind == "dev") {
      if (!safe_path(arg)) return bad("not an absolute path without '..'");
      (kind == "ro" ? n.ro : kind == "exec" ? n.exec : n.dev).emplace_back(arg);
    } else if (kind == "env") {
      size_t eq = arg.find('=');
      if (eq == std::string_view::npos || !env_name(arg.substr(0, eq))) return bad("not NAME=VALUE");
      for (char c : arg)
        if (static_cast<unsigned char>(c) < 0x20) return bad("control character in a value");
      n.env.emplace_back(std::string(arg.substr(0, eq)), std::string(arg.substr(eq + 1)));
    } else if (kind == "passenv") {
      if (!env_name(arg)) return bad("not a variable name");
      n.passenv.emplace_back(arg);
    } else {
      return bad("unknown kind");
    }
  }
  return n;
}

Jails::Jails(JailOptions opts) : opts_(std::move(opts)), landlock_abi_(probe_landlock()) {}

Result<uint32_t> Jails::id_for(const std::string& vm) {
  if (auto it = ids_.find(vm); it != ids_.end()) return it->second;
  std::set<uint32_t> used;
  for (const auto& [name, id] : ids_) used.insert(id);
  for (uint64_t i = 0; i < opts_.id_count; ++i) {
    const uint32_t id = static_cast<uint32_t>(opts_.id_base + i);
    if (!used.count(id)) {
      ids_.emplace(vm, id);
      return id;
    }
  }
  return make_error(GPUP_STATUS_QUOTA_EXCEEDED,
                    fmt::format("no worker id left: all {} of worker_id_base {} are in use", opts_.id_count, opts_.id_base));
}

void Jails::release(const std::string& vm) { ids_.erase(vm); }

std::vector<std::string> Jails::namespaces() { return {"user", "mount", "pid", "ipc", "uts", "network", "cgroup"}; }

Result<Jails::Started> Jails::spawn(const Spawn& s, const std::function<Status(pid_t)>& before_start) {
  if (::geteuid() != 0)
    return make_error(GPUP_STATUS_ACCESS_DENIED,
                      "the worker jail needs gpupd to run as root (to give each partition its own uid)");
  auto id = id_for(s.vm);
  if (!id.ok()) return id.error();

  Plan p;
  p.stage = opts_.stage_dir;
  p.id = *id;
  p.landlock_abi = landlock_abi_;
  p.hostname = "gpup-" + s.vm.substr(0, 58);
  p.root_opts = fmt::format("mode=0755,uid={0},gid={0},size=4m", p.id);
  p.dev_opts = fmt::format("mode=0755,uid={0},gid={0},size=64k", p.id);
  p.tmp_opts = fmt::format("mode=0700,uid={0},gid={0},size={1}", p.id, opts_.scratch_bytes);
  p.cache_opts = fmt::format("mode=0700,uid={0},gid={0},size={1}", p.id, opts_.cache_bytes);
  std::vector<std::pair<std::string, std::string>> program_links;
  p.program = resolve_with_links(s.program, program_links);
  if (p.program.empty()) return make_error(GPUP_STATUS_NOT_FOUND, fmt::format("worker program {} not found", s.program));

  PlanBuilder b(p);
  for (const auto& d : {std::string("/proc"), std::string("/dev"), std::string("/tmp"), std::string(kJailCacheDir)})
    b.add_dirs(d);
  // Its program and the KMD, the loader and the libraries; then what the KMD declared.
  std::vector<std::string> execs = {p.program};
  for (const auto& e : s.needs ? s.needs->exec : std::vector<std::string>{}) execs.push_back(e);
  std::vector<std::string> exec_inside;
  for (const auto& e : execs) {
    std::string real = b.show(e, true);
    if (real.empty()) continue;
    exec_inside.push_back(real);
    if (std::string interp = elf_interpreter(real); !interp.empty())
      if (std::string ri = b.show(interp, true); !ri.empty()) exec_inside.push_back(ri);
  }
  b.show(s.kmd, true);
  for (const auto& dir : loaded_library_dirs()) b.show(dir, true);
  b.show("/etc/ld.so.cache", false);
  if (s.needs)
    for (const auto& r : s.needs->ro) b.show(r, false);
  b.finish();
  std::sort(exec_inside.begin(), exec_inside.end());
  exec_inside.erase(std::unique(exec_inside.begin(), exec_inside.end()), exec_inside.end());
  p.exec_paths = exec_inside;
  // /dev: the usual character devices, and the device nodes the KMD declared, at their paths.
  std::vector<std::string> devs = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"};
  if (s.needs)
    for (const auto& d : s.needs->dev) {
      struct stat st {};
      if (d.rfind("/dev/", 0) != 0 || ::stat(d.c_str(), &st) != 0 || !(S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)))
        return make_error(GPUP_STATUS_NOT_FOUND, fmt::format("the KMD needs device node {}, which is not one", d));
      devs.push_back(d);
    }
  for (const auto& d : devs) {
    p.devs.emplace_back(d, "." + d);
    p.dev_paths.push_back(d);
    for (std::string dir = dir_of(d); dir != "/dev" && dir.size() > 5; dir = dir_of(dir))
      if (std::find(p.dev_dirs.begin(), p.dev_dirs.end(), "." + dir) == p.dev_dirs.end())
        p.dev_dirs.insert(p.dev_dirs.begin(), "." + dir);  // parents first
  }
  p.dev_remount = MS_NOSUID | MS_NOEXEC | source_flags("/dev/null");
  p.proc = std::string("./proc");
  p.proc_ro = {p.proc + "/sys", p.proc + "/sysrq-trigger"};
  p.dev = std::string("./dev");
  p.tmp = std::string("./tmp");
  p.cache = std::string(".") + kJailCacheDir;
  for (const auto& [name, target] : {std::pair<const char*, const char*>{"/fd", "/proc/self/fd"},
                                     {"/stdin", "/proc/self/fd/0"},
                                     {"/stdout", "/proc/self/fd/1"},
                                     {"/stderr", "/proc/self/fd/2"}})
    p.dev_links.emplace_back(target, p.dev + name);

  // The environment: built, not inherited.
  std::map<std::string, std::string> env = {{"PATH", "/usr/bin:/bin"},
                                            {"HOME", kJailCacheDir},
                                            {"TMPDIR", "/tmp"},
                                            {"XDG_CACHE_HOME", kJailCacheDir},
                                            {"GPUP_CACHE_DIR", kJailCacheDir}};
  std::vector<std::string> pass = {"ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "GPUP_LOG"};
  if (s.needs) pass.insert(pass.end(), s.needs->passenv.begin(), s.needs->passenv.end());
  for (const auto& name : pass)
    if (const char* v = std::getenv(name.c_str())) env[name] = v;
  if (s.needs)
    for (const auto& [name, value] : s.needs->env) {
      std::string v = value;
      for (size_t at; (at = v.find("$GPUP_CACHE_DIR")) != std::string::npos;) v.replace(at, 15, kJailCacheDir);
      env[name] = v;
    }
  for (const auto& [k, v] : env) p.envp_s.push_back(k + "=" + v);
  p.argv_s = s.argv;
  p.argv_s[0] = p.program;
  for (auto& a : p.argv_s) p.argv.push_back(a.data());
  p.argv.push_back(nullptr);
  for (auto& e : p.envp_s) p.envp.push_back(e.data());
  p.envp.push_back(nullptr);
  p.fds = s.fds;
  for (size_t i = 0; i < p.fds.size(); ++i)
    if (p.fds[i].second != static_cast<int>(3 + i))
      return make_error(GPUP_STATUS_INVALID_PARAMETER, "jail: passed fds must be numbered 3, 4, ... in order");

  // The host paths it shows, looked up here, with gpupd's rights, as detached mounts.
  std::vector<UniqueFd> trees;
  for (auto& bind : p.binds) {
    trees.emplace_back(static_cast<int>(
        ::syscall(SYS_open_tree, AT_FDCWD, bind.src.c_str(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)));
    if (!trees.back())
      return make_error(GPUP_STATUS_INTERNAL, fmt::format("jail: open_tree {}: {}", bind.src, std::strerror(errno)));
    bind.tree = trees.back().get();
  }

  int rp[2], sp[2];
  if (::pipe2(rp, O_CLOEXEC) != 0) return make_error(GPUP_STATUS_INTERNAL, fmt::format("pipe: {}", std::strerror(errno)));
  UniqueFd report_r(rp[0]), report_w(rp[1]);
  if (::pipe2(sp, O_CLOEXEC) != 0) return make_error(GPUP_STATUS_INTERNAL, fmt::format("pipe: {}", std::strerror(errno)));
  UniqueFd sync_r(sp[0]), sync_w(sp[1]);

  int pidfd = -1;
  const unsigned long flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET |
                              CLONE_PIDFD | SIGCHLD;
  long pid = ::syscall(SYS_clone, flags, nullptr, &pidfd, nullptr, nullptr);
  if (pid < 0) return make_error(GPUP_STATUS_INTERNAL, fmt::format("clone (namespaces): {}", std::strerror(errno)));
  if (pid == 0) {
    sync_w.release();
    report_r.release();
    child(p, report_w.get(), sync_r.get());
  }
  Started started;
  started.pid = static_cast<pid_t>(pid);
  started.pidfd = UniqueFd(pidfd);
  started.id = p.id;
  sync_r.reset();
  report_w.reset();
  auto kill_child = [&] {
    ::syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0);
    while (::waitpid(started.pid, nullptr, 0) < 0 && errno == EINTR) {
    }
  };
  auto put = [&](const char* file, const std::string& text) -> Status {
    std::string path = fmt::format("/proc/{}/{}", pid, file);
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
    if (!fd || ::write(fd.get(), text.data(), text.size()) != ssize_t(text.size()))
      return make_error(GPUP_STATUS_INTERNAL, fmt::format("jail: write {}: {}", path, std::strerror(errno)));
    return {};
  };
  // Its one id, inside and out: uid/gid `id` in the jail is `id` on the host, and nothing else is.
  // setgroups stays allowed (gpupd, root, writes the map) so the child can drop gpupd's groups.
  Status st = put("uid_map", fmt::format("{0} {0} 1\n", p.id));
  if (st.ok()) st = put("gid_map", fmt::format("{0} {0} 1\n", p.id));
  if (st.ok() && before_start) st = before_start(started.pid);
  if (!st.ok()) {
    kill_child();
    return st.error();
  }
  char go = 1;
  if (::write(sync_w.get(), &go, 1) != 1) {
    kill_child();
    return make_error(GPUP_STATUS_INTERNAL, "jail: the child is gone");
  }
  sync_w.reset();
  // The set-up is a few dozen system calls; exec closes the pipe.
  pollfd pf{report_r.get(), POLLIN, 0};
  int n = ::poll(&pf, 1, 10000);
  Report r;
  ssize_t got = n > 0 ? ::read(report_r.get(), &r, sizeof r) : -1;
  if (got == 0) return started;
  kill_child();
  if (got == ssize_t(sizeof r)) {
    r.step[sizeof r.step - 1] = 0;
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("jail set-up failed at {}: {}", r.step, std::strerror(r.err)));
  }
  return make_error(GPUP_STATUS_TIMEOUT, "jail set-up did not finish within 10 s");
}

}  // namespace gpup::gpupd
