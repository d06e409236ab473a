// gpup adapters | vm add | vm set | vm list | vm show | vm remove | vm start | vm reset
#include <grp.h>
#include <pwd.h>
#include <cctype>
#include <iostream>
#include <set>

#include <fmt/format.h>

#include "cli/cli.h"
#include "common/units.h"
#include "host/control/json_lines.h"

namespace gpup::cli {

static void print_json(const json& j) { std::cout << control::dump_json(j, 2) << "\n"; }

static std::string worker_state(const json& vm) {
  std::string s = str(vm, "state", "?");
  if (vm.contains("pid")) s += fmt::format(" (pid {})", u64(vm, "pid"));
  return s;
}

int cmd_adapters(const Context& ctx, bool as_json) {
  json list = call(ctx, json{{"op", "adapters"}});
  if (as_json) {
    print_json(list);
    return 0;
  }
  Table t({"NAME", "LUID", "KMD", "DEVICE", "STATE", "PARTITIONABLE", "TOTAL", "RESERVED", "AVAILABLE", "VMS"},
          {false, false, false, false, false, false, true, true, true, true});
  std::vector<std::string> notes;
  for (const auto& a : list) {
    const json dev = a.value("device", json::object());
    std::string device = str(dev, "name");
    if (!str(dev, "vendor").empty()) device += " (" + str(dev, "vendor") + ")";
    bool failed = str(a, "state") == "failed";
    t.add({str(a, "name"), format_luid(u64(a, "luid")), str(a, "driver").empty() ? str(a, "kmd") : str(a, "driver"),
           failed ? "-" : device, str(a, "state"), flag(a, "partitionable") ? "yes" : "no",
           failed ? "-" : format_size(u64(a, "total_vram")), format_size(u64(a, "reserved_vram")),
           failed ? "-" : format_size(u64(a, "available_vram")), std::to_string(u64(a, "partitions"))});
    if (!str(a, "reason").empty()) notes.push_back(str(a, "reason"));
  }
  std::cout << t.render();
  for (const auto& n : notes) std::cout << "note: " << n << "\n";
  return 0;
}

// Names or numeric ids to ids, resolved here (the operator's view of users and groups).
static json id_list(const std::vector<std::string>& names, bool groups) {
  json ids = json::array();
  for (const auto& n : names) {
    if (n == "none") continue;
    if (!n.empty() && n.find_first_not_of("0123456789") == std::string::npos && n.size() < 11) {
      ids.push_back(std::stoull(n));
      continue;
    }
    if (groups) {
      if (const group* g = ::getgrnam(n.c_str())) ids.push_back(g->gr_gid);
      else throw CliError(fmt::format("--allow-group: no group named '{}'", n));
    } else {
      if (const passwd* u = ::getpwnam(n.c_str())) ids.push_back(u->pw_uid);
      else throw CliError(fmt::format("--allow-user: no user named '{}'", n));
    }
  }
  return ids;
}

static json vm_settings(const VmOptions& o) {
  json vm = json::object();
  if (!o.min_vram.empty()) vm["min_vram"] = parse_size_option(o.min_vram, "--min-vram");
  if (!o.max_vram.empty()) vm["max_vram"] = parse_size_option(o.max_vram, "--max-vram");
  if (!o.optimal_vram.empty()) vm["optimal_vram"] = parse_size_option(o.optimal_vram, "--optimal-vram");
  if (o.compute_weight >= 0) vm["compute_weight"] = o.compute_weight;
  if (o.max_compute >= 0) vm["max_compute"] = o.max_compute;
  if (o.build_timeout >= 0) vm["build_timeout_s"] = o.build_timeout;
  if (!o.allow_users.empty()) vm["allow_users"] = id_list(o.allow_users, false);
  if (!o.allow_groups.empty()) vm["allow_groups"] = id_list(o.allow_groups, true);
  return vm;
}

static void report_vm(const json& vm, const std::string& verb) {
  std::cout << fmt::format("vm {} {} on adapter {}: min {}, max {}, optimal {}, compute weight {}, max compute {}%{}; "
                           "worker {}\n",
                           str(vm, "name"), verb, str(vm, "adapter"), format_size(u64(vm, "min_vram")),
                           format_size(u64(vm, "max_vram")), format_size(u64(vm, "optimal_vram")),
                           u64(vm, "compute_weight"), u64(vm, "max_compute"), flag(vm, "secure") ? ", secure" : "",
                           worker_state(vm));
  if (!str(vm, "note").empty()) std::cerr << fmt::format("gpup: note: vm {}: {}\n", str(vm, "name"), str(vm, "note"));
  std::string state = str(vm, "state");
  if (state != "running" && !str(vm, "last_error").empty())
    std::cerr << fmt::format("gpup: warning: vm {} is {}: {}\n", str(vm, "name"), state, str(vm, "last_error"));
}

int cmd_vm_add(const Context& ctx, const std::string& name, const VmOptions& o, bool as_json) {
  json vm = vm_settings(o);
  vm["name"] = name;
  if (!o.adapter.empty()) vm["adapter"] = o.adapter;
  if (o.secure) vm["secure"] = true;
  json r = call(ctx, json{{"op", "vm.add"}, {"vm", vm}});
  if (as_json) print_json(r);
  else report_vm(r, "added");
  return 0;
}

int cmd_vm_set(const Context& ctx, const std::string& name, const VmOptions& o, bool as_json) {
  json vm = vm_settings(o);
  if (o.secure) vm["secure"] = true;
  if (vm.empty()) throw CliError("vm set: nothing to change (give --min-vram, --max-vram, --optimal-vram, "
                                 "--compute-weight, --max-compute, --build-timeout, --allow-user or --allow-group)");
  json r = call(ctx, json{{"op", "vm.set"}, {"name", name}, {"vm", vm}});
  if (as_json) print_json(r);
  else report_vm(r, "changed");
  return 0;
}

int cmd_vm_list(const Context& ctx, bool as_json) {
  json list = call(ctx, json{{"op", "vm.list"}});
  // Memory in use comes from each running worker's statistics (vm.show), one request per VM.
  for (auto& vm : list) {
    if (str(vm, "state") != "running") continue;
    try {
      json shown = call(ctx, json{{"op", "vm.show"}, {"name", str(vm, "name")}});
      if (shown.contains("stats") && shown["stats"].is_object()) vm["vram_used"] = u64(shown["stats"], "vram_used");
    } catch (const CliError&) {
      // A worker that does not answer leaves the column empty; the listing itself still stands.
    }
  }
  if (as_json) {
    print_json(list);
    return 0;
  }
  Table t({"NAME", "ADAPTER", "STATE", "PID", "RESTARTS", "USED", "MIN", "MAX", "OPTIMAL", "WEIGHT", "MAX%", "SECURE"},
          {false, false, false, true, true, true, true, true, true, true, true, false});
  for (const auto& vm : list)
    t.add({str(vm, "name"), str(vm, "adapter"), str(vm, "state"), vm.contains("pid") ? std::to_string(u64(vm, "pid")) : "-",
           std::to_string(u64(vm, "restarts")), vm.contains("vram_used") ? format_size(u64(vm, "vram_used")) : "-",
           format_size(u64(vm, "min_vram")), format_size(u64(vm, "max_vram")),
           format_size(u64(vm, "optimal_vram")), std::to_string(u64(vm, "compute_weight")),
           std::to_string(u64(vm, "max_compute")), flag(vm, "secure") ? "yes" : "no"});
  std::cout << t.render();
  return 0;
}

int cmd_vm_show(const Context& ctx, const std::string& name, bool as_json) {
  json vm = call(ctx, json{{"op", "vm.show"}, {"name", name}});
  if (as_json) {
    print_json(vm);
    return 0;
  }
  Table t({"", ""});
  auto row = [&](const std::string& k, const std::string& v) { t.add({k, v}); };
  row("name", str(vm, "name"));
  row("guid", str(vm, "guid"));
  row("adapter", fmt::format("{} (luid {})", str(vm, "adapter"), format_luid(u64(vm, "adapter_luid"))));
  row("state", fmt::format("{}, {} restart(s)", worker_state(vm), u64(vm, "restarts")));
  if (!str(vm, "last_error").empty()) row("last error", str(vm, "last_error"));
  if (!str(vm, "last_exit").empty()) row("last exit", str(vm, "last_exit"));
  row("endpoint", str(vm, "endpoint"));
  row("min vram", format_size(u64(vm, "min_vram")));
  row("max vram", format_size(u64(vm, "max_vram")));
  row("optimal vram", format_size(u64(vm, "optimal_vram")));
  row("compute", fmt::format("weight {}, max {}%", u64(vm, "compute_weight"), u64(vm, "max_compute")));
  row("secure", flag(vm, "secure") ? "yes" : "no");
  if (vm.contains("build_timeout_s")) row("build limit", fmt::format("{} s", u64(vm, "build_timeout_s")));
  {
    std::string who = "root";
    for (const char* key : {"allow_users", "allow_groups"})
      if (vm.contains(key) && vm[key].is_array())
        for (const auto& id : vm[key]) {
          if (!id.is_number_unsigned()) continue;
          const auto n = id.get<uint32_t>();
          const passwd* u = key[6] == 'u' ? ::getpwuid(n) : nullptr;
          const group* g = key[6] == 'g' ? ::getgrgid(n) : nullptr;
          who += fmt::format(", {} {}", key[6] == 'u' ? "user" : "group",
                             u ? u->pw_name : g ? g->gr_name : std::to_string(n));
        }
    row("guests", who);
  }
  if (vm.contains("jail") && vm["jail"].is_object()) {
    const json& j = vm["jail"];
    if (!flag(j, "enabled")) {
      row("jail", "none: " + str(j, "reason"));
    } else {
      std::string ns;
      if (j.contains("namespaces") && j["namespaces"].is_array())
        for (const auto& n : j["namespaces"]) ns += (ns.empty() ? "" : " ") + (n.is_string() ? n.get<std::string>() : "");
      std::string text = j.contains("uid") ? fmt::format("uid {} gid {}", u64(j, "uid"), u64(j, "gid")) : "not running";
      text += fmt::format("; namespaces {}; seccomp {}; no_new_privs {}; capabilities {}; landlock ABI {}", ns,
                          str(j, "seccomp").empty() ? "-" : str(j, "seccomp"), flag(j, "no_new_privs") ? "yes" : "no",
                          str(j, "cap_effective") == "0000000000000000" && str(j, "cap_bounding") == "0000000000000000"
                              ? "none"
                              : str(j, "cap_effective").empty() ? "-" : "eff " + str(j, "cap_effective"),
                          u64(j, "landlock_abi"));
      row("jail", text);
    }
  }
  if (vm.contains("device") && vm["device"].is_object()) {
    const json& d = vm["device"];
    row("device time", fmt::format("{}: {:.1f} s scheduled, {:.1f} s busy, {} grant(s), {} yield(s)", str(d, "state"),
                                   static_cast<double>(u64(d, "scheduled_ns")) / 1e9,
                                   static_cast<double>(u64(d, "busy_ns")) / 1e9, u64(d, "grants"), u64(d, "yields")));
  }
  if (vm.contains("resets") && vm["resets"].is_object()) {
    const json& r = vm["resets"];
    std::string text = fmt::format("{} in the last {} s (removed at {}), {} in all", u64(r, "recent"), u64(r, "window_s"),
                                   u64(r, "limit"), u64(r, "total"));
    if (!str(r, "last").empty()) text += "; last: " + str(r, "last");
    row("resets", text);
  }
  json procs = json::array();
  if (vm.contains("stats") && vm["stats"].is_object()) {
    const json& s = vm["stats"];
    row("vram used", fmt::format("{} of {}", format_size(u64(s, "vram_used")), format_size(u64(s, "vram_max"))));
    if (s.contains("totals") && s["totals"].is_object()) {
      std::string objects;
      for (auto it = s["totals"].begin(); it != s["totals"].end(); ++it)
        objects += fmt::format("{}{} {}", objects.empty() ? "" : ", ", u64(s["totals"], it.key().c_str()), it.key());
      row("totals", objects);
    }
    if (s.contains("processes") && s["processes"].is_array()) procs = s["processes"];
  } else if (!str(vm, "stats_error").empty()) {
    row("stats", "unavailable: " + str(vm, "stats_error"));
  }
  // The two-column table without its (empty) header line.
  std::string text = t.render();
  std::cout << text.substr(text.find('\n') + 1);
  if (!procs.empty()) {
    // PID, name, VRAM, then whatever counters the worker reports, in name order.
    std::set<std::string> counters;
    for (const auto& pr : procs)
      for (auto it = pr.begin(); it != pr.end(); ++it)
        if (it.key() != "pid" && it.key() != "name" && it.key() != "vram_used") counters.insert(it.key());
    std::vector<std::string> headers = {"PID", "PROCESS", "VRAM"};
    std::vector<bool> right = {true, false, true};
    for (const auto& c : counters) {
      std::string h = c;
      for (auto& ch : h) ch = ch == '_' ? ' ' : static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
      headers.push_back(h);
      right.push_back(true);
    }
    Table p(headers, right);
    for (const auto& pr : procs) {
      std::vector<std::string> cells = {std::to_string(u64(pr, "pid")), str(pr, "name"), format_size(u64(pr, "vram_used"))};
      for (const auto& c : counters) cells.push_back(pr.contains(c) ? std::to_string(u64(pr, c.c_str())) : "-");
      p.add(std::move(cells));
    }
    std::cout << "\n" << p.render();
  }
  return 0;
}

int cmd_vm_remove(const Context& ctx, const std::string& name) {
  call(ctx, json{{"op", "vm.remove"}, {"name", name}});
  std::cout << fmt::format("vm {} removed\n", name);
  return 0;
}

int cmd_vm_start(const Context& ctx, const std::string& name, bool as_json) {
  json r = call(ctx, json{{"op", "vm.start"}, {"name", name}});
  if (as_json) print_json(r);
  else report_vm(r, "started");
  return 0;
}

int cmd_vm_reset(const Context& ctx, const std::string& name, bool as_json) {
  json r = call(ctx, json{{"op", "vm.reset"}, {"name", name}});
  if (as_json) print_json(r);
  else report_vm(r, "reset and started");
  return 0;
}

}  // namespace gpup::cli
