// Shared-memory transport: one ring per direction in a memfd, eventfd doorbells, and the AF_UNIX
// socket for fd passing and liveness.
//
// Waiting (both for data as a consumer and for space as a producer):
//   1. spin for spin_us re-checking the ring (a wake-up through the kernel costs more than that);
//   2. announce the wait in the ring header (flag + seq_cst fence), re-check the ring: if the
//      condition now holds, withdraw and go on (the peer may or may not ring; a stale doorbell only
//      causes one spurious wake-up later);
//   3. poll() the doorbell eventfd together with the socket (POLLRDHUP: a dead or departed peer,
//      and our own shutdown(), wake us at once; pending fd records do not, since POLLIN is not
//      requested on the socket), then drain the eventfd, withdraw, and re-evaluate.
// The side that changes the ring rings the doorbell only when the flag says the other side
// sleeps (Ring::take_consumer_sleep / take_producer_wait), so an uncontended send costs no system
// call at all.
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>

#include "channel/internal.h"

namespace gpup::channel::internal {
namespace {

class ShmChannel final : public Channel {
 public:
  ShmChannel(ShmParts parts, const ChannelOptions& options)
      : Channel(true, peer_pid_of(parts.socket.get())), p_(std::move(parts)), spin_us_(options.spin_us) {}

  ~ShmChannel() override { shutdown(); }

  void shutdown() override {
    closed_.store(true, std::memory_order_seq_cst);
    // Wakes our own pollers (POLLHUP) and tells the peer (it sees POLLRDHUP/POLLHUP, then EOF).
    ::shutdown(p_.socket.get(), SHUT_RDWR);
    std::lock_guard lk(fd_mu_);
    fd_cv_.notify_all();
  }

  std::span<uint8_t> region() const { return p_.mapping.span(); }

 protected:
  gpup_status send_impl(std::span<const std::span<const uint8_t>> parts, size_t total) override;
  gpup_status receive_impl(std::vector<uint8_t>& out, int timeout_ms) override;
  gpup_status send_fd_impl(uint64_t id, int fd) override;
  gpup_status receive_fd_impl(uint64_t id, UniqueFd& out, int timeout_ms) override;

 private:
  // Spins, then sleeps on `efd` and the socket, until ready() holds, the deadline passes, the
  // channel is closed locally or the peer goes away (peer_gone_ is then set). The caller
  // re-evaluates its condition afterwards in every case.
  template <typename Ready, typename Announce, typename Withdraw>
  void wait(Ready ready, Announce announce, Withdraw withdraw, int efd, const Deadline& deadline);

  // Ends the channel (both sides see it closed) and reports `status`.
  gpup_status break_channel(gpup_status status, std::string message) {
    shutdown();
    return fail(status, std::move(message));
  }
  // The peer broke the protocol: nothing it sends can be trusted any more.
  gpup_status protocol_error(std::string message) {
    return break_channel(GPUP_STATUS_PROTOCOL_ERROR, std::move(message));
  }

  // Reads fd records from the socket until at least one is complete (appended to `got`), the
  // deadline passes (TIMEOUT), the peer closed (CONNECTION_LOST) or misbehaved (PROTOCOL_ERROR).
  // Only the current fd reader (fd_reader_active_) calls it.
  gpup_status read_fd_records(const Deadline& deadline, std::vector<std::pair<uint64_t, UniqueFd>>& got,
                              std::string& why);

  ShmParts p_;
  const int spin_us_;
  std::atomic<bool> closed_{false};     // shutdown() or protocol error: everything fails now
  std::atomic<bool> peer_gone_{false};  // the socket reported hang-up: the peer will not come back

  std::mutex send_mu_;  // serializes producers of the tx ring
  std::mutex recv_mu_;  // serializes consumers of the rx ring

