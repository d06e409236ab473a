// A guest program for the end-to-end tests. It uses only the public thunk API (gpup/kmt.h) and
// the OpenCL KMD's private-data contract (gpup/kmd_opencl.h), exactly as a user-mode driver would,
// and runs as a separate process started through `gpup run`.
//
//   guest_e2e full              enumerate, query caps, build, copy/fill/dispatch, check results
//   guest_e2e limit             128 KiB passes; 128 KiB + 1 goes through a shared section (shared
//                               memory) or is refused before sending (stream transport)
//   guest_e2e bulk              a 1 MiB checksum escape and a program of over 200 KiB through
//                               shared sections (stream transport: refused before sending)
//   guest_e2e bad-handles       forged/stale/wrong-type handles and foreign GPU VAs get errors
//   guest_e2e hold              create objects, print "READY <alloc> <va>", wait for stdin EOF
//   guest_e2e foreign H VA      use another process's handle and GPU VA: both must fail
//   guest_e2e busy              create objects and keep the device busy until killed
//   guest_e2e stats             print the VM's statistics as "STATS key=value ..."
//   guest_e2e fill MIB          allocate MIB-sized allocations until one is refused, print
//                               "FILLED <bytes> <status>: <message>", wait for stdin EOF, free them
//   guest_e2e alloc TOTAL MIB   allocate TOTAL MiB in MIB-sized allocations, print the video memory
//                               info ("VMI budget=.. usage=.. reservation=.. available=..") and
//                               "ALLOCATED <bytes>", or "REFUSED <bytes> <status>: <message>"
//
// Exit code 0 means every check held; each failed check prints "FAIL: ..." first.
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gpup/kmd_opencl.h"
#include "gpup/kmt.h"

namespace {

int failures = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      std::printf("FAIL: %s:%d: ", __FILE__, __LINE__);    \
      std::printf(__VA_ARGS__);                            \
      std::printf(" [%s]\n", GpupKmtGetLastErrorMessage()); \
      ++failures;                                          \
    }                                                      \
  } while (0)

