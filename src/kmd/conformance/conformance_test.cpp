// DDI conformance suite: the same checks against every KMD plugin (mock and opencl). Everything
// here must hold for any gpup KMD; backend-specific checks live in backend_test.cpp.
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <map>
#include <iostream>
#include <atomic>
#include <numeric>
#include <random>
#include <thread>

#include "kmd/conformance/kmd_fixture.h"
#include "kmd/mock/mock_kernels.h"

namespace gpup::kmd::test {
namespace {

using mock::kPortableImageKernelsSource;
using mock::kPortableKernelsSource;
using namespace std::chrono_literals;

class Conformance : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    clear_log();
    f.open(GetParam());
  }
  void TearDown() override {
    f.close();
    EXPECT_EQ(reentrant_completions(), 0) << "a completion arrived inside a DDI call";
  }

  // The portable kernels, built once per test.
  GPUPDDI_HANDLE program() {
    if (program_ == nullptr) {
      KmdFixture::Built b = f.build(kPortableKernelsSource);
      EXPECT_EQ(b.status, GPUP_STATUS_SUCCESS) << b.log;
      program_ = b.h;
    }
    return program_;
  }

  static std::vector<int32_t> ints(const KmdFixture::Buffer& b, size_t first, size_t count) {
    std::vector<int32_t> v(count);
    std::memcpy(v.data(), b.mem + first * 4, count * 4);
    return v;
  }
  static void set_ints(const KmdFixture::Buffer& b, const std::vector<int32_t>& v) {
    std::memcpy(b.mem, v.data(), v.size() * 4);
  }

  KmdFixture f;
  GPUPDDI_HANDLE program_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Loading and adapter

TEST_P(Conformance, DriverEntryChecksVersionAndSizes) {
  EXPECT_GT(std::strlen(f.ddi().DriverName), 0u);
  EXPECT_EQ(f.ddi().DdiVersion >> 16, GPUPDDI_VERSION_MAJOR);
  EXPECT_EQ(f.ddi().DdiVersion & 0xffffu, GPUPDDI_VERSION_MINOR) << "DDI 1.2: images, SANDBOXNEEDS";
  void* dl = dlopen(f.driver->path().c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  ASSERT_NE(dl, nullptr);
  auto entry = reinterpret_cast<GPUPDDI_PFN_DRIVERENTRY>(dlsym(dl, GPUPDDI_DRIVERENTRY_SYMBOL));
  ASSERT_NE(entry, nullptr);
  // None of these calls may replace the callbacks the loaded driver uses.
  GPUPDDI_CALLBACKS cb = test_callbacks();
  GPUPDDI_DRIVER_FUNCS funcs{};
  funcs.struct_size = sizeof(funcs);
  funcs.DdiVersion = (GPUPDDI_VERSION_MAJOR + 1) << 16;
  EXPECT_EQ(entry(&cb, &funcs), GPUP_STATUS_VERSION_MISMATCH);
  EXPECT_EQ(funcs.DdiVersion >> 16, GPUPDDI_VERSION_MAJOR);  // the KMD says what it implements
  funcs = {};
  funcs.struct_size = sizeof(funcs) - 8;
  funcs.DdiVersion = GPUPDDI_VERSION;
  EXPECT_EQ(entry(&cb, &funcs), GPUP_STATUS_INVALID_PARAMETER);
  funcs.struct_size = sizeof(funcs);
  EXPECT_EQ(entry(nullptr, &funcs), GPUP_STATUS_INVALID_PARAMETER);
  cb.pfnNotifySubmissionComplete = nullptr;
  EXPECT_EQ(entry(&cb, &funcs), GPUP_STATUS_INVALID_PARAMETER);
  dlclose(dl);
}

TEST_P(Conformance, StartAdapterRejectsBadConfig) {
  for (const char* config : {"bogus_key=1", "no equals sign", "=value"}) {
    GPUPDDI_ARG_STARTADAPTER a{};
    a.struct_size = sizeof(a);
    a.pConfig = config;
    EXPECT_EQ(f.ddi().Adapter.pfnStartAdapter(&a), GPUP_STATUS_INVALID_PARAMETER) << config;
  }
  EXPECT_TRUE(log_contains("bogus_key")) << "the error names the unknown key";
  GPUPDDI_ARG_STARTADAPTER a{};
  a.struct_size = sizeof(a);
  a.pConfig = "# comments and blank lines are fine\n\n";
  ASSERT_EQ(f.ddi().Adapter.pfnStartAdapter(&a), GPUP_STATUS_SUCCESS);
  f.ddi().Adapter.pfnStopAdapter(a.hAdapter);
  a.pConfig = nullptr;
  ASSERT_EQ(f.ddi().Adapter.pfnStartAdapter(&a), GPUP_STATUS_SUCCESS);
  f.ddi().Adapter.pfnStopAdapter(a.hAdapter);
}

TEST_P(Conformance, QueriesAnswerConsistently) {
  uint32_t written = 0;
  GPUPDDI_DRIVERCAPS caps{};
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_DRIVERCAPS, &caps, sizeof(caps), nullptr, 0, &written), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(written, sizeof(caps));
  EXPECT_EQ(caps.MemoryManagementCaps.ParavirtualizationSupported, 1u);
  EXPECT_EQ(caps.ComputeOnly, 1u);
  EXPECT_EQ(caps.NodeCount, 1u);
  EXPECT_EQ(caps.SupportPerEngineTDR, f.ddi().Adapter.pfnResetEngine != nullptr ? 1u : 0u);

  const GPUPDDI_DEVICEINFO& info = f.info;
  EXPECT_NE(std::memchr(info.Name, 0, sizeof(info.Name)), nullptr);
  EXPECT_GT(std::strlen(info.Name), 0u);
  EXPECT_GT(std::strlen(info.Platform), 0u);
  EXPECT_GT(info.MaxAllocSize, 0u);
  EXPECT_EQ(caps.MaxAllocationSize, info.MaxAllocSize);
  EXPECT_GE(info.GlobalMemSize, info.MaxAllocSize);
  EXPECT_GE(info.ComputeUnits, 1u);
  EXPECT_GE(info.MaxWorkGroupSize, 1u);
  EXPECT_GE(info.MemBaseAddrAlignBits, 8u);
  EXPECT_EQ(info.MemBaseAddrAlignBits % 8, 0u);

  GPUPDDI_GPUMMUCAPS mmu{};
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_GPUMMUCAPS, &mmu, sizeof(mmu), nullptr, 0, &written), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(written, sizeof(mmu));
  EXPECT_EQ(mmu.VirtualAddressBitCount, 48u);
  EXPECT_EQ(mmu.PageTableLevelCount, 4u);
  EXPECT_EQ(mmu.PageSizeInBytes, 4096u);
  uint32_t va_bits = 12;
  for (uint32_t level = 0; level < mmu.PageTableLevelCount; ++level) {
    GPUPDDI_PAGETABLELEVELDESC d{};
    ASSERT_EQ(f.query(GPUPDDI_QAITYPE_PAGETABLELEVELDESC, &d, sizeof(d), &level, sizeof(level), &written),
              GPUP_STATUS_SUCCESS);
    EXPECT_EQ(written, sizeof(d));
    EXPECT_EQ(d.PageTableIndexBitCount, 9u);
    EXPECT_EQ(d.PageTableSizeInBytes, 4096u);
    va_bits += d.PageTableIndexBitCount;
  }
  EXPECT_EQ(va_bits, mmu.VirtualAddressBitCount) << "levels and page size cover the VA space";

  GPUPDDI_QUERYSEGMENTOUT seg{};
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_QUERYSEGMENT, &seg, sizeof(seg), nullptr, 0, &written), GPUP_STATUS_SUCCESS);
  ASSERT_GE(seg.NbSegment, 1u);
  ASSERT_LE(seg.NbSegment, uint32_t{GPUPDDI_MAX_SEGMENTS});
  EXPECT_EQ(seg.Segments[0].Size, info.GlobalMemSize);
  bool aperture = false;
  for (uint32_t i = 0; i < seg.NbSegment; ++i) aperture |= seg.Segments[i].Aperture && seg.Segments[i].CpuVisible;
  EXPECT_TRUE(aperture) << "a CPU-visible aperture segment";

  GPUPDDI_GPUPCAPS gpup{};
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_GPUPCAPS, &gpup, sizeof(gpup), nullptr, 0, &written), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(written, sizeof(gpup));
}

// SANDBOXNEEDS (DDI 1.2) is optional; when answered, it is one NUL-terminated text of known lines,
// its size reported when the buffer is too small.
TEST_P(Conformance, SandboxNeedsAreWellFormedWhenAnswered) {
  uint32_t need = 0;
  const gpup_status s = f.query(GPUPDDI_QAITYPE_SANDBOXNEEDS, nullptr, 0, nullptr, 0, &need);
  if (s == GPUP_STATUS_NOT_SUPPORTED) GTEST_SKIP() << "the KMD declares nothing";
  ASSERT_EQ(s, GPUP_STATUS_BUFFER_TOO_SMALL);
  ASSERT_GE(need, 1u);
  ASSERT_LE(need, 64u * 1024);
  std::vector<char> text(need + 16, 'x');
  uint32_t written = 0;
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_SANDBOXNEEDS, text.data(), need - 1, nullptr, 0, &written),
            GPUP_STATUS_BUFFER_TOO_SMALL);
  EXPECT_EQ(written, need);
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_SANDBOXNEEDS, text.data(), static_cast<uint32_t>(text.size()), nullptr, 0, &written),
            GPUP_STATUS_SUCCESS);
  ASSERT_EQ(written, need);
  ASSERT_EQ(text[need - 1], '\0');
  std::istringstream lines(std::string(text.data(), need - 1));
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    const bool path = line.rfind("ro /", 0) == 0 || line.rfind("exec /", 0) == 0 || line.rfind("dev /", 0) == 0;
    const bool env = line.rfind("env ", 0) == 0 && line.find('=') != std::string::npos;
    const bool pass = line.rfind("passenv ", 0) == 0 && line.size() > 8;
    EXPECT_TRUE(path || env || pass) << line;
  }
}

TEST_P(Conformance, QueriesRejectBadSizesAndTypes) {
  const std::array<std::pair<uint32_t, uint32_t>, 5> fixed = {{
      {GPUPDDI_QAITYPE_DRIVERCAPS, sizeof(GPUPDDI_DRIVERCAPS)},
      {GPUPDDI_QAITYPE_QUERYSEGMENT, sizeof(GPUPDDI_QUERYSEGMENTOUT)},
      {GPUPDDI_QAITYPE_DEVICEINFO, sizeof(GPUPDDI_DEVICEINFO)},
      {GPUPDDI_QAITYPE_GPUMMUCAPS, sizeof(GPUPDDI_GPUMMUCAPS)},
      {GPUPDDI_QAITYPE_GPUPCAPS, sizeof(GPUPDDI_GPUPCAPS)},
  }};
  std::vector<unsigned char> out(4096);
  for (const auto& [type, size] : fixed) {
    EXPECT_EQ(f.query(type, out.data(), size - 1), GPUP_STATUS_BUFFER_TOO_SMALL) << type;
    EXPECT_EQ(f.query(type, out.data(), 0), GPUP_STATUS_BUFFER_TOO_SMALL) << type;
    EXPECT_EQ(f.query(type, nullptr, size), GPUP_STATUS_INVALID_PARAMETER) << type;
    EXPECT_EQ(f.query(type, out.data(), size + 100), GPUP_STATUS_SUCCESS) << "a larger buffer is fine: " << type;
  }
  GPUPDDI_PAGETABLELEVELDESC d{};
  uint32_t level = 4;
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_PAGETABLELEVELDESC, &d, sizeof(d), &level, sizeof(level)),
            GPUP_STATUS_INVALID_PARAMETER);
  level = UINT32_MAX;
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_PAGETABLELEVELDESC, &d, sizeof(d), &level, sizeof(level)),
            GPUP_STATUS_INVALID_PARAMETER);
  level = 0;
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_PAGETABLELEVELDESC, &d, sizeof(d)), GPUP_STATUS_INVALID_PARAMETER);
  const uint64_t wide_level = 0;
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_PAGETABLELEVELDESC, &d, sizeof(d), &wide_level, sizeof(wide_level)),
            GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_PAGETABLELEVELDESC, &d, sizeof(d) - 1, &level, sizeof(level)),
            GPUP_STATUS_BUFFER_TOO_SMALL);

  for (uint32_t type : {2u, 16u, 999u, 0xffffffffu}) {
    EXPECT_EQ(f.query(type, out.data(), 4096), GPUP_STATUS_NOT_SUPPORTED) << type;
  }
  GPUPDDI_ARG_QUERYADAPTERINFO shortargs{};
  shortargs.struct_size = sizeof(shortargs) - 8;
  shortargs.Type = GPUPDDI_QAITYPE_DRIVERCAPS;
  shortargs.pOutputData = out.data();
  shortargs.OutputDataSize = 4096;
  EXPECT_EQ(f.ddi().Adapter.pfnQueryAdapterInfo(f.adapter, &shortargs), GPUP_STATUS_INVALID_PARAMETER);
}

