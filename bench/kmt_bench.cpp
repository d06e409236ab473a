// Micro-benchmarks of the thunk library (libgpupkmt, include/gpup/kmt.h): what a thunk costs as
// the OpenCL ICD sees it, channel + codec + the host's handling included.
//
// Host: with GPUP_VRD set (e.g. under `gpup run --vm a -- bench_kmt`) the thunks go to the
// partition's real worker (gpup-vmwp, validation, the OpenCL KMD on PoCL); without it, to the
// in-process fake host of the libgpupkmt unit tests (src/guest/kmt/fake_host.h), which answers
// with no work behind the reply. The "host" label of each benchmark says which.
//
//   BM_QueryVideoMemoryInfo       one SYNC round trip, a handler that only reads counters
//   BM_GetDeviceState             answered locally (0 round trips) while nothing changed
//   BM_SyncObjectCreateDestroy    real worker only: two round trips
//   BM_SignalFromCpuThenWait      one round trip (signal); the wait is satisfied from the fence page
//   BM_AllocationCreateDestroy    4 KiB CPU-visible allocation: two round trips
//   BM_SubmitSignalWait           real worker only: an empty command buffer that signals a fence,
//                                 one async submit, then a CPU wait for it (the skeleton of
//                                 "empty kernel + clFinish" without the kernel)
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "bench_util.h"
#include "gpup/kmt.h"
#include "guest/kmt/fake_host.h"

