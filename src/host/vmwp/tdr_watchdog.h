// The worker's TDR watchdog: notices device work that runs longer than the TDR delay.
//
// The worker tells it, per context, since when the context's oldest submission in flight has been
// running (the submission entered an idle context, or the one before it completed) and when the
// context has nothing in flight any more. A thread of its own looks a few times per delay; the
// first context found running longer than the delay is reported once, and the watchdog then stops
// looking (the worker resets the partition). It takes no lock the worker's handlers hold, so it
// still fires while a handler is stuck behind the hung work (destroying a context waits for it).
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

namespace gpup::vmwp {

class TdrWatchdog {
 public:
  using Clock = std::chrono::steady_clock;
  struct Hang {
    uint64_t context_id = 0;
    std::chrono::milliseconds running{0};
  };
  // on_hang runs on the watchdog's thread.
  TdrWatchdog(std::chrono::milliseconds delay, std::function<void(const Hang&)> on_hang);
  ~TdrWatchdog();  // stops the thread (on_hang is not called after it returns)
  TdrWatchdog(const TdrWatchdog&) = delete;
  TdrWatchdog& operator=(const TdrWatchdog&) = delete;

  void running(uint64_t context_id, Clock::time_point since);
  void idle(uint64_t context_id);
  std::chrono::milliseconds delay() const { return delay_; }

 private:
  void loop();

  const std::chrono::milliseconds delay_;
  std::function<void(const Hang&)> on_hang_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Clock::time_point> running_;
  bool stop_ = false;
  bool fired_ = false;
  std::thread thread_;
};

}  // namespace gpup::vmwp
