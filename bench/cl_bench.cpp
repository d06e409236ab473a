// cl_bench: one plain OpenCL program that measures what users of a paravirtual GPU feel. It
// links only the ICD loader, so the same binary runs natively (PoCL) and as a gpup guest
// (`gpup run --vm NAME -- cl_bench`); bench/run_bench.sh runs it both ways, alternately, and
// computes the gpup/native ratios.
//
// Latency mode (default): every test prints one line
//   RESULT {"test":"write4","unit":"us","bytes":4,"n":2000,"median":..,"p99":..,"samples":[..]}
// with every sample (microseconds per operation), so a driver can pool several runs.
//   write4, read4      blocking 4-byte clEnqueueWriteBuffer / clEnqueueReadBuffer
//   empty_kernel       clEnqueueNDRangeKernel of an empty kernel (1 work-item) + clFinish
//   queued_kernels     1000 tiny kernels queued, then one clFinish; the sample is per kernel
//   write_64m, read_64m  blocking 64 MiB write / read (bandwidth = bytes / time)
//   create_release     clCreateBuffer (4 KiB) + clReleaseMemObject
//   build_warm         clCreateProgramWithSource + clBuildProgram + release, warm kernel cache
//   sgemm              SGEMM N×N end to end: create buffers, write A and B, the kernel, read C
// Throughput mode (--throughput launch|sgemm): waits until --start-at (CLOCK_REALTIME, ms since
// the epoch) so that several processes start together, runs the workload for --seconds and prints
//   THROUGHPUT {"workload":"launch","ops":..,"seconds":..,"ops_per_s":..}
//
// Options: --quick (tiny sizes and counts: for the smoke test), --tests a,b,c, --reps-scale F,
// --sgemm-n N. Exit status 0 only when every test ran and SGEMM's result checks out.
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

#define CHECK(call)                                                                       \
  do {                                                                                    \
    cl_int err_ = (call);                                                                 \
    if (err_ != CL_SUCCESS) {                                                             \
      std::fprintf(stderr, "cl_bench: %s failed: %d (line %d)\n", #call, err_, __LINE__); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

using Clock = std::chrono::steady_clock;
double us_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

const char* kSource = R"CLC(
// gpup cl_bench kernels
__kernel void empty(void) {}
__kernel void tiny(__global int* p) { p[get_global_id(0)] += 1; }
#define TS 16
__kernel void sgemm(const int n, __global const float* a, __global const float* b, __global float* c) {
  const int row = get_local_id(1), col = get_local_id(0);
  const int grow = TS * get_group_id(1) + row, gcol = TS * get_group_id(0) + col;
  __local float as[TS][TS];
  __local float bs[TS][TS];
  float acc = 0.0f;
  for (int t = 0; t < n / TS; ++t) {
    as[row][col] = a[grow * n + t * TS + col];
    bs[row][col] = b[(t * TS + row) * n + gcol];
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k = 0; k < TS; ++k) acc += as[row][k] * bs[k][col];
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  c[grow * n + gcol] = acc;
}
)CLC";

struct Cl {
  cl_platform_id platform = nullptr;
  cl_device_id device = nullptr;
  cl_context ctx = nullptr;
  cl_command_queue q = nullptr;
  cl_program prog = nullptr;
  cl_kernel empty = nullptr, tiny = nullptr, sgemm = nullptr;
  std::string platform_name, device_name;
};

cl_program build(Cl& cl) {
  cl_int err = CL_SUCCESS;
  cl_program p = clCreateProgramWithSource(cl.ctx, 1, &kSource, nullptr, &err);
  CHECK(err);
  err = clBuildProgram(p, 1, &cl.device, "", nullptr, nullptr);
  if (err != CL_SUCCESS) {
    size_t n = 0;
    clGetProgramBuildInfo(p, cl.device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
    std::string log(n, '\0');
    clGetProgramBuildInfo(p, cl.device, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr);
    std::fprintf(stderr, "cl_bench: build failed (%d): %s\n", err, log.c_str());
    std::exit(1);
  }
  return p;
}

std::string info_string(cl_platform_id p) {
  size_t n = 0;
  clGetPlatformInfo(p, CL_PLATFORM_NAME, 0, nullptr, &n);
  std::string s(n, '\0');
  clGetPlatformInfo(p, CL_PLATFORM_NAME, n, s.data(), nullptr);
  if (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}
std::string info_string(cl_device_id d) {
  size_t n = 0;
  clGetDeviceInfo(d, CL_DEVICE_NAME, 0, nullptr, &n);
  std::string s(n, '\0');
  clGetDeviceInfo(d, CL_DEVICE_NAME, n, s.data(), nullptr);
  if (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

Cl open_cl() {
  Cl cl;
  cl_uint np = 0;
  CHECK(clGetPlatformIDs(0, nullptr, &np));
  std::vector<cl_platform_id> ps(np);
  CHECK(clGetPlatformIDs(np, ps.data(), nullptr));
  for (auto p : ps) {
    cl_uint nd = 0;
    if (clGetDeviceIDs(p, CL_DEVICE_TYPE_ALL, 1, &cl.device, &nd) == CL_SUCCESS && nd > 0) {
      cl.platform = p;
      break;
    }
  }
  if (!cl.platform) {
    std::fprintf(stderr, "cl_bench: no OpenCL device\n");
    std::exit(1);
  }
  cl.platform_name = info_string(cl.platform);
  cl.device_name = info_string(cl.device);
  cl_int err = CL_SUCCESS;
  cl.ctx = clCreateContext(nullptr, 1, &cl.device, nullptr, nullptr, &err);
  CHECK(err);
  cl.q = clCreateCommandQueue(cl.ctx, cl.device, 0, &err);
  CHECK(err);
  cl.prog = build(cl);
  cl.empty = clCreateKernel(cl.prog, "empty", &err);
  CHECK(err);
  cl.tiny = clCreateKernel(cl.prog, "tiny", &err);
  CHECK(err);
  cl.sgemm = clCreateKernel(cl.prog, "sgemm", &err);
  CHECK(err);
  return cl;
}

cl_mem make_buffer(Cl& cl, size_t bytes) {
  cl_int err = CL_SUCCESS;
  cl_mem m = clCreateBuffer(cl.ctx, CL_MEM_READ_WRITE, bytes, nullptr, &err);
  CHECK(err);
  return m;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) o += c;
  }
  return o;
}

double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return 0;
  size_t i = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size()))) ;
  i = i == 0 ? 0 : i - 1;
  return v[std::min(i, v.size() - 1)];
}

