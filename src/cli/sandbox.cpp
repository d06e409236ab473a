#include "cli/sandbox.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/mount.h>
#include <linux/netlink.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "cli/cli.h"

namespace gpup::cli {

namespace {

std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  if (::realpath(p.c_str(), buf)) return buf;
  return {};
}

bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string first_line(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    auto b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos) continue;
    auto e = line.find_last_not_of(" \t\r");
    return line.substr(b, e - b + 1);
  }
  return {};
}

std::vector<std::string> icd_names(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n.size() > 4 && n.compare(n.size() - 4, 4, ".icd") == 0) out.push_back(n);
    }
    ::closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Where the ICD loader's dlopen would find a library an .icd file names by file name alone.
std::string resolve_library(const std::string& name) {
  if (name.empty()) return {};
  if (name.find('/') != std::string::npos) return real_path(name);
  for (const char* dir : {"/usr/local/lib/x86_64-linux-gnu", "/usr/local/lib", "/lib/x86_64-linux-gnu",
                          "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
                          "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu"}) {
    std::string p = real_path(std::string(dir) + "/" + name);
    if (!p.empty()) return p;
  }
  return {};
}

// What a guest's /etc shows of the host's, as paths below /etc: what programs and their libraries
// read at run time, and no secret. Everything else (shadow files, sudoers, ssh and TLS keys,
// gpup's and other services' configuration, machine-id) is absent inside. Names ending in '*'
// take every entry that begins so (python3, python3.11; java-17-openjdk).
constexpr const char* kEtcAllowed[] = {
    "passwd", "group", "hosts", "hostname", "resolv.conf", "nsswitch.conf", "host.conf", "gai.conf",
    "networks", "protocols", "services", "netconfig", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
    "localtime", "timezone", "locale.alias", "locale.gen", "os-release", "debian_version",
    "alternatives", "environment", "profile", "profile.d", "bash.bashrc", "inputrc", "shells",
    "terminfo", "mime.types", "magic", "magic.mime", "ca-certificates", "ca-certificates.conf",
    "ssl/certs", "ssl/openssl.cnf", "fonts", "xdg", "xml", "sgml", "perl", "python*", "java-*",
    "glvnd", "OpenCL"};

// ----- the child side: plain system calls, failures reported through the pipe ---------------

void report(int fd, int exec_failed, int err, const std::string& what) {
  SandboxReport r;
  r.exec_failed = exec_failed;
  r.err = err;
  std::snprintf(r.what, sizeof r.what, "%s", what.c_str());
  ssize_t ignored = ::write(fd, &r, sizeof r);
  (void)ignored;
}

bool do_mount(int rfd, const char* src, const std::string& dst, const char* type, unsigned long flags,
              const char* data, const char* what) {
  if (::mount(src, dst.c_str(), type, flags, data) == 0) return true;
  report(rfd, 0, errno, fmt::format("{} on {}", what, dst));
  return false;
}

// mkdir -p below a root; components on read-only host file systems already exist or fail.
bool make_dirs(int rfd, const std::string& path) {
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    std::string part = path.substr(0, pos);
    if (::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) {
      report(rfd, 0, errno, "mkdir " + part);
      return false;
    }
  }
  return true;
}

bool touch(int rfd, const std::string& path, mode_t mode) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0) {
    report(rfd, 0, errno, "create " + path);
    return false;
  }
  ::fchmod(fd, mode);
  ::close(fd);
  return true;
}

bool write_file(int rfd, const std::string& path, const std::string& content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0 || ::write(fd, content.data(), content.size()) != ssize_t(content.size())) {
    report(rfd, 0, errno, "write " + path);
    if (fd >= 0) ::close(fd);
    return false;
  }
  ::close(fd);
  return true;
}

bool bind(int rfd, const std::string& src, const std::string& dst, bool read_only, bool recursive = false) {
  if (!do_mount(rfd, src.c_str(), dst, nullptr, MS_BIND | (recursive ? MS_REC : 0), nullptr, "bind-mount")) return false;
  if (read_only &&
      !do_mount(rfd, nullptr, dst, nullptr, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, nullptr,
                "remount read-only"))
    return false;
  return true;
}

