// A fake VM worker for the libgpupkmt unit tests: listens on a temporary AF_UNIX socket, accepts
// one guest connection and speaks the wire protocol minimally (Hello with the fence page, objects
// with counters for handles, allocations backed by memfds, CPU waits signalled on demand).
//
// Threads: one serving thread (started by the constructor, joined by the destructor) receives and
// answers requests in order. The test thread may call every public method at any time; state is
// guarded by an internal mutex and Channel::send is thread-safe.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "channel/channel.h"
#include "common/fd.h"
#include "protocol/codec.h"

namespace gpup::kmt::test {

inline constexpr uint64_t kFakeLuid = 0x1234'0000'0001ull;
// One compute-only adapter with LUID kFakeLuid, a 1 GiB budget and a description.
proto::AdapterDesc fake_adapter();

struct FakeHostOptions {
  uint32_t fence_slots = 64;
  std::vector<proto::AdapterDesc> adapters = {fake_adapter()};
  // Negative: Hello is refused with this status and text.
  gpup_status hello_error = GPUP_STATUS_SUCCESS;
  std::string hello_error_text;
};

class FakeHost {
 public:
  using Options = FakeHostOptions;
  static constexpr uint64_t kLuid = kFakeLuid;

  explicit FakeHost(Options options = Options());
  ~FakeHost();
  FakeHost(const FakeHost&) = delete;
  FakeHost& operator=(const FakeHost&) = delete;

  std::string endpoint() const { return "unix:" + path_; }

  // Called (on the serving thread) for every request before the default handling; returns true
  // when it handled (or deliberately ignored) the request.
  using Hook = std::function<bool(FakeHost&, const proto::Message&)>;
  void set_hook(Hook hook);

  // Requests received so far, by opcode (counted before the reply is sent).
  uint64_t received(proto::Op op) const;
  // Waits until `n` requests of `op` have been handled (replied to, or for async messages their
  // effects recorded); false on timeout.
  bool wait_received(proto::Op op, uint64_t n, int timeout_ms = 5000) const;
  bool shares_memory() const;

  // --- replies, for hooks ------------------------------------------------------------------------
  template <proto::Op O>
  void reply(const proto::Message& req, const typename proto::MessageTraits<O>::Reply& rep,
             std::span<const uint8_t> tail = {}, int32_t status = GPUP_STATUS_SUCCESS) {
    auto enc = proto::encode_reply<O>(rep, req.header.txn, tail, status);
    if (enc) send(*enc);
  }
  void reply_error(const proto::Message& req, gpup_status status, const std::string& text);

  // --- host-side actions (any thread) ------------------------------------------------------------
  // Sets a fence value: in the page (shared memory) or by a FenceValue notification (stream).
  void set_fence(uint32_t sync_object, uint64_t value);
  // set_fence, then SignalGuestEvent for every registered CPU wait it satisfies.
  void signal(uint32_t sync_object, uint64_t value);
  void context_error(uint32_t context, gpup_status status, uint64_t submission_id, const std::string& text);
  void device_state_changed(uint32_t device, uint32_t state, gpup_status reason);
  // Changes the device state the host reports and advances the page's device_state_counter,
  // without a notification.
  void set_device_state_silently(uint32_t state, gpup_status reason);
  void send_raw(std::span<const uint8_t> bytes);
  void drop_connection();

  // Host view of an allocation's bytes.
  std::vector<uint8_t> allocation_bytes(uint32_t allocation) const;
  void fill_allocation(uint32_t allocation, uint8_t seed);
  std::vector<uint8_t> last_submission() const;
  uint64_t last_submission_id() const;

  // Shared sections the guest registered and has not unregistered.
  size_t live_sections() const;
  // Bytes [offset, offset + size) of a registered section, for hooks; empty if out of range.
  std::span<uint8_t> section_span(uint32_t section, uint64_t offset, uint64_t size) const;
  // The private data of the last CreateAllocation or Escape (inline or from a section).
  std::vector<uint8_t> last_private_data() const;
  // The private data of a CreateAllocation/Escape request (its tail, or the bytes its section
  // reference names), for hooks.
  std::vector<uint8_t> private_data_of(const proto::Message& m) const;

 private:
  struct Allocation {
    UniqueFd memfd;
    uint64_t size = 0;
  };
  struct Section {
    uint8_t* map = nullptr;
    uint64_t size = 0;
  };
  struct CpuWait {
    uint64_t event_id;
    uint32_t sync_object;
    uint64_t value;
  };

  void serve();
  void handle(const proto::Message& m);
  void send(const proto::Encoded& enc);
  uint64_t fence_locked(uint32_t slot) const;
  // Sets a fence value; on a stream channel appends the FenceValue notification to `notes` (sent
  // by the caller after unlocking, in order).
  void set_fence_locked(uint32_t sync_object, uint64_t value, std::vector<std::vector<uint8_t>>& notes);

  Options options_;
  std::string path_;
  std::unique_ptr<channel::Listener> listener_;
  std::thread thread_;
  std::atomic<bool> stop_{false};

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::shared_ptr<channel::Channel> ch_;
  Hook hook_;
  std::map<uint16_t, uint64_t> counts_;   // received
  std::map<uint16_t, uint64_t> handled_;
  UniqueFd fence_fd_;
  uint8_t* fence_page_ = nullptr;  // header + slots, shared memory only
  size_t fence_page_size_ = 0;
  std::vector<uint64_t> stream_fences_;
  uint32_t device_state_ = 0;
  gpup_status device_reason_ = 0;
  uint32_t state_counter_ = 0;
  uint32_t next_handle_ = 1;
  uint64_t next_section_ = 100;
  std::map<uint32_t, uint32_t> sync_slots_;
  std::map<uint32_t, Allocation> allocations_;
  std::vector<CpuWait> waits_;
  std::vector<uint8_t> last_submission_;
  uint64_t last_submission_id_ = 0;
  std::map<uint32_t, Section> sections_;
  std::vector<uint8_t> last_private_data_;
};

}  // namespace gpup::kmt::test