void report(const char* test, size_t bytes, const std::vector<double>& samples) {
  std::ostringstream o;
  o.precision(6);
  o << "RESULT {\"test\":\"" << test << "\",\"unit\":\"us\",\"bytes\":" << bytes << ",\"n\":" << samples.size()
    << ",\"median\":" << quantile(samples, 0.5) << ",\"p99\":" << quantile(samples, 0.99) << ",\"samples\":[";
  for (size_t i = 0; i < samples.size(); ++i) o << (i ? "," : "") << samples[i];
  o << "]}";
  std::printf("%s\n", o.str().c_str());
  std::fflush(stdout);
}

// Runs `op` warmup times untimed, then n timed times.
std::vector<double> measure(int warmup, int n, const std::function<void()>& op) {
  for (int i = 0; i < warmup; ++i) op();
  std::vector<double> s;
  s.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    op();
    s.push_back(us_since(t0));
  }
  return s;
}

struct Config {
  bool quick = false;
  double scale = 1.0;
  int sgemm_n = 512;
  std::set<std::string> tests;
  std::string throughput;
  double seconds = 5;
  long long start_at_ms = 0;
  int count(int full, int quick_n) const {
    return quick ? quick_n : std::max(1, static_cast<int>(full * scale));
  }
};

// SGEMM end to end; returns false if C is wrong.
bool run_sgemm(Cl& cl, int n, const std::vector<float>& a, const std::vector<float>& b, std::vector<float>& c) {
  const size_t bytes = sizeof(float) * static_cast<size_t>(n) * static_cast<size_t>(n);
  cl_mem ma = make_buffer(cl, bytes), mb = make_buffer(cl, bytes), mc = make_buffer(cl, bytes);
  CHECK(clEnqueueWriteBuffer(cl.q, ma, CL_TRUE, 0, bytes, a.data(), 0, nullptr, nullptr));
  CHECK(clEnqueueWriteBuffer(cl.q, mb, CL_TRUE, 0, bytes, b.data(), 0, nullptr, nullptr));
  CHECK(clSetKernelArg(cl.sgemm, 0, sizeof(int), &n));
  CHECK(clSetKernelArg(cl.sgemm, 1, sizeof(cl_mem), &ma));
  CHECK(clSetKernelArg(cl.sgemm, 2, sizeof(cl_mem), &mb));
  CHECK(clSetKernelArg(cl.sgemm, 3, sizeof(cl_mem), &mc));
  const size_t global[2] = {static_cast<size_t>(n), static_cast<size_t>(n)}, local[2] = {16, 16};
  CHECK(clEnqueueNDRangeKernel(cl.q, cl.sgemm, 2, nullptr, global, local, 0, nullptr, nullptr));
  CHECK(clEnqueueReadBuffer(cl.q, mc, CL_TRUE, 0, bytes, c.data(), 0, nullptr, nullptr));
  clReleaseMemObject(ma);
  clReleaseMemObject(mb);
  clReleaseMemObject(mc);
  // Spot checks against the CPU.
  for (int k = 0; k < 8; ++k) {
    const int i = (k * 37) % n, j = (k * 91 + 5) % n;
    double ref = 0;
    for (int t = 0; t < n; ++t)
      ref += static_cast<double>(a[static_cast<size_t>(i * n + t)]) * b[static_cast<size_t>(t * n + j)];
    if (std::fabs(ref - c[static_cast<size_t>(i * n + j)]) > 1e-3 * (1 + std::fabs(ref))) {
      std::fprintf(stderr, "cl_bench: sgemm C[%d][%d] = %f, expected %f\n", i, j, c[static_cast<size_t>(i * n + j)],
                   ref);
      return false;
    }
  }
  return true;
}

