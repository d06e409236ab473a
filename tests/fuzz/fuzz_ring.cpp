// libFuzzer target: the receiving end of a shared-memory ring as the host sees it. The guest owns
// every byte of the shared region (the producer counter, our own consumer counter as stored there,
// the doorbell flags, the record lengths and payloads) and may rewrite any of them between two
// reads. Each input is one ring and a script of guest writes and host reads, run either on a bare
// Ring (small capacities, so records wrap a lot) or on the consumer ring of a real shared-memory
// Channel (the host's receive(), which adds the 128 KiB message limit).
//
// The harness keeps its own model of the consumer counter and computes from ring.h's contract
// what every read must return, then checks:
//   - no access outside the region (ASan; the region is allocated to the byte, and in channel mode
//     everything of the mapping but the consumer ring is poisoned);
//   - an empty ring reads as empty, a counter or length that no honest producer can publish is a
//     PROTOCOL_ERROR, and anything else is delivered byte for byte (a plausible lie in a length is
//     just data), at most max_payload() bytes and never more than was published;
//   - channel mode: no message above kMaxMessageSize is delivered, and after a protocol error the
//     channel only reports CONNECTION_LOST;
//   - the consumer's private counter is what the model says: the head it publishes after a read,
//     used_bytes() and read_ready() agree with it whatever the guest wrote over the shared head;
//   - draining a ring the guest no longer touches ends (bounded by capacity / 8 reads).
// A violation aborts with a message.
//
// Input: [config][script]. config bit 7 picks channel mode (ring of 256 KiB << bit 0) or bare ring
// mode (capacity 64 << (low nibble % 14) bytes, 64 B ... 512 KiB). The script is a sequence of
// ops, one byte each (value % kOpCount) followed by its operands; missing operand bytes read as 0:
//   READ                     one read, checked against the model
//   DRAIN                    reads until not SUCCESS
//   PUBLISH  u32 n, u16 k, k bytes: an honest record of n % (capacity - 3) bytes at the shared
//                            tail, its payload starting with the k bytes (k <= n)
//   RECORD   u32 len, u32 d  writes len as the record length at the shared tail, then tail += d
//   SET_TAIL u64             ADD_TAIL i32 (tail += value)
//   POKE     u32 off, u8 n, n bytes: raw bytes anywhere in the ring region, header included
//   SET_HEAD u64             the guest scribbles over the consumer's published counter
//   FLAGS    u32 sleeping, u32 waiting
//   DOORBELL u8              bare ring: consumer's announce / withdraw / take_producer_wait
//   CHECK                    bare ring: read_ready() and used_bytes() against the model
#include <sanitizer/asan_interface.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "channel/internal.h"
#include "channel/ring.h"
#include "common/log.h"

using namespace gpup;
using namespace gpup::channel;

