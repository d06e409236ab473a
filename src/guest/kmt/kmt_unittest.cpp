// libgpupkmt against a fake host (fake_host.h): the crossing budget of gpup/kmt.h, the wire
// behaviour the worker relies on, and failure propagation. The library is process-global; every
// test connects to its own FakeHost and GpupKmtDisconnect() in TearDown resets it.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "gpup/ddi.h"
#include "gpup/kmt.h"
#include "guest/kmt/fake_host.h"
#include "protocol/codec.h"

namespace {

using gpup::kmt::test::FakeHost;
using gpup::proto::Op;
using namespace std::chrono_literals;

#define ASSERT_OK(expr) ASSERT_EQ((expr), GPUP_STATUS_SUCCESS) << GpupKmtGetLastErrorMessage()
#define EXPECT_OK(expr) EXPECT_EQ((expr), GPUP_STATUS_SUCCESS) << GpupKmtGetLastErrorMessage()

// Reads a fence value the library (or the host) updates concurrently.
uint64_t fence(const volatile uint64_t* p) {
  return __atomic_load_n(const_cast<const uint64_t*>(p), __ATOMIC_ACQUIRE);
}

class Kmt : public ::testing::TestWithParam<bool> {
 protected:
  void TearDown() override {
    GpupKmtDisconnect();
    host_.reset();
    unsetenv("GPUP_TRANSPORT");
  }

  void start(bool shm, FakeHost::Options options = FakeHost::Options()) {
    host_ = std::make_unique<FakeHost>(std::move(options));
    setenv("GPUP_TRANSPORT", shm ? "shm" : "stream", 1);
    ASSERT_OK(GpupKmtConnect(host_->endpoint().c_str()));
  }

  static GPUPKMT_CHANNELSTATS stats() {
    GPUPKMT_CHANNELSTATS s{};
    EXPECT_OK(GpupKmtGetChannelStats(&s));
    return s;
  }

  static GPUPKMT_HANDLE open_adapter() {
    GPUPKMT_OPENADAPTERFROMLUID o{FakeHost::kLuid, 0};
    EXPECT_OK(GpupKmtOpenAdapterFromLuid(&o));
    return o.hAdapter;
  }

  GPUPKMT_HANDLE device() {
    if (!device_) {
      adapter_ = open_adapter();
      GPUPKMT_CREATEDEVICE d{adapter_, 0, 0};
      EXPECT_OK(GpupKmtCreateDevice(&d));
      device_ = d.hDevice;
    }
    return device_;
  }

  GPUPKMT_HANDLE context() {
    GPUPKMT_CREATECONTEXT c{};
    c.hDevice = device();
    EXPECT_OK(GpupKmtCreateContext(&c));
    return c.hContext;
  }

  GPUPKMT_HANDLE allocation(uint64_t size) {
    GPUPKMT_CREATEALLOCATION a{};
    a.hDevice = device();
    a.Flags = GPUPKMT_ALLOCATION_CPU_VISIBLE;
    a.Size = size;
    EXPECT_OK(GpupKmtCreateAllocation(&a));
    return a.hAllocation;
  }

  GPUPKMT_HANDLE sync_object(uint64_t initial, const volatile uint64_t** value = nullptr) {
    GPUPKMT_CREATESYNCHRONIZATIONOBJECT s{};
    s.hDevice = device();
    s.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
    s.InitialValue = initial;
    EXPECT_OK(GpupKmtCreateSynchronizationObject(&s));
    if (value) *value = s.pFenceValue;
    return s.hSyncObject;
  }

  static gpup_status wait_cpu(GPUPKMT_HANDLE sync, uint64_t value, int32_t timeout_ms) {
    GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT w{};
    w.hSyncObject = sync;
    w.Value = value;
    w.TimeoutMs = timeout_ms;
    return GpupKmtWaitForSynchronizationObjectFromCpu(&w);
  }

  std::unique_ptr<FakeHost> host_;
  GPUPKMT_HANDLE adapter_ = 0;
  GPUPKMT_HANDLE device_ = 0;
};

class KmtBoth : public Kmt {};
INSTANTIATE_TEST_SUITE_P(Transport, KmtBoth, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "shm" : "stream"; });

// --- connecting ---------------------------------------------------------------------------------

TEST_P(KmtBoth, HelloThenAdaptersAreAnsweredLocally) {
  start(GetParam());
  GPUPKMT_CHANNELSTATS s0 = stats();
  EXPECT_EQ(s0.MessagesSent, 1u);  // Hello
  EXPECT_EQ(s0.RoundTrips, 1u);
  EXPECT_EQ(s0.SharedMemory, GetParam() ? 1u : 0u);
  EXPECT_EQ(s0.ProtocolVersion, gpup::proto::kVersion);

  GPUPKMT_ENUMADAPTERS e{0, nullptr};
  ASSERT_OK(GpupKmtEnumAdapters(&e));
  ASSERT_EQ(e.NumAdapters, 1u);
  GPUPKMT_ADAPTERINFO info[2]{};
  e = {0, info};
  EXPECT_EQ(GpupKmtEnumAdapters(&e), GPUP_STATUS_BUFFER_TOO_SMALL);
  EXPECT_EQ(e.NumAdapters, 1u);
  e = {2, info};
  ASSERT_OK(GpupKmtEnumAdapters(&e));
  EXPECT_EQ(info[0].AdapterLuid, FakeHost::kLuid);
  EXPECT_STREQ(info[0].Description, "gpup fake adapter");
  EXPECT_EQ(info[0].Budget, 1ull << 30);
  EXPECT_TRUE(info[0].Flags & GPUPKMT_ADAPTERFLAG_PARAVIRTUALIZED);
  EXPECT_TRUE(info[0].Flags & GPUPKMT_ADAPTERFLAG_COMPUTE_ONLY);

  GPUPKMT_OPENADAPTERFROMLUID o{FakeHost::kLuid, 0};
  ASSERT_OK(GpupKmtOpenAdapterFromLuid(&o));
  EXPECT_EQ(o.hAdapter, info[0].hAdapter);
  GPUPKMT_OPENADAPTERFROMLUID bad{0xdead, 0};
  EXPECT_EQ(GpupKmtOpenAdapterFromLuid(&bad), GPUP_STATUS_NOT_FOUND);

  GPUPKMT_ADAPTERTYPE type{};
  GPUPKMT_QUERYADAPTERINFO q{};
  q.hAdapter = o.hAdapter;
  q.Type = GPUPKMT_QAITYPE_ADAPTERTYPE;
  q.pOutputData = &type;
  q.OutputDataSize = sizeof type;
  ASSERT_OK(GpupKmtQueryAdapterInfo(&q));
  EXPECT_EQ(q.OutputDataWritten, sizeof type);
  EXPECT_EQ(type.Paravirtualized, 1u);
  EXPECT_EQ(type.ComputeOnly, 1u);
  EXPECT_EQ(type.DisplaySupported, 0u);
  EXPECT_EQ(type.SecureVirtualMachine, 0u);

  // Opened twice (EnumAdapters, OpenAdapterFromLuid): two closes, the third fails.
  GPUPKMT_CLOSEADAPTER c{o.hAdapter};
  EXPECT_OK(GpupKmtCloseAdapter(&c));
  EXPECT_OK(GpupKmtCloseAdapter(&c));
  EXPECT_EQ(GpupKmtCloseAdapter(&c), GPUP_STATUS_INVALID_HANDLE);
  EXPECT_EQ(GpupKmtQueryAdapterInfo(&q), GPUP_STATUS_INVALID_HANDLE);

  GPUPKMT_CHANNELSTATS s1 = stats();
  EXPECT_EQ(s1.MessagesSent, s0.MessagesSent) << "adapter thunks must not cross";
  EXPECT_EQ(host_->received(Op::Hello), 1u);
}

