// A hostile guest for the end-to-end tests: it bypasses libgpupkmt and speaks the wire protocol
// directly over the channel, sending what a compromised guest could send. Every bad request must
// get the right error from the worker, and the connection must stay usable afterwards.
// Exit code 0 when every check held; each failed check prints "FAIL: ...".
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "channel/channel.h"
#include "gpup/kmd_opencl.h"
#include "gpup/kmt.h"
#include "protocol/codec.h"

using namespace gpup;
using namespace gpup::proto;

namespace {

int failures = 0;
std::unique_ptr<channel::Channel> ch;
uint64_t next_txn = 1;
int context_errors = 0;
gpup_status last_context_error = 0;

#define CHECK(cond, ...)                                \
  do {                                                  \
    if (!(cond)) {                                      \
      std::printf("FAIL: %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                         \
      std::printf("\n");                                \
      ++failures;                                       \
    }                                                   \
  } while (0)

struct Reply {
  i32 status = 0;
  std::vector<uint8_t> fixed, tail;
  std::string text() const { return std::string(tail.begin(), tail.end()); }
  template <typename T>
  T as() const {
    T v{};
    std::memcpy(&v, fixed.data(), std::min(sizeof v, fixed.size()));
    return v;
  }
};

// Reads until the reply to txn arrives; notifications on the way are counted.
Reply wait_reply(uint64_t txn) {
  std::vector<uint8_t> bytes;
  for (;;) {
    gpup_status st = ch->receive(bytes, 10000);
    if (st != GPUP_STATUS_SUCCESS) {
      std::printf("FAIL: no reply for txn %" PRIu64 ": %s\n", txn, gpup_status_name(st));
      std::exit(1);
    }
    auto m = decode(bytes, Direction::kHostToGuest);
    if (!m.ok()) {
      std::printf("FAIL: undecodable message from the host: %s\n", m.error().describe().c_str());
      std::exit(1);
    }
    if (m->op() == Op::ContextError) {
      ++context_errors;
      last_context_error = m->as<ContextErrorRequest>().status;
      continue;
    }
    if (!m->is_reply()) continue;
    if (m->header.txn != txn) continue;
    Reply r;
    r.status = m->header.status;
    r.fixed.assign(m->fixed.begin(), m->fixed.end());
    r.tail.assign(m->tail.begin(), m->tail.end());
    return r;
  }
}

template <typename Req>
Reply call(const Req& req, std::span<const uint8_t> tail = {}) {
  const uint64_t txn = next_txn++;
  auto enc = encode_request(req, txn, tail);
  if (!enc.ok()) {
    std::printf("FAIL: encode: %s\n", enc.error().describe().c_str());
    std::exit(1);
  }
  auto parts = enc->parts();
  ch->send(std::span<const std::span<const uint8_t>>(parts.data(), parts.size()));
  return wait_reply(txn);
}

void send_raw(const std::vector<uint8_t>& bytes) { ch->send(std::span<const uint8_t>(bytes)); }

}  // namespace

int main() {
  const char* vrd = std::getenv("GPUP_VRD");
  if (!vrd) {
    std::printf("FAIL: GPUP_VRD is not set\n");
    return 1;
  }
  auto c = channel::connect(vrd);
  if (!c.ok()) {
    std::printf("FAIL: connect: %s\n", c.error().describe().c_str());
    return 1;
  }
  ch = std::move(*c);

  // Requests before Hello end the connection; so Hello first.
  HelloRequest hello{1, kVersion, 0, 1, "hostile"};
  Reply r = call(hello);
  CHECK(r.status == 0 && r.tail.size() >= sizeof(AdapterDesc), "Hello: %d", r.status);
  AdapterDesc ad{};
  std::memcpy(&ad, r.tail.data(), sizeof ad);

  r = call(CreateDeviceRequest{ad.luid, 0, 0});
  CHECK(r.status == 0, "CreateDevice: %s", r.text().c_str());
  const uint32_t dev = r.as<CreateDeviceReply>().device;

  // Forged handle.
  r = call(DestroyDeviceRequest{0x7fff0040u, 0});
  CHECK(r.status == GPUP_STATUS_INVALID_HANDLE, "forged: %d %s", r.status, r.text().c_str());
  std::printf("FORGED %s: %s\n", gpup_status_name(r.status), r.text().c_str());
  // Wrong type: the device handle as an allocation.
  r = call(LockRequest{dev, dev});
  CHECK(r.status == GPUP_STATUS_OBJECT_TYPE_MISMATCH, "wrong type: %d %s", r.status, r.text().c_str());
  std::printf("WRONG-TYPE %s: %s\n", gpup_status_name(r.status), r.text().c_str());
  // Stale handle.
  r = call(CreateAllocationRequest{dev, GPUPKMT_ALLOCATION_CPU_VISIBLE, 8192, 0, 0});
  CHECK(r.status == 0, "CreateAllocation: %s", r.text().c_str());
  const uint32_t alloc = r.as<CreateAllocationReply>().allocation;
  r = call(CreateAllocationRequest{dev, GPUPKMT_ALLOCATION_CPU_VISIBLE, 4096, 0, 0});
  const uint32_t doomed = r.as<CreateAllocationReply>().allocation;
  CHECK(call(DestroyAllocationRequest{dev, doomed}).status == 0, "destroy");
  r = call(DestroyAllocationRequest{dev, doomed});
  CHECK(r.status == GPUP_STATUS_INVALID_HANDLE && r.text().find("stale") != std::string::npos, "stale: %d %s", r.status,
        r.text().c_str());
  std::printf("STALE %s: %s\n", gpup_status_name(r.status), r.text().c_str());
  // Overflowing offsets and sizes.
  r = call(ReadAllocationRequest{alloc, 4096, UINT64_MAX - 100});
  CHECK(r.status == GPUP_STATUS_OUT_OF_RANGE, "read overflow: %d %s", r.status, r.text().c_str());
  r = call(ReadAllocationRequest{alloc, 0x7fffffffu, 0});
  CHECK(GPUP_FAILED(r.status), "read of 2 GiB in one message");
  uint8_t data[16] = {};
  r = call(WriteAllocationRequest{alloc, 0, 8190}, data);
  CHECK(r.status == GPUP_STATUS_OUT_OF_RANGE, "write past the end: %d", r.status);
  auto va = call(ReserveGpuVaRequest{0, 8192}).as<ReserveGpuVaReply>().va;
  r = call(MapGpuVaRequest{alloc, 3, va, UINT64_MAX - 4095, 8192});
  CHECK(GPUP_FAILED(r.status), "overflowing map offset accepted");
  r = call(MapGpuVaRequest{alloc, 3, va, 0, UINT64_MAX - 4095});
  CHECK(GPUP_FAILED(r.status), "overflowing map size accepted");
  r = call(CreateAllocationRequest{dev, 0, UINT64_MAX, 0, 0});
  CHECK(GPUP_FAILED(r.status), "2^64-1 byte allocation accepted");
  std::printf("OVERFLOWS refused\n");

  // A truncated message whose header is intact gets PROTOCOL_ERROR.
  {
    auto enc = encode_request(CreateContextRequest{dev, 0, 0, 0}, next_txn++);
    auto bytes = enc->flatten();
    bytes.resize(bytes.size() - 8);
    uint32_t sz = static_cast<uint32_t>(bytes.size());
    std::memcpy(bytes.data(), &sz, 4);
    send_raw(bytes);
    r = wait_reply(enc->header.txn);
    CHECK(r.status == GPUP_STATUS_PROTOCOL_ERROR, "truncated: %d", r.status);
    std::printf("TRUNCATED %s: %s\n", gpup_status_name(r.status), r.text().c_str());
  }
  // Unknown opcodes and garbage are dropped; the connection stays up.
  send_raw(std::vector<uint8_t>(64, 0xee));
  {
    MessageHeader h{sizeof(MessageHeader), 999, 0, next_txn++, 0, 0};
    std::vector<uint8_t> b(sizeof h);
    std::memcpy(b.data(), &h, sizeof h);
    send_raw(b);
  }
  r = call(QueryStatisticsRequest{GPUPKMT_QUERYSTATISTICS_PROCESS, 0});
  CHECK(r.status == 0, "connection unusable after garbage");

  // A garbage command buffer faults only the context it was sent on.
  r = call(CreateContextRequest{dev, 0, 0, 0});
  const uint32_t ctx = r.as<CreateContextReply>().context;
  {
    std::vector<uint8_t> junk(256);
    for (size_t i = 0; i < junk.size(); ++i) junk[i] = static_cast<uint8_t>(i * 37);
    auto enc = encode_request(SubmitCommandRequest{ctx, 0, 1}, 0, junk);
    auto parts = enc->parts();
    ch->send(std::span<const std::span<const uint8_t>>(parts.data(), parts.size()));
    r = call(GetDeviceStateRequest{dev, 0});  // the ContextError arrives before this reply
    CHECK(context_errors == 1 && last_context_error == GPUP_STATUS_PROTOCOL_ERROR, "garbage submit: %d errors, last %d",
          context_errors, last_context_error);
    CHECK(r.as<GetDeviceStateReply>().state == GPUPKMT_DEVICESTATE_RESET, "device state after the fault");
    std::printf("GARBAGE-SUBMIT %s\n", gpup_status_name(last_context_error));
  }

  // Shared sections: fds that are not sealed memfds of the declared size, and references outside
  // them, are refused; nothing about the connection changes.
  if (ch->shares_memory()) {
    auto memfd = [](uint64_t size, int seals) {
      int fd = memfd_create("hostile-section", MFD_CLOEXEC | MFD_ALLOW_SEALING);
      if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0) std::exit(1);
      if (seals && fcntl(fd, F_ADD_SEALS, seals) != 0) std::exit(1);
      return fd;
    };
    const int sealed = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    uint64_t fd_id = 1000;
    // A RegisterSection whose fd never comes.
    r = call(RegisterSectionRequest{fd_id++, 4096});
    CHECK(r.status == GPUP_STATUS_INVALID_PARAMETER, "register without an fd: %d %s", r.status, r.text().c_str());
    std::printf("SECTION-NO-FD %s: %s\n", gpup_status_name(r.status), r.text().c_str());
    // A pipe instead of a memfd.
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) std::exit(1);
    ch->send_fd(fd_id, p[0]);
    r = call(RegisterSectionRequest{fd_id++, 4096});
    close(p[0]);
    close(p[1]);
    CHECK(r.status == GPUP_STATUS_INVALID_PARAMETER, "pipe as a section: %d %s", r.status, r.text().c_str());
    std::printf("SECTION-BAD-FD %s: %s\n", gpup_status_name(r.status), r.text().c_str());
    // An unsealed memfd: we could shrink it under the host's mapping.
    int fd = memfd(4096, 0);
    ch->send_fd(fd_id, fd);
    r = call(RegisterSectionRequest{fd_id++, 4096});
    close(fd);
    CHECK(r.status == GPUP_STATUS_INVALID_PARAMETER && r.text().find("not sealed") != std::string::npos,
          "unsealed memfd: %d %s", r.status, r.text().c_str());
    std::printf("SECTION-UNSEALED %s: %s\n", gpup_status_name(r.status), r.text().c_str());
    // Sealed, but smaller than declared.
    fd = memfd(4096, sealed);
    ch->send_fd(fd_id, fd);
    r = call(RegisterSectionRequest{fd_id++, 1 << 20});
    close(fd);
    CHECK(r.status == GPUP_STATUS_INVALID_PARAMETER, "short memfd: %d %s", r.status, r.text().c_str());
    // A proper one, then references outside it.
    fd = memfd(64 << 10, sealed);
    CHECK(ftruncate(fd, 0) != 0, "a sealed section could be truncated");
    ch->send_fd(fd_id, fd);
    r = call(RegisterSectionRequest{fd_id++, 64 << 10});
    CHECK(r.status == 0, "proper section refused: %d %s", r.status, r.text().c_str());
    const uint32_t sec = r.as<RegisterSectionReply>().section;
    auto* map = static_cast<uint8_t*>(mmap(nullptr, 64 << 10, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    close(fd);
    if (map == MAP_FAILED) std::exit(1);
    GPUP_OCL_PRIVATE_HEADER hdr{GPUP_OCL_ESCAPE_MAGIC, GPUP_OCL_ESCAPE_CHECKSUM};
    std::memcpy(map, &hdr, sizeof hdr);
    auto escape = [&](SectionRef priv, SectionRef out) {
      EscapeRequest e{ad.luid, 0, 0, 0, 0};
      e.private_data = priv;
      e.output = out;
      return call(e);
    };
    const SectionRef out_ok{sec, 64, 32 << 10};
    r = escape({sec, 16, (64 << 10) - 8}, out_ok);
    CHECK(r.status == GPUP_STATUS_OUT_OF_RANGE, "private data past the end: %d %s", r.status, r.text().c_str());
    r = escape({sec, 16, UINT64_MAX - 7}, out_ok);
    CHECK(r.status == GPUP_STATUS_OUT_OF_RANGE, "overflowing offset: %d %s", r.status, r.text().c_str());
    r = escape({sec, 8, 0}, {sec, 0xffffffffu, 0});
    CHECK(GPUP_FAILED(r.status), "4 GiB output capacity accepted");
    r = escape({sec, 8, 0}, {sec, 64, (64 << 10) - 32});
    CHECK(r.status == GPUP_STATUS_OUT_OF_RANGE, "output past the end: %d %s", r.status, r.text().c_str());
    r = escape({dev, 8, 0}, out_ok);
    CHECK(r.status == GPUP_STATUS_OBJECT_TYPE_MISMATCH, "device as a section: %d %s", r.status, r.text().c_str());
    r = escape({0x7fff0040u, 8, 0}, out_ok);
    CHECK(r.status == GPUP_STATUS_INVALID_HANDLE, "forged section: %d %s", r.status, r.text().c_str());
    std::printf("SECTION-RANGES refused: %s\n", r.text().c_str());
    // The good reference works: the KMD's checksum of the empty payload lands in the section.
    r = escape({sec, 8, 0}, out_ok);
    CHECK(r.status == 0 && r.as<EscapeReply>().written == sizeof(GPUP_OCL_ESCAPE_CHECKSUM_OUT), "valid escape: %d %s",
          r.status, r.text().c_str());
    GPUP_OCL_ESCAPE_CHECKSUM_OUT sum{};
    std::memcpy(&sum, map + (32 << 10), sizeof sum);
    CHECK(sum.ByteCount == 0 && sum.Fnv1a64 == GPUP_OCL_FNV1A64_OFFSET, "checksum output %" PRIu64, sum.ByteCount);
    // Unregistered: stale from then on.
    CHECK(call(UnregisterSectionRequest{sec, 0}).status == 0, "unregister");
    r = escape({sec, 8, 0}, out_ok);
    CHECK(r.status == GPUP_STATUS_INVALID_HANDLE, "stale section: %d %s", r.status, r.text().c_str());
    munmap(map, 64 << 10);
    // Section floods hit the per-process limit.
    int sections = 0;
    for (; sections < 100; ++sections) {
      fd = memfd(4096, sealed);
      ch->send_fd(fd_id, fd);
      r = call(RegisterSectionRequest{fd_id++, 4096});
      close(fd);
      if (r.status != 0) break;
    }
    CHECK(r.status == GPUP_STATUS_QUOTA_EXCEEDED && sections == 64, "section flood: %d after %d", r.status, sections);
    std::printf("SECTIONS %d registered, then %s; all abuse refused\n", sections, gpup_status_name(r.status));
  }

  // Floods hit limits with a clear error, not exhaustion.
  int created = 0;
  for (; created < 10000; ++created) {
    r = call(CreateSyncObjectRequest{dev, GPUPKMT_SYNCOBJECT_MONITORED_FENCE, 0});
    if (r.status != 0) break;
  }
  CHECK(r.status == GPUP_STATUS_QUOTA_EXCEEDED, "sync object flood ended with %d after %d", r.status, created);
  std::printf("FLOOD %d sync objects, then %s: %s\n", created, gpup_status_name(r.status), r.text().c_str());

  r = call(QueryStatisticsRequest{GPUPKMT_QUERYSTATISTICS_PROCESS, 0});
  CHECK(r.status == 0, "statistics after the flood");
  std::printf("%s\n", failures ? "HOSTILE checks failed" : "HOSTILE all refused, connection intact");
  return failures ? 1 : 0;
}
