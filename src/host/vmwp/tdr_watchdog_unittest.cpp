// TdrWatchdog: which context is reported, when, and that it is reported once and never after the
// watchdog is gone. Delays are short (hundreds of ms) and the bounds generous: the tests must hold
// on a loaded two-core machine, where a sleep may overshoot by tens of milliseconds.
#include "host/vmwp/tdr_watchdog.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace gpup::vmwp {
namespace {

using namespace std::chrono_literals;
using Clock = TdrWatchdog::Clock;

// What the watchdog reported, and when; outlives the watchdog (its thread writes here).
struct Reports {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<TdrWatchdog::Hang> hangs;
  std::vector<Clock::time_point> at;

  std::function<void(const TdrWatchdog::Hang&)> callback() {
    return [this](const TdrWatchdog::Hang& h) {
      std::lock_guard l(mu);
      hangs.push_back(h);
      at.push_back(Clock::now());
      cv.notify_all();
    };
  }
  // Waits up to `timeout` for at least n reports; returns how many there are.
  size_t wait_for(size_t n, std::chrono::milliseconds timeout) {
    std::unique_lock l(mu);
    cv.wait_for(l, timeout, [&] { return hangs.size() >= n; });
    return hangs.size();
  }
  size_t count() {
    std::lock_guard l(mu);
    return hangs.size();
  }
};

TEST(TdrWatchdog, ContextRunningPastTheDelayIsReportedOnceWithItsId) {
  Reports r;
  const auto delay = 150ms;
  TdrWatchdog w(delay, r.callback());
  EXPECT_EQ(w.delay(), delay);
  const auto started = Clock::now();
  w.running(7, started);
  ASSERT_EQ(r.wait_for(1, 5s), 1u) << "no report within 5 s of a " << delay.count() << " ms delay";
  std::lock_guard l(r.mu);
  EXPECT_EQ(r.hangs[0].context_id, 7u);
  EXPECT_GE(r.hangs[0].running, delay);
  EXPECT_GE(r.at[0] - started, delay) << "reported before the delay had passed";
  // Bounded: the watchdog looks every delay/10 (5..100 ms); a loaded machine may be late, not 2 s.
  EXPECT_LT(r.at[0] - started, delay + 2s);
}

TEST(TdrWatchdog, ReportsOnlyOnceEvenWhenMoreContextsHang) {
  Reports r;
  TdrWatchdog w(100ms, r.callback());
  const auto now = Clock::now();
  w.running(1, now);
  ASSERT_EQ(r.wait_for(1, 5s), 1u);
  // The context still runs, and another one hangs too: the worker resets the partition after the
  // first report, so the watchdog has stopped looking.
  w.running(2, Clock::now() - 1s);
  std::this_thread::sleep_for(400ms);
  EXPECT_EQ(r.count(), 1u);
}

TEST(TdrWatchdog, ContextsIdleBeforeTheDelayAreNotReported) {
  Reports r;
  const auto delay = 300ms;
  TdrWatchdog w(delay, r.callback());
  // One context: its work completes at once.
  w.running(1, Clock::now());
  w.idle(1);
  // Another: many short submissions back to back, together longer than the delay. Each start
  // restarts its clock, and it is idle in between.
  const auto until = Clock::now() + 2 * delay;
  while (Clock::now() < until) {
    w.running(2, Clock::now());
    std::this_thread::sleep_for(5ms);
    w.idle(2);
  }
  // Idle for well over the delay: still nothing.
  EXPECT_EQ(r.wait_for(1, 3 * delay), 0u) << "an idle context was reported";
  // Idle for an unknown context (or twice) is harmless.
  w.idle(1);
  w.idle(99);
  EXPECT_EQ(r.count(), 0u);
}

TEST(TdrWatchdog, TheOldestOfSeveralRunningContextsIsReported) {
  {
    // Started one after the other, none past the delay yet: the oldest passes it first.
    Reports r;
    const auto delay = 200ms;
    TdrWatchdog w(delay, r.callback());
    const auto now = Clock::now();
    w.running(1, now);
    w.running(2, now - 80ms);  // the oldest
    w.running(3, now - 40ms);
    ASSERT_EQ(r.wait_for(1, 5s), 1u);
    std::lock_guard l(r.mu);
    EXPECT_EQ(r.hangs[0].context_id, 2u);
    EXPECT_GE(r.hangs[0].running, delay);
  }
  {
    // Several already past the delay when it looks: the one that ran longest, not the first in
    // id order. (The oldest is told first, so whenever it looks, it sees that one.)
    Reports r;
    const auto delay = 200ms;
    TdrWatchdog w(delay, r.callback());
    const auto now = Clock::now();
    w.running(30, now - 900ms);  // the oldest, highest id
    w.running(10, now - 500ms);
    w.running(20, now - 700ms);
    ASSERT_EQ(r.wait_for(1, 5s), 1u);
    std::lock_guard l(r.mu);
    EXPECT_EQ(r.hangs[0].context_id, 30u);
    EXPECT_GE(r.hangs[0].running, 900ms);
  }
}

TEST(TdrWatchdog, ARefreshedStartPushesTheDeadline) {
  Reports r;
  const auto delay = 400ms;
  TdrWatchdog w(delay, r.callback());
  const auto first = Clock::now();
  w.running(5, first);
  std::this_thread::sleep_for(100ms);
  // The head completed and the next submission of the context became the running one.
  const auto second = Clock::now();
  w.running(5, second);
  ASSERT_EQ(r.wait_for(1, 5s), 1u);
  std::lock_guard l(r.mu);
  EXPECT_EQ(r.hangs[0].context_id, 5u);
  EXPECT_GE(r.at[0] - second, delay) << "reported at the first start's deadline: "
                                     << std::chrono::duration_cast<std::chrono::milliseconds>(r.at[0] - first).count()
                                     << " ms after it";
  // What it reports is how long the current head has run, not the context's first start.
  EXPECT_LE(r.hangs[0].running, std::chrono::duration_cast<std::chrono::milliseconds>(r.at[0] - second) + 1ms);
}

TEST(TdrWatchdog, NothingIsReportedAfterItIsDestroyed) {
  Reports r;
  const auto delay = 100ms;
  auto w = std::make_unique<TdrWatchdog>(delay, r.callback());
  w->running(1, Clock::now());
  // Destroying it ends its thread at once: it waits neither for the delay nor for the next look.
  const auto t0 = Clock::now();
  w.reset();
  EXPECT_LT(Clock::now() - t0, delay) << "the destructor waited";
  std::this_thread::sleep_for(4 * delay);
  EXPECT_EQ(r.count(), 0u);
}

TEST(TdrWatchdog, DestructorWaitsForAReportInProgress) {
  // on_hang is not running any more once the destructor has returned (the worker's on_hang uses
  // the worker, which is gone after that).
  std::atomic<bool> started{false}, finished{false};
  auto w = std::make_unique<TdrWatchdog>(50ms, [&](const TdrWatchdog::Hang&) {
    started = true;
    std::this_thread::sleep_for(200ms);
    finished = true;
  });
  w->running(1, Clock::now() - 1s);
  const auto until = Clock::now() + 5s;
  while (!started && Clock::now() < until) std::this_thread::sleep_for(1ms);
  ASSERT_TRUE(started);
  w.reset();
  EXPECT_TRUE(finished);
}

// A build is timed against its own limit, reported as a build, and its end then says "too late".
TEST(TdrWatchdog, BuildRunningPastItsLimitIsReportedAsABuild) {
  Reports r;
  TdrWatchdog w(0ms, r.callback());  // device work not timed: only the build can be reported
  const auto started = Clock::now();
  const auto limit = 300ms;
  w.building(3, started, limit);
  ASSERT_EQ(r.wait_for(1, 5s), 1u) << "no report within 5 s of a " << limit.count() << " ms build limit";
  {
    std::lock_guard l(r.mu);
    EXPECT_EQ(r.hangs[0].kind, TdrWatchdog::Hang::Kind::kBuild);
    EXPECT_EQ(r.hangs[0].context_id, 3u);
    EXPECT_GE(r.hangs[0].running, limit);
    EXPECT_GE(r.at[0] - started, limit) << "reported before the limit had passed";
  }
  EXPECT_FALSE(w.built(3)) << "the reported build's end must not look like a normal one";
}

TEST(TdrWatchdog, BuildEndingInTimeIsNotReported) {
  Reports r;
  TdrWatchdog w(0ms, r.callback());
  w.building(1, Clock::now(), 300ms);
  std::this_thread::sleep_for(50ms);
  EXPECT_TRUE(w.built(1));
  // A context running with device work untimed (delay 0) is not reported either.
  w.running(9, Clock::now() - 10s);
  std::this_thread::sleep_for(700ms);
  EXPECT_EQ(r.count(), 0u);
}

TEST(TdrWatchdog, HungWorkIsReportedWhileABuildIsWithinItsLimit) {
  Reports r;
  TdrWatchdog w(100ms, r.callback());
  w.building(1, Clock::now(), 60s);
  w.running(5, Clock::now());
  ASSERT_EQ(r.wait_for(1, 5s), 1u);
  {
    std::lock_guard l(r.mu);
    EXPECT_EQ(r.hangs[0].kind, TdrWatchdog::Hang::Kind::kWork);
    EXPECT_EQ(r.hangs[0].context_id, 5u);
  }
  EXPECT_TRUE(w.built(1)) << "the build was not what was reported";
}

}  // namespace
}  // namespace gpup::vmwp