#define REQUIRE_OK(expr)                                                                               \
  do {                                                                                                 \
    gpup_status s_ = (expr);                                                                           \
    if (GPUP_FAILED(s_)) {                                                                             \
      std::printf("FAIL: %s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #expr, gpup_status_name(s_),     \
                  GpupKmtGetLastErrorMessage());                                                       \
      std::exit(1);                                                                                    \
    }                                                                                                  \
  } while (0)

struct Session {
  GPUPKMT_HANDLE adapter = 0;
  uint64_t luid = 0;
  GPUPKMT_HANDLE device = 0;
  GPUPKMT_HANDLE context = 0;
  GPUPKMT_HANDLE fence = 0;
  const volatile uint64_t* fence_value = nullptr;
  uint64_t next_fence = 1;
};

Session open_session() {
  Session s;
  GPUPKMT_ADAPTERINFO info[4] = {};
  GPUPKMT_ENUMADAPTERS en{4, info};
  REQUIRE_OK(GpupKmtEnumAdapters(&en));
  if (en.NumAdapters < 1) {
    std::printf("FAIL: no adapter enumerated\n");
    std::exit(1);
  }
  s.adapter = info[0].hAdapter;
  s.luid = info[0].AdapterLuid;
  GPUPKMT_CREATEDEVICE cd{s.adapter, 0, 0};
  REQUIRE_OK(GpupKmtCreateDevice(&cd));
  s.device = cd.hDevice;
  GPUPKMT_CREATECONTEXT cc{};
  cc.hDevice = s.device;
  REQUIRE_OK(GpupKmtCreateContext(&cc));
  s.context = cc.hContext;
  GPUPKMT_CREATESYNCHRONIZATIONOBJECT cs{};
  cs.hDevice = s.device;
  cs.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
  REQUIRE_OK(GpupKmtCreateSynchronizationObject(&cs));
  s.fence = cs.hSyncObject;
  s.fence_value = cs.pFenceValue;
  return s;
}

struct Buffer {
  GPUPKMT_HANDLE alloc = 0;
  uint64_t va = 0;
  uint64_t size = 0;
};

Buffer make_buffer(Session& s, uint64_t size) {
  Buffer b;
  b.size = size;
  GPUPKMT_CREATEALLOCATION ca{};
  ca.hDevice = s.device;
  ca.Flags = GPUPKMT_ALLOCATION_CPU_VISIBLE;
  ca.Size = size;
  REQUIRE_OK(GpupKmtCreateAllocation(&ca));
  b.alloc = ca.hAllocation;
  GPUPKMT_RESERVEGPUVA rv{0, size, 0};
  REQUIRE_OK(GpupKmtReserveGpuVirtualAddress(&rv));
  b.va = rv.VirtualAddress;
  GPUPKMT_MAPGPUVA mv{b.alloc, GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE, b.va, 0, (size + 4095) / 4096 * 4096};
  if (mv.Size > size) mv.Size = size;  // the mapping must stay inside the allocation
  mv.Size = size;
  REQUIRE_OK(GpupKmtMapGpuVirtualAddress(&mv));
  return b;
}

void* lock(Session& s, const Buffer& b) {
  GPUPKMT_LOCK l{s.device, b.alloc, nullptr, 0};
  REQUIRE_OK(GpupKmtLock(&l));
  return l.pData;
}
void unlock(Session& s, const Buffer& b) {
  GPUPKMT_UNLOCK u{s.device, b.alloc};
  REQUIRE_OK(GpupKmtUnlock(&u));
}

// Submits the command buffer followed by a fence signal, then waits for it from the CPU.
gpup_status run(Session& s, GPUPKMT_CMDBUF* cb) {
  const uint64_t v = s.next_fence++;
  GpupKmtCmdSignal(cb, s.fence, v);
  GPUPKMT_SUBMITCOMMAND sc{s.context, 0, cb, 0};
  gpup_status st = GpupKmtSubmitCommand(&sc);
  GpupKmtCmdBufReset(cb);
  if (GPUP_FAILED(st)) return st;
  GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT w{s.fence, v, 0, 20000};
  return GpupKmtWaitForSynchronizationObjectFromCpu(&w);
}

GPUPKMT_HANDLE build_program(Session& s, const char* source, std::string* log) {
  const std::string opts = "-cl-std=CL1.2";
  std::vector<uint8_t> priv(sizeof(GPUP_OCL_PROGRAM_DESC) + opts.size() + std::strlen(source));
  GPUP_OCL_PROGRAM_DESC d{GPUP_OCL_PROGRAM_MAGIC, GPUP_OCL_PROGRAM_VERSION, GPUP_OCL_PROGRAM_SOURCE,
                          static_cast<uint32_t>(opts.size()), static_cast<uint32_t>(std::strlen(source)), 0};
  std::memcpy(priv.data(), &d, sizeof d);
  std::memcpy(priv.data() + sizeof d, opts.data(), opts.size());
  std::memcpy(priv.data() + sizeof d + opts.size(), source, std::strlen(source));
  std::vector<char> out(16384);
  GPUPKMT_CREATEALLOCATION ca{};
  ca.hDevice = s.device;
  ca.Flags = GPUPKMT_ALLOCATION_PROGRAM;
  ca.pPrivateDriverData = priv.data();
  ca.PrivateDriverDataSize = static_cast<uint32_t>(priv.size());
  ca.pOutputData = out.data();
  ca.OutputDataSize = static_cast<uint32_t>(out.size());
  gpup_status st = GpupKmtCreateAllocation(&ca);
  if (log && ca.OutputDataWritten >= sizeof(GPUP_OCL_BUILD_RESULT)) {
    GPUP_OCL_BUILD_RESULT br;
    std::memcpy(&br, out.data(), sizeof br);
    log->assign(out.data() + sizeof br, std::min<size_t>(br.LogBytes, ca.OutputDataWritten - sizeof br));
  }
  return GPUP_SUCCEEDED(st) ? ca.hAllocation : 0;
}

const char* kKernels = R"CLC(
__kernel void saxpy(__global const float* x, __global float* y, float a) {
  size_t i = get_global_id(0);
  y[i] = a * x[i] + y[i];
}
__kernel void iota(__global int* out, int base) {
  out[get_global_id(0)] = base + (int)get_global_id(0);
}
)CLC";

int mode_full() {
  Session s = open_session();

  // Adapter queries through the VRD to the KMD, with the VM flags set.
  GPUPDDI_GPUPCAPS gpup{};
  GPUPKMT_QUERYADAPTERINFO q{s.adapter, GPUPDDI_QAITYPE_GPUPCAPS, nullptr, 0, sizeof gpup, &gpup, 0};
  REQUIRE_OK(GpupKmtQueryAdapterInfo(&q));
  std::printf("GPUPCAPS LiveMigration=%u HotDriverUpdate=%u\n", gpup.LiveMigration, gpup.HotDriverUpdate);
  GPUPDDI_GPUMMUCAPS mmu{};
  q = {s.adapter, GPUPDDI_QAITYPE_GPUMMUCAPS, nullptr, 0, sizeof mmu, &mmu, 0};
  REQUIRE_OK(GpupKmtQueryAdapterInfo(&q));
  CHECK(mmu.VirtualAddressBitCount >= 32 && mmu.PageTableLevelCount >= 1, "GPUMMUCAPS va bits %u levels %u",
        mmu.VirtualAddressBitCount, mmu.PageTableLevelCount);
  std::printf("GPUMMUCAPS va_bits=%u levels=%u\n", mmu.VirtualAddressBitCount, mmu.PageTableLevelCount);
  for (uint32_t level = 0; level < mmu.PageTableLevelCount; ++level) {
    GPUPDDI_PAGETABLELEVELDESC pt{};
    q = {s.adapter, GPUPDDI_QAITYPE_PAGETABLELEVELDESC, &level, sizeof level, sizeof pt, &pt, 0};
    REQUIRE_OK(GpupKmtQueryAdapterInfo(&q));
    CHECK(pt.PageTableIndexBitCount > 0, "level %u index bits", level);
    std::printf("PAGETABLELEVELDESC[%u] index_bits=%u size=%" PRIu64 "\n", level, pt.PageTableIndexBitCount, pt.PageTableSizeInBytes);
  }
  GPUPDDI_DEVICEINFO info{};
  q = {s.adapter, GPUPDDI_QAITYPE_DEVICEINFO, nullptr, 0, sizeof info, &info, 0};
  REQUIRE_OK(GpupKmtQueryAdapterInfo(&q));
  GPUPKMT_QUERYVIDEOMEMORYINFO vm{s.adapter};
  REQUIRE_OK(GpupKmtQueryVideoMemoryInfo(&vm));
  CHECK(info.GlobalMemSize <= vm.Budget, "device memory %" PRIu64 " above the partition budget %" PRIu64, info.GlobalMemSize, vm.Budget);
  std::printf("DEVICE %s (%s) partition budget %" PRIu64 " MiB\n", info.Name, info.Vendor, vm.Budget >> 20);

  const uint32_t n = 4096;
  Buffer x = make_buffer(s, n * 4), y = make_buffer(s, n * 4), z = make_buffer(s, n * 4);
  float* px = static_cast<float*>(lock(s, x));
  float* py = static_cast<float*>(lock(s, y));
  for (uint32_t i = 0; i < n; ++i) {
    px[i] = static_cast<float>(i);
    py[i] = 1.0f;
  }
  unlock(s, x);
  unlock(s, y);

  std::string log;
  GPUPKMT_HANDLE prog = build_program(s, kKernels, &log);
  CHECK(prog != 0, "program build failed: %s", log.c_str());
  if (!prog) return 1;
  std::printf("BUILD ok (log %zu bytes)\n", log.size());

  GPUPKMT_CMDBUF* cb = nullptr;
  REQUIRE_OK(GpupKmtCmdBufCreate(&cb));
  // y = 2x + y, then z = copy of y, then fill the second half of x with 7.0f, then iota into z's
  // first 256 ints.
  float a = 2.0f;
  GPUPKMT_KERNEL_ARG args[3] = {{GPUPDDI_ARG_BUFFER, 0, nullptr, x.va, x.size},
                                {GPUPDDI_ARG_BUFFER, 0, nullptr, y.va, y.size},
                                {GPUPDDI_ARG_VALUE, sizeof a, &a, 0, 0}};
  GPUPKMT_DISPATCH d{};
  d.hProgram = prog;
  d.pKernelName = "saxpy";
  d.WorkDim = 1;
  d.GlobalSize[0] = n;
  d.ArgCount = 3;
  d.pArgs = args;
  REQUIRE_OK(GpupKmtCmdDispatch(cb, &d));
  REQUIRE_OK(GpupKmtCmdCopy(cb, y.va, z.va, n * 4));
  float seven = 7.0f;
  REQUIRE_OK(GpupKmtCmdFill(cb, x.va + n * 2, n * 2, &seven, sizeof seven));
  REQUIRE_OK(run(s, cb));

  int base = 1000;
  GPUPKMT_KERNEL_ARG iargs[2] = {{GPUPDDI_ARG_BUFFER, 0, nullptr, z.va + 4096, 1024},
                                 {GPUPDDI_ARG_VALUE, sizeof base, &base, 0, 0}};
  d.pKernelName = "iota";
  d.GlobalSize[0] = 256;
  d.ArgCount = 2;
  d.pArgs = iargs;
  REQUIRE_OK(GpupKmtCmdDispatch(cb, &d));
  REQUIRE_OK(run(s, cb));

  px = static_cast<float*>(lock(s, x));
  py = static_cast<float*>(lock(s, y));
  auto* pz = static_cast<float*>(lock(s, z));
  int bad = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const float expect_y = 2.0f * static_cast<float>(i) + 1.0f;
    const float expect_x = i < n / 2 ? static_cast<float>(i) : 7.0f;
    if (py[i] != expect_y) ++bad;
    if (px[i] != expect_x) ++bad;
    if (i >= 1024 && i < 1024 + 256) {
      int32_t v;
      std::memcpy(&v, &pz[i], 4);
      if (v != 1000 + static_cast<int>(i - 1024)) ++bad;
    } else if (pz[i] != expect_y) {
      ++bad;
    }
  }
  CHECK(bad == 0, "%d wrong elements", bad);
  unlock(s, x);
  unlock(s, y);
  unlock(s, z);
  std::printf("RESULTS %u elements checked, %d wrong\n", 3 * n, bad);

  // A build failure returns the compiler's log.
  std::string errlog;
  GPUPKMT_HANDLE broken = build_program(s, "__kernel void broken( { }", &errlog);
  CHECK(broken == 0, "a broken program built");
  CHECK(!errlog.empty(), "no build log for a broken program");
  std::printf("BUILD-FAILURE log %zu bytes\n", errlog.size());

  GPUPKMT_QUERYSTATISTICS st{GPUPKMT_QUERYSTATISTICS_PROCESS};
  REQUIRE_OK(GpupKmtQueryStatistics(&st));
  std::printf("STATS allocations=%u vram=%" PRIu64 "\n", st.Allocations, st.VramUsed);
  GpupKmtCmdBufDestroy(cb);
  GPUPKMT_DESTROYDEVICE dd{s.device};
  REQUIRE_OK(GpupKmtDestroyDevice(&dd));
  return failures ? 1 : 0;
}

int mode_limit() {
  Session s = open_session();
  const uint32_t header = 24;  // MessageHeader
  const uint32_t fixed = 56;   // EscapeRequest (with its two section references)
  const uint32_t room = GPUPKMT_MAX_MESSAGE_SIZE - header - fixed;
  std::vector<uint8_t> payload(room);
  GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_ESCAPE_MAGIC, GPUP_OCL_ESCAPE_CHECKSUM};
  std::memcpy(payload.data(), &h, sizeof h);
  uint64_t fnv = GPUP_OCL_FNV1A64_OFFSET;
  for (size_t i = sizeof h; i < payload.size(); ++i) {
    payload[i] = static_cast<uint8_t>(i * 31 + 7);
    fnv = (fnv ^ payload[i]) * GPUP_OCL_FNV1A64_PRIME;
  }
  GPUP_OCL_ESCAPE_CHECKSUM_OUT out{};
  GPUPKMT_ESCAPE e{s.adapter, s.device, 0, payload.data(), room, sizeof out, &out, 0};
  REQUIRE_OK(GpupKmtEscape(&e));
  CHECK(out.ByteCount == room - sizeof h, "host saw %" PRIu64 " payload bytes", out.ByteCount);
  CHECK(out.Fnv1a64 == fnv, "checksum differs");
  std::printf("LIMIT exactly 128 KiB passed (%u bytes of private data, checksum ok)\n", room);

  GPUPKMT_CHANNELSTATS before{}, after{};
  GpupKmtGetChannelStats(&before);
  payload.push_back(0x42);
  fnv = (fnv ^ 0x42) * GPUP_OCL_FNV1A64_PRIME;
  e.pPrivateDriverData = payload.data();
  e.PrivateDriverDataSize = room + 1;
  out = {};
  gpup_status st = GpupKmtEscape(&e);
  GpupKmtGetChannelStats(&after);
  if (before.SharedMemory) {
    // One byte too many for a message: the private data goes through a shared section instead.
    CHECK(st == GPUP_STATUS_SUCCESS, "128 KiB + 1 returned %s", gpup_status_name(st));
    CHECK(out.ByteCount == room + 1 - sizeof h && out.Fnv1a64 == fnv, "checksum of 128 KiB + 1 differs");
    CHECK(after.RoundTrips - before.RoundTrips == 2, "%" PRIu64 " round trips (register + escape expected)",
          after.RoundTrips - before.RoundTrips);
    std::printf("LIMIT 128 KiB + 1 went through a shared section (checksum ok)\n");
  } else {
    CHECK(st == GPUP_STATUS_MESSAGE_TOO_LARGE, "128 KiB + 1 returned %s", gpup_status_name(st));
    CHECK(after.MessagesSent == before.MessagesSent, "the oversized message was sent");
    CHECK(std::strstr(GpupKmtGetLastErrorMessage(), "131073") != nullptr, "error text: %s", GpupKmtGetLastErrorMessage());
    std::printf("LIMIT 128 KiB + 1 refused before sending: %s\n", GpupKmtGetLastErrorMessage());
  }
  return failures ? 1 : 0;
}

