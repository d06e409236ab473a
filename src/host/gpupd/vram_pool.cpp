#include "host/gpupd/vram_pool.h"

#include <algorithm>

#include <fmt/format.h>

#include "common/units.h"

namespace gpup::gpupd {

using control::VmSpec;

VramArbiter::VramArbiter(SpecsFn specs, TotalFn total) : specs_fn_(std::move(specs)), total_fn_(std::move(total)) {}

std::vector<VmSpec> VramArbiter::sync() {
  std::vector<VmSpec> specs = specs_fn_();
  std::map<std::string, Held> kept;
  for (const auto& vm : specs) {
    auto it = held_.find(vm.name);
    if (it == held_.end()) continue;  // removed partitions drop out
    Held h = it->second;
    // A lowered min: the worker may still use the old one until it gives the memory back.
    if (vm.min_vram < h.last_min) h.hold = std::max(h.hold, h.last_min);
    h.last_min = vm.min_vram;
    kept.emplace(vm.name, h);
  }
  held_ = std::move(kept);
  return specs;
}

uint64_t VramArbiter::effective(const VmSpec& vm, const std::map<std::string, Held>& held) {
  auto it = held.find(vm.name);
  return it == held.end() ? vm.min_vram : std::max(vm.min_vram, it->second.hold);
}

uint64_t VramArbiter::in_use(const std::vector<VmSpec>& specs, const std::string& adapter,
                             const std::string& except_vm) const {
  uint64_t sum = 0;
  for (const auto& vm : specs)
    if (vm.adapter == adapter && vm.name != except_vm) sum += effective(vm, held_);
  return sum;
}

static const VmSpec* find(const std::vector<VmSpec>& specs, const std::string& name) {
  for (const auto& vm : specs)
    if (vm.name == name) return &vm;
  return nullptr;
}

VramArbiter::Answer VramArbiter::answer_for(const std::vector<VmSpec>& specs, const VmSpec& vm) const {
  Answer a;
  a.min = vm.min_vram;
  a.max = vm.max_vram;
  a.hold = effective(vm, held_);
  const uint64_t total = total_fn_(vm.adapter);
  const uint64_t others = in_use(specs, vm.adapter, vm.name);
  const uint64_t room = std::min(vm.max_vram, total > others ? total - others : 0);
  a.borrowable = room > a.hold ? room - a.hold : 0;
  a.granted = true;
  return a;
}

void VramArbiter::attach(const std::string& vm) {
  auto specs = sync();
  const VmSpec* spec = find(specs, vm);
  if (!spec) return;
  held_[vm] = Held{0, spec->min_vram};
}

void VramArbiter::release_all(const std::string& vm) { held_.erase(vm); }

VramArbiter::Answer VramArbiter::query(const std::string& vm) {
  auto specs = sync();
  const VmSpec* spec = find(specs, vm);
  if (!spec) return Answer{false, 0, 0, 0, 0, fmt::format("no partition named {}", vm)};
  return answer_for(specs, *spec);
}

VramArbiter::Answer VramArbiter::request(const std::string& vm, uint64_t need, uint64_t want) {
  auto specs = sync();
  const VmSpec* spec = find(specs, vm);
  if (!spec) return Answer{false, 0, 0, 0, 0, fmt::format("no partition named {}", vm)};
  auto it = held_.find(vm);
  if (it == held_.end()) it = held_.emplace(vm, Held{0, spec->min_vram}).first;
  Held& h = it->second;
  want = std::min(std::max(want, need), spec->max_vram);
  const uint64_t current = std::max(spec->min_vram, h.hold);

  if (need > spec->max_vram) {
    Answer a = answer_for(specs, *spec);
    a.granted = false;
    a.why = fmt::format("partition {} would need {}, above its max of {}", vm, format_size(need),
                        format_size(spec->max_vram));
    return a;
  }
  if (want <= current) {  // gives memory back (or asks for nothing new)
    h.hold = want;
    return answer_for(specs, *spec);
  }
  const uint64_t total = total_fn_(spec->adapter);
  const uint64_t others = in_use(specs, spec->adapter, vm);
  const uint64_t room = total > others ? total - others : 0;
  const uint64_t grant = std::min(want, room);
  if (grant >= need && grant >= current) {
    h.hold = grant;
    return answer_for(specs, *spec);
  }
  uint64_t their_mins = 0;
  for (const auto& o : specs)
    if (o.adapter == spec->adapter && o.name != vm) their_mins += o.min_vram;
  Answer a = answer_for(specs, *spec);
  a.granted = false;
  a.why = fmt::format(
      "partition {} would need {} of adapter {}'s {}: the other partitions hold {} ({} their reserved mins + {} "
      "borrowed), {} is left for it (its min {})",
      vm, format_size(need), spec->adapter, format_size(total), format_size(others), format_size(their_mins),
      format_size(others - std::min(others, their_mins)), format_size(room), format_size(spec->min_vram));
  return a;
}

Status VramArbiter::check_min(const std::string& vm, const std::string& adapter, uint64_t min) {
  auto specs = sync();
  const uint64_t total = total_fn_(adapter);
  const uint64_t others = in_use(specs, adapter, vm);
  if (const VmSpec* spec = find(specs, vm); spec && spec->adapter == adapter && min <= effective(*spec, held_))
    return {};  // within what it holds already
  if (others <= total && min <= total - others) return {};
  uint64_t their_mins = 0;
  for (const auto& o : specs)
    if (o.adapter == adapter && o.name != vm) their_mins += o.min_vram;
  return make_error(GPUP_STATUS_INVALID_PARAMETER,
                    fmt::format("min {} does not fit now: adapter {} has {}, the other partitions hold {} ({} reserved "
                                "+ {} borrowed above their mins; borrowed memory returns as they free it)",
                                format_size(min), adapter, format_size(total), format_size(others),
                                format_size(their_mins), format_size(others - std::min(others, their_mins))));
}

uint64_t VramArbiter::borrowed(const std::string& vm) {
  auto specs = sync();
  const VmSpec* spec = find(specs, vm);
  if (!spec) return 0;
  return effective(*spec, held_) - spec->min_vram;
}

uint64_t VramArbiter::borrowed_on(const std::string& adapter) {
  auto specs = sync();
  uint64_t sum = 0;
  for (const auto& vm : specs)
    if (vm.adapter == adapter) sum += effective(vm, held_) - vm.min_vram;
  return sum;
}

}  // namespace gpup::gpupd
