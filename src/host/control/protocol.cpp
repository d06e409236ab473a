#include "host/control/protocol.h"

#include <sys/random.h>

#include <algorithm>
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
              {"build_timeout_s", vm.build_timeout_s},
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
  // Partitions persisted before builds had a limit take the default.
  auto build_timeout = r.opt_u64("build_timeout_s", kMinBuildTimeoutS, kMaxBuildTimeoutS);
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
  vm.build_timeout_s = static_cast<uint32_t>(build_timeout.value_or(kDefaultBuildTimeoutS));
  vm.allow_users = std::move(*users);
  vm.allow_groups = std::move(*groups);
  return vm;
}

Result<VmSpec> exact_vm_spec_from_json(const json& j, std::string_view context) {
  ObjectReader r(j, std::string(context));
  r.only({"name", "guid", "adapter", "min_vram", "max_vram", "optimal_vram", "compute_weight", "max_compute",
          "secure", "build_timeout_s", "allow_users", "allow_groups"});
  if (!r.ok()) return make_error(GPUP_STATUS_INVALID_PARAMETER, r.error());
  return vm_spec_from_json(j, context);
}

json to_json(const AdapterSpec& a) {
  return json{{"name", a.name}, {"luid", a.luid}, {"kmd", a.kmd}, {"config", a.config}};
}

Result<AdapterSpec> adapter_spec_from_json(const json& j, std::string_view context) {
  ObjectReader r(j, std::string(context));
  r.only({"name", "luid", "kmd", "config"});
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
  ObjectReader r(j, "configure");
  r.only({"op", "vm", "adapter", "endpoint", "log_level", "tdr_delay_ms"});
  auto op = r.str("op", 32);
  const json* vm = r.object("vm");
  const json* adapter = r.object("adapter");
  auto endpoint = r.str("endpoint", kUnixPathMax);
  auto level = r.str("log_level", 16);
  auto tdr = r.u64("tdr_delay_ms", kMinTdrDelayMs, kMaxTdrDelayMs);
  if (!r.ok()) return make_error(GPUP_STATUS_INVALID_PARAMETER, r.error());
  if (*op != "configure")
    return make_error(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("expected op 'configure', got '{}'", printable(*op)));
  if (std::find(kLogLevels.begin(), kLogLevels.end(), *level) == kLogLevels.end())
    return make_error(GPUP_STATUS_INVALID_PARAMETER,
                      fmt::format("configure.log_level: '{}' is not a log level", printable(*level)));
  auto v = exact_vm_spec_from_json(*vm, "vm");
  if (!v) return v.error();
  auto a = adapter_spec_from_json(*adapter);
  if (!a) return a.error();
  if (endpoint->empty() || endpoint->front() != '/')
    return make_error(GPUP_STATUS_INVALID_PARAMETER, "configure.endpoint: not an absolute path");
  if (v->adapter != a->name)
    return make_error(GPUP_STATUS_INVALID_PARAMETER,
                      fmt::format("vm.adapter '{}' is not adapter.name '{}'", v->adapter, a->name));
  return ConfigureMessage{std::move(*v), std::move(*a), *endpoint, *level, static_cast<uint32_t>(*tdr)};
}

// ---------------------------------------------------------------------------------------------
// The worker channel after configure

namespace {

Error protocol_error(std::string message) { return make_error(GPUP_STATUS_PROTOCOL_ERROR, std::move(message)); }

// A peer's text cut to what its decoder takes (encode_line replaces a cut UTF-8 sequence).
std::string capped(const std::string& text, size_t max) { return text.size() > max ? text.substr(0, max) : text; }

// The value of key that names the line ("event", "sched"), which must be one of names.
std::optional<std::string> kind_of(ObjectReader& r, std::string_view key, std::initializer_list<std::string_view> names) {
  auto kind = r.str(key, 16);
  if (!kind) return std::nullopt;
  std::string known;
  for (auto n : names) {
    if (*kind == n) return kind;
    known += fmt::format("{}{}", known.empty() ? "" : " or ", n);
  }
  r.fail(fmt::format("{} is '{}', not {}", key, printable(*kind, 16), known));
  return std::nullopt;
}

}  // namespace

const char* to_string(WorkerOp op) {
  switch (op) {
    case WorkerOp::kStats: return "stats";
    case WorkerOp::kUpdate: return "update";
    case WorkerOp::kShutdown: return "shutdown";
  }
  return "?";
}

std::optional<WorkerOp> worker_op_from_string(std::string_view op) {
  for (WorkerOp o : {WorkerOp::kStats, WorkerOp::kUpdate, WorkerOp::kShutdown})
    if (op == to_string(o)) return o;
  return std::nullopt;
}

json to_json(const WorkerRequest& m) {
  json j{{"op", to_string(m.op)}, {"id", m.id}};
  if (m.vm) j["vm"] = to_json(*m.vm);
  return j;
}