TEST_P(Conformance, UmdPrivateQuery) {
  GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_UMD_INFO};
  GPUP_OCL_UMD_INFO info{};
  uint32_t written = 0;
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, &info, sizeof(info), &h, sizeof(h), &written), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(written, sizeof(info));
  EXPECT_EQ(info.ContractVersion, GPUP_OCL_CONTRACT_VERSION);
  EXPECT_TRUE(info.ProgramFormats & GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_SOURCE));
  EXPECT_GE(info.MaxWorkItemDimensions, 1u);
  EXPECT_NE(std::memchr(info.DeviceVersion, 0, sizeof(info.DeviceVersion)), nullptr);
  EXPECT_EQ(std::string(info.DeviceVersion).rfind("OpenCL ", 0), 0u) << info.DeviceVersion;

  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, &info, sizeof(info) - 1, &h, sizeof(h)),
            GPUP_STATUS_BUFFER_TOO_SMALL);
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, &info, sizeof(info)), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, &info, sizeof(info), &h, sizeof(h) - 1),
            GPUP_STATUS_INVALID_PARAMETER);
  GPUP_OCL_PRIVATE_HEADER bad{GPUP_OCL_ESCAPE_MAGIC, GPUP_OCL_QUERY_UMD_INFO};
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, &info, sizeof(info), &bad, sizeof(bad)),
            GPUP_STATUS_INVALID_PARAMETER);
  GPUP_OCL_PRIVATE_HEADER unknown{GPUP_OCL_QUERY_MAGIC, 0x777};
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, &info, sizeof(info), &unknown, sizeof(unknown)),
            GPUP_STATUS_NOT_SUPPORTED);
}

// ---------------------------------------------------------------------------------------------
// VM data and processes

GPUPDDI_ARG_SETVIRTUALMACHINEDATA vm_data(GPUPDDI_HANDLE worker, const GPUPDDI_GUID* guid) {
  GPUPDDI_ARG_SETVIRTUALMACHINEDATA a{};
  a.struct_size = sizeof(a);
  a.hKmdVmWorkerProcess = worker;
  a.pVmGuid = guid;
  a.pVmName = "vm-1";
  a.MinPartitionVRAM = 64 << 20;
  a.OptimalPartitionVRAM = 128 << 20;
  a.MaxPartitionVRAM = 256 << 20;
  a.ComputeWeight = 100;
  a.MaxComputePercent = 50;
  return a;
}

TEST_P(Conformance, SetVirtualMachineDataTwice) {
  const GPUPDDI_GUID guid = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}};
  auto a = vm_data(f.worker, &guid);
  EXPECT_EQ(f.ddi().Adapter.pfnSetVirtualMachineData(f.adapter, &a), GPUP_STATUS_SUCCESS);
  a.Flags.SecureVirtualMachine = 1;
  a.MaxPartitionVRAM = 512 << 20;
  EXPECT_EQ(f.ddi().Adapter.pfnSetVirtualMachineData(f.adapter, &a), GPUP_STATUS_SUCCESS) << "a re-call updates";

  auto not_worker = vm_data(f.vm_process, &guid);
  EXPECT_EQ(f.ddi().Adapter.pfnSetVirtualMachineData(f.adapter, &not_worker), GPUP_STATUS_INVALID_PARAMETER);
  auto no_guid = vm_data(f.worker, nullptr);
  EXPECT_EQ(f.ddi().Adapter.pfnSetVirtualMachineData(f.adapter, &no_guid), GPUP_STATUS_INVALID_PARAMETER);
  auto weight = vm_data(f.worker, &guid);
  weight.ComputeWeight = 0;
  EXPECT_EQ(f.ddi().Adapter.pfnSetVirtualMachineData(f.adapter, &weight), GPUP_STATUS_INVALID_PARAMETER);
  auto percent = vm_data(f.worker, &guid);
  percent.MaxComputePercent = 101;
  EXPECT_EQ(f.ddi().Adapter.pfnSetVirtualMachineData(f.adapter, &percent), GPUP_STATUS_INVALID_PARAMETER);
  auto inverted = vm_data(f.worker, &guid);
  inverted.MinPartitionVRAM = inverted.MaxPartitionVRAM + 1;
  EXPECT_EQ(f.ddi().Adapter.pfnSetVirtualMachineData(f.adapter, &inverted), GPUP_STATUS_INVALID_PARAMETER);
}

