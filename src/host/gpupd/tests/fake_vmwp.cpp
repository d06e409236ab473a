// fake_vmwp: a stand-in for gpup-vmwp that speaks the worker side of the control protocol
// (control/protocol.h) without touching a KMD, for gpupd's integration tests.
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

void send_line(const json& j) {
  std::string out = encode_line(j);
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
    send_line(json{{"event", "error"}, {"message", msg.error().message}});
    return 1;
  }
  auto cfg = configure_from_json(*msg);
  if (!cfg) {
    send_line(json{{"event", "error"}, {"message", "bad configure: " + cfg.error().message}});
    return 1;
  }
  if (cfg->vm.name != vm) {
    send_line(json{{"event", "error"}, {"message", "configure is for another vm"}});
    return 1;
  }
  if (starts_with(vm, "fail")) {
    send_line(json{{"event", "error"}, {"message", "fake worker refuses vm " + vm}});
    return 1;
  }
  if (starts_with(vm, "crash")) return 3;

  // gpupd listens on the VRD endpoint and hands guests over on this socket, as to the real worker.
  int type = 0;
  socklen_t tlen = sizeof type;
  if (::getsockopt(kWorkerGuestFd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_SEQPACKET) {
    send_line(json{{"event", "error"}, {"message", "no guest socket from gpupd on fd 4"}});
    return 1;
  }
  send_line(json{{"event", "ready"}, {"endpoint", cfg->endpoint}});
  if (starts_with(vm, "borrow")) send_line(json{{"ask", 1}, {"op", "vram"}, {"need", 16u << 20}, {"want", 96u << 20}});

  VmSpec spec = cfg->vm;
  unsigned updates = 0;
  uint64_t held = 0;
  while (auto line = next_line(reader)) {
    auto req = parse_object_line(*line);
    if (!req) return 2;
    if (req->contains("answer")) {
      if (!(*req)["granted"].is_boolean() || !(*req)["hold"].is_number_unsigned()) return 2;
      held = (*req)["hold"].get<uint64_t>();
      continue;
    }
    ObjectReader r(*req, "request");
    auto op = r.str("op", 32);
    auto id = r.u64("id");
    if (!r.ok()) return 2;
    if (*op == "stats") {
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
      send_line(json{{"reply", *id}, {"ok", true}, {"stats", stats}});
    } else if (*op == "update") {
      const json* v = r.object("vm");
      auto next = v ? vm_spec_from_json(*v) : Result<VmSpec>(make_error(GPUP_STATUS_INVALID_PARAMETER, "no vm"));
      if (!next || next->name != spec.name || next->guid != spec.guid) {
        send_line(json{{"reply", *id}, {"ok", false}, {"error", next ? "update for another vm" : next.error().message}});
      } else if (starts_with(vm, "refuse")) {
        send_line(json{{"reply", *id}, {"ok", false}, {"error", "fake KMD refuses the settings"}});
      } else {
        spec = *next;
        ++updates;
        send_line(json{{"reply", *id}, {"ok", true}});
      }
    } else if (*op == "shutdown") {
      send_line(json{{"reply", *id}, {"ok", true}});
      return 0;
    } else {
      send_line(json{{"reply", *id}, {"ok", false}, {"error", "unknown op"}});
    }
  }
  return 0;
}
