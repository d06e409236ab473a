// Worker core tests: handle tables, GPU VA spaces, and the dispatch path driven in-process with
// the mock KMD through a fake link (no processes, no channel); the worker's sandbox policy in a
// forked child.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <seccomp.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <pthread.h>
#include <thread>

#include <cstdlib>
#include <fstream>
#include <mutex>
#include <set>

#include <fmt/format.h>

#include "gpup/kmd_opencl.h"
#include "gpup/kmt.h"
#include "host/vmwp/seccomp_policy.h"
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
    std::map<uint64_t, UniqueFd> incoming;  // fds "passed" by the guest, by id
    bool shares_memory = true;
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
  gpup_status receive_fd(uint64_t id, UniqueFd& out, int) override {
    std::lock_guard l(s_->mu);
    auto it = s_->incoming.find(id);
    if (it == s_->incoming.end()) return GPUP_STATUS_TIMEOUT;
    out = std::move(it->second);
    s_->incoming.erase(it);
    return GPUP_STATUS_SUCCESS;
  }
  bool shares_memory() const override { return s_->shares_memory; }

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
    configure(c);
    worker_ = std::make_unique<Worker>(c);
    before_start(*worker_);
    auto s = worker_->start();
    ASSERT_TRUE(s.ok()) << s.error().describe();
    a_ = open_process();
    b_ = open_process();
  }
  void TearDown() override {
    if (worker_) worker_->stop();
  }
  // Derived fixtures adjust the configuration, and the worker before it starts.
  virtual void configure(WorkerConfig&) {}
  virtual void before_start(Worker&) {}

  struct Proc {
    std::shared_ptr<GuestProcess> p;
    std::shared_ptr<FakeLink::Shared> out;
    uint64_t txn = 1;
    uint64_t fence_section = 0;  // Hello's: the fence page's fd is out->fds[fence_section]
  };

  Proc open_process() {
    Proc pr;
    pr.out = std::make_shared<FakeLink::Shared>();
    pr.p = worker_->connect(std::make_unique<FakeLink>(pr.out));
    HelloRequest h{1, kVersion, 0, 42, "unit"};
    auto r = call(pr, h);
    EXPECT_EQ(r.header.status, GPUP_STATUS_SUCCESS);
    pr.fence_section = r.as<HelloReply>().fence_section;
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

  // A guest section: a memfd of `size` bytes with `seals`, handed to the link as fd `id`.
  static UniqueFd make_memfd(const char* name, uint64_t size, int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL,
                             unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING) {
    UniqueFd fd(memfd_create(name, flags));
    EXPECT_TRUE(fd);
    EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(size)), 0);
    if (seals) {
      EXPECT_EQ(fcntl(fd.get(), F_ADD_SEALS, seals), 0) << std::strerror(errno);
    }
    return fd;
  }
  uint64_t next_fd_id_ = 1;
  Reply register_fd(Proc& pr, UniqueFd fd, uint64_t size) {
    const uint64_t id = next_fd_id_++;
    {
      std::lock_guard l(pr.out->mu);
      pr.out->incoming[id] = std::move(fd);
    }
    return call(pr, RegisterSectionRequest{id, size});
  }
  // Registers a sealed section and maps the guest's view of it.
  struct GuestSection {
    uint32_t handle = 0;
    uint8_t* map = nullptr;
    uint64_t size = 0;
  };
  GuestSection section(Proc& pr, uint64_t size, const char* name = "gpup-unit-section") {
    GuestSection g;
    UniqueFd fd = make_memfd(name, size);
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    EXPECT_NE(p, MAP_FAILED);
    g.map = static_cast<uint8_t*>(p);
    g.size = size;
    auto r = register_fd(pr, std::move(fd), size);
    EXPECT_EQ(r.header.status, 0) << r.text();
    g.handle = r.as<RegisterSectionReply>().section;
    guest_maps_.push_back({g.map, size});
    return g;
  }
  ~WorkerTest() override {
    for (auto& [p, n] : guest_maps_) munmap(p, n);
  }
  std::vector<std::pair<uint8_t*, uint64_t>> guest_maps_;

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

// --- guest-owned sections ---------------------------------------------------------------------

uint64_t fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = GPUP_OCL_FNV1A64_OFFSET;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * GPUP_OCL_FNV1A64_PRIME;
  return h;
}

bool maps_contain(const std::string& name) {
  std::ifstream f("/proc/self/maps");
  std::string line;
  while (std::getline(f, line))
    if (line.find(name) != std::string::npos) return true;
  return false;
}

TEST_F(WorkerTest, EscapeWithPrivateDataAndOutputInASection) {
  auto sec = section(a_, 2 << 20);
  GPUP_OCL_PRIVATE_HEADER hdr{GPUP_OCL_ESCAPE_MAGIC, GPUP_OCL_ESCAPE_CHECKSUM};
  const size_t payload = 1 << 20;
  std::memcpy(sec.map, &hdr, sizeof hdr);
  for (size_t i = 0; i < payload; ++i) sec.map[sizeof hdr + i] = static_cast<uint8_t>(i * 131 + 5);
  const uint64_t want = fnv1a(sec.map + sizeof hdr, payload);
  const uint64_t out_off = 1536 << 10;
  std::memset(sec.map + out_off, 0xcc, 64);
  EscapeRequest req{kLuid, 0, 0, 0, 0};
  req.private_data = {sec.handle, static_cast<uint32_t>(sizeof hdr + payload), 0};
  req.output = {sec.handle, 200 << 10, out_off};
  auto r = call(a_, req);
  ASSERT_EQ(r.header.status, 0) << r.text();
  EXPECT_TRUE(r.tail.empty());
  ASSERT_EQ(r.as<EscapeReply>().written, sizeof(GPUP_OCL_ESCAPE_CHECKSUM_OUT));
  GPUP_OCL_ESCAPE_CHECKSUM_OUT out;
  std::memcpy(&out, sec.map + out_off, sizeof out);
  EXPECT_EQ(out.ByteCount, payload);
  EXPECT_EQ(out.Fnv1a64, want);
  EXPECT_EQ(sec.map[out_off + sizeof out], 0xcc) << "bytes past `written` were changed";
  auto c = totals();
  EXPECT_EQ(c.sections, 2u - 1u);  // a's one section
  EXPECT_EQ(c.section_bytes, 2u << 20);
}

