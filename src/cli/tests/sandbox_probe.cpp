// A guest that tests its own confinement: run as `gpup run --vm NAME -- sandbox_probe ...`
// (src/cli/tests/sandbox_test.sh supplies the host's paths). Each denied action is tried and must
// fail; each granted one must work. Prints one line per check and "PROBE OK" when all held; exits
// 1 on the first broken expectation.
//
//   --deny-open PATH      opening PATH (read-only) must fail       (host device nodes, host ICDs)
//   --deny-connect PATH   connecting to the unix socket PATH must fail (other endpoints, gpupd)
//   --expect-store DIR    libgpupocl must be loaded from DIR (the partition's HostDriverStore)
//   --unconfined          expect the opposite: no sandbox (gpup run --no-sandbox); the denied
//                         paths must be reachable, which shows the checks can fail
#include <CL/cl.h>
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

int g_failures = 0;

struct Family {
  int family, protocol;
  const char* name;
};
// Families a guest has no use for (those this kernel lacks must fail too, by the filter).
std::vector<Family> other_families() {
  return {{AF_NETLINK, NETLINK_ROUTE, "AF_NETLINK route"}, {AF_NETLINK, NETLINK_KOBJECT_UEVENT, "AF_NETLINK uevent"},
          {AF_PACKET, 0, "AF_PACKET"}, {AF_VSOCK, 0, "AF_VSOCK"}, {AF_ALG, 0, "AF_ALG"}, {AF_BLUETOOTH, 0, "AF_BLUETOOTH"}};
}

void check(bool ok, const std::string& what, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  if (!ok) ++g_failures;
}

std::string status_field(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0 && line.size() > std::strlen(key) && line[std::strlen(key)] == ':') {
      auto v = line.substr(std::strlen(key) + 1);
      return v.substr(v.find_first_not_of(" \t"));
    }
  return "?";
}

// 0 when it worked, else errno.
int try_open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return errno;
  ::close(fd);
  return 0;
}

int try_connect(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return errno;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  int e = rc == 0 ? 0 : errno;
  ::close(fd);
  return e;
}

std::string err_name(int e) { return e == 0 ? "succeeded" : std::string("failed: ") + std::strerror(e); }

// The OpenCL guest works through the partition's own endpoint: a platform named gpup, a buffer
// written and read back through its device.
void check_opencl() {
  cl_uint n = 0;
  cl_platform_id platform = nullptr;
  cl_int rc = clGetPlatformIDs(1, &platform, &n);
  check(rc == CL_SUCCESS && n == 1, "OpenCL: exactly one platform", "clGetPlatformIDs " + std::to_string(rc) + ", " + std::to_string(n));
  if (rc != CL_SUCCESS || n == 0) return;
  char name[256] = {};
  clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof name, name, nullptr);
  check(std::strstr(name, "gpup") != nullptr, "OpenCL: the platform is gpup's", name);
  cl_device_id dev = nullptr;
  rc = clGetDeviceIDs(platform, CL_DEVICE_TYPE_ALL, 1, &dev, nullptr);
  check(rc == CL_SUCCESS, "OpenCL: the partition is a device", std::to_string(rc));
  if (rc != CL_SUCCESS) return;
  cl_context ctx = clCreateContext(nullptr, 1, &dev, nullptr, nullptr, &rc);
  cl_command_queue q = rc == CL_SUCCESS ? clCreateCommandQueue(ctx, dev, 0, &rc) : nullptr;
  int in[64], out[64] = {};
  for (int i = 0; i < 64; ++i) in[i] = i * 7;
  cl_mem buf = rc == CL_SUCCESS ? clCreateBuffer(ctx, CL_MEM_READ_WRITE, sizeof in, nullptr, &rc) : nullptr;
  if (rc == CL_SUCCESS) rc = clEnqueueWriteBuffer(q, buf, CL_TRUE, 0, sizeof in, in, 0, nullptr, nullptr);
  if (rc == CL_SUCCESS) rc = clEnqueueReadBuffer(q, buf, CL_TRUE, 0, sizeof out, out, 0, nullptr, nullptr);
  check(rc == CL_SUCCESS && std::memcmp(in, out, sizeof in) == 0, "OpenCL: a buffer round trip through the endpoint",
        std::to_string(rc));
  if (buf) clReleaseMemObject(buf);
  if (q) clReleaseCommandQueue(q);
  if (ctx) clReleaseContext(ctx);
}

