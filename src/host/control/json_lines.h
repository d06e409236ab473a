// JSON-lines framing for gpup's control channels (CLI <-> gpupd, gpupd <-> gpup-vmwp).
//
// One JSON object per line, '\n'-terminated (a trailing '\r' is tolerated). Every reader has a
// line-length cap chosen by its owner (see protocol.h); a longer line, complete or not, is a framing
// error and the peer is dropped. Nothing from the other side is trusted: parse_object_line accepts
// only a JSON object, and ObjectReader checks the type and range of every field it hands out.
#pragma once
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/result.h"

namespace gpup::control {

using nlohmann::json;

// Splits a byte stream into lines of at most max_line bytes (terminator excluded).
class LineReader {
 public:
  explicit LineReader(size_t max_line) : max_line_(max_line) {}

  // Appends bytes. Fails (and stays failed) once any line exceeds max_line bytes.
  Status append(std::string_view bytes);
  // The next complete line, without its terminator.
  std::optional<std::string> pop();
  bool has_line() const { return !lines_.empty(); }
  // Bytes of an unterminated line waiting for its end.
  size_t partial_size() const { return partial_.size(); }
  size_t max_line() const { return max_line_; }
  bool failed() const { return failed_; }

 private:
  size_t max_line_;
  std::string partial_;
  std::deque<std::string> lines_;
  bool failed_ = false;
};

enum class ReadOutcome {
  kAgain,  // everything available was consumed (EAGAIN) or the per-call budget ran out
  kEof,    // the peer closed its end; complete lines read before it are in the reader
  kError,  // read error or framing error; see *error
};

// Reads from a non-blocking fd into reader until EAGAIN, EOF, an error, or budget bytes.
ReadOutcome read_lines(int fd, LineReader& reader, std::string* error, size_t budget = 256 * 1024);

// Writes as much of out as the non-blocking fd takes now (MSG_NOSIGNAL for sockets) and erases it
// from out. Returns true when out is empty, false when the fd is full, an error if the peer is gone.
Result<bool> flush_some(int fd, std::string& out);

// The object as one line: compact JSON + '\n'. Invalid UTF-8 in strings is replaced, never thrown.
std::string encode_line(const json& object);
// Serialises without throwing (invalid UTF-8 replaced); indent < 0 gives compact output.
std::string dump_json(const json& value, int indent = -1);

// Parses one line; anything but a JSON object is an error that says what was wrong.
Result<json> parse_object_line(std::string_view line);

// Makes peer-supplied text safe to log or show: control characters become '?', length is capped.
std::string printable(std::string_view text, size_t max_len = 512);

// Type- and range-checked access to the fields of a JSON object from an untrusted peer. The first
// problem is kept ("vm.min_vram: expected a non-negative integer, got string") and later calls
// return nullopt, so a decoder reads all fields and checks ok() once.
class ObjectReader {
 public:
  // context prefixes messages ("vm", "stats.processes[3]"); j must be an object or the reader fails.
  ObjectReader(const json& j, std::string context);

  bool has(std::string_view key) const;
  std::optional<uint64_t> u64(std::string_view key, uint64_t min = 0, uint64_t max = UINT64_MAX);
  std::optional<uint64_t> opt_u64(std::string_view key, uint64_t min = 0, uint64_t max = UINT64_MAX);
  std::optional<std::string> str(std::string_view key, size_t max_len);
  std::optional<std::string> opt_str(std::string_view key, size_t max_len);
  std::optional<bool> boolean(std::string_view key);
  std::optional<bool> opt_boolean(std::string_view key);
  // A nested object or array; nullptr when absent (opt_) or wrong.
  const json* object(std::string_view key);
  const json* opt_object(std::string_view key);
  const json* array(std::string_view key, size_t max_items);
  // Fails if the object has a key outside allowed (for requests, where a typo must not pass).
  void only(std::initializer_list<std::string_view> allowed);

  void fail(std::string message);  // records a caller-detected problem under this context
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  Status status() const;
  std::string path(std::string_view key) const;

 private:
  const json* find(std::string_view key, bool required);
  const json& j_;
  std::string context_;
  std::string error_;
};

// "string", "integer", "object", ... for messages.
const char* json_type_name(const json& j);

}  // namespace gpup::control