// Bulk data through shared sections: a 1 MiB driver-private checksum escape, and a program whose
// source is over 200 KiB built with a 1 MiB output buffer and then run.
int mode_bulk() {
  Session s = open_session();
  GPUPKMT_CHANNELSTATS s0{}, s1{}, s2{};
  GpupKmtGetChannelStats(&s0);

  const size_t n = 1 << 20;
  std::vector<uint8_t> priv(sizeof(GPUP_OCL_PRIVATE_HEADER) + n);
  GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_ESCAPE_MAGIC, GPUP_OCL_ESCAPE_CHECKSUM};
  std::memcpy(priv.data(), &h, sizeof h);
  uint64_t fnv = GPUP_OCL_FNV1A64_OFFSET;
  for (size_t i = 0; i < n; ++i) {
    priv[sizeof h + i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
    fnv = (fnv ^ priv[sizeof h + i]) * GPUP_OCL_FNV1A64_PRIME;
  }
  GPUP_OCL_ESCAPE_CHECKSUM_OUT out{};
  GPUPKMT_ESCAPE e{s.adapter, s.device, 0, priv.data(), static_cast<uint32_t>(priv.size()), sizeof out, &out, 0};
  gpup_status st = GpupKmtEscape(&e);
  GpupKmtGetChannelStats(&s1);
  if (!s0.SharedMemory) {
    CHECK(st == GPUP_STATUS_MESSAGE_TOO_LARGE, "1 MiB escape on a stream channel: %s", gpup_status_name(st));
    CHECK(s1.MessagesSent == s0.MessagesSent, "something was sent");
    CHECK(std::strstr(GpupKmtGetLastErrorMessage(), std::to_string(priv.size()).c_str()) != nullptr,
          "the error does not name the size: %s", GpupKmtGetLastErrorMessage());
    std::printf("BULK refused on the stream transport: %s\n", GpupKmtGetLastErrorMessage());
    return failures ? 1 : 0;
  }
  CHECK(st == GPUP_STATUS_SUCCESS, "1 MiB escape: %s", gpup_status_name(st));
  CHECK(e.OutputDataWritten == sizeof out, "written %u", e.OutputDataWritten);
  CHECK(out.ByteCount == n, "the KMD saw %" PRIu64 " payload bytes", out.ByteCount);
  CHECK(out.Fnv1a64 == fnv, "checksum %016" PRIx64 ", expected %016" PRIx64, out.Fnv1a64, fnv);
  CHECK(s1.RoundTrips - s0.RoundTrips == 2, "%" PRIu64 " round trips for the first bulk escape (register + escape)",
        s1.RoundTrips - s0.RoundTrips);
  // The section is kept: the same call again is one round trip.
  out = {};
  REQUIRE_OK(GpupKmtEscape(&e));
  GpupKmtGetChannelStats(&s2);
  CHECK(out.Fnv1a64 == fnv, "second checksum differs");
  CHECK(s2.RoundTrips - s1.RoundTrips == 1, "%" PRIu64 " round trips for a bulk escape with a cached section",
        s2.RoundTrips - s1.RoundTrips);
  std::printf("BULK-ESCAPE %zu bytes, checksum %016" PRIx64 " ok\n", n, out.Fnv1a64);

  // A big program: the kernels, then a comment long enough to take the source past 200 KiB.
  std::string source = kKernels;
  source += "/* padding";
  while (source.size() < (256u << 10)) source += " the quick brown fox jumps over the lazy dog\n";
  source += "*/\n";
  const std::string opts = "-cl-std=CL1.2";
  std::vector<uint8_t> desc(sizeof(GPUP_OCL_PROGRAM_DESC) + opts.size() + source.size());
  GPUP_OCL_PROGRAM_DESC d{GPUP_OCL_PROGRAM_MAGIC, GPUP_OCL_PROGRAM_VERSION, GPUP_OCL_PROGRAM_SOURCE,
                          static_cast<uint32_t>(opts.size()), static_cast<uint32_t>(source.size()), 0};
  std::memcpy(desc.data(), &d, sizeof d);
  std::memcpy(desc.data() + sizeof d, opts.data(), opts.size());
  std::memcpy(desc.data() + sizeof d + opts.size(), source.data(), source.size());
  std::vector<char> build_out(1 << 20);  // beyond what a reply carries: the output uses the section too
  GPUPKMT_CREATEALLOCATION ca{};
  ca.hDevice = s.device;
  ca.Flags = GPUPKMT_ALLOCATION_PROGRAM;
  ca.pPrivateDriverData = desc.data();
  ca.PrivateDriverDataSize = static_cast<uint32_t>(desc.size());
  ca.pOutputData = build_out.data();
  ca.OutputDataSize = static_cast<uint32_t>(build_out.size());
  REQUIRE_OK(GpupKmtCreateAllocation(&ca));
  CHECK(ca.hAllocation != 0, "no program handle");
  CHECK(ca.OutputDataWritten >= sizeof(GPUP_OCL_BUILD_RESULT), "build output of %u bytes", ca.OutputDataWritten);
  GPUP_OCL_BUILD_RESULT br{};
  std::memcpy(&br, build_out.data(), sizeof br);
  CHECK(br.BuildError == 0, "build error %d", br.BuildError);

  Buffer b = make_buffer(s, 1024 * 4);
  GPUPKMT_CMDBUF* cb = nullptr;
  REQUIRE_OK(GpupKmtCmdBufCreate(&cb));
  int base = 7000;
  GPUPKMT_KERNEL_ARG args[2] = {{GPUPDDI_ARG_BUFFER, 0, nullptr, b.va, b.size},
                                {GPUPDDI_ARG_VALUE, sizeof base, &base, 0, 0}};
  GPUPKMT_DISPATCH disp{};
  disp.hProgram = ca.hAllocation;
  disp.pKernelName = "iota";
  disp.WorkDim = 1;
  disp.GlobalSize[0] = 1024;
  disp.ArgCount = 2;
  disp.pArgs = args;
  REQUIRE_OK(GpupKmtCmdDispatch(cb, &disp));
  REQUIRE_OK(run(s, cb));
  auto* p = static_cast<int32_t*>(lock(s, b));
  int bad = 0;
  for (int i = 0; i < 1024; ++i)
    if (p[i] != base + i) ++bad;
  unlock(s, b);
  CHECK(bad == 0, "%d wrong elements from the big program", bad);
  GpupKmtCmdBufDestroy(cb);
  std::printf("BULK-PROGRAM source %zu bytes built (output %u bytes), dispatch %d wrong\n", source.size(),
              ca.OutputDataWritten, bad);
  return failures ? 1 : 0;
}