TEST_P(Conformance, ProcessesLinkToTheirWorker) {
  auto create = [&](GPUPDDI_CREATEPROCESSFLAGS flags, GPUPDDI_HANDLE worker, const char* name, uint32_t len,
                    GPUPDDI_HANDLE* out) {
    GPUPDDI_ARG_CREATEPROCESS a{};
    a.struct_size = sizeof(a);
    a.Flags = flags;
    a.hKmdVmWorkerProcess = worker;
    a.pProcessName = name;
    a.ProcessNameLength = len;
    const gpup_status s = f.ddi().Process.pfnCreateProcess(f.adapter, &a);
    if (out) *out = a.hKmdProcess;
    return s;
  };
  GPUPDDI_CREATEPROCESSFLAGS vm{};
  vm.VirtualMachineProcess = 1;
  EXPECT_EQ(create(vm, nullptr, "orphan", 6, nullptr), GPUP_STATUS_INVALID_PARAMETER) << "no worker";
  EXPECT_EQ(create(vm, f.vm_process, "x", 1, nullptr), GPUP_STATUS_INVALID_PARAMETER) << "worker is a VM process";
  GPUPDDI_CREATEPROCESSFLAGS both = vm;
  both.VirtualMachineWorkerProcess = 1;
  EXPECT_EQ(create(both, f.worker, "x", 1, nullptr), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(create(vm, f.worker, nullptr, 5, nullptr), GPUP_STATUS_INVALID_PARAMETER) << "length without a name";

  GPUPDDI_CREATEPROCESSFLAGS wflags{};
  wflags.VirtualMachineWorkerProcess = 1;
  GPUPDDI_HANDLE worker2 = nullptr, p2 = nullptr, p3 = nullptr;
  ASSERT_EQ(create(wflags, nullptr, "vmwp-2", 6, &worker2), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(create(vm, worker2, "app\x01\xff", 5, &p2), GPUP_STATUS_SUCCESS) << "odd bytes in a name are fine";
  ASSERT_EQ(create(vm, worker2, nullptr, 0, &p3), GPUP_STATUS_SUCCESS);
  const std::string long_name(100000, 'n');
  GPUPDDI_HANDLE p4 = nullptr;
  ASSERT_EQ(create(vm, worker2, long_name.data(), static_cast<uint32_t>(long_name.size()), &p4), GPUP_STATUS_SUCCESS)
      << "a long name is kept shortened";
  f.ddi().Process.pfnDestroyProcess(f.adapter, p4);

  GPUPDDI_ARG_CREATEDEVICE cd{};
  cd.struct_size = sizeof(cd);
  cd.hKmdProcess = worker2;
  EXPECT_EQ(f.ddi().Device.pfnCreateDevice(f.adapter, &cd), GPUP_STATUS_INVALID_PARAMETER)
      << "a VM worker process does no device work itself";
  cd.hKmdProcess = p2;
  ASSERT_EQ(f.ddi().Device.pfnCreateDevice(f.adapter, &cd), GPUP_STATUS_SUCCESS);
  f.ddi().Device.pfnDestroyDevice(cd.hDevice);
  f.ddi().Process.pfnDestroyProcess(f.adapter, p3);
  f.ddi().Process.pfnDestroyProcess(f.adapter, p2);
  f.ddi().Process.pfnDestroyProcess(f.adapter, worker2);
}

// ---------------------------------------------------------------------------------------------
// Object lifecycles

TEST_P(Conformance, LifecyclesNestInCreateDestroyOrder) {
  for (int round = 0; round < 3; ++round) {
    GPUPDDI_ARG_CREATEDEVICE cd{};
    cd.struct_size = sizeof(cd);
    cd.hKmdProcess = f.vm_process;
    ASSERT_EQ(f.ddi().Device.pfnCreateDevice(f.adapter, &cd), GPUP_STATUS_SUCCESS);
    GPUPDDI_HANDLE dev = cd.hDevice;
    std::vector<GPUPDDI_HANDLE> contexts, allocs;
    Sink sink;
    for (int i = 0; i < 3; ++i) {
      GPUPDDI_ARG_CREATECONTEXT cc{};
      cc.struct_size = sizeof(cc);
      cc.Priority = i - 1;
      cc.hSystemContext = &sink;
      ASSERT_EQ(f.ddi().Context.pfnCreateContext(dev, &cc), GPUP_STATUS_SUCCESS);
      contexts.push_back(cc.hContext);
      GPUPDDI_ARG_CREATEALLOCATION ca{};
      ca.struct_size = sizeof(ca);
      ca.Size = 4096u << i;
      ASSERT_EQ(f.ddi().Memory.pfnCreateAllocation(dev, &ca), GPUP_STATUS_SUCCESS);
      allocs.push_back(ca.hAllocation);
    }
    GPUPDDI_ARG_CREATECONTEXT bad{};
    bad.struct_size = sizeof(bad);
    bad.NodeOrdinal = 1;
    EXPECT_EQ(f.ddi().Context.pfnCreateContext(dev, &bad), GPUP_STATUS_INVALID_PARAMETER) << "one node";
    bad.NodeOrdinal = 0;
    bad.Priority = 3;
    EXPECT_EQ(f.ddi().Context.pfnCreateContext(dev, &bad), GPUP_STATUS_INVALID_PARAMETER) << "priority -2..2";
    // Destroy a middle one first, then the rest in reverse creation order.
    f.ddi().Context.pfnDestroyContext(contexts[1]);
    f.ddi().Memory.pfnDestroyAllocation(dev, allocs[1]);
    f.ddi().Context.pfnDestroyContext(contexts[2]);
    f.ddi().Context.pfnDestroyContext(contexts[0]);
    f.ddi().Memory.pfnDestroyAllocation(dev, allocs[2]);
    f.ddi().Memory.pfnDestroyAllocation(dev, allocs[0]);
    f.ddi().Device.pfnDestroyDevice(dev);
    EXPECT_EQ(sink.count(), 0u);
  }
}

TEST_P(Conformance, AllocationArgumentsAreChecked) {
  std::vector<unsigned char> mem(4096);
  auto alloc = [&](auto setup) {
    GPUPDDI_ARG_CREATEALLOCATION a{};
    a.struct_size = sizeof(a);
    a.Size = 4096;
    setup(a);
    const gpup_status s = f.ddi().Memory.pfnCreateAllocation(f.device, &a);
    if (s == GPUP_STATUS_SUCCESS) f.ddi().Memory.pfnDestroyAllocation(f.device, a.hAllocation);
    return s;
  };
  EXPECT_EQ(alloc([](auto& a) { a.Size = 0; }), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(alloc([&](auto& a) { a.Size = f.info.MaxAllocSize + 1; }), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(alloc([](auto& a) { a.Flags.CpuVisible = 1; }), GPUP_STATUS_INVALID_PARAMETER) << "no backing store";
  EXPECT_EQ(alloc([&](auto& a) { a.pSystemMemory = mem.data(); }), GPUP_STATUS_INVALID_PARAMETER)
      << "backing store without CpuVisible";
  EXPECT_EQ(alloc([&](auto& a) {
              a.pPrivateDriverData = mem.data();
              a.PrivateDriverDataSize = 16;
            }),
            GPUP_STATUS_INVALID_PARAMETER)
      << "buffers take no private data";
  EXPECT_EQ(alloc([](auto& a) { a.Flags.Reserved = 1; }), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(alloc([&](auto& a) {
              a.Flags.Program = 1;
              a.Flags.CpuVisible = 1;
              a.pSystemMemory = mem.data();
            }),
            GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(alloc([](auto& a) { a.Flags.ReadOnly = 1; }), GPUP_STATUS_SUCCESS);

  auto dev = f.device_buffer(4096);
  EXPECT_EQ(f.lock(dev.h), f.ddi().Memory.pfnLock ? GPUP_STATUS_INVALID_PARAMETER : GPUP_STATUS_SUCCESS)
      << "only CPU-visible allocations lock";
}

// ---------------------------------------------------------------------------------------------
// Copy and fill

TEST_P(Conformance, CpuVisibleCopyRoundTrip) {
  constexpr uint64_t kSize = 64 << 10;
  auto a = f.cpu_buffer(kSize);
  auto b = f.cpu_buffer(kSize);
  ASSERT_NE(a.h, nullptr);
  ASSERT_NE(b.h, nullptr);
  std::mt19937 rng(42);
  for (uint64_t i = 0; i < kSize; ++i) a.mem[i] = static_cast<unsigned char>(rng());
  ASSERT_EQ(f.unlock(a.h), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.unlock(b.h), GPUP_STATUS_SUCCESS);
  auto* ctx = f.context();
  ASSERT_EQ(f.run(ctx, {copy_cmd(ref(a.h, 0, kSize), ref(b.h, 0, kSize))}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(b.h), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(std::memcmp(a.mem, b.mem, kSize), 0);

  // A sub-range copy within one allocation (no overlap) and into the other at an odd offset.
  ASSERT_EQ(f.run(ctx, {copy_cmd(ref(a.h, 0, 1000), ref(a.h, 4096, 1000)), copy_cmd(ref(a.h, 7, 333), ref(b.h, 1, 333))}),
            GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(a.h), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(b.h), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(std::memcmp(a.mem, a.mem + 4096, 1000), 0);
  EXPECT_EQ(std::memcmp(a.mem + 7, b.mem + 1, 333), 0);
  EXPECT_EQ(b.mem[0], a.mem[0]) << "bytes outside the range are untouched";
  EXPECT_EQ(b.mem[334], a.mem[334]);
}

TEST_P(Conformance, DeviceMemoryStartsZeroed) {
  constexpr uint64_t kSize = 8192;
  auto dev = f.device_buffer(kSize);
  auto out = f.cpu_buffer(kSize);
  std::memset(out.mem, 0xab, kSize);
  ASSERT_EQ(f.unlock(out.h), GPUP_STATUS_SUCCESS);
  auto* ctx = f.context();
  ASSERT_EQ(f.run(ctx, {copy_cmd(ref(dev.h, 0, kSize), ref(out.h, 0, kSize))}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(out.h), GPUP_STATUS_SUCCESS);
  std::vector<unsigned char> zeros(kSize, 0);
  EXPECT_EQ(std::memcmp(out.mem, zeros.data(), kSize), 0);
}

TEST_P(Conformance, FillPatternsAtOffsets) {
  constexpr uint64_t kSize = 4096;
  auto buf = f.cpu_buffer(kSize);
  std::memset(buf.mem, 0xee, kSize);
  ASSERT_EQ(f.unlock(buf.h), GPUP_STATUS_SUCCESS);
  const uint8_t p1 = 0x5a;
  const uint32_t p4 = 0x11223344;
  uint8_t p16[16];
  for (int i = 0; i < 16; ++i) p16[i] = static_cast<uint8_t>(0xa0 + i);
  auto* ctx = f.context();
  ASSERT_EQ(f.run(ctx, {fill_cmd(ref(buf.h, 3, 45), &p1, 1), fill_cmd(ref(buf.h, 128, 64), &p4, 4),
                        fill_cmd(ref(buf.h, 1024, 256), p16, 16)}),
            GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  std::vector<uint8_t> want(kSize, 0xee);
  std::memset(want.data() + 3, p1, 45);
  for (int i = 0; i < 16; ++i) std::memcpy(want.data() + 128 + 4 * i, &p4, 4);
  for (int i = 0; i < 16; ++i) std::memcpy(want.data() + 1024 + 16 * i, p16, 16);
  for (uint64_t i = 0; i < kSize; ++i) ASSERT_EQ(buf.mem[i], want[i]) << "byte " << i;
}

TEST_P(Conformance, InvalidCopiesAndFillsQueueNothing) {
  auto a = f.cpu_buffer(4096);
  auto b = f.cpu_buffer(4096);
  auto* ctx = f.context();
  uint8_t pat[GPUPDDI_MAX_FILL_PATTERN];
  for (int i = 0; i < GPUPDDI_MAX_FILL_PATTERN; ++i) pat[i] = static_cast<uint8_t>(i + 1);
  GPUPDDI_COMMAND unknown{};
  unknown.Type = 77;
  const std::vector<std::pair<const char*, GPUPDDI_COMMAND>> bad = {
      {"overlapping copy", copy_cmd(ref(a.h, 0, 100), ref(a.h, 50, 100))},
      {"size mismatch", copy_cmd(ref(a.h, 0, 100), ref(b.h, 0, 99))},
      {"empty copy", copy_cmd(ref(a.h, 0, 0), ref(b.h, 0, 0))},
      {"pattern size 0", fill_cmd(ref(a.h, 0, 96), pat, 0)},
      {"pattern size 3", fill_cmd(ref(a.h, 0, 96), pat, 3)},
      {"pattern size 256", fill_cmd(ref(a.h, 0, 256), pat, 256)},
      {"misaligned fill offset", fill_cmd(ref(a.h, 2, 64), pat, 4)},
      {"fill size not a multiple", fill_cmd(ref(a.h, 0, 62), pat, 4)},
      {"unknown command", unknown},
  };
  for (const auto& [what, cmd] : bad) {
    // A valid first command must not run when a later one is bad.
    EXPECT_EQ(f.submit(ctx, {fill_cmd(ref(b.h, 0, 4096), pat, 4), cmd}, 1), GPUP_STATUS_INVALID_PARAMETER) << what;
  }
  auto prog = program();
  GPUPDDI_COMMAND as_buffer = copy_cmd(ref(prog, 0, 16), ref(b.h, 0, 16));
  EXPECT_NE(f.submit(ctx, {as_buffer}, 1), GPUP_STATUS_SUCCESS) << "a program is not a buffer";
  EXPECT_EQ(f.run(ctx, {}), GPUP_STATUS_SUCCESS) << "an empty submission completes";
  EXPECT_EQ(ctx->sink->count(), 1u);
  ASSERT_EQ(f.lock(b.h), GPUP_STATUS_SUCCESS);
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(b.mem[i], 0) << "nothing of a refused submission ran";
}

// ---------------------------------------------------------------------------------------------
// Programs and dispatch

TEST_P(Conformance, ProgramBuildReportsResult) {
  KmdFixture::Built b = f.build(kPortableKernelsSource, GPUP_OCL_PROGRAM_SOURCE, "-DUNUSED=1");
  ASSERT_EQ(b.status, GPUP_STATUS_SUCCESS) << b.log;
  EXPECT_GE(b.written, sizeof(GPUP_OCL_BUILD_RESULT));
  EXPECT_EQ(b.result.BuildError, 0);
  EXPECT_EQ(b.result.Truncated, 0u);
  EXPECT_EQ(b.result.LogBytes, b.result.LogSize);
  // Options and source may carry one terminating NUL.
  std::string src(kPortableKernelsSource);
  src.push_back('\0');
  KmdFixture::Built nul = f.build(src, GPUP_OCL_PROGRAM_SOURCE, std::string_view("-DX=1\0", 6));
  EXPECT_EQ(nul.status, GPUP_STATUS_SUCCESS) << nul.log;
  KmdFixture::Built no_output = f.build(kPortableKernelsSource, GPUP_OCL_PROGRAM_SOURCE, {}, 0);
  EXPECT_EQ(no_output.status, GPUP_STATUS_SUCCESS);
  EXPECT_EQ(no_output.written, 0u);
}

TEST_P(Conformance, BuildFailureReturnsLog) {
  const char* broken = "__kernel void broken(__global int* b) { b[0] = ; }\n";
  KmdFixture::Built b = f.build(broken);
  EXPECT_EQ(b.status, GPUP_STATUS_BUILD_FAILED);
  EXPECT_EQ(b.h, nullptr);
  ASSERT_GE(b.written, sizeof(GPUP_OCL_BUILD_RESULT));
  EXPECT_NE(b.result.BuildError, 0);
  EXPECT_GT(b.result.LogSize, 0u);
  EXPECT_EQ(b.result.LogBytes, b.result.LogSize);
  EXPECT_EQ(b.result.Truncated, 0u);
  EXPECT_FALSE(b.log.empty());

  KmdFixture::Built small = f.build(broken, GPUP_OCL_PROGRAM_SOURCE, {}, sizeof(GPUP_OCL_BUILD_RESULT) + 8);
  EXPECT_EQ(small.status, GPUP_STATUS_BUILD_FAILED);
  EXPECT_EQ(small.written, sizeof(GPUP_OCL_BUILD_RESULT) + 8);
  EXPECT_EQ(small.result.LogBytes, 8u);
  EXPECT_EQ(small.result.Truncated, 1u);
  EXPECT_EQ(small.result.LogSize, b.result.LogSize);
  EXPECT_EQ(small.log, b.log.substr(0, 8));

  KmdFixture::Built header_only = f.build(broken, GPUP_OCL_PROGRAM_SOURCE, {}, sizeof(GPUP_OCL_BUILD_RESULT) - 1);
  EXPECT_EQ(header_only.status, GPUP_STATUS_BUILD_FAILED);
  EXPECT_EQ(header_only.written, 0u);

  KmdFixture::Built garbage = f.build("\x7f" "garbage!\x01\x02", GPUP_OCL_PROGRAM_BINARY);
  EXPECT_EQ(garbage.status, GPUP_STATUS_BUILD_FAILED);
  EXPECT_NE(garbage.result.BuildError, 0);
}

TEST_P(Conformance, MalformedProgramDescriptorsAreInvalid) {
  const std::string src = "__kernel void add_i32(__global int* b, int v) { b[get_global_id(0)] += v; }";
  std::vector<unsigned char> good = program_desc(GPUP_OCL_PROGRAM_SOURCE, "-DA=1", src);
  auto with = [&](auto edit) {
    std::vector<unsigned char> d = good;
    GPUP_OCL_PROGRAM_DESC h;
    std::memcpy(&h, d.data(), sizeof(h));
    edit(h, d);
    std::memcpy(d.data(), &h, sizeof(h));
    return f.build_raw(d.data(), static_cast<uint32_t>(d.size()));
  };
  EXPECT_EQ(f.build_raw(good.data(), static_cast<uint32_t>(good.size())), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(f.build_raw(nullptr, 0), GPUP_STATUS_INVALID_PARAMETER) << "no private data";
  EXPECT_EQ(f.build_raw(nullptr, 100), GPUP_STATUS_INVALID_PARAMETER) << "size without data";
  EXPECT_EQ(f.build_raw(good.data(), sizeof(GPUP_OCL_PROGRAM_DESC) - 1), GPUP_STATUS_INVALID_PARAMETER)
      << "truncated header";
  EXPECT_EQ(f.build_raw(good.data(), sizeof(GPUP_OCL_PROGRAM_DESC)), GPUP_STATUS_INVALID_PARAMETER) << "header only";
  EXPECT_EQ(f.build_raw(good.data(), static_cast<uint32_t>(good.size() - 1)), GPUP_STATUS_INVALID_PARAMETER)
      << "one byte short";
  std::vector<unsigned char> longer = good;
  longer.push_back(' ');
  EXPECT_EQ(f.build_raw(longer.data(), static_cast<uint32_t>(longer.size())), GPUP_STATUS_INVALID_PARAMETER)
      << "one byte long";
  EXPECT_EQ(with([](auto& h, auto&) { h.Magic ^= 1; }), GPUP_STATUS_INVALID_PARAMETER) << "magic";
  EXPECT_EQ(with([](auto& h, auto&) { h.Version = 3; }), GPUP_STATUS_INVALID_PARAMETER) << "version 3";
  EXPECT_EQ(with([](auto& h, auto&) { h.Version = 0; }), GPUP_STATUS_INVALID_PARAMETER) << "version 0";
  EXPECT_EQ(with([](auto& h, auto&) { h.Reserved = 1; }), GPUP_STATUS_INVALID_PARAMETER) << "reserved";
  EXPECT_EQ(with([](auto& h, auto&) { h.Format = 0; }), GPUP_STATUS_INVALID_PARAMETER) << "format 0";
  EXPECT_EQ(with([](auto& h, auto&) { h.Format = 3; }), GPUP_STATUS_INVALID_PARAMETER) << "format 3, not a set";
  EXPECT_EQ(with([](auto& h, auto&) { h.Format = 5; }), GPUP_STATUS_INVALID_PARAMETER) << "format 5";
  // Sizes whose 32-bit sum wraps around to the real size.
  EXPECT_EQ(with([](auto& h, auto&) {
              h.OptionsSize += 0x80000000u;
              h.ContentSize += 0x80000000u;
            }),
            GPUP_STATUS_INVALID_PARAMETER)
      << "wrapping sizes";
  EXPECT_EQ(with([](auto& h, auto&) { h.OptionsSize = 0xffffffffu; }), GPUP_STATUS_INVALID_PARAMETER)
      << "huge options";
  EXPECT_EQ(with([](auto& h, auto&) { h.ContentSize = 0xffffffffu; }), GPUP_STATUS_INVALID_PARAMETER)
      << "huge content";
  EXPECT_EQ(with([](auto& h, auto&) {
              h.OptionsSize += h.ContentSize;
              h.ContentSize = 0;
            }),
            GPUP_STATUS_INVALID_PARAMETER)
      << "no content";
}

TEST_P(Conformance, NulRulesOfOptionsAndSource) {
  const std::string src = "__kernel void add_i32(__global int* b, int v) { b[get_global_id(0)] += v; }";
  auto build = [&](std::string_view options, std::string_view content) {
    std::vector<unsigned char> d = program_desc(GPUP_OCL_PROGRAM_SOURCE, options, content);
    return f.build_raw(d.data(), static_cast<uint32_t>(d.size()));
  };
  EXPECT_EQ(build(std::string_view("-DA\0=1", 6), src), GPUP_STATUS_INVALID_PARAMETER) << "NUL inside options";
  std::string nul_src = src;
  nul_src.insert(10, 1, '\0');
  EXPECT_EQ(build({}, nul_src), GPUP_STATUS_INVALID_PARAMETER) << "NUL inside source";
  EXPECT_EQ(build({}, std::string_view("\0", 1)), GPUP_STATUS_INVALID_PARAMETER) << "only a NUL";
  EXPECT_EQ(build({}, {}), GPUP_STATUS_INVALID_PARAMETER) << "no content";
  EXPECT_EQ(build(std::string_view("\0", 1), src), GPUP_STATUS_SUCCESS) << "options that are just a NUL";
}

// ---------------------------------------------------------------------------------------------
// Contract version 2: device info list, program info, compile and link

constexpr uint32_t kClDeviceName = 0x102B, kClDevicePlatform = 0x1031, kClDeviceParentDevice = 0x1042;
constexpr uint32_t kClBinaryCompiledObject = 0x1, kClBinaryLibrary = 0x2, kClBinaryExecutable = 0x4;

TEST_P(Conformance, DeviceInfoListIsSortedAndComplete) {
  const GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_DEVICE_INFO};
  std::vector<unsigned char> out(64 << 10, 0xcc);
  uint32_t written = 0;
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, out.data(), static_cast<uint32_t>(out.size()), &h, sizeof(h),
                    &written),
            GPUP_STATUS_SUCCESS);
  GPUP_OCL_INFO_LIST list;
  ASSERT_GE(written, sizeof(list));
  std::memcpy(&list, out.data(), sizeof(list));
  EXPECT_EQ(list.Magic, GPUP_OCL_INFO_LIST_MAGIC);
  EXPECT_EQ(list.TotalSize, written);
  EXPECT_EQ(list.Reserved, 0u);
  EXPECT_LT(list.TotalSize, 32u << 10) << "well inside the worker's 64 KiB inline output";
  std::cout << "[ info ] " << GetParam() << ": " << list.Count << " device info records, " << list.TotalSize
            << " bytes\n";
  size_t at = sizeof(list);
  int64_t previous = -1;
  bool has_name = false;
  for (uint32_t i = 0; i < list.Count; ++i) {
    GPUP_OCL_INFO_RECORD r;
    ASSERT_LE(at + sizeof(r), written);
    std::memcpy(&r, out.data() + at, sizeof(r));
    at += sizeof(r);
    ASSERT_LE(at + r.Size, written) << "record " << i;
    EXPECT_GT(int64_t{r.Param}, previous) << "sorted and unique";
    previous = r.Param;
    EXPECT_NE(r.Param, kClDevicePlatform) << "pointer values are left out";
    EXPECT_NE(r.Param, kClDeviceParentDevice);
    if (r.Param == kClDeviceName) {
      has_name = true;
      ASSERT_GT(r.Size, 0u);
      const std::string name(reinterpret_cast<const char*>(out.data() + at), r.Size);
      EXPECT_EQ(name.back(), '\0') << "raw clGetDeviceInfo bytes keep the NUL";
      EXPECT_EQ(std::string(name.c_str()).substr(0, sizeof(f.info.Name) - 1), std::string(f.info.Name));
    }
    at += r.Size;
    while (at % 8 != 0) EXPECT_EQ(out[at++], 0) << "padding";
  }
  EXPECT_EQ(at, written);
  EXPECT_TRUE(has_name);

  // Too small: only the header (with TotalSize), or nothing when even that does not fit.
  std::vector<unsigned char> small(list.TotalSize - 1, 0xcc);
  written = 0;
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, small.data(), static_cast<uint32_t>(small.size()), &h, sizeof(h),
                    &written),
            GPUP_STATUS_BUFFER_TOO_SMALL);
  EXPECT_EQ(written, sizeof(GPUP_OCL_INFO_LIST));
  GPUP_OCL_INFO_LIST header;
  std::memcpy(&header, small.data(), sizeof(header));
  EXPECT_EQ(header.TotalSize, list.TotalSize);
  EXPECT_EQ(header.Count, list.Count);
  EXPECT_EQ(small[sizeof(header)], 0xcc) << "nothing but the header";
  std::vector<unsigned char> tiny(sizeof(GPUP_OCL_INFO_LIST) - 1, 0xcc);
  written = 7;
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, tiny.data(), static_cast<uint32_t>(tiny.size()), &h, sizeof(h),
                    &written),
            GPUP_STATUS_BUFFER_TOO_SMALL);
  EXPECT_EQ(written, 0u);
  EXPECT_EQ(tiny[0], 0xcc);
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, nullptr, 4096, &h, sizeof(h)), GPUP_STATUS_INVALID_PARAMETER);
  std::vector<unsigned char> again(list.TotalSize);
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, again.data(), list.TotalSize, &h, sizeof(h)), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(std::memcmp(again.data(), out.data(), list.TotalSize), 0) << "the same answer every time";
}

TEST_P(Conformance, ProgramInfoDescribesKernelsAndArguments) {
  KmdFixture::Built b = f.build(kPortableKernelsSource, GPUP_OCL_PROGRAM_SOURCE, {}, 4 << 20);
  ASSERT_EQ(b.status, GPUP_STATUS_SUCCESS) << b.log;
  ASSERT_TRUE(b.has_info);
  const ProgramInfo& p = b.info;
  EXPECT_EQ(p.info.BinaryType, kClBinaryExecutable);
  EXPECT_EQ(p.info.KernelTableComplete, 1u);
  ASSERT_EQ(p.info.KernelCount, 4u);
  for (const char* name : {"add_i32", "copy_i32", "or_null_i32", "spin"}) EXPECT_NE(p.find(name), nullptr) << name;
  const auto* add = p.find("add_i32");
  ASSERT_NE(add, nullptr);
  ASSERT_EQ(add->info.NumArgs, 2u);
  EXPECT_GE(add->info.WorkGroupSize, 1u);
  EXPECT_EQ(add->args[0].info.Kind, uint32_t{GPUPDDI_ARG_BUFFER});
  EXPECT_EQ(add->args[0].info.ValueSize, 8u);
  EXPECT_EQ(add->args[0].type_name, "int*");
  EXPECT_EQ(add->args[0].name, "b");
  EXPECT_EQ(add->args[1].info.Kind, uint32_t{GPUPDDI_ARG_VALUE});
  EXPECT_EQ(add->args[1].info.ValueSize, 4u);
  EXPECT_EQ(add->args[1].type_name, "int");
  EXPECT_EQ(add->args[1].name, "v");
  const auto* or_null = p.find("or_null_i32");
  ASSERT_NE(or_null, nullptr);
  ASSERT_EQ(or_null->args.size(), 3u);
  EXPECT_EQ(or_null->args[2].info.Kind, uint32_t{GPUPDDI_ARG_LOCAL});
  EXPECT_EQ(or_null->args[2].info.ValueSize, 0u);
  const auto* spin = p.find("spin");
  ASSERT_NE(spin, nullptr);
  EXPECT_EQ(spin->args[1].info.ValueSize, 8u);
  EXPECT_GT(p.info.BinarySize, 0u);
  EXPECT_EQ(p.info.BinaryBytes, p.info.BinarySize) << "the binary fits in 4 MiB";
  std::cout << "[ info ] " << GetParam() << ": 4-kernel binary " << p.info.BinarySize << " bytes, table "
            << p.info.KernelTableSize << " bytes\n";

  // A BINARY program from the returned binary builds, describes the same kernels, and runs.
  KmdFixture::Built again = f.build(b.info.binary, GPUP_OCL_PROGRAM_BINARY, {}, 4 << 20);
  ASSERT_EQ(again.status, GPUP_STATUS_SUCCESS) << again.log;
  ASSERT_TRUE(again.has_info);
  EXPECT_EQ(again.info.info.KernelCount, 4u);
  const auto* add2 = again.info.find("add_i32");
  ASSERT_NE(add2, nullptr);
  ASSERT_EQ(add2->args.size(), 2u);
  EXPECT_EQ(add2->args[0].info.Kind, uint32_t{GPUPDDI_ARG_BUFFER}) << "argument info survives the binary";
  EXPECT_EQ(add2->args[1].info.Kind, uint32_t{GPUPDDI_ARG_VALUE});
  EXPECT_EQ(add2->args[1].info.ValueSize, add->args[1].info.ValueSize);
  EXPECT_EQ(add2->args[1].type_name, "int");
  auto buf = f.cpu_buffer(1024 * 4);
  auto* ctx = f.context();
  Dispatch d(again.h, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{11}), 1024);
  ASSERT_EQ(f.run(ctx, {d.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  for (int i = 0; i < 1024; ++i) ASSERT_EQ(ints(buf, i, 1)[0], 11) << "element " << i;
}

TEST_P(Conformance, ProgramInfoTruncationAndVersion1) {
  KmdFixture::Built full = f.build(kPortableKernelsSource, GPUP_OCL_PROGRAM_SOURCE, {}, 4 << 20);
  ASSERT_EQ(full.status, GPUP_STATUS_SUCCESS) << full.log;
  ASSERT_TRUE(full.has_info);
  const uint64_t table = full.info.info.KernelTableSize;
  const uint32_t header = sizeof(GPUP_OCL_BUILD_RESULT) + sizeof(GPUP_OCL_PROGRAM_INFO);

  // Room for the table, not for the binary.
  KmdFixture::Built no_binary =
      f.build(kPortableKernelsSource, GPUP_OCL_PROGRAM_SOURCE, {}, static_cast<uint32_t>(header + table));
  ASSERT_EQ(no_binary.status, GPUP_STATUS_SUCCESS);
  ASSERT_TRUE(no_binary.has_info);
  EXPECT_EQ(no_binary.info.info.KernelTableComplete, 1u);
  EXPECT_EQ(no_binary.info.info.KernelCount, 4u);
  EXPECT_EQ(no_binary.info.info.BinaryBytes, 0u);
  EXPECT_EQ(no_binary.info.info.BinarySize, full.info.info.BinarySize);

  // Room for the header and part of the table.
  KmdFixture::Built cut =
      f.build(kPortableKernelsSource, GPUP_OCL_PROGRAM_SOURCE, {}, static_cast<uint32_t>(header + table - 8));
  ASSERT_EQ(cut.status, GPUP_STATUS_SUCCESS);
  ASSERT_TRUE(cut.has_info);
  EXPECT_EQ(cut.info.info.KernelTableComplete, 0u);
  EXPECT_LT(cut.info.info.KernelCount, 4u);
  EXPECT_EQ(cut.result.LogBytes, 0u);
  EXPECT_EQ(cut.info.info.BinaryBytes, 0u);

  // Version 1 descriptors still get the version 1 output (the fixture checks the size).
  KmdFixture::Built v1 = f.build(kPortableKernelsSource, GPUP_OCL_PROGRAM_SOURCE, {}, 4 << 20, 1);
  ASSERT_EQ(v1.status, GPUP_STATUS_SUCCESS) << v1.log;
  EXPECT_FALSE(v1.has_info);
  EXPECT_EQ(v1.written, sizeof(GPUP_OCL_BUILD_RESULT) + v1.result.LogBytes);
  const std::string set = set_content({{"", kPortableKernelsSource}});
  EXPECT_EQ(f.build(set, GPUP_OCL_PROGRAM_COMPILE, {}, 4096, 1).status, GPUP_STATUS_INVALID_PARAMETER)
      << "COMPILE needs version 2";

  // A failed build: no kernels, no binary.
  KmdFixture::Built broken = f.build("__kernel void broken(__global int* b) { b[0] = ; }\n");
  EXPECT_EQ(broken.status, GPUP_STATUS_BUILD_FAILED);
  ASSERT_TRUE(broken.has_info);
  EXPECT_EQ(broken.info.info.KernelCount, 0u);
  EXPECT_EQ(broken.info.info.BinarySize, 0u);
  EXPECT_GT(broken.result.LogBytes, 0u);
}

// Two units sharing a header, compiled separately, linked into an executable; and a library.
constexpr const char* kCommonHeader = "#define ADD_SCALE 1\nint add_helper(int a, int v);\n";
constexpr const char* kUnitKernel =
    "#include \"gpup/common.h\"\n"
    "__kernel void add_i32(__global int* b, int v) {\n"
    "  b[get_global_id(0)] = add_helper(b[get_global_id(0)], v * ADD_SCALE);\n"
    "}\n";
constexpr const char* kUnitHelper = "#include \"gpup/common.h\"\nint add_helper(int a, int v) { return a + v; }\n";

TEST_P(Conformance, CompileAndLinkUnits) {
  auto compile = [&](const char* unit) {
    return f.build(set_content({{"", unit}, {"gpup/common.h", kCommonHeader}}), GPUP_OCL_PROGRAM_COMPILE, "-DUNUSED",
                   4 << 20);
  };
  KmdFixture::Built a = compile(kUnitKernel);
  ASSERT_EQ(a.status, GPUP_STATUS_SUCCESS) << a.log;
  ASSERT_TRUE(a.has_info);
  EXPECT_EQ(a.info.info.BinaryType, kClBinaryCompiledObject);
  EXPECT_EQ(a.info.info.KernelCount, 0u);
  EXPECT_EQ(a.info.info.KernelTableComplete, 1u);
  ASSERT_GT(a.info.info.BinaryBytes, 0u);
  KmdFixture::Built b = compile(kUnitHelper);
  ASSERT_EQ(b.status, GPUP_STATUS_SUCCESS) << b.log;
  ASSERT_GT(b.info.info.BinaryBytes, 0u);
  std::cout << "[ info ] " << GetParam() << ": compiled objects " << a.info.info.BinarySize << " and "
            << b.info.info.BinarySize << " bytes\n";

  auto buf = f.cpu_buffer(256 * 4);
  auto* ctx = f.context();
  Dispatch on_object(a.h, "add_i32", Args().buffer(ref(buf.h, 0, 1024)).value(int32_t{1}), 256);
  EXPECT_EQ(f.submit(ctx, {on_object.cmd()}, 1), GPUP_STATUS_INVALID_PARAMETER) << "an object is not dispatchable";

  KmdFixture::Built exe = f.build(set_content({{"", a.info.binary}, {"", b.info.binary}}), GPUP_OCL_PROGRAM_LINK, {}, 4 << 20);
  ASSERT_EQ(exe.status, GPUP_STATUS_SUCCESS) << exe.log;
  ASSERT_TRUE(exe.has_info);
  EXPECT_EQ(exe.info.info.BinaryType, kClBinaryExecutable);
  const auto* add = exe.info.find("add_i32");
  ASSERT_NE(add, nullptr);
  ASSERT_EQ(add->args.size(), 2u);
  EXPECT_EQ(add->args[0].info.Kind, uint32_t{GPUPDDI_ARG_BUFFER}) << "argument info survives compile and link";
  EXPECT_EQ(add->args[1].info.Kind, uint32_t{GPUPDDI_ARG_VALUE});
  EXPECT_EQ(add->args[1].type_name, "int");
  Dispatch d(exe.h, "add_i32", Args().buffer(ref(buf.h, 0, 1024)).value(int32_t{5}), 256);
  ASSERT_EQ(f.run(ctx, {d.cmd()}), GPUP_STATUS_SUCCESS);

  // The helper as a library, linked with the kernel's object.
  KmdFixture::Built lib = f.build(set_content({{"", b.info.binary}}), GPUP_OCL_PROGRAM_LINK, "-create-library", 4 << 20);
  ASSERT_EQ(lib.status, GPUP_STATUS_SUCCESS) << lib.log;
  EXPECT_EQ(lib.info.info.BinaryType, kClBinaryLibrary);
  EXPECT_EQ(lib.info.info.KernelCount, 0u);
  ASSERT_GT(lib.info.info.BinaryBytes, 0u);
  Dispatch on_lib(lib.h, "add_i32", Args().buffer(ref(buf.h, 0, 1024)).value(int32_t{1}), 256);
  EXPECT_EQ(f.submit(ctx, {on_lib.cmd()}, 2), GPUP_STATUS_INVALID_PARAMETER) << "a library is not dispatchable";
  KmdFixture::Built exe2 =
      f.build(set_content({{"", a.info.binary}, {"", lib.info.binary}}), GPUP_OCL_PROGRAM_LINK, {}, 4 << 20);
  ASSERT_EQ(exe2.status, GPUP_STATUS_SUCCESS) << exe2.log;
  Dispatch d2(exe2.h, "add_i32", Args().buffer(ref(buf.h, 0, 1024)).value(int32_t{-2}), 256);
  ASSERT_EQ(f.run(ctx, {d2.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  for (int i = 0; i < 256; ++i) ASSERT_EQ(ints(buf, i, 1)[0], 3) << "element " << i;

  // A link that cannot resolve add_helper fails with a log, as does garbage.
  if (GetParam() == "opencl") {
    KmdFixture::Built unresolved = f.build(set_content({{"", a.info.binary}}), GPUP_OCL_PROGRAM_LINK, {}, 4 << 20);
    EXPECT_EQ(unresolved.status, GPUP_STATUS_BUILD_FAILED);
    EXPECT_NE(unresolved.result.BuildError, 0);
    EXPECT_FALSE(unresolved.log.empty());
    KmdFixture::Built garbage = f.build(set_content({{"", "\x7fgarbage"}}), GPUP_OCL_PROGRAM_LINK, {}, 4096);
    EXPECT_EQ(garbage.status, GPUP_STATUS_BUILD_FAILED);
    EXPECT_NE(garbage.result.BuildError, 0);
  }
}

TEST_P(Conformance, HostileSetFramingIsInvalid) {
  const std::string good_set = set_content({{"", kUnitHelper}, {"gpup/common.h", kCommonHeader}});
  auto compile_raw = [&](const std::string& content, uint32_t format = GPUP_OCL_PROGRAM_COMPILE) {
    const std::vector<unsigned char> d = program_desc(format, {}, content);
    return f.build_raw(d.data(), static_cast<uint32_t>(d.size()));
  };
  ASSERT_EQ(compile_raw(good_set), GPUP_STATUS_SUCCESS);
  auto entry_at = [](const std::string& set, size_t index) {
    size_t at = sizeof(GPUP_OCL_SET_HEADER);
    for (size_t i = 0;; ++i) {
      at = (at + 7) / 8 * 8;
      if (i == index) return at;
      GPUP_OCL_SET_ENTRY e;
      std::memcpy(&e, set.data() + at, sizeof(e));
      at += sizeof(e) + e.NameSize + e.DataSize;
    }
  };
  auto edit_entry = [&](size_t index, auto edit) {
    std::string s = good_set;
    GPUP_OCL_SET_ENTRY e;
    const size_t at = entry_at(s, index);
    std::memcpy(&e, s.data() + at, sizeof(e));
    edit(e);
    std::memcpy(s.data() + at, &e, sizeof(e));
    return s;
  };
  std::vector<std::pair<const char*, std::string>> bad;
  bad.emplace_back("empty content", std::string());
  bad.emplace_back("header only, count 1", good_set.substr(0, sizeof(GPUP_OCL_SET_HEADER)));
  bad.emplace_back("truncated by one byte", good_set.substr(0, good_set.size() - 1));
  bad.emplace_back("truncated entry header", good_set.substr(0, entry_at(good_set, 1) + 4));
  bad.emplace_back("one byte long", good_set + "x");
  bad.emplace_back("trailing padding", good_set + std::string(8 - good_set.size() % 8 ? 8 - good_set.size() % 8 : 8, '\0'));
  std::string count0 = good_set;
  std::memset(count0.data() + 4, 0, 4);
  bad.emplace_back("count 0", count0);
  std::string count_big = good_set;
  const uint32_t big = GPUP_OCL_MAX_SET_ENTRIES + 1;
  std::memcpy(count_big.data() + 4, &big, 4);
  bad.emplace_back("count above the limit", count_big);
  std::string count3 = good_set;
  const uint32_t three = 3;
  std::memcpy(count3.data() + 4, &three, 4);
  bad.emplace_back("count larger than the entries", count3);
  std::string magic = good_set;
  magic[0] ^= 1;
  bad.emplace_back("magic", magic);
  bad.emplace_back("DataSize 2^64-1", edit_entry(1, [](auto& e) { e.DataSize = UINT64_MAX; }));
  bad.emplace_back("DataSize wraps to the end", edit_entry(0, [](auto& e) { e.DataSize += 0xfffffffffffff000ull; }));
  bad.emplace_back("NameSize 2^32-1", edit_entry(1, [](auto& e) { e.NameSize = UINT32_MAX; }));
  bad.emplace_back("NameSize 256", edit_entry(1, [](auto& e) { e.NameSize = 256; }));
  bad.emplace_back("Reserved", edit_entry(1, [](auto& e) { e.Reserved = 1; }));
  bad.emplace_back("DataSize 0", edit_entry(1, [](auto& e) { e.DataSize = 0; }));
  for (const auto& [what, name] : std::vector<std::pair<const char*, std::string>>{
           {"name with ..", "../common.h"},
           {"name with .. inside", "gpup/../../etc/passwd"},
           {"absolute name", "/tmp/common.h"},
           {"name with NUL", std::string("com\0mon.h", 9)},
           {"empty name", ""}}) {
    bad.emplace_back(what, set_content({{"", kUnitHelper}, {name, kCommonHeader}}));
  }
  bad.emplace_back("named main source", set_content({{"main.cl", kUnitHelper}}));
  bad.emplace_back("NUL inside a text", set_content({{"", std::string("int x;\0int y;", 13)}}));
  bad.emplace_back("text that is only a NUL", set_content({{"", std::string(1, '\0')}}));
  // An entry not 8-byte aligned: the header's entry placed right after an odd-sized source.
  {
    std::string s;
    GPUP_OCL_SET_HEADER h{GPUP_OCL_SET_MAGIC, 2};
    s.append(reinterpret_cast<const char*>(&h), sizeof(h));
    const std::string src = "int x;";  // 8 + 16 + 6 = 30: the next entry would need 2 bytes of padding
    GPUP_OCL_SET_ENTRY e0{0, 0, src.size()};
    s.append(reinterpret_cast<const char*>(&e0), sizeof(e0));
    s += src;
    GPUP_OCL_SET_ENTRY e1{1, 0, 6};
    s.append(reinterpret_cast<const char*>(&e1), sizeof(e1));
    s += "hint x;";
    bad.emplace_back("misaligned entry", s);
  }
  {
    std::string s = set_content({{"", "int x;"}, {"h", "int y;"}});
    s[30] = 1;  // padding before entry 1
    bad.emplace_back("non-zero padding", s);
  }
  for (const auto& [what, content] : bad) {
    EXPECT_EQ(compile_raw(content), GPUP_STATUS_INVALID_PARAMETER) << what;
  }
  EXPECT_EQ(compile_raw(set_content({{"main.cl", "x"}}), GPUP_OCL_PROGRAM_LINK), GPUP_STATUS_INVALID_PARAMETER)
      << "named link input";
  EXPECT_EQ(compile_raw(set_content({{"", ""}}), GPUP_OCL_PROGRAM_LINK), GPUP_STATUS_INVALID_PARAMETER)
      << "empty link input";
  EXPECT_EQ(compile_raw(count0, GPUP_OCL_PROGRAM_LINK), GPUP_STATUS_INVALID_PARAMETER) << "no link inputs";
}

// GPUPDDI_GPUMMUCAPS.CacheCoherentMemorySupported (ddi.h): after one Lock, the guest reads and
// writes the mapping directly around completed work, with no further Lock / Unlock.
TEST_P(Conformance, CacheCoherentMemoryNeedsNoLockUnlock) {
  GPUPDDI_GPUMMUCAPS mmu{};
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_GPUMMUCAPS, &mmu, sizeof(mmu)), GPUP_STATUS_SUCCESS);
  if (!mmu.CacheCoherentMemorySupported) GTEST_SKIP() << "the device does not claim coherent memory";
  auto prog = program();
  ASSERT_NE(prog, nullptr);
  constexpr size_t kCount = 1024;
  auto a = f.cpu_buffer(kCount * 4);
  auto b = f.cpu_buffer(kCount * 4);
  ASSERT_EQ(f.lock(a.h), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(b.h), GPUP_STATUS_SUCCESS);
  auto* ctx = f.context();
  for (int round = 0; round < 3; ++round) {
    std::vector<int32_t> v(kCount);
    for (size_t i = 0; i < kCount; ++i) v[i] = static_cast<int32_t>(i * 7 + round);
    set_ints(a, v);  // written straight into the mapping
    Dispatch add(prog, "add_i32", Args().buffer(ref(b.h, 0, kCount * 4)).value(int32_t{100}), kCount);
    ASSERT_EQ(f.run(ctx, {copy_cmd(ref(a.h, 0, kCount * 4), ref(b.h, 0, kCount * 4)), add.cmd()}), GPUP_STATUS_SUCCESS);
    const std::vector<int32_t> got = ints(b, 0, kCount);  // read straight from the mapping
    for (size_t i = 0; i < kCount; ++i) ASSERT_EQ(got[i], v[i] + 100) << "round " << round << " element " << i;
    // The device's own writes to a, seen by the guest; then the guest's overwrite, seen by the device.
    const int32_t pattern = 0x5a5a0000 + round;
    ASSERT_EQ(f.run(ctx, {fill_cmd(ref(a.h, 0, 64), &pattern, 4)}), GPUP_STATUS_SUCCESS);
    EXPECT_EQ(ints(a, 15, 1)[0], pattern);
    EXPECT_EQ(ints(a, 16, 1)[0], v[16]);
  }
}

TEST_P(Conformance, DispatchAddOnSubRange) {
  auto prog = program();
  ASSERT_NE(prog, nullptr);
  constexpr size_t kCount = 4096;
  auto buf = f.cpu_buffer(kCount * 4);
  std::vector<int32_t> init(kCount);
  std::iota(init.begin(), init.end(), 0);
  set_ints(buf, init);
  ASSERT_EQ(f.unlock(buf.h), GPUP_STATUS_SUCCESS);

  const uint64_t first = f.align / 4 * 3;  // an aligned element offset (3 * alignment bytes)
  const uint64_t count = 256;
  auto* ctx = f.context();
  Dispatch d(prog, "add_i32", Args().buffer(ref(buf.h, first * 4, count * 4)).value(int32_t{7}), count);
  ASSERT_EQ(f.run(ctx, {d.cmd()}), GPUP_STATUS_SUCCESS);
  // The whole buffer with a negative value and an explicit work-group size.
  Dispatch whole(prog, "add_i32", Args().buffer(ref(buf.h, 0, kCount * 4)).value(int32_t{-1}), kCount, 64);
  ASSERT_EQ(f.run(ctx, {whole.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  const std::vector<int32_t> got = ints(buf, 0, kCount);
  for (size_t i = 0; i < kCount; ++i) {
    const int32_t want = static_cast<int32_t>(i) - 1 + (i >= first && i < first + count ? 7 : 0);
    ASSERT_EQ(got[i], want) << "element " << i;
  }
}

TEST_P(Conformance, DispatchWithGlobalOffsetLocalAndNullArgs) {
  auto prog = program();
  ASSERT_NE(prog, nullptr);
  constexpr size_t kCount = 256;
  auto src = f.cpu_buffer(kCount * 4);
  auto dst = f.cpu_buffer(kCount * 4);
  std::vector<int32_t> init(kCount);
  for (size_t i = 0; i < kCount; ++i) init[i] = static_cast<int32_t>(1000 + i);
  set_ints(src, init);
  ASSERT_EQ(f.unlock(src.h), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.unlock(dst.h), GPUP_STATUS_SUCCESS);
  auto* ctx = f.context();
  // First half from src, second half -1 through a NULL buffer; 16-item work-groups, 64 bytes
  // of local scratch each.
  Dispatch from_src(prog, "or_null_i32",
                    Args().buffer(ref(dst.h, 0, kCount * 4)).buffer(ref(src.h, 0, kCount * 4)).local(16 * 4),
                    kCount / 2, 16);
  Dispatch from_null(prog, "or_null_i32", Args().buffer(ref(dst.h, 0, kCount * 4)).null_buffer().local(16 * 4),
                     kCount / 2, 16);
  from_null.offset[0] = kCount / 2;
  ASSERT_EQ(f.run(ctx, {from_src.cmd(), from_null.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(dst.h), GPUP_STATUS_SUCCESS);
  const std::vector<int32_t> got = ints(dst, 0, kCount);
  for (size_t i = 0; i < kCount; ++i) ASSERT_EQ(got[i], i < kCount / 2 ? init[i] : -1) << "element " << i;
}

TEST_P(Conformance, SpinMatchesReference) {
  auto prog = program();
  ASSERT_NE(prog, nullptr);
  constexpr size_t kCount = 64;
  auto out = f.cpu_buffer(kCount * 8);
  auto* ctx = f.context();
  Dispatch d(prog, "spin", Args().buffer(ref(out.h, 0, kCount * 8)).value(uint64_t{1000}), kCount);
  ASSERT_EQ(f.run(ctx, {d.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(out.h), GPUP_STATUS_SUCCESS);
  for (size_t i = 0; i < kCount; ++i) {
    uint64_t v;
    std::memcpy(&v, out.mem + i * 8, 8);
    ASSERT_EQ(v, mock::spin_reference(i, 1000)) << "item " << i;
  }
}

TEST_P(Conformance, UnknownKernelIsNotFound) {
  auto prog = program();
  auto buf = f.cpu_buffer(4096);
  auto* ctx = f.context();
  Dispatch d(prog, "no_such_kernel", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{1}), 16);
  EXPECT_EQ(f.submit(ctx, {d.cmd()}, 1), GPUP_STATUS_NOT_FOUND);
  Dispatch empty_name(prog, "", Args(), 16);
  EXPECT_EQ(f.submit(ctx, {empty_name.cmd()}, 2), GPUP_STATUS_INVALID_PARAMETER);
  std::string long_name(4096, 'k');
  Dispatch too_long(prog, long_name, Args(), 16);
  EXPECT_EQ(f.submit(ctx, {too_long.cmd()}, 3), GPUP_STATUS_INVALID_PARAMETER);
  GPUPDDI_COMMAND no_name = d.cmd();
  no_name.u.Dispatch.pKernelName = nullptr;
  EXPECT_EQ(f.submit(ctx, {no_name}, 4), GPUP_STATUS_INVALID_PARAMETER);
  GPUPDDI_COMMAND not_program = d.cmd();
  not_program.u.Dispatch.hProgram = buf.h;
  EXPECT_EQ(f.submit(ctx, {not_program}, 5), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(f.run(ctx, {}), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(ctx->sink->count(), 1u) << "refused submissions complete nothing";
}

TEST_P(Conformance, BadKernelArgumentsAreRefusedBeforeQueuing) {
  auto prog = program();
  ASSERT_NE(prog, nullptr);
  auto buf = f.cpu_buffer(4096);
  ASSERT_EQ(f.unlock(buf.h), GPUP_STATUS_SUCCESS);
  auto* ctx = f.context();
  Dispatch good(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{5}), 1024);
  std::vector<std::pair<const char*, Dispatch>> bad;
  bad.emplace_back("8-byte value for an int", Dispatch(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(uint64_t{5}), 1024));
  bad.emplace_back("2-byte value for an int", Dispatch(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int16_t{5}), 1024));
  bad.emplace_back("too few arguments", Dispatch(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)), 1024));
  bad.emplace_back("too many arguments",
                   Dispatch(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{5}).value(int32_t{5}), 1024));
  bad.emplace_back("value for a buffer", Dispatch(prog, "add_i32", Args().value(uint64_t{0x1000}).value(int32_t{5}), 1024));
  bad.emplace_back("buffer for a value",
                   Dispatch(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).buffer(ref(buf.h, 0, 4096)), 1024));
  bad.emplace_back("local for a buffer", Dispatch(prog, "add_i32", Args().local(64).value(int32_t{5}), 1024));
  bad.emplace_back("empty local", Dispatch(prog, "or_null_i32",
                                           Args().buffer(ref(buf.h, 0, 4096)).null_buffer().local(0), 64, 16));
  bad.emplace_back("local too large",
                   Dispatch(prog, "or_null_i32",
                            Args().buffer(ref(buf.h, 0, 4096)).null_buffer().local(static_cast<uint32_t>(f.info.LocalMemSize + 4)),
                            64, 16));
  bad.emplace_back("global size 0", Dispatch(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{5}), 0));
  bad.emplace_back("local size not dividing global",
                   Dispatch(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{5}), 1000, 64));
  Dispatch dims0 = good;
  dims0.dims = 0;
  bad.emplace_back("WorkDim 0", dims0);
  Dispatch dims4 = good;
  dims4.dims = 4;
  bad.emplace_back("WorkDim 4", dims4);
  Dispatch wrapping = good;
  wrapping.offset[0] = UINT64_MAX - 10;
  bad.emplace_back("offset + size wraps", wrapping);
  if (f.align > 1) {
    bad.emplace_back("misaligned sub-buffer offset",
                     Dispatch(prog, "add_i32", Args().buffer(ref(buf.h, f.align / 2, 1024)).value(int32_t{5}), 256));
  }
  for (const auto& [what, d] : bad) {
    // A valid dispatch first: it must not run either.
    EXPECT_EQ(f.submit(ctx, {good.cmd(), d.cmd()}, 100), GPUP_STATUS_INVALID_PARAMETER) << what;
  }
  GPUPDDI_COMMAND no_args = good.cmd();
  no_args.u.Dispatch.pArgs = nullptr;
  EXPECT_EQ(f.submit(ctx, {no_args}, 101), GPUP_STATUS_INVALID_PARAMETER);
  GPUPDDI_COMMAND null_value = good.cmd();
  std::vector<GPUPDDI_KERNEL_ARG> args = good.args.list();
  args[1].pValue = nullptr;
  null_value.u.Dispatch.pArgs = args.data();
  EXPECT_EQ(f.submit(ctx, {null_value}, 102), GPUP_STATUS_INVALID_PARAMETER);

  EXPECT_EQ(f.run(ctx, {}), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(ctx->sink->count(), 1u);
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  for (int i = 0; i < 1024; ++i) ASSERT_EQ(ints(buf, i, 1)[0], 0) << "nothing ran, element " << i;
}

// ---------------------------------------------------------------------------------------------
// Completion

TEST_P(Conformance, CompletionExactlyOncePerSubmission) {
  auto prog = program();
  auto buf = f.cpu_buffer(4096);
  auto* ctx = f.context();
  Dispatch d(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{1}), 1024);
  std::vector<uint64_t> ids;
  std::mt19937_64 rng(7);
  for (int i = 0; i < 20; ++i) {
    ids.push_back(rng());
    ASSERT_EQ(f.submit(ctx, {d.cmd()}, ids.back()), GPUP_STATUS_SUCCESS);
  }
  ASSERT_TRUE(ctx->sink->wait_for(ids.size()));
  std::this_thread::sleep_for(50ms);
  const auto done = ctx->sink->snapshot();
  ASSERT_EQ(done.size(), ids.size()) << "no extra completions";
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(done[i].first, ids[i]);
    EXPECT_EQ(done[i].second, GPUP_STATUS_SUCCESS);
  }
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(ints(buf, 0, 1)[0], 20);
  EXPECT_EQ(ints(buf, 1023, 1)[0], 20);
}

TEST_P(Conformance, ManySubmissionsInFlightCompleteInOrder) {
  auto prog = program();
  auto buf = f.cpu_buffer(4096);
  auto spin_out = f.cpu_buffer(64 * 8);
  ASSERT_EQ(f.unlock(buf.h), GPUP_STATUS_SUCCESS);
  auto* ctx = f.context();
  Dispatch add(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{1}), 1024);
  Dispatch spin(prog, "spin", Args().buffer(ref(spin_out.h, 0, 64 * 8)).value(uint64_t{20000}), 64);
  constexpr int kSubmissions = 200;
  for (int i = 0; i < kSubmissions; ++i) {
    std::vector<GPUPDDI_COMMAND> cmds = {add.cmd()};
    if (i % 10 == 0) cmds.insert(cmds.begin(), spin.cmd());
    ASSERT_EQ(f.submit(ctx, cmds, 1000 + i), GPUP_STATUS_SUCCESS);
  }
  ASSERT_TRUE(ctx->sink->wait_for(kSubmissions));
  const auto done = ctx->sink->snapshot();
  ASSERT_EQ(done.size(), size_t{kSubmissions});
  for (int i = 0; i < kSubmissions; ++i) {
    ASSERT_EQ(done[i].first, uint64_t(1000 + i)) << "completion " << i << " out of order";
    ASSERT_EQ(done[i].second, GPUP_STATUS_SUCCESS);
  }
  ASSERT_EQ(f.lock(buf.h), GPUP_STATUS_SUCCESS);
  for (int i = 0; i < 1024; ++i) ASSERT_EQ(ints(buf, i, 1)[0], kSubmissions) << "element " << i;
}

TEST_P(Conformance, DestroyContextReportsEveryCompletion) {
  auto prog = program();
  auto out = f.cpu_buffer(64 * 8);
  auto* ctx = f.context();
  Dispatch spin(prog, "spin", Args().buffer(ref(out.h, 0, 64 * 8)).value(uint64_t{50000}), 64);
  for (int i = 0; i < 10; ++i) ASSERT_EQ(f.submit(ctx, {spin.cmd()}, i), GPUP_STATUS_SUCCESS);
  // The fixture frees a context's sink with it; keep this one to look at afterwards.
  std::unique_ptr<Sink> sink = std::move(ctx->sink);
  ctx->sink = std::make_unique<Sink>();
  f.destroy_context(ctx);
  EXPECT_EQ(sink->count(), 10u) << "all completions reported when DestroyContext returns";
  for (const auto& [id, status] : sink->snapshot()) EXPECT_EQ(status, GPUP_STATUS_SUCCESS) << id;
}

TEST_P(Conformance, TwoContextsShareAProgram) {
  auto prog = program();
  ASSERT_NE(prog, nullptr);
  constexpr int kThreads = 2, kRounds = 40;
  std::vector<KmdFixture::Buffer> bufs;
  std::vector<KmdFixture::Context*> ctxs;
  for (int t = 0; t < kThreads; ++t) {
    bufs.push_back(f.cpu_buffer(4096));
    ctxs.push_back(f.context());
  }
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Dispatch d(prog, "add_i32", Args().buffer(ref(bufs[t].h, 0, 4096)).value(int32_t{t + 1}), 1024);
      for (int r = 0; r < kRounds; ++r) {
        if (f.submit(ctxs[t], {d.cmd()}, r) != GPUP_STATUS_SUCCESS) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_EQ(failures.load(), 0);
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_TRUE(ctxs[t]->sink->wait_for(kRounds));
    ASSERT_EQ(f.lock(bufs[t].h), GPUP_STATUS_SUCCESS);
    for (int i = 0; i < 1024; ++i) ASSERT_EQ(ints(bufs[t], i, 1)[0], (t + 1) * kRounds) << "context " << t;
  }
}

TEST_P(Conformance, StopAdapterCleansUpEverything) {
  auto prog = program();
  auto out = f.cpu_buffer(64 * 8);
  f.device_buffer(1 << 20);
  auto* ctx = f.context();
  Dispatch spin(prog, "spin", Args().buffer(ref(out.h, 0, 64 * 8)).value(uint64_t{50000}), 64);
  for (int i = 0; i < 5; ++i) ASSERT_EQ(f.submit(ctx, {spin.cmd()}, i), GPUP_STATUS_SUCCESS);
  auto sink = std::move(ctx->sink);
  ctx->sink = std::make_unique<Sink>();
  f.stop_adapter_now();
  EXPECT_EQ(sink->count(), 5u) << "work in flight is completed or reported";
}

TEST_P(Conformance, ResetEngineWhenSupported) {
  if (f.ddi().Adapter.pfnResetEngine == nullptr) GTEST_SKIP() << "pfnResetEngine is optional";
  auto prog = program();
  auto out = f.cpu_buffer(8);
  auto buf = f.cpu_buffer(4096);
  auto* ctx = f.context();
  Dispatch forever(prog, "spin", Args().buffer(ref(out.h, 0, 8)).value(uint64_t{1} << 60), 1);
  ASSERT_EQ(f.submit(ctx, {forever.cmd()}, 1), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.submit(ctx, {forever.cmd()}, 2), GPUP_STATUS_SUCCESS);
  std::this_thread::sleep_for(20ms);
  GPUPDDI_ARG_RESETENGINE r{};
  r.struct_size = sizeof(r);
  r.hContext = ctx->h;
  ASSERT_EQ(f.ddi().Adapter.pfnResetEngine(f.adapter, &r), GPUP_STATUS_SUCCESS);
  ASSERT_TRUE(ctx->sink->wait_for(2, 10s));
  auto done = ctx->sink->snapshot();
  EXPECT_EQ(done[0], std::make_pair(uint64_t{1}, gpup_status{GPUP_STATUS_CONTEXT_RESET_GUILTY}));
  EXPECT_EQ(done[1], std::make_pair(uint64_t{2}, gpup_status{GPUP_STATUS_CONTEXT_RESET_GUILTY}));
  Dispatch add(prog, "add_i32", Args().buffer(ref(buf.h, 0, 4096)).value(int32_t{1}), 1024);
  EXPECT_EQ(f.run(ctx, {add.cmd()}), GPUP_STATUS_SUCCESS) << "the context survives a reset";
}

// ---------------------------------------------------------------------------------------------
// DDI 1.1 / contract version 3: images and samplers

constexpr uint32_t kImage2D = 0x10F1, kImage3D = 0x10F2, kImage1D = 0x10F4, kImage1DBuffer = 0x10F6;
constexpr uint32_t kClR = 0x10B0, kClRGBA = 0x10B5, kClDepthStencil = 0x10BE, kClBGRA = 0x10B6;
constexpr uint32_t kClUnsignedInt32 = 0x10DC, kClUnormInt8 = 0x10D2, kClFloat = 0x10DE, kClUnormInt24 = 0x10DF,
                   kClSignedInt8 = 0x10D7;
constexpr uint32_t kClReadWrite = 1, kClWriteOnly = 2, kClReadOnly = 4;
constexpr uint32_t kClAddressClampToEdge = 0x1131, kClAddressRepeat = 0x1133, kClFilterNearest = 0x1140;

// GPUP_OCL_QUERY_IMAGE_FORMATS, parsed with every bound checked: key -> (order, type) list.
std::map<uint32_t, std::vector<std::pair<uint32_t, uint32_t>>> image_formats(KmdFixture& f) {
  std::map<uint32_t, std::vector<std::pair<uint32_t, uint32_t>>> out;
  const GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_IMAGE_FORMATS};
  std::vector<unsigned char> buf(64 << 10, 0xcc);
  uint32_t written = 0;
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, buf.data(), static_cast<uint32_t>(buf.size()), &h, sizeof(h),
                    &written),
            GPUP_STATUS_SUCCESS);
  GPUP_OCL_INFO_LIST list{};
  if (written < sizeof(list)) {
    ADD_FAILURE() << "no list header";
    return out;
  }
  std::memcpy(&list, buf.data(), sizeof(list));
  EXPECT_EQ(list.Magic, GPUP_OCL_INFO_LIST_MAGIC);
  EXPECT_EQ(list.TotalSize, written);
  size_t at = sizeof(list);
  int64_t previous = -1;
  for (uint32_t i = 0; i < list.Count; ++i) {
    GPUP_OCL_INFO_RECORD r;
    if (at + sizeof(r) > written) {
      ADD_FAILURE() << "record " << i << " past the end";
      return out;
    }
    std::memcpy(&r, buf.data() + at, sizeof(r));
    at += sizeof(r);
    EXPECT_GT(int64_t{r.Param}, previous) << "sorted and unique";
    previous = r.Param;
    EXPECT_EQ(r.Size % 8, 0u) << "an array of cl_image_format";
    if (at + r.Size > written) {
      ADD_FAILURE() << "record " << i << " value past the end";
      return out;
    }
    auto& formats = out[r.Param];
    for (uint32_t k = 0; k + 8 <= r.Size; k += 8) {
      uint32_t order, type;
      std::memcpy(&order, buf.data() + at + k, 4);
      std::memcpy(&type, buf.data() + at + k + 4, 4);
      formats.emplace_back(order, type);
    }
    at += (r.Size + 7) / 8 * 8;
  }
  EXPECT_EQ(at, written);
  return out;
}

