#include "cli/terminal.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "cli/cli.h"

namespace gpup::cli {

namespace {

volatile sig_atomic_t g_wake_fd = -1;

void on_winch(int) {
  const int saved = errno;
  if (g_wake_fd >= 0) {
    const char c = 'w';
    ssize_t ignored = ::write(g_wake_fd, &c, 1);
    (void)ignored;
  }
  errno = saved;
}

// Writes all of it; false when fd is gone (the operator's terminal closed).
bool write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {
      pollfd pf{fd, POLLOUT, 0};
      ::poll(&pf, 1, 100);
      continue;
    }
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

std::unique_ptr<TerminalProxy> TerminalProxy::open() {
  std::array<bool, 3> tty{};
  int model = -1;  // the terminal whose settings and size the guest's pty starts with
  for (int fd = 0; fd < 3; ++fd)
    if ((tty[fd] = ::isatty(fd) == 1) && model < 0) model = fd;
  if (model < 0) return nullptr;

  std::unique_ptr<TerminalProxy> t(new TerminalProxy);
  t->replaced_ = tty;
  t->out_fd_ = tty[1] ? 1 : tty[2] ? 2 : -1;
  t->master_.reset(::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC));
  if (!t->master_ || ::grantpt(t->master_.get()) != 0 || ::unlockpt(t->master_.get()) != 0)
    throw CliError(fmt::format("run: cannot make the guest a terminal (posix_openpt): {}", std::strerror(errno)));
  char name[128];
  if (::ptsname_r(t->master_.get(), name, sizeof name) != 0)
    throw CliError(fmt::format("run: ptsname: {}", std::strerror(errno)));
  t->slave_.reset(::open(name, O_RDWR | O_NOCTTY));
  if (!t->slave_) throw CliError(fmt::format("run: cannot open {}: {}", name, std::strerror(errno)));
  termios tio{};
  if (::tcgetattr(model, &tio) == 0) ::tcsetattr(t->slave_.get(), TCSANOW, &tio);
  winsize ws{};
  if (::ioctl(model, TIOCGWINSZ, &ws) == 0) ::ioctl(t->slave_.get(), TIOCSWINSZ, &ws);
  int p[2];
  if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) throw CliError(fmt::format("run: pipe: {}", std::strerror(errno)));
  t->wake_[0].reset(p[0]);
  t->wake_[1].reset(p[1]);
  return t;
}

TerminalProxy::~TerminalProxy() { finish(); }

void TerminalProxy::start() {
  slave_.reset();  // the guest holds it now: the master reads EIO once the guest's session is gone
  if (replaced_[0] && ::tcgetattr(0, &saved_) == 0) {
    termios raw = saved_;
    ::cfmakeraw(&raw);
    raw_ = ::tcsetattr(0, TCSANOW, &raw) == 0;
  }
  g_wake_fd = wake_[1].get();
  struct sigaction sa {};
  sa.sa_handler = on_winch;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGWINCH, &sa, nullptr);
  thread_ = std::thread([this] { copy_loop(); });
}

void TerminalProxy::finish() {
  if (thread_.joinable()) {
    stop_ = true;
    const char c = 's';
    ssize_t ignored = ::write(wake_[1].get(), &c, 1);
    (void)ignored;
    thread_.join();
    ::signal(SIGWINCH, SIG_DFL);
    g_wake_fd = -1;
  }
  if (raw_) {
    ::tcsetattr(0, TCSAFLUSH, &saved_);
    raw_ = false;
  }
}

void TerminalProxy::copy_loop() {
  char buf[16384];
  bool input = replaced_[0];
  const int model = replaced_[0] ? 0 : replaced_[1] ? 1 : 2;
  for (;;) {
    pollfd fds[3] = {{master_.get(), POLLIN, 0}, {wake_[0].get(), POLLIN, 0}, {input ? 0 : -1, POLLIN, 0}};
    if (::poll(fds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents & POLLIN) {
      while (::read(wake_[0].get(), buf, sizeof buf) > 0) {
      }
      winsize ws{};
      if (::ioctl(model, TIOCGWINSZ, &ws) == 0) ::ioctl(master_.get(), TIOCSWINSZ, &ws);
      if (stop_) {
        // The guest is gone: what it wrote last is still in the pty; copy it, then stop.
        ::fcntl(master_.get(), F_SETFL, O_NONBLOCK);
        ssize_t n;
        while ((n = ::read(master_.get(), buf, sizeof buf)) > 0)
          if (out_fd_ >= 0 && !write_all(out_fd_, buf, static_cast<size_t>(n))) break;
        return;
      }
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = ::read(master_.get(), buf, sizeof buf);
      if (n > 0) {
        if (out_fd_ >= 0 && !write_all(out_fd_, buf, static_cast<size_t>(n))) out_fd_ = -1;
      } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        // EIO: every holder of the slave is gone; no more output can come. finish() joins.
        return;
      }
    }
    if (input && (fds[2].revents & (POLLIN | POLLHUP | POLLERR))) {
      const ssize_t n = ::read(0, buf, sizeof buf);
      if (n > 0) {
        if (!write_all(master_.get(), buf, static_cast<size_t>(n))) input = false;
      } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        input = false;
      }
    }
  }
}

}  // namespace gpup::cli