void fill_matrices(int n, std::vector<float>& a, std::vector<float>& b, std::vector<float>& c) {
  const size_t nn = static_cast<size_t>(n) * static_cast<size_t>(n);
  a.resize(nn);
  b.resize(nn);
  c.assign(nn, 0.f);
  for (size_t i = 0; i < nn; ++i) {
    a[i] = static_cast<float>((i * 7) % 13) / 13.f - 0.5f;
    b[i] = static_cast<float>((i * 5) % 11) / 11.f - 0.5f;
  }
}

int latency_mode(Cl& cl, const Config& cfg) {
  auto want = [&](const char* t) { return cfg.tests.empty() || cfg.tests.count(t) > 0; };
  bool good = true;
  cl_mem small = make_buffer(cl, 4096);
  uint32_t word = 0x12345678;

  if (want("write4"))
    report("write4", 4, measure(cfg.count(50, 2), cfg.count(2000, 5), [&] {
             CHECK(clEnqueueWriteBuffer(cl.q, small, CL_TRUE, 0, 4, &word, 0, nullptr, nullptr));
           }));
  if (want("read4"))
    report("read4", 4, measure(cfg.count(50, 2), cfg.count(2000, 5), [&] {
             CHECK(clEnqueueReadBuffer(cl.q, small, CL_TRUE, 0, 4, &word, 0, nullptr, nullptr));
           }));
  if (want("empty_kernel")) {
    const size_t one = 1;
    report("empty_kernel", 0, measure(cfg.count(50, 2), cfg.count(1000, 5), [&] {
             CHECK(clEnqueueNDRangeKernel(cl.q, cl.empty, 1, nullptr, &one, nullptr, 0, nullptr, nullptr));
             CHECK(clFinish(cl.q));
           }));
  }
  if (want("queued_kernels")) {
    const int per = cfg.quick ? 10 : 1000;
    const size_t one = 1;
    CHECK(clSetKernelArg(cl.tiny, 0, sizeof(cl_mem), &small));
    auto s = measure(cfg.count(2, 1), cfg.count(20, 2), [&] {
      for (int i = 0; i < per; ++i)
        CHECK(clEnqueueNDRangeKernel(cl.q, cl.tiny, 1, nullptr, &one, nullptr, 0, nullptr, nullptr));
      CHECK(clFinish(cl.q));
    });
    for (double& v : s) v /= per;
    report("queued_kernels", 0, s);
  }
  if (want("write_64m") || want("read_64m")) {
    const size_t bytes = cfg.quick ? (1u << 20) : (64u << 20);
    cl_mem big = make_buffer(cl, bytes);
    std::vector<uint8_t> host(bytes, 0x3c);
    if (want("write_64m"))
      report("write_64m", bytes, measure(cfg.count(2, 1), cfg.count(10, 2), [&] {
               CHECK(clEnqueueWriteBuffer(cl.q, big, CL_TRUE, 0, bytes, host.data(), 0, nullptr, nullptr));
             }));
    if (want("read_64m"))
      report("read_64m", bytes, measure(cfg.count(2, 1), cfg.count(10, 2), [&] {
               CHECK(clEnqueueReadBuffer(cl.q, big, CL_TRUE, 0, bytes, host.data(), 0, nullptr, nullptr));
             }));
    clReleaseMemObject(big);
  }
  if (want("create_release"))
    report("create_release", 4096, measure(cfg.count(20, 2), cfg.count(500, 5), [&] {
             cl_mem m = make_buffer(cl, 4096);
             CHECK(clReleaseMemObject(m));
           }));
  if (want("build_warm"))
    report("build_warm", 0, measure(cfg.count(1, 0), cfg.count(10, 1), [&] {
             cl_program p = build(cl);
             CHECK(clReleaseProgram(p));
           }));
  if (want("sgemm")) {
    const int n = cfg.quick ? 32 : cfg.sgemm_n;
    std::vector<float> a, b, c;
    fill_matrices(n, a, b, c);
    report("sgemm", 0, measure(cfg.count(1, 0), cfg.count(5, 1), [&] {
             if (!run_sgemm(cl, n, a, b, c)) good = false;
           }));
  }
  clReleaseMemObject(small);
  return good ? 0 : 1;
}