bool has_format(const std::map<uint32_t, std::vector<std::pair<uint32_t, uint32_t>>>& formats, uint32_t type,
                uint32_t access, uint32_t order, uint32_t data_type) {
  auto it = formats.find(GPUP_OCL_IMAGE_FORMATS_KEY(type, access));
  if (it == formats.end()) return false;
  return std::find(it->second.begin(), it->second.end(), std::make_pair(order, data_type)) != it->second.end();
}

GPUP_OCL_SAMPLER_DESC nearest_sampler() {
  GPUP_OCL_SAMPLER_DESC s{};
  s.NormalizedCoords = 0;
  s.AddressingMode = kClAddressClampToEdge;
  s.FilterMode = kClFilterNearest;
  return s;
}

TEST_P(Conformance, ImageFormatsQueryListsR32UiFor2D) {
  const auto formats = image_formats(f);
  for (uint32_t access : {kClReadWrite, kClReadOnly, kClWriteOnly}) {
    EXPECT_TRUE(has_format(formats, kImage2D, access, kClR, kClUnsignedInt32)) << "access " << access;
  }
  std::cout << "[ info ] " << GetParam() << ": " << formats.size() << " image format lists, 2D read-write has "
            << (formats.count(GPUP_OCL_IMAGE_FORMATS_KEY(kImage2D, kClReadWrite))
                    ? formats.at(GPUP_OCL_IMAGE_FORMATS_KEY(kImage2D, kClReadWrite)).size()
                    : 0)
            << " formats\n";
  // Too small: the header alone, with TotalSize.
  const GPUP_OCL_PRIVATE_HEADER h{GPUP_OCL_QUERY_MAGIC, GPUP_OCL_QUERY_IMAGE_FORMATS};
  GPUP_OCL_INFO_LIST header{};
  uint32_t written = 0;
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, &header, sizeof(header), &h, sizeof(h), &written),
            GPUP_STATUS_BUFFER_TOO_SMALL);
  EXPECT_EQ(written, sizeof(header));
  EXPECT_GT(header.TotalSize, sizeof(header));
  EXPECT_EQ(f.query(GPUPDDI_QAITYPE_UMDRIVERPRIVATE, nullptr, 4096, &h, sizeof(h)), GPUP_STATUS_INVALID_PARAMETER);
}