bool maps_contain(const std::string& needle) {
  std::ifstream in("/proc/self/maps");
  std::string line;
  while (std::getline(in, line))
    if (line.find(needle) != std::string::npos) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> deny_open, deny_connect;
  std::string store;
  bool unconfined = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--deny-open" && i + 1 < argc) deny_open.push_back(argv[++i]);
    else if (a == "--deny-connect" && i + 1 < argc) deny_connect.push_back(argv[++i]);
    else if (a == "--expect-store" && i + 1 < argc) store = argv[++i];
    else if (a == "--unconfined") unconfined = true;
    else {
      std::fprintf(stderr, "sandbox_probe: unknown argument %s\n", a.c_str());
      return 2;
    }
  }

  if (unconfined) {
    // The control run: without the sandbox these are reachable, so the confined run's failures
    // are the sandbox's doing.
    for (const auto& p : deny_open) check(try_open(p) == 0, "unconfined: open " + p, err_name(try_open(p)));
    for (const auto& p : deny_connect) check(try_connect(p) == 0, "unconfined: connect " + p, err_name(try_connect(p)));
    check(status_field("Seccomp") == "0", "unconfined: no seccomp filter", status_field("Seccomp"));
    const int nl = ::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    check(nl >= 0, "unconfined: socket(AF_NETLINK)", err_name(nl < 0 ? errno : 0));
    if (nl >= 0) ::close(nl);
    std::printf(g_failures ? "PROBE FAILED\n" : "PROBE OK\n");
    return g_failures ? 1 : 0;
  }

  check(status_field("NoNewPrivs") == "1", "NoNewPrivs 1", status_field("NoNewPrivs"));
  check(status_field("Seccomp") == "2", "Seccomp 2 (filter)", status_field("Seccomp"));
  check(status_field("CapEff") == "0000000000000000", "no effective capabilities", status_field("CapEff"));
  check(::getpid() == 2, "pid 2 in its own pid namespace", std::to_string(::getpid()));

  for (const auto& p : deny_open) {
    int e = try_open(p);
    check(e != 0, "open " + p + " is refused", err_name(e));
  }
  for (const auto& p : deny_connect) {
    int e = try_connect(p);
    check(e != 0, "connect " + p + " is refused", err_name(e));
  }

  // Only the gpup ICD is listed.
  std::vector<std::string> vendors;
  if (DIR* d = ::opendir("/etc/OpenCL/vendors")) {
    while (dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') vendors.push_back(e->d_name);
    ::closedir(d);
  }
  check(vendors.size() == 1 && vendors[0] == "gpup.icd", "/etc/OpenCL/vendors lists only gpup.icd",
        vendors.empty() ? "(empty)" : vendors[0] + (vendors.size() > 1 ? " ..." : ""));

  // The system calls the policy refuses.
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  check(s < 0 && errno == EPERM, "socket(AF_INET) is refused", err_name(s < 0 ? errno : 0));
  if (s >= 0) ::close(s);
  s = ::socket(AF_INET6, SOCK_DGRAM, 0);
  check(s < 0 && errno == EPERM, "socket(AF_INET6) is refused", err_name(s < 0 ? errno : 0));
  if (s >= 0) ::close(s);
  // Every other family but unix, by the filter (EPERM, not the kernel's EAFNOSUPPORT), even with
  // high bits set in the family argument.
  for (const auto& [family, protocol, name] : other_families()) {
    s = ::socket(family, SOCK_RAW | SOCK_CLOEXEC, protocol);
    check(s < 0 && errno == EPERM, std::string("socket(") + name + ") is refused", err_name(s < 0 ? errno : 0));
    if (s >= 0) ::close(s);
  }
  const long high = ::syscall(SYS_socket, (1L << 32) | AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  check(high < 0 && errno == EPERM, "socket(AF_NETLINK with high bits) is refused", err_name(high < 0 ? errno : 0));
  if (high >= 0) ::close(static_cast<int>(high));
  s = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  check(s >= 0, "socket(AF_UNIX) works", err_name(s < 0 ? errno : 0));
  if (s >= 0) ::close(s);
  check(::unshare(CLONE_NEWUSER) != 0, "unshare(CLONE_NEWUSER) is refused", std::strerror(errno));
  check(::mount("none", "/tmp", "tmpfs", 0, nullptr) != 0, "mount is refused", std::strerror(errno));
  check(::umount2("/dev", MNT_DETACH) != 0, "umount of /dev is refused", std::strerror(errno));
  check(::ptrace(PTRACE_TRACEME, 0, nullptr, nullptr) != 0, "ptrace is refused", std::strerror(errno));

  // The file system: the host read-only, /tmp and the working directory writable.
  int fd = ::open("/usr/gpup-sandbox-probe", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  check(fd < 0, "the host file system is read-only", err_name(fd < 0 ? errno : 0));
  if (fd >= 0) ::close(fd), ::unlink("/usr/gpup-sandbox-probe");
  fd = ::open("/tmp/probe", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  check(fd >= 0, "/tmp is writable", err_name(fd < 0 ? errno : 0));
  if (fd >= 0) ::close(fd), ::unlink("/tmp/probe");
  char tmpl[] = "sandbox-probe-XXXXXX";
  fd = ::mkstemp(tmpl);
  check(fd >= 0, "the working directory is writable", err_name(fd < 0 ? errno : 0));
  if (fd >= 0) ::close(fd), ::unlink(tmpl);

  // The partition's own endpoint works, and the UMD came from its driver store.
  check_opencl();
  if (!store.empty())
    check(maps_contain(store + "/lib/libgpupocl.so"), "libgpupocl is loaded from the HostDriverStore", store);

  std::printf(g_failures ? "PROBE FAILED\n" : "PROBE OK\n");
  return g_failures ? 1 : 0;
}
