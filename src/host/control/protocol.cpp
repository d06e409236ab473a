#include "host/control/protocol.h"

#include <sys/random.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

namespace gpup::control {

static std::string env_or(const char* var, const char* fallback) {
  const char* v = std::getenv(var);
  return v && *v ? std::string(v) : std::string(fallback);
}

std::string default_runtime_dir() { return env_or("GPUP_RUNTIME_DIR", "/run/gpup"); }
std::string default_state_dir() { return env_or("GPUP_STATE_DIR", "/var/lib/gpup"); }

std::string socket_path(std::string_view runtime_dir) { return fmt::format("{}/{}", runtime_dir, kSocketName); }
std::string pid_file_path(std::string_view runtime_dir) { return fmt::format("{}/{}", runtime_dir, kPidFileName); }
std::string vm_dir(std::string_view runtime_dir, std::string_view vm) {
  return fmt::format("{}/{}/{}", runtime_dir, kVmsDirName, vm);
}
std::string vm_endpoint(std::string_view runtime_dir, std::string_view vm) {
  return fmt::format("{}/{}", vm_dir(runtime_dir, vm), kEndpointName);
}

static bool name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
         c == '-';
}
static bool alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

Status validate_name(std::string_view name, std::string_view what) {
  bool ok = !name.empty() && name.size() <= kMaxVmNameLength && alnum(name.front());
  for (char c : name) ok = ok && name_char(c);
  if (ok) return {};
  return make_error(GPUP_STATUS_INVALID_PARAMETER,
                    fmt::format("{} name '{}' is invalid: use 1-{} characters of A-Z a-z 0-9 _ . -, "
                                "starting with a letter or digit",
                                what, printable(name, 80), kMaxVmNameLength));
}