int mode_bad_handles() {
  Session s = open_session();
  Buffer b = make_buffer(s, 8192);
  // Forged.
  GPUPKMT_LOCK l{s.device, 0x7fff0000u, nullptr, 0};
  gpup_status st = GpupKmtLock(&l);
  CHECK(st == GPUP_STATUS_INVALID_HANDLE, "forged handle: %s", gpup_status_name(st));
  std::printf("FORGED %s: %s\n", gpup_status_name(st), GpupKmtGetLastErrorMessage());
  // Wrong type: a context handle used as an allocation.
  GPUPKMT_DESTROYALLOCATION da{s.device, s.context};
  st = GpupKmtDestroyAllocation(&da);
  CHECK(st == GPUP_STATUS_OBJECT_TYPE_MISMATCH, "wrong type: %s", gpup_status_name(st));
  std::printf("WRONG-TYPE %s: %s\n", gpup_status_name(st), GpupKmtGetLastErrorMessage());
  // Stale.
  Buffer tmp = make_buffer(s, 4096);
  da = {s.device, tmp.alloc};
  REQUIRE_OK(GpupKmtDestroyAllocation(&da));
  st = GpupKmtDestroyAllocation(&da);
  CHECK(st == GPUP_STATUS_INVALID_HANDLE, "stale: %s", gpup_status_name(st));
  std::printf("STALE %s: %s\n", gpup_status_name(st), GpupKmtGetLastErrorMessage());
  // Oversized and overflowing sizes.
  GPUPKMT_CREATEALLOCATION ca{};
  ca.hDevice = s.device;
  ca.Size = UINT64_MAX;
  st = GpupKmtCreateAllocation(&ca);
  CHECK(GPUP_FAILED(st), "an allocation of 2^64-1 bytes succeeded");
  std::printf("HUGE %s: %s\n", gpup_status_name(st), GpupKmtGetLastErrorMessage());
  GPUPKMT_MAPGPUVA mv{b.alloc, 3, b.va, UINT64_MAX - 4095, 8192};
  st = GpupKmtMapGpuVirtualAddress(&mv);
  CHECK(GPUP_FAILED(st), "an overflowing mapping succeeded");
  // A GPU VA outside our own mappings: the submission faults the context, nothing runs.
  GPUPKMT_CMDBUF* cb = nullptr;
  REQUIRE_OK(GpupKmtCmdBufCreate(&cb));
  uint32_t pattern = 0x11111111;
  REQUIRE_OK(GpupKmtCmdFill(cb, b.va, 4096, &pattern, 4));            // valid
  REQUIRE_OK(GpupKmtCmdCopy(cb, b.va, b.va + (1ull << 30), 64));       // not ours
  st = run(s, cb);
  CHECK(st == GPUP_STATUS_GPU_PAGE_FAULT, "foreign VA: %s", gpup_status_name(st));
  std::printf("PAGE-FAULT %s: %s\n", gpup_status_name(st), GpupKmtGetLastErrorMessage());
  auto* p = static_cast<uint32_t*>(lock(s, b));
  CHECK(p[0] == 0, "the rejected submission's valid fill ran");
  unlock(s, b);
  GPUPKMT_GETDEVICESTATE ds{s.device};
  REQUIRE_OK(GpupKmtGetDeviceState(&ds));
  CHECK(ds.State == GPUPKMT_DEVICESTATE_RESET && ds.Reason == GPUP_STATUS_GPU_PAGE_FAULT, "device state %u reason %d",
        ds.State, ds.Reason);
  // The process carries on: a new device and context work.
  Session s2 = open_session();
  Buffer b2 = make_buffer(s2, 4096);
  REQUIRE_OK(GpupKmtCmdFill(cb, b2.va, 4096, &pattern, 4));
  REQUIRE_OK(run(s2, cb));
  p = static_cast<uint32_t*>(lock(s2, b2));
  CHECK(p[1023] == pattern, "fill after a fault did not run");
  unlock(s2, b2);
  GpupKmtCmdBufDestroy(cb);
  std::printf("RECOVERED after the fault\n");
  return failures ? 1 : 0;
}

