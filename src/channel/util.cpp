// Socket, fd, time and encoding helpers of the channel library.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <climits>
#include <cstring>
#include <system_error>
#include <utility>

#include "channel/internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace gpup::channel::internal {

gpup_status errno_status(int err) {
  switch (err) {
    case ENOENT:
      return GPUP_STATUS_NOT_FOUND;
    case EACCES:
    case EPERM:
      return GPUP_STATUS_ACCESS_DENIED;
    case ECONNREFUSED:
    case ECONNRESET:
    case ECONNABORTED:
    case EPIPE:
    case ENOTCONN:
    case ESHUTDOWN:
    case EHOSTUNREACH:
    case ENETUNREACH:
      return GPUP_STATUS_CONNECTION_LOST;
    case ETIMEDOUT:
      return GPUP_STATUS_TIMEOUT;
    case ENOMEM:
    case ENOBUFS:
    case EMFILE:
    case ENFILE:
      return GPUP_STATUS_NO_MEMORY;
    case EADDRINUSE:
    case EEXIST:
      return GPUP_STATUS_ALREADY_EXISTS;
    case EINVAL:
    case ENAMETOOLONG:
      return GPUP_STATUS_INVALID_PARAMETER;
    default:
      return GPUP_STATUS_INTERNAL;
  }
}

std::string errno_text(const std::string& what, int err) { return what + ": " + std::generic_category().message(err); }

Deadline::Deadline(int timeout_ms) : infinite_(timeout_ms < 0) {
  if (!infinite_) when_ = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
}

bool Deadline::expired() const { return !infinite_ && std::chrono::steady_clock::now() >= when_; }

int Deadline::poll_ms() const {
  if (infinite_) return -1;
  const auto left = when_ - std::chrono::steady_clock::now();
  if (left <= std::chrono::steady_clock::duration::zero()) return 0;
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

Status set_nonblocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return error(errno_status(errno), errno_text("fcntl(O_NONBLOCK)", errno));
  }
  return {};
}

int poll_one(int fd, short events, const Deadline& deadline) {
  pollfd p{fd, events, 0};
  for (;;) {
    const int n = ::poll(&p, 1, deadline.poll_ms());
    if (n > 0) return p.revents;
    if (n == 0) {
      if (deadline.expired()) return 0;
      continue;  // woke up a little early (poll rounds to its own clock)
    }
    if (errno != EINTR) return -1;
  }
}

int peer_pid_of(int sock) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof cred) return -1;
  return cred.pid > 0 ? cred.pid : -1;
}

bool is_unix_socket(int sock) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(sock, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return false;
  return ss.ss_family == AF_UNIX;
}

Status read_exact(int sock, void* buf, size_t n, const Deadline& deadline, std::vector<UniqueFd>* fds, size_t max_fds) {
  auto* p = static_cast<uint8_t*>(buf);
  size_t got = 0;
  while (got < n) {
    ReceivedFds info;
    const ssize_t r = receive_with_fds(sock, p + got, n - got, fds, fds ? max_fds : 0, MSG_DONTWAIT, &info);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        const int ev = poll_one(sock, POLLIN, deadline);
        if (ev == 0) return error(GPUP_STATUS_TIMEOUT, "timed out waiting for the peer's handshake");
        if (ev < 0) return error(errno_status(errno), errno_text("poll", errno));
        continue;
      }
      return error(errno_status(errno), errno_text("recvmsg", errno));
    }
    if (info.extra || info.fds_truncated) return error(GPUP_STATUS_PROTOCOL_ERROR, "peer sent unexpected file descriptors");
    if (r == 0) return error(GPUP_STATUS_CONNECTION_LOST, "peer closed the connection during the handshake");
    got += static_cast<size_t>(r);
  }
  return {};
}