TEST_F(Kmt, MissingEndpointNamesTheVariable) {
  unsetenv("GPUP_VRD");
  EXPECT_EQ(GpupKmtConnect(nullptr), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("GPUP_VRD"), std::string::npos)
      << GpupKmtGetLastErrorMessage();
  GPUPKMT_ENUMADAPTERS e{0, nullptr};  // a lazy connect fails the same way
  EXPECT_EQ(GpupKmtEnumAdapters(&e), GPUP_STATUS_CONNECTION_LOST);
}

TEST_F(Kmt, LazyConnectUsesGpupVrd) {
  host_ = std::make_unique<FakeHost>();
  setenv("GPUP_VRD", host_->endpoint().c_str(), 1);
  GPUPKMT_ENUMADAPTERS e{0, nullptr};
  EXPECT_OK(GpupKmtEnumAdapters(&e));
  EXPECT_EQ(e.NumAdapters, 1u);
  unsetenv("GPUP_VRD");
}

TEST_F(Kmt, NoVrdListeningIsConnectionLost) {
  EXPECT_EQ(GpupKmtConnect("unix:/tmp/gpupkmt-test-nobody-listens.sock"), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("gpupkmt-test-nobody-listens"), std::string::npos);
}

TEST_F(Kmt, VersionMismatchFailsConnectWithTheHostsText) {
  FakeHost::Options o;
  o.hello_error = GPUP_STATUS_VERSION_MISMATCH;
  o.hello_error_text = "host speaks protocol versions 7..9 only";
  host_ = std::make_unique<FakeHost>(o);
  EXPECT_EQ(GpupKmtConnect(host_->endpoint().c_str()), GPUP_STATUS_VERSION_MISMATCH);
  EXPECT_STREQ(GpupKmtGetLastErrorMessage(), "host speaks protocol versions 7..9 only");
}

TEST_F(Kmt, BadTransportVariableIsRefused) {
  host_ = std::make_unique<FakeHost>();
  setenv("GPUP_TRANSPORT", "carrier-pigeon", 1);
  EXPECT_EQ(GpupKmtConnect(host_->endpoint().c_str()), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("GPUP_TRANSPORT"), std::string::npos);
}

// --- Lock ----------------------------------------------------------------------------------------

TEST_F(Kmt, SecondLockSendsNothingAndSharesTheSection) {
  start(true);
  const GPUPKMT_HANDLE a = allocation(8192);
  host_->fill_allocation(a, 3);
  GPUPKMT_LOCK l1{device(), a, nullptr, 0};
  ASSERT_OK(GpupKmtLock(&l1));
  ASSERT_NE(l1.pData, nullptr);
  EXPECT_EQ(l1.Size, 8192u);
  EXPECT_EQ(static_cast<uint8_t*>(l1.pData)[1], 3 + 7);

  const auto before = stats();
  GPUPKMT_LOCK l2{device(), a, nullptr, 0};
  ASSERT_OK(GpupKmtLock(&l2));
  EXPECT_EQ(l2.pData, l1.pData);
  GPUPKMT_UNLOCK u{device(), a};
  ASSERT_OK(GpupKmtUnlock(&u));  // nested
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
  EXPECT_EQ(host_->received(Op::Lock), 1u);

  std::memcpy(l1.pData, "coherent", 8);  // written through the shared section
  EXPECT_EQ(std::memcmp(host_->allocation_bytes(a).data(), "coherent", 8), 0);
  ASSERT_OK(GpupKmtUnlock(&u));
  EXPECT_EQ(host_->received(Op::Unlock), 1u);
  EXPECT_EQ(GpupKmtUnlock(&u), GPUP_STATUS_INVALID_PARAMETER);  // not locked
}

TEST_F(Kmt, StreamLockCopiesInChunksAndWritesBack) {
  start(false);
  const uint64_t size = 300000;  // three ReadAllocation chunks
  const GPUPKMT_HANDLE a = allocation(size);
  host_->fill_allocation(a, 9);
  const auto expect = host_->allocation_bytes(a);
  GPUPKMT_LOCK l{device(), a, nullptr, 0};
  ASSERT_OK(GpupKmtLock(&l));
  ASSERT_EQ(l.Size, size);
  EXPECT_EQ(std::memcmp(l.pData, expect.data(), size), 0);
  EXPECT_EQ(host_->received(Op::ReadAllocation), 3u);

  GPUPKMT_LOCK nested{device(), a, nullptr, 0};
  ASSERT_OK(GpupKmtLock(&nested));
  EXPECT_EQ(nested.pData, l.pData);
  EXPECT_EQ(host_->received(Op::Lock), 1u);

  static_cast<uint8_t*>(l.pData)[size - 1] = 0xAB;
  GPUPKMT_UNLOCK u{device(), a};
  ASSERT_OK(GpupKmtUnlock(&u));
  EXPECT_EQ(host_->received(Op::WriteAllocation), 0u) << "nested unlock writes nothing back";
  ASSERT_OK(GpupKmtUnlock(&u));
  EXPECT_EQ(host_->received(Op::WriteAllocation), 3u);
  EXPECT_EQ(host_->received(Op::Unlock), 1u);
  EXPECT_EQ(host_->allocation_bytes(a)[size - 1], 0xAB);
}

TEST_F(Kmt, DestroyingALockedAllocationUnmapsIt) {
  start(true);
  const GPUPKMT_HANDLE a = allocation(4096);
  GPUPKMT_LOCK l{device(), a, nullptr, 0};
  ASSERT_OK(GpupKmtLock(&l));
  GPUPKMT_DESTROYALLOCATION d{device(), a};
  ASSERT_OK(GpupKmtDestroyAllocation(&d));
  GPUPKMT_UNLOCK u{device(), a};
  EXPECT_EQ(GpupKmtUnlock(&u), GPUP_STATUS_INVALID_HANDLE);
  EXPECT_EQ(host_->received(Op::Unlock), 0u);
}