int mode_hold() {
  Session s = open_session();
  Buffer b = make_buffer(s, 4096);
  auto* p = static_cast<uint32_t*>(lock(s, b));
  for (int i = 0; i < 1024; ++i) p[i] = 0xabcd0000u + i;
  unlock(s, b);
  std::printf("READY %u %" PRIu64 "\n", b.alloc, b.va);
  std::fflush(stdout);
  char buf[64];
  while (read(0, buf, sizeof buf) > 0) {
  }
  p = static_cast<uint32_t*>(lock(s, b));
  int bad = 0;
  for (int i = 0; i < 1024; ++i)
    if (p[i] != 0xabcd0000u + i) ++bad;
  CHECK(bad == 0, "%d words of this process's allocation changed", bad);
  unlock(s, b);
  std::printf("INTACT %d changed\n", bad);
  return failures ? 1 : 0;
}

int mode_foreign(uint32_t handle, uint64_t va) {
  Session s = open_session();
  GPUPKMT_LOCK l{s.device, handle, nullptr, 0};
  gpup_status st = GpupKmtLock(&l);
  CHECK(GPUP_FAILED(st), "another process's handle locked");
  std::printf("FOREIGN-HANDLE %s: %s\n", gpup_status_name(st), GpupKmtGetLastErrorMessage());
  GPUPKMT_CMDBUF* cb = nullptr;
  REQUIRE_OK(GpupKmtCmdBufCreate(&cb));
  uint32_t pattern = 0;
  REQUIRE_OK(GpupKmtCmdFill(cb, va, 4096, &pattern, 4));
  st = run(s, cb);
  CHECK(st == GPUP_STATUS_GPU_PAGE_FAULT, "another process's VA: %s", gpup_status_name(st));
  std::printf("FOREIGN-VA %s: %s\n", gpup_status_name(st), GpupKmtGetLastErrorMessage());
  GpupKmtCmdBufDestroy(cb);
  return failures ? 1 : 0;
}

