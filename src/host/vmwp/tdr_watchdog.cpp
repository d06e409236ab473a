#include "host/vmwp/tdr_watchdog.h"

#include <algorithm>

namespace gpup::vmwp {

TdrWatchdog::TdrWatchdog(std::chrono::milliseconds delay, std::function<void(const Hang&)> on_hang)
    : delay_(delay), on_hang_(std::move(on_hang)), thread_([this] { loop(); }) {}

TdrWatchdog::~TdrWatchdog() {
  {
    std::lock_guard l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void TdrWatchdog::running(uint64_t context_id, Clock::time_point since) {
  std::lock_guard l(mu_);
  running_[context_id] = since;
}

void TdrWatchdog::idle(uint64_t context_id) {
  std::lock_guard l(mu_);
  running_.erase(context_id);
}

void TdrWatchdog::building(uint64_t id, Clock::time_point since, std::chrono::milliseconds limit) {
  std::lock_guard l(mu_);
  builds_[id] = Build{since, limit};
}

bool TdrWatchdog::built(uint64_t id) {
  std::lock_guard l(mu_);
  builds_.erase(id);
  return fired_build_ != id;
}

void TdrWatchdog::loop() {
  // Looks often enough that a hang is reported within a tenth of the delay (at most 100 ms) of it;
  // a build's limit is a second or more.
  const auto period = delay_.count() == 0 ? std::chrono::milliseconds(100)
                                          : std::clamp<std::chrono::milliseconds>(delay_ / 10, std::chrono::milliseconds(5),
                                                                                  std::chrono::milliseconds(100));
  std::unique_lock l(mu_);
  while (!stop_ && !fired_) {
    cv_.wait_for(l, period, [&] { return stop_; });
    if (stop_) return;
    const auto now = Clock::now();
    Hang worst;
    bool found = false;
    if (delay_.count() != 0)
      for (const auto& [id, since] : running_) {
        auto ran = std::chrono::duration_cast<std::chrono::milliseconds>(now - since);
        if (ran >= delay_ && ran > worst.running) worst = {Hang::Kind::kWork, id, ran}, found = true;
      }
    for (const auto& [id, b] : builds_) {
      auto ran = std::chrono::duration_cast<std::chrono::milliseconds>(now - b.since);
      if (!found && ran >= b.limit) worst = {Hang::Kind::kBuild, id, ran}, found = true;
    }
    if (!found) continue;
    fired_ = true;
    if (worst.kind == Hang::Kind::kBuild) fired_build_ = worst.context_id;
    l.unlock();
    on_hang_(worst);
    return;
  }
}

}  // namespace gpup::vmwp
