// Blocking client of gpupd's operator socket, for the gpup CLI and tests. Every step (connect,
// write, read) runs against one deadline; nothing waits longer than the timeout given.
#pragma once
#include <chrono>
#include <string>

#include "common/result.h"
#include "host/control/json_lines.h"

namespace gpup::control {

// Sends one request and returns the reply's "result".
// Errors: NOT_FOUND "gpupd is not running (no socket at PATH)" when nothing listens there;
// TIMEOUT when no reply came in time; CONNECTION_LOST / PROTOCOL_ERROR for a broken reply;
// INVALID_PARAMETER with gpupd's own message when it refused the request ({"ok":false}).
Result<json> call(const std::string& socket_path, const json& request, std::chrono::milliseconds timeout);

}  // namespace gpup::control