TEST_F(WorkerTest, SectionReferencesAreValidated) {
  auto sec = section(a_, 64 << 10);
  for (int i = 0; i < 8; ++i) create_device(b_);  // b's section handle: beyond anything a is issued
  auto sec_b = section(b_, 64 << 10);
  const uint32_t dev = create_device(a_);
  GPUP_OCL_PRIVATE_HEADER hdr{GPUP_OCL_ESCAPE_MAGIC, GPUP_OCL_ESCAPE_CHECKSUM};
  std::memcpy(sec.map, &hdr, sizeof hdr);
  const Counts base = totals();
  auto escape = [&](SectionRef priv, SectionRef out, uint32_t inline_out = 0, std::span<const uint8_t> tail = {}) {
    EscapeRequest req{kLuid, 0, 0, inline_out, 0};
    req.private_data = priv;
    req.output = out;
    return call(a_, req, tail);
  };
  const SectionRef ok_out{sec.handle, 64, 4096};
  // Forged, foreign (b's handle), wrong type (a device), each with a message naming the field.
  auto r = escape({0x7fff0000u, 8, 0}, ok_out);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_HANDLE);
  EXPECT_NE(r.text().find("private data"), std::string::npos) << r.text();
  r = escape({sec_b.handle, 8, 0}, ok_out);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_HANDLE) << r.text();
  EXPECT_NE(r.text().find("never issued"), std::string::npos) << r.text();
  r = escape({dev, 8, 0}, ok_out);
  EXPECT_EQ(r.header.status, GPUP_STATUS_OBJECT_TYPE_MISMATCH) << r.text();
  r = escape({sec.handle, 8, 0}, {dev, 64, 0});
  EXPECT_EQ(r.header.status, GPUP_STATUS_OBJECT_TYPE_MISMATCH);
  EXPECT_NE(r.text().find("output"), std::string::npos) << r.text();
  // Offset + size overflowing, and beyond the section.
  r = escape({sec.handle, 16, UINT64_MAX - 8}, ok_out);
  EXPECT_EQ(r.header.status, GPUP_STATUS_OUT_OF_RANGE) << r.text();
  r = escape({sec.handle, 8, 0}, {sec.handle, 64, UINT64_MAX - 8});
  EXPECT_EQ(r.header.status, GPUP_STATUS_OUT_OF_RANGE) << r.text();
  r = escape({sec.handle, (64 << 10) + 1, 0}, ok_out);
  EXPECT_EQ(r.header.status, GPUP_STATUS_OUT_OF_RANGE);
  EXPECT_NE(r.text().find("outside section"), std::string::npos) << r.text();
  r = escape({sec.handle, 8, 0}, {sec.handle, 4096, (60 << 10) + 1});
  EXPECT_EQ(r.header.status, GPUP_STATUS_OUT_OF_RANGE) << r.text();
  // Zero-byte references, references without a section, data both inline and in a section.
  r = escape({sec.handle, 0, 0}, ok_out);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
  r = escape({0, 8, 0}, ok_out);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
  r = escape({sec.handle, 8, 0}, {0, 0, 64});
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
  const uint8_t inl[8] = {};
  r = escape({sec.handle, 8, 0}, ok_out, 0, inl);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(r.text().find("both inline"), std::string::npos) << r.text();
  r = escape({sec.handle, 8, 0}, ok_out, 64);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
  // An inline output capacity beyond 64 KiB needs a section.
  r = escape({sec.handle, 8, 0}, {}, (64 << 10) + 1);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
  // Stale: unregistered, then used.
  auto doomed = section(a_, 4096);
  ASSERT_EQ(call(a_, UnregisterSectionRequest{doomed.handle, 0}).header.status, 0);
  r = escape({doomed.handle, 8, 0}, ok_out);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_HANDLE);
  EXPECT_NE(r.text().find("stale"), std::string::npos) << r.text();
  EXPECT_EQ(call(a_, UnregisterSectionRequest{doomed.handle, 0}).header.status, GPUP_STATUS_INVALID_HANDLE);
  EXPECT_EQ(call(a_, UnregisterSectionRequest{dev, 0}).header.status, GPUP_STATUS_OBJECT_TYPE_MISMATCH);
  // A CreateAllocation with a bad reference creates nothing.
  CreateAllocationRequest ca{dev, GPUPKMT_ALLOCATION_CPU_VISIBLE, 4096, 0, 0};
  ca.private_data = {sec.handle, 16, (64 << 10) - 8};
  r = call(a_, ca);
  EXPECT_EQ(r.header.status, GPUP_STATUS_OUT_OF_RANGE) << r.text();
  ca.private_data = {};
  ca.output = {sec_b.handle, 16, 0};
  r = call(a_, ca);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_HANDLE) << "b's section: " << r.text();
  const Counts after = totals();
  EXPECT_EQ(after.allocations, base.allocations);
  EXPECT_EQ(after.vram_used, base.vram_used);
  // The good reference still works after all that.
  r = escape({sec.handle, 8, 0}, ok_out);
  EXPECT_EQ(r.header.status, 0) << r.text();
  EXPECT_EQ(r.as<EscapeReply>().written, sizeof(GPUP_OCL_ESCAPE_CHECKSUM_OUT));
}

