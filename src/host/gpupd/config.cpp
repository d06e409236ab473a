#include "host/gpupd/config.h"

#include <grp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "common/units.h"
#include "host/control/protocol.h"

namespace gpup::gpupd {

std::string AdapterConfig::config_text() const {
  std::string out;
  for (const auto& [k, v] : config) out += k + "=" + v + "\n";
  return out;
}

Result<std::optional<gid_t>> lookup_group(const std::string& name) {
  long hint = ::sysconf(_SC_GETGR_R_SIZE_MAX);
  std::vector<char> buf(hint > 0 ? static_cast<size_t>(hint) : 4096);
  for (;;) {
    group grp{};
    group* found = nullptr;
    int rc = ::getgrnam_r(name.c_str(), &grp, buf.data(), buf.size(), &found);
    // A group with many members needs a larger buffer than the hint.
    if (rc == ERANGE && buf.size() < (16u << 20)) {
      buf.resize(buf.size() * 2);
      continue;
    }
    // Some NSS modules say "not found" with ENOENT or ESRCH rather than 0 and no entry.
    if (rc == 0 || rc == ENOENT || rc == ESRCH)
      return found ? std::optional<gid_t>(found->gr_gid) : std::optional<gid_t>();
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("cannot look up group '{}': {}", name, std::strerror(rc)));
  }
}

Config default_config() {
  Config c;
  c.source = "<built-in default>";
  c.adapters.push_back(AdapterConfig{"pocl0", "opencl", {}});
  return c;
}

namespace {

const char* node_type_name(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::table: return "table";
    case toml::node_type::array: return "array";
    case toml::node_type::string: return "string";
    case toml::node_type::integer: return "integer";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "boolean";
    case toml::node_type::date: return "date";
    case toml::node_type::time: return "time";
    case toml::node_type::date_time: return "date-time";
    default: return "value";
  }
}

class Checker {
 public:
  explicit Checker(const std::string& source) : source_(source) {}

  Error error(const std::string& key, const std::string& problem, const toml::node* at) const {
    std::string where;
    if (at && at->source().begin) where = fmt::format(" (line {})", at->source().begin.line);
    return make_error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{}: {}: {}{}", source_, key, problem, where));
  }

 private:
  const std::string& source_;
};

bool key_char_ok(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
         c == '.';
}

}  // namespace

