// VidSch with a fake clock and simulated workers that behave as gpup-vmwp does: a busy worker
// keeps work in flight and, asked to yield, releases at its deadline (plus the end of the piece
// of work it is running), saying it has more; an idle one releases at once.
#include "host/gpupd/vidsch.h"

#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace gpup::gpupd {
namespace {

using namespace std::chrono_literals;
using TP = VidSch::TimePoint;

struct SimWorker {
  bool busy = false;        // has work
  // With gaps: after every `burst` of work it waits `gap` for its guest (idle, nothing queued).
  std::chrono::microseconds burst{0}, gap{0};
  std::chrono::microseconds idle_for{0};
  bool holding = false;
  std::optional<TP> yield_at;
  bool if_idle = false;
  TP granted_at{};
  std::chrono::microseconds piece{1000};  // work is not preemptible: a release waits for this
  uint64_t grants = 0;
  uint64_t busy_ns = 0;  // time it held the adapter with work
};

class Sim {
 public:
  explicit Sim(SchedPolicy p = {}) : sch(p) {}

  void add(const std::string& vm, uint32_t weight, uint32_t cap = 100, const std::string& adapter = "a0") {
    auto& w = workers[vm];
    VidSch::Hooks h;
    h.grant = [this, vm] {
      auto& x = workers[vm];
      x.holding = true;
      x.granted_at = now;
      x.yield_at.reset();
      x.if_idle = false;
      ++x.grants;
    };
    h.yield = [this, vm](std::chrono::microseconds after, bool if_idle) {
      auto& x = workers[vm];
      x.if_idle = x.if_idle || if_idle;
      TP at = x.granted_at + after;
      if (!x.yield_at || at < *x.yield_at) x.yield_at = at;
    };
    h.overdue = [this, vm](const std::string& why) { overdue.push_back(vm + ": " + why); };
    (void)w;
    sch.attach(vm, adapter, weight, cap, h, now);
  }
  void set_busy(const std::string& vm, bool busy) {
    auto& w = workers[vm];
    w.busy = busy;
    if (busy && !w.holding) sch.want(vm, now);
  }
  // Advances in 100 us steps; workers act on what they were told.
  void run(std::chrono::microseconds d) {
    const TP end = now + d;
    while (now < end) {
      now += 100us;
      for (auto& [vm, w] : workers) {
        if (w.burst.count()) {  // busy for burst, idle for gap, over and over
          const auto cycle = w.burst + w.gap;
          const auto t = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()) % cycle;
          const bool was = w.busy;
          w.busy = t < w.burst;
          if (w.busy && !was && !w.holding) sch.want(vm, now);
        }
        if (!w.holding) continue;
        if (w.busy) w.busy_ns += 100000;
        w.idle_for = w.busy ? std::chrono::microseconds(0) : w.idle_for + 100us;
        // As the worker: idle counts once it lasted its grace (kIdleGrace there).
        const bool idle = !w.busy && w.idle_for >= 500us;
        bool due = false;
        if (w.yield_at && now >= *w.yield_at) {
          // Finishes the piece it is in.
          auto into = (now - w.granted_at) % w.piece;
          due = into < 100us;
        }
        if (w.yield_at && ((idle && w.if_idle) || due) && !stuck.count(vm)) {
          w.holding = false;
          w.yield_at.reset();
          sch.release(vm, w.busy, now);
        }
      }
      if (auto t = sch.next_wakeup(); t && *t <= now) sch.tick(now);
    }
  }
  double share(const std::string& a, const std::string& b) {
    double x = static_cast<double>(sch.usage(a, now).scheduled_ns);
    double y = static_cast<double>(sch.usage(b, now).scheduled_ns);
    return x / (x + y);
  }

  TP now{};
  VidSch sch;
  std::map<std::string, SimWorker> workers;
  std::vector<std::string> overdue;
  std::set<std::string> stuck;
};

TEST(VidSch, ShortGapsBetweenBurstsKeepTheWeightedShare) {
  Sim s;
  s.add("a", 300);
  s.add("b", 100);
  s.workers["a"].burst = 3000us;  // a guest that waits 200 us on its results every 3 ms
  s.workers["a"].gap = 200us;
  s.set_busy("a", true);
  s.set_busy("b", true);
  s.run(4s);
  EXPECT_NEAR(s.share("a", "b"), 0.75, 0.04);
}

TEST(VidSch, LonePartitionKeepsTheAdapterWithoutYielding) {
  Sim s;
  s.add("a", 100);
  s.set_busy("a", true);
  s.run(1s);
  EXPECT_TRUE(s.workers["a"].holding);
  EXPECT_EQ(s.workers["a"].grants, 1u);
  EXPECT_EQ(s.sch.usage("a", s.now).yields, 0u);
  EXPECT_EQ(s.sch.usage("a", s.now).scheduled_ns, 1000000000u);
}

TEST(VidSch, WeightsThreeToOneShareThreeToOne) {
  Sim s;
  s.add("a", 300);
  s.add("b", 100);
  s.set_busy("a", true);
  s.set_busy("b", true);
  s.run(4s);
  EXPECT_NEAR(s.share("a", "b"), 0.75, 0.02);
  EXPECT_GT(s.workers["b"].grants, 50u);  // turns, not one long hold
}

TEST(VidSch, EqualWeightsShareEqually) {
  Sim s;
  s.add("a", 100);
  s.add("b", 100);
  s.add("c", 100);
  for (auto v : {"a", "b", "c"}) s.set_busy(v, true);
  s.run(3s);
  for (auto v : {"a", "b", "c"})
    EXPECT_NEAR(static_cast<double>(s.sch.usage(v, s.now).scheduled_ns) / 3e9, 1.0 / 3, 0.02) << v;
}