TEST_F(Kmt, DestroyDeviceForgetsItsChildren) {
  start(true);
  const GPUPKMT_HANDLE a = allocation(4096);
  const GPUPKMT_HANDLE s = sync_object(0);
  const GPUPKMT_HANDLE c = context();
  GPUPKMT_DESTROYDEVICE dd{device()};
  ASSERT_OK(GpupKmtDestroyDevice(&dd));
  const auto before = stats();
  GPUPKMT_LOCK l{device(), a, nullptr, 0};
  EXPECT_EQ(GpupKmtLock(&l), GPUP_STATUS_INVALID_HANDLE);
  EXPECT_EQ(wait_cpu(s, 1, 0), GPUP_STATUS_INVALID_HANDLE);
  GPUPKMT_DESTROYCONTEXT dc{c};
  EXPECT_EQ(GpupKmtDestroyContext(&dc), GPUP_STATUS_INVALID_HANDLE);
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
}

// --- CPU waits -----------------------------------------------------------------------------------

TEST_F(Kmt, WaitOnAReachedValueSendsNothing) {
  start(true);
  const volatile uint64_t* value = nullptr;
  const GPUPKMT_HANDLE s = sync_object(5, &value);
  ASSERT_NE(value, nullptr);
  EXPECT_EQ(fence(value), 5u);
  const auto before = stats();
  EXPECT_OK(wait_cpu(s, 5, -1));
  EXPECT_OK(wait_cpu(s, 1, 0));
  host_->set_fence(s, 10);  // a GPU-side write, visible through the page
  EXPECT_EQ(fence(value), 10u);
  EXPECT_OK(wait_cpu(s, 9, -1));
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
  EXPECT_EQ(host_->received(Op::WaitFromCpu), 0u);
  // Shared page: a zero-timeout poll of an unreached value does not cross either.
  EXPECT_EQ(wait_cpu(s, 11, 0), GPUP_STATUS_TIMEOUT);
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
}

