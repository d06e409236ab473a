// VidSch: which partition's work enters each adapter, and for how long.
//
// A device runs one partition's work at a time (a CPU device's kernels are not preemptible, nor
// are most GPUs' compute dispatches), so gpupd hands each adapter to one partition at a time: the
// holder. A worker with work and no grant says "want"; gpupd grants the adapter to the waiting
// partition with the least virtual time (device time received / compute weight); a holder is asked
// to yield once another partition waits and it has had its quantum, or once it has used what its
// cap lets it take (a token bucket: P% of the time earned, one cap period's worth at most, a
// hold that ran over paid back before the next grant). A worker that was asked to yield stops handing new work to the
// KMD and releases the adapter when its work in flight has completed, or at once when idle.
//
// What it is charged is measured here, not reported by the worker: from the grant until the
// release arrives. For fairness a holder is charged only for time during which another partition
// was waiting (holding an idle adapter nobody wants costs nobody anything); for its cap it is
// charged for all of it, so a cap is never exceeded by an idle holder's report. A partition that
// starts waiting after an idle spell longer than a quantum starts at the smallest virtual time of
// the adapter's other partitions, so an idle spell earns no burst later.
//
// A holder that does not release within tdr_delay + kOverdueGrace after its yield deadline is
// reported overdue (gpupd then ends its worker: a hung or hostile worker cannot keep the device).
//
// Worker protocol lines (JSON, the worker channel of control/protocol.h):
//   worker -> gpupd  {"sched":"want"}                   it has work and no grant
//                    {"sched":"release","busy_us":N,"more":B}
//                                                       it gave the adapter back; N: time its
//                                                       device work was in flight (statistics);
//                                                       B: it still has work waiting
//   gpupd -> worker  {"sched":"grant"}
//                    {"sched":"yield","after_us":N,"if_idle":B}
//                                                       release once N us after the grant have
//                                                       passed and the work in flight is done (the
//                                                       smallest N counts); with B (others wait),
//                                                       also as soon as it is idle
//
// Pure logic: every call takes the time, so tests drive it with a fake clock; the owner calls
// tick() at next_wakeup(). Used only from gpupd's event-loop thread.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "host/control/protocol.h"

namespace gpup::gpupd {

struct SchedPolicy {
  std::chrono::microseconds quantum{10000};       // a holder's turn while others wait
  std::chrono::microseconds cap_period{100000};   // a cap of P% earns P% of this per period, kept up to one period's worth
  std::chrono::milliseconds tdr_delay{control::kDefaultTdrDelayMs};  // work running this long is reset (the worker's watchdog)
};

// After its yield deadline, a holder gets tdr_delay plus this before it is reported overdue: the
// worker's own watchdog resets a hung submission at tdr_delay and should always come first.
inline constexpr std::chrono::milliseconds kOverdueGrace{500};

class VidSch {
 public:
  using Clock = std::chrono::steady_clock;
  using TimePoint = Clock::time_point;

  struct Hooks {
    std::function<void()> grant;
    std::function<void(std::chrono::microseconds after, bool if_idle)> yield;
    std::function<void(const std::string& why)> overdue;
  };
  struct Usage {
    bool attached = false, holding = false, waiting = false, throttled = false;
    uint64_t scheduled_ns = 0;  // adapter time held, the current hold included
    uint64_t grants = 0;
    uint64_t yields = 0;        // times it was asked to yield
  };

  explicit VidSch(SchedPolicy policy = {}) : policy_(policy) {}
  const SchedPolicy& policy() const { return policy_; }
  // Called after every change with next_wakeup(): the owner (re)arms its timer to call tick().
  void set_wakeup_hook(std::function<void(std::optional<TimePoint>)> hook) { wakeup_hook_ = std::move(hook); }

  // A partition's worker became ready / is gone (a holder's adapter passes on).
  void attach(const std::string& vm, const std::string& adapter, uint32_t weight, uint32_t max_percent, Hooks hooks,
              TimePoint now);
  void detach(const std::string& vm, TimePoint now);
  void configure(const std::string& vm, uint32_t weight, uint32_t max_percent, TimePoint now);

  // Lines from the worker. Unexpected ones (a want while holding, a release without a grant) are
  // ignored: they change nothing and the worker's next line says what it really needs.
  void want(const std::string& vm, TimePoint now);
  // more: it still has work (it waits again at once, keeping its place).
  void release(const std::string& vm, bool more, TimePoint now);

  // Ends throttling that is over and reports overdue holders.
  void tick(TimePoint now);
  std::optional<TimePoint> next_wakeup() const;

  Usage usage(const std::string& vm, TimePoint now) const;

 private:
  struct Entity {
    std::string adapter;
    uint32_t weight = 100;
    uint32_t max_percent = 100;
    Hooks hooks;
    double vtime = 0;  // charged ns / weight
    bool waiting = false;
    bool holding = false;
    TimePoint granted_at{};
    std::optional<TimePoint> contended_since;  // while holding: since when another waits
    std::optional<TimePoint> yield_deadline;   // while holding: what it was told
    bool yield_if_idle = false;
    bool overdue_reported = false;
    std::optional<TimePoint> idle_since;  // released with nothing more to do
    double tokens_ns = 0;  // cap: device time it may still take (earned at max_percent, up to one
    TimePoint tokens_at{};  // period's budget; negative after a hold that ran over)
    std::optional<TimePoint> throttled_until;
    uint64_t scheduled_ns = 0;
    uint64_t grants = 0;
    uint64_t yields = 0;
  };

  Entity* find(const std::string& vm);
  void start_waiting(Entity& e, TimePoint now);
  void end_hold(Entity& e, TimePoint now);
  // Grants the adapter when it is free and someone eligible waits.
  void dispatch(const std::string& adapter, TimePoint now);
  // Asks the holder to yield by the earliest deadline that applies now.
  void enforce(Entity& holder, TimePoint now);
  bool others_waiting(const std::string& adapter, const Entity& self) const;
  uint64_t cap_budget_ns(const Entity& e) const;
  void refill(Entity& e, TimePoint now);

  void changed() {
    if (wakeup_hook_) wakeup_hook_(next_wakeup());
  }

  SchedPolicy policy_;
  std::function<void(std::optional<TimePoint>)> wakeup_hook_;
  std::map<std::string, Entity> entities_;
  std::map<std::string, std::string> holders_;  // adapter -> vm
};

}  // namespace gpup::gpupd
