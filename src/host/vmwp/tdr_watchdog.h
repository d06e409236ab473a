// The worker's TDR watchdog: notices device work that runs longer than the TDR delay, and device
// program builds that run longer than the partition's build timeout.
//
// The worker tells it, per context, since when the context's oldest submission in flight has been
// running (the submission entered an idle context, or the one before it completed) and when the
// context has nothing in flight any more; and when a build began and ended. A thread of its own
// looks a few times per delay (at most every 100 ms); the first context or build found running
// past its limit is reported once, and the watchdog then stops looking (the worker resets the
// partition). It takes no lock the worker's handlers hold, so it still fires while a handler is
// stuck behind the hung work (destroying a context waits for it) or inside the build.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

namespace gpup::vmwp {

class TdrWatchdog {
 public:
  using Clock = std::chrono::steady_clock;
  struct Hang {
    enum class Kind { kWork, kBuild } kind = Kind::kWork;
    uint64_t context_id = 0;  // kWork: the context; kBuild: the build's id
    std::chrono::milliseconds running{0};
  };
  // on_hang runs on the watchdog's thread. delay 0: device work is not timed (builds still are).
  TdrWatchdog(std::chrono::milliseconds delay, std::function<void(const Hang&)> on_hang);
  ~TdrWatchdog();  // stops the thread (on_hang is not called after it returns)
  TdrWatchdog(const TdrWatchdog&) = delete;
  TdrWatchdog& operator=(const TdrWatchdog&) = delete;

  void running(uint64_t context_id, Clock::time_point since);
  void idle(uint64_t context_id);
  // A build (id: the caller's, unique among builds in flight) began at since and may run for limit.
  void building(uint64_t id, Clock::time_point since, std::chrono::milliseconds limit);
  // The build ended. false: too late, it was reported (the partition is being reset, so whoever
  // waits for the build must not be answered as if it had ended well).
  bool built(uint64_t id);
  std::chrono::milliseconds delay() const { return delay_; }

 private:
  void loop();

  const std::chrono::milliseconds delay_;
  std::function<void(const Hang&)> on_hang_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Clock::time_point> running_;
  struct Build {
    Clock::time_point since;
    std::chrono::milliseconds limit;
  };
  std::map<uint64_t, Build> builds_;
  bool stop_ = false;
  bool fired_ = false;
  std::optional<uint64_t> fired_build_;
  std::thread thread_;
};

}  // namespace gpup::vmwp
