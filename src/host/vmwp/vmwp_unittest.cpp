// Worker core tests: handle tables, GPU VA spaces, and the dispatch path driven in-process with
// the mock KMD through a fake link (no processes, no channel).
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstdlib>
#include <mutex>

#include "gpup/kmd_opencl.h"
#include "gpup/kmt.h"
#include "host/vmwp/worker.h"

namespace gpup::vmwp {
namespace {

using namespace gpup::proto;

// --- handle table --------------------------------------------------------------------------

struct Dummy : Object {
  explicit Dummy(ObjectType t) : Object(t) {}
};

TEST(HandleTable, IssuesDistinctNonZeroHandlesAndChecksType) {
  HandleTable t;
  auto a = t.insert(std::make_shared<Dummy>(ObjectType::Device));
  auto b = t.insert(std::make_shared<Dummy>(ObjectType::Allocation));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(*a, 0u);
  EXPECT_NE(*a, *b);
  EXPECT_EQ(*a & HandleTable::kInstanceMask, 0u);
  EXPECT_TRUE((t.get<Dummy>(*a, ObjectType::Device)).ok());
  EXPECT_EQ((t.get<Dummy>(*a, ObjectType::Allocation)).status(), GPUP_STATUS_OBJECT_TYPE_MISMATCH);
  EXPECT_EQ(t.size(), 2u);
}

TEST(HandleTable, RejectsForgedAndStaleHandles) {
  HandleTable t;
  auto a = t.insert(std::make_shared<Dummy>(ObjectType::Context));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((t.get<Dummy>(0, ObjectType::Context)).status(), GPUP_STATUS_INVALID_HANDLE);
  EXPECT_EQ((t.get<Dummy>(*a | 1, ObjectType::Context)).status(), GPUP_STATUS_INVALID_HANDLE);          // instance bits
  EXPECT_EQ((t.get<Dummy>(*a + (1000u << 6), ObjectType::Context)).status(), GPUP_STATUS_INVALID_HANDLE);  // never issued
  EXPECT_EQ((t.get<Dummy>(*a ^ (1u << 30), ObjectType::Context)).status(), GPUP_STATUS_INVALID_HANDLE);    // wrong unique
  ASSERT_TRUE(t.remove(*a).ok());
  auto stale = t.get<Dummy>(*a, ObjectType::Context);
  EXPECT_EQ(stale.status(), GPUP_STATUS_INVALID_HANDLE);
  EXPECT_NE(stale.error().message.find("stale"), std::string::npos);
  EXPECT_EQ(t.remove(*a).status(), GPUP_STATUS_INVALID_HANDLE);
  EXPECT_EQ(t.size(), 0u);
}

TEST(HandleTable, FreedSlotsAreNotReusedSoon) {
  HandleTable t;
  auto first = t.insert(std::make_shared<Dummy>(ObjectType::Device));
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(t.remove(*first).ok());
  std::set<uint32_t> seen;
  for (size_t i = 0; i < HandleTable::kReuseDelay; ++i) {
    auto h = t.insert(std::make_shared<Dummy>(ObjectType::Device));
    ASSERT_TRUE(h.ok());
    EXPECT_NE(*h >> 6, *first >> 6) << "slot reused after " << i << " allocations";
    seen.insert(*h);
  }
  EXPECT_EQ(seen.size(), HandleTable::kReuseDelay);
}

TEST(HandleTable, EnforcesObjectLimit) {
  HandleTable t(3);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(t.insert(std::make_shared<Dummy>(ObjectType::Device)).ok());
  EXPECT_EQ(t.insert(std::make_shared<Dummy>(ObjectType::Device)).status(), GPUP_STATUS_QUOTA_EXCEEDED);
}

// --- VA space --------------------------------------------------------------------------------

TEST(VaSpace, ReserveMapResolve) {
  VaSpace va;
  auto base = va.reserve(0, 3 * VaSpace::kPageSize);
  ASSERT_TRUE(base.ok());
  EXPECT_GE(*base, VaSpace::kBase);
  auto alloc = std::shared_ptr<Allocation>();
  ASSERT_TRUE(va.map(*base, 2 * VaSpace::kPageSize, alloc, 2 * VaSpace::kPageSize, 0, GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE).ok());
  auto r = va.resolve(*base + 100, 50, true);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->offset, 100u);
  // Past the mapping, into the reserved but unmapped page: a fault.
  EXPECT_EQ(va.resolve(*base + 2 * VaSpace::kPageSize - 8, 16, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(va.resolve(*base - 8, 8, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(va.resolve(UINT64_MAX - 4, 16, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  // Overlaps and out-of-range mappings are refused.
  EXPECT_FALSE(va.map(*base + VaSpace::kPageSize, VaSpace::kPageSize, alloc, VaSpace::kPageSize, 0, GPUPKMT_PROTECTION_READ).ok());
  EXPECT_EQ(va.map(*base + 2 * VaSpace::kPageSize, VaSpace::kPageSize, alloc, VaSpace::kPageSize, VaSpace::kPageSize, GPUPKMT_PROTECTION_READ).status(),
            GPUP_STATUS_OUT_OF_RANGE);
  EXPECT_FALSE(va.map(*base + 2 * VaSpace::kPageSize, 2 * VaSpace::kPageSize, alloc, 4 * VaSpace::kPageSize, 0, GPUPKMT_PROTECTION_READ).ok());
  // Read-only mapping refuses writes.
  ASSERT_TRUE(va.map(*base + 2 * VaSpace::kPageSize, VaSpace::kPageSize, alloc, VaSpace::kPageSize, 0, GPUPKMT_PROTECTION_READ).ok());
  EXPECT_EQ(va.resolve(*base + 2 * VaSpace::kPageSize, 4, true).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_TRUE(va.resolve(*base + 2 * VaSpace::kPageSize, 4, false).ok());
  ASSERT_TRUE(va.free(*base, 3 * VaSpace::kPageSize).ok());
  EXPECT_EQ(va.mapping_count(), 0u);
  EXPECT_EQ(va.resolve(*base, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
}

TEST(VaSpace, FixedReservationsDoNotOverlap) {
  VaSpace va;
  ASSERT_TRUE(va.reserve(VaSpace::kBase + 0x10000, 0x10000).ok());
  EXPECT_FALSE(va.reserve(VaSpace::kBase + 0x18000, 0x10000).ok());
  EXPECT_FALSE(va.reserve(VaSpace::kBase + 0x8000, 0x10000).ok());
  EXPECT_FALSE(va.reserve(123, 0x1000).ok());
  EXPECT_FALSE(va.reserve(0, 0).ok());
  auto any = va.reserve(0, 0x10000);
  ASSERT_TRUE(any.ok());
  EXPECT_TRUE(*any + 0x10000 <= VaSpace::kBase + 0x10000 || *any >= VaSpace::kBase + 0x20000);
}

// --- worker dispatch, in process, with the mock KMD -------------------------------------------

class FakeLink : public GuestLink {
 public:
  struct Shared {
    std::mutex mu;
    std::vector<std::vector<uint8_t>> messages;
    std::map<uint64_t, int> fds;
  };
  explicit FakeLink(std::shared_ptr<Shared> s) : s_(std::move(s)) {}
  gpup_status send(const Encoded& msg) override {
    std::lock_guard l(s_->mu);
    s_->messages.push_back(msg.flatten());
    return GPUP_STATUS_SUCCESS;
  }
  gpup_status send_fd(uint64_t id, int fd) override {
    std::lock_guard l(s_->mu);
    s_->fds[id] = dup(fd);
    return GPUP_STATUS_SUCCESS;
  }
  bool shares_memory() const override { return true; }

 private:
  std::shared_ptr<Shared> s_;
};

class WorkerTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kLuid = 0x1234;
  void SetUp() override {
    setenv("GPUP_KMD_PATH", GPUP_TEST_KMD_DIR, 1);
    WorkerConfig c;
    c.vm_name = "test";
    c.adapter_name = "mock0";
    c.adapter_luid = kLuid;
    c.kmd = "mock";
    c.max_vram = 64 << 20;
    worker_ = std::make_unique<Worker>(c);
    auto s = worker_->start();
    ASSERT_TRUE(s.ok()) << s.error().describe();
    a_ = open_process();
    b_ = open_process();
  }
  void TearDown() override {
    if (worker_) worker_->stop();
  }

  struct Proc {
    std::shared_ptr<GuestProcess> p;
    std::shared_ptr<FakeLink::Shared> out;
    uint64_t txn = 1;
  };

  Proc open_process() {
    Proc pr;
    pr.out = std::make_shared<FakeLink::Shared>();
    pr.p = worker_->connect(std::make_unique<FakeLink>(pr.out));
    HelloRequest h{1, kVersion, 0, 42, "unit"};
    auto r = call(pr, h);
    EXPECT_EQ(r.header.status, GPUP_STATUS_SUCCESS);
    return pr;
  }

  // Sends a request and returns the decoded reply (the last message sent by the worker).
  struct Reply {
    MessageHeader header{};
    std::vector<uint8_t> fixed, tail;
    std::string text() const { return std::string(tail.begin(), tail.end()); }
    template <typename T>
    T as() const {
      T v{};
      std::memcpy(&v, fixed.data(), std::min(fixed.size(), sizeof v));
      return v;
    }
  };
  template <typename Req>
  Reply call(Proc& pr, const Req& req, std::span<const uint8_t> tail = {}) {
    auto enc = encode_request(req, pr.txn++, tail);
    EXPECT_TRUE(enc.ok());
    auto bytes = enc->flatten();
    EXPECT_TRUE(pr.p->handle(bytes).ok());
    return last_reply(pr, enc->header.txn);
  }
  Reply last_reply(Proc& pr, uint64_t txn) {
    std::lock_guard l(pr.out->mu);
    for (auto it = pr.out->messages.rbegin(); it != pr.out->messages.rend(); ++it) {
      auto m = decode(*it, Direction::kHostToGuest);
      EXPECT_TRUE(m.ok());
      if (m.ok() && m->is_reply() && m->header.txn == txn) {
        Reply r;
        r.header = m->header;
        r.fixed.assign(m->fixed.begin(), m->fixed.end());
        r.tail.assign(m->tail.begin(), m->tail.end());
        return r;
      }
    }
    ADD_FAILURE() << "no reply for txn " << txn;
    return {};
  }
  template <typename Req>
  void send_async(Proc& pr, const Req& req, std::span<const uint8_t> tail = {}) {
    auto enc = encode_request(req, 0, tail);
    ASSERT_TRUE(enc.ok());
    auto bytes = enc->flatten();
    ASSERT_TRUE(pr.p->handle(bytes).ok());
  }
  std::vector<std::pair<ContextErrorRequest, std::string>> context_errors(Proc& pr) {
    std::vector<std::pair<ContextErrorRequest, std::string>> v;
    std::lock_guard l(pr.out->mu);
    for (auto& b : pr.out->messages) {
      auto m = decode(b, Direction::kHostToGuest);
      if (m.ok() && m->op() == Op::ContextError) v.push_back({m->as<ContextErrorRequest>(), std::string(m->tail_text())});
    }
    return v;
  }

  uint32_t create_device(Proc& pr) {
    auto r = call(pr, CreateDeviceRequest{kLuid, 0, 0});
    EXPECT_EQ(r.header.status, 0) << r.text();
    return r.as<CreateDeviceReply>().device;
  }
  uint32_t create_alloc(Proc& pr, uint32_t dev, uint64_t size, uint32_t flags = GPUPKMT_ALLOCATION_CPU_VISIBLE) {
    auto r = call(pr, CreateAllocationRequest{dev, flags, size, 0, 0});
    EXPECT_EQ(r.header.status, 0) << r.text();
    return r.as<CreateAllocationReply>().allocation;
  }
  Counts totals() { return worker_->totals(); }

  std::unique_ptr<Worker> worker_;
  Proc a_, b_;
};

TEST_F(WorkerTest, RejectsForgedStaleWrongTypeAndForeignHandles) {
  uint32_t dev = create_device(a_);
  uint32_t alloc = create_alloc(a_, dev, 4096);
  uint32_t dev_b = create_device(b_);
  uint32_t alloc_b = 0;
  for (int i = 0; i < 5; ++i) alloc_b = create_alloc(b_, dev_b, 4096);  // beyond anything a was issued

  // Forged.
  auto r = call(a_, DestroyAllocationRequest{dev, 0xdead0000});
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_HANDLE);
  EXPECT_FALSE(r.text().empty());
  // Wrong type: a device handle where an allocation is expected.
  r = call(a_, DestroyAllocationRequest{dev, dev});
  EXPECT_EQ(r.header.status, GPUP_STATUS_OBJECT_TYPE_MISMATCH);
  // Another process's handle: tables are per process, so b's handle was never issued to a.
  r = call(a_, LockRequest{dev, alloc_b});
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_HANDLE) << r.text();
  // Stale.
  ASSERT_EQ(call(a_, DestroyAllocationRequest{dev, alloc}).header.status, 0);
  r = call(a_, LockRequest{dev, alloc});
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_HANDLE);
  EXPECT_NE(r.text().find("stale"), std::string::npos) << r.text();
  // b is untouched: its allocation still locks.
  r = call(b_, LockRequest{dev_b, alloc_b});
  EXPECT_EQ(r.header.status, 0) << r.text();
}

TEST_F(WorkerTest, EnforcesPartitionBudget) {
  uint32_t dev = create_device(a_);
  auto r = call(a_, CreateAllocationRequest{dev, 0, 48 << 20, 0, 0});
  ASSERT_EQ(r.header.status, 0) << r.text();
  r = call(b_, CreateAllocationRequest{create_device(b_), 0, 32 << 20, 0, 0});
  EXPECT_EQ(r.header.status, GPUP_STATUS_QUOTA_EXCEEDED);
  EXPECT_NE(r.text().find("above its max"), std::string::npos) << r.text();
  EXPECT_EQ(totals().vram_used, 48u << 20);
}

TEST_F(WorkerTest, SubmissionOutsideOwnMappingsFaultsOnlyThatContext) {
  uint32_t dev = create_device(a_);
  uint32_t alloc = create_alloc(a_, dev, 8192);
  auto va = call(a_, ReserveGpuVaRequest{0, 8192}).as<ReserveGpuVaReply>().va;
  ASSERT_EQ(call(a_, MapGpuVaRequest{alloc, GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE, va, 0, 8192}).header.status, 0);
  auto ctx = call(a_, CreateContextRequest{dev, 0, 0, 0}).as<CreateContextReply>().context;

  // b maps its own allocation at some VA; a referencing it is a fault in a.
  uint32_t dev_b = create_device(b_);
  uint32_t alloc_b = create_alloc(b_, dev_b, 8192);
  auto va_b = call(b_, ReserveGpuVaRequest{0, 8192}).as<ReserveGpuVaReply>().va;
  ASSERT_EQ(call(b_, MapGpuVaRequest{alloc_b, 3, va_b, 0, 8192}).header.status, 0);

  CommandWriter w;
  w.copy(va, va + 4096, 1024);      // fine
  w.copy(va, va_b + 8192 * 16, 64);  // outside a's mappings
  send_async(a_, SubmitCommandRequest{ctx, 0, 7}, w.bytes());
  auto errs = context_errors(a_);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].first.status, GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(errs[0].first.submission_id, 7u);
  EXPECT_NE(errs[0].second.find("outside"), std::string::npos) << errs[0].second;
  // The device-state notification follows the context error, with a new counter.
  {
    std::lock_guard l(a_.out->mu);
    int changes = 0;
    for (auto& b : a_.out->messages) {
      auto msg = decode(b, Direction::kHostToGuest);
      if (msg.ok() && msg->op() == Op::DeviceStateChanged) {
        auto d = msg->as<DeviceStateChangedRequest>();
        EXPECT_EQ(d.device, dev);
        EXPECT_EQ(d.state, GPUPKMT_DEVICESTATE_RESET);
        EXPECT_EQ(d.reason, GPUP_STATUS_GPU_PAGE_FAULT);
        EXPECT_GT(d.state_counter, 1u);
        ++changes;
      }
    }
    EXPECT_EQ(changes, 1);
  }
  auto st = call(a_, GetDeviceStateRequest{dev, 0}).as<GetDeviceStateReply>();
  EXPECT_EQ(st.state, GPUPKMT_DEVICESTATE_RESET);
  EXPECT_EQ(st.reason, GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_TRUE(context_errors(b_).empty());
  EXPECT_EQ(call(b_, GetDeviceStateRequest{dev_b, 0}).as<GetDeviceStateReply>().state, GPUPKMT_DEVICESTATE_NORMAL);
}

TEST_F(WorkerTest, CommandsMayNotTouchAnotherDevicesMemory) {
  uint32_t dev1 = create_device(a_);
  uint32_t dev2 = create_device(a_);
  uint32_t alloc2 = create_alloc(a_, dev2, 4096);
  auto va = call(a_, ReserveGpuVaRequest{0, 4096}).as<ReserveGpuVaReply>().va;
  ASSERT_EQ(call(a_, MapGpuVaRequest{alloc2, 3, va, 0, 4096}).header.status, 0);
  auto ctx1 = call(a_, CreateContextRequest{dev1, 0, 0, 0}).as<CreateContextReply>().context;
  CommandWriter w;
  uint32_t pat = 1;
  w.fill(va, 4096, &pat, 4);
  send_async(a_, SubmitCommandRequest{ctx1, 0, 3}, w.bytes());
  auto errs = context_errors(a_);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].first.status, GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(errs[0].second.find("another device"), std::string::npos) << errs[0].second;
  // Destroying dev2 while dev1 lives frees its allocation at once.
  ASSERT_EQ(call(a_, DestroyDeviceRequest{dev2, 0}).header.status, 0);
  EXPECT_EQ(totals().vram_used, 0u);
}

TEST_F(WorkerTest, ClosingAProcessReturnsEverything) {
  const Counts base = totals();
  uint32_t dev = create_device(a_);
  for (int i = 0; i < 5; ++i) create_alloc(a_, dev, 1 << 20);
  call(a_, CreateContextRequest{dev, 0, 0, 0});
  call(a_, CreateSyncObjectRequest{dev, GPUPKMT_SYNCOBJECT_MONITORED_FENCE, 0});
  Counts during = totals();
  EXPECT_EQ(during.allocations, base.allocations + 5);
  EXPECT_EQ(during.vram_used, base.vram_used + (5u << 20));
  worker_->disconnect(a_.p);
  Counts after = totals();
  EXPECT_EQ(after.devices, base.devices);
  EXPECT_EQ(after.allocations, base.allocations);
  EXPECT_EQ(after.contexts, base.contexts);
  EXPECT_EQ(after.sync_objects, base.sync_objects);
  EXPECT_EQ(after.vram_used, base.vram_used);
  EXPECT_EQ(after.processes, base.processes - 1);
}

TEST_F(WorkerTest, MalformedMessagesGetErrorsAndChangeNothing) {
  const Counts base = totals();
  // Truncated CreateDevice (fixed part short): the header is intact, so an error reply comes back.
  CreateDeviceRequest req{kLuid, 0, 0};
  auto enc = encode_request(req, 555);
  auto bytes = enc->flatten();
  bytes.resize(bytes.size() - 4);
  uint32_t sz = static_cast<uint32_t>(bytes.size());
  std::memcpy(bytes.data(), &sz, 4);
  ASSERT_TRUE(a_.p->handle(bytes).ok());
  EXPECT_EQ(last_reply(a_, 555).header.status, GPUP_STATUS_PROTOCOL_ERROR);
  // Garbage: dropped, connection kept.
  std::vector<uint8_t> junk(100, 0xab);
  EXPECT_TRUE(a_.p->handle(junk).ok());
  // Unknown adapter LUID.
  auto r = call(a_, CreateDeviceRequest{kLuid + 1, 0, 0});
  EXPECT_EQ(r.header.status, GPUP_STATUS_NOT_FOUND);
  // A second Hello.
  r = call(a_, HelloRequest{1, 1, 0, 1, "x"});
  EXPECT_EQ(r.header.status, GPUP_STATUS_PROTOCOL_ERROR);
  Counts after = totals();
  EXPECT_EQ(after.devices, base.devices);
  EXPECT_EQ(after.vram_used, base.vram_used);
}

TEST_F(WorkerTest, VersionMismatchIsRefusedClearly) {
  Proc pr;
  pr.out = std::make_shared<FakeLink::Shared>();
  pr.p = worker_->connect(std::make_unique<FakeLink>(pr.out));
  HelloRequest h{kVersion + 5, kVersion + 9, 0, 1, "future"};
  auto enc = encode_request(h, 1);
  auto bytes = enc->flatten();
  EXPECT_FALSE(pr.p->handle(bytes).ok());
  auto r = last_reply(pr, 1);
  EXPECT_EQ(r.header.status, GPUP_STATUS_VERSION_MISMATCH);
  EXPECT_NE(r.text().find("versions"), std::string::npos) << r.text();
}

TEST_F(WorkerTest, SecureVmPassesOnlyDriverKnownEscapes) {
  worker_->stop();
  WorkerConfig c = worker_->config();
  c.secure = true;
  worker_ = std::make_unique<Worker>(c);
  ASSERT_TRUE(worker_->start().ok());
  Proc p = open_process();
  GPUP_OCL_PRIVATE_HEADER hdr{GPUP_OCL_ESCAPE_MAGIC, GPUP_OCL_ESCAPE_CHECKSUM};
  std::vector<uint8_t> tail(reinterpret_cast<uint8_t*>(&hdr), reinterpret_cast<uint8_t*>(&hdr) + sizeof hdr);
  auto r = call(p, EscapeRequest{kLuid, 0, 0, 64, 0}, tail);
  EXPECT_EQ(r.header.status, GPUP_STATUS_ACCESS_DENIED) << r.text();
  EXPECT_NE(r.text().find("secure"), std::string::npos);
}

}  // namespace
}  // namespace gpup::vmwp
