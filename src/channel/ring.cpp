#include "channel/ring.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <new>
#include <string>

#include "common/log.h"

namespace gpup::channel {

Ring::Ring(RingHeader* header, uint8_t* data, size_t capacity)
    : header_(header), data_(data), capacity_(capacity), mask_(capacity - 1) {}

Result<Ring> Ring::check_region(std::span<uint8_t> region, const char* what) {
  if (region.data() == nullptr || reinterpret_cast<uintptr_t>(region.data()) % kRegionAlign != 0) {
    return make_error(GPUP_STATUS_INVALID_PARAMETER, std::string("ring ") + what + ": region must be 64-byte aligned");
  }
  if (region.size() < region_size(kMinCapacity)) {
    return make_error(GPUP_STATUS_INVALID_PARAMETER, std::string("ring ") + what + ": region of " +
                                                         std::to_string(region.size()) + " bytes is too small");
  }
  const size_t capacity = region.size() - kHeaderSize;
  if (!std::has_single_bit(capacity) || capacity > kMaxCapacity) {
    return make_error(GPUP_STATUS_INVALID_PARAMETER, std::string("ring ") + what + ": data capacity " +
                                                         std::to_string(capacity) + " is not a power of two in [" +
                                                         std::to_string(kMinCapacity) + ", " +
                                                         std::to_string(kMaxCapacity) + "]");
  }
  return Ring(nullptr, region.data() + kHeaderSize, capacity);
}

Result<Ring> Ring::create(std::span<uint8_t> region) {
  Result<Ring> r = check_region(region, "create");
  if (!r) return r;
  // Start the lifetime of the shared header in this region; the atomics are value-initialized.
  r->header_ = new (region.data()) RingHeader{};
  r->header_->tail.store(0, std::memory_order_relaxed);
  r->header_->head.store(0, std::memory_order_relaxed);
  r->header_->consumer_sleeping.store(0, std::memory_order_relaxed);
  r->header_->producer_waiting.store(0, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  return r;
}

Result<Ring> Ring::attach(std::span<uint8_t> region) {
  Result<Ring> r = check_region(region, "attach");
  if (!r) return r;
  // The header was constructed by the peer (possibly in another process).
  r->header_ = std::launder(reinterpret_cast<RingHeader*>(region.data()));
  r->tail_ = r->header_->tail.load(std::memory_order_acquire);
  r->head_ = r->header_->head.load(std::memory_order_acquire);
  return r;
}

void Ring::copy_in(uint64_t pos, const uint8_t* src, size_t n) {
  const size_t off = static_cast<size_t>(pos & mask_);
  const size_t first = std::min(n, capacity_ - off);
  std::memcpy(data_ + off, src, first);
  if (n > first) std::memcpy(data_, src + first, n - first);
}

void Ring::copy_out(uint64_t pos, uint8_t* dst, size_t n) const {
  const size_t off = static_cast<size_t>(pos & mask_);
  const size_t first = std::min(n, capacity_ - off);
  std::memcpy(dst, data_ + off, first);
  if (n > first) std::memcpy(dst + first, data_, n - first);
}

gpup_status Ring::try_write(std::span<const std::span<const uint8_t>> parts) {
  size_t total = 0;
  for (const auto& p : parts) {
    // Compare before adding so that absurd part sizes cannot wrap the sum around.
    if (p.size() > max_payload() - total) return GPUP_STATUS_MESSAGE_TOO_LARGE;
    total += p.size();
  }
  const size_t rec = record_size(total);

  const uint64_t head = header_->head.load(std::memory_order_acquire);
  const uint64_t used = tail_ - head;  // wraps to a huge value if the peer moved head past tail
  if (used > capacity_) {
    spdlog::error("channel ring: consumer head {} is inconsistent with tail {} (capacity {})", head, tail_, capacity_);
    return GPUP_STATUS_PROTOCOL_ERROR;
  }
  if (rec > capacity_ - used) return kFull;

  // The record header is 8-aligned and the capacity a multiple of 8: it never straddles the end.
  const uint32_t len = static_cast<uint32_t>(total);
  std::memcpy(data_ + (tail_ & mask_), &len, sizeof len);
  uint64_t pos = tail_ + kRecordHeaderSize;
  for (const auto& p : parts) {
    if (p.empty()) continue;
    copy_in(pos, p.data(), p.size());
    pos += p.size();
  }
  tail_ += rec;
  header_->tail.store(tail_, std::memory_order_release);
  return GPUP_STATUS_SUCCESS;
}

bool Ring::write_ready(size_t payload) const {
  if (payload > max_payload()) return true;  // try_write reports MESSAGE_TOO_LARGE
  const uint64_t used = tail_ - header_->head.load(std::memory_order_acquire);
  if (used > capacity_) return true;  // try_write reports PROTOCOL_ERROR
  return record_size(payload) <= capacity_ - used;
}

gpup_status Ring::try_read(std::vector<uint8_t>& out) {
  const uint64_t tail = header_->tail.load(std::memory_order_acquire);
  const uint64_t avail = tail - head_;  // wraps to a huge value if the peer moved tail backwards
  if (avail == 0) return kEmpty;
  if (avail > capacity_ || avail % kRecordAlign != 0) {
    spdlog::error("channel ring: producer tail {} is inconsistent with head {} (capacity {})", tail, head_, capacity_);
    return GPUP_STATUS_PROTOCOL_ERROR;
  }
  // Read the length exactly once; the peer may rewrite it at any time, so it is validated on this
  // private copy and the shared value is never consulted again.
  const uint32_t len =
      std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(data_ + (head_ & mask_))).load(std::memory_order_relaxed);
  if (len > max_payload() || record_size(len) > avail) {
    spdlog::error("channel ring: record length {} needs more than the {} bytes published (capacity {})", len, avail,
                  capacity_);
    return GPUP_STATUS_PROTOCOL_ERROR;
  }
  out.resize(len);
  // An empty vector's data() may be null, and memcpy to null is undefined even for 0 bytes.
  if (len > 0) copy_out(head_ + kRecordHeaderSize, out.data(), len);
  head_ += record_size(len);
  header_->head.store(head_, std::memory_order_release);
  return GPUP_STATUS_SUCCESS;
}

bool Ring::read_ready() const { return header_->tail.load(std::memory_order_acquire) != head_; }

uint64_t Ring::used_bytes() const { return header_->tail.load(std::memory_order_acquire) - head_; }

void Ring::announce_consumer_sleep() {
  header_->consumer_sleeping.store(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

void Ring::withdraw_consumer_sleep() { header_->consumer_sleeping.store(0, std::memory_order_relaxed); }

bool Ring::take_consumer_sleep() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // Load first so the common case (consumer awake) does not write the shared cache line.
  return header_->consumer_sleeping.load(std::memory_order_relaxed) != 0 &&
         header_->consumer_sleeping.exchange(0, std::memory_order_relaxed) != 0;
}

void Ring::announce_producer_wait(size_t want_free_bytes) {
  const size_t want = std::max<size_t>(1, std::min(want_free_bytes, capacity_));
  header_->producer_waiting.store(static_cast<uint32_t>(want), std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

void Ring::withdraw_producer_wait() { header_->producer_waiting.store(0, std::memory_order_relaxed); }

bool Ring::take_producer_wait() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint32_t want = header_->producer_waiting.load(std::memory_order_relaxed);
  if (want == 0) return false;
  const uint64_t used = header_->tail.load(std::memory_order_acquire) - head_;
  // A corrupt tail makes `used` meaningless; waking the producer then is harmless.
  if (used <= capacity_ && capacity_ - used < want) return false;
  return header_->producer_waiting.exchange(0, std::memory_order_relaxed) != 0;
}

}  // namespace gpup::channel
