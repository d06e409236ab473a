// Channel establishment: Listener, connect(), and the handshake on a connected socket.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <thread>
#include <utility>

#include "channel/internal.h"

namespace gpup::channel {

using internal::Deadline;
using internal::errno_status;
using internal::errno_text;
using internal::error;
namespace wire = internal::wire;

namespace {

Status set_nodelay(int sock) {
  const int one = 1;
  if (::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) {
    return error(errno_status(errno), errno_text("setsockopt(TCP_NODELAY)", errno));
  }
  return {};
}

Result<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path || path.find('\0') != std::string::npos) {
    return error(GPUP_STATUS_INVALID_PARAMETER, "unix socket path '" + path + "' is empty or longer than " +
                                                    std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// connect() on a non-blocking socket, bounded by the deadline.
Status connect_bounded(int sock, const sockaddr* addr, socklen_t len, const Deadline& deadline,
                       const std::string& what) {
  for (;;) {
    if (::connect(sock, addr, len) == 0) return {};
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN) {
      // AF_UNIX: the server's backlog is full. Retry briefly until the deadline.
      if (deadline.expired()) return error(GPUP_STATUS_TIMEOUT, "connect to " + what + ": the server is not accepting");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    if (err == EINPROGRESS) {
      const int ev = internal::poll_one(sock, POLLOUT, deadline);
      if (ev == 0) return error(GPUP_STATUS_TIMEOUT, "connect to " + what + ": timed out");
      if (ev < 0) return error(errno_status(errno), errno_text("connect to " + what + ": poll", errno));
      int so_error = 0;
      socklen_t sl = sizeof so_error;
      if (::getsockopt(sock, SOL_SOCKET, SO_ERROR, &so_error, &sl) != 0) so_error = errno;
      if (so_error == 0) return {};
      return error(errno_status(so_error), errno_text("connect to " + what, so_error));
    }
    return error(errno_status(err), errno_text("connect to " + what, err));
  }
}

Result<UniqueFd> make_socket(int family) {
  const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return error(errno_status(errno), errno_text("socket", errno));
  return UniqueFd(fd);
}

struct ParsedHostPort {
  std::string host;
  uint16_t port = 0;
};

Result<ParsedHostPort> parse_host_port(const std::string& text) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    return error(GPUP_STATUS_INVALID_PARAMETER, "'" + text + "' is not HOST:PORT");
  }
  ParsedHostPort out;
  out.host = text.substr(0, colon);
  if (out.host.size() >= 2 && out.host.front() == '[' && out.host.back() == ']') {
    out.host = out.host.substr(1, out.host.size() - 2);
  }
  const std::string port = text.substr(colon + 1);
  unsigned value = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || value == 0 || value > 65535) {
    return error(GPUP_STATUS_INVALID_PARAMETER, "'" + port + "' is not a TCP port");
  }
  out.port = static_cast<uint16_t>(value);
  return out;
}

struct AddrInfoDeleter {
  void operator()(addrinfo* ai) const { ::freeaddrinfo(ai); }
};
using AddrInfoPtr = std::unique_ptr<addrinfo, AddrInfoDeleter>;

Result<AddrInfoPtr> resolve(const std::string& host, uint16_t port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0) {
    return error(GPUP_STATUS_NOT_FOUND, "cannot resolve '" + host + "': " + ::gai_strerror(rc));
  }
  return AddrInfoPtr(res);
}

// ---- shared-memory resources (server side) ----

struct ShmResources {
  UniqueFd memfd;
  internal::Mapping mapping;
  UniqueFd efd[4];  // c2s data, c2s space, s2c data, s2c space
};

