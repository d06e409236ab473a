// cl_differential: many small OpenCL 1.2 (+3.0 queries) test cases whose output is deterministic,
// so the same binary run natively (PoCL) and as a gpup guest (the gpup ICD) can be compared line
// by line. Every case prints its name, the cl_int codes the API returned and checksums/values of
// what it computed; values that legitimately differ between implementations (names, sizes,
// pointers, timestamps) are printed only as predicates. Wrong computed results print "FAIL" and
// make the program exit nonzero.
//
// Usage: cl_differential [--list] [GROUP_OR_CASE_PREFIX...]
#define CL_TARGET_OPENCL_VERSION 300
#define CL_USE_DEPRECATED_OPENCL_1_2_APIS
#include <CL/cl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Output and checking

int g_failures = 0;
std::string g_case;

void line(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void line(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fputs("  ", stdout);
  std::vprintf(fmt, ap);
  std::fputc('\n', stdout);
  va_end(ap);
}

const char* err_name(cl_int e) {
  switch (e) {
#define E(x) \
  case x:    \
    return #x;
    E(CL_SUCCESS) E(CL_DEVICE_NOT_FOUND) E(CL_DEVICE_NOT_AVAILABLE) E(CL_COMPILER_NOT_AVAILABLE)
    E(CL_MEM_OBJECT_ALLOCATION_FAILURE) E(CL_OUT_OF_RESOURCES) E(CL_OUT_OF_HOST_MEMORY)
    E(CL_PROFILING_INFO_NOT_AVAILABLE) E(CL_MEM_COPY_OVERLAP) E(CL_IMAGE_FORMAT_MISMATCH)
    E(CL_IMAGE_FORMAT_NOT_SUPPORTED) E(CL_BUILD_PROGRAM_FAILURE) E(CL_MAP_FAILURE)
    E(CL_MISALIGNED_SUB_BUFFER_OFFSET) E(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
    E(CL_COMPILE_PROGRAM_FAILURE) E(CL_LINKER_NOT_AVAILABLE) E(CL_LINK_PROGRAM_FAILURE)
    E(CL_DEVICE_PARTITION_FAILED) E(CL_KERNEL_ARG_INFO_NOT_AVAILABLE) E(CL_INVALID_VALUE)
    E(CL_INVALID_DEVICE_TYPE) E(CL_INVALID_PLATFORM) E(CL_INVALID_DEVICE) E(CL_INVALID_CONTEXT)
    E(CL_INVALID_QUEUE_PROPERTIES) E(CL_INVALID_COMMAND_QUEUE) E(CL_INVALID_HOST_PTR)
    E(CL_INVALID_MEM_OBJECT) E(CL_INVALID_IMAGE_FORMAT_DESCRIPTOR) E(CL_INVALID_IMAGE_SIZE)
    E(CL_INVALID_SAMPLER) E(CL_INVALID_BINARY) E(CL_INVALID_BUILD_OPTIONS) E(CL_INVALID_PROGRAM)
    E(CL_INVALID_PROGRAM_EXECUTABLE) E(CL_INVALID_KERNEL_NAME) E(CL_INVALID_KERNEL_DEFINITION)
    E(CL_INVALID_KERNEL) E(CL_INVALID_ARG_INDEX) E(CL_INVALID_ARG_VALUE) E(CL_INVALID_ARG_SIZE)
    E(CL_INVALID_KERNEL_ARGS) E(CL_INVALID_WORK_DIMENSION) E(CL_INVALID_WORK_GROUP_SIZE)
    E(CL_INVALID_WORK_ITEM_SIZE) E(CL_INVALID_GLOBAL_OFFSET) E(CL_INVALID_EVENT_WAIT_LIST)
    E(CL_INVALID_EVENT) E(CL_INVALID_OPERATION) E(CL_INVALID_GL_OBJECT) E(CL_INVALID_BUFFER_SIZE)
    E(CL_INVALID_MIP_LEVEL) E(CL_INVALID_GLOBAL_WORK_SIZE) E(CL_INVALID_PROPERTY)
    E(CL_INVALID_IMAGE_DESCRIPTOR) E(CL_INVALID_COMPILER_OPTIONS) E(CL_INVALID_LINKER_OPTIONS)
    E(CL_INVALID_DEVICE_PARTITION_COUNT)
#undef E
    default:
      return nullptr;
  }
}

std::string code(cl_int e) {
  const char* n = err_name(e);
  return n ? n : "CL_ERROR(" + std::to_string(e) + ")";
}

// Prints "label=CODE".
void rc(const char* label, cl_int e) { line("%s=%s", label, code(e).c_str()); }

// CL_MEM_MAP_COUNT once every map has been unmapped and the queue finished. PoCL 3.1 may update
// the count a moment after clFinish returns (about 1 run in 30), so it gets a second to settle.
cl_uint settled_map_count(cl_mem m) {
  cl_uint mc = 99;
  for (int i = 0; i < 1000; ++i) {
    clGetMemObjectInfo(m, CL_MEM_MAP_COUNT, sizeof mc, &mc, nullptr);
    if (mc == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return mc;
}

// Records a wrong computed result (or a broken invariant the test relies on).
void check(bool ok, const char* what) {
  if (ok) return;
  ++g_failures;
  line("FAIL %s", what);
  std::fprintf(stderr, "FAIL [%s] %s\n", g_case.c_str(), what);
}

// Prints "label=0|1" for a predicate (never the underlying value).
void pred(const char* label, bool v) { line("%s=%d", label, v ? 1 : 0); }

uint64_t fnv(const void* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= 1099511628211ull;
  }
  return h;
}
template <class T>
void sum(const char* label, const std::vector<T>& v) {
  line("%s=%016llx", label, static_cast<unsigned long long>(fnv(v.data(), v.size() * sizeof(T))));
}

// Deterministic pseudo-random data (fixed seed per use).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint32_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<uint32_t>(s >> 11);
  }
};
std::vector<int> rand_ints(size_t n, uint64_t seed, int mod = 1000) {
  Rng r(seed);
  std::vector<int> v(n);
  for (auto& x : v) x = static_cast<int>(r.next() % static_cast<uint32_t>(mod)) - mod / 2;
  return v;
}

// ---------------------------------------------------------------------------------------------
// Shared environment: the first platform with a device, its first device, a context and a queue.

cl_platform_id P = nullptr;
cl_device_id D = nullptr;
cl_context C = nullptr;
cl_command_queue Q = nullptr;
cl_ulong g_max_alloc = 0, g_global_mem = 0;
cl_uint g_align_bytes = 0;
size_t g_max_wg = 0;
size_t g_max_items[3] = {0, 0, 0};

template <class T>
T dev_info(cl_device_info p) {
  T v{};
  clGetDeviceInfo(D, p, sizeof v, &v, nullptr);
  return v;
}
std::string dev_str(cl_device_info p) {
  size_t n = 0;
  if (clGetDeviceInfo(D, p, 0, nullptr, &n) != CL_SUCCESS || n == 0) return {};
  std::string s(n, '\0');
  clGetDeviceInfo(D, p, n, s.data(), nullptr);
  if (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}
std::string plat_str(cl_platform_info p) {
  size_t n = 0;
  if (clGetPlatformInfo(P, p, 0, nullptr, &n) != CL_SUCCESS || n == 0) return {};
  std::string s(n, '\0');
  clGetPlatformInfo(P, p, n, s.data(), nullptr);
  if (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// "OpenCL X.Y ..." -> X*10+Y (0 if malformed).
int parse_version(const std::string& s, const char* prefix) {
  size_t pl = std::strlen(prefix);
  if (s.compare(0, pl, prefix) != 0) return 0;
  int maj = 0, min = 0;
  if (std::sscanf(s.c_str() + pl, "%d.%d", &maj, &min) != 2) return 0;
  return maj * 10 + min;
}
int g_dev_version = 0;

cl_program build(const char* src, const char* opts = "", cl_int* build_rc = nullptr) {
  cl_int e = 0;
  cl_program p = clCreateProgramWithSource(C, 1, &src, nullptr, &e);
  if (e != CL_SUCCESS) {
    if (build_rc) *build_rc = e;
    return nullptr;
  }
  e = clBuildProgram(p, 1, &D, opts, nullptr, nullptr);
  if (build_rc) *build_rc = e;
  if (e != CL_SUCCESS && !build_rc) {
    size_t n = 0;
    clGetProgramBuildInfo(p, D, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
    std::string log(n, '\0');
    clGetProgramBuildInfo(p, D, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr);
    std::fprintf(stderr, "build failed: %s\n%s\n", code(e).c_str(), log.c_str());
    check(false, "helper program build");
  }
  return p;
}

cl_mem buf(size_t n, cl_mem_flags f = CL_MEM_READ_WRITE, void* host = nullptr) {
  cl_int e = 0;
  cl_mem m = clCreateBuffer(C, f, n, host, &e);
  if (e != CL_SUCCESS) check(false, "helper buffer creation");
  return m;
}
template <class T>
cl_mem buf_from(const std::vector<T>& v, cl_mem_flags f = CL_MEM_READ_WRITE) {
  return buf(v.size() * sizeof(T), f | CL_MEM_COPY_HOST_PTR, const_cast<T*>(v.data()));
}
template <class T>
std::vector<T> read_all(cl_mem m, size_t count, cl_command_queue q = nullptr) {
  std::vector<T> v(count);
  cl_int e = clEnqueueReadBuffer(q ? q : Q, m, CL_TRUE, 0, count * sizeof(T), v.data(), 0, nullptr, nullptr);
  if (e != CL_SUCCESS) {
    line("read_all=%s", code(e).c_str());
    check(false, "helper read");
  }
  return v;
}

// The main kernel library used by many cases.
const char* kLib = R"CLC(
__kernel void add(__global const int* a, __global const int* b, __global int* c) {
  size_t i = get_global_id(0);
  c[i] = a[i] + b[i];
}
__kernel void scale(__global int* a, int k) {
  size_t i = get_global_id(0);
  a[i] = a[i] * k;
}
__kernel void add_const(__global int* a, int k) {
  size_t i = get_global_id(0);
  a[i] += k;
}
__kernel void copy_int(__global const int* src, __global int* dst) {
  size_t i = get_global_id(0);
  dst[i] = src[i];
}
// Writes the global id (offset included) of every work-item into a dense array indexed by the
// id relative to the offset.
__kernel void ids3(__global uint* out) {
  size_t x = get_global_id(0), y = get_global_id(1), z = get_global_id(2);
  size_t rx = x - get_global_offset(0), ry = y - get_global_offset(1), rz = z - get_global_offset(2);
  size_t w = get_global_size(0), h = get_global_size(1);
  out[(rz * h + ry) * w + rx] = (uint)(x + 100 * y + 10000 * z) + 1000000u * (uint)get_work_dim();
}
__kernel void local_sum(__global const int* in, __local int* scratch, __global int* out) {
  size_t l = get_local_id(0), n = get_local_size(0);
  scratch[l] = in[get_global_id(0)];
  barrier(CLK_LOCAL_MEM_FENCE);
  for (size_t s = n / 2; s > 0; s >>= 1) {
    if (l < s) scratch[l] += scratch[l + s];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  if (l == 0) out[get_group_id(0)] = scratch[0];
}
__kernel __attribute__((reqd_work_group_size(4, 1, 1))) void reqd4(__global int* o) {
  o[get_global_id(0)] = (int)get_local_id(0);
}
__kernel void argtypes(__global float* f, __constant int* c, __local char* l, int v,
                       const __global float* restrict ro, volatile __global int* vo) {
  if (get_global_id(0) == 0) { f[0] = (float)(c[0] + v); vo[0] = (int)ro[0]; }
}
__kernel void null_ok(__global int* maybe, __global int* out) {
  out[get_global_id(0)] = maybe ? 1 : 2;
}
__kernel void busy(__global int* a, int iters) {
  size_t i = get_global_id(0);
  int x = a[i];
  for (int k = 0; k < iters; ++k) x = x * 1103515245 + 12345;
  a[i] = x;
}
)CLC";
cl_program g_lib = nullptr;

cl_kernel kern(const char* name, cl_program p = nullptr) {
  cl_int e = 0;
  cl_kernel k = clCreateKernel(p ? p : g_lib, name, &e);
  if (e != CL_SUCCESS) {
    line("create_kernel_%s=%s", name, code(e).c_str());
    check(false, "helper kernel creation");
  }
  return k;
}
template <class T>
cl_int arg(cl_kernel k, cl_uint i, const T& v) {
  return clSetKernelArg(k, i, sizeof(T), &v);
}
cl_int run1(cl_kernel k, size_t global, const size_t* local = nullptr, cl_command_queue q = nullptr,
            cl_uint nwait = 0, const cl_event* wait = nullptr, cl_event* ev = nullptr) {
  return clEnqueueNDRangeKernel(q ? q : Q, k, 1, nullptr, &global, local, nwait, wait, ev);
}

// An object of the wrong type, for "wrong object" cases: a real handle of another kind, so the
// ICD loader can dispatch it and the implementation must reject it itself.
cl_mem g_some_buffer = nullptr;

// ---------------------------------------------------------------------------------------------
// Case registry

struct Case {
  std::string name;
  std::function<void()> fn;
};
std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}
struct Reg {
  Reg(const char* n, std::function<void()> f) { registry().push_back({n, std::move(f)}); }
};
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define CASE_N(name, n) \
  static void CAT(case_, n)(); \
  static Reg CAT(reg_, n)(name, CAT(case_, n)); \
  static void CAT(case_, n)()
#define CASE(name) CASE_N(name, __COUNTER__)

}  // namespace

#include "cases_platform.inc"
#include "cases_memory.inc"
#include "cases_program.inc"
#include "cases_exec.inc"
#include "cases_image.inc"

namespace {

bool setup() {
  cl_uint np = 0;
  cl_int e = clGetPlatformIDs(0, nullptr, &np);
  if (e != CL_SUCCESS || np == 0) {
    std::printf("setup: clGetPlatformIDs=%s num=%u\n", code(e).c_str(), np);
    return false;
  }
  std::vector<cl_platform_id> ps(np);
  clGetPlatformIDs(np, ps.data(), nullptr);
  for (auto p : ps) {
    cl_uint nd = 0;
    if (clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, 1, &D, &nd) == CL_SUCCESS && nd > 0) {
      P = p;
      break;
    }
  }
  if (!P) {
    std::printf("setup: no device\n");
    return false;
  }
  cl_context_properties props[] = {CL_CONTEXT_PLATFORM, reinterpret_cast<cl_context_properties>(P), 0};
  C = clCreateContext(props, 1, &D, nullptr, nullptr, &e);
  if (e != CL_SUCCESS) {
    std::printf("setup: clCreateContext=%s\n", code(e).c_str());
    return false;
  }
  Q = clCreateCommandQueue(C, D, 0, &e);
  if (e != CL_SUCCESS) {
    std::printf("setup: clCreateCommandQueue=%s\n", code(e).c_str());
    return false;
  }
  g_max_alloc = dev_info<cl_ulong>(CL_DEVICE_MAX_MEM_ALLOC_SIZE);
  g_global_mem = dev_info<cl_ulong>(CL_DEVICE_GLOBAL_MEM_SIZE);
  g_align_bytes = dev_info<cl_uint>(CL_DEVICE_MEM_BASE_ADDR_ALIGN) / 8;
  g_max_wg = dev_info<size_t>(CL_DEVICE_MAX_WORK_GROUP_SIZE);
  clGetDeviceInfo(D, CL_DEVICE_MAX_WORK_ITEM_SIZES, sizeof g_max_items, g_max_items, nullptr);
  g_dev_version = parse_version(dev_str(CL_DEVICE_VERSION), "OpenCL ");
  g_lib = build(kLib);
  g_some_buffer = buf(64);
  return g_lib != nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::vector<std::string> filters;
  bool list = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--list") == 0)
      list = true;
    else
      filters.push_back(argv[i]);
  }
  auto selected = [&](const std::string& n) {
    if (filters.empty()) return true;
    for (auto& f : filters)
      if (n.compare(0, f.size(), f) == 0) return true;
    return false;
  };
  if (list) {
    for (auto& c : registry())
      if (selected(c.name)) std::printf("%s\n", c.name.c_str());
    return 0;
  }
  if (!setup()) {
    std::printf("SETUP FAILED\n");
    return 2;
  }
  int ran = 0;
  for (auto& c : registry()) {
    if (!selected(c.name)) continue;
    g_case = c.name;
    std::printf("[%s]\n", c.name.c_str());
    c.fn();
    clFinish(Q);
    ++ran;
  }
  clReleaseMemObject(g_some_buffer);
  clReleaseProgram(g_lib);
  clReleaseCommandQueue(Q);
  clReleaseContext(C);
  std::printf("SUMMARY cases=%d failures=%d\n", ran, g_failures);
  return g_failures == 0 ? 0 : 1;
}
