// Unit tests of the channel library: the ring, both transports, set-up, fd passing, and the
// failure cases (peer death, corrupt shared memory, oversized frames, misbehaving handshakes).
#include "channel/channel.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "channel/internal.h"
#include "channel/ring.h"

namespace gpup::channel {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

// ---------------------------------------------------------------------------------------------
// helpers

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t fnv1a(std::span<const uint8_t> data) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint8_t b : data) h = (h ^ b) * 0x100000001b3ull;
  return h;
}

// Deterministic payload bytes for (stream, seq): 8 bytes per generator step.
void fill_payload(std::vector<uint8_t>& buf, size_t n, uint64_t stream, uint64_t seq) {
  buf.resize(n);
  const uint64_t base = splitmix64(stream * 0x1000003 + seq);
  size_t i = 0;
  for (uint64_t w = 0; i + 8 <= n; i += 8, ++w) {
    const uint64_t v = base + w * 0x9e3779b97f4a7c15ull;
    std::memcpy(buf.data() + i, &v, 8);
  }
  for (; i < n; ++i) buf[i] = static_cast<uint8_t>(base >> (i % 8));
}

// Ring memory with the 64-byte alignment the ring requires.
struct alignas(64) Line {
  uint8_t b[64];
};
struct RingMemory {
  explicit RingMemory(size_t capacity)
      : lines((Ring::region_size(capacity) + 63) / 64), size(Ring::region_size(capacity)) {}
  std::span<uint8_t> span() { return {reinterpret_cast<uint8_t*>(lines.data()), size}; }
  RingHeader* header() { return reinterpret_cast<RingHeader*>(lines.data()); }
  uint8_t* data() { return reinterpret_cast<uint8_t*>(lines.data()) + Ring::kHeaderSize; }
  std::vector<Line> lines;
  size_t size;
};

std::span<const uint8_t> bytes(const std::string& s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }
std::string text(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

std::string temp_socket_path() {
  static std::atomic<int> counter{0};
  return "/tmp/gpup-chan-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + ".sock";
}

struct Pair {
  std::unique_ptr<Channel> client, server;
  explicit operator bool() const { return client && server; }
};

enum class Kind { kShmSocketpair, kShmPath, kUnixStream, kTcp };

std::string kind_name(Kind k) {
  switch (k) {
    case Kind::kShmSocketpair:
      return "ShmSocketpair";
    case Kind::kShmPath:
      return "ShmPath";
    case Kind::kUnixStream:
      return "UnixStream";
    case Kind::kTcp:
      return "Tcp";
  }
  return "?";
}

Pair make_pair(Kind kind, ChannelOptions copt = {}, ChannelOptions sopt = {}) {
  Pair p;
  if (kind == Kind::kShmSocketpair) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return p;
    auto fut = std::async(std::launch::async, [&] { return accept_on_socket(UniqueFd(sv[0]), sopt); });
    auto c = connect_on_socket(UniqueFd(sv[1]), copt);
    auto s = fut.get();
    EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().describe());
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.error().describe());
    if (c.ok() && s.ok()) {
      p.client = std::move(*c);
      p.server = std::move(*s);
    }
    return p;
  }
  std::string endpoint;
  std::optional<Listener> listener;
  if (kind == Kind::kTcp) {
    auto l = Listener::listen_tcp("127.0.0.1", 0, sopt);
    EXPECT_TRUE(l.ok()) << (l.ok() ? "" : l.error().describe());
    if (!l) return p;
    endpoint = "tcp:127.0.0.1:" + std::to_string(l->port());
    listener.emplace(std::move(*l));
  } else {
    const std::string path = temp_socket_path();
    auto l = Listener::listen_unix(path, sopt);
    EXPECT_TRUE(l.ok()) << (l.ok() ? "" : l.error().describe());
    if (!l) return p;
    endpoint = kind == Kind::kUnixStream ? path : "unix:" + path;  // both spellings
    if (kind == Kind::kUnixStream) copt.transport = Transport::kStream;
    listener.emplace(std::move(*l));
  }
  auto fut = std::async(std::launch::async, [&] { return listener->accept(5000); });
  auto c = connect(endpoint, copt);
  auto s = fut.get();
  EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().describe());
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.error().describe());
  if (c.ok() && s.ok()) {
    p.client = std::move(*c);
    p.server = std::move(*s);
  }
  return p;
}

// ---- message stream with sequence numbers and checksums ----
//
// Message: [u64 seq][u32 payload length][u32 sender] payload [u64 fnv1a(payload)], sent as three
// parts. Every `large_every`-th message has a random size up to the 128 KiB limit, the others are
// small (0..63 payload bytes).
constexpr size_t kMsgHeader = 16, kMsgTrailer = 8;
constexpr size_t kMaxPayload = kMaxMessageSize - kMsgHeader - kMsgTrailer;

size_t payload_size(uint32_t sender, uint64_t seq, uint64_t large_every) {
  const uint64_t r = splitmix64((uint64_t{sender} << 40) ^ seq);
  if (large_every != 0 && seq % large_every == large_every - 1) {
    // Some exactly at the limit, the rest spread over [0, limit].
    return (r & 15) == 0 ? kMaxPayload : static_cast<size_t>(r % (kMaxPayload + 1));
  }
  return static_cast<size_t>(r % 64);
}

// Returns "" or a description of the first failure.
std::string send_sequence(Channel& ch, uint32_t sender, uint64_t count, uint64_t large_every) {
  std::vector<uint8_t> payload;
  for (uint64_t seq = 0; seq < count; ++seq) {
    const size_t n = payload_size(sender, seq, large_every);
    fill_payload(payload, n, sender, seq);
    uint8_t header[kMsgHeader];
    std::memcpy(header, &seq, 8);
    const uint32_t len = static_cast<uint32_t>(n);
    std::memcpy(header + 8, &len, 4);
    std::memcpy(header + 12, &sender, 4);
    const uint64_t sum = fnv1a(payload);
    uint8_t trailer[kMsgTrailer];
    std::memcpy(trailer, &sum, 8);
    const gpup_status s =
        ch.send(std::span<const uint8_t>(header), std::span<const uint8_t>(payload), std::span<const uint8_t>(trailer));
    if (s != GPUP_STATUS_SUCCESS) {
      return "send of seq " + std::to_string(seq) + " failed: " + gpup_status_name(s) + " " + last_error().message;
    }
  }
  return "";
}