namespace {

[[noreturn]] void violated(const char* what, unsigned long long a = 0, unsigned long long b = 0) {
  fprintf(stderr, "fuzz_ring: invariant violated: %s (%llu, %llu)\n", what, a, b);
  abort();
}

#define CHECK(cond, ...)                        \
  do {                                          \
    if (!(cond)) violated(#cond, ##__VA_ARGS__); \
  } while (0)

class Script {
 public:
  Script(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  bool done() const { return pos_ >= n_; }
  size_t left() const { return n_ - pos_; }
  template <typename T>
  T get() {
    T v{};
    const size_t k = std::min(sizeof v, left());
    std::memcpy(&v, p_ + pos_, k);
    pos_ += k;
    return v;
  }
  const uint8_t* take(size_t& n) {
    n = std::min(n, left());
    const uint8_t* q = p_ + pos_;
    pos_ += n;
    return q;
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

enum Op : uint8_t { kRead, kDrain, kPublish, kRecord, kSetTail, kAddTail, kPoke, kSetHead, kFlags, kDoorbell, kCheck, kOpCount };

// The consumer ring as the guest sees it: raw bytes it writes as it likes.
struct Shared {
  uint8_t* region;
  size_t capacity;
  RingHeader* header() const { return reinterpret_cast<RingHeader*>(region); }
  uint8_t* data() const { return region + Ring::kHeaderSize; }
  uint64_t mask() const { return capacity - 1; }
  uint64_t tail() const { return header()->tail.load(std::memory_order_relaxed); }
  void put(uint64_t pos, const uint8_t* src, size_t n) const {  // at counter value pos, wrapping
    for (size_t i = 0; i < n; ++i) data()[(pos + i) & mask()] = src[i];
  }
  void get(uint64_t pos, uint8_t* dst, size_t n) const {
    for (size_t i = 0; i < n; ++i) dst[i] = data()[(pos + i) & mask()];
  }
};

// What ring.h's contract says the next read must do, given the consumer counter `head`.
enum class Expect { kEmpty, kError, kRecord };
Expect expect_read(const Shared& s, uint64_t head, std::vector<uint8_t>& payload) {
  const uint64_t avail = s.tail() - head;
  if (avail == 0) return Expect::kEmpty;
  if (avail > s.capacity || avail % Ring::kRecordAlign != 0) return Expect::kError;
  uint32_t len;
  s.get(head, reinterpret_cast<uint8_t*>(&len), sizeof len);
  if (len > s.capacity - Ring::kRecordHeaderSize || Ring::record_size(len) > avail) return Expect::kError;
  payload.resize(len);
  s.get(head + Ring::kRecordHeaderSize, payload.data(), len);
  return Expect::kRecord;
}

// One host consumer under test: a bare Ring or a Channel whose receive ring is `shared`.
class Consumer {
 public:
  virtual ~Consumer() = default;
  // Performs one read and checks it against the model; false once the consumer must not be used.
  virtual bool read(uint64_t& head) = 0;
  virtual void doorbell(uint8_t) {}
  virtual void check(uint64_t) {}
};

class RingConsumer final : public Consumer {
 public:
  RingConsumer(Shared s, Ring ring) : s_(s), ring_(std::move(ring)) {}

  bool read(uint64_t& head) override {
    const Expect e = expect_read(s_, head, expected_);
    const uint64_t tail = s_.tail();
    const gpup_status st = ring_.try_read(out_);
    switch (e) {
      case Expect::kEmpty:
        CHECK(st == Ring::kEmpty, st, tail);
        return true;
      case Expect::kError:
        CHECK(st == GPUP_STATUS_PROTOCOL_ERROR, st, tail - head);
        return false;  // "the ring must not be used any more"
      case Expect::kRecord:
        CHECK(st == GPUP_STATUS_SUCCESS, st, expected_.size());
        CHECK(out_.size() <= ring_.max_payload(), out_.size(), ring_.max_payload());
        CHECK(Ring::record_size(out_.size()) <= tail - head, out_.size(), tail - head);
        CHECK(out_ == expected_, out_.size(), expected_.size());
        head += Ring::record_size(out_.size());
        CHECK(s_.header()->head.load() == head, s_.header()->head.load(), head);
        check(head);
        return true;
    }
    return false;
  }

  void doorbell(uint8_t sub) override {
    switch (sub % 3) {
      case 0:
        ring_.announce_consumer_sleep();
        CHECK(s_.header()->consumer_sleeping.load() == 1);
        break;
      case 1:
        ring_.withdraw_consumer_sleep();
        CHECK(s_.header()->consumer_sleeping.load() == 0);
        break;
      case 2: {
        // The guest controls both the flag and the tail; the answer may be anything harmless, but
        // a true must have consumed the flag.
        if (ring_.take_producer_wait()) CHECK(s_.header()->producer_waiting.load() == 0);
        break;
      }
    }
  }

  void check(uint64_t head) override {
    const uint64_t tail = s_.tail();
    CHECK(ring_.used_bytes() == tail - head, ring_.used_bytes(), tail - head);
    CHECK(ring_.read_ready() == (tail != head), tail, head);
  }

 private:
  Shared s_;
  Ring ring_;
  std::vector<uint8_t> out_, expected_;
};

class ChannelConsumer final : public Consumer {
 public:
  ChannelConsumer(Shared s, std::unique_ptr<Channel> ch, UniqueFd guest_end)
      : s_(s), ch_(std::move(ch)), guest_end_(std::move(guest_end)) {}

  bool read(uint64_t& head) override {
    const Expect e = expect_read(s_, head, expected_);
    const gpup_status st = ch_->receive(out_, 0);
    if (st == GPUP_STATUS_SUCCESS) {
      CHECK(out_.size() <= kMaxMessageSize, out_.size(), kMaxMessageSize);
      CHECK(out_.size() <= s_.capacity - Ring::kRecordHeaderSize, out_.size(), s_.capacity);
    }
    switch (e) {
      case Expect::kEmpty:
        CHECK(st == GPUP_STATUS_TIMEOUT, st);
        return true;
      case Expect::kRecord:
        if (expected_.size() <= kMaxMessageSize) {
          CHECK(st == GPUP_STATUS_SUCCESS, st, expected_.size());
          CHECK(out_ == expected_, out_.size(), expected_.size());
          head += Ring::record_size(out_.size());
          CHECK(s_.header()->head.load() == head, s_.header()->head.load(), head);
          return true;
        }
        [[fallthrough]];  // a record above the channel's limit is a protocol error there
      case Expect::kError:
        CHECK(st == GPUP_STATUS_PROTOCOL_ERROR, st, expected_.size());
        CHECK(ch_->receive(out_, 0) == GPUP_STATUS_CONNECTION_LOST);
        return false;
    }
    return false;
  }

 private:
  Shared s_;
  std::unique_ptr<Channel> ch_;
  UniqueFd guest_end_;  // kept open: the guest is alive throughout
  std::vector<uint8_t> out_, expected_;
};

struct AlignedFree {
  void operator()(uint8_t* p) const { ::operator delete[](p, std::align_val_t(Ring::kRegionAlign)); }
};

// The host's end of a shared-memory channel over an anonymous shared mapping, built from its parts
// the way accept_on_socket() does, so that each input costs no handshake.
std::unique_ptr<Channel> make_host_channel(size_t ring_bytes, uint8_t*& c2s, UniqueFd& guest_end) {
  namespace wire = internal::wire;
  const size_t size = wire::shm_size(ring_bytes);
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (addr == MAP_FAILED) return nullptr;
  internal::ShmParts parts;
  parts.mapping = internal::Mapping(addr, size);
  const auto region = parts.mapping.span();
  auto rx = Ring::create(region.subspan(0, Ring::region_size(ring_bytes)));
  auto tx = Ring::create(region.subspan(wire::ring_stride(ring_bytes), Ring::region_size(ring_bytes)));
  int sv[2];
  if (!rx || !tx || ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return nullptr;
  parts.socket.reset(sv[0]);
  guest_end.reset(sv[1]);
  parts.rx = std::move(*rx);
  parts.tx = std::move(*tx);
  for (UniqueFd* e : {&parts.rx_data, &parts.rx_space, &parts.tx_data, &parts.tx_space}) {
    e->reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!*e) return nullptr;
  }
  c2s = region.data();
  ChannelOptions opt;
  opt.ring_bytes = ring_bytes;
  opt.spin_us = 0;
  return internal::make_shm_channel(std::move(parts), opt);
}

void run(Script& sc, Shared s, Consumer& c) {
  uint64_t head = 0;  // the model of the consumer's private counter
  std::vector<uint8_t> buf;
  while (!sc.done()) {
    const uint8_t op = sc.get<uint8_t>() % kOpCount;
    switch (op) {
      case kRead:
        if (!c.read(head)) return;
        break;
      case kDrain: {
        // The guest stands still: every successful read consumes at least 8 of at most capacity
        // published bytes, so the loop must end within capacity / 8 + 1 reads.
        size_t reads = 0;
        for (;;) {
          const uint64_t before = head;
          if (!c.read(head)) return;
          if (head == before) break;  // empty
          CHECK(++reads <= s.capacity / Ring::kRecordAlign, reads, s.capacity);
        }
        break;
      }
      case kPublish: {
        const uint32_t len = sc.get<uint32_t>() % static_cast<uint32_t>(s.capacity - Ring::kRecordHeaderSize + 1);
        size_t n = std::min<size_t>(sc.get<uint16_t>(), len);
        const uint8_t* p = sc.take(n);
        const uint64_t tail = s.tail();
        s.put(tail, reinterpret_cast<const uint8_t*>(&len), sizeof len);
        s.put(tail + Ring::kRecordHeaderSize, p, n);  // the rest of the payload is what was there
        s.header()->tail.store(tail + Ring::record_size(len), std::memory_order_release);
        break;
      }
      case kRecord: {
        const uint32_t len = sc.get<uint32_t>();
        const uint32_t advance = sc.get<uint32_t>();
        const uint64_t tail = s.tail();
        s.put(tail, reinterpret_cast<const uint8_t*>(&len), sizeof len);
        s.header()->tail.store(tail + advance, std::memory_order_release);
        break;
      }
      case kSetTail:
        s.header()->tail.store(sc.get<uint64_t>(), std::memory_order_release);
        break;
      case kAddTail:
        s.header()->tail.store(s.tail() + static_cast<int64_t>(sc.get<int32_t>()), std::memory_order_release);
        break;
      case kPoke: {
        const uint32_t off = sc.get<uint32_t>();
        size_t n = sc.get<uint8_t>();
        const uint8_t* p = sc.take(n);
        const size_t region = Ring::region_size(s.capacity);
        for (size_t i = 0; i < n; ++i) s.region[(off + i) % region] = p[i];
        break;
      }
      case kSetHead:
        s.header()->head.store(sc.get<uint64_t>(), std::memory_order_relaxed);
        break;
      case kFlags:
        s.header()->consumer_sleeping.store(sc.get<uint32_t>(), std::memory_order_relaxed);
        s.header()->producer_waiting.store(sc.get<uint32_t>(), std::memory_order_relaxed);
        break;
      case kDoorbell:
        c.doorbell(sc.get<uint8_t>());
        break;
      case kCheck:
        c.check(head);
        break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Every corrupt ring logs an error; thousands a second would only slow the fuzzer down.
  spdlog::set_level(spdlog::level::off);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t config = data[0];
  Script sc(data + 1, size - 1);

  if (config & 0x80) {
    const size_t ring_bytes = kMinRingBytes << (config & 1);
    uint8_t* c2s = nullptr;
    UniqueFd guest_end;
    std::unique_ptr<Channel> ch = make_host_channel(ring_bytes, c2s, guest_end);
    if (!ch) violated("cannot build a channel", ring_bytes);
    // Only the consumer ring may be touched by the receive path: poison the rest of the mapping
    // (padding and the send ring), and unpoison it before the channel unmaps it.
    const auto region = internal::shared_region_for_testing(*ch);
    const size_t used = Ring::region_size(ring_bytes);
    ASAN_POISON_MEMORY_REGION(region.data() + used, region.size() - used);
    Shared s{c2s, ring_bytes};
    {
      ChannelConsumer c(s, std::move(ch), std::move(guest_end));
      run(sc, s, c);
      ASAN_UNPOISON_MEMORY_REGION(region.data() + used, region.size() - used);
    }
    return 0;
  }

  const size_t capacity = Ring::kMinCapacity << ((config & 0x0f) % 14);
  const size_t region_size = Ring::region_size(capacity);
  // Exactly the region, so that ASan's redzones start at its last byte.
  std::unique_ptr<uint8_t[], AlignedFree> region(
      static_cast<uint8_t*>(::operator new[](region_size, std::align_val_t(Ring::kRegionAlign))));
  std::memset(region.get(), 0, region_size);
  auto ring = Ring::create({region.get(), region_size});
  if (!ring) violated("cannot create a ring", capacity);
  Shared s{region.get(), capacity};
  RingConsumer c(s, std::move(*ring));
  run(sc, s, c);
  return 0;
}
