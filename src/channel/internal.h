// Internals of the channel library shared by its .cpp files and its unit test. Not a public API.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "channel/channel.h"
#include "channel/ring.h"
#include "common/fd.h"
#include "common/result.h"

namespace gpup::channel::internal {

// ---- errors ----

// Records `message` as this thread's last_error(), logs it (level by status) and returns `status`.
gpup_status fail(gpup_status status, std::string message);
// For a Result-returning function: records last_error() and returns the Error (logged at debug
// level only, since the caller gets the message).
Error error(gpup_status status, std::string message);
// A gpup_status for an errno value from a socket/file call.
gpup_status errno_status(int err);
// "what: strerror(err)".
std::string errno_text(const std::string& what, int err);

// ---- time ----

class Deadline {
 public:
  // timeout_ms < 0: never expires.
  explicit Deadline(int timeout_ms);
  bool infinite() const { return infinite_; }
  bool expired() const;
  // Milliseconds left for poll(): -1 when infinite, else >= 0, rounded up so that a caller never
  // spins with a zero timeout while time remains.
  int poll_ms() const;
  std::chrono::steady_clock::time_point when() const { return when_; }

 private:
  bool infinite_;
  std::chrono::steady_clock::time_point when_;
};

// One pause instruction for spin-wait loops (always inside a time bound).
void cpu_relax();

// ---- sockets and fds ----

Status set_nonblocking(int fd);
// poll() on one fd until an event in `events` (POLLHUP/POLLERR always count) or the deadline.
// Returns revents, 0 on timeout, -1 with errno on failure. Retries EINTR.
int poll_one(int fd, short events, const Deadline& deadline);
// Peer pid from SO_PEERCRED, -1 if unavailable (TCP).
int peer_pid_of(int sock);
bool is_unix_socket(int sock);
// Reads exactly n bytes from a non-blocking stream socket. Fds arriving as SCM_RIGHTS are appended
// to *fds (closed and reported as PROTOCOL_ERROR if fds is null or more than max_fds arrive).
// EOF -> CONNECTION_LOST, deadline -> TIMEOUT.
Status read_exact(int sock, void* buf, size_t n, const Deadline& deadline, std::vector<UniqueFd>* fds = nullptr,
                  size_t max_fds = 0);
// Writes exactly n bytes; `fds` (if any) travel with the first byte. MSG_NOSIGNAL.
Status write_exact(int sock, const void* buf, size_t n, const Deadline& deadline, std::span<const int> fds = {});

// eventfd doorbells (created non-blocking). signal adds 1, drain resets the counter to 0.
void eventfd_signal(int efd);
void eventfd_drain(int efd);

// ---- little-endian encoding ----

inline void put_le16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
inline void put_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void put_le64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint16_t get_le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t get_le32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline uint64_t get_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// ---- wire format of the channel layer ----
//
// Handshake, client -> server, 16 bytes:
//   u32 magic "GPCH", u16 version, u16 transport (1 shm, 2 stream), u32 ring_bytes (0 = server
//   default), u32 reserved (0)
// Server -> client, 24 bytes:
//   u32 magic "GPCW", u16 version, u16 transport, i32 status, u32 ring_bytes, u32 fd_count,
//   u32 reserved. On SUCCESS with shared memory, fd_count = 5 fds travel with it via SCM_RIGHTS:
//   memfd, client->server data/space eventfds, server->client data/space eventfds.
//   On failure the server closes the connection after the answer.
// Shared-memory layout of the memfd: ring 0 (client -> server) at offset 0, ring 1
// (server -> client) at ring_stride(ring_bytes); each is a Ring region (256-byte header + data).
// The memfd is sealed against shrinking and growing.
// After the handshake, shared memory: the socket carries only fd records, 16 bytes each:
//   u32 magic "GPFD", u32 reserved (0), u64 id; with exactly one fd attached (SCM_RIGHTS).
// Stream: the socket carries frames [u32 length][length bytes], length <= kMaxMessageSize.
namespace wire {
constexpr uint32_t kHelloMagic = 0x48435047;    // "GPCH"
constexpr uint32_t kWelcomeMagic = 0x57435047;  // "GPCW"
constexpr uint32_t kFdMagic = 0x44465047;       // "GPFD"
constexpr uint16_t kVersion = 1;
constexpr uint16_t kTransportShm = 1;
constexpr uint16_t kTransportStream = 2;
constexpr size_t kHelloSize = 16;
constexpr size_t kWelcomeSize = 24;
constexpr size_t kFdRecordSize = 16;
constexpr size_t kFrameHeaderSize = 4;
constexpr size_t kShmFdCount = 5;

struct Hello {
  uint32_t magic = kHelloMagic;
  uint16_t version = kVersion;
  uint16_t transport = 0;
  uint32_t ring_bytes = 0;
  uint32_t reserved = 0;
};
struct Welcome {
  uint32_t magic = kWelcomeMagic;
  uint16_t version = kVersion;
  uint16_t transport = 0;
  int32_t status = 0;
  uint32_t ring_bytes = 0;
  uint32_t fd_count = 0;
  uint32_t reserved = 0;
};
void encode(const Hello& h, uint8_t (&out)[kHelloSize]);
Hello decode_hello(const uint8_t (&in)[kHelloSize]);
void encode(const Welcome& w, uint8_t (&out)[kWelcomeSize]);
Welcome decode_welcome(const uint8_t (&in)[kWelcomeSize]);

constexpr size_t kPage = 4096;
constexpr size_t ring_stride(size_t ring_bytes) { return (Ring::region_size(ring_bytes) + kPage - 1) & ~(kPage - 1); }
constexpr size_t shm_size(size_t ring_bytes) { return 2 * ring_stride(ring_bytes); }
}  // namespace wire

// Checks ring_bytes against [kMinRingBytes, kMaxRingBytes] and power of two.
bool valid_ring_bytes(size_t ring_bytes);
Status validate_options(const ChannelOptions& options);

// ---- shared memory ----

// An owned mmap() mapping.
class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, size_t len) : addr_(addr), len_(len) {}
  Mapping(Mapping&& o) noexcept;
  Mapping& operator=(Mapping&& o) noexcept;
  ~Mapping();
  uint8_t* data() const { return static_cast<uint8_t*>(addr_); }
  size_t size() const { return len_; }
  std::span<uint8_t> span() const { return {data(), len_}; }

 private:
  void* addr_ = nullptr;
  size_t len_ = 0;
};

// Everything a shared-memory channel end needs. The rings are indexed by role below.
struct ShmParts {
  UniqueFd socket;
  Mapping mapping;
  Ring tx, rx;        // we produce into tx, consume from rx
  UniqueFd tx_data;   // we signal: data available in tx
  UniqueFd tx_space;  // we wait: space available in tx
  UniqueFd rx_data;   // we wait: data available in rx
  UniqueFd rx_space;  // we signal: space available in rx
};

std::unique_ptr<Channel> make_shm_channel(ShmParts parts, const ChannelOptions& options);
std::unique_ptr<Channel> make_stream_channel(UniqueFd socket, const ChannelOptions& options);

// Test hook: the shared mapping of a shared-memory channel (empty span for stream channels).
std::span<uint8_t> shared_region_for_testing(Channel& channel);

}  // namespace gpup::channel::internal