std::string new_guid() {
  uint8_t b[16];
  size_t got = 0;
  while (got < sizeof b) {
    ssize_t n = ::getrandom(b + got, sizeof b - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::abort();  // the kernel's CSPRNG is unavailable: nothing sensible to fall back to
    }
    got += static_cast<size_t>(n);
  }
  b[6] = static_cast<uint8_t>((b[6] & 0x0f) | 0x40);  // version 4
  b[8] = static_cast<uint8_t>((b[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return fmt::format("{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                     b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
                     b[15]);
}

std::optional<std::array<uint8_t, 16>> parse_guid(std::string_view t) {
  if (t.size() != 36) return std::nullopt;
  std::array<uint8_t, 16> out{};
  size_t bi = 0;
  for (size_t i = 0; i < 36;) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (t[i] != '-') return std::nullopt;
      ++i;
      continue;
    }
    auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    int hi = hex(t[i]), lo = hex(t[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[bi++] = static_cast<uint8_t>(hi << 4 | lo);
    i += 2;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

json to_json(const VmSpec& vm) {
  return json{{"name", vm.name},
              {"guid", vm.guid},
              {"adapter", vm.adapter},
              {"min_vram", vm.min_vram},
              {"max_vram", vm.max_vram},
              {"optimal_vram", vm.optimal_vram},
              {"compute_weight", vm.compute_weight},
              {"max_compute", vm.max_compute},
              {"secure", vm.secure},
              {"allow_users", vm.allow_users},
              {"allow_groups", vm.allow_groups}};
}

namespace {

// An optional array of ids (absent: empty), at most kMaxAllowIds, each below 2^32 - 1.
Result<std::vector<uint32_t>> id_list(const json& j, const char* key, std::string_view context) {
  std::vector<uint32_t> out;
  auto it = j.find(key);
  if (it == j.end()) return out;
  if (!it->is_array() || it->size() > kMaxAllowIds)
    return make_error(GPUP_STATUS_INVALID_PARAMETER,
                      fmt::format("{}.{}: expected an array of at most {} ids", context, key, kMaxAllowIds));
  for (const auto& v : *it) {
    if (!v.is_number_unsigned() || v.get<uint64_t>() >= 0xffffffffu)
      return make_error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{}.{}: not a uid/gid", context, key));
    out.push_back(v.get<uint32_t>());
  }
  return out;
}

}  // namespace

Result<VmSpec> vm_spec_from_json(const json& j, std::string_view context) {
  ObjectReader r(j, std::string(context));
  VmSpec vm;
  auto name = r.str("name", kMaxVmNameLength);
  auto guid = r.str("guid", 36);
  auto adapter = r.str("adapter", kMaxAdapterNameLength);
  auto min = r.u64("min_vram");
  auto max = r.u64("max_vram");
  auto opt = r.u64("optimal_vram");
  auto weight = r.u64("compute_weight", kMinComputeWeight, kMaxComputeWeight);
  auto percent = r.u64("max_compute", kMinComputePercent, kMaxComputePercent);
  auto secure = r.boolean("secure");
  if (!r.ok()) return make_error(GPUP_STATUS_INVALID_PARAMETER, r.error());
  auto users = id_list(j, "allow_users", context);
  if (!users) return users.error();
  auto groups = id_list(j, "allow_groups", context);
  if (!groups) return groups.error();
  if (Status s = validate_name(*name, "vm"); !s.ok()) return s.error();
  if (Status s = validate_name(*adapter, "adapter"); !s.ok()) return s.error();
  if (!parse_guid(*guid))
    return make_error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{}.guid: '{}' is not a GUID", context, printable(*guid)));
  if (!(*min <= *opt && *opt <= *max))
    return make_error(GPUP_STATUS_INVALID_PARAMETER,
                      fmt::format("{}: min_vram {} <= optimal_vram {} <= max_vram {} does not hold", context, *min,
                                  *opt, *max));
  vm.name = *name;
  vm.guid = *guid;
  vm.adapter = *adapter;
  vm.min_vram = *min;
  vm.max_vram = *max;
  vm.optimal_vram = *opt;
  vm.compute_weight = static_cast<uint32_t>(*weight);
  vm.max_compute = static_cast<uint32_t>(*percent);
  vm.secure = *secure;
  vm.allow_users = std::move(*users);
  vm.allow_groups = std::move(*groups);
  return vm;
}

json to_json(const AdapterSpec& a) {
  return json{{"name", a.name}, {"luid", a.luid}, {"kmd", a.kmd}, {"config", a.config}};
}

Result<AdapterSpec> adapter_spec_from_json(const json& j, std::string_view context) {
  ObjectReader r(j, std::string(context));
  auto name = r.str("name", kMaxAdapterNameLength);
  auto luid = r.u64("luid", 1);
  auto kmd = r.str("kmd", kMaxPathLength);
  auto config = r.str("config", kMaxKmdConfigLength);
  if (!r.ok()) return make_error(GPUP_STATUS_INVALID_PARAMETER, r.error());
  if (Status s = validate_name(*name, "adapter"); !s.ok()) return s.error();
  if (kmd->empty() || kmd->front() != '/')
    return make_error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{}.kmd: not an absolute path", context));
  if (kmd->find('\0') != std::string::npos || config->find('\0') != std::string::npos)
    return make_error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{}: NUL byte in kmd or config", context));
  return AdapterSpec{*name, *luid, *kmd, *config};
}

json to_json(const ConfigureMessage& m) {
  return json{{"op", "configure"},
              {"vm", to_json(m.vm)},
              {"adapter", to_json(m.adapter)},
              {"endpoint", m.endpoint},
              {"log_level", m.log_level},
              {"tdr_delay_ms", m.tdr_delay_ms}};
}

Result<ConfigureMessage> configure_from_json(const json& j) {
  ObjectReader r(j, "");
  auto op = r.str("op", 32);
  const json* vm = r.object("vm");
  const json* adapter = r.object("adapter");
  auto endpoint = r.str("endpoint", kUnixPathMax);
  auto level = r.str("log_level", 16);
  auto tdr = r.opt_u64("tdr_delay_ms", kMinTdrDelayMs, kMaxTdrDelayMs);
  if (!r.ok()) return make_error(GPUP_STATUS_INVALID_PARAMETER, r.error());
  if (*op != "configure")
    return make_error(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("expected op 'configure', got '{}'", printable(*op)));
  auto v = vm_spec_from_json(*vm);
  if (!v) return v.error();
  auto a = adapter_spec_from_json(*adapter);
  if (!a) return a.error();
  if (endpoint->empty() || endpoint->front() != '/')
    return make_error(GPUP_STATUS_INVALID_PARAMETER, "endpoint: not an absolute path");
  if (v->adapter != a->name)
    return make_error(GPUP_STATUS_INVALID_PARAMETER,
                      fmt::format("vm.adapter '{}' is not adapter.name '{}'", v->adapter, a->name));
  return ConfigureMessage{std::move(*v), std::move(*a), *endpoint, *level,
                          tdr ? static_cast<uint32_t>(*tdr) : kDefaultTdrDelayMs};
}

void encode(const GuestHandoff& h, uint8_t out[kGuestHandoffSize]) {
  const uint32_t words[3] = {static_cast<uint32_t>(h.pid), h.uid, h.gid};
  for (int w = 0; w < 3; ++w)
    for (int b = 0; b < 4; ++b) out[w * 4 + b] = static_cast<uint8_t>(words[w] >> (8 * b));
}

GuestHandoff decode_guest_handoff(const uint8_t in[kGuestHandoffSize]) {
  uint32_t words[3] = {};
  for (int w = 0; w < 3; ++w)
    for (int b = 0; b < 4; ++b) words[w] |= static_cast<uint32_t>(in[w * 4 + b]) << (8 * b);
  return GuestHandoff{static_cast<int32_t>(words[0]), words[1], words[2]};
}

namespace {

bool counter_name(const std::string& k) {
  if (k.empty() || k.size() > 32) return false;
  for (char c : k)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return false;
  return true;
}

// Copies the counters of an object: the known ones type-checked (an error if mistyped), other
// snake_case keys with non-negative integer values kept up to kMaxExtraCounters, the rest dropped.
constexpr size_t kMaxExtraCounters = 32;
Status copy_counters(ObjectReader& r, const json& in, std::initializer_list<std::string_view> known, json& out) {
  for (auto key : known)
    if (auto v = r.opt_u64(key)) out[std::string(key)] = *v;
  if (!r.ok()) return make_error(GPUP_STATUS_PROTOCOL_ERROR, r.error());
  size_t extra = 0;
  for (auto it = in.begin(); it != in.end() && extra < kMaxExtraCounters; ++it) {
    if (out.contains(it.key()) || !counter_name(it.key())) continue;
    bool is_known = false;
    for (auto key : known) is_known = is_known || key == it.key();
    if (is_known) continue;
    if (it->is_number_unsigned() || (it->is_number_integer() && it->get<int64_t>() >= 0)) {
      out[it.key()] = it->get<uint64_t>();
      ++extra;
    }
  }
  return {};
}

}  // namespace

Result<json> sanitize_worker_stats(const json& stats) {
  ObjectReader r(stats, "stats");
  auto used = r.u64("vram_used");
  auto max = r.u64("vram_max");
  if (!r.ok()) return make_error(GPUP_STATUS_PROTOCOL_ERROR, r.error());
  json out{{"vram_used", *used}, {"vram_max", *max}};
  // The partition's device memory beside the arbiter's: min, held (min included), borrowed, refused.
  for (std::string_view key : {"vram_min", "vram_held", "vram_borrowed", "vram_refused"})
    if (auto v = r.opt_u64(key)) out[std::string(key)] = *v;
  if (!r.ok()) return make_error(GPUP_STATUS_PROTOCOL_ERROR, r.error());
  if (const json* totals = r.opt_object("totals")) {
    ObjectReader t(*totals, "stats.totals");
    json o = json::object();
    if (Status s = copy_counters(t, *totals, {"processes", "devices", "contexts", "allocations", "sync_objects"}, o);
        !s.ok())
      return s.error();
    out["totals"] = std::move(o);
  }
  json procs = json::array();
  if (r.has("processes")) {
    const json* list = r.array("processes", kMaxStatsProcesses);
    if (!r.ok()) return make_error(GPUP_STATUS_PROTOCOL_ERROR, r.error());
    for (size_t i = 0; i < list->size(); ++i) {
      const json& pj = (*list)[i];
      ObjectReader p(pj, fmt::format("stats.processes[{}]", i));
      json o = json::object();
      if (auto pid = p.opt_u64("pid", 0, UINT32_MAX)) o["pid"] = *pid;
      if (auto name = p.opt_str("name", kMaxProcessName)) o["name"] = *name;
      if (!p.ok()) return make_error(GPUP_STATUS_PROTOCOL_ERROR, p.error());
      if (Status s = copy_counters(p, pj, {"vram_used", "devices", "contexts", "allocations", "sync_objects"}, o);
          !s.ok())
        return s.error();
      procs.push_back(std::move(o));
    }
  }
  if (!r.ok()) return make_error(GPUP_STATUS_PROTOCOL_ERROR, r.error());
  out["processes"] = std::move(procs);
  return out;
}

}  // namespace gpup::control
