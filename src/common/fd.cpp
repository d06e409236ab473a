#include "common/fd.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

namespace gpup {

ssize_t send_with_fds(int sock, const void* data, size_t n, std::span<const int> fds, int flags) {
  if (fds.size() > kMaxFdsPerMessage) {
    errno = EINVAL;
    return -1;
  }
  iovec iov{const_cast<void*>(data), n};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)] = {};
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  return ::sendmsg(sock, &msg, flags | MSG_NOSIGNAL);
}

ssize_t receive_with_fds(int sock, void* data, size_t n, std::vector<UniqueFd>* fds, size_t max_fds, int flags,
                         ReceivedFds* info) {
  iovec iov{data, n};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  const ssize_t r = ::recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
  if (r < 0) return r;
  ReceivedFds got;
  // Own every descriptor before looking at anything else, so none leaks.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      UniqueFd owned(fd);
      if (fds != nullptr && fds->size() < max_fds) fds->push_back(std::move(owned));
      else ++got.extra;
    }
  }
  got.fds_truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  got.data_truncated = (msg.msg_flags & MSG_TRUNC) != 0;
  if (info) *info = got;
  return r;
}

}  // namespace gpup