TEST_P(KmtBoth, PendingWaitCompletesOnSignalGuestEvent) {
  start(GetParam());
  const volatile uint64_t* value = nullptr;
  const GPUPKMT_HANDLE s = sync_object(0, &value);
  auto waiter = std::async(std::launch::async, [&] { return wait_cpu(s, 3, -1); });
  ASSERT_TRUE(host_->wait_received(Op::WaitFromCpu, 1));
  EXPECT_EQ(waiter.wait_for(50ms), std::future_status::timeout);
  host_->signal(s, 3);
  ASSERT_EQ(waiter.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(waiter.get(), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(fence(value), 3u);
  const auto before = stats();
  EXPECT_OK(wait_cpu(s, 3, -1));  // now local on both transports
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
}

// A wait first sleeps on its fence slot (a futex on the shared page, or on the local copy the
// receiver raises) and the new value wakes it: no WaitFromCpu crosses. The sleep is made 60 s
// here, so a wait that returns at all without a message was woken, not timed out.
TEST_P(KmtBoth, AWaitSleepsOnTheFenceSlotAndTheNewValueWakesIt) {
  setenv("GPUP_FENCE_SLEEP_MS", "60000", 1);
  start(GetParam());
  unsetenv("GPUP_FENCE_SLEEP_MS");
  const volatile uint64_t* value = nullptr;
  const GPUPKMT_HANDLE s = sync_object(0, &value);
  auto waiter = std::async(std::launch::async, [&] { return wait_cpu(s, 3, -1); });
  std::this_thread::sleep_for(20ms);  // the waiter is asleep by now (or sees 3 at once)
  host_->set_fence(s, 2);
  EXPECT_EQ(waiter.wait_for(20ms), std::future_status::timeout) << "woken, but 2 is not 3";
  host_->set_fence(s, 3);
  ASSERT_EQ(waiter.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(waiter.get(), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(fence(value), 3u);
  EXPECT_EQ(host_->received(Op::WaitFromCpu), 0u);
}

TEST_P(KmtBoth, WithoutTheSleepAWaitAsksTheHost) {
  setenv("GPUP_FENCE_SLEEP_MS", "0", 1);
  start(GetParam());
  unsetenv("GPUP_FENCE_SLEEP_MS");
  const GPUPKMT_HANDLE s = sync_object(0);
  auto waiter = std::async(std::launch::async, [&] { return wait_cpu(s, 3, -1); });
  ASSERT_TRUE(host_->wait_received(Op::WaitFromCpu, 1));
  host_->signal(s, 3);
  ASSERT_EQ(waiter.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(waiter.get(), GPUP_STATUS_SUCCESS);
}

TEST_P(KmtBoth, WaitTimesOut) {
  start(GetParam());
  const GPUPKMT_HANDLE s = sync_object(0);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(wait_cpu(s, 100, 50), GPUP_STATUS_TIMEOUT);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 50ms);
}

TEST_F(Kmt, StreamFenceValueNotificationsUpdateTheLocalCopy) {
  start(false);
  const volatile uint64_t* value = nullptr;
  const GPUPKMT_HANDLE s = sync_object(7, &value);
  EXPECT_EQ(fence(value), 7u);  // seeded from the request, no notification needed
  host_->set_fence(s, 42);
  for (int i = 0; i < 500 && fence(value) != 42; ++i) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(fence(value), 42u);
  const auto before = stats();
  EXPECT_OK(wait_cpu(s, 42, -1));
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
  EXPECT_GE(stats().NotificationsReceived, 1u);
}

TEST_P(KmtBoth, SignalFromCpuIsVisibleAtOnce) {
  start(GetParam());
  const volatile uint64_t* value = nullptr;
  const GPUPKMT_HANDLE s = sync_object(0, &value);
  GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT sig{s, 12, 0};
  ASSERT_OK(GpupKmtSignalSynchronizationObjectFromCpu(&sig));
  EXPECT_EQ(fence(value), 12u);
}

// --- faults and device state -------------------------------------------------------------------

TEST_P(KmtBoth, ContextErrorFailsWaitsSubmissionsAndDeviceState) {
  start(GetParam());
  const GPUPKMT_HANDLE ctx = context();
  const GPUPKMT_HANDLE s = sync_object(0);
  auto waiter = std::async(std::launch::async, [&] { return wait_cpu(s, 1, -1); });
  ASSERT_TRUE(host_->wait_received(Op::WaitFromCpu, 1));
  host_->context_error(ctx, GPUP_STATUS_GPU_PAGE_FAULT, 7, "VA 0xdead0000 is outside the caller's mappings");
  ASSERT_EQ(waiter.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(waiter.get(), GPUP_STATUS_GPU_PAGE_FAULT);

  const auto before = stats();
  EXPECT_EQ(wait_cpu(s, 1, -1), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("0xdead0000"), std::string::npos)
      << GpupKmtGetLastErrorMessage();
  GPUPKMT_GETDEVICESTATE st{device(), 0, 0};
  ASSERT_OK(GpupKmtGetDeviceState(&st));
  EXPECT_EQ(st.State, GPUPKMT_DEVICESTATE_RESET);
  EXPECT_EQ(st.Reason, GPUP_STATUS_GPU_PAGE_FAULT);

  GPUPKMT_CMDBUF* cb = nullptr;
  ASSERT_OK(GpupKmtCmdBufCreate(&cb));
  GpupKmtCmdCopy(cb, 0x1000, 0x2000, 64);
  GPUPKMT_SUBMITCOMMAND sub{ctx, 0, cb, 0};
  EXPECT_EQ(GpupKmtSubmitCommand(&sub), GPUP_STATUS_GPU_PAGE_FAULT);
  GpupKmtCmdBufDestroy(cb);
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent) << "a faulted device/context must not cross";
}

TEST_P(KmtBoth, NotificationsRightBehindACreateReplyAreNotLost) {
  start(GetParam());
  host_->set_hook([](FakeHost& h, const gpup::proto::Message& m) {
    if (m.op() == Op::CreateContext) {  // reply, then fault the new context at once
      h.reply<Op::CreateContext>(m, {0x2999, 0});
      h.context_error(0x2999, GPUP_STATUS_CONTEXT_RESET_GUILTY, 0, "reset right away");
      return true;
    }
    if (m.op() == Op::CreateSyncObject) {  // reply, then move the fence at once
      h.reply<Op::CreateSyncObject>(m, {0x4999, 5});
      const gpup::proto::FenceValueRequest fv{0x4999, 5, 77};  // outlives enc, which refers to it
      auto enc = gpup::proto::encode_request(fv, 0);
      if (enc) h.send_raw(enc->flatten());
      return true;
    }
    return false;
  });
  const GPUPKMT_HANDLE ctx = context();
  EXPECT_EQ(ctx, 0x2999u);
  // The notification is applied asynchronously, but it must not be dropped as naming an unknown
  // context (the reply registered the context on the receiver thread first).
  GPUPKMT_GETDEVICESTATE st{device(), 0, 0};
  for (int i = 0; i < 500; ++i) {
    ASSERT_OK(GpupKmtGetDeviceState(&st));
    if (st.State == GPUPKMT_DEVICESTATE_RESET) break;
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(st.State, GPUPKMT_DEVICESTATE_RESET);
  EXPECT_EQ(st.Reason, GPUP_STATUS_CONTEXT_RESET_GUILTY);
  GPUPKMT_CMDBUF* cb = nullptr;
  ASSERT_OK(GpupKmtCmdBufCreate(&cb));
  GPUPKMT_SUBMITCOMMAND sub{ctx, 0, cb, 0};
  EXPECT_EQ(GpupKmtSubmitCommand(&sub), GPUP_STATUS_CONTEXT_RESET_GUILTY);
  GpupKmtCmdBufDestroy(cb);
  if (!GetParam()) {  // stream: the seed of the local copy must not overwrite the later value
    const volatile uint64_t* value = nullptr;
    sync_object(1, &value);
    for (int i = 0; i < 500 && fence(value) != 77; ++i) std::this_thread::sleep_for(1ms);
    EXPECT_EQ(fence(value), 77u);
  }
}

TEST_F(Kmt, DeviceStateIsCachedUntilTheCounterChanges) {
  start(true);
  GPUPKMT_GETDEVICESTATE st{device(), 99, 99};
  const auto s0 = stats();
  ASSERT_OK(GpupKmtGetDeviceState(&st));
  ASSERT_OK(GpupKmtGetDeviceState(&st));
  EXPECT_EQ(st.State, GPUPKMT_DEVICESTATE_NORMAL);
  EXPECT_EQ(stats().MessagesSent, s0.MessagesSent);

  host_->set_device_state_silently(GPUPKMT_DEVICESTATE_RESET, GPUP_STATUS_CONTEXT_RESET_INNOCENT);
  ASSERT_OK(GpupKmtGetDeviceState(&st));
  EXPECT_EQ(st.State, GPUPKMT_DEVICESTATE_RESET);
  EXPECT_EQ(st.Reason, GPUP_STATUS_CONTEXT_RESET_INNOCENT);
  EXPECT_EQ(host_->received(Op::GetDeviceState), 1u);
  ASSERT_OK(GpupKmtGetDeviceState(&st));
  EXPECT_EQ(host_->received(Op::GetDeviceState), 1u);
}

TEST_P(KmtBoth, DeviceStateChangedNotificationUpdatesTheCacheAndFailsWaits) {
  start(GetParam());
  const GPUPKMT_HANDLE s = sync_object(0);
  auto waiter = std::async(std::launch::async, [&] { return wait_cpu(s, 1, -1); });
  ASSERT_TRUE(host_->wait_received(Op::WaitFromCpu, 1));
  host_->device_state_changed(device(), GPUPKMT_DEVICESTATE_REMOVED, GPUP_STATUS_DEVICE_REMOVED);
  ASSERT_EQ(waiter.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(waiter.get(), GPUP_STATUS_DEVICE_REMOVED);
  GPUPKMT_GETDEVICESTATE st{device(), 0, 0};
  ASSERT_OK(GpupKmtGetDeviceState(&st));
  EXPECT_EQ(st.State, GPUPKMT_DEVICESTATE_REMOVED);
  EXPECT_EQ(host_->received(Op::GetDeviceState), 0u);
}

// --- size limits ----------------------------------------------------------------------------------

TEST_F(Kmt, StreamRefusesPrivateDataOverAMessageBeforeSending) {
  start(false);  // no fd passing: no sections
  const size_t room = gpup::proto::max_tail(Op::CreateAllocation, false);
  std::vector<uint8_t> priv(room + 1, 0x5a);
  GPUPKMT_CREATEALLOCATION a{};
  a.hDevice = device();
  a.Size = 4096;
  a.pPrivateDriverData = priv.data();
  a.PrivateDriverDataSize = static_cast<uint32_t>(priv.size());
  const auto before = stats();
  EXPECT_EQ(GpupKmtCreateAllocation(&a), GPUP_STATUS_MESSAGE_TOO_LARGE);
  const std::string text = GpupKmtGetLastErrorMessage();
  EXPECT_NE(text.find("131072"), std::string::npos) << text;                         // the limit
  EXPECT_NE(text.find(std::to_string(priv.size()) + " bytes"), std::string::npos) << text;  // the size
  EXPECT_NE(text.find("stream"), std::string::npos) << text;
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
  EXPECT_EQ(host_->received(Op::RegisterSection), 0u);

  a.PrivateDriverDataSize = static_cast<uint32_t>(room);  // exactly 128 KiB: goes through
  EXPECT_OK(GpupKmtCreateAllocation(&a));
  EXPECT_EQ(host_->last_private_data().size(), room);

  std::vector<uint8_t> esc(gpup::proto::max_tail(Op::Escape, false) + 1);
  GPUPKMT_ESCAPE e{};
  e.hAdapter = adapter_;
  e.pPrivateDriverData = esc.data();
  e.PrivateDriverDataSize = static_cast<uint32_t>(esc.size());
  const auto s1 = stats();
  EXPECT_EQ(GpupKmtEscape(&e), GPUP_STATUS_MESSAGE_TOO_LARGE);
  EXPECT_EQ(stats().MessagesSent, s1.MessagesSent);

  // An output capacity beyond what a reply carries is used up to 64 KiB only.
  std::vector<uint8_t> out(1 << 20);
  uint32_t seen_capacity = 0;
  host_->set_hook([&](FakeHost&, const gpup::proto::Message& m) {
    if (m.op() == Op::Escape) seen_capacity = m.as<gpup::proto::EscapeRequest>().output_size;
    return false;
  });
  const char small[] = "small";
  e.pPrivateDriverData = small;
  e.PrivateDriverDataSize = sizeof small;
  e.pOutputData = out.data();
  e.OutputDataSize = static_cast<uint32_t>(out.size());
  ASSERT_OK(GpupKmtEscape(&e));
  EXPECT_EQ(seen_capacity, gpup::proto::kMaxInlineOutput);
  EXPECT_EQ(e.OutputDataWritten, sizeof small);
  EXPECT_STREQ(reinterpret_cast<const char*>(out.data()), "small");
}

TEST_F(Kmt, PrivateDataOverTheBulkLimitFailsBeforeSending) {
  start(true);
  std::vector<uint8_t> priv(size_t{GPUPKMT_MAX_PRIVATE_DATA_SIZE} + 1);
  GPUPKMT_ESCAPE e{};
  e.hAdapter = open_adapter();
  e.pPrivateDriverData = priv.data();
  e.PrivateDriverDataSize = static_cast<uint32_t>(priv.size());
  const auto before = stats();
  EXPECT_EQ(GpupKmtEscape(&e), GPUP_STATUS_MESSAGE_TOO_LARGE);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find(std::to_string(priv.size())), std::string::npos)
      << GpupKmtGetLastErrorMessage();
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
  EXPECT_EQ(host_->live_sections(), 0u);
}

// A payload whose every byte depends on its position and a seed.
std::vector<uint8_t> pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>((i * 2654435761u + seed) >> 7);
  return v;
}

TEST_F(Kmt, BulkDataTravelsThroughAReusedSharedSection) {
  start(true);
  const GPUPKMT_HANDLE ad = open_adapter();
  const auto priv = pattern(1 << 20, 1);
  std::vector<uint8_t> out(1 << 20);
  GPUPKMT_ESCAPE e{};
  e.hAdapter = ad;
  e.pPrivateDriverData = priv.data();
  e.PrivateDriverDataSize = static_cast<uint32_t>(priv.size());
  e.pOutputData = out.data();
  e.OutputDataSize = static_cast<uint32_t>(out.size());
  auto s0 = stats();
  ASSERT_OK(GpupKmtEscape(&e));
  auto s1 = stats();
  EXPECT_EQ(e.OutputDataWritten, priv.size());
  EXPECT_TRUE(out == priv) << "the echoed 1 MiB differs";
  EXPECT_TRUE(host_->last_private_data() == priv);
  // Register + the escape itself; nothing else.
  EXPECT_EQ(s1.RoundTrips - s0.RoundTrips, 2u);
  EXPECT_EQ(s1.MessagesSent - s0.MessagesSent, 2u);
  EXPECT_EQ(host_->received(Op::RegisterSection), 1u);
  EXPECT_EQ(host_->live_sections(), 1u);

  // Again with other bytes: the cached section serves it, one round trip.
  const auto priv2 = pattern(1 << 20, 2);
  e.pPrivateDriverData = priv2.data();
  ASSERT_OK(GpupKmtEscape(&e));
  auto s2 = stats();
  EXPECT_EQ(s2.RoundTrips - s1.RoundTrips, 1u);
  EXPECT_TRUE(out == priv2);
  EXPECT_EQ(host_->received(Op::RegisterSection), 1u);

  // A program of 300 KiB with a small output: private data in the section, output inline.
  const auto source = pattern(300 << 10, 3);
  char log[16] = {};
  GPUPKMT_CREATEALLOCATION a{};
  a.hDevice = device();
  a.Flags = GPUPKMT_ALLOCATION_PROGRAM;
  a.pPrivateDriverData = source.data();
  a.PrivateDriverDataSize = static_cast<uint32_t>(source.size());
  a.pOutputData = log;
  a.OutputDataSize = sizeof log;
  gpup::proto::CreateAllocationRequest seen{};
  size_t seen_tail = 99;
  host_->set_hook([&](FakeHost&, const gpup::proto::Message& m) {
    if (m.op() == Op::CreateAllocation) {
      seen = m.as<gpup::proto::CreateAllocationRequest>();
      seen_tail = m.tail.size();
    }
    return false;
  });
  ASSERT_OK(GpupKmtCreateAllocation(&a));
  EXPECT_NE(a.hAllocation, 0u);
  EXPECT_EQ(a.OutputDataWritten, 5u);
  EXPECT_EQ(std::string(log, 5), "built");
  EXPECT_TRUE(host_->last_private_data() == source);
  EXPECT_NE(seen.private_data.section, 0u);
  EXPECT_EQ(seen.private_data.size, source.size());
  EXPECT_EQ(seen_tail, 0u);
  EXPECT_EQ(seen.output.section, 0u);
  EXPECT_EQ(seen.output_size, sizeof log);
  EXPECT_EQ(host_->received(Op::RegisterSection), 1u);

  // Small private data with a 200 KiB output capacity: only the output uses the section.
  const char small[] = "tiny";
  std::vector<uint8_t> big_out(200 << 10, 0xee);
  a.pPrivateDriverData = small;
  a.PrivateDriverDataSize = sizeof small;
  a.pOutputData = big_out.data();
  a.OutputDataSize = static_cast<uint32_t>(big_out.size());
  ASSERT_OK(GpupKmtCreateAllocation(&a));
  EXPECT_EQ(seen.private_data.section, 0u);
  EXPECT_EQ(seen_tail, sizeof small);
  EXPECT_NE(seen.output.section, 0u);
  EXPECT_EQ(seen.output.size, big_out.size());
  EXPECT_EQ(seen.output_size, 0u);
  EXPECT_EQ(a.OutputDataWritten, 5u);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(big_out.data()), 5), "built");
  EXPECT_EQ(big_out[5], 0xee) << "bytes past OutputDataWritten were touched";
}

TEST_F(Kmt, LargeSectionsAreNotKeptAfterTheCall) {
  start(true);
  const auto priv = pattern(20 << 20, 4);  // above the 16 MiB the cache keeps
  uint64_t out[2] = {};
  GPUPKMT_ESCAPE e{};
  e.hAdapter = open_adapter();
  e.pPrivateDriverData = priv.data();
  e.PrivateDriverDataSize = static_cast<uint32_t>(priv.size());
  e.pOutputData = out;
  e.OutputDataSize = sizeof out;
  ASSERT_OK(GpupKmtEscape(&e));
  EXPECT_EQ(e.OutputDataWritten, sizeof out);
  EXPECT_EQ(0, std::memcmp(out, priv.data(), sizeof out));
  EXPECT_TRUE(host_->last_private_data() == priv);
  EXPECT_TRUE(host_->wait_received(Op::UnregisterSection, 1));
  EXPECT_EQ(host_->live_sections(), 0u);
}

TEST_F(Kmt, BuildFailureWithOutputInASectionReturnsTheLog) {
  start(true);
  const std::string log_text(150 << 10, 'L');  // a build log larger than any message
  host_->set_hook([&](FakeHost& h, const gpup::proto::Message& m) {
    if (m.op() != Op::CreateAllocation) return false;
    const auto req = m.as<gpup::proto::CreateAllocationRequest>();
    auto out = h.section_span(req.output.section, req.output.offset, req.output.size);
    if (out.size() < log_text.size()) {
      h.reply_error(m, GPUP_STATUS_INTERNAL, "test: no output section");
      return true;
    }
    std::memcpy(out.data(), log_text.data(), log_text.size());
    h.reply<Op::CreateAllocation>(m, {0, static_cast<uint32_t>(log_text.size()), GPUP_STATUS_BUILD_FAILED, 0});
    return true;
  });
  const std::string src = "kernel void k() { x; }";
  std::vector<char> log(256 << 10);
  GPUPKMT_CREATEALLOCATION a{};
  a.hDevice = device();
  a.Flags = GPUPKMT_ALLOCATION_PROGRAM;
  a.pPrivateDriverData = src.data();
  a.PrivateDriverDataSize = static_cast<uint32_t>(src.size());
  a.pOutputData = log.data();
  a.OutputDataSize = static_cast<uint32_t>(log.size());
  EXPECT_EQ(GpupKmtCreateAllocation(&a), GPUP_STATUS_BUILD_FAILED);
  EXPECT_EQ(a.KmdStatus, GPUP_STATUS_BUILD_FAILED);
  EXPECT_EQ(a.OutputDataWritten, log_text.size());
  EXPECT_EQ(std::string(log.data(), log_text.size()), log_text);
  EXPECT_EQ(a.hAllocation, 0u);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("build output"), std::string::npos)
      << GpupKmtGetLastErrorMessage();
}

TEST_F(Kmt, SectionReplyClaimingMoreThanTheCapacityIsAProtocolError) {
  start(true);
  host_->set_hook([](FakeHost& h, const gpup::proto::Message& m) {
    if (m.op() != Op::Escape) return false;
    const auto req = m.as<gpup::proto::EscapeRequest>();
    h.reply<Op::Escape>(m, {req.output.size + 1, 0});
    return true;
  });
  std::vector<uint8_t> out(100 << 10);
  GPUPKMT_ESCAPE e{};
  e.hAdapter = open_adapter();
  e.pOutputData = out.data();
  e.OutputDataSize = static_cast<uint32_t>(out.size());
  EXPECT_EQ(GpupKmtEscape(&e), GPUP_STATUS_PROTOCOL_ERROR);
  EXPECT_EQ(e.OutputDataWritten, 0u);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("capacity"), std::string::npos)
      << GpupKmtGetLastErrorMessage();
}