Status write_exact(int sock, const void* buf, size_t n, const Deadline& deadline, std::span<const int> fds) {
  const auto* p = static_cast<const uint8_t*>(buf);
  size_t sent = 0;
  if (fds.size() > kMaxFdsPerMessage) return error(GPUP_STATUS_INVALID_PARAMETER, "too many fds for one message");
  while (sent < n) {
    // The fds travel with the first byte.
    const ssize_t r = send_with_fds(sock, p + sent, n - sent, sent == 0 ? fds : std::span<const int>(), MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        const int ev = poll_one(sock, POLLOUT, deadline);
        if (ev == 0) return error(GPUP_STATUS_TIMEOUT, "timed out sending to the peer");
        if (ev < 0) return error(errno_status(errno), errno_text("poll", errno));
        continue;
      }
      return error(errno_status(errno), errno_text("sendmsg", errno));
    }
    sent += static_cast<size_t>(r);
  }
  return {};
}

void eventfd_signal(int efd) {
  const uint64_t one = 1;
  // EAGAIN would mean the counter is about to overflow: the sleeper is woken anyway.
  while (::write(efd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void eventfd_drain(int efd) {
  uint64_t v;
  while (::read(efd, &v, sizeof v) < 0 && errno == EINTR) {
  }
}

namespace wire {

void encode(const Hello& h, uint8_t (&out)[kHelloSize]) {
  put_le32(out, h.magic);
  put_le16(out + 4, h.version);
  put_le16(out + 6, h.transport);
  put_le32(out + 8, h.ring_bytes);
  put_le32(out + 12, h.reserved);
}

Hello decode_hello(const uint8_t (&in)[kHelloSize]) {
  Hello h;
  h.magic = get_le32(in);
  h.version = get_le16(in + 4);
  h.transport = get_le16(in + 6);
  h.ring_bytes = get_le32(in + 8);
  h.reserved = get_le32(in + 12);
  return h;
}

void encode(const Welcome& w, uint8_t (&out)[kWelcomeSize]) {
  put_le32(out, w.magic);
  put_le16(out + 4, w.version);
  put_le16(out + 6, w.transport);
  put_le32(out + 8, static_cast<uint32_t>(w.status));
  put_le32(out + 12, w.ring_bytes);
  put_le32(out + 16, w.fd_count);
  put_le32(out + 20, w.reserved);
}

Welcome decode_welcome(const uint8_t (&in)[kWelcomeSize]) {
  Welcome w;
  w.magic = get_le32(in);
  w.version = get_le16(in + 4);
  w.transport = get_le16(in + 6);
  w.status = static_cast<int32_t>(get_le32(in + 8));
  w.ring_bytes = get_le32(in + 12);
  w.fd_count = get_le32(in + 16);
  w.reserved = get_le32(in + 20);
  return w;
}

}  // namespace wire

bool valid_ring_bytes(size_t ring_bytes) {
  return ring_bytes >= kMinRingBytes && ring_bytes <= kMaxRingBytes && std::has_single_bit(ring_bytes);
}

Status validate_options(const ChannelOptions& o) {
  if (!valid_ring_bytes(o.ring_bytes)) {
    return error(GPUP_STATUS_INVALID_PARAMETER, "ring_bytes " + std::to_string(o.ring_bytes) +
                                                    " is not a power of two in [" + std::to_string(kMinRingBytes) +
                                                    ", " + std::to_string(kMaxRingBytes) + "]");
  }
  if (o.spin_us < 0 || o.spin_us > 10000) {
    return error(GPUP_STATUS_INVALID_PARAMETER, "spin_us " + std::to_string(o.spin_us) + " is outside [0, 10000]");
  }
  if (o.handshake_timeout_ms <= 0) {
    return error(GPUP_STATUS_INVALID_PARAMETER, "handshake_timeout_ms must be positive");
  }
  if (o.transport != Transport::kAuto && o.transport != Transport::kSharedMemory && o.transport != Transport::kStream) {
    return error(GPUP_STATUS_INVALID_PARAMETER, "unknown transport");
  }
  return {};
}

Mapping::Mapping(Mapping&& o) noexcept : addr_(std::exchange(o.addr_, nullptr)), len_(std::exchange(o.len_, 0)) {}

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    if (addr_ != nullptr) ::munmap(addr_, len_);
    addr_ = std::exchange(o.addr_, nullptr);
    len_ = std::exchange(o.len_, 0);
  }
  return *this;
}

Mapping::~Mapping() {
  if (addr_ != nullptr) ::munmap(addr_, len_);
}

}  // namespace gpup::channel::internal
