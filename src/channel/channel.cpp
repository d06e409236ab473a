#include "channel/channel.h"

#include <cstdint>
#include <string>

#include "channel/internal.h"
#include "common/log.h"

namespace gpup::channel {

namespace {
thread_local Error t_last_error{GPUP_STATUS_SUCCESS, ""};
}  // namespace

const Error& last_error() { return t_last_error; }

namespace internal {

gpup_status fail(gpup_status status, std::string message) {
  switch (status) {
    case GPUP_STATUS_PROTOCOL_ERROR:
      spdlog::error("channel: {}", message);
      break;
    case GPUP_STATUS_CONNECTION_LOST:
    case GPUP_STATUS_TIMEOUT:
      spdlog::debug("channel: {}", message);
      break;
    default:
      spdlog::warn("channel: {}", message);
      break;
  }
  t_last_error = Error(status, std::move(message));
  return status;
}

Error error(gpup_status status, std::string message) {
  // The caller receives the message in the Result; log only for debugging.
  spdlog::debug("channel: {}", message);
  t_last_error = Error(status, message);
  return Error(status, std::move(message));
}

}  // namespace internal

Channel::~Channel() = default;

gpup_status Channel::send(std::span<const std::span<const uint8_t>> parts) {
  size_t total = 0;  // saturating, so that absurd part sizes cannot wrap around below the limit
  for (const auto& p : parts) total = p.size() > SIZE_MAX - total ? SIZE_MAX : total + p.size();
  if (total > kMaxMessageSize) {
    return internal::fail(GPUP_STATUS_MESSAGE_TOO_LARGE,
                          "message of " + std::to_string(total) + " bytes exceeds the channel limit of " +
                              std::to_string(kMaxMessageSize) + " bytes; nothing was sent");
  }
  return send_impl(parts, total);
}

gpup_status Channel::send(std::span<const uint8_t> message) {
  const std::span<const uint8_t> one[1] = {message};
  return send(std::span<const std::span<const uint8_t>>(one));
}

gpup_status Channel::receive(std::vector<uint8_t>& out, int timeout_ms) { return receive_impl(out, timeout_ms); }

gpup_status Channel::send_fd(uint64_t id, int fd) {
  if (fd < 0) return internal::fail(GPUP_STATUS_INVALID_PARAMETER, "send_fd: invalid fd " + std::to_string(fd));
  return send_fd_impl(id, fd);
}

gpup_status Channel::receive_fd(uint64_t id, UniqueFd& out, int timeout_ms) {
  return receive_fd_impl(id, out, timeout_ms);
}

gpup_status Channel::send_fd_impl(uint64_t, int) {
  return internal::fail(GPUP_STATUS_NOT_SUPPORTED, "fd passing needs the shared-memory transport");
}

gpup_status Channel::receive_fd_impl(uint64_t, UniqueFd&, int) {
  return internal::fail(GPUP_STATUS_NOT_SUPPORTED, "fd passing needs the shared-memory transport");
}

}  // namespace gpup::channel
