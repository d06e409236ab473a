#include "host/gpupd/state.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include <fmt/format.h>

#include "common/fd.h"

namespace gpup::gpupd {

using control::json;

// A reason as the file keeps it: control characters become '?', cut on a UTF-8 character boundary
// so it stays within kMaxResetReasonLength (what the reader accepts) and valid.
static std::string stored_reason(std::string_view why) {
  std::string out = control::printable(why, why.size());
  if (out.size() <= kMaxResetReasonLength) return out;
  size_t cut = kMaxResetReasonLength - 3;
  while (cut > 0 && (static_cast<uint8_t>(out[cut]) & 0xc0) == 0x80) --cut;
  out.resize(cut);
  return out + "...";
}

static json to_json(const ResetHistory& h) {
  json j{{"total", h.total}, {"times", h.times}};
  if (!h.last.empty()) j["last"] = stored_reason(h.last);
  if (!h.removed.empty()) j["removed"] = stored_reason(h.removed);
  return j;
}

json to_json(const PersistentState& s) {
  json adapters = json::object();
  for (const auto& [name, luid] : s.luids) adapters[name] = json{{"luid", luid}};
  json parts = json::array();
  for (const auto& vm : s.partitions) {
    json p = control::to_json(vm);
    if (auto it = s.resets.find(vm.name); it != s.resets.end() && !it->second.empty()) p["resets"] = to_json(it->second);
    parts.push_back(std::move(p));
  }
  return json{{"version", kStateVersion}, {"adapters", std::move(adapters)}, {"partitions", std::move(parts)}};
}

// The "resets" of one partition; errors name the field ("partitions[2].resets.times[0]: ...").
static Result<ResetHistory> reset_history_from_json(const json& j, const std::string& context,
                                                    uint32_t tdr_limit_count) {
  auto bad = [](std::string what) { return make_error(GPUP_STATUS_PROTOCOL_ERROR, std::move(what)); };
  control::ObjectReader r(j, context);
  r.only({"total", "last", "times", "removed"});
  auto total = r.u64("total");
  auto last = r.opt_str("last", kMaxResetReasonLength);
  const json* times = r.array("times", size_t{2} * tdr_limit_count);
  auto removed = r.opt_str("removed", kMaxResetReasonLength);
  if (!r.ok()) return bad(r.error());
  // Reasons are shown to operators and logged: no control characters, and present means said.
  for (const auto& [key, text] : {std::pair{"last", &last}, std::pair{"removed", &removed}}) {
    if (!*text) continue;
    if ((*text)->empty()) return bad(fmt::format("{}.{}: empty", context, key));
    if (std::any_of((*text)->begin(), (*text)->end(), [](char c) { return static_cast<uint8_t>(c) < 0x20 || c == 0x7f; }))
      return bad(fmt::format("{}.{}: contains control characters", context, key));
  }
  ResetHistory h;
  h.total = *total;
  h.last = last.value_or("");
  h.removed = removed.value_or("");
  for (size_t i = 0; i < times->size(); ++i) {
    const json& t = (*times)[i];
    if (!t.is_number_unsigned() || t.get<uint64_t>() < 1 || t.get<uint64_t>() > kMaxResetTime)
      return bad(fmt::format("{}.times[{}]: expected seconds since the epoch in 1..{}, got {}", context, i, kMaxResetTime,
                             t.is_number_unsigned() ? std::to_string(t.get<uint64_t>()) : control::json_type_name(t)));
    if (!h.times.empty() && t.get<uint64_t>() < h.times.back())
      return bad(fmt::format("{}.times[{}]: earlier than the time before it (they are oldest first)", context, i));
    h.times.push_back(t.get<uint64_t>());
  }
  if (h.times.size() > h.total)
    return bad(fmt::format("{}: {} reset times but a total of {}", context, h.times.size(), h.total));
  return h;
}

Result<PersistentState> state_from_json(const json& j, const std::string& source, uint32_t tdr_limit_count) {
  auto bad = [&](const std::string& what) {
    return make_error(GPUP_STATUS_PROTOCOL_ERROR,
                      fmt::format("state file {} is invalid: {}; gpupd will not start until it is repaired or "
                                  "moved away",
                                  source, what));
  };
  control::ObjectReader r(j, "");
  auto version = r.u64("version");
  const json* adapters = r.object("adapters");
  const json* parts = r.array("partitions", 100000);
  if (!r.ok()) return bad(r.error());
  if (*version != kStateVersion) return bad(fmt::format("version {} is not {}", *version, kStateVersion));

  PersistentState s;
  std::set<uint64_t> luids;
  for (auto it = adapters->begin(); it != adapters->end(); ++it) {
    if (Status st = control::validate_name(it.key(), "adapter"); !st.ok()) return bad(st.error().message);
    control::ObjectReader a(it.value(), "adapters." + it.key());
    auto luid = a.u64("luid", 1);
    if (!a.ok()) return bad(a.error());
    if (!luids.insert(*luid).second) return bad(fmt::format("LUID {} is used twice", *luid));
    s.luids[it.key()] = *luid;
  }
  std::set<std::string> names;
  for (size_t i = 0; i < parts->size(); ++i) {
    // The partition's settings are a VmSpec (strict: no other keys) beside its reset history.
    json settings = (*parts)[i];
    if (settings.is_object()) settings.erase("resets");
    auto vm = control::vm_spec_from_json(settings, fmt::format("partitions[{}]", i));
    if (!vm) return bad(vm.error().message);
    if (!names.insert(vm->name).second) return bad(fmt::format("partition '{}' appears twice", vm->name));
    control::ObjectReader p((*parts)[i], fmt::format("partitions[{}]", i));
    if (const json* rs = p.opt_object("resets")) {
      auto h = reset_history_from_json(*rs, fmt::format("partitions[{}].resets", i), tdr_limit_count);
      if (!h) return bad(h.error().message);
      if (!h->empty()) s.resets[vm->name] = std::move(*h);
    }
    if (!p.ok()) return bad(p.error());
    s.partitions.push_back(std::move(*vm));
  }
  std::sort(s.partitions.begin(), s.partitions.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  return s;
}

Result<PersistentState> load_state(const std::string& path, uint32_t tdr_limit_count) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return PersistentState{};
    return make_error(GPUP_STATUS_ACCESS_DENIED, fmt::format("cannot read state file {}: {}", path, std::strerror(errno)));
  }
  std::string text;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      return make_error(GPUP_STATUS_ACCESS_DENIED, fmt::format("cannot read state file {}: {}", path, std::strerror(errno)));
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > (64u << 20))
      return make_error(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("state file {} is larger than 64 MiB", path));
  }
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    return make_error(GPUP_STATUS_PROTOCOL_ERROR,
                      fmt::format("state file {} is corrupt (not valid JSON at byte {}); gpupd will not start "
                                  "until it is repaired or moved away",
                                  path, e.byte));
  }
  return state_from_json(j, path, tdr_limit_count);
}