Result<ShmResources> create_shm(size_t ring_bytes) {
  ShmResources r;
  const size_t size = wire::shm_size(ring_bytes);
  r.memfd.reset(::memfd_create("gpup-channel", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!r.memfd) return error(errno_status(errno), errno_text("memfd_create", errno));
  if (::ftruncate(r.memfd.get(), static_cast<off_t>(size)) != 0) {
    return error(errno_status(errno), errno_text("ftruncate(memfd)", errno));
  }
  // The client must not be able to shrink the file under our mapping (SIGBUS) or grow it.
  if (::fcntl(r.memfd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return error(errno_status(errno), errno_text("fcntl(F_ADD_SEALS)", errno));
  }
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r.memfd.get(), 0);
  if (addr == MAP_FAILED) return error(errno_status(errno), errno_text("mmap(memfd)", errno));
  r.mapping = internal::Mapping(addr, size);
  for (auto& e : r.efd) {
    e.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!e) return error(errno_status(errno), errno_text("eventfd", errno));
  }
  return r;
}

std::span<uint8_t> ring_region(const internal::Mapping& m, size_t ring_bytes, int index) {
  return m.span().subspan(static_cast<size_t>(index) * wire::ring_stride(ring_bytes), Ring::region_size(ring_bytes));
}

// Answers the client (best effort when refusing) and returns `err`.
Error refuse(int sock, const wire::Hello& hello, gpup_status status, const std::string& message, const Deadline& d) {
  wire::Welcome w;
  w.transport = hello.transport;
  w.status = status;
  uint8_t buf[wire::kWelcomeSize];
  wire::encode(w, buf);
  (void)internal::write_exact(sock, buf, sizeof buf, d);
  return error(status, "handshake: " + message);
}

// The client checks that a received fd is an eventfd (when /proc is there to tell).
Status check_eventfd(int fd) {
  char link[64];
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(path.c_str(), link, sizeof link - 1);
  if (n < 0) return {};  // no /proc: the fd is non-blocking anyway, a wrong type only makes calls fail
  link[n] = '\0';
  if (std::strcmp(link, "anon_inode:[eventfd]") != 0) {
    return error(GPUP_STATUS_PROTOCOL_ERROR, std::string("handshake: a doorbell fd is not an eventfd but ") + link);
  }
  return internal::set_nonblocking(fd);
}

}  // namespace

// ---- handshake ----

void refuse_on_socket(int socket, gpup_status status) {
  wire::Welcome w;
  w.status = status < 0 ? status : GPUP_STATUS_ACCESS_DENIED;
  uint8_t buf[wire::kWelcomeSize];
  wire::encode(w, buf);
  (void)::send(socket, buf, sizeof buf, MSG_DONTWAIT | MSG_NOSIGNAL);
}

