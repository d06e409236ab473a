// gpupd's single-threaded event loop: epoll (level-triggered) plus timers.
//
// Every callback runs on the loop's thread, one at a time, and must not block. A callback may add or
// remove any fd or timer, including its own: an fd removed during a dispatch round gets no further
// callbacks in that round. Work that must not run inside the current callback (e.g. destroying the
// object that is running) goes through post().
#pragma once
#include <sys/epoll.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <unordered_map>

#include "common/fd.h"
#include "common/result.h"

namespace gpup::gpupd {

class EventLoop {
 public:
  using Clock = std::chrono::steady_clock;
  using FdCallback = std::function<void(uint32_t events)>;
  using TimerId = uint64_t;

  EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  Status ok() const;  // whether epoll could be created

  // Watches fd (not owned) for events (EPOLLIN, EPOLLOUT, ...); replaces an earlier registration.
  Status watch(int fd, uint32_t events, FdCallback cb);
  void set_events(int fd, uint32_t events);
  void unwatch(int fd);

  TimerId add_timer(std::chrono::milliseconds delay, std::function<void()> cb);
  void cancel_timer(TimerId id);  // no-op for 0, fired or cancelled ids
  // Runs cb on the next iteration, after the current callback returns.
  void post(std::function<void()> cb) { add_timer(std::chrono::milliseconds(0), std::move(cb)); }

  // Dispatches until stop() is called.
  void run();
  void stop() { stopping_ = true; }

 private:
  struct Watch {
    uint64_t token;
    FdCallback cb;
  };
  UniqueFd epfd_;
  int epoll_errno_ = 0;
  std::unordered_map<int, Watch> watches_;          // fd -> watch
  std::unordered_map<uint64_t, int> tokens_;        // token -> fd, for events of removed fds
  uint64_t next_token_ = 1;
  std::map<std::pair<Clock::time_point, TimerId>, std::function<void()>> timers_;
  std::unordered_map<TimerId, Clock::time_point> timer_due_;
  TimerId next_timer_ = 1;
  bool stopping_ = false;
};

}  // namespace gpup::gpupd