int mode_busy() {
  Session s = open_session();
  std::vector<Buffer> bufs;
  for (int i = 0; i < 8; ++i) bufs.push_back(make_buffer(s, 1 << 20));
  GPUPKMT_CMDBUF* cb = nullptr;
  REQUIRE_OK(GpupKmtCmdBufCreate(&cb));
  std::printf("BUSY %d\n", static_cast<int>(getpid()));
  std::fflush(stdout);
  for (uint64_t i = 0;; ++i) {
    for (int k = 0; k < 7; ++k) REQUIRE_OK(GpupKmtCmdCopy(cb, bufs[k].va, bufs[k + 1].va, 1 << 20));
    GpupKmtCmdSignal(cb, s.fence, s.next_fence++);
    GPUPKMT_SUBMITCOMMAND sc{s.context, 0, cb, 0};
    REQUIRE_OK(GpupKmtSubmitCommand(&sc));
    GpupKmtCmdBufReset(cb);
    if (i % 8 == 7) {
      GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT w{s.fence, s.next_fence - 4, 0, 20000};
      REQUIRE_OK(GpupKmtWaitForSynchronizationObjectFromCpu(&w));
    }
  }
}

int mode_stats() {
  GPUPKMT_QUERYSTATISTICS st{GPUPKMT_QUERYSTATISTICS_VM};
  REQUIRE_OK(GpupKmtQueryStatistics(&st));
  // This process is connected too, with no objects: it counts as one process.
  std::printf("STATS processes=%u devices=%u contexts=%u allocations=%u sync_objects=%u vram=%" PRIu64 "\n", st.Processes,
              st.Devices, st.Contexts, st.Allocations, st.SyncObjects, st.VramUsed);
  return 0;
}