TEST_F(WorkerTest, OnlySealedMemfdsOfTheDeclaredSizeAreRegistered) {
  const Counts base = totals();
  // Not sealed at all.
  auto r = register_fd(a_, make_memfd("unsealed", 4096, 0), 4096);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(r.text().find("not sealed"), std::string::npos) << r.text();
  // Sealed against shrinking only: it could still grow, and the seals could change.
  r = register_fd(a_, make_memfd("shrink-only", 4096, F_SEAL_SHRINK), 4096);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(r.text().find("F_SEAL_GROW"), std::string::npos) << r.text();
  // Created without MFD_ALLOW_SEALING: it can carry no seals.
  r = register_fd(a_, make_memfd("no-sealing", 4096, 0, MFD_CLOEXEC), 4096);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
  // Sealed, but not the size the request declares.
  r = register_fd(a_, make_memfd("short", 4096), 8192);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(r.text().find("4096 bytes"), std::string::npos) << r.text();
  // Not a memfd: a pipe.
  int p[2];
  ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
  close(p[1]);
  r = register_fd(a_, UniqueFd(p[0]), 4096);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(r.text().find("not a memfd"), std::string::npos) << r.text();
  // Read-only fd of a sealed memfd: the host must be able to write output.
  {
    UniqueFd fd = make_memfd("readonly", 4096);
    UniqueFd ro(open(("/proc/self/fd/" + std::to_string(fd.get())).c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(ro);
    r = register_fd(a_, std::move(ro), 4096);
    EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
  }
  // Write-sealed.
  r = register_fd(a_, make_memfd("write-sealed", 4096, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL | F_SEAL_WRITE), 4096);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(r.text().find("writing"), std::string::npos) << r.text();
  // No fd passed with the id.
  r = call(a_, RegisterSectionRequest{999, 4096});
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_NE(r.text().find("id 999"), std::string::npos) << r.text();
  // Size 0, and one larger than a process may have.
  r = register_fd(a_, make_memfd("zero", 0), 0);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
  EXPECT_EQ(totals().sections, base.sections);
  // A stream channel has no sections.
  a_.out->shares_memory = false;
  r = call(a_, RegisterSectionRequest{1000, 4096});
  EXPECT_EQ(r.header.status, GPUP_STATUS_NOT_SUPPORTED) << r.text();
  a_.out->shares_memory = true;
  // And after all that, a proper one registers.
  r = register_fd(a_, make_memfd("proper", 4096), 4096);
  EXPECT_EQ(r.header.status, 0) << r.text();
  EXPECT_EQ(totals().sections, base.sections + 1);
}

TEST_F(WorkerTest, SectionCountAndBytesAreLimitedPerProcess) {
  std::vector<uint32_t> handles;
  for (uint32_t i = 0; i < kMaxSections; ++i) {
    auto r = register_fd(a_, make_memfd("many", 4096), 4096);
    ASSERT_EQ(r.header.status, 0) << i << ": " << r.text();
    handles.push_back(r.as<RegisterSectionReply>().section);
  }
  auto r = register_fd(a_, make_memfd("one-too-many", 4096), 4096);
  EXPECT_EQ(r.header.status, GPUP_STATUS_QUOTA_EXCEEDED);
  EXPECT_NE(r.text().find("64 sections"), std::string::npos) << r.text();
  // Another process is not affected.
  EXPECT_EQ(register_fd(b_, make_memfd("b", 4096), 4096).header.status, 0);
  // Unregistering makes room again.
  ASSERT_EQ(call(a_, UnregisterSectionRequest{handles.back(), 0}).header.status, 0);
  EXPECT_EQ(register_fd(a_, make_memfd("room", 4096), 4096).header.status, 0);
  for (auto h : handles) call(a_, UnregisterSectionRequest{h, 0});

  // Bytes: 200 MiB, then 100 MiB more would pass 256 MiB. (Sparse memfds: nothing is touched.)
  r = register_fd(b_, make_memfd("big", 200 << 20), 200 << 20);
  ASSERT_EQ(r.header.status, 0) << r.text();
  r = register_fd(b_, make_memfd("too-much", 100 << 20), 100 << 20);
  EXPECT_EQ(r.header.status, GPUP_STATUS_QUOTA_EXCEEDED);
  EXPECT_NE(r.text().find("above the limit"), std::string::npos) << r.text();
  r = register_fd(b_, make_memfd("huge", kMaxSectionBytes + 4096), kMaxSectionBytes + 4096);
  EXPECT_EQ(r.header.status, GPUP_STATUS_INVALID_PARAMETER) << r.text();
}

TEST_F(WorkerTest, SectionsAreUnmappedWhenTheProcessGoes) {
  const std::string name = "gpup-unit-released-" + std::to_string(getpid());
  auto sec = section(a_, 1 << 20, name.c_str());
  ASSERT_NE(sec.handle, 0u);
  // The guest's own mapping is one; the worker's is the other.
  auto count = [&] {
    std::ifstream f("/proc/self/maps");
    std::string line;
    int n = 0;
    while (std::getline(f, line))
      if (line.find(name) != std::string::npos) ++n;
    return n;
  };
  EXPECT_EQ(count(), 2);
  EXPECT_EQ(totals().sections, 1u);
  worker_->disconnect(a_.p);
  EXPECT_EQ(count(), 1) << "the worker still maps the section of a closed process";
  EXPECT_EQ(totals().sections, 0u);
  // UnregisterSection unmaps at once too.
  const std::string name2 = name + "-unreg";
  auto sec2 = section(b_, 4096, name2.c_str());
  EXPECT_TRUE(maps_contain(name2));
  ASSERT_EQ(call(b_, UnregisterSectionRequest{sec2.handle, 0}).header.status, 0);
  munmap(sec2.map, sec2.size);
  guest_maps_.pop_back();
  EXPECT_FALSE(maps_contain(name2));
}

TEST_F(WorkerTest, ProgramSourceAndBuildOutputThroughASection) {
  const uint32_t dev = create_device(a_);
  auto sec = section(a_, 1 << 20);
  // The mock KMD's program format: a GPUP_OCL_PROGRAM_DESC and source text naming mock kernels.
  std::string source = "__kernel void add_i32(__global int* b, int v) { b[get_global_id(0)] += v; }\n";
  source += "/*" + std::string(300 << 10, '*') + "*/\n";
  GPUP_OCL_PROGRAM_DESC d{GPUP_OCL_PROGRAM_MAGIC, GPUP_OCL_PROGRAM_VERSION, GPUP_OCL_PROGRAM_SOURCE, 0,
                          static_cast<uint32_t>(source.size()), 0};
  std::memcpy(sec.map, &d, sizeof d);
  std::memcpy(sec.map + sizeof d, source.data(), source.size());
  const uint64_t out_off = 512 << 10;
  CreateAllocationRequest ca{dev, GPUPKMT_ALLOCATION_PROGRAM, 0, 0, 0};
  ca.private_data = {sec.handle, static_cast<uint32_t>(sizeof d + source.size()), 0};
  ca.output = {sec.handle, 256 << 10, out_off};
  auto r = call(a_, ca);
  ASSERT_EQ(r.header.status, 0) << r.text();
  const auto rep = r.as<CreateAllocationReply>();
  EXPECT_NE(rep.allocation, 0u);
  EXPECT_TRUE(r.tail.empty());
  ASSERT_GE(rep.written, sizeof(GPUP_OCL_BUILD_RESULT));
  GPUP_OCL_BUILD_RESULT br;
  std::memcpy(&br, sec.map + out_off, sizeof br);
  EXPECT_EQ(br.BuildError, 0);
  EXPECT_EQ(totals().allocations, 1u);

  // A failed build: status SUCCESS, no allocation, KMD status BUILD_FAILED, the log in the section.
  source = "__kernel void no_such_kernel(__global int* b) {}\n" + std::string(200 << 10, ' ');
  d.ContentSize = static_cast<uint32_t>(source.size());
  std::memcpy(sec.map, &d, sizeof d);
  std::memcpy(sec.map + sizeof d, source.data(), source.size());
  std::memset(sec.map + out_off, 0, 256 << 10);
  ca.private_data.size = static_cast<uint32_t>(sizeof d + source.size());
  r = call(a_, ca);
  ASSERT_EQ(r.header.status, 0) << r.text();
  const auto failed = r.as<CreateAllocationReply>();
  EXPECT_EQ(failed.allocation, 0u);
  EXPECT_EQ(failed.kmd_status, GPUP_STATUS_BUILD_FAILED);
  ASSERT_GE(failed.written, sizeof(GPUP_OCL_BUILD_RESULT));
  std::memcpy(&br, sec.map + out_off, sizeof br);
  EXPECT_NE(br.BuildError, 0);
  EXPECT_GT(br.LogBytes, 0u);
  const std::string log(reinterpret_cast<const char*>(sec.map + out_off + sizeof br), br.LogBytes);
  EXPECT_NE(log.find("no_such_kernel"), std::string::npos) << log;
  EXPECT_EQ(totals().allocations, 1u);
}

// --- device time (gpupd's grants, gpupd/vidsch.h) and the TDR watchdog ------------------------

using namespace std::chrono_literals;

// Polls pred every millisecond until it holds or timeout passes; returns whether it held.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= until) return pred();
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// gpupd's side of the device-time lines, recorded. The worker calls it with Worker::mu_ held; the
// test only reads what it recorded and never calls the worker from here.
class FakeTimeLink : public DeviceTimeLink {
 public:
  using Clock = std::chrono::steady_clock;
  struct Release {
    uint64_t busy_us = 0;
    bool more = false;
    Clock::time_point at;
  };
  struct Reset {
    nlohmann::json what;
    Clock::time_point at;
    std::thread::id thread;
  };

  void want() override {
    std::lock_guard l(mu_);
    ++wants_;
    cv_.notify_all();
  }
  void release(uint64_t busy_us, bool more) override {
    std::lock_guard l(mu_);
    releases_.push_back({busy_us, more, Clock::now()});
    cv_.notify_all();
  }
  // The real link ends the process here (main.cpp). This one records the call and then ends only
  // the calling thread (the TDR watchdog's). It may not return: reset() is [[noreturn]], so the
  // worker's code after the call (Worker::on_hang) may not exist, and returning would be undefined
  // behaviour. pthread_exit unwinds the thread's stack, so Worker::on_hang's lock on Worker::mu_
  // is released, and the watchdog's thread is gone, as TdrWatchdog's destructor expects to join.
  [[noreturn]] void reset(const nlohmann::json& what) override {
    {
      std::lock_guard l(mu_);
      resets_.push_back({what, Clock::now(), std::this_thread::get_id()});
      cv_.notify_all();
    }
    pthread_exit(nullptr);
  }

  int wants() {
    std::lock_guard l(mu_);
    return wants_;
  }
  std::vector<Release> releases() {
    std::lock_guard l(mu_);
    return releases_;
  }
  std::vector<Reset> resets() {
    std::lock_guard l(mu_);
    return resets_;
  }
  bool wait_for_releases(size_t n, std::chrono::milliseconds timeout) {
    std::unique_lock l(mu_);
    return cv_.wait_for(l, timeout, [&] { return releases_.size() >= n; });
  }
  bool wait_for_resets(size_t n, std::chrono::milliseconds timeout) {
    std::unique_lock l(mu_);
    return cv_.wait_for(l, timeout, [&] { return resets_.size() >= n; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int wants_ = 0;
  std::vector<Release> releases_;
  std::vector<Reset> resets_;
};

// The worker with a device-time link (gpupd's scheduler, faked): nothing enters the KMD without a
// grant. Helpers to run real work on the mock KMD and to see when it ran.
class DeviceTimeTest : public WorkerTest {
 protected:
  void before_start(Worker& w) override { w.set_device_time_link(&link_); }
  void TearDown() override {
    WorkerTest::TearDown();
    worker_.reset();  // before link_ goes
  }

  uint32_t create_context(Proc& pr, uint32_t dev, int32_t priority = 0) {
    auto r = call(pr, CreateContextRequest{dev, 0, priority, 0});
    EXPECT_EQ(r.header.status, 0) << r.text();
    return r.as<CreateContextReply>().context;
  }
  struct Fence {
    uint32_t sync = 0, slot = 0;
  };
  Fence create_fence(Proc& pr, uint32_t dev) {
    auto r = call(pr, CreateSyncObjectRequest{dev, GPUPKMT_SYNCOBJECT_MONITORED_FENCE, 0});
    EXPECT_EQ(r.header.status, 0) << r.text();
    return {r.as<CreateSyncObjectReply>().sync_object, r.as<CreateSyncObjectReply>().fence_slot};
  }
  // The value the guest reads in its fence page.
  uint64_t fence_value(Proc& pr, const Fence& f) {
    int fd = -1;
    {
      std::lock_guard l(pr.out->mu);
      auto it = pr.out->fds.find(pr.fence_section);
      if (it != pr.out->fds.end()) fd = it->second;
    }
    if (fd < 0) {
      ADD_FAILURE() << "no fence page";
      return 0;
    }
    const size_t size = sizeof(FencePageHeader) + sizeof(uint64_t) * FencePage::kSlots;
    void* m = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
      ADD_FAILURE() << "mmap of the fence page: " << std::strerror(errno);
      return 0;
    }
    const auto* values = reinterpret_cast<const uint64_t*>(static_cast<const uint8_t*>(m) + sizeof(FencePageHeader));
    const uint64_t v = __atomic_load_n(&values[f.slot], __ATOMIC_ACQUIRE);
    munmap(m, size);
    return v;
  }
  // A CPU-visible allocation mapped read/write at a GPU VA of its own.
  struct Buffer {
    uint32_t alloc = 0;
    uint64_t va = 0;
  };
  Buffer mapped(Proc& pr, uint32_t dev, uint64_t size) {
    Buffer b;
    b.alloc = create_alloc(pr, dev, size);
    b.va = call(pr, ReserveGpuVaRequest{0, size}).as<ReserveGpuVaReply>().va;
    auto r = call(pr, MapGpuVaRequest{b.alloc, GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE, b.va, 0, size});
    EXPECT_EQ(r.header.status, 0) << r.text();
    return b;
  }
  uint32_t read_u32(Proc& pr, const Buffer& b, uint64_t offset) {
    auto r = call(pr, ReadAllocationRequest{b.alloc, 4, offset});
    EXPECT_EQ(r.header.status, 0) << r.text();
    uint32_t v = 0;
    if (r.tail.size() == sizeof v) std::memcpy(&v, r.tail.data(), sizeof v);
    return v;
  }
  void submit_fill(Proc& pr, uint32_t ctx, const Buffer& b, uint64_t size, uint32_t pattern, uint64_t id) {
    CommandWriter w;
    w.fill(b.va, size, &pattern, sizeof pattern);
    send_async(pr, SubmitCommandRequest{ctx, 0, id}, w.bytes());
  }
  // A probe: a submission the worker accepts and the mock KMD refuses in pfnSubmitCommand (a copy
  // within one allocation whose ranges overlap). The moment it enters the KMD, the guest gets a
  // ContextError for it (the context faults): that shows whether, and in which order, work was
  // handed to the KMD. (b must be at least 192 bytes.)
  void submit_probe(Proc& pr, uint32_t ctx, const Buffer& b, uint64_t id) {
    CommandWriter w;
    w.copy(b.va, b.va + 64, 128);
    send_async(pr, SubmitCommandRequest{ctx, 0, id}, w.bytes());
  }
  void signal(Proc& pr, uint32_t ctx, const Fence& f, uint64_t value) {
    send_async(pr, SignalFromGpuRequest{ctx, f.sync, value});
  }
  // A program with the mock's spin kernel (mock_kernels.h).
  uint32_t build_spin_program(Proc& pr, uint32_t dev) {
    const std::string src = "__kernel void spin(__global ulong* out, ulong iterations) {}\n";
    GPUP_OCL_PROGRAM_DESC d{GPUP_OCL_PROGRAM_MAGIC, GPUP_OCL_PROGRAM_VERSION, GPUP_OCL_PROGRAM_SOURCE, 0,
                            static_cast<uint32_t>(src.size()), 0};
    std::vector<uint8_t> tail(sizeof d + src.size());
    std::memcpy(tail.data(), &d, sizeof d);
    std::memcpy(tail.data() + sizeof d, src.data(), src.size());
    auto r = call(pr, CreateAllocationRequest{dev, GPUPKMT_ALLOCATION_PROGRAM, 0, 4096, 0}, tail);
    EXPECT_EQ(r.header.status, 0) << r.text();
    EXPECT_NE(r.as<CreateAllocationReply>().allocation, 0u) << r.text();
    return r.as<CreateAllocationReply>().allocation;
  }
  // One work item of spin: `iterations` dependent multiply-adds, on the mock context's thread.
  void submit_spin(Proc& pr, uint32_t ctx, uint32_t program, const Buffer& out, uint64_t iterations, uint64_t id) {
    CommandWriter w;
    const uint64_t global[3] = {1, 1, 1};
    const CommandWriter::Arg args[2] = {{GPUPDDI_ARG_BUFFER, 0, out.va, 8, nullptr},
                                        {GPUPDDI_ARG_VALUE, 8, 0, 0, &iterations}};
    ASSERT_TRUE(w.dispatch(program, "spin", 1, nullptr, global, nullptr, args).ok());
    send_async(pr, SubmitCommandRequest{ctx, 0, id}, w.bytes());
  }
  std::vector<DeviceStateChangedRequest> device_states(Proc& pr) {
    std::vector<DeviceStateChangedRequest> v;
    std::lock_guard l(pr.out->mu);
    for (auto& b : pr.out->messages) {
      auto m = decode(b, Direction::kHostToGuest);
      if (m.ok() && m->op() == Op::DeviceStateChanged) v.push_back(m->as<DeviceStateChangedRequest>());
    }
    return v;
  }
  uint64_t stat(const char* name) { return worker_->stats_json().at(name).get<uint64_t>(); }

  // Work that is surely still running a few milliseconds after it was handed to the KMD: each
  // spin iteration is a dependent 64-bit multiply and add, at least ~4 cycles (>= 0.6 ns even at
  // 6 GHz), so this is >= 120 ms on any machine (several hundred ms on a slow or loaded one).
  static constexpr uint64_t kShortSpin = 200'000'000;

  FakeTimeLink link_;
};

TEST_F(DeviceTimeTest, WithoutAGrantNothingEntersTheKmdAndOneWantIsSent) {
  const uint32_t dev = create_device(a_);
  const Buffer buf = mapped(a_, dev, 4096);
  const uint32_t ctx = create_context(a_, dev);
  const Fence f = create_fence(a_, dev);
  const uint32_t dev_b = create_device(b_);
  const Buffer buf_b = mapped(b_, dev_b, 4096);
  const uint32_t probe = create_context(b_, dev_b);
  EXPECT_EQ(link_.wants(), 0) << "a want before there was work";

  submit_fill(a_, ctx, buf, 4096, 0x5a5a5a5a, 1);
  signal(a_, ctx, f, 1);
  EXPECT_EQ(link_.wants(), 1);
  // More work, in this process and in another one: still the one want.
  submit_fill(a_, ctx, buf, 4096, 0xa5a5a5a5, 2);
  signal(a_, ctx, f, 2);
  submit_probe(b_, probe, buf_b, 3);
  EXPECT_TRUE(context_errors(b_).empty()) << "the probe reached the KMD without a grant";
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(fence_value(a_, f), 0u);
  EXPECT_EQ(read_u32(a_, buf, 0), 0u) << "the fill ran without a grant";
  EXPECT_EQ(link_.wants(), 1);
  EXPECT_TRUE(link_.releases().empty());

  worker_->on_grant();
  // Everything waiting was handed to the KMD by on_grant itself: the probe's refusal is there.
  auto errs = context_errors(b_);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].first.context, probe);
  EXPECT_EQ(errs[0].first.submission_id, 3u);
  ASSERT_TRUE(eventually([&] { return fence_value(a_, f) == 2; }, 10s)) << "fence " << fence_value(a_, f);
  EXPECT_EQ(read_u32(a_, buf, 0), 0xa5a5a5a5u);
  EXPECT_EQ(read_u32(a_, buf, 4092), 0xa5a5a5a5u);
  EXPECT_TRUE(context_errors(a_).empty());
  // No yield: the holder keeps the device, and wants nothing more.
  EXPECT_EQ(link_.wants(), 1);
  EXPECT_TRUE(link_.releases().empty());
  EXPECT_EQ(stat("device_grants"), 1u);
  EXPECT_GT(stat("device_busy_ns"), 0u);
  // A second grant while holding changes nothing.
  worker_->on_grant();
  EXPECT_EQ(stat("device_grants"), 1u);
}

TEST_F(DeviceTimeTest, YieldStopsNewWorkAndReleasesWithMoreOnceTheWorkInFlightIsDone) {
  const uint32_t dev = create_device(a_);
  const uint32_t prog = build_spin_program(a_, dev);
  const Buffer out = mapped(a_, dev, 4096);
  const uint32_t ctx = create_context(a_, dev);
  const Fence f = create_fence(a_, dev);
  const uint32_t dev_b = create_device(b_);
  const Buffer buf_b = mapped(b_, dev_b, 4096);
  const uint32_t probe = create_context(b_, dev_b);
  worker_->on_grant();  // granted before it wanted: it just holds the device

  const auto t0 = std::chrono::steady_clock::now();
  submit_spin(a_, ctx, prog, out, kShortSpin, 1);
  signal(a_, ctx, f, 1);
  worker_->on_yield(0us, false);  // due at once: the deadline is the grant
  EXPECT_TRUE(link_.releases().empty()) << "released with work in flight";
  // New work, here from another process, does not enter the KMD any more.
  submit_probe(b_, probe, buf_b, 2);
  EXPECT_TRUE(context_errors(b_).empty()) << "the probe entered the KMD after the yield";
  EXPECT_TRUE(link_.releases().empty()) << "released with work in flight";

  ASSERT_TRUE(link_.wait_for_releases(1, 30s));
  const auto rel = link_.releases();
  ASSERT_EQ(rel.size(), 1u);
  EXPECT_TRUE(rel[0].more) << "the probe still waits";
  EXPECT_GT(rel[0].busy_us, 0u);
  EXPECT_GE(rel[0].busy_us, 50'000u) << "the spin ran >= 120 ms";
  EXPECT_LE(rel[0].busy_us, static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(rel[0].at - t0).count()));
  ASSERT_TRUE(eventually([&] { return fence_value(a_, f) == 1; }, 10s));
  std::cout << "[ spin     ] " << kShortSpin << " iterations: "
            << std::chrono::duration_cast<std::chrono::milliseconds>(rel[0].at - t0).count() << " ms\n";
  // "more" counts as a want at gpupd: no separate want, and the probe waits for the next grant.
  std::this_thread::sleep_for(20ms);
  EXPECT_TRUE(context_errors(b_).empty());
  EXPECT_EQ(link_.wants(), 0);
  worker_->on_grant();
  auto errs = context_errors(b_);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].first.context, probe);
  EXPECT_EQ(stat("device_grants"), 2u);
  EXPECT_EQ(link_.releases().size(), 1u);
}

