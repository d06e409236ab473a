// Stream transport: frames [u32 little-endian length][length bytes] on a connected stream socket
// (TCP, or AF_UNIX when the client asked for it). The socket is non-blocking; waits are poll()s
// on it, so shutdown() (which shuts the socket down) wakes every blocked call.
#include <limits.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>

#include "channel/internal.h"

namespace gpup::channel::internal {
namespace {

class StreamChannel final : public Channel {
 public:
  explicit StreamChannel(UniqueFd socket)
      : Channel(false, is_unix_socket(socket.get()) ? peer_pid_of(socket.get()) : -1),
        sock_(std::move(socket)),
        rbuf_(kReadBuffer) {}

  ~StreamChannel() override { shutdown(); }

  void shutdown() override {
    closed_.store(true);
    ::shutdown(sock_.get(), SHUT_RDWR);
  }

 protected:
  gpup_status send_impl(std::span<const std::span<const uint8_t>> parts, size_t total) override;
  gpup_status receive_impl(std::vector<uint8_t>& out, int timeout_ms) override;

 private:
  static constexpr size_t kReadBuffer = size_t{64} * 1024;

  // The byte stream can no longer be trusted (peer error, or a frame was cut short).
  gpup_status break_channel(gpup_status status, std::string message) {
    shutdown();
    return fail(status, std::move(message));
  }

  UniqueFd sock_;
  std::atomic<bool> closed_{false};

  std::mutex send_mu_;

  std::mutex recv_mu_;         // guards everything below
  std::vector<uint8_t> rbuf_;  // bytes read from the socket, [rpos_, rend_) not yet used
  size_t rpos_ = 0, rend_ = 0;
  bool have_len_ = false;      // a frame header was parsed; its body is being assembled
  size_t want_ = 0, got_ = 0;  // body length and bytes assembled so far
  std::vector<uint8_t> body_;  // swapped into the caller's vector when complete
};

gpup_status StreamChannel::send_impl(std::span<const std::span<const uint8_t>> parts, size_t total) {
  std::lock_guard lk(send_mu_);
  if (closed_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "send: the channel is shut down");

  uint8_t header[wire::kFrameHeaderSize];
  put_le32(header, static_cast<uint32_t>(total));
  std::vector<iovec> iov;
  iov.reserve(parts.size() + 1);
  iov.push_back({header, sizeof header});
  for (const auto& p : parts) {
    if (!p.empty()) iov.push_back({const_cast<uint8_t*>(p.data()), p.size()});
  }

  size_t idx = 0;
  bool started = false;
  while (idx < iov.size()) {
    msghdr msg{};
    msg.msg_iov = &iov[idx];
    msg.msg_iovlen = std::min<size_t>(iov.size() - idx, IOV_MAX);
    const ssize_t r = ::sendmsg(sock_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        // Backpressure: the peer is not reading. Wait for room, a hang-up or our own shutdown.
        const int ev = poll_one(sock_.get(), POLLOUT, Deadline(-1));
        if (closed_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "send: the channel is shut down");
        if (ev < 0 && errno != EINTR) return break_channel(errno_status(errno), errno_text("send: poll", errno));
        continue;
      }
      const gpup_status st = errno_status(err);
      const std::string text = errno_text("send", err);
      if (!started && st != GPUP_STATUS_CONNECTION_LOST) return fail(st, text);
      return break_channel(GPUP_STATUS_CONNECTION_LOST, text);
    }
    started = true;
    size_t n = static_cast<size_t>(r);
    while (n > 0) {
      if (n >= iov[idx].iov_len) {
        n -= iov[idx].iov_len;
        ++idx;
      } else {
        iov[idx].iov_base = static_cast<uint8_t*>(iov[idx].iov_base) + n;
        iov[idx].iov_len -= n;
        n = 0;
      }
    }
  }
  return GPUP_STATUS_SUCCESS;
}

gpup_status StreamChannel::receive_impl(std::vector<uint8_t>& out, int timeout_ms) {
  std::lock_guard lk(recv_mu_);
  const Deadline deadline(timeout_ms);
  for (;;) {
    if (closed_.load()) return fail(GPUP_STATUS_CONNECTION_LOST, "receive: the channel is shut down");

    if (!have_len_ && rend_ - rpos_ >= wire::kFrameHeaderSize) {
      const uint32_t len = get_le32(rbuf_.data() + rpos_);
      if (len > kMaxMessageSize) {
        // Checked before anything is allocated for the frame.
        return break_channel(GPUP_STATUS_PROTOCOL_ERROR, "receive: the peer announced a frame of " +
                                                             std::to_string(len) + " bytes, the limit is " +
                                                             std::to_string(kMaxMessageSize));
      }
      rpos_ += wire::kFrameHeaderSize;
      have_len_ = true;
      want_ = len;
      got_ = 0;
      body_.resize(len);
    }
    if (have_len_) {
      const size_t n = std::min(rend_ - rpos_, want_ - got_);
      if (n > 0) std::memcpy(body_.data() + got_, rbuf_.data() + rpos_, n);
      got_ += n;
      rpos_ += n;
      if (got_ == want_) {
        out.swap(body_);  // the caller's old buffer becomes our next assembly buffer
        have_len_ = false;
        return GPUP_STATUS_SUCCESS;
      }
    }

    // More bytes are needed. Large remainders go straight into the body, the rest via rbuf_.
    if (rpos_ == rend_) rpos_ = rend_ = 0;
    ssize_t r;
    if (have_len_ && want_ - got_ >= kReadBuffer / 2) {
      r = ::recv(sock_.get(), body_.data() + got_, want_ - got_, MSG_DONTWAIT);
      if (r > 0) got_ += static_cast<size_t>(r);
    } else {
      if (rpos_ > 0) {
        std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rend_ - rpos_);
        rend_ -= rpos_;
        rpos_ = 0;
      }
      r = ::recv(sock_.get(), rbuf_.data() + rend_, rbuf_.size() - rend_, MSG_DONTWAIT);
      if (r > 0) rend_ += static_cast<size_t>(r);
    }
    if (r > 0) continue;
    if (r == 0) {
      if (closed_.load()) continue;  // reported at the top
      const bool mid_frame = have_len_ || rend_ > rpos_;
      return break_channel(GPUP_STATUS_CONNECTION_LOST,
                           mid_frame ? "receive: the peer closed the channel in the middle of a frame"
                                     : "receive: the peer closed the channel");
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      if (deadline.expired()) return GPUP_STATUS_TIMEOUT;  // partial frame state is kept for the next call
      const int ev = poll_one(sock_.get(), POLLIN, deadline);
      if (ev == 0) return GPUP_STATUS_TIMEOUT;
      if (ev < 0 && errno != EINTR) return break_channel(errno_status(errno), errno_text("receive: poll", errno));
      continue;
    }
    return break_channel(GPUP_STATUS_CONNECTION_LOST, errno_text("receive", err));
  }
}

}  // namespace

std::unique_ptr<Channel> make_stream_channel(UniqueFd socket, const ChannelOptions&) {
  return std::make_unique<StreamChannel>(std::move(socket));
}

}  // namespace gpup::channel::internal
