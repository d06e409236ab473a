#include "host/gpupd/event_loop.h"

#include <cerrno>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace gpup::gpupd {

EventLoop::EventLoop() : epfd_(::epoll_create1(EPOLL_CLOEXEC)) {
  if (!epfd_) epoll_errno_ = errno;
}

Status EventLoop::ok() const {
  if (epfd_) return {};
  return make_error(GPUP_STATUS_INTERNAL, fmt::format("epoll_create1: {}", std::strerror(epoll_errno_)));
}

Status EventLoop::watch(int fd, uint32_t events, FdCallback cb) {
  unwatch(fd);
  uint64_t token = next_token_++;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = token;
  if (::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
    return make_error(GPUP_STATUS_INTERNAL, fmt::format("epoll_ctl(ADD, {}): {}", fd, std::strerror(errno)));
  watches_[fd] = Watch{token, std::move(cb)};
  tokens_[token] = fd;
  return {};
}

void EventLoop::set_events(int fd, uint32_t events) {
  auto it = watches_.find(fd);
  if (it == watches_.end()) return;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = it->second.token;
  if (::epoll_ctl(epfd_.get(), EPOLL_CTL_MOD, fd, &ev) != 0)
    spdlog::error("epoll_ctl(MOD, {}): {}", fd, std::strerror(errno));
}

void EventLoop::unwatch(int fd) {
  auto it = watches_.find(fd);
  if (it == watches_.end()) return;
  ::epoll_ctl(epfd_.get(), EPOLL_CTL_DEL, fd, nullptr);
  tokens_.erase(it->second.token);
  watches_.erase(it);
}

EventLoop::TimerId EventLoop::add_timer(std::chrono::milliseconds delay, std::function<void()> cb) {
  TimerId id = next_timer_++;
  auto due = Clock::now() + delay;
  timers_.emplace(std::make_pair(due, id), std::move(cb));
  timer_due_[id] = due;
  return id;
}

void EventLoop::cancel_timer(TimerId id) {
  auto it = timer_due_.find(id);
  if (it == timer_due_.end()) return;
  timers_.erase({it->second, id});
  timer_due_.erase(it);
}

void EventLoop::run() {
  stopping_ = false;
  epoll_event events[64];
  while (!stopping_) {
    int timeout = -1;
    if (!timers_.empty()) {
      auto wait = std::chrono::ceil<std::chrono::milliseconds>(timers_.begin()->first.first - Clock::now()).count();
      timeout = wait < 0 ? 0 : static_cast<int>(std::min<long long>(wait, 60'000));
    }
    int n = ::epoll_wait(epfd_.get(), events, 64, timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      spdlog::critical("epoll_wait: {}", std::strerror(errno));
      return;
    }
    for (int i = 0; i < n && !stopping_; ++i) {
      // Look the watch up again for each event: an earlier callback may have removed it.
      auto t = tokens_.find(events[i].data.u64);
      if (t == tokens_.end()) continue;
      auto w = watches_.find(t->second);
      if (w == watches_.end() || w->second.token != events[i].data.u64) continue;
      FdCallback cb = w->second.cb;  // a copy: the callback may unwatch its own fd
      cb(events[i].events);
    }
    // Timers due now; ones added by these callbacks with zero delay run in the next round.
    auto now = Clock::now();
    while (!stopping_ && !timers_.empty() && timers_.begin()->first.first <= now) {
      auto node = timers_.extract(timers_.begin());
      timer_due_.erase(node.key().second);
      node.mapped()();
    }
  }
}

}  // namespace gpup::gpupd
