// Owning file descriptor, and passing descriptors over unix sockets (SCM_RIGHTS).
#pragma once
#include <sys/types.h>
#include <unistd.h>

#include <cstddef>
#include <span>
#include <utility>
#include <vector>

namespace gpup {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// At most this many descriptors travel with one message, either way.
inline constexpr size_t kMaxFdsPerMessage = 16;

// One sendmsg of n bytes with fds attached (none when empty; at most kMaxFdsPerMessage, else -1
// with EINVAL). flags as sendmsg's (MSG_NOSIGNAL is always added). Returns what sendmsg returns.
ssize_t send_with_fds(int sock, const void* data, size_t n, std::span<const int> fds, int flags);

// One recvmsg of at most n bytes (flags as recvmsg's; MSG_CMSG_CLOEXEC is always added). Every
// descriptor that arrives is owned at once: up to max_fds go to *fds (appended), the others are
// closed and counted in extra. Returns what recvmsg returns.
struct ReceivedFds {
  size_t extra = 0;             // descriptors beyond max_fds, closed
  bool fds_truncated = false;   // MSG_CTRUNC: more than kMaxFdsPerMessage came (the kernel closed those)
  bool data_truncated = false;  // MSG_TRUNC: a datagram or packet longer than n
};
ssize_t receive_with_fds(int sock, void* data, size_t n, std::vector<UniqueFd>* fds, size_t max_fds, int flags,
                         ReceivedFds* info);

}  // namespace gpup
