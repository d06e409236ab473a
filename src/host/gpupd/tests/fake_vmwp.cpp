// fake_vmwp: a stand-in for gpup-vmwp that speaks the worker side of the control protocol
// (control/protocol.h) without touching a KMD, for gpupd's integration tests. It reads and writes
// every line through that header's codec, as the real worker does.
//
//   fake_vmwp --vm NAME --control-fd N
//
// It checks the configure message strictly, checks it got its guest socket from gpupd, reports ready,
// and answers stats (vram_max = the partition's current max_vram), update and shutdown. The VM name
// picks a misbehaviour to test gpupd against:
//   fail*    answers configure with {"event":"error"} and exits 1
//   crash*   exits 3 before it is ready
//   junk*    answers the first stats request with a line over the size limit
//   refuse*  answers update with {"ok":false}
//   borrow*  right after ready asks for device memory (need 16 MiB, want 96 MiB) and reports what
//            gpupd answered as its stats' vram_held (control/protocol.h, gpupd/worker.h)
//   tdr*     while the partition's compute weight is 1: once gpupd has taken its ready (it answered
//            an ask sent after it), reports a TDR ({"event":"tdr",...}) and exits kWorkerExitReset,
//            as the real worker's watchdog does. With any other weight it serves normally, so a test
//            lets it run again with `gpup vm set --compute-weight`.
//   fault*   the same, but dies of SIGILL (without a core dump), as when a guest kernel crashes
//            the worker
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "common/fd.h"
#include "host/control/json_lines.h"
#include "host/control/protocol.h"

using namespace gpup;
using namespace gpup::control;

namespace {

int g_fd = -1;

template <typename Message>
void send_line(const Message& m) {
  std::string out = encode_line(to_json(m));
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::send(g_fd, out.data() + done, out.size() - done, MSG_NOSIGNAL);
    if (n <= 0) std::_Exit(2);
    done += static_cast<size_t>(n);
  }
}

// Blocking: the next line, or nothing at EOF.
std::optional<std::string> next_line(LineReader& r) {
  for (;;) {
    if (auto l = r.pop()) return l;
    char buf[4096];
    ssize_t n = ::read(g_fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return std::nullopt;
    if (!r.append(std::string_view(buf, static_cast<size_t>(n))).ok()) {
      std::fprintf(stderr, "fake_vmwp: line from gpupd too long\n");
      std::_Exit(2);
    }
  }
}

bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

}  // namespace

int main(int argc, char** argv) {
  std::string vm;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--vm")) vm = argv[i + 1];
    else if (!std::strcmp(argv[i], "--control-fd")) g_fd = std::atoi(argv[i + 1]);
  }
  if (vm.empty() || g_fd < 0) {
    std::fprintf(stderr, "usage: fake_vmwp --vm NAME --control-fd N\n");
    return 2;
  }
  LineReader reader(kMaxToWorkerLine);
  auto first = next_line(reader);
  if (!first) return 2;
  auto msg = parse_object_line(*first);
  if (!msg) {
    send_line(ErrorEvent{msg.error().message});
    return 1;
  }
  auto cfg = configure_from_json(*msg);
  if (!cfg) {
    send_line(ErrorEvent{"bad configure: " + cfg.error().message});
    return 1;
  }
  if (cfg->vm.name != vm) {
    send_line(ErrorEvent{"configure is for another vm"});
    return 1;
  }
  if (starts_with(vm, "fail")) {
    send_line(ErrorEvent{"fake worker refuses vm " + vm});
    return 1;
  }
  if (starts_with(vm, "crash")) return 3;

  // gpupd listens on the VRD endpoint and hands guests over on this socket, as to the real worker.
  int type = 0;
  socklen_t tlen = sizeof type;
  if (::getsockopt(kWorkerGuestFd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_SEQPACKET) {
    send_line(ErrorEvent{"no guest socket from gpupd on fd 4"});
    return 1;
  }
  send_line(ReadyEvent{cfg->endpoint, std::nullopt});
  if (starts_with(vm, "borrow")) send_line(VramAsk{1, false, 16u << 20, 96u << 20});
  if ((starts_with(vm, "tdr") || starts_with(vm, "fault")) && cfg->vm.compute_weight == 1) {
    // Dying right after ready could race gpupd's reading of it (then it is no reset, but a
    // worker that never started): the answer to an ask proves gpupd has taken the ready.
    send_line(VramAsk{1, true, 0, 0});
    for (;;) {
      auto line = next_line(reader);
      if (!line) return 2;
      auto in = parse_object_line(*line);
      if (!in) return 2;
      if (in->contains("answer")) break;  // scheduler notices meanwhile are ignored
    }
    if (starts_with(vm, "tdr")) {
      send_line(TdrEvent{.running_ms = cfg->tdr_delay_ms + 5u, .tdr_delay_ms = cfg->tdr_delay_ms,
                         .pid = static_cast<uint32_t>(::getpid()), .process = std::string("fake-guest")});
      return kWorkerExitReset;
    }
    // A real fault, not raise(): jailed, the worker is pid 1 of its namespace, which ignores the
    // fatal signals it sends itself. An illegal instruction, not a null store: sanitizer builds
    // take SIGSEGV and turn it into an exit status, but leave SIGILL to the kernel.
    ::prctl(PR_SET_DUMPABLE, 0);
    rlimit no_core{0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    ::signal(SIGILL, SIG_DFL);
    __builtin_trap();
  }

  VmSpec spec = cfg->vm;
  unsigned updates = 0;
  uint64_t held = 0;
  // gpupd's lines: answers to the ask above, scheduler notices (ignored: no work here), requests.
  // A line no decoder takes ends the fake worker with status 2.
  while (auto line = next_line(reader)) {
    auto in = parse_object_line(*line);
    if (!in) return 2;
    if (in->contains("answer")) {
      auto a = vram_answer_from_json(*in);
      if (!a) return 2;
      held = a->hold;
      continue;
    }
    if (in->contains("sched")) {
      if (!sched_notice_from_json(*in)) return 2;
      continue;
    }
    auto req = worker_request_from_json(*in);
    if (!req) return 2;
    const uint64_t id = req->id;
    if (req->op == WorkerOp::kStats) {
      if (starts_with(vm, "junk")) {
        std::string junk(kMaxWorkerLine + 10, 'x');
        ssize_t ignored = ::send(g_fd, junk.data(), junk.size(), MSG_NOSIGNAL);
        (void)ignored;
        continue;
      }
      json stats{{"vram_used", 4096},
                 {"vram_max", spec.max_vram},
                 {"vram_held", held},
                 {"totals", {{"processes", 1}, {"devices", 1}, {"contexts", 0}, {"allocations", updates}, {"sync_objects", 0}}},
                 {"processes", json::array({json{{"pid", ::getpid()}, {"name", "fake-guest"}, {"vram_used", 4096}}})}};
      send_line(WorkerReply{id, true, {}, stats});
    } else if (req->op == WorkerOp::kUpdate) {
      if (req->vm->name != spec.name || req->vm->guid != spec.guid) {
        send_line(WorkerReply{id, false, "update for another vm", std::nullopt});
      } else if (starts_with(vm, "refuse")) {
        send_line(WorkerReply{id, false, "fake KMD refuses the settings", std::nullopt});
      } else {
        spec = *req->vm;
        ++updates;
        send_line(WorkerReply{id, true, {}, std::nullopt});
      }
    } else {  // shutdown
      send_line(WorkerReply{id, true, {}, std::nullopt});
      return 0;
    }
  }
  return 0;
}