gpup_status allocate(Session& s, uint64_t size, GPUPKMT_HANDLE* out) {
  GPUPKMT_CREATEALLOCATION ca{};
  ca.hDevice = s.device;
  ca.Flags = GPUPKMT_ALLOCATION_CPU_VISIBLE;
  ca.Size = size;
  gpup_status st = GpupKmtCreateAllocation(&ca);
  *out = ca.hAllocation;
  return st;
}

void print_video_memory_info(Session& s) {
  GPUPKMT_QUERYVIDEOMEMORYINFO q{};
  q.hAdapter = s.adapter;
  REQUIRE_OK(GpupKmtQueryVideoMemoryInfo(&q));
  std::printf("VMI budget=%" PRIu64 " usage=%" PRIu64 " reservation=%" PRIu64 " available=%" PRIu64 "\n", q.Budget,
              q.CurrentUsage, q.CurrentReservation, q.AvailableForReservation);
}

int mode_fill(uint64_t chunk) {
  Session s = open_session();
  std::vector<GPUPKMT_HANDLE> allocs;
  gpup_status st = GPUP_STATUS_SUCCESS;
  for (;;) {
    GPUPKMT_HANDLE h = 0;
    st = allocate(s, chunk, &h);
    if (GPUP_FAILED(st)) break;
    allocs.push_back(h);
  }
  std::printf("FILLED %" PRIu64 " %s: %s\n", chunk * allocs.size(), gpup_status_name(st), GpupKmtGetLastErrorMessage());
  print_video_memory_info(s);
  std::fflush(stdout);
  char buf[64];
  while (read(0, buf, sizeof buf) > 0) {
  }
  for (GPUPKMT_HANDLE h : allocs) {
    GPUPKMT_DESTROYALLOCATION d{s.device, h};
    REQUIRE_OK(GpupKmtDestroyAllocation(&d));
  }
  std::printf("FREED\n");
  return 0;
}

