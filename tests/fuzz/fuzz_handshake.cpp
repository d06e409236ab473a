// libFuzzer target: the accepting side of the channel handshake, accept_on_socket(), as a hostile
// client drives it over a socketpair: a Hello of any size and contents, file descriptors attached
// anywhere, then garbage (taken as stream frames or fd records by the channel), and a client that
// hangs up, half-closes or goes silent. Each input must end with the fd table back to exactly the
// entries it had before (anything else is a leak and aborts), within the handshake timeout.
//
// Checks, per input:
//   - accept_on_socket() returns a channel or an error within handshake_timeout_ms (plus slack for
//     a loaded machine; libFuzzer's -timeout catches a real hang);
//   - a channel only for a well-formed Hello (magic, version, reserved 0, a known transport with a
//     valid ring size) that carried no fds, of the transport it asked for; and such a Hello from a
//     client still able to read the answer always gets one;
//   - a stream channel then delivers only frames within kMaxMessageSize (at most one per 4 bytes
//     sent), a shared-memory one an empty ring, and its fd-record reader survives the garbage;
//   - ASan and UBSan see nothing, and /proc/self/fd has as many entries as before the input.
//
// Input: [mode][chunk]..., chunk = [ctl][len][len bytes]. The chunks are concatenated into the
// byte stream the client sends, one sendmsg() each. ctl bits 0-1 attach that many fds (eventfds)
// to the chunk, bit 2 attaches 20 (more than any reader's control buffer holds). mode % 4: 0 and 3
// close the client's end after sending, 1 shuts down only its write side, 2 keeps it open and
// silent (the handshake then times out if the Hello is incomplete). Without mode bit 2, what fits
// the socket buffer is written before accepting (deterministic) and only the rest by a thread
// while the handshake runs; with it, a thread writes everything, racing the handshake.
#include <dirent.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "channel/internal.h"
#include "common/log.h"

using namespace gpup;
using namespace gpup::channel;
namespace wire = gpup::channel::internal::wire;

namespace {

constexpr int kTimeoutMs = 20;
// How much later than its deadline a handshake may return: what a loaded machine can take from a
// (niced) fuzzer, seen at 3.3 s; below libFuzzer's -timeout=10, which still catches a hang.
constexpr int kSlackMs = 8000;

[[noreturn]] void violated(const char* what, long long a = 0, long long b = 0) {
  fprintf(stderr, "fuzz_handshake: invariant violated: %s (%lld, %lld)\n", what, a, b);
  abort();
}

#define CHECK(cond, ...)                        \
  do {                                          \
    if (!(cond)) violated(#cond, ##__VA_ARGS__); \
  } while (0)

size_t open_fds() {
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) violated("cannot read /proc/self/fd");
  size_t n = 0;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n;
}

struct Chunk {
  const uint8_t* bytes;
  size_t len;
  size_t fds;
};

// Sends one chunk whole (a partial write would move the fds away from its first byte). With
// `wait` false, returns false with errno EAGAIN if the socket buffer has no room for its start;
// otherwise false only when the host is gone.
bool send_chunk(int sock, const Chunk& c, bool wait) {
  std::vector<UniqueFd> owned;
  std::vector<int> fds;
  for (size_t i = 0; i < c.fds; ++i) {
    owned.emplace_back(::eventfd(0, EFD_CLOEXEC));
    if (!owned.back()) violated("eventfd", errno);
    fds.push_back(owned.back().get());
  }
  iovec iov{const_cast<uint8_t*>(c.bytes), c.len};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(cm), fds.data(), sizeof(int) * fds.size());
  }
  size_t sent = 0;
  while (sent < c.len) {
    const ssize_t r = ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) {
      sent += static_cast<size_t>(r);
      iov.iov_base = static_cast<uint8_t*>(iov.iov_base) + r;
      iov.iov_len -= static_cast<size_t>(r);
      msg.msg_control = nullptr;  // the fds went with the first byte
      msg.msg_controllen = 0;
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return false;
    if (sent == 0 && !wait) return false;
    pollfd p{sock, POLLOUT, 0};
    if (::poll(&p, 1, kTimeoutMs + kSlackMs) <= 0) return false;
  }
  return true;
}

