// gpup channel: whole messages (opaque byte frames, at most 128 KiB) in both directions between a
// guest process and a host worker process, plus file-descriptor passing. This is gpup's VMBus.
//
// Two transports share one interface:
//   - Shared memory (AF_UNIX only, the default there): one memfd holds a ring per direction
//     (see ring.h); four eventfds act as doorbells; the AF_UNIX socket stays open for fd passing and
//     so that either side notices at once when the other one dies (POLLHUP).
//   - Stream (TCP, or AF_UNIX on request): frames [u32 little-endian length][bytes] on the socket.
//
// Establishing a channel: the host side creates a Listener and accept()s; the guest side calls
// connect(). Both then run a small handshake (magic + channel-layer version, transport, ring size)
// that the accepting side answers, for shared memory with the memfd and the eventfds attached.
// accept_on_socket()/connect_on_socket() run the same handshake on an already-connected socket
// (e.g. one end of a socketpair inherited by a spawned worker).
//
// Errors: calls return a gpup_status. For failures, last_error() on the same thread holds the
// details (e.g. both sizes for MESSAGE_TOO_LARGE). The codes mean:
//   TIMEOUT            the timeout expired; nothing was consumed, the call may be repeated.
//   CONNECTION_LOST    the peer is gone (process died, closed or shut down the channel), or
//                      shutdown() was called locally. Permanent.
//   MESSAGE_TOO_LARGE  send(): the message exceeds kMaxMessageSize; nothing was sent, the channel
//                      stays usable.
//   PROTOCOL_ERROR     the peer broke the channel protocol (corrupt ring, oversized frame header,
//                      malformed fd record). The channel is shut down; later calls return
//                      CONNECTION_LOST.
//   NOT_SUPPORTED      fd passing on a channel that does not share memory (TCP or AF_UNIX stream).
//   INVALID_PARAMETER  bad argument (negative fd, bad endpoint or options).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "gpup/status.h"

namespace gpup::channel {

// Hard limit on one message, enforced on both sides. A message of exactly this size passes.
constexpr size_t kMaxMessageSize = 128 * 1024;

enum class Transport {
  kAuto,          // shared memory on AF_UNIX, stream on TCP
  kSharedMemory,  // AF_UNIX only; NOT_SUPPORTED on TCP
  kStream,        // length-prefixed frames on the socket
};

struct ChannelOptions {
  Transport transport = Transport::kAuto;  // client side: what to ask for
  // Data bytes of each ring (one per direction). Power of two, at least one maximum-size record
  // (256 KiB), at most 64 MiB. The connecting side asks for its value and the accepting side
  // grants it if valid; the accepting side's own value only applies to a request of 0.
  size_t ring_bytes = 512 * 1024;
  // How long a waiting side re-checks the ring before sleeping on its doorbell, in microseconds.
  // A cross-core eventfd wake-up of an idle vCPU costs ~30 us, so spinning a little less than that
  // pays off for request/response traffic. When the CPUs are oversubscribed the spin only burns
  // time the peer needs: lower it (0 disables spinning). At most 10000.
  int spin_us = 20;
  // Bound on connect() and on the handshake of each accepted connection.
  int handshake_timeout_ms = 5000;
};

constexpr size_t kMinRingBytes = 256 * 1024;
constexpr size_t kMaxRingBytes = 64 * 1024 * 1024;

// Details of the most recent failure reported by this library on the calling thread (like errno,
// it is not cleared by successful calls).
const Error& last_error();

// One end of a channel. Created by Listener::accept(), connect() or the *_on_socket() functions.
//
// Threading contract:
//   - send(), send_fd(), receive_fd(), shutdown() and the accessors may be called from any number
//     of threads concurrently. Concurrent send() calls are serialized: each message is written
//     whole, in the order the calls obtain the internal lock.
//   - receive() is meant for one receiving thread; concurrent calls are serialized (never corrupt)
//     but each blocks the others.
//   - The destructor must not run while another thread is inside a call; call shutdown() first to
//     make such calls return, join those threads, then destroy.
// The channel owns its socket, mapping and eventfds; they are released by the destructor.
//
// Peer liveness: the peer counts as gone when its end of the socket is closed, i.e. when the last
// process holding it exits or closes it. All fds are O_CLOEXEC, but a plain fork() without exec
// keeps the socket alive in the child: a process that forks helpers must close the channel there.
class Channel {
 public:
  virtual ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Sends one message: the concatenation of `parts` (header, body, ... need not be joined by the
  // caller). Refuses more than kMaxMessageSize bytes with MESSAGE_TOO_LARGE before anything is
  // written. Blocks while the peer has not made room (backpressure: nothing is dropped); returns
  // CONNECTION_LOST if the peer disappears or shutdown() is called while waiting. SUCCESS means the
  // message is in the ring / socket, not that the peer has read it.
  gpup_status send(std::span<const std::span<const uint8_t>> parts);
  gpup_status send(std::span<const uint8_t> message);
  // send(header, body, trailer) with anything convertible to std::span<const uint8_t>.
  template <typename... Parts>
  requires(sizeof...(Parts) >= 2 && (std::convertible_to<const Parts&, std::span<const uint8_t>> && ...)) gpup_status
      send(const Parts&... parts) {
    const std::span<const uint8_t> list[] = {std::span<const uint8_t>(parts)...};
    return send(std::span<const std::span<const uint8_t>>(list));
  }

  // Receives the next message into `out` (resized to the message length; the bytes are copied out
  // of shared memory exactly once, so the caller may validate them without the peer changing
  // them). timeout_ms < 0 waits forever, 0 polls. Returns SUCCESS, TIMEOUT, CONNECTION_LOST (messages
  // the peer sent before it died are still delivered first) or PROTOCOL_ERROR.
  gpup_status receive(std::vector<uint8_t>& out, int timeout_ms = -1);

  // Passes a duplicate of `fd` (the caller keeps its own) to the peer, tagged with `id`.
  // NOT_SUPPORTED unless shares_memory(). May block while the peer does not collect fds.
  gpup_status send_fd(uint64_t id, int fd);
  // Waits for the fd the peer sent with `id` and stores it in `out`. Fds arriving for other ids are
  // kept for later calls (at most kMaxPendingFds; beyond that the peer is misbehaving and the
  // channel fails with PROTOCOL_ERROR). Ids are matched in any order; sending an id again while
  // the previous fd with that id has not been collected is a PROTOCOL_ERROR. Several threads may
  // wait for different ids at once. NOT_SUPPORTED unless shares_memory().
  gpup_status receive_fd(uint64_t id, UniqueFd& out, int timeout_ms = -1);
  static constexpr size_t kMaxPendingFds = 1024;

  // True for the shared-memory transport (the peer can map memory sections we pass it).
  bool shares_memory() const { return shares_memory_; }
  Transport transport() const { return shares_memory_ ? Transport::kSharedMemory : Transport::kStream; }
  // Peer process id from SO_PEERCRED on AF_UNIX (for a socketpair: the process that created it);
  // -1 on TCP.
  int peer_pid() const { return peer_pid_; }

  // Makes every blocked and future call on this channel return CONNECTION_LOST and tells the peer
  // (it sees the connection close). Idempotent; callable from any thread, including concurrently
  // with blocked calls.
  virtual void shutdown() = 0;

 protected:
  Channel(bool shares_memory, int peer_pid) : shares_memory_(shares_memory), peer_pid_(peer_pid) {}

  // Implementations. send_impl receives a validated total size (<= kMaxMessageSize).
  virtual gpup_status send_impl(std::span<const std::span<const uint8_t>> parts, size_t total) = 0;
  virtual gpup_status receive_impl(std::vector<uint8_t>& out, int timeout_ms) = 0;
  virtual gpup_status send_fd_impl(uint64_t id, int fd);
  virtual gpup_status receive_fd_impl(uint64_t id, UniqueFd& out, int timeout_ms);

 private:
  const bool shares_memory_;
  const int peer_pid_;
};

// Accepting (host) side.
class Listener {
 public:
  // Listens on an AF_UNIX stream socket at `path` (mode 0660). A stale socket file left by a dead
  // server is removed; a live one (something accepts connections there) or a non-socket file at
  // `path` is left alone and reported as ALREADY_EXISTS. The socket file is removed again when the
  // Listener is destroyed by the process that created it, if it is still the same file.
  static Result<Listener> listen_unix(const std::string& path, const ChannelOptions& options = {});
  // Listens on TCP host:port (port 0 = ephemeral, see port()). Only the stream transport is
  // possible over TCP.
  static Result<Listener> listen_tcp(const std::string& host, uint16_t port, const ChannelOptions& options = {});

