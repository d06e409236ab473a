#include "host/control/client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "common/fd.h"
#include "host/control/protocol.h"

namespace gpup::control {

using Clock = std::chrono::steady_clock;

static int remaining_ms(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left < 0 ? 0 : static_cast<int>(std::min<long long>(left, 60'000));
}

static Error not_running(const std::string& path) {
  return make_error(GPUP_STATUS_NOT_FOUND, fmt::format("gpupd is not running (no socket at {})", path));
}

Result<json> call(const std::string& path, const json& request, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path)
    return make_error(GPUP_STATUS_INVALID_PARAMETER,
                      fmt::format("socket path {} is longer than the {}-byte unix socket limit", path,
                                  sizeof addr.sun_path - 1));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return make_error(GPUP_STATUS_INTERNAL, fmt::format("socket: {}", std::strerror(errno)));
  for (;;) {
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) break;
    if (errno == EINTR) continue;
    if (errno == ENOENT || errno == ECONNREFUSED || errno == ENOTDIR) return not_running(path);
    // A full listen backlog: the daemon is alive but busy; retry until the deadline.
    if (errno == EAGAIN && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    return make_error(GPUP_STATUS_CONNECTION_LOST, fmt::format("cannot connect to {}: {}", path, std::strerror(errno)));
  }

  std::string out = encode_line(request);
  while (!out.empty()) {
    auto sent = flush_some(fd.get(), out);
    if (!sent) return make_error(GPUP_STATUS_CONNECTION_LOST, fmt::format("gpupd closed the connection: {}", sent.error().message));
    if (*sent) break;
    pollfd p{fd.get(), POLLOUT, 0};
    int left = remaining_ms(deadline);
    if (left == 0 || ::poll(&p, 1, left) == 0)
      return make_error(GPUP_STATUS_TIMEOUT, fmt::format("gpupd did not take the request within {} ms", timeout.count()));
  }

  LineReader reader(kMaxReplyLine);
  for (;;) {
    if (auto line = reader.pop()) {
      auto reply = parse_object_line(*line);
      if (!reply) return make_error(GPUP_STATUS_PROTOCOL_ERROR, "bad reply from gpupd: " + reply.error().message);
      ObjectReader r(*reply, "reply");
      auto ok = r.boolean("ok");
      if (!r.ok()) return make_error(GPUP_STATUS_PROTOCOL_ERROR, "bad reply from gpupd: " + r.error());
      if (!*ok) {
        auto msg = r.str("error", kMaxReplyLine);
        return make_error(GPUP_STATUS_INVALID_PARAMETER, msg ? *msg : std::string("gpupd refused the request"));
      }
      auto it = reply->find("result");
      return it == reply->end() ? json(nullptr) : *it;
    }
    pollfd p{fd.get(), POLLIN, 0};
    int left = remaining_ms(deadline);
    int n = left == 0 ? 0 : ::poll(&p, 1, left);
    if (n < 0 && errno == EINTR) continue;
    if (n == 0)
      return make_error(GPUP_STATUS_TIMEOUT, fmt::format("gpupd did not answer within {} ms", timeout.count()));
    std::string err;
    ReadOutcome o = read_lines(fd.get(), reader, &err);
    if (o == ReadOutcome::kError) return make_error(GPUP_STATUS_PROTOCOL_ERROR, "reading gpupd's reply: " + err);
    if (o == ReadOutcome::kEof && !reader.has_line())
      return make_error(GPUP_STATUS_CONNECTION_LOST, "gpupd closed the connection without answering");
  }
}

}  // namespace gpup::control