Result<std::unique_ptr<Channel>> accept_on_socket(UniqueFd socket, const ChannelOptions& options) {
  if (Status st = internal::validate_options(options); !st) return st.error();
  if (!socket) return error(GPUP_STATUS_INVALID_PARAMETER, "accept_on_socket: invalid socket");
  if (Status st = internal::set_nonblocking(socket.get()); !st) return st.error();
  const int sock = socket.get();
  const Deadline deadline(options.handshake_timeout_ms);

  uint8_t hbuf[wire::kHelloSize];
  if (Status st = internal::read_exact(sock, hbuf, sizeof hbuf, deadline); !st) {
    return Error(st.status(), "handshake: " + st.error().message);
  }
  const wire::Hello hello = wire::decode_hello(hbuf);
  if (hello.magic != wire::kHelloMagic) {
    return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: the client is not a gpup channel (bad magic)");
  }
  if (hello.version != wire::kVersion) {
    return refuse(sock, hello, GPUP_STATUS_VERSION_MISMATCH,
                  "client speaks channel version " + std::to_string(hello.version) + ", we speak " +
                      std::to_string(wire::kVersion),
                  deadline);
  }
  if (hello.reserved != 0)
    return refuse(sock, hello, GPUP_STATUS_PROTOCOL_ERROR, "reserved field is not zero", deadline);

  if (hello.transport == wire::kTransportStream) {
    if (hello.ring_bytes != 0)
      return refuse(sock, hello, GPUP_STATUS_PROTOCOL_ERROR, "ring size on a stream", deadline);
    wire::Welcome w;
    w.transport = hello.transport;
    uint8_t wbuf[wire::kWelcomeSize];
    wire::encode(w, wbuf);
    if (Status st = internal::write_exact(sock, wbuf, sizeof wbuf, deadline); !st) return st.error();
    if (!internal::is_unix_socket(sock)) (void)set_nodelay(sock);
    return internal::make_stream_channel(std::move(socket), options);
  }
  if (hello.transport != wire::kTransportShm) {
    return refuse(sock, hello, GPUP_STATUS_PROTOCOL_ERROR, "unknown transport " + std::to_string(hello.transport),
                  deadline);
  }
  if (!internal::is_unix_socket(sock)) {
    return refuse(sock, hello, GPUP_STATUS_NOT_SUPPORTED, "shared memory requested over TCP", deadline);
  }
  const size_t ring_bytes = hello.ring_bytes != 0 ? hello.ring_bytes : options.ring_bytes;
  if (!internal::valid_ring_bytes(ring_bytes)) {
    return refuse(sock, hello, GPUP_STATUS_INVALID_PARAMETER,
                  "ring size " + std::to_string(ring_bytes) + " is not a power of two in [" +
                      std::to_string(kMinRingBytes) + ", " + std::to_string(kMaxRingBytes) + "]",
                  deadline);
  }

  Result<ShmResources> res = create_shm(ring_bytes);
  if (!res) return refuse(sock, hello, GPUP_STATUS_NO_MEMORY, res.error().message, deadline);
  Result<Ring> c2s = Ring::create(ring_region(res->mapping, ring_bytes, 0));
  Result<Ring> s2c = Ring::create(ring_region(res->mapping, ring_bytes, 1));
  if (!c2s || !s2c) return refuse(sock, hello, GPUP_STATUS_INTERNAL, "cannot format the rings", deadline);

  wire::Welcome w;
  w.transport = wire::kTransportShm;
  w.ring_bytes = static_cast<uint32_t>(ring_bytes);
  w.fd_count = wire::kShmFdCount;
  uint8_t wbuf[wire::kWelcomeSize];
  wire::encode(w, wbuf);
  const int fds[wire::kShmFdCount] = {res->memfd.get(), res->efd[0].get(), res->efd[1].get(), res->efd[2].get(),
                                      res->efd[3].get()};
  if (Status st = internal::write_exact(sock, wbuf, sizeof wbuf, deadline, fds); !st) return st.error();

  internal::ShmParts parts;
  parts.socket = std::move(socket);
  parts.mapping = std::move(res->mapping);
  parts.tx = std::move(*s2c);
  parts.rx = std::move(*c2s);
  parts.rx_data = std::move(res->efd[0]);
  parts.rx_space = std::move(res->efd[1]);
  parts.tx_data = std::move(res->efd[2]);
  parts.tx_space = std::move(res->efd[3]);
  return internal::make_shm_channel(std::move(parts), options);
}

