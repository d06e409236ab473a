// The credentials of a local peer, for gpupd's access checks.
#pragma once
#include <sys/types.h>

#include <string>
#include <vector>

#include "common/result.h"

namespace gpup::gpupd {

// Who is at the other end of a unix socket gpupd accepted (its operator socket, a partition's VRD
// endpoint), as the kernel recorded it when the peer called connect(): effective uid and gid, supplementary groups, pid.
struct Peer {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
  std::string comm;  // /proc/<pid>/comm read at accept, if readable: for the log only
};
// "pid 42, uid 1000, gid 1000 (gpup)"
std::string to_string(const Peer& p);
// The credentials of the connected AF_UNIX socket's peer.
Result<Peer> read_peer(int fd);
}  // namespace gpup::gpupd
