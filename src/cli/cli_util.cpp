#include <limits.h>
#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

#include "cli/cli.h"
#include "common/units.h"
#include "host/control/client.h"
#include "host/control/protocol.h"

namespace gpup::cli {

std::string Context::socket() const { return control::socket_path(runtime_dir); }
std::string Context::log_file() const { return fmt::format("{}/{}", runtime_dir, control::kLogFileName); }

Context context_from_env() { return Context{control::default_runtime_dir(), control::default_state_dir()}; }

json call(const Context& ctx, const json& request, std::chrono::milliseconds timeout) {
  auto r = control::call(ctx.socket(), request, timeout);
  if (!r) throw CliError(r.error().message);
  return std::move(*r);
}

Table::Table(std::vector<std::string> headers, std::vector<bool> right_aligned)
    : headers_(std::move(headers)), right_(std::move(right_aligned)) {
  right_.resize(headers_.size(), false);
}

void Table::add(std::vector<std::string> row) {
  row.resize(headers_.size());
  rows_.push_back(std::move(row));
}

std::string Table::render() const {
  std::vector<size_t> width(headers_.size());
  for (size_t c = 0; c < headers_.size(); ++c) {
    width[c] = headers_[c].size();
    for (const auto& r : rows_) width[c] = std::max(width[c], r[c].size());
  }
  std::string out;
  auto line = [&](const std::vector<std::string>& cells) {
    std::string l;
    for (size_t c = 0; c < cells.size(); ++c) {
      std::string pad(width[c] - cells[c].size(), ' ');
      if (c) l += "  ";
      l += right_[c] ? pad + cells[c] : cells[c] + pad;
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l + "\n";
  };
  line(headers_);
  for (const auto& r : rows_) line(r);
  return out;
}

std::string str(const json& j, const char* key, const std::string& fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

uint64_t u64(const json& j, const char* key, uint64_t fallback) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return fallback;
  if (it->is_number_unsigned()) return it->get<uint64_t>();
  return it->get<int64_t>() >= 0 ? static_cast<uint64_t>(it->get<int64_t>()) : fallback;
}

bool flag(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

std::string format_duration(uint64_t s) {
  if (s >= 86400) return fmt::format("{}d {}h {}m", s / 86400, s % 86400 / 3600, s % 3600 / 60);
  if (s >= 3600) return fmt::format("{}h {}m {}s", s / 3600, s % 3600 / 60, s % 60);
  if (s >= 60) return fmt::format("{}m {}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

std::string format_luid(uint64_t luid) { return fmt::format("{:#018x}", luid); }

uint64_t parse_size_option(const std::string& text, const std::string& option) {
  auto v = parse_size(text);
  if (!v) throw CliError(fmt::format("{}: '{}' is not a size (use bytes or a unit: 256MiB, 1.5GiB)", option, text));
  return *v;
}

std::string self_dir() {
  char buf[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  std::string p(buf, static_cast<size_t>(n));
  return p.substr(0, p.rfind('/'));
}

}  // namespace gpup::cli
