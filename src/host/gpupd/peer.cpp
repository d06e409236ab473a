#include "host/gpupd/peer.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "common/fd.h"
#include "host/control/protocol.h"

namespace gpup::gpupd {
namespace {

Error sys_error(const std::string& what) {
  return make_error(GPUP_STATUS_INTERNAL, fmt::format("{}: {}", what, std::strerror(errno)));
}

}  // namespace

std::string to_string(const Peer& p) {
  return fmt::format("pid {}, uid {}, gid {}{}", p.pid, p.uid, p.gid, p.comm.empty() ? "" : " (" + p.comm + ")");
}

// Best effort and for the log only: the peer may have exited since connect(), and its pid may
// name another process by now.
static std::string read_comm(pid_t pid) {
  if (pid <= 0) return {};  // 0: the peer is in a pid namespace that cannot see it
  UniqueFd fd(::open(fmt::format("/proc/{}/comm", pid).c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return {};
  char buf[64];
  ssize_t n = ::read(fd.get(), buf, sizeof buf);
  if (n <= 0) return {};
  std::string comm(buf, static_cast<size_t>(n));
  while (!comm.empty() && comm.back() == '\n') comm.pop_back();
  return control::printable(comm, 64);
}

Result<Peer> read_peer(int fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return sys_error("SO_PEERCRED");
  Peer p;
  p.pid = cred.pid;
  p.uid = cred.uid;
  p.gid = cred.gid;
  // The supplementary groups come from the same credentials the kernel recorded at connect(), not
  // from /proc/<pid>/status: that would be read later, from a process that may have changed its
  // groups, exec'd something else or exited (its pid then another's) since. SO_PEERGROUPS has no
  // such race.
  std::vector<gid_t> groups(32);
  for (int attempt = 0;; ++attempt) {
    auto glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) == 0) {
      groups.resize(glen / sizeof(gid_t));
      break;
    }
    // ERANGE sets glen to the size needed; the recorded credentials never change, so once is enough.
    if (errno != ERANGE || attempt > 0) return sys_error("SO_PEERGROUPS");
    groups.resize(glen / sizeof(gid_t));
  }
  p.groups = std::move(groups);
  p.comm = read_comm(p.pid);
  return p;
}

}  // namespace gpup::gpupd