Result<std::unique_ptr<Channel>> connect_on_socket(UniqueFd socket, const ChannelOptions& options) {
  if (Status st = internal::validate_options(options); !st) return st.error();
  if (!socket) return error(GPUP_STATUS_INVALID_PARAMETER, "connect_on_socket: invalid socket");
  if (Status st = internal::set_nonblocking(socket.get()); !st) return st.error();
  const int sock = socket.get();
  const bool is_unix = internal::is_unix_socket(sock);
  bool shm = options.transport == Transport::kSharedMemory || (options.transport == Transport::kAuto && is_unix);
  if (shm && !is_unix) return error(GPUP_STATUS_NOT_SUPPORTED, "shared memory needs an AF_UNIX socket");
  const Deadline deadline(options.handshake_timeout_ms);

  wire::Hello hello;
  hello.transport = shm ? wire::kTransportShm : wire::kTransportStream;
  hello.ring_bytes = shm ? static_cast<uint32_t>(options.ring_bytes) : 0;
  uint8_t hbuf[wire::kHelloSize];
  wire::encode(hello, hbuf);
  if (Status st = internal::write_exact(sock, hbuf, sizeof hbuf, deadline); !st) {
    return Error(st.status(), "handshake: " + st.error().message);
  }

  uint8_t wbuf[wire::kWelcomeSize];
  std::vector<UniqueFd> fds;
  if (Status st = internal::read_exact(sock, wbuf, sizeof wbuf, deadline, &fds, wire::kShmFdCount); !st) {
    return Error(st.status(), "handshake: " + st.error().message);
  }
  const wire::Welcome w = wire::decode_welcome(wbuf);
  if (w.magic != wire::kWelcomeMagic) {
    return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: the server is not a gpup channel (bad magic)");
  }
  if (w.status == GPUP_STATUS_VERSION_MISMATCH || w.version != wire::kVersion) {
    return error(GPUP_STATUS_VERSION_MISMATCH, "handshake: the server speaks channel version " +
                                                   std::to_string(w.version) + ", we speak " +
                                                   std::to_string(wire::kVersion));
  }
  if (w.status != GPUP_STATUS_SUCCESS) {
    if (!fds.empty() || w.status > 0) return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: malformed refusal");
    return error(w.status, std::string("handshake: the server refused the channel: ") + gpup_status_message(w.status));
  }
  if (w.transport != hello.transport || w.reserved != 0) {
    return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: the server's answer does not match the request");
  }

  if (!shm) {
    if (w.fd_count != 0 || !fds.empty() || w.ring_bytes != 0) {
      return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: unexpected resources for a stream channel");
    }
    if (!is_unix) (void)set_nodelay(sock);
    return internal::make_stream_channel(std::move(socket), options);
  }

  if (w.fd_count != wire::kShmFdCount || fds.size() != wire::kShmFdCount) {
    return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: expected " + std::to_string(wire::kShmFdCount) +
                                                 " fds, the server announced " + std::to_string(w.fd_count) +
                                                 " and sent " + std::to_string(fds.size()));
  }
  if (w.ring_bytes != options.ring_bytes) {
    return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: asked for rings of " + std::to_string(options.ring_bytes) +
                                                 " bytes, the server declared " + std::to_string(w.ring_bytes));
  }
  const size_t ring_bytes = w.ring_bytes;
  const size_t size = wire::shm_size(ring_bytes);
  struct stat st {};
  if (::fstat(fds[0].get(), &st) != 0 || !S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) != size) {
    return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: the shared memory is not a " + std::to_string(size) +
                                                 "-byte file (size " + std::to_string(st.st_size) + ")");
  }
  const int seals = ::fcntl(fds[0].get(), F_GET_SEALS);
  if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW)) {
    return error(GPUP_STATUS_PROTOCOL_ERROR, "handshake: the shared memory is not sealed against resizing");
  }
  for (size_t i = 1; i < fds.size(); ++i) {
    if (Status s = check_eventfd(fds[i].get()); !s) return s.error();
  }
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fds[0].get(), 0);
  if (addr == MAP_FAILED) return error(errno_status(errno), errno_text("handshake: mmap", errno));
  internal::Mapping mapping(addr, size);
  Result<Ring> c2s = Ring::attach(ring_region(mapping, ring_bytes, 0));
  if (!c2s) return c2s.error();
  Result<Ring> s2c = Ring::attach(ring_region(mapping, ring_bytes, 1));
  if (!s2c) return s2c.error();

  internal::ShmParts parts;
  parts.socket = std::move(socket);
  parts.mapping = std::move(mapping);
  parts.tx = std::move(*c2s);
  parts.rx = std::move(*s2c);
  parts.tx_data = std::move(fds[1]);
  parts.tx_space = std::move(fds[2]);
  parts.rx_data = std::move(fds[3]);
  parts.rx_space = std::move(fds[4]);
  return internal::make_shm_channel(std::move(parts), options);
}