  std::mutex fd_send_mu_;  // one fd record at a time on the socket
  std::mutex fd_mu_;       // guards the fields below
  std::condition_variable fd_cv_;
  bool fd_reader_active_ = false;  // one thread reads the socket; the others wait on fd_cv_
  bool fd_eof_ = false;            // the socket reached end of file
  std::unordered_map<uint64_t, UniqueFd> fd_pending_;
  // Owned by the active reader (handed over under fd_mu_):
  std::vector<uint8_t> fd_rbuf_;   // bytes of incomplete records
  std::deque<UniqueFd> fd_queue_;  // fds received, not yet matched with a complete record
};

template <typename Ready, typename Announce, typename Withdraw>
void ShmChannel::wait(Ready ready, Announce announce, Withdraw withdraw, int efd, const Deadline& deadline) {
  using Clock = std::chrono::steady_clock;
  if (spin_us_ > 0) {
    Clock::time_point spin_end = Clock::now() + std::chrono::microseconds(spin_us_);
    if (!deadline.infinite()) spin_end = std::min(spin_end, deadline.when());
    do {
      for (int i = 0; i < 32; ++i) {
        if (ready()) return;
        cpu_relax();
      }
      if (closed_.load(std::memory_order_relaxed)) return;
    } while (Clock::now() < spin_end);
  }
  for (;;) {
    if (closed_.load()) return;
    announce();
    if (ready()) {
      withdraw();
      return;
    }
    pollfd fds[2] = {{efd, POLLIN, 0}, {p_.socket.get(), POLLRDHUP, 0}};
    const int n = ::poll(fds, 2, deadline.poll_ms());
    const int err = errno;
    if (fds[0].revents & POLLIN) eventfd_drain(efd);
    withdraw();
    if (n < 0) {
      if (err == EINTR) continue;
      // poll() on our own valid fds cannot fail short of resource exhaustion; give up rather than spin.
      break_channel(errno_status(err), errno_text("poll", err));
      return;
    }
    if (fds[1].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)) {
      if (!closed_.load()) peer_gone_.store(true);
      return;
    }
    if (fds[0].revents & (POLLERR | POLLNVAL)) {  // a doorbell that cannot ring: give up
      break_channel(GPUP_STATUS_INTERNAL, "doorbell eventfd failed");
      return;
    }
    if (n > 0 || deadline.expired()) return;
  }
}

gpup_status ShmChannel::send_impl(std::span<const std::span<const uint8_t>> parts, size_t total) {
  std::lock_guard lk(send_mu_);
  const Deadline forever(-1);
  for (;;) {
    if (closed_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "send: the channel is shut down");
    if (peer_gone_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "send: the peer closed the channel");
    const gpup_status s = p_.tx.try_write(parts);
    if (s == GPUP_STATUS_SUCCESS) {
      if (p_.tx.take_consumer_sleep()) eventfd_signal(p_.tx_data.get());
      return GPUP_STATUS_SUCCESS;
    }
    if (s == GPUP_STATUS_PROTOCOL_ERROR) {
      return protocol_error("send: the peer corrupted the ring's consumer counter");
    }
    if (s != Ring::kFull) {
      return fail(s, "send: a message of " + std::to_string(total) + " bytes does not fit a ring of " +
                         std::to_string(p_.tx.capacity()) + " bytes");
    }
    // Full: wait until the consumer has freed half the ring (or at least this record), so that a
    // steady stream wakes us once per half ring rather than once per message.
    const size_t want = std::max(Ring::record_size(total), p_.tx.capacity() / 2);
    wait([&] { return p_.tx.write_ready(total); }, [&] { p_.tx.announce_producer_wait(want); },
         [&] { p_.tx.withdraw_producer_wait(); }, p_.tx_space.get(), forever);
  }
}

gpup_status ShmChannel::receive_impl(std::vector<uint8_t>& out, int timeout_ms) {
  std::lock_guard lk(recv_mu_);
  const Deadline deadline(timeout_ms);
  for (;;) {
    if (closed_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "receive: the channel is shut down");
    const gpup_status s = p_.rx.try_read(out);
    if (s == GPUP_STATUS_SUCCESS) {
      // The ring bounds a record only by its capacity (up to 64 MiB, chosen by the client); the
      // message limit must hold here as on the stream transport.
      if (out.size() > kMaxMessageSize) {
        return protocol_error("receive: the peer sent a message of " + std::to_string(out.size()) +
                              " bytes, the limit is " + std::to_string(kMaxMessageSize));
      }
      if (p_.rx.take_producer_wait()) eventfd_signal(p_.rx_space.get());
      return GPUP_STATUS_SUCCESS;
    }
    if (s != Ring::kEmpty) return protocol_error("receive: the peer corrupted the ring (record length or counter)");
    // Empty. Messages sent before the peer left have been delivered by now.
    if (peer_gone_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "receive: the peer closed the channel");
    if (deadline.expired()) return GPUP_STATUS_TIMEOUT;
    wait([&] { return p_.rx.read_ready(); }, [&] { p_.rx.announce_consumer_sleep(); },
         [&] { p_.rx.withdraw_consumer_sleep(); }, p_.rx_data.get(), deadline);
  }
}

gpup_status ShmChannel::send_fd_impl(uint64_t id, int fd) {
  std::lock_guard lk(fd_send_mu_);
  uint8_t rec[wire::kFdRecordSize] = {};
  put_le32(rec, wire::kFdMagic);
  put_le64(rec + 8, id);
  const int sock = p_.socket.get();
  size_t sent = 0;
  while (sent < sizeof rec) {
    if (closed_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "send_fd: the channel is shut down");
    // The fd travels with the record's first byte.
    const ssize_t r = send_with_fds(sock, rec + sent, sizeof rec - sent,
                                    sent == 0 ? std::span<const int>(&fd, 1) : std::span<const int>(), MSG_DONTWAIT);
    if (r >= 0) {
      sent += static_cast<size_t>(r);
      continue;
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      // The peer is not collecting fds; wait for room (or for the peer / us to close).
      if (poll_one(sock, POLLOUT, Deadline(-1)) < 0) {
        return break_channel(errno_status(errno), errno_text("send_fd: poll", errno));
      }
      continue;
    }
    if (sent == 0 && (err == EBADF || err == EINVAL)) {  // nothing sent: the channel is intact
      return fail(GPUP_STATUS_INVALID_PARAMETER,
                  errno_text("send_fd: fd " + std::to_string(fd) + " cannot be passed", err));
    }
    if (sent == 0 && err == ETOOMANYREFS) {
      return fail(GPUP_STATUS_BUSY, errno_text("send_fd: too many fds in flight to the peer", err));
    }
    // The peer is gone, or a partly written record would desynchronize the fd stream: either way
    // the channel cannot go on.
    const gpup_status st = errno_status(err);
    return break_channel(st == GPUP_STATUS_INTERNAL ? GPUP_STATUS_CONNECTION_LOST : st,
                         errno_text("send_fd: sendmsg", err));
  }
  return GPUP_STATUS_SUCCESS;
}

gpup_status ShmChannel::read_fd_records(const Deadline& deadline, std::vector<std::pair<uint64_t, UniqueFd>>& got,
                                        std::string& why) {
  constexpr size_t kBatch = 32;
  const int sock = p_.socket.get();
  for (;;) {
    uint8_t buf[wire::kFdRecordSize * kBatch];
    std::vector<UniqueFd> fds;
    ReceivedFds info;
    const ssize_t r = receive_with_fds(sock, buf, sizeof buf, &fds, kMaxFdsPerMessage, MSG_DONTWAIT, &info);
    if (r < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        const int ev = poll_one(sock, POLLIN, deadline);
        if (ev == 0) return GPUP_STATUS_TIMEOUT;
        if (ev < 0) {
          why = errno_text("poll", errno);
          return GPUP_STATUS_CONNECTION_LOST;
        }
        continue;
      }
      why = errno_text("recvmsg", err);
      return GPUP_STATUS_CONNECTION_LOST;
    }
    for (auto& fd : fds) fd_queue_.push_back(std::move(fd));
    if (info.extra || info.fds_truncated) {
      why = "the peer attached more file descriptors than any fd record carries";
      return GPUP_STATUS_PROTOCOL_ERROR;
    }
    if (r == 0) {
      why = "the peer closed the channel";
      return GPUP_STATUS_CONNECTION_LOST;
    }
    fd_rbuf_.insert(fd_rbuf_.end(), buf, buf + r);
    size_t off = 0;
    for (; fd_rbuf_.size() - off >= wire::kFdRecordSize; off += wire::kFdRecordSize) {
      const uint8_t* rec = fd_rbuf_.data() + off;
      if (get_le32(rec) != wire::kFdMagic || get_le32(rec + 4) != 0) {
        why = "malformed fd record from the peer";
        return GPUP_STATUS_PROTOCOL_ERROR;
      }
      if (fd_queue_.empty()) {
        why = "fd record without a file descriptor from the peer";
        return GPUP_STATUS_PROTOCOL_ERROR;
      }
      got.emplace_back(get_le64(rec + 8), std::move(fd_queue_.front()));
      fd_queue_.pop_front();
    }
    fd_rbuf_.erase(fd_rbuf_.begin(), fd_rbuf_.begin() + static_cast<ptrdiff_t>(off));
    // Each record's fd arrives with its first byte: at most one fd may wait for a partial record.
    if (fd_queue_.size() > (fd_rbuf_.empty() ? 0u : 1u)) {
      why = "the peer sent more file descriptors than fd records";
      return GPUP_STATUS_PROTOCOL_ERROR;
    }
    if (!got.empty()) return GPUP_STATUS_SUCCESS;
  }
}