Result<Config> parse_config(std::string_view text, const std::string& source, const GroupLookup& lookup) {
  toml::table root;
  try {
    root = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    return make_error(GPUP_STATUS_INVALID_PARAMETER,
                      fmt::format("{}: line {}, column {}: {}", source, e.source().begin.line,
                                  e.source().begin.column, e.description()));
  }
  Checker check(source);
  Config cfg;
  cfg.source = source;

  // Integer settings of the scheduler and TDR: key, where it goes, its range.
  struct IntKey {
    const char* key;
    uint32_t* out;
    uint32_t min, max;
  };
  const IntKey int_keys[] = {
      {"tdr_delay_ms", &cfg.tdr_delay_ms, control::kMinTdrDelayMs, control::kMaxTdrDelayMs},
      {"tdr_limit_count", &cfg.tdr_limit_count, 1, 1000},
      {"tdr_limit_window_s", &cfg.tdr_limit_window_s, 1, 86400},
      {"scheduler_quantum_ms", &cfg.scheduler_quantum_ms, 1, 1000},
      {"worker_id_base", &cfg.worker_id_base, kMinWorkerIdBase, static_cast<uint32_t>(kWorkerIdLimit - 1)},
      {"worker_id_count", &cfg.worker_id_count, 1, kMaxWorkerIdCount},
  };
  for (const auto& [key, node] : root) {
    bool known = key.str() == "adapter" || key.str() == "worker_memory_overhead" || key.str() == "admin_group";
    for (const auto& k : int_keys) known = known || key.str() == k.key;
    if (!known)
      return check.error(std::string(key.str()),
                         "unknown key (expected [[adapter]] tables, worker_memory_overhead, tdr_delay_ms, "
                         "tdr_limit_count, tdr_limit_window_s, scheduler_quantum_ms, admin_group, worker_id_base "
                         "or worker_id_count)",
                         &node);
  }
  for (const auto& k : int_keys) {
    const toml::node* n = root.get(k.key);
    if (!n) continue;
    const auto* i = n->as_integer();
    if (!i) return check.error(k.key, fmt::format("expected an integer, got {}", node_type_name(*n)), n);
    if (i->get() < k.min || i->get() > k.max)
      return check.error(k.key, fmt::format("{} is outside {} .. {}", i->get(), k.min, k.max), n);
    *k.out = static_cast<uint32_t>(i->get());
  }
  // Only an explicit base can run the range past the limit: the default base plus the largest
  // count stays below it.
  if (uint64_t end = uint64_t{cfg.worker_id_base} + cfg.worker_id_count; end > kWorkerIdLimit) {
    const toml::node* n = root.get("worker_id_base");
    return check.error("worker_id_base",
                       fmt::format("{} + worker_id_count {} ends at {}, past {} ((uid_t)-2)", cfg.worker_id_base,
                                   cfg.worker_id_count, end, kWorkerIdLimit),
                       n ? n : root.get("worker_id_count"));
  }
  if (const toml::node* n = root.get("admin_group")) {
    const auto* s = n->as_string();
    if (!s) return check.error("admin_group", fmt::format("expected a string, got {}", node_type_name(*n)), n);
    const std::string& name = s->get();
    bool name_ok = !name.empty() && name.size() <= 256;
    for (char c : name) name_ok = name_ok && static_cast<unsigned char>(c) > ' ' && c != 0x7f && c != ':';
    if (!name_ok)
      return check.error("admin_group", "must be a group name (1-256 characters, no spaces, control characters or ':')",
                         n);
    auto gid = lookup(name);
    if (!gid) return check.error("admin_group", gid.error().message, n);
    if (!*gid) return check.error("admin_group", fmt::format("no group named '{}'", name), n);
    cfg.admin_group = name;
    cfg.admin_gid = **gid;
  }
  if (const toml::node* n = root.get("worker_memory_overhead")) {
    std::optional<uint64_t> size;
    if (const auto* i = n->as_integer()) {
      if (i->get() >= 0) size = static_cast<uint64_t>(i->get());
    } else if (const auto* s = n->as_string()) {
      size = parse_size(s->get());
    } else {
      return check.error("worker_memory_overhead",
                         fmt::format("expected a size (integer bytes or a string such as \"512MiB\"), got {}",
                                     node_type_name(*n)),
                         n);
    }
    if (!size) return check.error("worker_memory_overhead", "not a size (e.g. 512MiB)", n);
    if (*size < kMinWorkerMemoryOverhead || *size > kMaxWorkerMemoryOverhead)
      return check.error("worker_memory_overhead",
                         fmt::format("{} is outside {} .. {}", format_size(*size), format_size(kMinWorkerMemoryOverhead),
                                     format_size(kMaxWorkerMemoryOverhead)),
                         n);
    cfg.worker_memory_overhead = *size;
  }
  const toml::node* adapters_node = root.get("adapter");
  if (!adapters_node) return cfg;
  const toml::array* adapters = adapters_node->as_array();
  if (!adapters)
    return check.error("adapter", fmt::format("expected an array of tables ([[adapter]]), got {}",
                                              node_type_name(*adapters_node)),
                       adapters_node);

  std::set<std::string> names;
  for (size_t i = 0; i < adapters->size(); ++i) {
    const toml::node& an = *adapters->get(i);
    std::string ctx = fmt::format("adapter[{}]", i);
    const toml::table* t = an.as_table();
    if (!t) return check.error(ctx, fmt::format("expected a table, got {}", node_type_name(an)), &an);
    AdapterConfig ac;
    for (const auto& [k, v] : *t) {
      std::string key(k.str());
      if (key != "name" && key != "kmd" && key != "config")
        return check.error(ctx + "." + key, "unknown key (expected name, kmd, config)", &v);
    }
    for (const char* field : {"name", "kmd"}) {
      const toml::node* n = t->get(field);
      if (!n) return check.error(ctx + "." + field, "missing", &an);
      const auto* s = n->as_string();
      if (!s) return check.error(ctx + "." + field, fmt::format("expected a string, got {}", node_type_name(*n)), n);
      (std::string_view(field) == "name" ? ac.name : ac.kmd) = s->get();
    }
    if (Status s = control::validate_name(ac.name, "adapter"); !s.ok())
      return check.error(ctx + ".name", s.error().message, t->get("name"));
    if (!names.insert(ac.name).second)
      return check.error(ctx + ".name", fmt::format("adapter '{}' is defined twice", ac.name), t->get("name"));
    if (ac.kmd.empty() || ac.kmd.size() > control::kMaxPathLength || ac.kmd.find('\0') != std::string::npos)
      return check.error(ctx + ".kmd", "must be a plugin name or a path", t->get("kmd"));

    if (const toml::node* cn = t->get("config")) {
      const toml::table* ct = cn->as_table();
      if (!ct) return check.error(ctx + ".config", fmt::format("expected a table, got {}", node_type_name(*cn)), cn);
      // toml++ keeps keys sorted; the KMD gets them in the order the file has them.
      std::vector<std::pair<const toml::key*, const toml::node*>> entries;
      for (const auto& [k, v] : *ct) entries.emplace_back(&k, &v);
      std::stable_sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
        const auto& pa = a.second->source().begin;
        const auto& pb = b.second->source().begin;
        return pa.line != pb.line ? pa.line < pb.line : pa.column < pb.column;
      });
      size_t total = 0;
      for (const auto& [kp, vp] : entries) {
        const toml::node& v = *vp;
        std::string key(kp->str());
        std::string path = ctx + ".config." + key;
        bool key_ok = !key.empty() && key.size() <= 128;
        for (char c : key) key_ok = key_ok && key_char_ok(c);
        if (!key_ok) return check.error(path, "key must be 1-128 characters of A-Z a-z 0-9 _ - .", &v);
        std::string value;
        if (const auto* s = v.as_string()) value = s->get();
        else if (const auto* n = v.as_integer()) value = std::to_string(n->get());
        else if (const auto* b = v.as_boolean()) value = b->get() ? "true" : "false";
        else
          return check.error(path, fmt::format("expected a string, integer or boolean, got {}", node_type_name(v)), &v);
        if (value.find_first_of(std::string_view("\n\r\0", 3)) != std::string::npos)
          return check.error(path, "value must not contain line breaks or NUL", &v);
        total += key.size() + value.size() + 2;
        if (total > control::kMaxKmdConfigLength)
          return check.error(ctx + ".config", fmt::format("longer than {} bytes", control::kMaxKmdConfigLength), cn);
        ac.config.emplace_back(std::move(key), std::move(value));
      }
    }
    cfg.adapters.push_back(std::move(ac));
  }
  return cfg;
}

Result<Config> load_config(const std::string& path, const GroupLookup& lookup) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return make_error(GPUP_STATUS_NOT_FOUND, fmt::format("{}: cannot open the configuration file", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return make_error(GPUP_STATUS_INTERNAL, fmt::format("{}: read error", path));
  return parse_config(ss.str(), path, lookup);
}

}  // namespace gpup::gpupd
