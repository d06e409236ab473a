#include "host/gpupd/admission.h"

#include <algorithm>

#include <fmt/format.h>

#include "common/units.h"

namespace gpup::gpupd {

using control::json;
using control::VmSpec;

static Error refuse(std::string msg) { return make_error(GPUP_STATUS_INVALID_PARAMETER, std::move(msg)); }

static Result<std::optional<uint64_t>> size_field(const json& vm, const char* key) {
  auto it = vm.find(key);
  if (it == vm.end() || it->is_null()) return std::optional<uint64_t>();
  if (it->is_number_unsigned()) return std::optional<uint64_t>(it->get<uint64_t>());
  if (it->is_number_integer() && it->get<int64_t>() >= 0) return std::optional<uint64_t>(it->get<int64_t>());
  if (it->is_string()) {
    const auto& text = it->get_ref<const std::string&>();
    if (text.size() <= 64)
      if (auto v = parse_size(text)) return std::optional<uint64_t>(*v);
    return refuse(fmt::format("{}: '{}' is not a size (use bytes or a unit: 512MiB, 1.5GiB)", key,
                              control::printable(text, 64)));
  }
  return refuse(fmt::format("{}: expected a size, got {}", key, control::json_type_name(*it)));
}

Result<VmRequest> parse_vm_request(const json& vm, bool for_add) {
  control::ObjectReader r(vm, "vm");
  if (for_add)
    r.only({"name", "adapter", "min_vram", "max_vram", "optimal_vram", "compute_weight", "max_compute", "secure",
            "build_timeout_s", "allow_users", "allow_groups"});
  else
    r.only({"min_vram", "max_vram", "optimal_vram", "compute_weight", "max_compute", "secure", "build_timeout_s",
            "allow_users", "allow_groups"});
  VmRequest req;
  if (for_add) {
    auto name = r.str("name", 256);
    if (name) req.name = *name;
    req.adapter = r.opt_str("adapter", 256);
  }
  auto weight = r.opt_u64("compute_weight", control::kMinComputeWeight, control::kMaxComputeWeight);
  auto percent = r.opt_u64("max_compute", control::kMinComputePercent, control::kMaxComputePercent);
  req.secure = r.opt_boolean("secure");
  auto build_timeout = r.opt_u64("build_timeout_s", control::kMinBuildTimeoutS, control::kMaxBuildTimeoutS);
  if (!r.ok()) return refuse(r.error());
  if (build_timeout) req.build_timeout_s = static_cast<uint32_t>(*build_timeout);
  if (weight) req.compute_weight = static_cast<uint32_t>(*weight);
  if (percent) req.max_compute = static_cast<uint32_t>(*percent);
  if (for_add) {
    if (Status s = control::validate_name(req.name, "vm"); !s.ok()) return s.error();
    if (req.adapter)
      if (Status s = control::validate_name(*req.adapter, "adapter"); !s.ok()) return s.error();
  }
  // Who may connect to the partition's endpoint besides root: uids and gids (the CLI resolves names).
  for (auto [key, field] : {std::pair{"allow_users", &req.allow_users}, std::pair{"allow_groups", &req.allow_groups}}) {
    auto it = vm.find(key);
    if (it == vm.end()) continue;
    if (!it->is_array() || it->size() > control::kMaxAllowIds)
      return refuse(fmt::format("{}: expected a list of at most {} ids", key, control::kMaxAllowIds));
    std::vector<uint32_t> ids;
    for (const auto& id : *it) {
      if (!id.is_number_unsigned() || id.get<uint64_t>() >= 0xffffffffu)
        return refuse(fmt::format("{}: {} is not a uid/gid", key, control::printable(id.dump(), 32)));
      ids.push_back(id.get<uint32_t>());
    }
    *field = std::move(ids);
  }
  for (auto [key, field] : {std::pair{"min_vram", &req.min_vram}, std::pair{"max_vram", &req.max_vram},
                            std::pair{"optimal_vram", &req.optimal_vram}}) {
    auto v = size_field(vm, key);
    if (!v) return v.error();
    *field = *v;
  }
  return req;
}

uint64_t reserved_vram(const std::vector<VmSpec>& vms, std::string_view adapter, std::string_view except_vm) {
  uint64_t sum = 0;
  for (const auto& vm : vms)
    if (vm.adapter == adapter && vm.name != except_vm) sum += vm.min_vram;  // mins never exceed total: no overflow
  return sum;
}

// Checks settings against the adapter and the other partitions on it.
static Status check_fit(const VmSpec& vm, const AdapterInfo& a, const std::vector<VmSpec>& existing) {
  if (!a.partitionable()) return refuse(a.not_partitionable_reason());
  if (vm.secure && !a.secure_capable)
    return refuse(fmt::format("adapter {}: KMD {} does not declare IoMmuSecureModeSupported; a secure partition "
                              "cannot run on it",
                              a.name, a.driver_name));
  if (vm.max_vram == 0) return refuse("max 0 B: a partition needs some memory");
  if (vm.max_vram > a.total_vram)
    return refuse(fmt::format("max {} exceeds adapter {}'s {}", format_size(vm.max_vram), a.name,
                              format_size(a.total_vram)));
  if (vm.max_vram < vm.min_vram)
    return refuse(fmt::format("max {} is less than min {}", format_size(vm.max_vram), format_size(vm.min_vram)));
  if (vm.optimal_vram < vm.min_vram || vm.optimal_vram > vm.max_vram)
    return refuse(fmt::format("optimal {} must lie between min {} and max {}", format_size(vm.optimal_vram),
                              format_size(vm.min_vram), format_size(vm.max_vram)));
  uint64_t reserved = reserved_vram(existing, a.name, vm.name);
  uint64_t left = a.total_vram > reserved ? a.total_vram - reserved : 0;
  if (vm.min_vram > left)
    return refuse(fmt::format("min {} does not fit: adapter {} has {}, {} already reserved by other partitions",
                              format_size(vm.min_vram), a.name, format_size(a.total_vram), format_size(reserved)));
  return {};
}

static const AdapterInfo* pick_adapter(const VmRequest& req, const std::vector<const AdapterInfo*>& adapters,
                                       Error* why) {
  if (req.adapter) {
    for (const auto* a : adapters)
      if (a->name == *req.adapter) return a;
    std::string names;
    for (const auto* a : adapters) names += (names.empty() ? "" : ", ") + a->name;
    *why = refuse(fmt::format("unknown adapter '{}' (configured: {})", *req.adapter, names.empty() ? "none" : names));
    return nullptr;
  }
  if (adapters.size() == 1) return adapters.front();
  for (const auto* a : adapters)
    if (a->partitionable()) return a;
  std::string reasons;
  for (const auto* a : adapters) reasons += "; " + a->not_partitionable_reason();
  *why = refuse(adapters.empty() ? std::string("no adapter is configured")
                                 : "no adapter can be partitioned" + reasons);
  return nullptr;
}

Result<VmSpec> admit_new_vm(const VmRequest& req, const std::vector<const AdapterInfo*>& adapters,
                            const std::vector<VmSpec>& existing, std::string guid) {
  if (Status s = control::validate_name(req.name, "vm"); !s.ok()) return s.error();
  for (const auto& vm : existing)
    if (vm.name == req.name) return refuse(fmt::format("vm {} already exists", req.name));
  Error why;
  const AdapterInfo* a = pick_adapter(req, adapters, &why);
  if (!a) return why;
  if (!a->partitionable()) return refuse(a->not_partitionable_reason());

  VmSpec vm;
  vm.name = req.name;
  vm.guid = std::move(guid);
  vm.adapter = a->name;
  vm.min_vram = req.min_vram.value_or(0);
  vm.max_vram = req.max_vram.value_or(a->total_vram);
  vm.optimal_vram = req.optimal_vram.value_or(vm.max_vram);
  vm.compute_weight = req.compute_weight.value_or(control::kDefaultComputeWeight);
  vm.max_compute = req.max_compute.value_or(control::kMaxComputePercent);
  vm.secure = req.secure.value_or(false);
  vm.build_timeout_s = req.build_timeout_s.value_or(control::kDefaultBuildTimeoutS);
  vm.allow_users = req.allow_users.value_or(std::vector<uint32_t>{});
  vm.allow_groups = req.allow_groups.value_or(std::vector<uint32_t>{});
  if (Status s = check_fit(vm, *a, existing); !s.ok()) return s.error();
  return vm;
}

Result<VmSpec> admit_vm_change(const VmSpec& current, const VmRequest& change, const AdapterInfo* adapter,
                               const std::vector<VmSpec>& existing) {
  if (!adapter) return refuse(fmt::format("vm {}: adapter {} is not configured", current.name, current.adapter));
  if (change.secure && *change.secure != current.secure)
    return refuse(fmt::format("vm {}: secure cannot be changed on an existing partition; remove and add it again",
                              current.name));
  VmSpec vm = current;
  if (change.min_vram) vm.min_vram = *change.min_vram;
  if (change.max_vram) vm.max_vram = *change.max_vram;
  if (change.optimal_vram) {
    vm.optimal_vram = *change.optimal_vram;
  } else {
    if (current.optimal_vram == current.max_vram) vm.optimal_vram = vm.max_vram;
    vm.optimal_vram = std::max(vm.min_vram, std::min(vm.optimal_vram, vm.max_vram));
  }
  if (change.compute_weight) vm.compute_weight = *change.compute_weight;
  if (change.max_compute) vm.max_compute = *change.max_compute;
  if (change.build_timeout_s) vm.build_timeout_s = *change.build_timeout_s;
  if (change.allow_users) vm.allow_users = *change.allow_users;
  if (change.allow_groups) vm.allow_groups = *change.allow_groups;
  if (Status s = check_fit(vm, *adapter, existing); !s.ok()) return s.error();
  return vm;
}

}  // namespace gpup::gpupd