Status save_state(const std::string& path, const PersistentState& s) {
  return write_file_atomic(path, control::dump_json(to_json(s), 2) + "\n");
}

static Error io_error(const std::string& what, const std::string& path) {
  return make_error(GPUP_STATUS_INTERNAL, fmt::format("{} {}: {}", what, path, std::strerror(errno)));
}

Status write_file_atomic(const std::string& path, std::string_view contents, unsigned mode) {
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  std::string tmpl = path + ".tmp.XXXXXX";
  UniqueFd fd(::mkostemp(tmpl.data(), O_CLOEXEC));
  if (!fd) return io_error("cannot create", tmpl);
  // From here on the temporary file is removed on every failure.
  struct Unlink {
    std::string p;
    bool armed = true;
    ~Unlink() {
      if (armed) ::unlink(p.c_str());
    }
  } cleanup{tmpl};
  if (::fchmod(fd.get(), mode) != 0) return io_error("cannot chmod", tmpl);
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t n = ::write(fd.get(), contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return io_error("cannot write", tmpl);
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) return io_error("cannot fsync", tmpl);
  if (::close(fd.release()) != 0) return io_error("cannot close", tmpl);
  if (::rename(tmpl.c_str(), path.c_str()) != 0) return io_error("cannot rename to", path);
  cleanup.armed = false;
  UniqueFd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dfd || ::fsync(dfd.get()) != 0) return io_error("cannot fsync directory", dir);
  return {};
}

uint64_t derive_luid(std::string_view name, const std::map<std::string, uint64_t>& taken) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : std::string_view("gpup-adapter:")) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  auto used = [&](uint64_t v) {
    for (const auto& [n, l] : taken)
      if (l == v) return true;
    return false;
  };
  uint64_t luid = h & 0x7fffffffffffffffull;
  while (luid == 0 || used(luid)) luid = (luid + 1) & 0x7fffffffffffffffull;
  return luid;
}

}  // namespace gpup::gpupd