TEST_F(Kmt, ConcurrentBulkCallsGetTheirOwnSectionsAndTheCacheStaysSmall) {
  start(true);
  const GPUPKMT_HANDLE ad = open_adapter();
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint32_t i = 0; i < 6; ++i) {
        const auto priv = pattern((200 << 10) + t * 4096 + i, t * 100 + i);
        std::vector<uint8_t> out(priv.size());
        GPUPKMT_ESCAPE e{};
        e.hAdapter = ad;
        e.pPrivateDriverData = priv.data();
        e.PrivateDriverDataSize = static_cast<uint32_t>(priv.size());
        e.pOutputData = out.data();
        e.OutputDataSize = static_cast<uint32_t>(out.size());
        if (GpupKmtEscape(&e) != GPUP_STATUS_SUCCESS) {
          ++failed;
        } else if (e.OutputDataWritten != priv.size() || out != priv) {
          ++wrong;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failed.load(), 0) << GpupKmtGetLastErrorMessage();
  EXPECT_EQ(wrong.load(), 0);
  const uint64_t registered = host_->received(Op::RegisterSection);
  EXPECT_GE(registered, 1u);
  EXPECT_LE(registered, 24u);
  // Everything registered beyond the two idle sections was unregistered again.
  EXPECT_LE(host_->live_sections(), 2u);
  EXPECT_EQ(host_->live_sections() + host_->received(Op::UnregisterSection), registered);
}