// ---- connect ----

Result<std::unique_ptr<Channel>> connect(const std::string& endpoint, const ChannelOptions& options) {
  if (Status st = internal::validate_options(options); !st) return st.error();
  const Deadline deadline(options.handshake_timeout_ms);
  UniqueFd sock;
  if (endpoint.rfind("tcp:", 0) == 0) {
    if (options.transport == Transport::kSharedMemory) {
      return error(GPUP_STATUS_NOT_SUPPORTED, "shared memory is not possible over TCP (" + endpoint + ")");
    }
    Result<ParsedHostPort> hp = parse_host_port(endpoint.substr(4));
    if (!hp) return hp.error();
    Result<AddrInfoPtr> ai = resolve(hp->host, hp->port, false);
    if (!ai) return ai.error();
    Error last(GPUP_STATUS_NOT_FOUND, "no address for " + endpoint);
    for (addrinfo* a = ai->get(); a != nullptr; a = a->ai_next) {
      Result<UniqueFd> s = make_socket(a->ai_family);
      if (!s) {
        last = s.error();
        continue;
      }
      Status st = connect_bounded(s->get(), a->ai_addr, a->ai_addrlen, deadline, endpoint);
      if (st) {
        sock = std::move(*s);
        break;
      }
      last = st.error();
    }
    if (!sock) return last;
  } else {
    std::string path;
    if (endpoint.rfind("unix:", 0) == 0) {
      path = endpoint.substr(5);
    } else if (!endpoint.empty() && endpoint.front() == '/') {
      path = endpoint;
    } else {
      return error(GPUP_STATUS_INVALID_PARAMETER,
                   "endpoint '" + endpoint + "' is neither unix:/path, /path nor tcp:HOST:PORT");
    }
    Result<sockaddr_un> addr = unix_address(path);
    if (!addr) return addr.error();
    Result<UniqueFd> s = make_socket(AF_UNIX);
    if (!s) return s.error();
    Status st =
        connect_bounded(s->get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(sockaddr_un), deadline, path);
    if (!st) return st.error();
    sock = std::move(*s);
  }
  ChannelOptions rest = options;
  rest.handshake_timeout_ms = std::max(1, deadline.poll_ms());
  return connect_on_socket(std::move(sock), rest);
}

// ---- Listener ----

Result<Listener> Listener::listen_unix(const std::string& path, const ChannelOptions& options) {
  if (Status st = internal::validate_options(options); !st) return st.error();
  Result<sockaddr_un> addr = unix_address(path);
  if (!addr) return addr.error();

  struct stat existing {};
  if (::lstat(path.c_str(), &existing) == 0) {
    if (!S_ISSOCK(existing.st_mode)) {
      return error(GPUP_STATUS_ALREADY_EXISTS, path + " exists and is not a socket; not replacing it");
    }
    // A socket file: live if something accepts connections on it, stale otherwise.
    Result<UniqueFd> probe = make_socket(AF_UNIX);
    if (!probe) return probe.error();
    const int rc = ::connect(probe->get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(sockaddr_un));
    const int err = errno;
    if (rc == 0 || err == EAGAIN || err == EINPROGRESS) {
      return error(GPUP_STATUS_ALREADY_EXISTS, "a server is already listening at " + path);
    }
    if (err == ECONNREFUSED) {
      if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
        return error(errno_status(errno), errno_text("removing stale socket " + path, errno));
      }
    }
  }

  Result<UniqueFd> s = make_socket(AF_UNIX);
  if (!s) return s.error();
  if (::bind(s->get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(sockaddr_un)) != 0) {
    return error(errno_status(errno), errno_text("bind " + path, errno));
  }
  if (::chmod(path.c_str(), 0660) != 0) return error(errno_status(errno), errno_text("chmod " + path, errno));
  if (::listen(s->get(), SOMAXCONN) != 0) return error(errno_status(errno), errno_text("listen " + path, errno));
  struct stat mine {};
  if (::stat(path.c_str(), &mine) != 0) return error(errno_status(errno), errno_text("stat " + path, errno));

  Listener l;
  l.fd_ = std::move(*s);
  l.is_unix_ = true;
  l.path_ = path;
  l.dev_ = mine.st_dev;
  l.ino_ = mine.st_ino;
  l.owner_pid_ = ::getpid();
  l.options_ = options;
  return l;
}