TEST_P(Conformance, HostileImageDescriptorsAreInvalid) {
  const auto formats = image_formats(f);
  // 37 x 9 pixels of 4 bytes, rows 256 bytes apart: the last byte is 8 * 256 + 148 - 1.
  const GPUP_OCL_IMAGE_DESC good = image_desc(kImage2D, kClR, kClUnsignedInt32, 37, 9, 0, 0, 256, 0);
  const uint64_t need = 8 * 256 + 37 * 4;
  gpup_status s = GPUP_STATUS_INTERNAL;
  auto ok = f.image(good, need, &s);
  ASSERT_EQ(s, GPUP_STATUS_SUCCESS) << "the image may end exactly at the allocation's end";
  ASSERT_NE(ok.h, nullptr);

  std::vector<std::pair<std::string, GPUP_OCL_IMAGE_DESC>> bad;
  auto with = [&](const char* what, auto change) {
    GPUP_OCL_IMAGE_DESC d = good;
    change(d);
    bad.emplace_back(what, d);
  };
  with("bad magic", [](auto& d) { d.Magic = GPUP_OCL_PROGRAM_MAGIC; });
  with("width 0", [](auto& d) { d.Width = 0; });
  with("height 0 for 2D", [](auto& d) { d.Height = 0; });
  with("depth for 2D", [](auto& d) { d.Depth = 1; });
  with("array size for 2D", [](auto& d) { d.ArraySize = 2; });
  with("slice pitch for 2D", [](auto& d) { d.SlicePitch = 9 * 256; });
  with("1D with a height", [](auto& d) { d.ImageType = kImage1D; });
  with("1D buffer type", [](auto& d) { d.ImageType = kImage1DBuffer; });
  with("type 0", [](auto& d) { d.ImageType = 0; });
  with("unknown channel order", [](auto& d) { d.ChannelOrder = 0x1234; });
  with("unknown channel type", [](auto& d) { d.ChannelDataType = 0x10FF; });
  with("order and type that make no format", [](auto& d) { d.ChannelOrder = kClDepthStencil; d.ChannelDataType = kClUnsignedInt32; });
  with("CL_MEM_USE_HOST_PTR in flags", [](auto& d) { d.Flags = 1 | (1 << 3); });
  with("two access flags", [](auto& d) { d.Flags = kClReadWrite | kClReadOnly; });
  with("a high flag bit", [](auto& d) { d.Flags = uint64_t{1} << 40; });
  with("row pitch below width", [](auto& d) { d.RowPitch = 37 * 4 - 4; });
  with("row pitch not a multiple of the element", [](auto& d) { d.RowPitch = 258; });
  with("image past the allocation", [](auto& d) { d.Height = 10; });
  with("width * element overflows", [](auto& d) { d.Width = uint64_t{1} << 62; d.RowPitch = UINT64_MAX - 3; });
  with("rows * pitch overflows", [](auto& d) { d.RowPitch = uint64_t{1} << 62; });
  with("huge width", [](auto& d) { d.Width = uint64_t{1} << 40; d.RowPitch = uint64_t{1} << 42; });
  // A real format the device does not offer for 2D read-write images.
  for (auto [order, type] : {std::pair{kClRGBA, kClUnormInt8}, std::pair{kClBGRA, kClSignedInt8},
                             std::pair{kClDepthStencil, kClUnormInt24}, std::pair{kClDepthStencil, kClFloat}}) {
    if (!has_format(formats, kImage2D, kClReadWrite, order, type)) {
      with("unsupported format", [&](auto& d) {
        d.ChannelOrder = order;
        d.ChannelDataType = type;
        d.Width = 8;  // 8 pixels of at most 8 bytes fit the 256-byte rows
      });
      break;
    }
  }
  for (const auto& [what, d] : bad) {
    clear_log();
    auto img = f.image(d, need, &s);
    EXPECT_EQ(s, GPUP_STATUS_INVALID_PARAMETER) << what;
    EXPECT_EQ(img.h, nullptr) << what;
    if (what == "unsupported format") {
      EXPECT_TRUE(log_contains("not supported")) << "a log line says why";
    }
  }
  EXPECT_EQ(std::count_if(bad.begin(), bad.end(), [](const auto& b) { return b.first == "unsupported format"; }), 1)
      << "found a format the device lacks";
  f.image(good, need - 1, &s);
  EXPECT_EQ(s, GPUP_STATUS_INVALID_PARAMETER) << "one byte short";
  f.image(good, need, &s, {}, sizeof(good) - 1);
  EXPECT_EQ(s, GPUP_STATUS_INVALID_PARAMETER) << "short descriptor";
  f.image(good, need, &s, {}, sizeof(good) + 8);
  EXPECT_EQ(s, GPUP_STATUS_INVALID_PARAMETER) << "long descriptor";
  GPUPDDI_ALLOCATIONFLAGS read_only{};
  read_only.ReadOnly = 1;
  f.image(good, need, &s, read_only);
  EXPECT_EQ(s, GPUP_STATUS_INVALID_PARAMETER) << "a read-write image in a read-only allocation";
  GPUP_OCL_IMAGE_DESC ro = good;
  ro.Flags = kClReadOnly;
  f.image(ro, need, &s, read_only);
  EXPECT_EQ(s, GPUP_STATUS_SUCCESS) << "a read-only image in a read-only allocation";
  GPUPDDI_ALLOCATIONFLAGS program{};
  program.Program = 1;
  f.image(good, need, &s, program);
  EXPECT_EQ(s, GPUP_STATUS_INVALID_PARAMETER) << "image and program";

  // Not CpuVisible, or no backing store.
  GPUPDDI_ARG_CREATEALLOCATION a{};
  a.struct_size = sizeof(a);
  a.Flags.Image = 1;
  a.Size = need;
  a.pPrivateDriverData = &good;
  a.PrivateDriverDataSize = sizeof(good);
  EXPECT_EQ(f.create_allocation(&a), GPUP_STATUS_INVALID_PARAMETER) << "not CpuVisible";
  a.Flags.CpuVisible = 1;
  EXPECT_EQ(f.create_allocation(&a), GPUP_STATUS_INVALID_PARAMETER) << "no pSystemMemory";
  std::vector<unsigned char> backing(8192);
  a.pSystemMemory = backing.data();
  a.pPrivateDriverData = nullptr;
  EXPECT_EQ(f.create_allocation(&a), GPUP_STATUS_INVALID_PARAMETER) << "no descriptor";

  // 3D images: slice pitch rules, where the device has a 3D format.
  if (has_format(formats, kImage3D, kClReadWrite, kClR, kClUnsignedInt32)) {
    const GPUP_OCL_IMAGE_DESC vol = image_desc(kImage3D, kClR, kClUnsignedInt32, 8, 4, 3, 0, 32, 128);
    f.image(vol, 3 * 128, &s);
    EXPECT_EQ(s, GPUP_STATUS_SUCCESS);
    for (uint64_t slice : {uint64_t{0}, uint64_t{96}, uint64_t{144}}) {
      GPUP_OCL_IMAGE_DESC d = vol;
      d.SlicePitch = slice;
      f.image(d, 4 * 144, &s);
      EXPECT_EQ(s, GPUP_STATUS_INVALID_PARAMETER) << "slice pitch " << slice;
    }
    f.image(vol, 3 * 128 - 1, &s);
    EXPECT_EQ(s, GPUP_STATUS_INVALID_PARAMETER) << "the last slice one byte short";
  }
}