// Binds src (a directory, recursively, or a single file) at dst, making dst's mount point first.
bool bind_path(int rfd, const std::string& src, const std::string& dst, bool read_only) {
  const bool dir = is_dir(src);
  if (!(dir ? make_dirs(rfd, dst) : touch(rfd, dst, 0644))) return false;
  return bind(rfd, src, dst, read_only, dir);
}

bool set_tree_attr(int rfd, const std::string& path, uint64_t attr) {
  mount_attr a{};
  a.attr_set = attr;
  if (::syscall(SYS_mount_setattr, AT_FDCWD, path.c_str(), AT_RECURSIVE, &a, sizeof a) == 0) return true;
  report(rfd, 0, errno, "make the host file system read-only (mount_setattr) at " + path);
  return false;
}

volatile pid_t g_guest = 0;

void forward(int sig, siginfo_t* info, void*) {
  // Keyboard signals reach the guest directly (same process group); pass on only those sent to
  // init by a process (gpup run forwarding its own SIGTERM/SIGHUP).
  if (info && info->si_code == SI_KERNEL) return;
  if (g_guest > 0) ::kill(g_guest, sig);
}

}  // namespace

int enter_guest_policy(bool network, const char** failed_step) {
  *failed_step = "prctl(PR_SET_NO_NEW_PRIVS)";
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return errno;
  // No capabilities, now or after exec (root in the user namespace gets nothing from exec either).
  *failed_step = "drop the capability bounding set";
  for (int cap = 0; cap <= CAP_LAST_CAP; ++cap)
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL) return errno;
  ::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  *failed_step = "drop capabilities";
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capset, &hdr, data) != 0) return errno;

  *failed_step = "build the seccomp filter";
  scmp_filter_ctx ctx = ::seccomp_init(SCMP_ACT_ALLOW);
  if (!ctx) return ENOMEM;
  int rc = 0;
  auto deny = [&](int nr, int err = EPERM) {
    if (rc == 0 && nr >= 0) rc = ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(err), nr, 0);
  };
  // The reviewed list: what a guest program never needs and what could widen its reach.
  for (int nr : {SCMP_SYS(ptrace), SCMP_SYS(process_vm_readv), SCMP_SYS(process_vm_writev), SCMP_SYS(mount),
                 SCMP_SYS(umount2), SCMP_SYS(pivot_root), SCMP_SYS(chroot), SCMP_SYS(open_tree), SCMP_SYS(move_mount),
                 SCMP_SYS(fsopen), SCMP_SYS(fsconfig), SCMP_SYS(fsmount), SCMP_SYS(fspick), SCMP_SYS(mount_setattr),
                 SCMP_SYS(unshare), SCMP_SYS(setns), SCMP_SYS(bpf), SCMP_SYS(perf_event_open), SCMP_SYS(kexec_load),
                 SCMP_SYS(kexec_file_load), SCMP_SYS(init_module), SCMP_SYS(finit_module), SCMP_SYS(delete_module),
                 SCMP_SYS(keyctl), SCMP_SYS(add_key), SCMP_SYS(request_key), SCMP_SYS(userfaultfd),
                 SCMP_SYS(acct), SCMP_SYS(swapon), SCMP_SYS(swapoff), SCMP_SYS(reboot), SCMP_SYS(settimeofday),
                 SCMP_SYS(clock_settime), SCMP_SYS(adjtimex), SCMP_SYS(iopl), SCMP_SYS(ioperm)})
    deny(nr);
  // clone3 passes its flags in memory a filter cannot read: refuse it as unknown, callers fall back.
  deny(SCMP_SYS(clone3), ENOSYS);
  constexpr uint64_t kNamespaceFlags =
      CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP;
  // clone with any namespace flag: one rule per flag, as a filter compares masked equality only.
  for (uint64_t bit = 1; bit != 0 && rc == 0; bit <<= 1)
    if (kNamespaceFlags & bit)
      rc = ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, bit, bit));
  // Typing into a terminal (the guest's own pty, as no other is reachable; still refused) or
  // driving the console: the kernel compares the request's low 32 bits, so the filter does too.
  for (unsigned long request : {TIOCSTI, TIOCLINUX})
    if (rc == 0)
      rc = ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(ioctl), 1,
                              SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffu, static_cast<scmp_datum_t>(request)));
  // Sockets: unix ones (its endpoint, and its own programs' IPC); with --network also IP and
  // route netlink (what name resolution reads). Every other family (netlink of any other kind,
  // vsock, packet, bluetooth, the kernel's crypto API, ...) is refused; the kernel reads the
  // family's low 32 bits, so the filter does too. Families at or above AF_MAX do not exist.
  auto allowed = [&](int family) {
    return family == AF_UNIX || (network && (family == AF_INET || family == AF_INET6 || family == AF_NETLINK));
  };
  for (int family = 0; family < AF_MAX && rc == 0; ++family)
    if (!allowed(family))
      rc = ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(socket), 1,
                              SCMP_A0(SCMP_CMP_MASKED_EQ, 0xffffffffu, static_cast<scmp_datum_t>(family)));
  if (network && rc == 0)
    rc = ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(socket), 2,
                            SCMP_A0(SCMP_CMP_MASKED_EQ, 0xffffffffu, static_cast<scmp_datum_t>(AF_NETLINK)),
                            SCMP_A2(SCMP_CMP_NE, static_cast<scmp_datum_t>(NETLINK_ROUTE)));
  if (rc != 0) {
    ::seccomp_release(ctx);
    return -rc;
  }
  *failed_step = "load the seccomp filter";
  rc = ::seccomp_load(ctx);
  ::seccomp_release(ctx);
  return rc == 0 ? 0 : -rc;
}