// Receives the messages of `senders` (sender id -> count), interleaved in any way, and checks that
// each sender's messages arrive complete, in order, with the right bytes.
std::string receive_sequences(Channel& ch, std::map<uint32_t, uint64_t> senders, uint64_t large_every) {
  std::map<uint32_t, uint64_t> next;
  uint64_t remaining = 0;
  for (auto& [s, n] : senders) {
    next[s] = 0;
    remaining += n;
  }
  std::vector<uint8_t> msg, expected;
  while (remaining > 0) {
    const gpup_status st = ch.receive(msg, 20000);
    if (st != GPUP_STATUS_SUCCESS) {
      return std::string("receive failed: ") + gpup_status_name(st) + " with " + std::to_string(remaining) + " left";
    }
    if (msg.size() < kMsgHeader + kMsgTrailer) return "short message of " + std::to_string(msg.size()) + " bytes";
    uint64_t seq;
    uint32_t len, sender;
    std::memcpy(&seq, msg.data(), 8);
    std::memcpy(&len, msg.data() + 8, 4);
    std::memcpy(&sender, msg.data() + 12, 4);
    auto it = next.find(sender);
    if (it == next.end()) return "unknown sender " + std::to_string(sender);
    if (seq != it->second) {
      return "sender " + std::to_string(sender) + ": got seq " + std::to_string(seq) + ", expected " +
             std::to_string(it->second);
    }
    if (msg.size() != kMsgHeader + len + kMsgTrailer || len != payload_size(sender, seq, large_every)) {
      return "seq " + std::to_string(seq) + ": wrong size " + std::to_string(msg.size());
    }
    const std::span<const uint8_t> payload(msg.data() + kMsgHeader, len);
    uint64_t sum;
    std::memcpy(&sum, msg.data() + kMsgHeader + len, 8);
    if (sum != fnv1a(payload)) return "seq " + std::to_string(seq) + ": checksum mismatch";
    fill_payload(expected, len, sender, seq);
    if (!std::equal(payload.begin(), payload.end(), expected.begin())) {
      return "seq " + std::to_string(seq) + ": payload bytes differ";
    }
    ++it->second;
    --remaining;
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Ring

TEST(Ring, ValidatesItsRegion) {
  RingMemory mem(4096);
  EXPECT_TRUE(Ring::create(mem.span()).ok());
  EXPECT_EQ(Ring::create(mem.span().first(Ring::region_size(4096) - 8)).status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(Ring::create(mem.span().subspan(8, Ring::region_size(2048))).status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(Ring::create(mem.span().first(Ring::region_size(16))).status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(Ring::attach(mem.span().first(100)).status(), GPUP_STATUS_INVALID_PARAMETER);
}

TEST(Ring, WrapAroundRecordsAreExactByteForByte) {
  constexpr size_t kCap = 4096;
  RingMemory mem(kCap);
  auto created = Ring::create(mem.span());
  ASSERT_TRUE(created.ok());
  Ring producer = std::move(*created);
  auto attached = Ring::attach(mem.span());  // the consumer attaches like the peer process does
  ASSERT_TRUE(attached.ok());
  Ring consumer = std::move(*attached);

  std::mt19937_64 rng(12345);
  std::deque<std::vector<uint8_t>> expected;
  uint64_t tail = 0;  // our own model of the producer counter
  int straddling = 0, header_last = 0, ends_at_end = 0, written = 0, read = 0;
  std::vector<uint8_t> out;
  for (int iter = 0; iter < 40000; ++iter) {
    if (rng() % 3 != 0) {
      // Write a record of 1..3 parts, 0..1500 bytes in total.
      const size_t total = rng() % 1501;
      std::vector<uint8_t> msg(total);
      for (auto& b : msg) b = static_cast<uint8_t>(rng());
      const size_t cut1 = total == 0 ? 0 : rng() % (total + 1);
      const size_t cut2 = cut1 + (total == cut1 ? 0 : rng() % (total - cut1 + 1));
      std::span<const uint8_t> all(msg);
      const gpup_status s = producer.try_write(all.subspan(0, cut1), all.subspan(cut1, cut2 - cut1), all.subspan(cut2));
      if (s == Ring::kFull) {
        ASSERT_LT(kCap - (tail - mem.header()->head.load()), Ring::record_size(total));
        continue;
      }
      ASSERT_EQ(s, GPUP_STATUS_SUCCESS);
      const size_t off = tail % kCap;
      if (off + Ring::kRecordHeaderSize + total > kCap && off + Ring::kRecordHeaderSize < kCap) ++straddling;
      if (off == kCap - 8 && total > 4) ++header_last;            // length in the last 8 bytes, payload wraps
      if (off + Ring::record_size(total) == kCap) ++ends_at_end;  // next record starts at offset 0
      tail += Ring::record_size(total);
      ASSERT_EQ(mem.header()->tail.load(), tail);
      expected.push_back(std::move(msg));
      ++written;
    } else {
      const gpup_status s = consumer.try_read(out);
      if (expected.empty()) {
        ASSERT_EQ(s, Ring::kEmpty);
        continue;
      }
      ASSERT_EQ(s, GPUP_STATUS_SUCCESS);
      ASSERT_EQ(out, expected.front()) << "record " << read;
      expected.pop_front();
      ++read;
    }
  }
  while (!expected.empty()) {
    ASSERT_EQ(consumer.try_read(out), GPUP_STATUS_SUCCESS);
    ASSERT_EQ(out, expected.front());
    expected.pop_front();
  }
  EXPECT_EQ(consumer.try_read(out), Ring::kEmpty);
  EXPECT_GT(written, 10000);
  EXPECT_GT(straddling, 500) << "too few records crossed the end of the data area";
  EXPECT_GT(header_last, 0) << "no record header sat in the last 8 bytes of the data area";
  EXPECT_GT(ends_at_end, 0) << "no record ended exactly at the end of the data area";
}

TEST(Ring, FullRingRefusesUntilTheConsumerReads) {
  RingMemory mem(4096);
  auto r = Ring::create(mem.span());
  ASSERT_TRUE(r.ok());
  Ring& ring = *r;
  const std::vector<uint8_t> msg(100, 0xab);  // record of 104 bytes
  int n = 0;
  while (ring.try_write(std::span<const uint8_t>(msg)) == GPUP_STATUS_SUCCESS) ++n;
  EXPECT_EQ(n, 4096 / 104);
  EXPECT_EQ(ring.try_write(std::span<const uint8_t>(msg)), Ring::kFull);
  EXPECT_FALSE(ring.write_ready(msg.size()));
  EXPECT_TRUE(ring.write_ready(4096 - 104 * n - 4));  // what is left still fits a smaller record
  const uint64_t tail_before = mem.header()->tail.load();
  EXPECT_EQ(ring.try_write(std::span<const uint8_t>(msg)), Ring::kFull);
  EXPECT_EQ(mem.header()->tail.load(), tail_before) << "a refused write must not publish anything";

  std::vector<uint8_t> out;
  ASSERT_EQ(ring.try_read(out), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(out, msg);
  EXPECT_TRUE(ring.write_ready(msg.size()));
  EXPECT_EQ(ring.try_write(std::span<const uint8_t>(msg)), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(ring.try_write(std::span<const uint8_t>(msg)), Ring::kFull);
}

TEST(Ring, LargestRecordFillsTheWholeRing) {
  RingMemory mem(4096);
  auto r = Ring::create(mem.span());
  ASSERT_TRUE(r.ok());
  std::vector<uint8_t> msg(r->max_payload(), 7);
  EXPECT_EQ(r->max_payload(), 4092u);
  std::vector<uint8_t> too_big(r->max_payload() + 1);
  EXPECT_EQ(r->try_write(std::span<const uint8_t>(too_big)), GPUP_STATUS_MESSAGE_TOO_LARGE);
  // Move the counters so that the big record wraps.
  const std::vector<uint8_t> small(1000, 1);
  std::vector<uint8_t> out;
  ASSERT_EQ(r->try_write(std::span<const uint8_t>(small)), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(r->try_read(out), GPUP_STATUS_SUCCESS);
  for (size_t i = 0; i < msg.size(); ++i) msg[i] = static_cast<uint8_t>(i * 31);
  ASSERT_EQ(r->try_write(std::span<const uint8_t>(msg)), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(r->try_write(std::span<const uint8_t>()), Ring::kFull);  // not even an empty record fits
  ASSERT_EQ(r->try_read(out), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(out, msg);
  EXPECT_EQ(r->used_bytes(), 0u);
}

TEST(Ring, EmptyRecordIntoAnEmptyVector) {
  // out.data() is null here: copying zero bytes to it must not reach memcpy (UBSan: nonnull).
  RingMemory mem(4096);
  auto r = Ring::create(mem.span());
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->try_write(std::span<const uint8_t>()), GPUP_STATUS_SUCCESS);
  std::vector<uint8_t> out;
  ASSERT_EQ(out.data(), nullptr);
  ASSERT_EQ(r->try_read(out), GPUP_STATUS_SUCCESS);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(r->used_bytes(), 0u);
}

TEST(Ring, CorruptSharedStateIsAProtocolErrorNotACrash) {
  constexpr size_t kCap = 4096;
  const std::vector<uint8_t> msg(40, 9);
  std::vector<uint8_t> out;
  auto fresh = [&](RingMemory& mem) {
    auto r = Ring::create(mem.span());
    EXPECT_TRUE(r.ok());
    return std::move(*r);
  };
  // Record lengths the peer could write: larger than published, than the ring, than anything.
  for (uint32_t bad : {48u, 100u, 4093u, 4096u, 65536u, 0x7fffffffu, 0xfffffff8u, 0xffffffffu}) {
    RingMemory mem(kCap);
    Ring ring = fresh(mem);
    ASSERT_EQ(ring.try_write(std::span<const uint8_t>(msg)), GPUP_STATUS_SUCCESS);
    std::memcpy(mem.data(), &bad, 4);
    EXPECT_EQ(ring.try_read(out), GPUP_STATUS_PROTOCOL_ERROR) << "length " << bad;
  }
  // A length that is wrong but still within what was published is indistinguishable from data:
  // it must simply be delivered as such, within bounds.
  {
    RingMemory mem(kCap);
    Ring ring = fresh(mem);
    ASSERT_EQ(ring.try_write(std::span<const uint8_t>(msg)), GPUP_STATUS_SUCCESS);
    const uint32_t shorter = 3;
    std::memcpy(mem.data(), &shorter, 4);
    ASSERT_EQ(ring.try_read(out), GPUP_STATUS_SUCCESS);
    EXPECT_EQ(out.size(), 3u);
  }
  // Tail counters: beyond the capacity, behind the head, not record-aligned.
  for (uint64_t bad_tail : {uint64_t{kCap + 8}, uint64_t{1} << 40, ~uint64_t{0} - 7, uint64_t{12}}) {
    RingMemory mem(kCap);
    Ring ring = fresh(mem);
    mem.header()->tail.store(bad_tail);
    EXPECT_EQ(ring.try_read(out), GPUP_STATUS_PROTOCOL_ERROR) << "tail " << bad_tail;
  }
  // Head counter as the producer sees it: ahead of the tail, or too far behind.
  for (uint64_t bad_head : {uint64_t{8}, uint64_t{1} << 40}) {
    RingMemory mem(kCap);
    Ring ring = fresh(mem);
    mem.header()->head.store(bad_head);
    EXPECT_EQ(ring.try_write(std::span<const uint8_t>(msg)), GPUP_STATUS_PROTOCOL_ERROR) << "head " << bad_head;
  }
}

TEST(Ring, DoorbellFlagsHandOverExactlyOnce) {
  RingMemory mem(4096);
  auto r = Ring::create(mem.span());
  ASSERT_TRUE(r.ok());
  Ring& ring = *r;
  EXPECT_FALSE(ring.take_consumer_sleep());
  ring.announce_consumer_sleep();
  EXPECT_TRUE(ring.take_consumer_sleep());
  EXPECT_FALSE(ring.take_consumer_sleep()) << "one wake-up per announced sleep";
  ring.announce_consumer_sleep();
  ring.withdraw_consumer_sleep();
  EXPECT_FALSE(ring.take_consumer_sleep());

  // The producer waits for 2048 free bytes: no wake-up before that much is free.
  const std::vector<uint8_t> msg(1020);  // 1024-byte records
  for (int i = 0; i < 4; ++i) ASSERT_EQ(ring.try_write(std::span<const uint8_t>(msg)), GPUP_STATUS_SUCCESS);
  ring.announce_producer_wait(2048);
  std::vector<uint8_t> out;
  ASSERT_EQ(ring.try_read(out), GPUP_STATUS_SUCCESS);
  EXPECT_FALSE(ring.take_producer_wait());
  ASSERT_EQ(ring.try_read(out), GPUP_STATUS_SUCCESS);
  EXPECT_TRUE(ring.take_producer_wait());
  EXPECT_FALSE(ring.take_producer_wait());
}

TEST(Ring, ConcurrentProducerAndConsumerThreads) {
  RingMemory mem(64 * 1024);
  auto p = Ring::create(mem.span());
  auto c = Ring::attach(mem.span());
  ASSERT_TRUE(p.ok() && c.ok());
  const uint64_t kCount = kSanitized ? 100000 : 400000;
  std::thread producer([&] {
    std::vector<uint8_t> payload;
    for (uint64_t seq = 0; seq < kCount; ++seq) {
      fill_payload(payload, splitmix64(seq) % 2000, 1, seq);
      const std::span<const uint8_t> hdr(reinterpret_cast<const uint8_t*>(&seq), 8);
      while (p->try_write(hdr, std::span<const uint8_t>(payload)) == Ring::kFull) std::this_thread::yield();
    }
  });
  std::vector<uint8_t> out, expected;
  std::string failure;
  for (uint64_t seq = 0; seq < kCount && failure.empty();) {
    const gpup_status s = c->try_read(out);
    if (s == Ring::kEmpty) {
      std::this_thread::yield();
      continue;
    }
    if (s != GPUP_STATUS_SUCCESS) {
      failure = "read failed";
      break;
    }
    uint64_t got;
    std::memcpy(&got, out.data(), 8);
    fill_payload(expected, splitmix64(seq) % 2000, 1, seq);
    if (got != seq || out.size() != 8 + expected.size() ||
        !std::equal(expected.begin(), expected.end(), out.begin() + 8)) {
      failure = "mismatch at seq " + std::to_string(seq);
    }
    ++seq;
  }
  producer.join();
  EXPECT_EQ(failure, "");
}

// ---------------------------------------------------------------------------------------------
// Channel, on every transport

class ChannelTransport : public ::testing::TestWithParam<Kind> {};

INSTANTIATE_TEST_SUITE_P(All, ChannelTransport,
                         ::testing::Values(Kind::kShmSocketpair, Kind::kShmPath, Kind::kUnixStream, Kind::kTcp),
                         [](const auto& info) { return kind_name(info.param); });

TEST_P(ChannelTransport, RoundTripsWholeMessagesBothWays) {
  Pair p = make_pair(GetParam());
  ASSERT_TRUE(p);
  const bool shm = GetParam() == Kind::kShmSocketpair || GetParam() == Kind::kShmPath;
  EXPECT_EQ(p.client->shares_memory(), shm);
  EXPECT_EQ(p.server->shares_memory(), shm);
  if (GetParam() == Kind::kTcp) {
    EXPECT_EQ(p.client->peer_pid(), -1);
  } else {
    EXPECT_EQ(p.client->peer_pid(), ::getpid());
    EXPECT_EQ(p.server->peer_pid(), ::getpid());
  }

  std::vector<uint8_t> out;
  ASSERT_EQ(p.client->send(bytes("hello host")), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(p.client->send(bytes("")), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(p.client->send(bytes("head:"), bytes(""), bytes("body"), bytes(":tail")), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(text(out), "hello host");
  ASSERT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_TRUE(out.empty());
  ASSERT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(text(out), "head:body:tail");
  ASSERT_EQ(p.server->send(bytes("hello guest")), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(p.client->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(text(out), "hello guest");
}

TEST_P(ChannelTransport, ExactlyMaxSizePassesAndOneMoreIsRefusedBeforeSending) {
  Pair p = make_pair(GetParam());
  ASSERT_TRUE(p);
  std::vector<uint8_t> max(kMaxMessageSize), out;
  for (size_t i = 0; i < max.size(); ++i) max[i] = static_cast<uint8_t>(i * 7 + (i >> 12));
  const std::vector<uint8_t> over(kMaxMessageSize + 1, 0x5a);

  const auto region = internal::shared_region_for_testing(*p.client);
  auto c2s_tail = [&]() -> uint64_t {
    return region.empty() ? 0 : reinterpret_cast<RingHeader*>(region.data())->tail.load();
  };

  ASSERT_EQ(p.client->send(std::span<const uint8_t>(max)), GPUP_STATUS_SUCCESS);
  const uint64_t tail = c2s_tail();
  EXPECT_EQ(p.client->send(std::span<const uint8_t>(over)), GPUP_STATUS_MESSAGE_TOO_LARGE);
  EXPECT_EQ(last_error().status, GPUP_STATUS_MESSAGE_TOO_LARGE);
  EXPECT_NE(last_error().message.find("131073"), std::string::npos) << last_error().message;
  EXPECT_NE(last_error().message.find("131072"), std::string::npos) << last_error().message;
  // Split into parts that are each small but sum to one byte too many: refused as well.
  const std::span<const uint8_t> a(max), b(over.data(), 1);
  EXPECT_EQ(p.client->send(a, b), GPUP_STATUS_MESSAGE_TOO_LARGE);
  EXPECT_EQ(c2s_tail(), tail) << "the ring changed although the message was refused";
  ASSERT_EQ(p.client->send(bytes("after")), GPUP_STATUS_SUCCESS);

  ASSERT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(out, max);
  ASSERT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(text(out), "after") << "something of the refused message reached the peer";
  EXPECT_EQ(p.server->receive(out, 0), GPUP_STATUS_TIMEOUT);

  // The other direction too.
  ASSERT_EQ(p.server->send(std::span<const uint8_t>(max)), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(p.server->send(std::span<const uint8_t>(over)), GPUP_STATUS_MESSAGE_TOO_LARGE);
  ASSERT_EQ(p.client->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(out, max);
  EXPECT_EQ(p.client->receive(out, 0), GPUP_STATUS_TIMEOUT);
}

TEST_P(ChannelTransport, ReceiveTimesOut) {
  Pair p = make_pair(GetParam());
  ASSERT_TRUE(p);
  std::vector<uint8_t> out;
  EXPECT_EQ(p.server->receive(out, 0), GPUP_STATUS_TIMEOUT);
  const auto t0 = Clock::now();
  EXPECT_EQ(p.server->receive(out, 60), GPUP_STATUS_TIMEOUT);
  const auto waited = Clock::now() - t0;
  EXPECT_GE(waited, 55ms);
  EXPECT_LT(waited, 2s);
  // Still usable afterwards.
  ASSERT_EQ(p.client->send(bytes("x")), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
}

TEST_P(ChannelTransport, ConcurrentSendersAndReceiversLoseAndReorderNothing) {
  const bool shm = GetParam() == Kind::kShmSocketpair || GetParam() == Kind::kShmPath;
  // Small rings on one variant so that the producers hit backpressure all the time.
  ChannelOptions opt;
  if (GetParam() == Kind::kShmSocketpair) opt.ring_bytes = kMinRingBytes;
  Pair p = make_pair(GetParam(), opt);
  ASSERT_TRUE(p);
  const uint64_t n = (shm ? 100000 : 30000) / (kSanitized ? 4 : 1);
  const uint64_t large_every = 97;
  // Two guest threads send to the host while the host answers on its own thread.
  std::string e1, e2, e3, r1, r2;
  std::thread s1([&] { e1 = send_sequence(*p.client, 1, n, large_every); });
  std::thread s2([&] { e2 = send_sequence(*p.client, 2, n, large_every); });
  std::thread s3([&] { e3 = send_sequence(*p.server, 3, n, large_every); });
  std::thread rc([&] { r2 = receive_sequences(*p.client, {{3, n}}, large_every); });
  r1 = receive_sequences(*p.server, {{1, n}, {2, n}}, large_every);
  s1.join();
  s2.join();
  s3.join();
  rc.join();
  EXPECT_EQ(e1, "");
  EXPECT_EQ(e2, "");
  EXPECT_EQ(e3, "");
  EXPECT_EQ(r1, "");
  EXPECT_EQ(r2, "");
}

TEST_P(ChannelTransport, ShutdownWakesBlockedCallsOnBothSides) {
  Pair p = make_pair(GetParam());
  ASSERT_TRUE(p);
  std::vector<uint8_t> out_server, out_client;
  auto blocked_server = std::async(std::launch::async, [&] { return p.server->receive(out_server, 10000); });
  auto blocked_client = std::async(std::launch::async, [&] { return p.client->receive(out_client, 10000); });
  std::this_thread::sleep_for(50ms);
  const auto t0 = Clock::now();
  p.server->shutdown();
  ASSERT_EQ(blocked_server.wait_for(3s), std::future_status::ready);
  ASSERT_EQ(blocked_client.wait_for(3s), std::future_status::ready) << "the peer did not notice the shutdown";
  EXPECT_LT(Clock::now() - t0, 2s);
  EXPECT_EQ(blocked_server.get(), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_EQ(blocked_client.get(), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_EQ(p.server->send(bytes("x")), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_EQ(p.server->receive(out_server, 0), GPUP_STATUS_CONNECTION_LOST);
  p.server->shutdown();  // idempotent
}

TEST_P(ChannelTransport, MessagesSentBeforeThePeerLeftAreDeliveredFirst) {
  Pair p = make_pair(GetParam());
  ASSERT_TRUE(p);
  ASSERT_EQ(p.client->send(bytes("one")), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(p.client->send(bytes("two")), GPUP_STATUS_SUCCESS);
  p.client.reset();  // the guest goes away
  std::vector<uint8_t> out;
  ASSERT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(text(out), "one");
  ASSERT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(text(out), "two");
  EXPECT_EQ(p.server->receive(out, 2000), GPUP_STATUS_CONNECTION_LOST);
}

TEST_P(ChannelTransport, BlockedSendWaitsForTheConsumerThenCompletes) {
  ChannelOptions opt;
  opt.ring_bytes = kMinRingBytes;  // 256 KiB: three 64 KiB messages fit, the fourth does not
  Pair p = make_pair(GetParam(), opt, opt);
  ASSERT_TRUE(p);
  const bool shm = p.client->shares_memory();
  // Shared memory: exactly 4 messages, the 4th must wait. Stream: enough to fill any socket buffer.
  const int total = shm ? 4 : 512;
  const std::vector<uint8_t> chunk(64 * 1024, 0x33);
  std::atomic<int> sent{0};
  std::atomic<int64_t> last_send_done_ns{0};
  auto sender = std::async(std::launch::async, [&] {
    std::vector<uint8_t> m = chunk;
    for (int i = 0; i < total; ++i) {
      std::memcpy(m.data(), &i, sizeof i);
      if (p.client->send(std::span<const uint8_t>(m)) != GPUP_STATUS_SUCCESS) return false;
      last_send_done_ns = Clock::now().time_since_epoch().count();
      ++sent;
    }
    return true;
  });
  // Wait until the sender stalls: no progress for 150 ms.
  int seen = -1;
  const auto give_up = Clock::now() + 5s;
  while (Clock::now() < give_up) {
    const int now = sent.load();
    if (now == seen) break;
    seen = now;
    std::this_thread::sleep_for(150ms);
  }
  ASSERT_LT(sent.load(), total) << "the sender never blocked";
  if (shm) {
    EXPECT_EQ(sent.load(), 3);
  }
  EXPECT_EQ(sender.wait_for(0ms), std::future_status::timeout);

  const int64_t first_read_ns = Clock::now().time_since_epoch().count();
  std::vector<uint8_t> out;
  for (int i = 0; i < total; ++i) {
    ASSERT_EQ(p.server->receive(out, 5000), GPUP_STATUS_SUCCESS) << i;
    int got;
    std::memcpy(&got, out.data(), sizeof got);
    ASSERT_EQ(got, i);
    ASSERT_EQ(out.size(), chunk.size());
  }
  ASSERT_EQ(sender.wait_for(5s), std::future_status::ready);
  EXPECT_TRUE(sender.get());
  EXPECT_EQ(sent.load(), total);
  EXPECT_GT(last_send_done_ns.load(), first_read_ns) << "the blocked send completed before the consumer read";
}

TEST_P(ChannelTransport, ShutdownReleasesABlockedSend) {
  ChannelOptions opt;
  opt.ring_bytes = kMinRingBytes;
  Pair p = make_pair(GetParam(), opt, opt);
  ASSERT_TRUE(p);
  const std::vector<uint8_t> chunk(100 * 1024, 1);
  std::atomic<int> sent{0};
  auto sender = std::async(std::launch::async, [&] {
    for (;;) {
      const gpup_status s = p.client->send(std::span<const uint8_t>(chunk));
      if (s != GPUP_STATUS_SUCCESS) return s;
      ++sent;
    }
  });
  int seen = -1;
  while (sent.load() != seen) {  // until the sender makes no progress for 100 ms
    seen = sent.load();
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(sender.wait_for(0ms), std::future_status::timeout) << "send did not block";
  const auto t0 = Clock::now();
  p.client->shutdown();
  if (sender.wait_for(3s) != std::future_status::ready) {
    ADD_FAILURE() << "shutdown did not release the blocked send";
    p.server.reset();
  }
  EXPECT_EQ(sender.get(), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_LT(Clock::now() - t0, 2s);
  // The consumer still gets the messages that were fully sent, then the end.
  std::vector<uint8_t> out;
  int received = 0;
  while (p.server->receive(out, 2000) == GPUP_STATUS_SUCCESS) ++received;
  EXPECT_EQ(received, sent.load());
}

// ---------------------------------------------------------------------------------------------
// Peer death, across processes

class ChannelPeerDeath : public ::testing::TestWithParam<Kind> {};

INSTANTIATE_TEST_SUITE_P(All, ChannelPeerDeath, ::testing::Values(Kind::kShmPath, Kind::kUnixStream, Kind::kTcp),
                         [](const auto& info) { return kind_name(info.param); });

// A forked child connects to `listener` and runs `child` (which must _exit); returns the pid and
// the accepted server end.
struct Forked {
  pid_t pid = -1;
  std::unique_ptr<Channel> server;
};

Forked fork_client(Kind kind, const std::function<int(Channel&)>& child, ChannelOptions opt = {}) {
  Forked f;
  std::optional<Listener> listener;
  std::string endpoint;
  if (kind == Kind::kTcp) {
    auto l = Listener::listen_tcp("127.0.0.1", 0, opt);
    if (!l) return f;
    endpoint = "tcp:127.0.0.1:" + std::to_string(l->port());
    listener.emplace(std::move(*l));
  } else {
    const std::string path = temp_socket_path();
    auto l = Listener::listen_unix(path, opt);
    if (!l) return f;
    endpoint = "unix:" + path;
    if (kind == Kind::kUnixStream) opt.transport = Transport::kStream;
    listener.emplace(std::move(*l));
  }
  f.pid = ::fork();
  if (f.pid == 0) {
    auto c = connect(endpoint, opt);
    if (!c) ::_exit(100);
    ::_exit(child(**c));
  }
  auto s = listener->accept(5000);
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.error().describe());
  if (s) f.server = std::move(*s);
  return f;
}

int wait_child(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return -1;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 1000 + WTERMSIG(status);
  return -2;
}

// Runs server->receive() on another thread, checks that it blocks, lets `kill_peer` end the child,
// and checks that the receive returns CONNECTION_LOST promptly.
void expect_receive_released(Channel& server, const std::function<void()>& kill_peer) {
  std::vector<uint8_t> out;
  auto blocked = std::async(std::launch::async, [&] { return server.receive(out, -1); });
  EXPECT_EQ(blocked.wait_for(150ms), std::future_status::timeout) << "receive returned while the peer was alive";
  kill_peer();
  const auto t0 = Clock::now();
  if (blocked.wait_for(3s) != std::future_status::ready) {
    ADD_FAILURE() << "receive stayed blocked after the peer died";
    server.shutdown();
  }
  EXPECT_EQ(blocked.get(), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_LT(Clock::now() - t0, 3s);
}

TEST_P(ChannelPeerDeath, ChildExitUnblocksReceive) {
  Forked f = fork_client(GetParam(), [](Channel& ch) {
    std::vector<uint8_t> cmd;
    while (ch.receive(cmd) == GPUP_STATUS_SUCCESS) {
      if (text(cmd) == "exit") ::_exit(0);  // no destructors: the kernel closes everything
    }
    return 1;
  });
  ASSERT_TRUE(f.server);
  expect_receive_released(*f.server, [&] { ASSERT_EQ(f.server->send(bytes("exit")), GPUP_STATUS_SUCCESS); });
  EXPECT_EQ(wait_child(f.pid), 0);
}

TEST_P(ChannelPeerDeath, SigkillUnblocksReceive) {
  Forked f = fork_client(GetParam(), [](Channel&) {
    for (;;) ::pause();
    return 0;
  });
  ASSERT_TRUE(f.server);
  expect_receive_released(*f.server, [&] { ::kill(f.pid, SIGKILL); });
  EXPECT_EQ(wait_child(f.pid), 1000 + SIGKILL);
}

TEST_P(ChannelPeerDeath, SigkillUnblocksSendOnAFullRing) {
  ChannelOptions opt;
  opt.ring_bytes = kMinRingBytes;
  Forked f = fork_client(
      GetParam(),
      [](Channel& ch) {
        ch.send(bytes("ready"));
        for (;;) ::pause();  // never reads
        return 0;
      },
      opt);
  ASSERT_TRUE(f.server);
  std::vector<uint8_t> out;
  ASSERT_EQ(f.server->receive(out, 5000), GPUP_STATUS_SUCCESS);
  const std::vector<uint8_t> chunk(100 * 1024, 2);
  std::atomic<int> sent{0};
  std::atomic<int64_t> failed_at_ns{0};
  auto sender = std::async(std::launch::async, [&] {
    for (;;) {
      const gpup_status s = f.server->send(std::span<const uint8_t>(chunk));
      if (s != GPUP_STATUS_SUCCESS) {
        failed_at_ns = Clock::now().time_since_epoch().count();
        return s;
      }
      ++sent;
    }
  });
  // Let the sender fill the ring / socket buffers and block, then kill the reader.
  int seen = -1;
  while (sent.load() != seen) {
    seen = sent.load();
    std::this_thread::sleep_for(150ms);
  }
  EXPECT_EQ(sender.wait_for(0ms), std::future_status::timeout) << "send did not block";
  const int64_t kill_ns = Clock::now().time_since_epoch().count();
  ::kill(f.pid, SIGKILL);
  if (sender.wait_for(5s) != std::future_status::ready) {
    ADD_FAILURE() << "send stayed blocked after the peer died";
    f.server->shutdown();
  }
  EXPECT_EQ(sender.get(), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_GE(failed_at_ns.load(), kill_ns);
  EXPECT_LT(failed_at_ns.load() - kill_ns, std::chrono::nanoseconds(3s).count());
  EXPECT_EQ(wait_child(f.pid), 1000 + SIGKILL);
}

TEST(ChannelAcrossProcesses, AMillionMessagesBothWaysWithoutLossOrReorder) {
  const uint64_t to_host = kSanitized ? 200000 : 1000000;  // mostly small, every 500th up to 128 KiB
  const uint64_t to_guest = kSanitized ? 50000 : 150000;
  const uint64_t large_every = 500;
  const auto t0 = Clock::now();
  Forked f = fork_client(Kind::kShmPath, [&](Channel& ch) {
    std::string recv_err;
    std::thread receiver([&] { recv_err = receive_sequences(ch, {{9, to_guest}}, large_every); });
    const std::string send_err = send_sequence(ch, 7, to_host, large_every);
    receiver.join();
    if (!send_err.empty()) fprintf(stderr, "child send: %s\n", send_err.c_str());
    if (!recv_err.empty()) fprintf(stderr, "child receive: %s\n", recv_err.c_str());
    return send_err.empty() && recv_err.empty() ? 0 : 1;
  });
  ASSERT_TRUE(f.server);
  EXPECT_NE(f.server->peer_pid(), ::getpid());
  EXPECT_EQ(f.server->peer_pid(), f.pid);
  std::string send_err;
  std::thread sender([&] { send_err = send_sequence(*f.server, 9, to_guest, large_every); });
  EXPECT_EQ(receive_sequences(*f.server, {{7, to_host}}, large_every), "");
  sender.join();
  EXPECT_EQ(send_err, "");
  EXPECT_EQ(wait_child(f.pid), 0);
  std::vector<uint8_t> out;
  EXPECT_EQ(f.server->receive(out, 2000), GPUP_STATUS_CONNECTION_LOST);
  std::printf("%llu + %llu messages across processes in %lld ms\n", static_cast<unsigned long long>(to_host),
              static_cast<unsigned long long>(to_guest),
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count()));
}

// ---------------------------------------------------------------------------------------------
// Shared memory: corruption by the peer

// Offsets inside the memfd (see internal.h): ring 0 client->server, ring 1 server->client.
RingHeader* ring_header(std::span<uint8_t> region, size_t ring_bytes, int index) {
  return reinterpret_cast<RingHeader*>(region.data() + index * internal::wire::ring_stride(ring_bytes));
}
uint8_t* ring_data(std::span<uint8_t> region, size_t ring_bytes, int index) {
  return region.data() + index * internal::wire::ring_stride(ring_bytes) + Ring::kHeaderSize;
}

TEST(ChannelShm, CorruptRecordLengthIsAProtocolError) {
  const size_t ring = ChannelOptions{}.ring_bytes;
  for (uint32_t bad :
       {0xffffffffu, 0x80000000u, static_cast<uint32_t>(ring), static_cast<uint32_t>(kMaxMessageSize + 1), 64u}) {
    Pair p = make_pair(Kind::kShmSocketpair);
    ASSERT_TRUE(p);
    const auto region = internal::shared_region_for_testing(*p.server);
    ASSERT_EQ(region.size(), internal::wire::shm_size(ring));
    ASSERT_EQ(p.server->send(bytes("0123456789abcdefghijklmnopqrstuvwxyz")), GPUP_STATUS_SUCCESS);  // 40-byte record
    std::memcpy(ring_data(region, ring, 1), &bad, 4);  // the "host" scribbles over its record
    std::vector<uint8_t> out;
    EXPECT_EQ(p.client->receive(out, 1000), GPUP_STATUS_PROTOCOL_ERROR) << "length " << bad;
    EXPECT_EQ(last_error().status, GPUP_STATUS_PROTOCOL_ERROR);
    // The channel is finished on both ends.
    EXPECT_EQ(p.client->receive(out, 0), GPUP_STATUS_CONNECTION_LOST);
    EXPECT_EQ(p.client->send(bytes("x")), GPUP_STATUS_CONNECTION_LOST);
    EXPECT_EQ(p.server->receive(out, 2000), GPUP_STATUS_CONNECTION_LOST);
  }
}

TEST(ChannelShm, RecordOverTheMessageLimitIsAProtocolError) {
  // A ring holds records up to its capacity; the channel's limit must hold on receive as well,
  // as it does on the stream transport. The guest writes its ring by hand: one record exactly at
  // the limit (delivered), then one a byte over it.
  const size_t ring = ChannelOptions{}.ring_bytes;
  Pair p = make_pair(Kind::kShmSocketpair);
  ASSERT_TRUE(p);
  const auto region = internal::shared_region_for_testing(*p.client);
  uint64_t tail = 0;
  for (const uint32_t len : {static_cast<uint32_t>(kMaxMessageSize), static_cast<uint32_t>(kMaxMessageSize + 1)}) {
    uint8_t* data = ring_data(region, ring, 0);
    std::memcpy(data + tail % ring, &len, 4);
    std::memset(data + tail % ring + 4, 0x5a, len);  // the ring is far larger: no wrap here
    tail += Ring::record_size(len);
  }
  ring_header(region, ring, 0)->tail.store(tail);
  std::vector<uint8_t> out;
  ASSERT_EQ(p.server->receive(out, 1000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(out.size(), kMaxMessageSize);
  EXPECT_EQ(p.server->receive(out, 1000), GPUP_STATUS_PROTOCOL_ERROR);
  EXPECT_NE(last_error().message.find("131073"), std::string::npos) << last_error().message;
  EXPECT_EQ(p.server->receive(out, 0), GPUP_STATUS_CONNECTION_LOST);
  EXPECT_EQ(p.client->receive(out, 2000), GPUP_STATUS_CONNECTION_LOST);
}

TEST(ChannelShm, CorruptCountersAreAProtocolError) {
  const size_t ring = ChannelOptions{}.ring_bytes;
  {
    Pair p = make_pair(Kind::kShmSocketpair);
    ASSERT_TRUE(p);
    const auto region = internal::shared_region_for_testing(*p.client);
    ring_header(region, ring, 1)->tail.store(uint64_t{ring} * 3);  // more published than fits
    std::vector<uint8_t> out;
    EXPECT_EQ(p.client->receive(out, 1000), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {
    Pair p = make_pair(Kind::kShmSocketpair);
    ASSERT_TRUE(p);
    const auto region = internal::shared_region_for_testing(*p.client);
    ring_header(region, ring, 0)->head.store(4096);  // consumed more than was ever produced
    EXPECT_EQ(p.client->send(bytes("x")), GPUP_STATUS_PROTOCOL_ERROR);
    std::vector<uint8_t> out;
    EXPECT_EQ(p.server->receive(out, 2000), GPUP_STATUS_CONNECTION_LOST);
  }
  {
    // Garbage over the whole header and data: whatever happens, no crash, and an error.
    Pair p = make_pair(Kind::kShmSocketpair);
    ASSERT_TRUE(p);
    const auto region = internal::shared_region_for_testing(*p.client);
    std::mt19937_64 rng(7);
    for (auto& b : region) b = static_cast<uint8_t>(rng());
    std::vector<uint8_t> out;
    const gpup_status s = p.client->receive(out, 200);
    EXPECT_TRUE(s == GPUP_STATUS_PROTOCOL_ERROR || s == GPUP_STATUS_SUCCESS) << gpup_status_name(s);
    while (p.client->receive(out, 0) == GPUP_STATUS_SUCCESS) {
      EXPECT_LE(out.size(), ring);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fd passing

UniqueFd memfd_with(const std::string& content) {
  UniqueFd fd(::memfd_create("gpup-test-section", MFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::write(fd.get(), content.data(), content.size()), static_cast<ssize_t>(content.size()));
  return fd;
}

std::string read_fd(int fd) {
  char buf[256];
  const ssize_t n = ::pread(fd, buf, sizeof buf, 0);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

TEST(ChannelFds, OutOfOrderIdsAreMatched) {
  Pair p = make_pair(Kind::kShmPath);
  ASSERT_TRUE(p);
  for (uint64_t id : {30, 10, 20, 40}) {
    UniqueFd fd = memfd_with("section " + std::to_string(id));
    ASSERT_EQ(p.server->send_fd(id, fd.get()), GPUP_STATUS_SUCCESS);
  }
  for (uint64_t id : {20, 10, 40, 30}) {
    UniqueFd got;
    ASSERT_EQ(p.client->receive_fd(id, got, 2000), GPUP_STATUS_SUCCESS) << id;
    EXPECT_EQ(read_fd(got.get()), "section " + std::to_string(id));
    EXPECT_EQ(::fcntl(got.get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  }
  UniqueFd none;
  EXPECT_EQ(p.client->receive_fd(10, none, 50), GPUP_STATUS_TIMEOUT) << "an id is delivered once";
  EXPECT_FALSE(none.valid());
  // And the other direction, mixed with messages (they do not interfere).
  UniqueFd fd = memfd_with("from guest");
  ASSERT_EQ(p.client->send(bytes("msg")), GPUP_STATUS_SUCCESS);
  ASSERT_EQ(p.client->send_fd(7, fd.get()), GPUP_STATUS_SUCCESS);
  std::vector<uint8_t> out;
  ASSERT_EQ(p.server->receive(out, 2000), GPUP_STATUS_SUCCESS);
  UniqueFd got;
  ASSERT_EQ(p.server->receive_fd(7, got, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(read_fd(got.get()), "from guest");
  EXPECT_EQ(p.client->send_fd(8, -1), GPUP_STATUS_INVALID_PARAMETER);
}

TEST(ChannelFds, SeveralThreadsWaitForDifferentIds) {
  Pair p = make_pair(Kind::kShmSocketpair);
  ASSERT_TRUE(p);
  constexpr int kThreads = 6;
  std::vector<std::future<std::string>> waiters;
  for (int i = 0; i < kThreads; ++i) {
    waiters.push_back(std::async(std::launch::async, [&, i] {
      UniqueFd fd;
      const gpup_status s = p.client->receive_fd(100 + i, fd, 5000);
      return s == GPUP_STATUS_SUCCESS ? read_fd(fd.get()) : std::string(gpup_status_name(s));
    }));
  }
  std::this_thread::sleep_for(30ms);
  for (int i = kThreads - 1; i >= 0; --i) {  // reverse order, with pauses
    UniqueFd fd = memfd_with("fd" + std::to_string(100 + i));
    ASSERT_EQ(p.server->send_fd(100 + i, fd.get()), GPUP_STATUS_SUCCESS);
    std::this_thread::sleep_for(5ms);
  }
  for (int i = 0; i < kThreads; ++i) EXPECT_EQ(waiters[i].get(), "fd" + std::to_string(100 + i));
}

TEST(ChannelFds, ShutdownAndPeerExitWakeAWaiter) {
  Pair p = make_pair(Kind::kShmSocketpair);
  ASSERT_TRUE(p);
  auto waiter = std::async(std::launch::async, [&] {
    UniqueFd fd;
    return p.client->receive_fd(1, fd, 10000);
  });
  std::this_thread::sleep_for(30ms);
  p.server.reset();
  ASSERT_EQ(waiter.wait_for(3s), std::future_status::ready);
  EXPECT_EQ(waiter.get(), GPUP_STATUS_CONNECTION_LOST);
}

TEST(ChannelFds, DuplicateIdAndMalformedRecordsAreProtocolErrors) {
  {
    Pair p = make_pair(Kind::kShmSocketpair);
    ASSERT_TRUE(p);
    UniqueFd fd = memfd_with("x");
    ASSERT_EQ(p.server->send_fd(5, fd.get()), GPUP_STATUS_SUCCESS);
    ASSERT_EQ(p.server->send_fd(5, fd.get()), GPUP_STATUS_SUCCESS);
    UniqueFd got;
    EXPECT_EQ(p.client->receive_fd(6, got, 1000), GPUP_STATUS_PROTOCOL_ERROR);
  }
  // Raw bytes on the socket behind the server's back (dup of its socket before the handshake).
  auto raw_pair = [](UniqueFd& raw) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    raw.reset(::dup(sv[0]));
    auto fut = std::async(std::launch::async, [&] { return accept_on_socket(UniqueFd(sv[0])); });
    auto c = connect_on_socket(UniqueFd(sv[1]));
    auto s = fut.get();
    EXPECT_TRUE(c.ok() && s.ok());
    Pair p;
    if (c.ok() && s.ok()) {
      p.client = std::move(*c);
      p.server = std::move(*s);
    }
    return p;
  };
  {
    UniqueFd raw;
    Pair p = raw_pair(raw);
    ASSERT_TRUE(p);
    uint8_t rec[16] = {'B', 'A', 'D', '!'};  // wrong magic, no fd
    ASSERT_EQ(::send(raw.get(), rec, sizeof rec, MSG_NOSIGNAL), 16);
    UniqueFd got;
    EXPECT_EQ(p.client->receive_fd(1, got, 1000), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {
    UniqueFd raw;
    Pair p = raw_pair(raw);
    ASSERT_TRUE(p);
    uint8_t rec[16] = {};
    internal::put_le32(rec, internal::wire::kFdMagic);
    internal::put_le64(rec + 8, 1);
    ASSERT_EQ(::send(raw.get(), rec, sizeof rec, MSG_NOSIGNAL), 16);  // a record without its fd
    UniqueFd got;
    EXPECT_EQ(p.client->receive_fd(1, got, 1000), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {
    UniqueFd raw;
    Pair p = raw_pair(raw);
    ASSERT_TRUE(p);
    uint8_t rec[16] = {};
    internal::put_le32(rec, internal::wire::kFdMagic);
    internal::put_le64(rec + 8, 1);
    UniqueFd a = memfd_with("a"), b = memfd_with("b");
    const int two[2] = {a.get(), b.get()};  // two fds for one record
    ASSERT_TRUE(internal::write_exact(raw.get(), rec, sizeof rec, internal::Deadline(1000), two).ok());
    UniqueFd got;
    EXPECT_EQ(p.client->receive_fd(1, got, 1000), GPUP_STATUS_PROTOCOL_ERROR);
  }
}

TEST(ChannelFds, StreamTransportsDoNotPassFds) {
  for (Kind k : {Kind::kUnixStream, Kind::kTcp}) {
    Pair p = make_pair(k);
    ASSERT_TRUE(p);
    UniqueFd fd = memfd_with("x");
    EXPECT_EQ(p.client->send_fd(1, fd.get()), GPUP_STATUS_NOT_SUPPORTED) << kind_name(k);
    UniqueFd got;
    EXPECT_EQ(p.server->receive_fd(1, got, 10), GPUP_STATUS_NOT_SUPPORTED) << kind_name(k);
  }
}

// ---------------------------------------------------------------------------------------------
// Stream framing against a raw peer

// A stream channel pair where `raw` is a duplicate of the socket under `victim`'s peer, so the
// test can write arbitrary bytes that `victim` will read.
struct RawStream {
  std::unique_ptr<Channel> victim, other;
  UniqueFd raw;
};

RawStream raw_stream(bool tcp) {
  RawStream r;
  UniqueFd server_sock, client_sock;
  if (tcp) {
    UniqueFd lst(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    EXPECT_EQ(::bind(lst.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(lst.get(), 1), 0);
    EXPECT_EQ(::getsockname(lst.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
    client_sock.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    EXPECT_EQ(::connect(client_sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    server_sock.reset(::accept4(lst.get(), nullptr, nullptr, SOCK_CLOEXEC));
  } else {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    server_sock.reset(sv[0]);
    client_sock.reset(sv[1]);
  }
  r.raw.reset(::dup(server_sock.get()));
  ChannelOptions opt;
  opt.transport = Transport::kStream;
  auto fut = std::async(std::launch::async, [&] { return accept_on_socket(std::move(server_sock), opt); });
  auto c = connect_on_socket(std::move(client_sock), opt);
  auto s = fut.get();
  EXPECT_TRUE(c.ok() && s.ok());
  if (c.ok() && s.ok()) {
    r.victim = std::move(*c);
    r.other = std::move(*s);
  }
  return r;
}

class StreamFraming : public ::testing::TestWithParam<bool> {};
INSTANTIATE_TEST_SUITE_P(All, StreamFraming, ::testing::Values(false, true),
                         [](const auto& info) { return std::string(info.param ? "Tcp" : "Unix"); });

TEST_P(StreamFraming, OversizedFrameHeaderIsAProtocolErrorAndClosesTheConnection) {
  RawStream r = raw_stream(GetParam());
  ASSERT_TRUE(r.victim);
  ASSERT_FALSE(r.victim->shares_memory());
  // A good frame first, then a header announcing one byte over the limit.
  uint8_t frame[4 + 3];
  internal::put_le32(frame, 3);
  std::memcpy(frame + 4, "abc", 3);
  ASSERT_EQ(::send(r.raw.get(), frame, sizeof frame, MSG_NOSIGNAL), 7);
  uint8_t bad[4];
  internal::put_le32(bad, kMaxMessageSize + 1);
  ASSERT_EQ(::send(r.raw.get(), bad, sizeof bad, MSG_NOSIGNAL), 4);
  std::vector<uint8_t> out;
  ASSERT_EQ(r.victim->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_EQ(text(out), "abc");
  EXPECT_EQ(r.victim->receive(out, 2000), GPUP_STATUS_PROTOCOL_ERROR);
  EXPECT_NE(last_error().message.find("131073"), std::string::npos) << last_error().message;
  EXPECT_EQ(r.victim->receive(out, 0), GPUP_STATUS_CONNECTION_LOST);
  // The raw peer sees the connection closed.
  EXPECT_GT(internal::poll_one(r.raw.get(), POLLIN, internal::Deadline(2000)), 0);
  char c;
  EXPECT_LE(::recv(r.raw.get(), &c, 1, MSG_DONTWAIT), 0);
}

TEST_P(StreamFraming, HugeFrameHeaderIsRejectedWithoutAllocating) {
  RawStream r = raw_stream(GetParam());
  ASSERT_TRUE(r.victim);
  uint8_t bad[4] = {0xff, 0xff, 0xff, 0xff};
  ASSERT_EQ(::send(r.raw.get(), bad, sizeof bad, MSG_NOSIGNAL), 4);
  std::vector<uint8_t> out;
  EXPECT_EQ(r.victim->receive(out, 2000), GPUP_STATUS_PROTOCOL_ERROR);
  EXPECT_LT(out.capacity(), size_t{1} << 20);
}

TEST_P(StreamFraming, PartialFrameSurvivesATimeout) {
  RawStream r = raw_stream(GetParam());
  ASSERT_TRUE(r.victim);
  std::vector<uint8_t> frame(4 + 100000);
  internal::put_le32(frame.data(), 100000);
  for (size_t i = 4; i < frame.size(); ++i) frame[i] = static_cast<uint8_t>(i);
  ASSERT_EQ(::send(r.raw.get(), frame.data(), 2, MSG_NOSIGNAL), 2);  // half a header
  std::vector<uint8_t> out;
  EXPECT_EQ(r.victim->receive(out, 30), GPUP_STATUS_TIMEOUT);
  ASSERT_EQ(::send(r.raw.get(), frame.data() + 2, 50000, MSG_NOSIGNAL), 50000);
  EXPECT_EQ(r.victim->receive(out, 30), GPUP_STATUS_TIMEOUT);
  ASSERT_TRUE(
      internal::write_exact(r.raw.get(), frame.data() + 50002, frame.size() - 50002, internal::Deadline(2000)).ok());
  ASSERT_EQ(r.victim->receive(out, 2000), GPUP_STATUS_SUCCESS);
  EXPECT_TRUE(std::equal(out.begin(), out.end(), frame.begin() + 4));
  EXPECT_EQ(out.size(), 100000u);
}

TEST_P(StreamFraming, SendToADeadPeerReturnsConnectionLostWithoutSigpipe) {
  RawStream r = raw_stream(GetParam());
  ASSERT_TRUE(r.victim);
  r.other.reset();
  r.raw.reset();
  // The default SIGPIPE disposition kills the process if MSG_NOSIGNAL is missing.
  const std::vector<uint8_t> chunk(64 * 1024, 1);
  gpup_status s = GPUP_STATUS_SUCCESS;
  for (int i = 0; i < 100 && s == GPUP_STATUS_SUCCESS; ++i) {
    s = r.victim->send(std::span<const uint8_t>(chunk));
    if (s == GPUP_STATUS_SUCCESS) std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(s, GPUP_STATUS_CONNECTION_LOST);
}

// ---------------------------------------------------------------------------------------------
// Set-up: listeners, endpoints, handshake validation

TEST(ChannelSetup, StaleSocketFileIsReplacedLiveOneIsNot) {
  const std::string path = temp_socket_path();
  {
    // Leave a stale socket file behind, as a crashed server would.
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  }
  auto l = Listener::listen_unix(path);
  ASSERT_TRUE(l.ok()) << l.error().describe();
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  auto second = Listener::listen_unix(path);
  EXPECT_EQ(second.status(), GPUP_STATUS_ALREADY_EXISTS);
  // The probe connection of the second listener shows up as a failed handshake, and the first
  // listener keeps working.
  auto probe = l->accept(1000);
  EXPECT_FALSE(probe.ok());
  auto fut = std::async(std::launch::async, [&] { return connect("unix:" + path); });
  auto s = l->accept(5000);
  EXPECT_TRUE(s.ok());
  EXPECT_TRUE(fut.get().ok());
  auto tcp = Listener::listen_tcp("127.0.0.1", 0);
  ASSERT_TRUE(tcp.ok());
  *l = std::move(*tcp);  // move-assignment releases the path
  EXPECT_NE(::access(path.c_str(), F_OK), 0) << "socket file left behind";
}

TEST(ChannelSetup, NonSocketFileIsNotReplaced) {
  const std::string path = temp_socket_path();
  { UniqueFd f(::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600)); }
  EXPECT_EQ(Listener::listen_unix(path).status(), GPUP_STATUS_ALREADY_EXISTS);
  EXPECT_EQ(::access(path.c_str(), F_OK), 0);
  ::unlink(path.c_str());
}

TEST(ChannelSetup, BadEndpointsAndOptionsAreRefused) {
  EXPECT_EQ(connect("").status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(connect("relative/path").status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(connect("tcp:127.0.0.1").status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(connect("tcp:127.0.0.1:0").status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(connect("tcp:127.0.0.1:70000").status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(connect("unix:/" + std::string(200, 'x')).status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(connect("unix:/nonexistent/gpup.sock").status(), GPUP_STATUS_NOT_FOUND);
  ChannelOptions shm;
  shm.transport = Transport::kSharedMemory;
  EXPECT_EQ(connect("tcp:127.0.0.1:1", shm).status(), GPUP_STATUS_NOT_SUPPORTED);
  for (size_t bad : {size_t{0}, size_t{4096}, kMinRingBytes + 8, kMaxRingBytes * 2}) {
    ChannelOptions o;
    o.ring_bytes = bad;
    EXPECT_EQ(connect("unix:/tmp/x.sock", o).status(), GPUP_STATUS_INVALID_PARAMETER) << bad;
  }
  ChannelOptions spin;
  spin.spin_us = -1;
  EXPECT_EQ(connect("unix:/tmp/x.sock", spin).status(), GPUP_STATUS_INVALID_PARAMETER);
}

TEST(ChannelSetup, AcceptTimesOutAndRingSizeIsNegotiated) {
  const std::string path = temp_socket_path();
  auto l = Listener::listen_unix(path);
  ASSERT_TRUE(l.ok());
  EXPECT_GE(l->fd(), 0);
  EXPECT_EQ(l->path(), path);
  EXPECT_EQ(l->accept(20).status(), GPUP_STATUS_TIMEOUT);
  ChannelOptions big;
  big.ring_bytes = 2 * 1024 * 1024;
  auto fut = std::async(std::launch::async, [&] { return connect(path, big); });
  auto s = l->accept(5000);
  auto c = fut.get();
  ASSERT_TRUE(s.ok() && c.ok());
  EXPECT_EQ(internal::shared_region_for_testing(**s).size(), internal::wire::shm_size(big.ring_bytes));
  EXPECT_EQ(internal::shared_region_for_testing(**c).size(), internal::wire::shm_size(big.ring_bytes));
}

// A raw client speaking the handshake by hand.
struct RawClient {
  UniqueFd sock;
  Result<std::unique_ptr<Channel>> server = Error();
};

RawClient raw_hello(const internal::wire::Hello& hello, int attach_fd = -1) {
  RawClient rc;
  int sv[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  rc.sock.reset(sv[1]);
  uint8_t buf[internal::wire::kHelloSize];
  internal::wire::encode(hello, buf);
  std::vector<int> fds;
  if (attach_fd >= 0) fds.push_back(attach_fd);
  EXPECT_TRUE(internal::write_exact(sv[1], buf, sizeof buf, internal::Deadline(1000), fds).ok());
  ChannelOptions opt;
  opt.handshake_timeout_ms = 500;
  rc.server = accept_on_socket(UniqueFd(sv[0]), opt);
  return rc;
}

internal::wire::Welcome read_welcome(int sock) {
  uint8_t buf[internal::wire::kWelcomeSize] = {};
  std::vector<UniqueFd> fds;
  EXPECT_TRUE(internal::read_exact(sock, buf, sizeof buf, internal::Deadline(1000), &fds, 8).ok());
  return internal::wire::decode_welcome(buf);
}

TEST(ChannelSetup, ServerValidatesTheClientHello) {
  namespace wire = internal::wire;
  wire::Hello bad_magic;
  bad_magic.magic = 0x12345678;
  bad_magic.transport = wire::kTransportShm;
  EXPECT_EQ(raw_hello(bad_magic).server.status(), GPUP_STATUS_PROTOCOL_ERROR);

  wire::Hello future;
  future.version = 99;
  future.transport = wire::kTransportShm;
  RawClient v = raw_hello(future);
  EXPECT_EQ(v.server.status(), GPUP_STATUS_VERSION_MISMATCH);
  EXPECT_EQ(read_welcome(v.sock.get()).status, GPUP_STATUS_VERSION_MISMATCH);

  wire::Hello odd_ring;
  odd_ring.transport = wire::kTransportShm;
  odd_ring.ring_bytes = 300000;
  RawClient o = raw_hello(odd_ring);
  EXPECT_EQ(o.server.status(), GPUP_STATUS_INVALID_PARAMETER);
  EXPECT_EQ(read_welcome(o.sock.get()).status, GPUP_STATUS_INVALID_PARAMETER);

  wire::Hello unknown;
  unknown.transport = 77;
  EXPECT_EQ(raw_hello(unknown).server.status(), GPUP_STATUS_PROTOCOL_ERROR);

  wire::Hello with_fd;
  with_fd.transport = wire::kTransportStream;
  UniqueFd stray = memfd_with("stray");
  EXPECT_EQ(raw_hello(with_fd, stray.get()).server.status(), GPUP_STATUS_PROTOCOL_ERROR);

  // A client that connects and says nothing is dropped after the handshake timeout.
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd silent(sv[1]);
  ChannelOptions opt;
  opt.handshake_timeout_ms = 50;
  EXPECT_EQ(accept_on_socket(UniqueFd(sv[0]), opt).status(), GPUP_STATUS_TIMEOUT);
}

// A raw server answering the handshake by hand with the given resources.
Result<std::unique_ptr<Channel>> connect_to_raw_server(const std::function<void(int sock)>& answer) {
  int sv[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd server(sv[0]);
  std::thread t([&] {
    uint8_t hello[internal::wire::kHelloSize];
    if (internal::read_exact(server.get(), hello, sizeof hello, internal::Deadline(2000)).ok()) answer(server.get());
  });
  ChannelOptions opt;
  opt.handshake_timeout_ms = 1000;
  auto r = connect_on_socket(UniqueFd(sv[1]), opt);
  t.join();
  return r;
}

void send_welcome(int sock, size_t ring_bytes, std::span<const int> fds, uint32_t declared_fds) {
  internal::wire::Welcome w;
  w.transport = internal::wire::kTransportShm;
  w.ring_bytes = static_cast<uint32_t>(ring_bytes);
  w.fd_count = declared_fds;
  uint8_t buf[internal::wire::kWelcomeSize];
  internal::wire::encode(w, buf);
  EXPECT_TRUE(internal::write_exact(sock, buf, sizeof buf, internal::Deadline(1000), fds).ok());
}

TEST(ChannelSetup, ClientValidatesTheServerResources) {
  const size_t ring = ChannelOptions{}.ring_bytes;
  const size_t size = internal::wire::shm_size(ring);
  auto make_memfd = [](size_t bytes, bool seal) {
    UniqueFd fd(::memfd_create("fake", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(bytes)), 0);
    if (seal) {
      EXPECT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
    }
    return fd;
  };
  auto efd = [] { return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); };
  UniqueFd e[4] = {efd(), efd(), efd(), efd()};

  {  // the real thing, by hand: accepted
    UniqueFd m = make_memfd(size, true);
    auto r = connect_to_raw_server([&](int s) {
      const int fds[5] = {m.get(), e[0].get(), e[1].get(), e[2].get(), e[3].get()};
      send_welcome(s, ring, fds, 5);
    });
    EXPECT_TRUE(r.ok()) << r.error().describe();
  }
  {  // memfd smaller than the declared rings
    UniqueFd m = make_memfd(size / 2, true);
    auto r = connect_to_raw_server([&](int s) {
      const int fds[5] = {m.get(), e[0].get(), e[1].get(), e[2].get(), e[3].get()};
      send_welcome(s, ring, fds, 5);
    });
    EXPECT_EQ(r.status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {  // not sealed: the server could shrink it under us (SIGBUS)
    UniqueFd m = make_memfd(size, false);
    auto r = connect_to_raw_server([&](int s) {
      const int fds[5] = {m.get(), e[0].get(), e[1].get(), e[2].get(), e[3].get()};
      send_welcome(s, ring, fds, 5);
    });
    EXPECT_EQ(r.status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {  // too few fds
    UniqueFd m = make_memfd(size, true);
    auto r = connect_to_raw_server([&](int s) {
      const int fds[3] = {m.get(), e[0].get(), e[1].get()};
      send_welcome(s, ring, fds, 5);
    });
    EXPECT_EQ(r.status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {  // too many fds
    UniqueFd m = make_memfd(size, true);
    auto r = connect_to_raw_server([&](int s) {
      const int fds[6] = {m.get(), e[0].get(), e[1].get(), e[2].get(), e[3].get(), e[0].get()};
      send_welcome(s, ring, fds, 6);
    });
    EXPECT_EQ(r.status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {  // a doorbell that is not an eventfd
    UniqueFd m = make_memfd(size, true);
    int pipefd[2];
    ASSERT_EQ(::pipe2(pipefd, O_CLOEXEC), 0);
    UniqueFd p0(pipefd[0]), p1(pipefd[1]);
    auto r = connect_to_raw_server([&](int s) {
      const int fds[5] = {m.get(), e[0].get(), p0.get(), e[2].get(), e[3].get()};
      send_welcome(s, ring, fds, 5);
    });
    EXPECT_EQ(r.status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {  // a different ring size than asked for
    UniqueFd m = make_memfd(internal::wire::shm_size(ring * 2), true);
    auto r = connect_to_raw_server([&](int s) {
      const int fds[5] = {m.get(), e[0].get(), e[1].get(), e[2].get(), e[3].get()};
      send_welcome(s, ring * 2, fds, 5);
    });
    EXPECT_EQ(r.status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {  // the server hangs up instead of answering
    auto r = connect_to_raw_server([](int s) { ::shutdown(s, SHUT_RDWR); });
    EXPECT_EQ(r.status(), GPUP_STATUS_CONNECTION_LOST);
  }
}

TEST(ChannelSetup, SharedMemoryRefusedOverTcpByTheServer) {
  auto l = Listener::listen_tcp("127.0.0.1", 0);
  ASSERT_TRUE(l.ok());
  EXPECT_GT(l->port(), 0);
  EXPECT_TRUE(l->path().empty());
  // A client that asks for shared memory over TCP anyway (by hand).
  UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(l->port());
  ASSERT_EQ(::connect(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  internal::wire::Hello h;
  h.transport = internal::wire::kTransportShm;
  uint8_t buf[internal::wire::kHelloSize];
  internal::wire::encode(h, buf);
  ASSERT_EQ(::send(s.get(), buf, sizeof buf, MSG_NOSIGNAL), 16);
  EXPECT_EQ(l->accept(2000).status(), GPUP_STATUS_NOT_SUPPORTED);
  EXPECT_EQ(read_welcome(s.get()).status, GPUP_STATUS_NOT_SUPPORTED);
}

}  // namespace
}  // namespace gpup::channel