Result<WorkerRequest> worker_request_from_json(const json& j) {
  ObjectReader r(j, "request");
  r.only({"op", "id", "vm"});
  auto op_name = r.str("op", 16);
  auto id = r.u64("id", 1);
  if (!r.ok()) return protocol_error(r.error());
  auto op = worker_op_from_string(*op_name);
  if (!op) return protocol_error(fmt::format("request.op: unknown op '{}'", printable(*op_name, 16)));
  WorkerRequest m{*op, *id, std::nullopt};
  if (*op == WorkerOp::kUpdate) {
    const json* vm = r.object("vm");
    if (!r.ok()) return protocol_error(r.error());
    auto spec = exact_vm_spec_from_json(*vm, "request.vm");
    if (!spec) return protocol_error(spec.error().message);
    m.vm = std::move(*spec);
  } else if (r.has("vm")) {
    return protocol_error(fmt::format("request.vm: only an update carries one, not {}", to_string(*op)));
  }
  return m;
}

json to_json(const WorkerReply& m) {
  json j{{"reply", m.id}, {"ok", m.ok}};
  if (!m.ok) j["error"] = capped(m.error, kMaxMessageLength);
  if (m.ok && m.stats) j["stats"] = *m.stats;
  return j;
}

Result<WorkerReply> worker_reply_from_json(const json& j, std::optional<WorkerOp> op) {
  ObjectReader r(j, "reply");
  r.only({"reply", "ok", "error", "stats"});
  auto id = r.u64("reply", 1);
  auto ok = r.boolean("ok");
  if (!r.ok()) return protocol_error(r.error());
  WorkerReply m{*id, *ok, {}, std::nullopt};
  if (!*ok) {
    auto error = r.str("error", kMaxMessageLength);
    if (r.has("stats")) r.fail("stats in a refusal");
    if (!r.ok()) return protocol_error(r.error());
    m.error = std::move(*error);
    return m;
  }
  if (r.has("error")) return protocol_error("reply: error in an ok reply");
  const bool want_stats = op == WorkerOp::kStats;
  if (op && want_stats != r.has("stats"))
    return protocol_error(want_stats ? "reply.stats: missing" : fmt::format("reply.stats: not in a reply to {}", to_string(*op)));
  if (r.has("stats")) {
    auto stats = sanitize_worker_stats(j.at("stats"));
    if (!stats) return protocol_error(stats.error().message);
    m.stats = std::move(*stats);
  }
  return m;
}

json to_json(const ReadyEvent& m) {
  json j{{"event", "ready"}, {"endpoint", m.endpoint}};
  if (m.pid) j["pid"] = *m.pid;
  return j;
}

Result<ReadyEvent> ready_event_from_json(const json& j) {
  ObjectReader r(j, "ready");
  r.only({"event", "endpoint", "pid"});
  kind_of(r, "event", {"ready"});
  auto endpoint = r.str("endpoint", kUnixPathMax);
  auto pid = r.opt_u64("pid", 1, INT32_MAX);
  if (!r.ok()) return protocol_error(r.error());
  return ReadyEvent{*endpoint, pid ? std::optional<uint32_t>(static_cast<uint32_t>(*pid)) : std::nullopt};
}

json to_json(const ErrorEvent& m) { return json{{"event", "error"}, {"message", capped(m.message, kMaxMessageLength)}}; }

Result<ErrorEvent> error_event_from_json(const json& j) {
  ObjectReader r(j, "error");
  r.only({"event", "message"});
  kind_of(r, "event", {"error"});
  auto message = r.str("message", kMaxMessageLength);
  if (!r.ok()) return protocol_error(r.error());
  return ErrorEvent{*message};
}

json to_json(const TdrEvent& m) {
  json j{{"event", "tdr"}, {"running_ms", m.running_ms}};
  if (m.kind == TdrEvent::Kind::kBuild) {
    j["kind"] = "build";
    j["build_timeout_s"] = m.build_timeout_s;
  } else {
    j["tdr_delay_ms"] = m.tdr_delay_ms;
  }
  if (m.context) j["context"] = *m.context;
  if (m.pid) j["pid"] = *m.pid;
  if (m.process) j["process"] = capped(*m.process, kMaxProcessName);
  if (!m.guests_told) j["guests_told"] = false;
  return j;
}

Result<TdrEvent> tdr_event_from_json(const json& j) {
  ObjectReader r(j, "tdr");
  const bool build = j.is_object() && j.contains("kind");
  if (build) {
    kind_of(r, "kind", {"build"});
    r.only({"event", "kind", "running_ms", "build_timeout_s", "pid", "process", "guests_told"});
  } else {
    r.only({"event", "running_ms", "tdr_delay_ms", "context", "pid", "process", "guests_told"});
  }
  kind_of(r, "event", {"tdr"});
  TdrEvent m;
  auto ran = r.u64("running_ms");
  std::optional<uint64_t> delay, timeout;
  if (build) timeout = r.u64("build_timeout_s", kMinBuildTimeoutS, kMaxBuildTimeoutS);
  else delay = r.u64("tdr_delay_ms", kMinTdrDelayMs, kMaxTdrDelayMs);
  auto context = r.opt_u64("context", 0, UINT32_MAX);
  auto pid = r.opt_u64("pid", 0, UINT32_MAX);
  m.process = r.opt_str("process", kMaxProcessName);
  auto told = r.opt_boolean("guests_told");
  if (!r.ok()) return protocol_error(r.error());
  m.running_ms = *ran;
  if (build) {
    m.kind = TdrEvent::Kind::kBuild;
    m.build_timeout_s = static_cast<uint32_t>(*timeout);
  } else {
    m.tdr_delay_ms = static_cast<uint32_t>(*delay);
  }
  if (context) m.context = static_cast<uint32_t>(*context);
  if (pid) m.pid = static_cast<uint32_t>(*pid);
  m.guests_told = told.value_or(true);
  return m;
}