bool valid_hello(const std::vector<uint8_t>& stream) {
  uint8_t buf[wire::kHelloSize];
  std::memcpy(buf, stream.data(), sizeof buf);
  const wire::Hello h = wire::decode_hello(buf);
  if (h.magic != wire::kHelloMagic || h.version != wire::kVersion || h.reserved != 0) return false;
  if (h.transport == wire::kTransportStream) return h.ring_bytes == 0;
  if (h.transport == wire::kTransportShm) return h.ring_bytes == 0 || internal::valid_ring_bytes(h.ring_bytes);
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // every refused client logs; the fuzzer makes many
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int mode = data[0] % 4;
  const bool hold = mode == 2, half_close = mode == 1;
  const bool threaded = data[0] & 4;

  // Parse the chunks and the byte stream they make.
  std::vector<Chunk> chunks;
  std::vector<uint8_t> stream;
  bool fds_in_hello = false;
  for (size_t pos = 1; pos + 2 <= size;) {
    const uint8_t ctl = data[pos];
    const size_t len = std::min<size_t>(data[pos + 1], size - pos - 2);
    pos += 2;
    // Zero bytes on a stream socket carry no fds: such a chunk would send nothing.
    const size_t fds = len == 0 ? 0 : (ctl & 4) ? 20 : (ctl & 3);
    if (fds > 0 && stream.size() < wire::kHelloSize) fds_in_hello = true;
    chunks.push_back({data + pos, len, fds});
    stream.insert(stream.end(), data + pos, data + pos + len);
    pos += len;
  }
  const bool whole_hello = stream.size() >= wire::kHelloSize;
  const bool good_hello = whole_hello && !fds_in_hello && valid_hello(stream);

  const size_t fds_before = open_fds();
  {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) violated("socketpair", errno);
    UniqueFd host(sv[0]), client(sv[1]);

    size_t sent = 0;
    if (!threaded) {
      while (sent < chunks.size() && send_chunk(client.get(), chunks[sent], false)) ++sent;
      if (sent < chunks.size() && errno != EAGAIN && errno != EWOULDBLOCK) violated("sendmsg", errno);
    }
    const bool inline_writes = sent == chunks.size();
    auto finish = [&](int sock) {
      if (half_close) ::shutdown(sock, SHUT_WR);
      if (!hold && !half_close) ::shutdown(sock, SHUT_RDWR);  // closes, as far as the host can tell
    };
    std::thread writer;
    if (inline_writes) {
      if (!hold && !half_close) client.reset();
      else finish(client.get());
    } else {
      // The rest as the host reads; it ends early when the host closes its end (EPIPE).
      writer = std::thread([&, sock = client.get(), from = sent] {
        for (size_t i = from; i < chunks.size(); ++i) {
          if (!send_chunk(sock, chunks[i], true)) return;
        }
        finish(sock);
      });
    }

    ChannelOptions opt;
    opt.handshake_timeout_ms = kTimeoutMs;
    opt.spin_us = 0;
    const auto t0 = std::chrono::steady_clock::now();
    auto r = accept_on_socket(std::move(host), opt);
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    CHECK(ms <= kTimeoutMs + kSlackMs, ms, kTimeoutMs);

    if (!good_hello) CHECK(!r.ok(), stream.size(), fds_in_hello);
    if (good_hello && inline_writes && (hold || half_close)) {
      CHECK(r.ok() || r.status() == GPUP_STATUS_NO_MEMORY, r.status());
    }
    if (!whole_hello && !fds_in_hello && inline_writes) {
      CHECK(r.status() == (hold ? GPUP_STATUS_TIMEOUT : GPUP_STATUS_CONNECTION_LOST), r.status(), stream.size());
    }
    // Written before the accept, the fd-carrying Hello is there to be read and refused; written by
    // the thread as the host reads, a loaded machine may not get it out within the timeout.
    if (fds_in_hello)
      CHECK(r.status() == GPUP_STATUS_PROTOCOL_ERROR || (!inline_writes && r.status() == GPUP_STATUS_TIMEOUT),
            r.status(), inline_writes);

    if (r.ok()) {
      std::unique_ptr<Channel> ch = std::move(*r);
      CHECK(ch != nullptr);
      const bool shm = stream[6] == wire::kTransportShm;  // le16 transport, validated above
      CHECK(ch->shares_memory() == shm, shm);
      std::vector<uint8_t> out;
      if (shm) {
        CHECK(ch->receive(out, 0) == GPUP_STATUS_TIMEOUT);  // nobody has written the ring
        // The garbage after the Hello is read as fd records.
        for (uint64_t id = 0; id < 2; ++id) {
          UniqueFd fd;
          const gpup_status s = ch->receive_fd(id, fd, 0);
          CHECK(s == GPUP_STATUS_SUCCESS || s == GPUP_STATUS_TIMEOUT || s == GPUP_STATUS_CONNECTION_LOST ||
                    s == GPUP_STATUS_PROTOCOL_ERROR,
                s);
          if (s == GPUP_STATUS_SUCCESS) CHECK(fd.valid());
        }
      } else {
        // Frames: every delivered one costs at least its 4-byte header of what was sent.
        const size_t max_frames = (stream.size() - wire::kHelloSize) / wire::kFrameHeaderSize;
        size_t frames = 0;
        gpup_status s;
        while ((s = ch->receive(out, 0)) == GPUP_STATUS_SUCCESS) {
          CHECK(out.size() <= kMaxMessageSize, out.size());
          CHECK(++frames <= max_frames, frames, max_frames);
        }
        CHECK(s == GPUP_STATUS_TIMEOUT || s == GPUP_STATUS_CONNECTION_LOST || s == GPUP_STATUS_PROTOCOL_ERROR, s);
      }
    }
    // The channel, if any, is gone: a writer still sending sees EPIPE.
    if (writer.joinable()) writer.join();
  }
  const size_t fds_after = open_fds();
  CHECK(fds_after == fds_before, fds_before, fds_after);
  return 0;
}