int mode_alloc(uint64_t total, uint64_t chunk) {
  Session s = open_session();
  uint64_t done = 0;
  while (done < total) {
    GPUPKMT_HANDLE h = 0;
    gpup_status st = allocate(s, std::min(chunk, total - done), &h);
    if (GPUP_FAILED(st)) {
      std::printf("REFUSED %" PRIu64 " %s: %s\n", done, gpup_status_name(st), GpupKmtGetLastErrorMessage());
      print_video_memory_info(s);
      return 1;
    }
    done += std::min(chunk, total - done);
  }
  print_video_memory_info(s);
  std::printf("ALLOCATED %" PRIu64 "\n", done);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string mode = argc > 1 ? argv[1] : "full";
  if (mode == "full") return mode_full();
  if (mode == "limit") return mode_limit();
  if (mode == "bulk") return mode_bulk();
  if (mode == "bad-handles") return mode_bad_handles();
  if (mode == "hold") return mode_hold();
  if (mode == "foreign" && argc > 3) return mode_foreign(static_cast<uint32_t>(std::strtoul(argv[2], nullptr, 0)), std::strtoull(argv[3], nullptr, 0));
  if (mode == "busy") return mode_busy();
  if (mode == "stats") return mode_stats();
  if (mode == "fill" && argc > 2) return mode_fill(std::strtoull(argv[2], nullptr, 0) << 20);
  if (mode == "alloc" && argc > 3)
    return mode_alloc(std::strtoull(argv[2], nullptr, 0) << 20, std::strtoull(argv[3], nullptr, 0) << 20);
  std::fprintf(stderr, "usage: guest_e2e full|limit|bulk|bad-handles|hold|foreign H VA|busy|stats\n");
  return 2;
}