int throughput_mode(Cl& cl, const Config& cfg) {
  std::function<bool()> op;
  std::vector<float> a, b, c;
  const int n = cfg.quick ? 32 : 256;
  const size_t one = 1;
  if (cfg.throughput == "launch") {
    op = [&] {
      CHECK(clEnqueueNDRangeKernel(cl.q, cl.empty, 1, nullptr, &one, nullptr, 0, nullptr, nullptr));
      CHECK(clFinish(cl.q));
      return true;
    };
  } else if (cfg.throughput == "sgemm") {
    fill_matrices(n, a, b, c);
    op = [&] { return run_sgemm(cl, n, a, b, c); };
  } else {
    std::fprintf(stderr, "cl_bench: unknown workload %s (launch, sgemm)\n", cfg.throughput.c_str());
    return 2;
  }
  if (!op()) return 1;  // warm up (and check) before the common start
  if (cfg.start_at_ms > 0) {
    const auto start = std::chrono::system_clock::time_point(std::chrono::milliseconds(cfg.start_at_ms));
    if (std::chrono::system_clock::now() > start) std::fprintf(stderr, "cl_bench: started late\n");
    std::this_thread::sleep_until(start);
  }
  const auto t0 = Clock::now();
  const auto end = t0 + std::chrono::duration<double>(cfg.seconds);
  long long ops = 0;
  while (Clock::now() < end) {
    if (!op()) return 1;
    ++ops;
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("THROUGHPUT {\"workload\":\"%s\",\"ops\":%lld,\"seconds\":%.4f,\"ops_per_s\":%.3f}\n",
              cfg.throughput.c_str(), ops, secs, static_cast<double>(ops) / secs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "cl_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--quick") {
      cfg.quick = true;
    } else if (a == "--tests") {
      std::stringstream ss(next());
      for (std::string t; std::getline(ss, t, ',');)
        if (!t.empty()) cfg.tests.insert(t);
    } else if (a == "--reps-scale") {
      cfg.scale = std::atof(next().c_str());
    } else if (a == "--sgemm-n") {
      cfg.sgemm_n = std::atoi(next().c_str());
      if (cfg.sgemm_n < 16 || cfg.sgemm_n % 16) {
        std::fprintf(stderr, "cl_bench: --sgemm-n must be a multiple of 16\n");
        return 2;
      }
    } else if (a == "--throughput") {
      cfg.throughput = next();
    } else if (a == "--seconds") {
      cfg.seconds = std::atof(next().c_str());
    } else if (a == "--start-at") {
      cfg.start_at_ms = std::atoll(next().c_str());
    } else {
      std::fprintf(stderr,
                   "usage: cl_bench [--quick] [--tests a,b] [--reps-scale F] [--sgemm-n N]\n"
                   "                [--throughput launch|sgemm --seconds S --start-at EPOCH_MS]\n");
      return 2;
    }
  }
  Cl cl = open_cl();
  std::printf("PLATFORM {\"platform\":\"%s\",\"device\":\"%s\"}\n", json_escape(cl.platform_name).c_str(),
              json_escape(cl.device_name).c_str());
  const int rc = cfg.throughput.empty() ? latency_mode(cl, cfg) : throughput_mode(cl, cfg);
  clReleaseKernel(cl.empty);
  clReleaseKernel(cl.tiny);
  clReleaseKernel(cl.sgemm);
  clReleaseProgram(cl.prog);
  clReleaseCommandQueue(cl.q);
  clReleaseContext(cl.ctx);
  return rc;
}