TEST_F(Kmt, OversizedCommandBufferFailsBeforeSending) {
  start(true);
  const GPUPKMT_HANDLE ctx = context();
  GPUPKMT_CMDBUF* cb = nullptr;
  ASSERT_OK(GpupKmtCmdBufCreate(&cb));
  while (GpupKmtCmdBufSize(cb) <= gpup::proto::max_tail(Op::SubmitCommand, false)) GpupKmtCmdCopy(cb, 1, 2, 3);
  GPUPKMT_SUBMITCOMMAND sub{ctx, 0, cb, 0};
  const auto before = stats();
  EXPECT_EQ(GpupKmtSubmitCommand(&sub), GPUP_STATUS_MESSAGE_TOO_LARGE);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("never split"), std::string::npos);
  EXPECT_EQ(stats().MessagesSent, before.MessagesSent);
  GpupKmtCmdBufDestroy(cb);
}

// --- submission and the other round trips --------------------------------------------------------

TEST_F(Kmt, SubmitIsOneAsyncMessageWithTheCommandBuffer) {
  start(true);
  const GPUPKMT_HANDLE ctx = context();
  const GPUPKMT_HANDLE s = sync_object(0);
  GPUPKMT_CMDBUF* cb = nullptr;
  ASSERT_OK(GpupKmtCmdBufCreate(&cb));
  const uint32_t pattern = 0xfeedbeef;
  ASSERT_OK(GpupKmtCmdFill(cb, 0x10000, 256, &pattern, sizeof pattern));
  const int32_t scalar = 42;
  GPUPKMT_KERNEL_ARG args[2]{};
  args[0].Kind = GPUPDDI_ARG_BUFFER;
  args[0].VirtualAddress = 0x10000;
  args[0].BufferSize = 256;
  args[1].Kind = GPUPDDI_ARG_VALUE;
  args[1].Size = sizeof scalar;
  args[1].pValue = &scalar;
  GPUPKMT_DISPATCH d{};
  d.hProgram = 0x777;
  d.pKernelName = "scale";
  d.WorkDim = 1;
  d.ArgCount = 2;
  d.GlobalSize[0] = 64;
  d.pArgs = args;
  ASSERT_OK(GpupKmtCmdDispatch(cb, &d));
  ASSERT_OK(GpupKmtCmdSignal(cb, s, 1));
  EXPECT_EQ(GpupKmtCmdBufCount(cb), 3u);

  const auto before = stats();
  GPUPKMT_SUBMITCOMMAND sub{ctx, 0, cb, 0};
  ASSERT_OK(GpupKmtSubmitCommand(&sub));
  EXPECT_EQ(sub.SubmissionId, 1u);
  ASSERT_OK(GpupKmtSubmitCommand(&sub));
  EXPECT_EQ(sub.SubmissionId, 2u);
  const auto after = stats();
  EXPECT_EQ(after.MessagesSent, before.MessagesSent + 2);
  EXPECT_EQ(after.RoundTrips, before.RoundTrips);
  ASSERT_TRUE(host_->wait_received(Op::SubmitCommand, 2));
  EXPECT_EQ(host_->last_submission_id(), 2u);

  const auto bytes = host_->last_submission();
  gpup::proto::CommandReader reader(bytes);
  gpup::proto::CommandView v;
  std::vector<gpup::proto::CommandOp> ops;
  for (;;) {
    auto more = reader.next(v);
    ASSERT_TRUE(more.ok()) << more.error().describe();
    if (!*more) break;
    ops.push_back(v.op);
    if (v.op == gpup::proto::CommandOp::Dispatch) {
      auto dv = gpup::proto::parse_dispatch(v);
      ASSERT_TRUE(dv.ok()) << dv.error().describe();
      EXPECT_EQ(dv->name, "scale");
      ASSERT_EQ(dv->args.size(), 2u);
      EXPECT_EQ(dv->args[0].desc.va, 0x10000u);
      ASSERT_EQ(dv->args[1].value.size(), sizeof scalar);
    }
  }
  EXPECT_EQ(ops, (std::vector<gpup::proto::CommandOp>{gpup::proto::CommandOp::Fill, gpup::proto::CommandOp::Dispatch,
                                                        gpup::proto::CommandOp::SignalFence}));
  GpupKmtCmdBufDestroy(cb);
}