namespace {

std::unique_ptr<gpup::kmt::test::FakeHost> g_fake;
GPUPKMT_HANDLE g_adapter = 0;
GPUPKMT_HANDLE g_device = 0;
std::string g_host;

bool ok(gpup_status s, const char* what) {
  if (s == GPUP_STATUS_SUCCESS) return true;
  std::fprintf(stderr, "bench_kmt: %s failed: %d %s\n", what, s, GpupKmtGetLastErrorMessage());
  return false;
}

bool setup() {
  const char* vrd = std::getenv("GPUP_VRD");
  if (vrd && *vrd) {
    g_host = "worker";
    if (!ok(GpupKmtConnect(nullptr), "GpupKmtConnect")) return false;
  } else {
    g_host = "fake";
    g_fake = std::make_unique<gpup::kmt::test::FakeHost>();
    if (!ok(GpupKmtConnect(g_fake->endpoint().c_str()), "GpupKmtConnect")) return false;
  }
  GPUPKMT_ADAPTERINFO info[GPUPKMT_ADAPTERS_MAX];
  GPUPKMT_ENUMADAPTERS e{GPUPKMT_ADAPTERS_MAX, info};
  if (!ok(GpupKmtEnumAdapters(&e), "EnumAdapters") || e.NumAdapters == 0) return false;
  g_adapter = info[0].hAdapter;
  GPUPKMT_CREATEDEVICE d{g_adapter, 0, 0};
  if (!ok(GpupKmtCreateDevice(&d), "CreateDevice")) return false;
  g_device = d.hDevice;
  return true;
}

void label(benchmark::State& state) { state.SetLabel("host=" + g_host); }

void BM_QueryVideoMemoryInfo(benchmark::State& state) {
  gpup::bench::Latencies lat;
  for (auto _ : state) {
    GPUPKMT_QUERYVIDEOMEMORYINFO q{};
    q.hAdapter = g_adapter;
    const uint64_t t0 = gpup::bench::now_ns();
    if (GpupKmtQueryVideoMemoryInfo(&q) != GPUP_STATUS_SUCCESS) {
      state.SkipWithError(GpupKmtGetLastErrorMessage());
      break;
    }
    lat.add(gpup::bench::now_ns() - t0);
  }
  lat.report(state);
  label(state);
}
BENCHMARK(BM_QueryVideoMemoryInfo)->UseRealTime();

void BM_GetDeviceState(benchmark::State& state) {
  for (auto _ : state) {
    GPUPKMT_GETDEVICESTATE s{};
    s.hDevice = g_device;
    if (GpupKmtGetDeviceState(&s) != GPUP_STATUS_SUCCESS) {
      state.SkipWithError(GpupKmtGetLastErrorMessage());
      break;
    }
  }
  label(state);
}
BENCHMARK(BM_GetDeviceState)->UseRealTime();

void BM_SyncObjectCreateDestroy(benchmark::State& state) {
  for (auto _ : state) {
    GPUPKMT_CREATESYNCHRONIZATIONOBJECT c{};
    c.hDevice = g_device;
    c.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
    if (GpupKmtCreateSynchronizationObject(&c) != GPUP_STATUS_SUCCESS) {
      state.SkipWithError(GpupKmtGetLastErrorMessage());
      break;
    }
    GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT d{c.hSyncObject};
    GpupKmtDestroySynchronizationObject(&d);
  }
  label(state);
}

void BM_SignalFromCpuThenWait(benchmark::State& state) {
  GPUPKMT_CREATESYNCHRONIZATIONOBJECT c{};
  c.hDevice = g_device;
  c.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
  if (GpupKmtCreateSynchronizationObject(&c) != GPUP_STATUS_SUCCESS) {
    state.SkipWithError(GpupKmtGetLastErrorMessage());
    return;
  }
  uint64_t value = 0;
  gpup::bench::Latencies lat;
  for (auto _ : state) {
    ++value;
    const uint64_t t0 = gpup::bench::now_ns();
    GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT s{c.hSyncObject, value, 0};
    GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT w{c.hSyncObject, value, 0, 5000};
    if (GpupKmtSignalSynchronizationObjectFromCpu(&s) != GPUP_STATUS_SUCCESS ||
        GpupKmtWaitForSynchronizationObjectFromCpu(&w) != GPUP_STATUS_SUCCESS) {
      state.SkipWithError(GpupKmtGetLastErrorMessage());
      break;
    }
    lat.add(gpup::bench::now_ns() - t0);
  }
  lat.report(state);
  GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT d{c.hSyncObject};
  GpupKmtDestroySynchronizationObject(&d);
  label(state);
}
BENCHMARK(BM_SignalFromCpuThenWait)->UseRealTime();

void BM_AllocationCreateDestroy(benchmark::State& state) {
  for (auto _ : state) {
    GPUPKMT_CREATEALLOCATION a{};
    a.hDevice = g_device;
    a.Flags = GPUPKMT_ALLOCATION_CPU_VISIBLE;
    a.Size = 4096;
    if (GpupKmtCreateAllocation(&a) != GPUP_STATUS_SUCCESS) {
      state.SkipWithError(GpupKmtGetLastErrorMessage());
      break;
    }
    GPUPKMT_DESTROYALLOCATION d{g_device, a.hAllocation};
    GpupKmtDestroyAllocation(&d);
  }
  label(state);
}
BENCHMARK(BM_AllocationCreateDestroy)->UseRealTime();

void BM_SubmitSignalWait(benchmark::State& state) {
  GPUPKMT_CREATECONTEXT ctx{};
  ctx.hDevice = g_device;
  GPUPKMT_CREATESYNCHRONIZATIONOBJECT c{};
  c.hDevice = g_device;
  c.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
  GPUPKMT_CMDBUF* cb = nullptr;
  if (GpupKmtCreateContext(&ctx) != GPUP_STATUS_SUCCESS || GpupKmtCreateSynchronizationObject(&c) != GPUP_STATUS_SUCCESS ||
      GpupKmtCmdBufCreate(&cb) != GPUP_STATUS_SUCCESS) {
    state.SkipWithError(GpupKmtGetLastErrorMessage());
    return;
  }
  uint64_t value = 0;
  gpup::bench::Latencies lat;
  for (auto _ : state) {
    ++value;
    const uint64_t t0 = gpup::bench::now_ns();
    GpupKmtCmdBufReset(cb);
    GPUPKMT_SUBMITCOMMAND sub{};
    sub.hContext = ctx.hContext;
    sub.pCmdBuf = cb;
    GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT w{c.hSyncObject, value, 0, 5000};
    if (GpupKmtCmdSignal(cb, c.hSyncObject, value) != GPUP_STATUS_SUCCESS ||
        GpupKmtSubmitCommand(&sub) != GPUP_STATUS_SUCCESS ||
        GpupKmtWaitForSynchronizationObjectFromCpu(&w) != GPUP_STATUS_SUCCESS) {
      state.SkipWithError(GpupKmtGetLastErrorMessage());
      break;
    }
    lat.add(gpup::bench::now_ns() - t0);
  }
  lat.report(state);
  GpupKmtCmdBufDestroy(cb);
  GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT d{c.hSyncObject};
  GpupKmtDestroySynchronizationObject(&d);
  GPUPKMT_DESTROYCONTEXT dc{ctx.hContext};
  GpupKmtDestroyContext(&dc);
  label(state);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!setup()) return 2;
  // The fake host never recycles fence slots (64) and does not execute command buffers: these two
  // run against a real worker only.
  if (g_host == "worker") {
    benchmark::RegisterBenchmark("BM_SyncObjectCreateDestroy", BM_SyncObjectCreateDestroy)->UseRealTime();
    benchmark::RegisterBenchmark("BM_SubmitSignalWait", BM_SubmitSignalWait)->UseRealTime();
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  GpupKmtDisconnect();
  g_fake.reset();
  return 0;
}