gpup_status ShmChannel::receive_fd_impl(uint64_t id, UniqueFd& out, int timeout_ms) {
  const Deadline deadline(timeout_ms);
  std::unique_lock lk(fd_mu_);
  for (;;) {
    if (auto it = fd_pending_.find(id); it != fd_pending_.end()) {
      out = std::move(it->second);
      fd_pending_.erase(it);
      return GPUP_STATUS_SUCCESS;
    }
    if (closed_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "receive_fd: the channel is shut down");
    if (fd_eof_) return fail(GPUP_STATUS_CONNECTION_LOST, "receive_fd: the peer closed the channel");

    if (fd_reader_active_) {
      // Another thread reads the socket and will hand over whatever arrives.
      if (deadline.infinite()) {
        fd_cv_.wait(lk);
      } else if (fd_cv_.wait_until(lk, deadline.when()) == std::cv_status::timeout) {
        if (fd_pending_.count(id) == 0) return GPUP_STATUS_TIMEOUT;
      }
      continue;
    }

    fd_reader_active_ = true;
    lk.unlock();
    std::vector<std::pair<uint64_t, UniqueFd>> got;
    std::string why;
    const gpup_status s = read_fd_records(deadline, got, why);
    lk.lock();
    fd_reader_active_ = false;
    fd_cv_.notify_all();
    for (auto& [rid, f] : got) {
      if (fd_pending_.size() >= kMaxPendingFds) {
        lk.unlock();
        return protocol_error("receive_fd: the peer sent more than " + std::to_string(kMaxPendingFds) +
                              " file descriptors nobody asked for");
      }
      if (!fd_pending_.emplace(rid, std::move(f)).second) {
        lk.unlock();
        return protocol_error("receive_fd: the peer sent id " + std::to_string(rid) +
                              " again before the previous fd with that id was collected");
      }
    }
    if (s == GPUP_STATUS_PROTOCOL_ERROR) {
      lk.unlock();
      return protocol_error("receive_fd: " + why);
    }
    if (s == GPUP_STATUS_CONNECTION_LOST) {
      fd_eof_ = true;
      peer_gone_.store(true);
      continue;  // the records read before the end are still handed out
    }
    if (s == GPUP_STATUS_TIMEOUT && fd_pending_.count(id) == 0) return GPUP_STATUS_TIMEOUT;
  }
}

}  // namespace

std::unique_ptr<Channel> make_shm_channel(ShmParts parts, const ChannelOptions& options) {
  return std::make_unique<ShmChannel>(std::move(parts), options);
}

std::span<uint8_t> shared_region_for_testing(Channel& channel) {
  if (auto* shm = dynamic_cast<ShmChannel*>(&channel)) return shm->region();
  return {};
}

}  // namespace gpup::channel::internal