TEST_F(DeviceTimeTest, YieldWithNothingQueuedReleasesWithoutMore) {
  const uint32_t dev = create_device(a_);
  const uint32_t prog = build_spin_program(a_, dev);
  const Buffer out = mapped(a_, dev, 4096);
  const uint32_t ctx = create_context(a_, dev);
  worker_->on_grant();
  submit_spin(a_, ctx, prog, out, kShortSpin, 1);
  worker_->on_yield(0us, false);
  worker_->on_yield(60s, false);  // the smallest deadline counts
  EXPECT_TRUE(link_.releases().empty()) << "released with work in flight";
  ASSERT_TRUE(link_.wait_for_releases(1, 30s));
  const auto rel = link_.releases();
  ASSERT_EQ(rel.size(), 1u);
  EXPECT_FALSE(rel[0].more);
  EXPECT_GE(rel[0].busy_us, 50'000u);
  EXPECT_EQ(link_.wants(), 0);
  // A yield after the release (the lines crossed) is ignored.
  worker_->on_yield(0us, true);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(link_.releases().size(), 1u);
  // New work after the release: one want, and it waits for the grant.
  const Fence f = create_fence(a_, dev);
  submit_spin(a_, ctx, prog, out, 1000, 2);
  signal(a_, ctx, f, 1);
  EXPECT_EQ(link_.wants(), 1);
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(fence_value(a_, f), 0u);
  worker_->on_grant();
  EXPECT_TRUE(eventually([&] { return fence_value(a_, f) == 1; }, 10s));
}

TEST_F(DeviceTimeTest, IdleHolderAskedToYieldIfIdleReleasesAfterAShortGrace) {
  const uint32_t dev = create_device(a_);
  const Buffer buf = mapped(a_, dev, 4096);
  const uint32_t ctx = create_context(a_, dev);
  const Fence f = create_fence(a_, dev);
  worker_->on_grant();
  submit_fill(a_, ctx, buf, 4096, 7, 1);
  signal(a_, ctx, f, 1);
  ASSERT_TRUE(eventually([&] { return fence_value(a_, f) == 1; }, 10s));

  // Idle, asked to yield in a minute but not "if idle" (nobody else waits): it keeps the device.
  worker_->on_yield(60s, false);
  std::this_thread::sleep_for(100ms);
  EXPECT_TRUE(link_.releases().empty()) << "an idle holder gave the device back before its deadline";
  // Others wait now: it gives the device back once idle for its grace (0.5 to 5 ms, after its
  // guest's usual turnaround), not in a minute.
  const auto t0 = std::chrono::steady_clock::now();
  worker_->on_yield(60s, true);
  ASSERT_TRUE(link_.wait_for_releases(1, 5s)) << "an idle holder kept the device";
  const auto rel = link_.releases();
  ASSERT_EQ(rel.size(), 1u);
  EXPECT_GE(rel[0].at - t0, 500us) << "released without waiting for the guest's next work";
  EXPECT_LT(rel[0].at - t0, 2s);
  EXPECT_FALSE(rel[0].more);
  EXPECT_GT(rel[0].busy_us, 0u) << "the fill's device time";
  EXPECT_EQ(link_.wants(), 0);
}

TEST_F(DeviceTimeTest, IdleHolderKeepsTheDeviceForWorkThatComesWithinItsGrace) {
  // A guest that sends its next work right after the last completed keeps its turn (until its
  // deadline): the grace exists so a holder asked "if idle" is not released between two batches.
  const uint32_t dev = create_device(a_);
  const Buffer buf = mapped(a_, dev, 4096);
  const uint32_t ctx = create_context(a_, dev);
  const uint32_t prog = build_spin_program(a_, dev);
  worker_->on_grant();
  // Busy when the yield comes: no grace runs while work is in flight.
  submit_spin(a_, ctx, prog, buf, kShortSpin, 1);
  worker_->on_yield(60s, true);
  EXPECT_TRUE(link_.releases().empty());
  // More work while the first still runs: it enters (not due yet) and the holder stays busy.
  const Fence f = create_fence(a_, dev);
  submit_fill(a_, ctx, buf, 4096, 9, 2);
  signal(a_, ctx, f, 1);
  EXPECT_TRUE(link_.releases().empty());
  ASSERT_TRUE(link_.wait_for_releases(1, 30s));
  EXPECT_EQ(fence_value(a_, f), 1u) << "released before the fill ran";
  EXPECT_FALSE(link_.releases()[0].more);
}

TEST_F(DeviceTimeTest, HigherPriorityContextsEnterTheDeviceFirstOnAGrant) {
  const uint32_t dev = create_device(a_);
  const Buffer buf = mapped(a_, dev, 4096);
  // Created lowest first: creation order alone would hand them over lowest first.
  const uint32_t low = create_context(a_, dev, -2);
  const uint32_t mid = create_context(a_, dev, 0);
  const uint32_t high = create_context(a_, dev, 2);
  submit_probe(a_, low, buf, 1);
  submit_probe(a_, mid, buf, 2);
  submit_probe(a_, high, buf, 3);
  EXPECT_TRUE(context_errors(a_).empty()) << "a probe entered the KMD without a grant";
  EXPECT_EQ(link_.wants(), 1);
  worker_->on_grant();
  // The probes' refusals, in the order they were handed to the KMD.
  auto errs = context_errors(a_);
  ASSERT_EQ(errs.size(), 3u);
  EXPECT_EQ(errs[0].first.context, high);
  EXPECT_EQ(errs[0].first.submission_id, 3u);
  EXPECT_EQ(errs[1].first.context, mid);
  EXPECT_EQ(errs[2].first.context, low);
}

TEST_F(WorkerTest, WithoutADeviceTimeLinkWorkRunsAtOnce) {
  const uint32_t dev = create_device(a_);
  const uint64_t va = call(a_, ReserveGpuVaRequest{0, 4096}).as<ReserveGpuVaReply>().va;
  const uint32_t alloc = create_alloc(a_, dev, 4096);
  ASSERT_EQ(call(a_, MapGpuVaRequest{alloc, GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE, va, 0, 4096}).header.status, 0);
  const uint32_t ctx = call(a_, CreateContextRequest{dev, 0, 0, 0}).as<CreateContextReply>().context;
  // gpupd's lines mean nothing without a link.
  worker_->on_yield(0us, true);
  worker_->on_grant();
  CommandWriter w;
  w.copy(va, va + 64, 128);  // refused by the mock KMD: a ContextError as soon as it is handed over
  send_async(a_, SubmitCommandRequest{ctx, 0, 1}, w.bytes());
  EXPECT_EQ(context_errors(a_).size(), 1u);
  EXPECT_EQ(worker_->stats_json().at("device_grants").get<uint64_t>(), 0u);
}

// The TDR delay is short here; a submission that runs past it resets the partition.
class TdrTest : public DeviceTimeTest {
 protected:
  void configure(WorkerConfig& c) override { c.tdr_delay_ms = 200; }
  // Runs >= 600 ms on any machine (see kShortSpin): well past the delay. The mock KMD cannot take
  // work back except through pfnResetEngine, which the worker does not call, so TearDown (closing
  // the processes destroys the context) waits for it to end.
  static constexpr uint64_t kLongSpin = 1'000'000'000;
};

TEST_F(TdrTest, WorkRunningPastTheDelayResetsThePartitionAndEveryGuestIsTold) {
  const uint32_t dev = create_device(a_);
  const uint32_t prog = build_spin_program(a_, dev);
  const Buffer out = mapped(a_, dev, 4096);
  const uint32_t hung = create_context(a_, dev);
  const uint32_t sibling = create_context(a_, dev);  // same device, idle
  const uint32_t dev_b = create_device(b_);
  const uint32_t ctx_b = create_context(b_, dev_b);  // another process, idle
  worker_->on_grant();

  const auto t0 = std::chrono::steady_clock::now();
  submit_spin(a_, hung, prog, out, kLongSpin, 9);
  ASSERT_TRUE(link_.wait_for_resets(1, 10s)) << "no reset";
  const auto resets = link_.resets();
  ASSERT_EQ(resets.size(), 1u);
  const auto& what = resets[0].what;
  EXPECT_NE(resets[0].thread, std::this_thread::get_id());
  EXPECT_GE(resets[0].at - t0, 200ms) << "reset before the TDR delay: " << what.dump();
  EXPECT_LT(resets[0].at - t0, 200ms + 3s) << what.dump();
  EXPECT_EQ(what.value("context", 0u), hung) << what.dump();
  EXPECT_EQ(what.value("pid", 0u), 42u) << what.dump();
  EXPECT_EQ(what.value("process", ""), "unit") << what.dump();
  EXPECT_GE(what.value("running_ms", 0), 200) << what.dump();
  EXPECT_EQ(what.value("tdr_delay_ms", 0u), 200u) << what.dump();
  EXPECT_FALSE(what.contains("guests_told")) << what.dump();

  // The guilty process: every context of the guilty device, then the device removed.
  auto errs = context_errors(a_);
  ASSERT_EQ(errs.size(), 2u);
  std::set<uint32_t> told;
  for (auto& [e, text] : errs) {
    told.insert(e.context);
    EXPECT_EQ(e.status, GPUP_STATUS_CONTEXT_RESET_GUILTY);
    EXPECT_NE(text.find("TDR"), std::string::npos) << text;
  }
  EXPECT_EQ(told, (std::set<uint32_t>{hung, sibling}));
  auto states = device_states(a_);
  ASSERT_EQ(states.size(), 1u);
  EXPECT_EQ(states[0].device, dev);
  EXPECT_EQ(states[0].state, GPUPKMT_DEVICESTATE_REMOVED);
  EXPECT_EQ(states[0].reason, GPUP_STATUS_CONTEXT_RESET_GUILTY);
  EXPECT_GT(states[0].state_counter, 1u);
  // Another process: innocent, but its device is gone too (the whole partition is reset).
  errs = context_errors(b_);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].first.context, ctx_b);
  EXPECT_EQ(errs[0].first.status, GPUP_STATUS_CONTEXT_RESET_INNOCENT);
  states = device_states(b_);
  ASSERT_EQ(states.size(), 1u);
  EXPECT_EQ(states[0].device, dev_b);
  EXPECT_EQ(states[0].state, GPUPKMT_DEVICESTATE_REMOVED);
  EXPECT_EQ(states[0].reason, GPUP_STATUS_CONTEXT_RESET_INNOCENT);

  // What the guest reads later agrees (and the worker's lock was given back by on_hang).
  auto st = call(a_, GetDeviceStateRequest{dev, 0}).as<GetDeviceStateReply>();
  EXPECT_EQ(st.state, GPUPKMT_DEVICESTATE_REMOVED);
  EXPECT_EQ(st.reason, GPUP_STATUS_CONTEXT_RESET_GUILTY);
  // Reported once; the work still runs, nothing more is reported.
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(link_.resets().size(), 1u);
}

