#include "host/control/json_lines.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace gpup::control {

Status LineReader::append(std::string_view bytes) {
  if (failed_) return make_error(GPUP_STATUS_PROTOCOL_ERROR, "line framing already failed");
  while (!bytes.empty()) {
    size_t nl = bytes.find('\n');
    std::string_view piece = bytes.substr(0, nl);
    // +1 leaves room for a '\r' before the '\n' of a line of exactly max_line bytes.
    if (partial_.size() + piece.size() > max_line_ + 1) {
      failed_ = true;
      return make_error(GPUP_STATUS_MESSAGE_TOO_LARGE,
                        fmt::format("line longer than the {}-byte limit", max_line_));
    }
    partial_.append(piece);
    if (nl == std::string_view::npos) break;
    if (!partial_.empty() && partial_.back() == '\r') partial_.pop_back();
    if (partial_.size() > max_line_) {
      failed_ = true;
      return make_error(GPUP_STATUS_MESSAGE_TOO_LARGE,
                        fmt::format("line longer than the {}-byte limit", max_line_));
    }
    if (!partial_.empty()) lines_.push_back(std::move(partial_));
    partial_.clear();
    bytes.remove_prefix(nl + 1);
  }
  return {};
}

std::optional<std::string> LineReader::pop() {
  if (lines_.empty()) return std::nullopt;
  std::string line = std::move(lines_.front());
  lines_.pop_front();
  return line;
}

ReadOutcome read_lines(int fd, LineReader& reader, std::string* error, size_t budget) {
  char buf[16384];
  size_t total = 0;
  while (total < budget) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      total += static_cast<size_t>(n);
      Status s = reader.append(std::string_view(buf, static_cast<size_t>(n)));
      if (!s.ok()) {
        if (error) *error = s.error().message;
        return ReadOutcome::kError;
      }
      continue;
    }
    if (n == 0) return ReadOutcome::kEof;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return ReadOutcome::kAgain;
    if (error) *error = std::strerror(errno);
    return ReadOutcome::kError;
  }
  return ReadOutcome::kAgain;
}

Result<bool> flush_some(int fd, std::string& out) {
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::send(fd, out.data() + done, out.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno == ENOTSOCK) n = ::write(fd, out.data() + done, out.size() - done);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    out.erase(0, done);
    return make_error(GPUP_STATUS_CONNECTION_LOST,
                      n < 0 ? std::string(std::strerror(errno)) : std::string("peer stopped reading"));
  }
  out.erase(0, done);
  return out.empty();
}

std::string dump_json(const json& value, int indent) {
  return value.dump(indent, ' ', false, json::error_handler_t::replace);
}

std::string encode_line(const json& object) {
  std::string s = dump_json(object);
  s.push_back('\n');
  return s;
}

Result<json> parse_object_line(std::string_view line) {
  json j;
  try {
    j = json::parse(line.begin(), line.end());
  } catch (const json::parse_error& e) {
    return make_error(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("invalid JSON at byte {}", e.byte));
  }
  if (!j.is_object())
    return make_error(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("expected a JSON object, got {}", json_type_name(j)));
  return j;
}

std::string printable(std::string_view text, size_t max_len) {
  std::string out;
  out.reserve(std::min(text.size(), max_len));
  for (char c : text) {
    if (out.size() >= max_len) {
      out += "...";
      break;
    }
    unsigned char u = static_cast<unsigned char>(c);
    out.push_back(u < 0x20 || u == 0x7f ? '?' : c);
  }
  return out;
}

const char* json_type_name(const json& j) {
  switch (j.type()) {
    case json::value_t::null: return "null";
    case json::value_t::object: return "object";
    case json::value_t::array: return "array";
    case json::value_t::string: return "string";
    case json::value_t::boolean: return "boolean";
    case json::value_t::number_integer: return j.get<int64_t>() < 0 ? "negative integer" : "integer";
    case json::value_t::number_unsigned: return "integer";
    case json::value_t::number_float: return "number with a fraction";
    case json::value_t::binary: return "binary";
    case json::value_t::discarded: return "invalid value";
  }
  return "value";
}

// ---------------------------------------------------------------------------------------------

static const json kNotAnObject = json::object();

ObjectReader::ObjectReader(const json& j, std::string context)
    : j_(j.is_object() ? j : kNotAnObject), context_(std::move(context)) {
  if (!j.is_object())
    error_ = fmt::format("{}: expected an object, got {}", context_.empty() ? "message" : context_, json_type_name(j));
}

