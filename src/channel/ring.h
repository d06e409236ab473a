// Single-producer / single-consumer byte ring over a caller-provided memory region.
//
// The region is normally a MAP_SHARED mapping of a memfd seen by two processes: one process is the
// producer, the other the consumer. The peer is untrusted: everything read back from the shared
// region (the counters and each record's length) is validated before it is used, and a value that
// cannot come from an honest peer yields GPUP_STATUS_PROTOCOL_ERROR, never an out-of-bounds access.
//
// Region layout (shared-memory ABI between the two processes: changing it requires a new
// channel-layer version in the handshake):
//
//   [0, 256)              RingHeader: four 64-byte cache lines
//                           line 0: tail  (u64, bytes ever produced; written by the producer only)
//                           line 1: head  (u64, bytes ever consumed; written by the consumer only)
//                           line 2: consumer_sleeping (u32, doorbell flag, see below)
//                           line 3: producer_waiting  (u32, doorbell flag, see below)
//   [256, 256 + capacity) data area; capacity is a power of two
//
// head and tail increase monotonically and are never reduced modulo the capacity; the byte at
// counter value c lives at data[c & (capacity - 1)]. tail - head is the number of bytes in use.
//
// A record is [u32 payload length, host byte order][payload], padded with unspecified bytes to a
// multiple of 8. Records start 8-aligned, so the 4-byte length never straddles the end of the data
// area, while the payload may: it is then copied in two pieces (no padding is wasted at the end).
//
// Memory ordering: the producer fills the record, then publishes it with a release store of tail;
// the consumer observes tail with an acquire load before reading the record. Symmetrically the
// consumer releases the space with a release store of head after it finished copying the record
// out, and the producer observes head with an acquire load before overwriting that space.
//
// Doorbell flags (the sleeping protocol itself lives in the channel; the ring only provides the
// flag operations with the right fences):
//   - A consumer about to sleep calls announce_consumer_sleep() (flag := 1, seq_cst fence), then
//     re-checks read_ready(); only if the ring is still empty does it sleep. A producer, after
//     publishing, calls take_consumer_sleep() (seq_cst fence, then clear the flag if set) and
//     wakes the consumer when it returns true. The two fences guarantee that either the consumer's
//     re-check sees the new record or the producer sees the flag: no lost wake-up.
//   - A producer waiting for space calls announce_producer_wait(n) (flag := n bytes wanted free,
//     seq_cst fence) and re-checks write_ready(); the consumer, after releasing space, calls
//     take_producer_wait(), which returns true (and clears the flag) once at least n bytes are free.
//     Asking for more than the record needs (the channel asks for half the ring) batches wake-ups.
//
// Threading: a Ring object is used by at most one producer thread (try_write, write_ready,
// *_producer_wait announce/withdraw, take_consumer_sleep) and one consumer thread (try_read,
// read_ready, *_consumer_sleep announce/withdraw, take_producer_wait) at a time; the two may run
// concurrently, in the same process or in different ones. The Ring does not own the region.
#pragma once

#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/result.h"
#include "gpup/status.h"

namespace gpup::channel {

// The shared header. Exposed so that tests (and debuggers) can inspect it; production code goes
// through Ring.
struct RingHeader {
  alignas(64) std::atomic<uint64_t> tail;
  alignas(64) std::atomic<uint64_t> head;
  alignas(64) std::atomic<uint32_t> consumer_sleeping;
  alignas(64) std::atomic<uint32_t> producer_waiting;
};
static_assert(sizeof(RingHeader) == 256);
static_assert(std::atomic<uint64_t>::is_always_lock_free, "ring counters must be lock-free to work across processes");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "ring flags must be lock-free to work across processes");

class Ring {
 public:
  static constexpr size_t kHeaderSize = sizeof(RingHeader);
  static constexpr size_t kRecordHeaderSize = sizeof(uint32_t);
  static constexpr size_t kRecordAlign = 8;
  static constexpr size_t kMinCapacity = 64;
  static constexpr size_t kMaxCapacity = size_t{1} << 30;  // lengths must fit the u32 record header
  static constexpr size_t kRegionAlign = 64;

  // try_write: the record does not fit in the free space right now (retry after the consumer read).
  static constexpr gpup_status kFull = GPUP_STATUS_BUSY;
  // try_read: no record is available right now.
  static constexpr gpup_status kEmpty = GPUP_STATUS_PENDING;