json to_json(const VramAsk& m) {
  json j{{"ask", m.id}, {"op", "vram"}};
  if (!m.query) {
    j["need"] = m.need;
    j["want"] = m.want;
  }
  return j;
}

Result<VramAsk> vram_ask_from_json(const json& j) {
  ObjectReader r(j, "ask");
  r.only({"ask", "op", "need", "want"});
  auto id = r.u64("ask", 1);
  auto op = r.str("op", 16);
  if (op && *op != "vram") r.fail(fmt::format("op is '{}', not vram", printable(*op, 16)));
  const bool query = !r.has("need") && !r.has("want");
  auto need = query ? std::optional<uint64_t>(0) : r.u64("need");
  auto want = query ? std::optional<uint64_t>(0) : r.u64("want");
  if (!r.ok()) return protocol_error(r.error());
  if (*need > *want) return protocol_error(fmt::format("ask: need {} is above want {}", *need, *want));
  return VramAsk{*id, query, *need, *want};
}

json to_json(const VramAnswer& m) {
  json j{{"answer", m.id}, {"ok", true}, {"granted", m.granted}, {"hold", m.hold}, {"borrowable", m.borrowable}};
  if (m.min) j["min"] = *m.min;
  if (m.max) j["max"] = *m.max;
  if (!m.granted) j["error"] = capped(m.why, kMaxMessageLength);
  return j;
}

Result<VramAnswer> vram_answer_from_json(const json& j) {
  ObjectReader r(j, "answer");
  r.only({"answer", "ok", "granted", "hold", "borrowable", "min", "max", "error"});
  VramAnswer m;
  auto id = r.u64("answer", 1);
  auto ok = r.boolean("ok");
  if (ok && !*ok) r.fail("ok is false (a refusal is granted:false)");
  auto granted = r.boolean("granted");
  auto hold = r.u64("hold");
  auto borrowable = r.u64("borrowable");
  m.min = r.opt_u64("min");
  m.max = r.opt_u64("max");
  auto why = r.opt_str("error", kMaxMessageLength);
  if (granted && *granted && why) r.fail("error in a grant");
  if (!r.ok()) return protocol_error(r.error());
  m.id = *id;
  m.granted = *granted;
  m.hold = *hold;
  m.borrowable = *borrowable;
  m.why = why.value_or("");
  return m;
}

json to_json(const SchedRequest& m) {
  if (m.kind == SchedRequest::Kind::kWant) return json{{"sched", "want"}};
  return json{{"sched", "release"}, {"busy_us", m.busy_us}, {"more", m.more}};
}

Result<SchedRequest> sched_request_from_json(const json& j) {
  ObjectReader r(j, "sched");
  auto kind = kind_of(r, "sched", {"want", "release"});
  SchedRequest m;
  if (kind == "want") {
    r.only({"sched"});
  } else if (kind == "release") {
    r.only({"sched", "busy_us", "more"});
    auto busy = r.u64("busy_us", 0, kMaxBusyUs);
    auto more = r.boolean("more");
    if (r.ok()) m = SchedRequest{SchedRequest::Kind::kRelease, *busy, *more};
  }
  if (!r.ok()) return protocol_error(r.error());
  return m;
}

json to_json(const SchedNotice& m) {
  if (m.kind == SchedNotice::Kind::kGrant) return json{{"sched", "grant"}};
  return json{{"sched", "yield"}, {"after_us", m.after_us}, {"if_idle", m.if_idle}};
}

Result<SchedNotice> sched_notice_from_json(const json& j) {
  ObjectReader r(j, "sched");
  auto kind = kind_of(r, "sched", {"grant", "yield"});
  SchedNotice m;
  if (kind == "grant") {
    r.only({"sched"});
  } else if (kind == "yield") {
    r.only({"sched", "after_us", "if_idle"});
    auto after = r.u64("after_us", 0, kMaxYieldAfterUs);
    auto if_idle = r.boolean("if_idle");
    if (r.ok()) m = SchedNotice{SchedNotice::Kind::kYield, *after, *if_idle};
  }
  if (!r.ok()) return protocol_error(r.error());
  return m;
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

std::string ascii_only(std::string text) {
  for (char& c : text)
    if (c < 0x20 || c > 0x7e) c = '?';
  return text;
}

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
      // A program name reaches the operator's terminal: printable ASCII only, as the worker makes it.
      if (auto name = p.opt_str("name", kMaxProcessName)) o["name"] = ascii_only(*name);
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