TEST_F(Kmt, CommandBufferRefusesBadArguments) {
  GPUPKMT_CMDBUF* cb = nullptr;
  ASSERT_OK(GpupKmtCmdBufCreate(&cb));
  uint8_t big[129] = {};
  EXPECT_EQ(GpupKmtCmdFill(cb, 0, 16, big, sizeof big), GPUP_STATUS_INVALID_PARAMETER);
  GPUPKMT_KERNEL_ARG arg{};
  arg.Kind = 99;
  GPUPKMT_DISPATCH d{};
  d.pKernelName = "k";
  d.WorkDim = 1;
  d.ArgCount = 1;
  d.pArgs = &arg;
  EXPECT_EQ(GpupKmtCmdDispatch(cb, &d), GPUP_STATUS_INVALID_PARAMETER);
  std::string longname(300, 'k');
  d.ArgCount = 0;
  d.pKernelName = longname.c_str();
  EXPECT_EQ(GpupKmtCmdDispatch(cb, &d), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(GpupKmtCmdBufCount(cb), 0u);
  GpupKmtCmdBufDestroy(cb);
}

TEST_F(Kmt, BuildFailureReturnsTheLogInTheOutput) {
  start(true);
  host_->set_hook([](FakeHost& h, const gpup::proto::Message& m) {
    if (m.op() != Op::CreateAllocation) return false;
    h.reply_error(m, GPUP_STATUS_BUILD_FAILED, "<source>:3:5: error: use of undeclared identifier 'x'");
    return true;
  });
  const std::string src = "kernel void k() { x; }";
  char log[256] = {};
  GPUPKMT_CREATEALLOCATION a{};
  a.hDevice = device();
  a.Flags = GPUPKMT_ALLOCATION_PROGRAM;
  a.Size = 4096;
  a.pPrivateDriverData = src.data();
  a.PrivateDriverDataSize = static_cast<uint32_t>(src.size());
  a.pOutputData = log;
  a.OutputDataSize = 20;  // shorter than the log: cut
  EXPECT_EQ(GpupKmtCreateAllocation(&a), GPUP_STATUS_BUILD_FAILED);
  EXPECT_EQ(a.KmdStatus, GPUP_STATUS_BUILD_FAILED);
  EXPECT_EQ(a.OutputDataWritten, 20u);
  EXPECT_EQ(std::string(log, 20), "<source>:3:5: error:");
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("undeclared identifier"), std::string::npos);
  EXPECT_EQ(a.hAllocation, 0u);
}

TEST_F(Kmt, RoundTripsCopyOutputs) {
  start(true);
  const GPUPKMT_HANDLE ad = open_adapter();
  uint32_t out = 0;
  GPUPKMT_QUERYADAPTERINFO q{};
  q.hAdapter = ad;
  q.Type = GPUPDDI_QAITYPE_DRIVERCAPS;
  q.pOutputData = &out;
  q.OutputDataSize = sizeof out;
  ASSERT_OK(GpupKmtQueryAdapterInfo(&q));
  EXPECT_EQ(q.OutputDataWritten, 4u);
  EXPECT_EQ(out, GPUPDDI_QAITYPE_DRIVERCAPS * 10u);

  const char in[] = "escape!";
  char buf[16] = {};
  GPUPKMT_ESCAPE e{};
  e.hAdapter = ad;
  e.Flags = GPUPKMT_ESCAPE_DRIVER_KNOWN;
  e.pPrivateDriverData = in;
  e.PrivateDriverDataSize = sizeof in;
  e.pOutputData = buf;
  e.OutputDataSize = sizeof buf;
  ASSERT_OK(GpupKmtEscape(&e));
  EXPECT_EQ(e.OutputDataWritten, sizeof in);
  EXPECT_STREQ(buf, "escape!");

  GPUPKMT_QUERYVIDEOMEMORYINFO vm{};
  vm.hAdapter = ad;
  ASSERT_OK(GpupKmtQueryVideoMemoryInfo(&vm));
  EXPECT_EQ(vm.Budget, 1ull << 30);
  GPUPKMT_QUERYSTATISTICS qs{};
  qs.Type = GPUPKMT_QUERYSTATISTICS_PROCESS;
  ASSERT_OK(GpupKmtQueryStatistics(&qs));
  EXPECT_EQ(qs.Devices, 2u);
  EXPECT_EQ(qs.Faults, 10u);

  GPUPKMT_RESERVEGPUVA r{0, 1 << 20, 0};
  ASSERT_OK(GpupKmtReserveGpuVirtualAddress(&r));
  EXPECT_EQ(r.VirtualAddress, 0x1'0000'0000ull);
  GPUPKMT_MAPGPUVA mv{allocation(4096), GPUPKMT_PROTECTION_READ, r.VirtualAddress, 0, 4096};
  ASSERT_OK(GpupKmtMapGpuVirtualAddress(&mv));
  GPUPKMT_FREEGPUVA f{r.VirtualAddress, r.Size};
  ASSERT_OK(GpupKmtFreeGpuVirtualAddress(&f));
}

