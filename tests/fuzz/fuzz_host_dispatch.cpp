// libFuzzer target: arbitrary bytes into the worker's decoder and dispatch, as a hostile guest
// would send them, with the mock KMD behind. Each input is one guest process: a valid Hello,
// then a sequence of messages, then a disconnect, after which the worker must be back to zero
// objects and zero bytes of device memory (anything else is a leak and aborts).
//
// Input: chunks of [u16 length][chunk]. A chunk whose first byte is odd is sent raw; otherwise
// the byte picks a message type and the rest fills its fixed part and tail behind a well-formed
// header, so the fuzzer reaches the handlers rather than only the header checks.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "host/vmwp/worker.h"

using namespace gpup;
using namespace gpup::proto;

namespace {

// No real fds arrive from a fuzzer, so the link makes one from the RegisterSection's fd id:
// bits 0-5 give the size in pages (0: no fd arrives), bit 6 leaves it unsealed, bit 7 makes it
// one page shorter than 4096 * pages, bit 8 makes it a pipe. The worker's checks (seals, size,
// kind of file) and every handler that reads or writes sections are reached this way.
class NullLink : public vmwp::GuestLink {
 public:
  gpup_status send(const Encoded&) override { return GPUP_STATUS_SUCCESS; }
  gpup_status send_fd(uint64_t, int) override { return GPUP_STATUS_SUCCESS; }
  gpup_status receive_fd(uint64_t id, UniqueFd& out, int) override {
    const uint64_t pages = id & 63;
    if (pages == 0) return GPUP_STATUS_TIMEOUT;
    if (id & 256) {
      int p[2];
      if (pipe2(p, O_CLOEXEC) != 0) return GPUP_STATUS_NO_MEMORY;
      close(p[1]);
      out.reset(p[0]);
      return GPUP_STATUS_SUCCESS;
    }
    UniqueFd fd(memfd_create("fuzz-section", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    const uint64_t size = (pages - ((id & 128) ? 1 : 0)) * 4096;
    if (!fd || ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return GPUP_STATUS_NO_MEMORY;
    if (!(id & 64) && fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
      return GPUP_STATUS_NO_MEMORY;
    out = std::move(fd);
    return GPUP_STATUS_SUCCESS;
  }
  bool shares_memory() const override { return shares_; }
  bool shares_ = true;
};

vmwp::Worker* worker() {
  static vmwp::Worker* w = [] {
    setenv("GPUP_KMD_PATH", GPUP_FUZZ_KMD_DIR, 0);
    vmwp::WorkerConfig c;
    c.vm_name = "fuzz";
    c.adapter_name = "mock0";
    c.adapter_luid = 0x1234;
    c.kmd = "mock";
    c.max_vram = 256 << 20;
    auto* wk = new vmwp::Worker(c);
    auto s = wk->start();
    if (!s.ok()) {
      fprintf(stderr, "fuzz: worker start failed: %s\n", s.error().describe().c_str());
      abort();
    }
    return wk;
  }();
  return w;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  vmwp::Worker* w = worker();
  auto link = std::make_unique<NullLink>();
  if (size > 0) link->shares_ = data[0] & 1;
  auto p = w->connect(std::move(link));
  HelloRequest hello{1, kVersion, 0, 1, "fuzz"};
  auto enc = encode_request(hello, 1);
  auto hb = enc->flatten();
  if (!p->handle(hb).ok()) abort();

  size_t nops = 0;
  const OpInfo* ops = all_ops(&nops);
  uint64_t txn = 2;
  size_t pos = 1;
  while (pos + 2 <= size) {
    uint16_t len;
    std::memcpy(&len, data + pos, 2);
    pos += 2;
    len = static_cast<uint16_t>(std::min<size_t>(len, size - pos));
    const uint8_t* chunk = data + pos;
    pos += len;
    if (len == 0) continue;
    std::vector<uint8_t> msg;
    if (chunk[0] & 1) {
      msg.assign(chunk + 1, chunk + len);
    } else {
      const OpInfo& op = ops[(chunk[0] >> 1) % nops];
      const size_t body = len - 1;
      std::vector<uint8_t> fixed(op.request_size, 0);
      std::memcpy(fixed.data(), chunk + 1, std::min(body, fixed.size()));
      std::span<const uint8_t> tail;
      if (op.request_tail && body > fixed.size()) tail = {chunk + 1 + fixed.size(), body - fixed.size()};
      auto e = encode_raw(op.op, 0, op.kind == Kind::SYNC ? txn++ : 0, 0, fixed, true, tail);
      if (!e.ok()) continue;
      msg = e->flatten();
    }
    if (!p->handle(msg).ok()) break;  // the worker dropped the connection
  }
  w->disconnect(p);
  auto t = w->totals();
  if (t.devices || t.contexts || t.allocations || t.sync_objects || t.vram_used || t.processes || t.sections) {
    fprintf(stderr, "fuzz: leak after disconnect: devices=%u contexts=%u allocations=%u syncs=%u vram=%lu processes=%u\n",
            t.devices, t.contexts, t.allocations, t.sync_objects, static_cast<unsigned long>(t.vram_used), t.processes);
    abort();
  }
  return 0;
}