Result<Listener> Listener::listen_tcp(const std::string& host, uint16_t port, const ChannelOptions& options) {
  if (Status st = internal::validate_options(options); !st) return st.error();
  Result<AddrInfoPtr> ai = resolve(host, port, true);
  if (!ai) return ai.error();
  Error last(GPUP_STATUS_NOT_FOUND, "no address for " + host);
  for (addrinfo* a = ai->get(); a != nullptr; a = a->ai_next) {
    Result<UniqueFd> s = make_socket(a->ai_family);
    if (!s) {
      last = s.error();
      continue;
    }
    const int one = 1;
    (void)::setsockopt(s->get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(s->get(), a->ai_addr, a->ai_addrlen) != 0 || ::listen(s->get(), SOMAXCONN) != 0) {
      last = error(errno_status(errno), errno_text("listen on " + host + ":" + std::to_string(port), errno));
      continue;
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    if (::getsockname(s->get(), reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
      return error(errno_status(errno), errno_text("getsockname", errno));
    }
    Listener l;
    l.port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    l.fd_ = std::move(*s);
    l.options_ = options;
    return l;
  }
  return last;
}

Listener::Listener(Listener&& o) noexcept
    : fd_(std::move(o.fd_)),
      is_unix_(o.is_unix_),
      port_(o.port_),
      path_(std::move(o.path_)),
      dev_(o.dev_),
      ino_(o.ino_),
      owner_pid_(o.owner_pid_),
      options_(o.options_) {
  o.owner_pid_ = -1;
}

Listener& Listener::operator=(Listener&& o) noexcept {
  if (this != &o) {
    remove_socket_file();
    fd_ = std::move(o.fd_);
    is_unix_ = o.is_unix_;
    port_ = o.port_;
    path_ = std::move(o.path_);
    dev_ = o.dev_;
    ino_ = o.ino_;
    owner_pid_ = std::exchange(o.owner_pid_, -1);
    options_ = o.options_;
  }
  return *this;
}

Listener::~Listener() { remove_socket_file(); }

void Listener::remove_socket_file() {
  // Only the creating process removes the file, and only if it is still the one we bound (a new
  // server may have replaced it); a forked child's copy of the Listener leaves it alone.
  if (is_unix_ && fd_ && owner_pid_ == ::getpid()) {
    struct stat now {};
    if (::stat(path_.c_str(), &now) == 0 && now.st_dev == dev_ && now.st_ino == ino_) ::unlink(path_.c_str());
  }
  owner_pid_ = -1;
}

Result<std::unique_ptr<Channel>> Listener::accept(int timeout_ms) {
  if (!fd_) return error(GPUP_STATUS_INVALID_PARAMETER, "accept on a moved-from listener");
  const Deadline deadline(timeout_ms);
  for (;;) {
    const int fd = ::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      return accept_on_socket(UniqueFd(fd), options_);
    }
    const int err = errno;
    if (err == EINTR || err == ECONNABORTED) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      const int ev = internal::poll_one(fd_.get(), POLLIN, deadline);
      if (ev == 0) return Error(GPUP_STATUS_TIMEOUT, "no connection within " + std::to_string(timeout_ms) + " ms");
      if (ev < 0) return error(errno_status(errno), errno_text("accept: poll", errno));
      continue;
    }
    return error(errno_status(err), errno_text("accept", err));
  }
}

}  // namespace gpup::channel
