// The guest's terminal: a pseudo-terminal of its own, proxied by `gpup run`.
//
// A guest must not share the operator's terminal: with it as its controlling terminal it could
// type into the operator's shell (TIOCSTI), change its settings or read what the operator types
// after it exits. So the guest runs in a session of its own (sandbox.h), and when gpup run's
// stdin, stdout or stderr is a terminal, each of those is replaced in the guest by the slave of a
// new pty (its controlling terminal), whose master gpup copies to and from the operator's
// terminal: interactive programs (a shell, a REPL, a progress bar) work as before, and keys the
// operator types (^C, ^Z) reach the guest through the pty's line discipline.
//
// Threading: open() and the setup run before the guest starts, in gpup's only thread; start()
// then runs the copying on a thread of its own until finish().
#pragma once
#include <termios.h>

#include <array>
#include <atomic>
#include <memory>
#include <thread>

#include "common/fd.h"

namespace gpup::cli {

class TerminalProxy {
 public:
  // A proxy when one of fds 0, 1, 2 is a terminal; null otherwise (nothing to hide). Throws
  // CliError when the pty cannot be made.
  static std::unique_ptr<TerminalProxy> open();
  ~TerminalProxy();  // finish(), if not done
  TerminalProxy(const TerminalProxy&) = delete;
  TerminalProxy& operator=(const TerminalProxy&) = delete;

  // The slave the guest gets as its controlling terminal (not close-on-exec: it must reach the
  // guest through clone and fork; the guest closes it after dup2).
  int slave() const { return slave_.get(); }
  // Which of the guest's fds 0, 1, 2 become the slave: those that are a terminal in gpup run.
  const std::array<bool, 3>& replaced() const { return replaced_; }

  // After the guest started: closes gpup's copy of the slave, puts the operator's terminal in raw
  // mode (when stdin is one: keys go to the guest's pty as typed) and starts copying.
  void start();
  // After the guest's session ended: copies what is left of its output, stops, and gives the
  // operator's terminal its settings back.
  void finish();

 private:
  TerminalProxy() = default;
  void copy_loop();

  UniqueFd master_, slave_, wake_[2];
  std::array<bool, 3> replaced_{};
  int out_fd_ = -1;  // where the guest's output goes: gpup run's stdout, else its stderr
  bool raw_ = false;
  termios saved_{};
  std::thread thread_;
  std::atomic<bool> stop_{false};
};

}  // namespace gpup::cli