TEST_F(TdrTest, ASubmissionTheKmdRefusesDoesNotRestartTheClockOfTheWorkRunning) {
  const uint32_t dev = create_device(a_);
  const uint32_t prog = build_spin_program(a_, dev);
  const Buffer out = mapped(a_, dev, 4096);
  const uint32_t ctx = create_context(a_, dev);
  worker_->on_grant();
  submit_spin(a_, ctx, prog, out, kLongSpin, 1);
  const auto started = std::chrono::steady_clock::now();  // the spin entered the KMD in send_async
  std::this_thread::sleep_for(120ms);
  if (!link_.resets().empty()) GTEST_SKIP() << "the machine stalled past the TDR delay before the probe was sent";
  // The KMD refuses the context's next submission (the context faults); the spin runs on. Its
  // clock is still the one that started with it: a refusal is not the head completing.
  submit_probe(a_, ctx, out, 2);
  ASSERT_EQ(context_errors(a_).size(), 1u);
  ASSERT_TRUE(link_.wait_for_resets(1, 10s)) << "no reset";
  const auto r = link_.resets()[0];
  const auto since_start = std::chrono::duration_cast<std::chrono::milliseconds>(r.at - started).count();
  // running_ms is how long the spin had run when the watchdog looked, shortly before reset():
  // about since_start (60 ms for on_hang's own latency), not since the refusal (120 ms less).
  EXPECT_GE(r.what.value("running_ms", 0), since_start - 60) << r.what.dump() << ", reset " << since_start
                                                             << " ms after the spin started";
  EXPECT_LT(since_start, 200 + 3000);
}