Sandbox::~Sandbox() {
  if (!scratch_.empty()) ::rmdir(scratch_.c_str());
}

void Sandbox::prepare() {
  char buf[PATH_MAX];
  if (!::getcwd(buf, sizeof buf)) throw CliError(fmt::format("sandbox: getcwd: {}", std::strerror(errno)));
  cwd_ = buf;
  runtime_dir_ = real_path(opts_.runtime_dir);
  if (runtime_dir_.empty())
    throw CliError(fmt::format("sandbox: runtime directory {}: {}", opts_.runtime_dir, std::strerror(errno)));
  // The endpoint keeps its name; its directory is resolved like the runtime directory.
  auto slash = opts_.endpoint.rfind('/');
  std::string vm_dir = slash == std::string::npos ? std::string() : real_path(opts_.endpoint.substr(0, slash));
  if (vm_dir.empty() || vm_dir.rfind(runtime_dir_ + "/", 0) != 0)
    throw CliError(fmt::format("sandbox: endpoint {} is not inside the runtime directory {}", opts_.endpoint,
                               runtime_dir_));
  endpoint_ = vm_dir + opts_.endpoint.substr(slash);
  if (!opts_.state_dir.empty()) state_dir_ = real_path(opts_.state_dir);
  // The working directory is bound read-write under the same path: never one that would show the
  // guest gpupd's directories, or what the guest's /run hides.
  auto within = [&](const std::string& dir) { return !dir.empty() && (cwd_ == dir || cwd_.rfind(dir + "/", 0) == 0); };
  for (const auto& [dir, what] : {std::pair{runtime_dir_, "gpupd's runtime directory"},
                                  std::pair{state_dir_, "gpupd's state directory"}, std::pair{std::string("/run"), "/run"}})
    if (within(dir))
      throw CliError(fmt::format("run: the working directory {} is inside {} ({}), which a guest must not see; run "
                                 "from another directory",
                                 cwd_, what, dir),
                     125);
  {
    const std::string resolv = real_path("/etc/resolv.conf");
    if (resolv.rfind("/run/", 0) == 0) resolv_target_ = resolv;
  }
  if (!opts_.driver_store.empty() && is_dir(opts_.driver_store)) store_ = real_path(opts_.driver_store);

  for (const auto& n : icd_names(opts_.icd_dir)) icd_files_.emplace_back(n, read_text(opts_.icd_dir + "/" + n));
  vendors_replaced_ = is_dir(opts_.host_vendors_dir);
  // Every library the host's ICD files name is covered inside, so the guest cannot load a host
  // OpenCL implementation even by naming it.
  for (const auto& n : icd_names(opts_.host_vendors_dir)) {
    std::string lib = resolve_library(first_line(read_text(opts_.host_vendors_dir + "/" + n)));
    if (!lib.empty() && std::find(hidden_libs_.begin(), hidden_libs_.end(), lib) == hidden_libs_.end())
      hidden_libs_.push_back(lib);
  }

  // The host's /etc entries the guest sees.
  auto add_etc = [&](const std::string& rel) {
    const std::string host = "/etc/" + rel;
    struct stat st {};
    if (::lstat(host.c_str(), &st) != 0) return;
    if (S_ISLNK(st.st_mode)) {
      char target[PATH_MAX];
      const ssize_t n = ::readlink(host.c_str(), target, sizeof target - 1);
      if (n > 0) etc_.push_back({rel, 'l', std::string(target, static_cast<size_t>(n))});
    } else if (S_ISDIR(st.st_mode)) {
      etc_.push_back({rel, 'd', {}});
    } else if (S_ISREG(st.st_mode)) {
      etc_.push_back({rel, 'f', {}});
    }
  };
  std::vector<std::string> etc_names;
  if (DIR* d = ::opendir("/etc")) {
    while (dirent* e = ::readdir(d)) etc_names.emplace_back(e->d_name);
    ::closedir(d);
  }
  std::sort(etc_names.begin(), etc_names.end());
  for (const char* allowed : kEtcAllowed) {
    const std::string a = allowed;
    if (a.back() == '*') {
      for (const auto& n : etc_names)
        if (n.rfind(a.substr(0, a.size() - 1), 0) == 0) add_etc(n);
    } else {
      add_etc(a);
    }
  }

  // What the guest needs from the host's /tmp: the entry directly under /tmp holding each path.
  for (const auto& p : opts_.visible) {
    std::string rp = real_path(p);
    if (rp.rfind("/tmp/", 0) != 0) continue;
    const auto end = rp.find('/', 5);
    std::string top = rp.substr(0, end);
    if (top.size() > 5 && std::find(tmp_kept_.begin(), tmp_kept_.end(), top) == tmp_kept_.end())
      tmp_kept_.push_back(top);
  }

  char tmpl[] = "/tmp/gpup-sandbox-XXXXXX";
  if (!::mkdtemp(tmpl)) throw CliError(fmt::format("sandbox: mkdtemp /tmp: {}", std::strerror(errno)));
  scratch_ = tmpl;
}