  // Bytes a record carrying `payload` bytes occupies in the data area.
  static constexpr size_t record_size(size_t payload) {
    return (kRecordHeaderSize + payload + (kRecordAlign - 1)) & ~(kRecordAlign - 1);
  }
  // Region bytes needed for a ring with the given data capacity.
  static constexpr size_t region_size(size_t capacity) { return kHeaderSize + capacity; }

  // Formats a new ring in `region` (counters and flags zeroed). Only the side that creates the
  // region calls this, before the region is shared. The data capacity is region.size() - 256 and
  // must be a power of two in [kMinCapacity, kMaxCapacity]; region.data() must be 64-byte aligned.
  // INVALID_PARAMETER otherwise.
  static Result<Ring> create(std::span<uint8_t> region);
  // Attaches to a ring that the peer formatted. Same checks as create(); the counters are taken as
  // found and validated on every use. The capacity comes from region.size() (which the caller
  // validated against the mapping), never from shared memory.
  static Result<Ring> attach(std::span<uint8_t> region);

  Ring() = default;
  Ring(Ring&&) noexcept = default;
  Ring& operator=(Ring&&) noexcept = default;
  Ring(const Ring&) = delete;  // the private counter copies must not be duplicated
  Ring& operator=(const Ring&) = delete;

  size_t capacity() const { return capacity_; }
  // Largest payload a single record can carry in this ring.
  size_t max_payload() const { return capacity_ - kRecordHeaderSize; }

  // ---- producer side ----

  // Appends one record whose payload is the concatenation of `parts`. Returns SUCCESS (published),
  // kFull (not enough free space now; nothing written), MESSAGE_TOO_LARGE (the record can never fit
  // this ring), or PROTOCOL_ERROR (the shared head counter is inconsistent: the peer is corrupt).
  gpup_status try_write(std::span<const std::span<const uint8_t>> parts);
  // try_write(header, body, trailer): gathers its arguments without building a span array first.
  template <typename... Parts>
  requires(sizeof...(Parts) >= 1 && (std::convertible_to<const Parts&, std::span<const uint8_t>> && ...)) gpup_status
      try_write(const Parts&... parts) {
    const std::span<const uint8_t> list[] = {std::span<const uint8_t>(parts)...};
    return try_write(std::span<const std::span<const uint8_t>>(list));
  }
  // True when try_write of a `payload`-byte record would not return kFull (it may still fail with
  // MESSAGE_TOO_LARGE or PROTOCOL_ERROR).
  bool write_ready(size_t payload) const;

  // ---- consumer side ----

  // Copies the next record's payload into `out` (resized to the payload length) and releases its
  // space. Returns SUCCESS, kEmpty, or PROTOCOL_ERROR (the shared tail or the record length is
  // inconsistent; `out` is then unspecified and the ring must not be used any more).
  gpup_status try_read(std::vector<uint8_t>& out);
  // True when try_read would not return kEmpty (a record is there, or the counters are corrupt and
  // try_read will report it).
  bool read_ready() const;

  // ---- doorbell flags (see the header comment) ----

  void announce_consumer_sleep();  // consumer
  void withdraw_consumer_sleep();  // consumer
  bool take_consumer_sleep();      // producer, after publishing: true = wake the consumer

  void announce_producer_wait(size_t want_free_bytes);  // producer
  void withdraw_producer_wait();                        // producer
  bool take_producer_wait();                            // consumer, after reading: true = wake the producer

  // Bytes in use as seen by the consumer (for tests and diagnostics; racy by nature).
  uint64_t used_bytes() const;

 private:
  Ring(RingHeader* header, uint8_t* data, size_t capacity);
  static Result<Ring> check_region(std::span<uint8_t> region, const char* what);

  void copy_in(uint64_t pos, const uint8_t* src, size_t n);
  void copy_out(uint64_t pos, uint8_t* dst, size_t n) const;

  RingHeader* header_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t capacity_ = 0;
  uint64_t mask_ = 0;
  // Private copies of the counters this side owns; shared memory is written from these and never
  // read back for them, so a peer overwriting our counter cannot confuse us.
  uint64_t tail_ = 0;  // producer's
  uint64_t head_ = 0;  // consumer's
};

}  // namespace gpup::channel