  Listener(Listener&&) noexcept;
  Listener& operator=(Listener&&) noexcept;
  ~Listener();

  // Waits for one connection and runs the server side of the handshake (bounded by
  // options.handshake_timeout_ms). timeout_ms < 0 waits forever. TIMEOUT when nobody connected in
  // time. A client that fails the handshake yields its error (PROTOCOL_ERROR, VERSION_MISMATCH, ...)
  // and the listener stays usable: callers normally log it and accept again.
  // Thread-compatible: one accepting thread at a time.
  Result<std::unique_ptr<Channel>> accept(int timeout_ms = -1);

  int fd() const { return fd_.get(); }               // readable when a connection is pending (for poll)
  uint16_t port() const { return port_; }            // TCP port actually bound; 0 for AF_UNIX
  const std::string& path() const { return path_; }  // AF_UNIX path; empty for TCP

 private:
  Listener() = default;
  void remove_socket_file();
  UniqueFd fd_;
  bool is_unix_ = false;
  uint16_t port_ = 0;
  std::string path_;
  uint64_t dev_ = 0, ino_ = 0;  // identity of the socket file we created
  int owner_pid_ = -1;
  ChannelOptions options_;
};

// Connecting (guest) side. `endpoint` is "unix:/path", "/path" or "tcp:HOST:PORT" (HOST may be
// "[v6addr]"). Bounded by options.handshake_timeout_ms. Errors: INVALID_PARAMETER (endpoint,
// options), NOT_FOUND (no socket at the path), CONNECTION_LOST (refused / closed during the
// handshake), TIMEOUT, NOT_SUPPORTED (shared memory over TCP, or refused by the server),
// VERSION_MISMATCH, PROTOCOL_ERROR (the server's answer did not validate).
Result<std::unique_ptr<Channel>> connect(const std::string& endpoint, const ChannelOptions& options = {});

// The two handshake halves on an already-connected stream socket (AF_UNIX or TCP); they take
// ownership of the socket. Used by Listener::accept() / connect(), and directly for socketpairs.
Result<std::unique_ptr<Channel>> accept_on_socket(UniqueFd socket, const ChannelOptions& options = {});
// Refuses a client without reading its Hello (gpupd, for a peer not allowed on an endpoint): one
// Welcome carrying status (negative), written without blocking; the client's handshake returns it.
void refuse_on_socket(int socket, gpup_status status);
Result<std::unique_ptr<Channel>> connect_on_socket(UniqueFd socket, const ChannelOptions& options = {});

}  // namespace gpup::channel