// --- sandbox policy --------------------------------------------------------------------------

// Runs body in a forked child with the worker's rlimits and seccomp filter installed; returns what
// the child reported ("" when every check held).
std::string in_sandboxed_child(const std::function<void(std::string&)>& body) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) return "pipe failed";
  pid_t pid = fork();
  if (pid == 0) {
    std::string fails;
    if (auto s = apply_worker_rlimits(); !s.ok()) fails += "rlimits: " + s.error().message + "\n";
    if (auto s = install_worker_seccomp(); !s.ok()) fails += "seccomp: " + s.error().message + "\n";
    if (fails.empty()) body(fails);
    ssize_t ignored = write(p[1], fails.data(), fails.size());
    (void)ignored;
    _exit(0);
  }
  close(p[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(p[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(p[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) out += "child ended with status " + std::to_string(status) + "\n";
  return out;
}

void expect_eperm(std::string& fails, const char* what, long rc) {
  if (rc != -1 || errno != EPERM)
    fails += std::string(what) + ": rc " + std::to_string(rc) + ", errno " + std::strerror(errno) + " (want EPERM)\n";
}

std::string status_field(const std::string& name) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(name + ":", 0) == 0) {
      auto v = line.substr(name.size() + 1);
      return v.substr(v.find_first_not_of(" \t"));
    }
  return {};
}

TEST(SeccompPolicy, FilterIsInstalledWithNoNewPrivsAndLimits) {
  auto fails = in_sandboxed_child([](std::string& f) {
    if (status_field("Seccomp") != "2") f += "Seccomp: " + status_field("Seccomp") + "\n";
    if (status_field("NoNewPrivs") != "1") f += "NoNewPrivs: " + status_field("NoNewPrivs") + "\n";
    rlimit r{};
    getrlimit(RLIMIT_CORE, &r);
    if (r.rlim_cur != 0 || r.rlim_max != 0) f += "RLIMIT_CORE not 0\n";
    getrlimit(RLIMIT_NOFILE, &r);
    if (r.rlim_max > kWorkerMaxOpenFiles) f += "RLIMIT_NOFILE not bounded\n";
  });
  EXPECT_EQ(fails, "");
}

TEST(SeccompPolicy, EscapeRoutesFailWithEperm) {
  auto fails = in_sandboxed_child([](std::string& f) {
#if !defined(__SANITIZE_ADDRESS__)
    expect_eperm(f, "ptrace(TRACEME)", ptrace(PTRACE_TRACEME, 0, nullptr, nullptr));
    expect_eperm(f, "ptrace(ATTACH)", ptrace(PTRACE_ATTACH, getppid(), nullptr, nullptr));
#endif
    expect_eperm(f, "socket(AF_INET)", socket(AF_INET, SOCK_STREAM, 0));
    expect_eperm(f, "socket(AF_INET6)", socket(AF_INET6, SOCK_DGRAM, 0));
    expect_eperm(f, "socket(AF_NETLINK)", socket(AF_NETLINK, SOCK_RAW, 0));
    expect_eperm(f, "socket(AF_PACKET)", socket(AF_PACKET, SOCK_RAW, 0));
    expect_eperm(f, "socket(AF_UNIX)", socket(AF_UNIX, SOCK_STREAM, 0));
    int sv[2];
    expect_eperm(f, "socketpair(AF_INET)", socketpair(AF_INET, SOCK_STREAM, 0, sv));
    expect_eperm(f, "socketpair(AF_UNIX)", socketpair(AF_UNIX, SOCK_STREAM, 0, sv));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    expect_eperm(f, "connect", connect(0, reinterpret_cast<sockaddr*>(&addr), sizeof addr));
    expect_eperm(f, "bind", bind(0, reinterpret_cast<sockaddr*>(&addr), sizeof addr));
    for (unsigned long req : {static_cast<unsigned long>(TIOCSTI), 0x100000000UL | TIOCSTI, 0xffff00000000UL | TIOCLINUX}) {
      errno = 0;
      if (syscall(SYS_ioctl, 0, req, "x") != -1 || errno != EACCES)
        f += fmt::format("ioctl({:#x}) not refused with EACCES: {}\n", req, std::strerror(errno));
    }
    expect_eperm(f, "chroot", syscall(SYS_chroot, "/"));
    expect_eperm(f, "pidfd_getfd", syscall(SYS_pidfd_getfd, 0, 0, 0));
    expect_eperm(f, "unshare(NEWUSER)", unshare(CLONE_NEWUSER));
    expect_eperm(f, "unshare(NEWNS)", unshare(CLONE_NEWNS));
    expect_eperm(f, "setns", setns(0, 0));
    expect_eperm(f, "clone(NEWNET)", syscall(SYS_clone, CLONE_NEWNET | SIGCHLD, nullptr, nullptr, nullptr, 0));
    expect_eperm(f, "mount", syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, nullptr));
    expect_eperm(f, "bpf", syscall(SYS_bpf, 0, nullptr, 0));
    expect_eperm(f, "perf_event_open", syscall(SYS_perf_event_open, nullptr, 0, -1, -1, 0));
    expect_eperm(f, "userfaultfd", syscall(SYS_userfaultfd, 0));
    expect_eperm(f, "io_uring_setup", syscall(SYS_io_uring_setup, 1, nullptr));
    expect_eperm(f, "process_vm_readv", syscall(SYS_process_vm_readv, getppid(), nullptr, 0, nullptr, 0, 0));
    expect_eperm(f, "keyctl", syscall(SYS_keyctl, 0, 0, 0, 0, 0));
    expect_eperm(f, "kexec_load", syscall(SYS_kexec_load, 0, 0, nullptr, 0));
    expect_eperm(f, "init_module", syscall(SYS_init_module, nullptr, 0, ""));
    expect_eperm(f, "reboot", syscall(SYS_reboot, 0, 0, 0, nullptr));
    expect_eperm(f, "personality(set)", syscall(SYS_personality, 0x0400000UL /* READ_IMPLIES_EXEC */));
    expect_eperm(f, "mknod", syscall(SYS_mknod, "/tmp/gpup-no-such-node", S_IFCHR | 0600, 0));
    errno = 0;
    if (syscall(SYS_clone3, nullptr, 0) != -1 || errno != ENOSYS) f += "clone3 is not ENOSYS\n";
    if (syscall(SYS_personality, 0xffffffffUL) == -1) f += "personality query refused\n";
  });
  EXPECT_EQ(fails, "");
}

// What PoCL and its LLVM do after the filter is in: threads, executable memory, memfds and
// eventfds, fds passed over a socket the worker already has, and the linker started with vfork+exec.
TEST(SeccompPolicy, WhatTheKmdNeedsStillWorks) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  auto fails = in_sandboxed_child([&](std::string& f) {
    if (eventfd(0, EFD_CLOEXEC) < 0) f += "eventfd refused\n";
    char byte = 1;
    if (write(sv[0], &byte, 1) != 1 || read(sv[1], &byte, 1) != 1) f += "an inherited socket is unusable\n";
    int fd = memfd_create("gpup-test", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 1 << 20) != 0) f += "memfd refused\n";
    void* x = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (x == MAP_FAILED || mprotect(x, 4096, PROT_READ | PROT_EXEC) != 0) f += "mprotect(PROT_EXEC) refused\n";
    bool ran = false;
    std::thread t([&] { ran = true; });
    t.join();
    if (!ran) f += "thread did not run\n";
    pid_t c = vfork();
    if (c == 0) {
      execl("/bin/true", "true", nullptr);
      _exit(127);
    }
    int st = 0;
    if (c < 0 || waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0) f += "vfork+exec failed\n";
    c = fork();
    if (c == 0) _exit(3);
    if (c < 0 || waitpid(c, &st, 0) != c || WEXITSTATUS(st) != 3) f += "fork failed\n";
  });
  EXPECT_EQ(fails, "");
}

TEST(SeccompPolicy, AllowListLeavesOutTheEscapeRoutes) {
  auto names = worker_allowed_syscalls();
  for (const char* escape : {"socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "ptrace",
                             "process_vm_readv", "process_vm_writev", "pidfd_getfd", "pidfd_open", "mount",
                             "umount2", "pivot_root", "chroot", "unshare", "setns", "bpf", "perf_event_open",
                             "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
                             "keyctl", "add_key", "request_key", "reboot", "swapon", "swapoff", "userfaultfd",
                             "io_uring_setup", "open_by_handle_at", "mknod", "mknodat", "setuid", "setresuid",
                             "setgroups", "capset", "clone3", "personality", "execveat"})
    EXPECT_EQ(std::find_if(names.begin(), names.end(), [&](const char* n) { return std::strcmp(n, escape) == 0; }),
              names.end())
        << escape;
  // Every name resolves on this architecture (a typo would silently allow nothing).
#if defined(__x86_64__)
  for (const char* n : names) EXPECT_GE(seccomp_syscall_resolve_name(n), 0) << n;
#endif
}

}  // namespace
}  // namespace gpup::vmwp