std::vector<std::pair<std::string, std::string>> Sandbox::env_overrides() const {
  std::vector<std::pair<std::string, std::string>> env;
  if (vendors_replaced_) env.emplace_back("OCL_ICD_VENDORS", opts_.host_vendors_dir);
  env.emplace_back("GPUP_VRD", "unix:" + endpoint_);
  return env;
}

pid_t Sandbox::start(char* const argv[], char* const envp[], int report_fd) {
  int sync[2];
  if (::pipe2(sync, O_CLOEXEC) != 0) return -1;
  unsigned long flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (opts_.network ? 0 : CLONE_NEWNET);
  uid_t uid = ::getuid();
  gid_t gid = ::getgid();
  pid_t pid = static_cast<pid_t>(::syscall(SYS_clone, flags | SIGCHLD, nullptr, nullptr, nullptr, 0));
  if (pid < 0) {
    int e = errno;
    ::close(sync[0]);
    ::close(sync[1]);
    errno = e;
    return -1;
  }
  if (pid == 0) {
    ::close(sync[1]);
    child_init(argv, envp, report_fd, sync[0]);
  }
  ::close(sync[0]);
  // The parent maps the guest's root to the caller: no other host user is reachable from inside.
  auto put = [&](const char* file, const std::string& text) {
    std::string path = fmt::format("/proc/{}/{}", pid, file);
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == ssize_t(text.size());
    int e = errno;
    if (fd >= 0) ::close(fd);
    if (!ok) throw CliError(fmt::format("sandbox: cannot write {}: {}", path, std::strerror(e)), 125);
  };
  try {
    put("setgroups", "deny");
    put("uid_map", fmt::format("0 {} 1\n", uid));
    put("gid_map", fmt::format("0 {} 1\n", gid));
  } catch (...) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    ::close(sync[1]);
    throw;
  }
  char go = 1;
  ssize_t ignored = ::write(sync[1], &go, 1);
  (void)ignored;
  ::close(sync[1]);
  return pid;
}

