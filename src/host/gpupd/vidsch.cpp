#include "host/gpupd/vidsch.h"

#include <algorithm>
#include <cmath>
#include <vector>
#include <limits>

#include <fmt/format.h>

namespace gpup::gpupd {

namespace {

uint64_t ns_between(VidSch::TimePoint from, VidSch::TimePoint to) {
  return to > from ? static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(to - from).count()) : 0;
}

}  // namespace

VidSch::Entity* VidSch::find(const std::string& vm) {
  auto it = entities_.find(vm);
  return it == entities_.end() ? nullptr : &it->second;
}

void VidSch::attach(const std::string& vm, const std::string& adapter, uint32_t weight, uint32_t max_percent,
                    Hooks hooks, TimePoint now) {
  detach(vm, now);
  Entity e;
  e.adapter = adapter;
  e.weight = std::max<uint32_t>(1, weight);
  e.max_percent = std::clamp<uint32_t>(max_percent, 1, 100);
  e.hooks = std::move(hooks);
  e.tokens_at = now;
  e.tokens_ns = static_cast<double>(cap_budget_ns(e));
  // A newcomer starts level with the adapter's least-served partition.
  double least = std::numeric_limits<double>::infinity();
  for (const auto& [name, o] : entities_)
    if (o.adapter == adapter) least = std::min(least, o.vtime);
  e.vtime = std::isinf(least) ? 0 : least;
  entities_.emplace(vm, std::move(e));
  changed();
}

void VidSch::detach(const std::string& vm, TimePoint now) {
  Entity* e = find(vm);
  if (!e) return changed();
  const std::string adapter = e->adapter;
  if (e->holding) end_hold(*e, now);
  entities_.erase(vm);
  dispatch(adapter, now);
  changed();
}

void VidSch::configure(const std::string& vm, uint32_t weight, uint32_t max_percent, TimePoint now) {
  Entity* e = find(vm);
  if (!e) return changed();
  e->weight = std::max<uint32_t>(1, weight);
  e->max_percent = std::clamp<uint32_t>(max_percent, 1, 100);
  if (e->holding) enforce(*e, now);
  changed();
}

uint64_t VidSch::cap_budget_ns(const Entity& e) const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(policy_.cap_period).count()) *
         e.max_percent / 100;
}

void VidSch::refill(Entity& e, TimePoint now) {
  const double earned = static_cast<double>(ns_between(e.tokens_at, now)) * e.max_percent / 100;
  e.tokens_ns = std::min(static_cast<double>(cap_budget_ns(e)), e.tokens_ns + earned);
  e.tokens_at = now;
}

bool VidSch::others_waiting(const std::string& adapter, const Entity& self) const {
  for (const auto& [name, o] : entities_)
    if (&o != &self && o.adapter == adapter && o.waiting && !o.throttled_until) return true;
  return false;
}

void VidSch::want(const std::string& vm, TimePoint now) {
  Entity* e = find(vm);
  if (!e || e->holding || e->waiting) return changed();
  // Back from a real idle spell (longer than a quantum): no credit for the time it asked for
  // nothing; it starts level with the least-served one that competes. A short gap (a guest
  // waiting on its last result before sending more) keeps its place.
  if (!e->idle_since || now - *e->idle_since >= policy_.quantum) {
    double least = std::numeric_limits<double>::infinity();
    for (const auto& [name, o] : entities_)
      if (&o != e && o.adapter == e->adapter && (o.holding || o.waiting)) least = std::min(least, o.vtime);
    if (!std::isinf(least)) e->vtime = std::max(e->vtime, least);
  }
  e->idle_since.reset();
  start_waiting(*e, now);
  changed();
}

void VidSch::start_waiting(Entity& entity, TimePoint now) {
  Entity* e = &entity;
  e->waiting = true;
  if (e->max_percent < 100) {
    // Capped: it waits until it has earned a quarter of a period's budget again (a debt from a
    // hold that ran over is paid first), so it never gets slivers of the device.
    refill(*e, now);
    const double need = static_cast<double>(cap_budget_ns(*e)) / 4;
    if (e->tokens_ns < need)
      e->throttled_until = now + std::chrono::nanoseconds(static_cast<int64_t>((need - e->tokens_ns) * 100 / e->max_percent) + 1);
  }
  auto h = holders_.find(e->adapter);
  if (h != holders_.end()) {
    Entity* holder = find(h->second);
    if (holder && !e->throttled_until) {
      if (!holder->contended_since) holder->contended_since = now;
      enforce(*holder, now);
    }
    return;
  }
  dispatch(e->adapter, now);
}

void VidSch::end_hold(Entity& e, TimePoint now) {
  const uint64_t held = ns_between(e.granted_at, now);
  e.scheduled_ns += held;
  refill(e, now);
  e.tokens_ns -= static_cast<double>(held);
  if (e.contended_since) e.vtime += static_cast<double>(ns_between(*e.contended_since, now)) / e.weight;
  e.holding = false;
  e.contended_since.reset();
  e.yield_deadline.reset();
  e.yield_if_idle = false;
  e.overdue_reported = false;
  holders_.erase(e.adapter);
}