// Written through the mapping, read by a kernel through a sampler, written by another kernel,
// read back through the mapping: after one Lock, with no other Lock or Unlock.
TEST_P(Conformance, ImageRoundTripThroughTheMapping) {
  GPUPDDI_GPUMMUCAPS mmu{};
  ASSERT_EQ(f.query(GPUPDDI_QAITYPE_GPUMMUCAPS, &mmu, sizeof(mmu)), GPUP_STATUS_SUCCESS);
  if (!mmu.CacheCoherentMemorySupported) GTEST_SKIP() << "the device does not claim coherent memory";
  KmdFixture::Built built = f.build(kPortableImageKernelsSource, GPUP_OCL_PROGRAM_SOURCE, {}, 1 << 20);
  ASSERT_EQ(built.status, GPUP_STATUS_SUCCESS) << built.log;
  const auto* read = built.info.find("image_read_u32");
  ASSERT_NE(read, nullptr);
  ASSERT_EQ(read->args.size(), 3u);
  EXPECT_EQ(read->args[0].info.Kind, uint32_t{GPUPDDI_ARG_IMAGE});
  EXPECT_EQ(read->args[0].info.ValueSize, 8u);
  EXPECT_EQ(read->args[0].info.AccessQualifier, 0x11A0u) << "read_only";
  EXPECT_EQ(read->args[0].type_name, "image2d_t");
  EXPECT_EQ(read->args[1].info.Kind, uint32_t{GPUPDDI_ARG_SAMPLER});
  EXPECT_EQ(read->args[1].info.ValueSize, 8u);
  EXPECT_EQ(read->args[1].info.ValueSizeAlt, 0u);
  EXPECT_EQ(read->args[1].type_name, "sampler_t");
  EXPECT_EQ(read->args[2].info.Kind, uint32_t{GPUPDDI_ARG_BUFFER});

  constexpr uint32_t kW = 37, kH = 9, kPitch = 256;
  constexpr uint64_t kSize = 4096;
  gpup_status s = GPUP_STATUS_INTERNAL;
  auto img = f.image(image_desc(kImage2D, kClR, kClUnsignedInt32, kW, kH, 0, 0, kPitch, 0), kSize, &s);
  ASSERT_EQ(s, GPUP_STATUS_SUCCESS);
  auto out = f.cpu_buffer(kW * kH * 4);
  auto in = f.cpu_buffer(kW * kH * 4);
  ASSERT_EQ(f.lock(img.h), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(out.h), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(in.h), GPUP_STATUS_SUCCESS);
  auto pixel = [&](uint32_t x, uint32_t y) {
    uint32_t v;
    std::memcpy(&v, img.mem + y * kPitch + x * 4, 4);
    return v;
  };
  std::memset(img.mem, 0xab, kSize);  // row padding must survive everything below
  for (uint32_t y = 0; y < kH; ++y) {
    for (uint32_t x = 0; x < kW; ++x) {
      const uint32_t v = y * 1000 + x;
      std::memcpy(img.mem + y * kPitch + x * 4, &v, 4);
    }
  }
  auto* ctx = f.context();
  Dispatch rd(built.h, "image_read_u32",
              Args().image(ref(img.h, 0, kSize)).sampler(nearest_sampler()).buffer(ref(out.h, 0, kW * kH * 4)), kW * kH);
  ASSERT_EQ(f.run(ctx, {rd.cmd()}), GPUP_STATUS_SUCCESS);
  for (uint32_t i = 0; i < kW * kH; ++i) {
    uint32_t v;
    std::memcpy(&v, out.mem + i * 4, 4);
    ASSERT_EQ(v, (i / kW) * 1000 + i % kW) << "pixel " << i;
  }
  for (uint32_t i = 0; i < kW * kH; ++i) {
    const uint32_t v = 7 * i;
    std::memcpy(in.mem + i * 4, &v, 4);
  }
  Dispatch wr(built.h, "image_write_u32",
              Args().image(ref(img.h, 0, kSize)).buffer(ref(in.h, 0, kW * kH * 4)).value(uint32_t{5}), kW * kH);
  ASSERT_EQ(f.run(ctx, {wr.cmd()}), GPUP_STATUS_SUCCESS);
  for (uint32_t y = 0; y < kH; ++y) {
    for (uint32_t x = 0; x < kW; ++x) ASSERT_EQ(pixel(x, y), 7 * (y * kW + x) + 5) << x << "," << y;
    for (uint32_t b = kW * 4; b < kPitch && y + 1 < kH; ++b) ASSERT_EQ(img.mem[y * kPitch + b], 0xab) << "row padding";
  }
  // The same bytes are a buffer: a FILL of row 2 is what the next read sees.
  const uint32_t pattern = 0x600dcafe;
  std::vector<GPUPDDI_COMMAND> cmds = {fill_cmd(ref(img.h, 2 * kPitch, kPitch), &pattern, 4), rd.cmd()};
  ASSERT_EQ(f.run(ctx, cmds), GPUP_STATUS_SUCCESS);
  for (uint32_t i = 0; i < kW * kH; ++i) {
    uint32_t v;
    std::memcpy(&v, out.mem + i * 4, 4);
    ASSERT_EQ(v, i / kW == 2 ? pattern : 7 * i + 5) << "pixel " << i;
  }
}