std::string ObjectReader::path(std::string_view key) const {
  return context_.empty() ? std::string(key) : fmt::format("{}.{}", context_, key);
}

void ObjectReader::fail(std::string message) {
  if (error_.empty()) error_ = context_.empty() ? std::move(message) : fmt::format("{}: {}", context_, message);
}

Status ObjectReader::status() const {
  if (ok()) return {};
  return make_error(GPUP_STATUS_INVALID_PARAMETER, error_);
}

bool ObjectReader::has(std::string_view key) const {
  auto it = j_.find(key);
  return it != j_.end() && !it->is_null();
}

const json* ObjectReader::find(std::string_view key, bool required) {
  if (!error_.empty()) return nullptr;
  auto it = j_.find(key);
  if (it == j_.end() || it->is_null()) {
    if (required) error_ = fmt::format("{}: missing", path(key));
    return nullptr;
  }
  return &*it;
}

static std::optional<uint64_t> as_u64(const json& v, std::string* why) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  *why = fmt::format("expected a non-negative integer, got {}", json_type_name(v));
  return std::nullopt;
}

std::optional<uint64_t> ObjectReader::u64(std::string_view key, uint64_t min, uint64_t max) {
  const json* v = find(key, true);
  if (!v) return std::nullopt;
  std::string why;
  auto n = as_u64(*v, &why);
  if (!n) {
    error_ = fmt::format("{}: {}", path(key), why);
    return std::nullopt;
  }
  if (*n < min || *n > max) {
    error_ = fmt::format("{}: {} is outside {}..{}", path(key), *n, min, max);
    return std::nullopt;
  }
  return n;
}

std::optional<uint64_t> ObjectReader::opt_u64(std::string_view key, uint64_t min, uint64_t max) {
  if (!has(key)) return std::nullopt;
  return u64(key, min, max);
}

std::optional<std::string> ObjectReader::str(std::string_view key, size_t max_len) {
  const json* v = find(key, true);
  if (!v) return std::nullopt;
  if (!v->is_string()) {
    error_ = fmt::format("{}: expected a string, got {}", path(key), json_type_name(*v));
    return std::nullopt;
  }
  const auto& s = v->get_ref<const std::string&>();
  if (s.size() > max_len) {
    error_ = fmt::format("{}: longer than {} bytes", path(key), max_len);
    return std::nullopt;
  }
  return s;
}

std::optional<std::string> ObjectReader::opt_str(std::string_view key, size_t max_len) {
  if (!has(key)) return std::nullopt;
  return str(key, max_len);
}

std::optional<bool> ObjectReader::boolean(std::string_view key) {
  const json* v = find(key, true);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) {
    error_ = fmt::format("{}: expected true or false, got {}", path(key), json_type_name(*v));
    return std::nullopt;
  }
  return v->get<bool>();
}

std::optional<bool> ObjectReader::opt_boolean(std::string_view key) {
  if (!has(key)) return std::nullopt;
  return boolean(key);
}

const json* ObjectReader::object(std::string_view key) {
  const json* v = find(key, true);
  if (v && !v->is_object()) {
    error_ = fmt::format("{}: expected an object, got {}", path(key), json_type_name(*v));
    return nullptr;
  }
  return v;
}

const json* ObjectReader::opt_object(std::string_view key) {
  if (!has(key)) return nullptr;
  return object(key);
}

const json* ObjectReader::array(std::string_view key, size_t max_items) {
  const json* v = find(key, true);
  if (!v) return nullptr;
  if (!v->is_array()) {
    error_ = fmt::format("{}: expected an array, got {}", path(key), json_type_name(*v));
    return nullptr;
  }
  if (v->size() > max_items) {
    error_ = fmt::format("{}: more than {} items", path(key), max_items);
    return nullptr;
  }
  return v;
}

void ObjectReader::only(std::initializer_list<std::string_view> allowed) {
  if (!error_.empty()) return;
  for (auto it = j_.begin(); it != j_.end(); ++it) {
    bool known = false;
    for (auto a : allowed) known = known || it.key() == a;
    if (!known) {
      error_ = fmt::format("{}: unknown field", path(printable(it.key(), 64)));
      return;
    }
  }
}

}  // namespace gpup::control
