// Worker core tests: handle tables, GPU VA spaces, and the dispatch path driven in-process with
// the mock KMD through a fake link (no processes, no channel); the worker's sandbox policy in a
// forked child.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <thread>

#include <cstdlib>
#include <fstream>
#include <mutex>

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
    int sv[2];
    expect_eperm(f, "socketpair(AF_INET)", socketpair(AF_INET, SOCK_STREAM, 0, sv));
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

// What PoCL and its LLVM do after the filter is in: threads, executable memory, AF_UNIX sockets
// and memfds, and the linker started with vfork+exec.
TEST(SeccompPolicy, WhatTheKmdNeedsStillWorks) {
  auto fails = in_sandboxed_child([](std::string& f) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) f += "socketpair(AF_UNIX) refused\n";
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

TEST(SeccompPolicy, DeniedListNamesTheEscapeRoutes) {
  auto names = worker_denied_syscalls();
  for (const char* want : {"ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
                           "unshare", "setns", "bpf", "perf_event_open", "kexec_load", "kexec_file_load",
                           "init_module", "finit_module", "delete_module", "keyctl", "add_key", "request_key",
                           "reboot", "swapon", "swapoff", "userfaultfd"})
    EXPECT_NE(std::find_if(names.begin(), names.end(), [&](const char* n) { return std::strcmp(n, want) == 0; }),
              names.end())
        << want;
}

}  // namespace
}  // namespace gpup::vmwp