bool Sandbox::build_root(int rfd) {
  const std::string root = scratch_ + "/root";
  // Nothing done here may reach the host's mount table.
  if (!do_mount(rfd, nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr, "make mounts private")) return false;
  if (!do_mount(rfd, "gpup-sandbox", scratch_, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", "mount tmpfs")) return false;
  if (::mkdir(root.c_str(), 0755) != 0) return report(rfd, 0, errno, "mkdir " + root), false;
  if (!touch(rfd, scratch_ + "/hidden", 0)) return false;
  // The host, read-only: from here on a mkdir on a host path fails rather than changing the host.
  if (!bind(rfd, "/", root, false, true)) return false;
  if (!set_tree_attr(rfd, root, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)) return false;

  // Its /etc: the allowed entries of the host's, read-only, on a tmpfs of its own.
  const std::string etc = root + "/etc";
  if (!do_mount(rfd, "tmpfs", etc, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755", "mount tmpfs")) return false;
  for (const auto& e : etc_) {
    const std::string inside = etc + "/" + e.path;
    const auto slash = inside.rfind('/');
    if (!make_dirs(rfd, inside.substr(0, slash))) return false;
    if (e.kind == 'l') {
      if (::symlink(e.target.c_str(), inside.c_str()) != 0) return report(rfd, 0, errno, "symlink " + inside), false;
    } else if (!bind_path(rfd, "/etc/" + e.path, inside, true)) {
      return false;
    }
  }
  if (vendors_replaced_ && opts_.host_vendors_dir.rfind("/etc/", 0) == 0 && !make_dirs(rfd, root + opts_.host_vendors_dir))
    return false;
  if (!do_mount(rfd, nullptr, etc, nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755",
                "remount read-only"))
    return false;

  // A private /tmp, but for the entries holding the guest's program and gpup's own files.
  if (!do_mount(rfd, "tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", "mount tmpfs")) return false;
  for (const auto& top : tmp_kept_)
    if (!bind_path(rfd, top, root + top, true)) return false;

  // A minimal /dev.
  const std::string dev = root + "/dev";
  if (!do_mount(rfd, "tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755", "mount tmpfs")) return false;
  for (const char* node : {"null", "zero", "full", "random", "urandom", "tty"}) {
    std::string host = std::string("/dev/") + node;
    struct stat st {};
    if (::stat(host.c_str(), &st) != 0 || !S_ISCHR(st.st_mode)) continue;
    if (!touch(rfd, dev + "/" + node, 0666) || !bind(rfd, host, dev + "/" + node, false)) return false;
  }
  if (!make_dirs(rfd, dev + "/shm") ||
      !do_mount(rfd, "tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", "mount tmpfs"))
    return false;
  const std::pair<const char*, const char*> links[] = {
      {"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"}};
  for (const auto& [name, target] : links)
    if (::symlink(target, (dev + "/" + name).c_str()) != 0) return report(rfd, 0, errno, "symlink /dev/" + std::string(name)), false;
  if (!do_mount(rfd, nullptr, dev, nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=0755",
                "remount read-only"))
    return false;

  // Its own /proc (of the new pid namespace).
  if (!do_mount(rfd, "proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr, "mount proc")) return false;

  // The ICD loader's vendors directory lists only gpup.
  if (vendors_replaced_) {
    std::string v = root + opts_.host_vendors_dir;
    if (!do_mount(rfd, "tmpfs", v, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", "mount tmpfs")) return false;
    for (const auto& [name, content] : icd_files_)
      if (!write_file(rfd, v + "/" + name, content)) return false;
    if (!do_mount(rfd, nullptr, v, nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=0755",
                  "remount read-only"))
      return false;
  }
  // The host's OpenCL implementations: present, unreadable.
  for (const auto& lib : hidden_libs_)
    if (!bind(rfd, scratch_ + "/hidden", root + lib, true)) return false;

  // The working directory, read-write (never the whole file system). Before what hides gpupd's
  // directories, so that a working directory holding them (their parent, say) shows them hidden.
  if (cwd_ != "/") {
    if (!make_dirs(rfd, root + cwd_) || !bind(rfd, cwd_, root + cwd_, false)) return false;
  }

  // /run: the host's services' sockets and state are none of the guest's. What name resolution
  // reads through /etc/resolv.conf stays.
  const std::string run = root + "/run";
  if (is_dir("/run")) {
    if (!do_mount(rfd, "tmpfs", run, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755", "mount tmpfs")) return false;
    if (!resolv_target_.empty() &&
        (!make_dirs(rfd, root + resolv_target_.substr(0, resolv_target_.rfind('/'))) ||
         !bind_path(rfd, resolv_target_, root + resolv_target_, true)))
      return false;
  }

  // gpupd's state directory: not there at all (an empty directory, read-only).
  if (!state_dir_.empty() && is_dir(state_dir_)) {
    if (!make_dirs(rfd, root + state_dir_) ||
        !do_mount(rfd, "tmpfs", root + state_dir_, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "mode=0755",
                  "mount tmpfs"))
      return false;
  }

  // gpupd's runtime directory: only this VM's endpoint and driver store.
  const std::string rt = root + runtime_dir_;
  if (!make_dirs(rfd, rt) ||
      !do_mount(rfd, "tmpfs", rt, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755", "mount tmpfs"))
    return false;
  std::string vm_dir = endpoint_.substr(0, endpoint_.rfind('/'));
  if (!make_dirs(rfd, root + vm_dir)) return false;
  struct stat st {};
  if (::stat(endpoint_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
    if (!touch(rfd, root + endpoint_, 0600) || !bind(rfd, endpoint_, root + endpoint_, false)) return false;
  }
  if (!store_.empty()) {
    std::string inside = vm_dir + "/HostDriverStore";
    if (store_ != inside) inside = store_;  // a store elsewhere keeps its own path
    if (!make_dirs(rfd, root + inside) || !bind(rfd, store_, root + inside, true, true)) return false;
  }
  if (!do_mount(rfd, nullptr, rt, nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755",
                "remount read-only"))
    return false;
  if (is_dir("/run") &&
      !do_mount(rfd, nullptr, run, nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755",
                "remount read-only"))
    return false;

  // Into the new root; the old one is detached.
  if (::chdir(root.c_str()) != 0) return report(rfd, 0, errno, "chdir " + root), false;
  if (::syscall(SYS_pivot_root, ".", ".") != 0) return report(rfd, 0, errno, "pivot_root"), false;
  if (::umount2(".", MNT_DETACH) != 0) return report(rfd, 0, errno, "detach the old root"), false;
  if (::chdir(cwd_.c_str()) != 0 && ::chdir("/") != 0) return report(rfd, 0, errno, "chdir " + cwd_), false;
  return true;
}

void Sandbox::child_init(char* const argv[], char* const envp[], int rfd, int sync_fd) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  char go = 0;
  if (::read(sync_fd, &go, 1) != 1) ::_exit(125);  // the parent failed to map ids
  ::close(sync_fd);
  if (!build_root(rfd)) ::_exit(125);

  // The guest: pid 2.
  pid_t guest = ::fork();
  if (guest < 0) {
    report(rfd, 0, errno, "fork the guest");
    ::_exit(125);
  }
  if (guest == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    // A session of its own: the operator's terminal is no longer its controlling terminal.
    if (::setsid() < 0) {
      report(rfd, 0, errno, "setsid");
      ::_exit(125);
    }
    if (opts_.terminal >= 0) {
      if (::ioctl(opts_.terminal, TIOCSCTTY, 0) != 0) {
        report(rfd, 0, errno, "make the guest's pty its controlling terminal");
        ::_exit(125);
      }
      for (int fd = 0; fd < 3; ++fd)
        if (opts_.terminal_fds[static_cast<size_t>(fd)] && ::dup2(opts_.terminal, fd) < 0) {
          report(rfd, 0, errno, "dup2 the guest's pty");
          ::_exit(125);
        }
      ::close(opts_.terminal);
    }
    const char* step = "";
    if (int e = enter_guest_policy(opts_.network, &step); e != 0) {
      report(rfd, 0, e, step);
      ::_exit(125);
    }
    ::execvpe(argv[0], argv, envp);
    report(rfd, 1, errno, "exec");
    ::_exit(127);
  }
  ::close(rfd);
  if (opts_.terminal >= 0) ::close(opts_.terminal);  // the guest's session alone holds its pty
  g_guest = guest;

  // pid 1: forward signals sent to it, reap everything, leave with the guest.
  struct sigaction sa {};
  sa.sa_sigaction = forward;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2}) ::sigaction(sig, &sa, nullptr);
  for (;;) {
    int status = 0;
    pid_t p = ::waitpid(-1, &status, 0);
    if (p < 0) {
      if (errno == EINTR) continue;
      ::_exit(125);
    }
    if (p != guest) continue;
    if (WIFEXITED(status)) ::_exit(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) ::_exit(128 + WTERMSIG(status));
  }
}

}  // namespace gpup::cli