TEST_F(Kmt, CorruptReplyIsAnErrorNotACrash) {
  start(true);
  host_->set_hook([](FakeHost& h, const gpup::proto::Message& m) {
    if (m.op() != Op::Escape) return false;
    const uint8_t junk[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    h.reply<Op::Escape>(m, {1000, 0}, junk);  // written disagrees with the tail
    return true;
  });
  char buf[64];
  GPUPKMT_ESCAPE e{};
  e.hAdapter = open_adapter();
  e.pOutputData = buf;
  e.OutputDataSize = sizeof buf;
  EXPECT_EQ(GpupKmtEscape(&e), GPUP_STATUS_PROTOCOL_ERROR);
  EXPECT_EQ(e.OutputDataWritten, 0u);
}

// --- connection loss ------------------------------------------------------------------------------

TEST_F(Kmt, ConnectionLossFailsPendingAndLaterCalls) {
  start(true);
  host_->set_hook([](FakeHost& h, const gpup::proto::Message& m) {
    if (m.op() != Op::QueryStatistics) return false;
    h.drop_connection();  // the request is pending in the guest; no reply ever comes
    return true;
  });
  GPUPKMT_QUERYSTATISTICS qs{};
  qs.Type = GPUPKMT_QUERYSTATISTICS_VM;
  EXPECT_EQ(GpupKmtQueryStatistics(&qs), GPUP_STATUS_CONNECTION_LOST);
  GPUPKMT_ENUMADAPTERS e{0, nullptr};
  EXPECT_EQ(GpupKmtEnumAdapters(&e), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_EQ(GpupKmtConnect(nullptr), GPUP_STATUS_CONNECTION_LOST);
  GPUPKMT_CHANNELSTATS s{};
  EXPECT_OK(GpupKmtGetChannelStats(&s));  // introspection still answers
}

TEST_P(KmtBoth, ConnectionLossFailsAPendingWait) {
  start(GetParam());
  const GPUPKMT_HANDLE s = sync_object(0);
  auto waiter = std::async(std::launch::async, [&] { return wait_cpu(s, 1, -1); });
  ASSERT_TRUE(host_->wait_received(Op::WaitFromCpu, 1));
  host_->drop_connection();
  ASSERT_EQ(waiter.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(waiter.get(), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_EQ(wait_cpu(s, 1, -1), GPUP_STATUS_CONNECTION_LOST);
}

TEST_F(Kmt, MalformedHostMessageDropsTheConnection) {
  start(true);
  const GPUPKMT_HANDLE s = sync_object(0);
  auto waiter = std::async(std::launch::async, [&] { return wait_cpu(s, 1, -1); });
  ASSERT_TRUE(host_->wait_received(Op::WaitFromCpu, 1));
  std::vector<uint8_t> junk(sizeof(gpup::proto::MessageHeader), 0);
  junk[0] = 99;  // size field disagrees with the length
  host_->send_raw(junk);
  ASSERT_EQ(waiter.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(waiter.get(), GPUP_STATUS_CONNECTION_LOST);
  GPUPKMT_ENUMADAPTERS e{0, nullptr};
  EXPECT_EQ(GpupKmtEnumAdapters(&e), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_NE(std::string(GpupKmtGetLastErrorMessage()).find("malformed"), std::string::npos)
      << GpupKmtGetLastErrorMessage();
}

TEST_F(Kmt, DisconnectThenReconnect) {
  start(true);
  GpupKmtDisconnect();
  host_ = std::make_unique<FakeHost>();
  ASSERT_OK(GpupKmtConnect(host_->endpoint().c_str()));
  EXPECT_EQ(stats().MessagesSent, 1u);
}

TEST_F(Kmt, ForkedChildConnectsAsANewGuestProcess) {
#if defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "ThreadSanitizer cannot start threads after a multi-threaded fork";
#endif
  start(true);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // child: the parent's session is not inherited
    int rc = 1;
    {
      FakeHost child_host;
      GPUPKMT_CHANNELSTATS s{};
      if (GpupKmtConnect(child_host.endpoint().c_str()) == GPUP_STATUS_SUCCESS &&
          GpupKmtGetChannelStats(&s) == GPUP_STATUS_SUCCESS && s.MessagesSent == 1 &&
          child_host.received(Op::Hello) == 1)
        rc = 0;
      GpupKmtDisconnect();
    }
    _exit(rc);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  GPUPKMT_QUERYSTATISTICS qs{};  // the parent's session is untouched
  EXPECT_OK(GpupKmtQueryStatistics(&qs));
  EXPECT_EQ(host_->received(Op::Hello), 1u);
}

// --- threads --------------------------------------------------------------------------------------

TEST_P(KmtBoth, ConcurrentCallsAndWaits) {
  start(GetParam());
  constexpr int kThreads = 6, kCalls = 150;
  std::vector<GPUPKMT_HANDLE> syncs;
  for (int i = 0; i < kThreads; ++i) syncs.push_back(sync_object(0));
  const auto before = stats();
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        GPUPKMT_QUERYSTATISTICS qs{};
        qs.Type = GPUPKMT_QUERYSTATISTICS_PROCESS;
        if (GpupKmtQueryStatistics(&qs) != GPUP_STATUS_SUCCESS || qs.Contexts != 3) ++failures;
        GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT sig{syncs[t], static_cast<uint64_t>(i + 1), 0};
        if (GpupKmtSignalSynchronizationObjectFromCpu(&sig) != GPUP_STATUS_SUCCESS) ++failures;
        if (wait_cpu(syncs[t], i + 1, 5000) != GPUP_STATUS_SUCCESS) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(stats().RoundTrips - before.RoundTrips, uint64_t{kThreads} * kCalls * 2);
}

}  // namespace