TEST_P(Conformance, ImageAndSamplerArgumentsAreChecked) {
  KmdFixture::Built built = f.build(kPortableImageKernelsSource);
  ASSERT_EQ(built.status, GPUP_STATUS_SUCCESS) << built.log;
  constexpr uint32_t kW = 16, kH = 4;
  constexpr uint64_t kSize = kW * kH * 4;
  gpup_status s = GPUP_STATUS_INTERNAL;
  auto img = f.image(image_desc(kImage2D, kClR, kClUnsignedInt32, kW, kH, 0, 0, kW * 4, 0), kSize, &s);
  ASSERT_EQ(s, GPUP_STATUS_SUCCESS);
  GPUP_OCL_IMAGE_DESC wo_desc = image_desc(kImage2D, kClR, kClUnsignedInt32, kW, kH, 0, 0, kW * 4, 0);
  wo_desc.Flags = kClWriteOnly;
  auto write_only = f.image(wo_desc, kSize, &s);
  ASSERT_EQ(s, GPUP_STATUS_SUCCESS);
  auto plain = f.cpu_buffer(kSize);
  auto out = f.cpu_buffer(kSize);
  for (uint32_t i = 0; i < kW * kH; ++i) std::memcpy(img.mem + i * 4, &i, 4);
  ASSERT_EQ(f.unlock(img.h), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.unlock(out.h), GPUP_STATUS_SUCCESS);
  auto* ctx = f.context();
  const GPUP_OCL_SAMPLER_DESC smp = nearest_sampler();
  auto read_with = [&](Args a) { return Dispatch(built.h, "image_read_u32", std::move(a), kW * kH); };
  const Dispatch good = read_with(Args().image(ref(img.h, 0, kSize)).sampler(smp).buffer(ref(out.h, 0, kSize)));

  std::vector<std::pair<std::string, Dispatch>> bad;
  bad.emplace_back("part of the allocation", read_with(Args().image(ref(img.h, 0, kSize - 64)).sampler(smp).buffer(ref(out.h, 0, kSize))));
  bad.emplace_back("an offset into the allocation",
                   read_with(Args().image(ref(img.h, 64, kSize - 64)).sampler(smp).buffer(ref(out.h, 0, kSize))));
  bad.emplace_back("a non-image allocation", read_with(Args().image(ref(plain.h, 0, kSize)).sampler(smp).buffer(ref(out.h, 0, kSize))));
  bad.emplace_back("a buffer for an image", read_with(Args().buffer(ref(img.h, 0, kSize)).sampler(smp).buffer(ref(out.h, 0, kSize))));
  bad.emplace_back("a value for an image", read_with(Args().value(uint64_t{0x4141414141414141}).sampler(smp).buffer(ref(out.h, 0, kSize))));
  bad.emplace_back("an image for a buffer", read_with(Args().image(ref(img.h, 0, kSize)).sampler(smp).image(ref(img.h, 0, kSize))));
  bad.emplace_back("a write-only image for read_only",
                   read_with(Args().image(ref(write_only.h, 0, kSize)).sampler(smp).buffer(ref(out.h, 0, kSize))));
  bad.emplace_back("a value for a sampler", read_with(Args().image(ref(img.h, 0, kSize)).value(smp).buffer(ref(out.h, 0, kSize))));
  auto with_sampler = [&](const char* what, auto change, uint32_t size = sizeof(GPUP_OCL_SAMPLER_DESC)) {
    GPUP_OCL_SAMPLER_DESC d = smp;
    change(d);
    unsigned char bytes[32] = {};
    std::memcpy(bytes, &d, sizeof(d));
    bad.emplace_back(what, read_with(Args().image(ref(img.h, 0, kSize)).sampler_bytes(bytes, size).buffer(ref(out.h, 0, kSize))));
  };
  with_sampler("sampler too short", [](auto&) {}, sizeof(GPUP_OCL_SAMPLER_DESC) - 4);
  with_sampler("sampler too long", [](auto&) {}, sizeof(GPUP_OCL_SAMPLER_DESC) + 4);
  with_sampler("NormalizedCoords 2", [](auto& d) { d.NormalizedCoords = 2; });
  with_sampler("unknown addressing", [](auto& d) { d.AddressingMode = 0x1135; });
  with_sampler("addressing 0", [](auto& d) { d.AddressingMode = 0; });
  with_sampler("unknown filter", [](auto& d) { d.FilterMode = 0x1142; });
  with_sampler("Reserved set", [](auto& d) { d.Reserved = 1; });
  with_sampler("repeat without normalized coordinates", [](auto& d) { d.AddressingMode = kClAddressRepeat; });
  for (const auto& [what, d] : bad) {
    EXPECT_EQ(f.submit(ctx, {good.cmd(), d.cmd()}, 100), GPUP_STATUS_INVALID_PARAMETER) << what;
  }
  GPUPDDI_COMMAND null_sampler = good.cmd();
  std::vector<GPUPDDI_KERNEL_ARG> args = good.args.list();
  args[1].pValue = nullptr;
  null_sampler.u.Dispatch.pArgs = args.data();
  EXPECT_EQ(f.submit(ctx, {null_sampler}, 101), GPUP_STATUS_INVALID_PARAMETER) << "no sampler bytes";
  EXPECT_EQ(f.run(ctx, {}), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(ctx->sink->count(), 1u) << "refused submissions complete nothing";
  ASSERT_EQ(f.lock(out.h), GPUP_STATUS_SUCCESS);
  for (uint32_t i = 0; i < kW * kH; ++i) ASSERT_EQ(out.mem[i * 4], 0) << "nothing ran, element " << i;
  // And the good one runs.
  ASSERT_EQ(f.run(ctx, {good.cmd()}), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(f.lock(out.h), GPUP_STATUS_SUCCESS);
  for (uint32_t i = 0; i < kW * kH; ++i) {
    uint32_t v;
    std::memcpy(&v, out.mem + i * 4, 4);
    ASSERT_EQ(v, i);
  }
}

// ---------------------------------------------------------------------------------------------
// Escapes

std::vector<unsigned char> escape_data(uint32_t code, const std::vector<unsigned char>& payload = {},
                                       uint32_t magic = GPUP_OCL_ESCAPE_MAGIC) {
  GPUP_OCL_PRIVATE_HEADER h{magic, code};
  std::vector<unsigned char> d(sizeof(h) + payload.size());
  std::memcpy(d.data(), &h, sizeof(h));
  if (!payload.empty()) std::memcpy(d.data() + sizeof(h), payload.data(), payload.size());
  return d;
}

uint64_t fnv(const std::vector<unsigned char>& bytes) {
  uint64_t h = GPUP_OCL_FNV1A64_OFFSET;
  for (unsigned char b : bytes) h = (h ^ b) * GPUP_OCL_FNV1A64_PRIME;
  return h;
}

TEST_P(Conformance, EscapeChecksumOf128KiB) {
  ASSERT_NE(f.ddi().Adapter.pfnEscape, nullptr);
  std::vector<unsigned char> payload((128 << 10) - sizeof(GPUP_OCL_PRIVATE_HEADER));
  std::mt19937 rng(1);
  for (auto& b : payload) b = static_cast<unsigned char>(rng());
  const auto data = escape_data(GPUP_OCL_ESCAPE_CHECKSUM, payload);
  ASSERT_EQ(data.size(), 128u << 10);
  GPUP_OCL_ESCAPE_CHECKSUM_OUT out{};
  uint32_t written = 0;
  ASSERT_EQ(f.escape(data.data(), static_cast<uint32_t>(data.size()), &out, sizeof(out), false, &written),
            GPUP_STATUS_SUCCESS);
  EXPECT_EQ(written, sizeof(out));
  EXPECT_EQ(out.ByteCount, payload.size());
  EXPECT_EQ(out.Fnv1a64, fnv(payload));

  const auto empty = escape_data(GPUP_OCL_ESCAPE_CHECKSUM);
  ASSERT_EQ(f.escape(empty.data(), static_cast<uint32_t>(empty.size()), &out, sizeof(out)), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(out.ByteCount, 0u);
  EXPECT_EQ(out.Fnv1a64, GPUP_OCL_FNV1A64_OFFSET);
  EXPECT_EQ(f.escape(empty.data(), static_cast<uint32_t>(empty.size()), &out, sizeof(out) - 1),
            GPUP_STATUS_BUFFER_TOO_SMALL);
  EXPECT_EQ(f.escape(empty.data(), static_cast<uint32_t>(empty.size()), nullptr, sizeof(out)),
            GPUP_STATUS_INVALID_PARAMETER);
}

TEST_P(Conformance, EscapeDeviceInfo) {
  ASSERT_NE(f.ddi().Adapter.pfnEscape, nullptr);
  const auto data = escape_data(GPUP_OCL_ESCAPE_DEVICE_INFO);
  for (bool known : {false, true}) {
    GPUP_OCL_ESCAPE_DEVICE_INFO_OUT out{};
    uint32_t written = 0;
    ASSERT_EQ(f.escape(data.data(), static_cast<uint32_t>(data.size()), &out, sizeof(out), known, &written),
              GPUP_STATUS_SUCCESS);
    EXPECT_EQ(written, sizeof(out));
    EXPECT_EQ(std::memcmp(&out.Info, &f.info, sizeof(f.info)), 0) << "the same answer as the DEVICEINFO query";
  }
  GPUP_OCL_ESCAPE_DEVICE_INFO_OUT out{};
  EXPECT_EQ(f.escape(data.data(), static_cast<uint32_t>(data.size()), &out, sizeof(out) - 1),
            GPUP_STATUS_BUFFER_TOO_SMALL);
  const auto with_payload = escape_data(GPUP_OCL_ESCAPE_DEVICE_INFO, {1, 2, 3});
  EXPECT_EQ(f.escape(with_payload.data(), static_cast<uint32_t>(with_payload.size()), &out, sizeof(out)),
            GPUP_STATUS_INVALID_PARAMETER);
}

TEST_P(Conformance, EscapeRejections) {
  ASSERT_NE(f.ddi().Adapter.pfnEscape, nullptr);
  std::vector<unsigned char> out(4096);
  auto esc = [&](const std::vector<unsigned char>& d, bool known = false) {
    return f.escape(d.data(), static_cast<uint32_t>(d.size()), out.data(), static_cast<uint32_t>(out.size()), known);
  };
  EXPECT_EQ(esc(escape_data(0x1234)), GPUP_STATUS_NOT_SUPPORTED) << "unknown code";
  EXPECT_EQ(esc(escape_data(0x80001234)), GPUP_STATUS_NOT_SUPPORTED) << "unknown private code";
  EXPECT_EQ(esc(escape_data(GPUP_OCL_ESCAPE_CHECKSUM, {}, 0xdeadbeef)), GPUP_STATUS_INVALID_PARAMETER) << "magic";
  std::vector<unsigned char> truncated = escape_data(GPUP_OCL_ESCAPE_CHECKSUM);
  truncated.resize(sizeof(GPUP_OCL_PRIVATE_HEADER) - 1);
  EXPECT_EQ(esc(truncated), GPUP_STATUS_INVALID_PARAMETER) << "truncated header";
  EXPECT_EQ(f.escape(nullptr, 0, out.data(), 4096), GPUP_STATUS_INVALID_PARAMETER) << "no data";
  EXPECT_EQ(esc(escape_data(GPUP_OCL_ESCAPE_CHECKSUM, {1, 2, 3}), true), GPUP_STATUS_ACCESS_DENIED)
      << "a driver-private escape marked driver-known";
  EXPECT_EQ(esc(escape_data(0x1234), true), GPUP_STATUS_ACCESS_DENIED) << "an unknown escape marked driver-known";
}

std::string backend_name(const ::testing::TestParamInfo<std::string>& info) { return info.param; }

INSTANTIATE_TEST_SUITE_P(Kmd, Conformance, ::testing::Values("mock", "opencl"), backend_name);

}  // namespace
}  // namespace gpup::kmd::test
