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

void TdrWatchdog::loop() {
  // Looks often enough that a hang is reported within a tenth of the delay (at most 100 ms) of it.
  const auto period = std::clamp<std::chrono::milliseconds>(delay_ / 10, std::chrono::milliseconds(5),
                                                            std::chrono::milliseconds(100));
  std::unique_lock l(mu_);
  while (!stop_ && !fired_) {
    cv_.wait_for(l, period, [&] { return stop_; });
    if (stop_) return;
    const auto now = Clock::now();
    Hang worst;
    for (const auto& [id, since] : running_) {
      auto ran = std::chrono::duration_cast<std::chrono::milliseconds>(now - since);
      if (ran >= delay_ && ran > worst.running) worst = {id, ran};
    }
    if (worst.context_id == 0) continue;
    fired_ = true;
    l.unlock();
    on_hang_(worst);
    return;
  }
}

}  // namespace gpup::vmwp