void VidSch::release(const std::string& vm, bool more, TimePoint now) {
  Entity* e = find(vm);
  if (!e || !e->holding) return changed();
  end_hold(*e, now);
  if (more) {
    start_waiting(*e, now);  // still busy: it keeps its place
  } else {
    e->idle_since = now;
    dispatch(e->adapter, now);
  }
  changed();
}

void VidSch::dispatch(const std::string& adapter, TimePoint now) {
  if (holders_.count(adapter)) return;
  Entity* best = nullptr;
  std::string best_name;
  for (auto& [name, e] : entities_) {
    if (e.adapter != adapter || !e.waiting) continue;
    if (e.throttled_until) {
      if (now < *e.throttled_until) continue;
      e.throttled_until.reset();
    }
    if (!best || e.vtime < best->vtime) {
      best = &e;
      best_name = name;
    }
  }
  if (!best) return;
  best->waiting = false;
  best->holding = true;
  best->granted_at = now;
  refill(*best, now);
  ++best->grants;
  holders_[adapter] = best_name;
  if (others_waiting(adapter, *best)) best->contended_since = now;
  if (best->hooks.grant) best->hooks.grant();
  enforce(*best, now);
}

void VidSch::enforce(Entity& holder, TimePoint now) {
  std::optional<TimePoint> deadline;
  const bool contended = others_waiting(holder.adapter, holder);
  if (contended) deadline = std::max(holder.granted_at + policy_.quantum, now);
  if (holder.max_percent < 100) {
    // tokens_ns is what it had at the grant (refilled then, not during the hold); holding d
    // costs d and earns d * p, so it may hold tokens / (1 - p).
    const double p = holder.max_percent / 100.0;
    const double may_hold = std::max(0.0, holder.tokens_ns) / (1 - p);
    const TimePoint cap_at = std::max(now, holder.granted_at + std::chrono::nanoseconds(static_cast<int64_t>(may_hold)));
    deadline = deadline ? std::min(*deadline, cap_at) : cap_at;
  }
  if (!deadline) return;
  if (holder.yield_deadline && *holder.yield_deadline <= *deadline) {
    if (!contended || holder.yield_if_idle) return;
    deadline = holder.yield_deadline;  // same deadline, and now also when idle
  }
  holder.yield_deadline = deadline;
  holder.yield_if_idle = holder.yield_if_idle || contended;
  ++holder.yields;
  const auto after = std::chrono::duration_cast<std::chrono::microseconds>(*deadline - holder.granted_at);
  if (holder.hooks.yield) holder.hooks.yield(after, holder.yield_if_idle);
}

void VidSch::tick(TimePoint now) {
  std::vector<std::string> adapters;
  for (auto& [name, e] : entities_) {
    if (e.throttled_until && now >= *e.throttled_until) {
      e.throttled_until.reset();
      if (e.waiting) adapters.push_back(e.adapter);
    }
    if (e.holding && e.yield_deadline && !e.overdue_reported &&
        now >= *e.yield_deadline + policy_.tdr_delay + kOverdueGrace) {
      e.overdue_reported = true;
      const auto late = std::chrono::duration_cast<std::chrono::milliseconds>(now - *e.yield_deadline);
      if (e.hooks.overdue)
        e.hooks.overdue(fmt::format("did not give the adapter back {} ms after it was due to (TDR delay {} ms)",
                                    late.count(), policy_.tdr_delay.count()));
    }
  }
  for (const auto& a : adapters) {
    auto h = holders_.find(a);
    if (h == holders_.end()) {
      dispatch(a, now);
    } else if (Entity* holder = find(h->second)) {  // one more waits now
      if (!holder->contended_since) holder->contended_since = now;
      enforce(*holder, now);
    }
  }
  changed();
}

std::optional<VidSch::TimePoint> VidSch::next_wakeup() const {
  std::optional<TimePoint> next;
  auto consider = [&](TimePoint t) { next = next ? std::min(*next, t) : t; };
  for (const auto& [name, e] : entities_) {
    if (e.waiting && e.throttled_until) consider(*e.throttled_until);
    if (e.holding && e.yield_deadline && !e.overdue_reported)
      consider(*e.yield_deadline + policy_.tdr_delay + kOverdueGrace);
  }
  return next;
}

VidSch::Usage VidSch::usage(const std::string& vm, TimePoint now) const {
  Usage u;
  auto it = entities_.find(vm);
  if (it == entities_.end()) return u;
  const Entity& e = it->second;
  u.attached = true;
  u.holding = e.holding;
  u.waiting = e.waiting;
  u.throttled = e.throttled_until.has_value() && now < *e.throttled_until;
  u.scheduled_ns = e.scheduled_ns + (e.holding ? ns_between(e.granted_at, now) : 0);
  u.grants = e.grants;
  u.yields = e.yields;
  return u;
}

}  // namespace gpup::gpupd