TEST(VidSch, CapHoldsALonePartitionToItsPercent) {
  Sim s;
  s.add("a", 100, 20);
  s.set_busy("a", true);
  s.run(2s);
  const double share = static_cast<double>(s.sch.usage("a", s.now).scheduled_ns) / 2e9;
  EXPECT_LE(share, 0.22);
  EXPECT_GE(share, 0.18);
}

TEST(VidSch, CapIsKeptWhenHoldsRunOverTheirDeadline) {
  Sim s;
  s.add("a", 100, 20);
  s.workers["a"].piece = 15000us;  // long pieces: every release comes late
  s.set_busy("a", true);
  s.run(3s);
  const double share = static_cast<double>(s.sch.usage("a", s.now).scheduled_ns) / 3e9;
  EXPECT_LE(share, 0.22);
  EXPECT_GE(share, 0.15);
}

TEST(VidSch, CappedPartitionLeavesTheRestToOthers) {
  Sim s;
  s.add("a", 1000, 25);  // heavy weight, but capped
  s.add("b", 100);
  s.set_busy("a", true);
  s.set_busy("b", true);
  s.run(2s);
  EXPECT_LE(s.share("a", "b"), 0.27);
  EXPECT_GE(s.share("a", "b"), 0.22);
}

TEST(VidSch, IdleHolderYieldsAtOnceWhenAnotherWants) {
  Sim s;
  s.add("a", 100);
  s.add("b", 100);
  s.set_busy("a", true);
  s.run(10ms);
  s.set_busy("a", false);  // still holds, idle
  s.run(50ms);
  EXPECT_TRUE(s.workers["a"].holding);
  s.set_busy("b", true);
  s.run(200us);
  EXPECT_FALSE(s.workers["a"].holding);
  EXPECT_TRUE(s.workers["b"].holding);
}

TEST(VidSch, IdleSpellEarnsNoBurstLater) {
  Sim s;
  s.add("a", 100);
  s.add("b", 100);
  s.set_busy("a", true);
  s.run(2s);  // a alone
  s.set_busy("b", true);
  const uint64_t a0 = s.sch.usage("a", s.now).scheduled_ns, b0 = s.sch.usage("b", s.now).scheduled_ns;
  s.run(1s);
  const double a = static_cast<double>(s.sch.usage("a", s.now).scheduled_ns - a0);
  const double b = static_cast<double>(s.sch.usage("b", s.now).scheduled_ns - b0);
  EXPECT_NEAR(a / (a + b), 0.5, 0.03);
}

TEST(VidSch, AdaptersAreScheduledApart) {
  Sim s;
  s.add("a", 100, 100, "gpu0");
  s.add("b", 100, 100, "gpu1");
  s.set_busy("a", true);
  s.set_busy("b", true);
  s.run(500ms);
  EXPECT_TRUE(s.workers["a"].holding);
  EXPECT_TRUE(s.workers["b"].holding);
  EXPECT_EQ(s.sch.usage("a", s.now).yields, 0u);
}

TEST(VidSch, HolderThatNeverReleasesIsReportedOverdueOnce) {
  SchedPolicy p;
  p.tdr_delay = 2000ms;
  Sim s(p);
  s.add("a", 100);
  s.add("b", 100);
  s.set_busy("a", true);
  s.stuck.insert("a");
  s.set_busy("b", true);
  s.run(2400ms);
  EXPECT_TRUE(s.overdue.empty());  // deadline 10 ms + 2000 + 500 not reached yet
  s.run(200ms);
  ASSERT_EQ(s.overdue.size(), 1u);
  EXPECT_NE(s.overdue[0].find("a: did not give the adapter back"), std::string::npos) << s.overdue[0];
  s.run(1s);
  EXPECT_EQ(s.overdue.size(), 1u);
  // Its worker is gone: the adapter passes on.
  s.sch.detach("a", s.now);
  s.workers.erase("a");
  s.run(1ms);
  EXPECT_TRUE(s.workers["b"].holding);
}

TEST(VidSch, UnexpectedLinesChangeNothing) {
  Sim s;
  s.add("a", 100);
  s.add("b", 100);
  s.sch.release("a", false, s.now);  // never granted
  s.set_busy("a", true);
  s.sch.want("a", s.now);  // already holding
  EXPECT_TRUE(s.workers["a"].holding);
  EXPECT_EQ(s.workers["a"].grants, 1u);
  s.sch.want("nobody", s.now);
  s.sch.release("nobody", true, s.now);
  EXPECT_FALSE(s.sch.usage("nobody", s.now).attached);
}

TEST(VidSch, ReweightingTakesEffect) {
  Sim s;
  s.add("a", 100);
  s.add("b", 100);
  s.set_busy("a", true);
  s.set_busy("b", true);
  s.run(1s);
  s.sch.configure("a", 400, 100, s.now);
  const uint64_t a0 = s.sch.usage("a", s.now).scheduled_ns, b0 = s.sch.usage("b", s.now).scheduled_ns;
  s.run(2s);
  const double a = static_cast<double>(s.sch.usage("a", s.now).scheduled_ns - a0);
  const double b = static_cast<double>(s.sch.usage("b", s.now).scheduled_ns - b0);
  EXPECT_NEAR(a / (a + b), 0.8, 0.03);
}

}  // namespace
}  // namespace gpup::gpupd
