#include "host/vmwp/worker.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "common/units.h"
#include "gpup/kmt.h"
#include "protocol/fence_page.h"

namespace gpup::vmwp {

using namespace gpup::proto;

// ----------------------------------------------------------------------------------------------
// Objects

const char* object_type_name(ObjectType t) {
  switch (t) {
    case ObjectType::Free: return "free slot";
    case ObjectType::Device: return "device";
    case ObjectType::Allocation: return "allocation";
    case ObjectType::Context: return "context";
    case ObjectType::SyncObject: return "synchronization object";
    case ObjectType::Section: return "section";
  }
  return "object";
}

namespace {

constexpr uint32_t kMaxPrivateData = 64 * 1024;
constexpr uint32_t kMaxOutputData = kMaxInlineOutput;
// How long RegisterSection waits for its fd. The guest passes the fd before it sends the request,
// so it is normally there already; the wait runs without Worker::mu_ held.
constexpr int kSectionFdTimeoutMs = 2000;
static_assert(kMaxBulkDataSize == GPUPKMT_MAX_PRIVATE_DATA_SIZE && kMaxBulkDataSize == GPUPKMT_MAX_OUTPUT_DATA_SIZE,
              "gpup/kmt.h states the bulk data limits");
constexpr size_t kMaxCpuWaits = 4096;
// How long a holder asked to yield stays idle, waiting for its guest's next work, before it gives
// the device back (Worker::maybe_release_locked): four times the partition's usual gap between
// its work completing and more arriving (the guest reading results: tens of microseconds on a
// shared-memory channel, a network round trip on a stream one), within these bounds.
constexpr std::chrono::microseconds kMinIdleGrace{500}, kMaxIdleGrace{5000};
constexpr uint32_t kDeviceStateNormal = GPUPKMT_DEVICESTATE_NORMAL;
constexpr uint32_t kDeviceStateReset = GPUPKMT_DEVICESTATE_RESET;

bool add_overflows(uint64_t a, uint64_t b) { return a + b < a; }

}  // namespace

struct Device : Object {
  static constexpr ObjectType kType = ObjectType::Device;
  Device() : Object(kType) {}
  GPUPDDI_HANDLE kmd = nullptr;
  std::set<std::shared_ptr<Context>> contexts;
  std::set<std::shared_ptr<Allocation>> allocations;
  std::set<std::shared_ptr<SyncObject>> syncs;
  uint32_t state = kDeviceStateNormal;
  gpup_status reason = GPUP_STATUS_SUCCESS;
};

// Freed when the last reference goes: the handle table, a VA mapping, or a submission in flight.
// Its destructor returns the device memory, so memory in use by the device is never reused early.
struct Allocation : Object {
  static constexpr ObjectType kType = ObjectType::Allocation;
  Allocation() : Object(kType) {}
  ~Allocation() override {
    if (kmd && ddi) ddi->Memory.pfnDestroyAllocation(device_kmd, kmd);
    if (backing) munmap(backing, backing_size);
    if (vm_vram) *vm_vram -= charged;
    if (proc_vram) *proc_vram -= charged;
  }
  const GPUPDDI_DRIVER_FUNCS* ddi = nullptr;
  const Device* device = nullptr;
  GPUPDDI_HANDLE device_kmd = nullptr;
  GPUPDDI_HANDLE kmd = nullptr;
  uint64_t size = 0;
  uint32_t flags = 0;
  UniqueFd memfd;
  void* backing = nullptr;
  size_t backing_size = 0;
  uint32_t locks = 0;
  uint64_t section = 0;
  uint64_t charged = 0;
  uint64_t* vm_vram = nullptr;
  uint64_t* proc_vram = nullptr;
  bool program() const { return flags & GPUPKMT_ALLOCATION_PROGRAM; }
};

// Guest-owned shared memory (RegisterSection): the guest's sealed memfd, mapped here. Only
// handlers touch it, with Worker::mu_ held, so it is never unmapped under a user.
struct Section : Object {
  static constexpr ObjectType kType = ObjectType::Section;
  Section() : Object(kType) {}
  ~Section() override {
    if (map) munmap(map, size);
  }
  uint8_t* map = nullptr;
  uint64_t size = 0;
};

struct SyncObject : Object {
  static constexpr ObjectType kType = ObjectType::SyncObject;
  SyncObject() : Object(kType) {}
  Device* device = nullptr;
  GuestProcess* process = nullptr;
  uint64_t value = 0;
  uint32_t slot = 0;
  struct CpuWait {
    uint64_t event_id, value;
  };
  std::vector<CpuWait> waits;
};

// One decoded hardware command with everything it points to owned here, so it can wait in a
// context queue behind a GPU wait and still be valid when it reaches the KMD.
struct OwnedCommand {
  GPUPDDI_COMMAND cmd{};
  std::string kernel;
  std::vector<GPUPDDI_KERNEL_ARG> args;
  std::vector<std::vector<uint8_t>> values;
};

struct Batch {
  std::vector<OwnedCommand> commands;
  std::vector<std::shared_ptr<Allocation>> refs;  // keeps every allocation used alive
  uint64_t guest_submission = 0;
};

struct Context : Object {
  static constexpr ObjectType kType = ObjectType::Context;
  Context() : Object(kType) {}
  struct Cookie {
    Worker* worker;
    uint64_t id;
  } cookie{};
  Device* device = nullptr;
  GuestProcess* process = nullptr;
  GPUPDDI_HANDLE kmd = nullptr;
  struct Item {
    enum Kind { kSubmit, kSignal, kWait } kind;
    std::shared_ptr<Batch> batch;
    std::shared_ptr<SyncObject> sync;
    uint64_t value = 0;
  };
  std::deque<Item> queue;
  std::map<uint64_t, std::shared_ptr<Batch>> inflight;  // by KMD submission id
  bool faulted = false;
  int32_t priority = 0;  // -2..2: which of the partition's contexts enters the device first
  uint64_t watched = 0;   // the submission the TDR watchdog times: the oldest in flight (0: none)
};

// ----------------------------------------------------------------------------------------------
// Configuration

std::string guid_to_string(const GPUPDDI_GUID& g) {
  const uint8_t* b = g.Bytes;
  return fmt::format("{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                     b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

WorkerConfig worker_config(const control::ConfigureMessage& m) {
  WorkerConfig c;
  c.vm_name = m.vm.name;
  if (auto guid = control::parse_guid(m.vm.guid)) std::memcpy(c.vm_guid.Bytes, guid->data(), sizeof c.vm_guid.Bytes);
  c.min_vram = m.vm.min_vram;
  c.max_vram = m.vm.max_vram;
  c.optimal_vram = m.vm.optimal_vram;
  c.compute_weight = m.vm.compute_weight;
  c.max_compute = m.vm.max_compute;
  c.secure = m.vm.secure;
  c.tdr_delay_ms = m.tdr_delay_ms;
  c.build_timeout_s = m.vm.build_timeout_s;
  c.adapter_name = m.adapter.name;
  c.adapter_luid = m.adapter.luid;
  c.kmd = m.adapter.kmd;
  c.kmd_config = m.adapter.config;
  return c;
}

// ----------------------------------------------------------------------------------------------
// Fence page

Status FencePage::create() {
  size_ = sizeof(FencePageHeader) + sizeof(uint64_t) * kSlots;
  fd_.reset(memfd_create("gpup-fence-page", MFD_CLOEXEC));
  if (!fd_ || ftruncate(fd_.get(), static_cast<off_t>(size_)) != 0)
    return Error(GPUP_STATUS_NO_MEMORY, fmt::format("fence page: {}", std::strerror(errno)));
  map_ = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    return Error(GPUP_STATUS_NO_MEMORY, fmt::format("fence page mmap: {}", std::strerror(errno)));
  }
  FencePageHeader h{kFencePageMagic, kSlots, 1, 0};
  std::memcpy(map_, &h, sizeof h);
  return {};
}

void FencePage::set(uint32_t slot, uint64_t value) {
  if (!map_ || slot >= kSlots) return;
  auto* values = reinterpret_cast<uint64_t*>(static_cast<char*>(map_) + sizeof(FencePageHeader));
  std::atomic_ref<uint64_t>(values[slot]).store(value, std::memory_order_release);
  if (shared_) proto::wake_fence_sleepers(&values[slot]);  // guest threads may sleep on the slot
}

void FencePage::bump_state_counter(uint32_t counter) {
  if (!map_) return;
  auto* h = static_cast<FencePageHeader*>(map_);
  std::atomic_ref<uint32_t>(h->device_state_counter).store(counter, std::memory_order_release);
}

FencePage::~FencePage() {
  if (map_) munmap(map_, size_);
}

// ----------------------------------------------------------------------------------------------
// Guest process: decode, validate, dispatch

GuestProcess::GuestProcess(Worker& worker, std::unique_ptr<GuestLink> link, uint64_t id)
    : w_(worker), link_(std::move(link)), id_(id), fence_slots_used_(FencePage::kSlots, false) {
  // The page-table shape the KMD reported (Worker::start refused the adapter if it is inconsistent).
  if (auto mmu = MmuLayout::from_kmd(w_.caps_.mmu, w_.caps_.levels); mmu.ok()) va_ = VaSpace(std::move(*mmu));
}

GuestProcess::~GuestProcess() = default;

void GuestProcess::notify(Op op, const void* fixed, size_t size, std::span<const uint8_t> tail) {
  const OpInfo* info = find_op(static_cast<uint16_t>(op));
  auto enc = encode_raw(op, 0, 0, 0, {static_cast<const uint8_t*>(fixed), size}, info && info->request_tail, tail);
  if (!enc.ok()) return;
  // Sent with Worker::mu_ held. A guest that stops reading its ring can stall this send once the
  // ring is full; that delays only this VM's worker (never another partition), and the guest's
  // death releases it (the channel reports CONNECTION_LOST).
  (void)link_->send(*enc);
}

Status GuestProcess::check_adapter(uint64_t luid) const {
  if (luid != w_.config_.adapter_luid)
    return Error(GPUP_STATUS_NOT_FOUND, fmt::format("adapter LUID {:#x} is not an adapter of this VM", luid));
  return {};
}

Status GuestProcess::handle(std::span<const uint8_t> bytes) {
  auto dec = decode(bytes, Direction::kGuestToHost);
  // RegisterSection's fd travels beside the message: collect it before taking the object lock, so
  // waiting for it (a guest that never sends it) holds up nobody but this connection.
  UniqueFd fd;
  gpup_status fd_status = GPUP_STATUS_SUCCESS;
  std::string fd_error;
  if (dec.ok() && dec->op() == Op::RegisterSection && link_->shares_memory()) {
    const uint64_t id = dec->as<RegisterSectionRequest>().fd_id;
    fd_status = link_->receive_fd(id, fd, kSectionFdTimeoutMs);
    if (fd_status != GPUP_STATUS_SUCCESS) {
      fd_error = fd_status == GPUP_STATUS_TIMEOUT
                     ? fmt::format("no file descriptor with id {} arrived within {} ms (pass it with send_fd before the request)",
                                   id, kSectionFdTimeoutMs)
                     : fmt::format("receiving the file descriptor with id {} failed: {}", id, gpup_status_message(fd_status));
      if (fd_status == GPUP_STATUS_TIMEOUT) fd_status = GPUP_STATUS_INVALID_PARAMETER;
    }
  }
  // Device memory above the partition's min is asked of gpupd here too, without the object lock
  // (the control loop that carries gpupd's answer takes that lock for stats).
  uint64_t vram_pending = 0;
  std::string vram_refusal;
  if (dec.ok() && dec->op() == Op::CreateAllocation && hello_done_) {
    const auto& req = dec->as<CreateAllocationRequest>();
    if (!(req.flags & GPUPKMT_ALLOCATION_PROGRAM)) vram_pending = w_.reserve_vram(req.size, &vram_refusal);
  } else if (dec.ok() && dec->op() == Op::QueryVideoMemoryInfo && hello_done_) {
    w_.refresh_vram();
  }
  std::lock_guard lock(w_.mu_);
  w_.vram_pending_ -= vram_pending;  // from here the handler charges it, under this lock
  vram_refusal_ = std::move(vram_refusal);
  incoming_fd_ = std::move(fd);
  incoming_fd_status_ = fd_status;
  incoming_fd_error_ = std::move(fd_error);
  if (closed_) return Error(GPUP_STATUS_CONNECTION_LOST, "process closed");
  if (!dec.ok()) {
    // Reply when the header names a sync request we can answer; otherwise log (rate-limited).
    MessageHeader h{};
    if (bytes.size() >= sizeof h) std::memcpy(&h, bytes.data(), sizeof h);
    const OpInfo* info = find_op(h.op);
    if (!hello_done_) return Error(GPUP_STATUS_PROTOCOL_ERROR, "first message is not a valid Hello: " + dec.error().message);
    if (info && info->kind == Kind::SYNC && h.txn != 0 && !(h.flags & kFlagReply)) {
      (void)link_->send(encode_error_reply(info->op, h.txn, dec.error().status, dec.error().message));
    } else if (unknown_ops_logged_ < 16) {
      ++unknown_ops_logged_;
      spdlog::warn("process {} ({}): dropped message: {}", pid_, name_, dec.error().message);
    }
    return {};
  }
  const Message& m = *dec;
  if (!hello_done_) {
    if (m.op() != Op::Hello) return Error(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("first message is {}, not Hello", m.info->name));
    return on_hello(m);
  }
  if (m.info->kind == Kind::ASYNC) {
    on_async(m);
    return {};
  }
  auto r = on_sync(m);
  if (!r.ok()) {
    (void)link_->send(encode_error_reply(m.op(), m.header.txn, r.error().status, r.error().message));
    return {};
  }
  send_reply(m, *r);
  return {};
}

void GuestProcess::send_reply(const Message& m, const Reply& r) {
  auto enc = encode_raw(m.op(), kFlagReply, m.header.txn, r.status, r.fixed, m.info->reply_tail, r.tail);
  if (!enc.ok()) {
    (void)link_->send(encode_error_reply(m.op(), m.header.txn, enc.error().status, enc.error().message));
    return;
  }
  (void)link_->send(*enc);
}

Status GuestProcess::on_hello(const Message& m) {
  auto req = m.as<HelloRequest>();
  auto refuse = [&](gpup_status st, std::string why) -> Status {
    (void)link_->send(encode_error_reply(Op::Hello, m.header.txn, st, why));
    return Error(st, why);
  };
  if (req.version_min > req.version_max || req.version_min > kVersion || req.version_max < kLastCompatibleVersion)
    return refuse(GPUP_STATUS_VERSION_MISMATCH,
                  fmt::format("guest speaks protocol versions {}..{}, this host speaks {}..{}", req.version_min,
                              req.version_max, kLastCompatibleVersion, kVersion));
  version_ = std::min(req.version_max, kVersion);
  // The kernel's word (SO_PEERCRED, in this worker's pid namespace) over the guest's: a sandboxed
  // guest is pid 2 of its own namespace. Remote guests (TCP) have only their claim.
  pid_ = link_->peer_pid() > 0 ? static_cast<uint32_t>(link_->peer_pid()) : req.pid;
  size_t n = strnlen(req.process_name, sizeof req.process_name);
  for (size_t i = 0; i < n; ++i) {
    char c = req.process_name[i];
    name_ += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  if (name_.empty()) name_ = "guest";

  GPUPDDI_ARG_CREATEPROCESS cp{};
  cp.struct_size = sizeof cp;
  cp.Flags.VirtualMachineProcess = 1;
  cp.hDxgkProcess = this;
  cp.hKmdVmWorkerProcess = w_.kmd_worker_process_;
  cp.ProcessId = pid_;
  cp.ProcessNameLength = static_cast<uint32_t>(name_.size());
  cp.pProcessName = name_.c_str();
  gpup_status st = w_.driver_->ddi().Process.pfnCreateProcess(w_.adapter_, &cp);
  if (GPUP_FAILED(st)) return refuse(st, fmt::format("KMD CreateProcess failed: {}", gpup_status_message(st)));
  kmd_process_ = cp.hKmdProcess;

  if (auto s = fence_page_.create(); !s.ok()) return refuse(s.status(), s.error().message);
  uint64_t fence_section = 0;
  if (link_->shares_memory()) {
    // The guest gets a read-only view: reopen the memfd O_RDONLY so it cannot map it writable.
    UniqueFd ro(::open(fmt::format("/proc/self/fd/{}", fence_page_.fd()).c_str(), O_RDONLY | O_CLOEXEC));
    if (!ro) return refuse(GPUP_STATUS_INTERNAL, fmt::format("fence page reopen: {}", std::strerror(errno)));
    fence_section = 1;
    if (GPUP_FAILED(link_->send_fd(fence_section, ro.get())))
      return Error(GPUP_STATUS_CONNECTION_LOST, "guest went away during Hello");
    fence_page_.shared_with_guest();
  }
  fence_page_.bump_state_counter(w_.state_counter_);

  AdapterDesc ad{};
  ad.luid = w_.config_.adapter_luid;
  ad.flags = GPUPKMT_ADAPTERFLAG_PARAVIRTUALIZED | GPUPKMT_ADAPTERFLAG_COMPUTE_ONLY |
             (w_.config_.secure ? GPUPKMT_ADAPTERFLAG_SECURE_VM : 0);
  ad.budget = w_.config_.max_vram;
  auto desc = fmt::format("gpup partition {} on {}", w_.config_.vm_name, w_.caps_.info.Name);
  std::strncpy(ad.description, desc.c_str(), sizeof ad.description - 1);

  HelloReply rep{};
  rep.version = version_;
  rep.adapter_count = 1;
  rep.fence_slots = FencePage::kSlots;
  rep.max_message_size = kMaxMessageSize;
  rep.fence_section = fence_section;
  std::vector<uint8_t> tail(reinterpret_cast<uint8_t*>(&ad), reinterpret_cast<uint8_t*>(&ad) + sizeof ad);
  hello_done_ = true;
  send_reply(m, reply(rep, std::move(tail)));
  spdlog::info("guest process {} '{}' connected (protocol v{}, {} transport)", pid_, name_, version_,
               link_->shares_memory() ? "shared-memory" : "stream");
  return {};
}

// The four Destroy* requests: look the handle up as its type, destroy it with its children, and
// answer with an empty reply (every Destroy*Reply is a single pad word).
template <typename T>
Result<GuestProcess::Reply> GuestProcess::destroy_object(uint32_t handle, void (GuestProcess::*destroy)(const std::shared_ptr<T>&)) {
  static_assert(sizeof(DestroyDeviceReply) == sizeof(u32) && sizeof(DestroyContextReply) == sizeof(u32) &&
                sizeof(DestroyAllocationReply) == sizeof(u32) && sizeof(DestroySyncObjectReply) == sizeof(u32));
  auto obj = handles_.get<T>(handle, T::kType);
  if (!obj.ok()) return obj.error();
  (this->*destroy)(*obj);
  return reply(u32{0});
}

Result<GuestProcess::Reply> GuestProcess::on_sync(const Message& m) {
  const auto& ddi = w_.driver_->ddi();
  switch (m.op()) {
    case Op::Hello:
      return Error(GPUP_STATUS_PROTOCOL_ERROR, "Hello sent twice");

    case Op::QueryAdapterInfo: {
      auto req = m.as<QueryAdapterInfoRequest>();
      if (auto s = check_adapter(req.adapter_luid); !s.ok()) return s.error();
      switch (req.type) {
        case GPUPDDI_QAITYPE_UMDRIVERPRIVATE: case GPUPDDI_QAITYPE_DRIVERCAPS: case GPUPDDI_QAITYPE_QUERYSEGMENT:
        case GPUPDDI_QAITYPE_DEVICEINFO: case GPUPDDI_QAITYPE_GPUMMUCAPS: case GPUPDDI_QAITYPE_PAGETABLELEVELDESC:
        case GPUPDDI_QAITYPE_GPUPCAPS:
          break;
        default:
          return Error(GPUP_STATUS_NOT_SUPPORTED, fmt::format("query type {} is not available to a VM", req.type));
      }
      const size_t room = max_tail(Op::QueryAdapterInfo, true);
      if (req.output_size > kMaxOutputData || req.output_size > room)
        return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("output size {} exceeds {}", req.output_size, std::min<size_t>(kMaxOutputData, room)));
      if (m.tail.size() > kMaxPrivateData)
        return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("query input of {} bytes", m.tail.size()));
      std::vector<uint8_t> out(req.output_size);
      uint32_t written = 0;
      GPUPDDI_ARG_QUERYADAPTERINFO q{};
      q.struct_size = sizeof q;
      q.Type = req.type;
      q.Flags.VirtualMachineData = 1;
      q.Flags.SecureVirtualMachine = w_.config_.secure;
      q.hKmdProcessHandle = kmd_process_;
      q.pInputData = m.tail.empty() ? nullptr : m.tail.data();
      q.InputDataSize = static_cast<uint32_t>(m.tail.size());
      q.pOutputData = out.data();
      q.OutputDataSize = req.output_size;
      q.pOutputDataWritten = &written;
      gpup_status st = ddi.Adapter.pfnQueryAdapterInfo(w_.adapter_, &q);
      if (GPUP_FAILED(st)) return Error(st, fmt::format("query type {}: {}", req.type, gpup_status_message(st)));
      if (written == 0 || written > req.output_size) written = req.output_size;
      // The guest sees its partition, not the host's device: memory sizes are capped at the budget.
      const uint64_t budget = w_.config_.max_vram;
      if (req.type == GPUPDDI_QAITYPE_DEVICEINFO && written >= sizeof(GPUPDDI_DEVICEINFO)) {
        GPUPDDI_DEVICEINFO info;
        std::memcpy(&info, out.data(), sizeof info);
        info.GlobalMemSize = std::min(info.GlobalMemSize, budget);
        info.MaxAllocSize = std::min(info.MaxAllocSize, budget);
        std::memcpy(out.data(), &info, sizeof info);
      } else if (req.type == GPUPDDI_QAITYPE_DRIVERCAPS && written >= sizeof(GPUPDDI_DRIVERCAPS)) {
        GPUPDDI_DRIVERCAPS caps;
        std::memcpy(&caps, out.data(), sizeof caps);
        caps.MaxAllocationSize = std::min(caps.MaxAllocationSize, budget);
        std::memcpy(out.data(), &caps, sizeof caps);
      } else if (req.type == GPUPDDI_QAITYPE_QUERYSEGMENT && written >= sizeof(GPUPDDI_QUERYSEGMENTOUT)) {
        GPUPDDI_QUERYSEGMENTOUT seg;
        std::memcpy(&seg, out.data(), sizeof seg);
        for (uint32_t i = 0; i < seg.NbSegment && i < GPUPDDI_MAX_SEGMENTS; ++i)
          if (!seg.Segments[i].Aperture) seg.Segments[i].Size = std::min(seg.Segments[i].Size, budget);
        std::memcpy(out.data(), &seg, sizeof seg);
      }
      out.resize(written);
      QueryAdapterInfoReply rep{written, 0};
      return reply(rep, std::move(out));
    }

    case Op::CreateDevice: {
      auto req = m.as<CreateDeviceRequest>();
      if (auto s = check_adapter(req.adapter_luid); !s.ok()) return s.error();
      if (req.flags != 0) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("device flags {:#x}", req.flags));
      auto dev = std::make_shared<Device>();
      GPUPDDI_ARG_CREATEDEVICE a{};
      a.struct_size = sizeof a;
      a.hKmdProcess = kmd_process_;
      gpup_status st = ddi.Device.pfnCreateDevice(w_.adapter_, &a);
      if (GPUP_FAILED(st)) return Error(st, fmt::format("KMD CreateDevice: {}", gpup_status_message(st)));
      dev->kmd = a.hDevice;
      auto h = handles_.insert(dev);
      if (!h.ok()) {
        ddi.Device.pfnDestroyDevice(dev->kmd);
        return h.error();
      }
      devices_.insert(dev);
      return reply(CreateDeviceReply{*h, w_.state_counter_});
    }

    case Op::DestroyDevice:
      return destroy_object<Device>(m.as<DestroyDeviceRequest>().device, &GuestProcess::destroy_device_locked);

    case Op::CreateContext: {
      auto req = m.as<CreateContextRequest>();
      auto dev = handles_.get<Device>(req.device, ObjectType::Device);
      if (!dev.ok()) return dev.error();
      if (req.node >= std::max<uint32_t>(1, w_.caps_.driver.NodeCount))
        return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("node {} (the adapter has {})", req.node, w_.caps_.driver.NodeCount));
      if (req.priority < -2 || req.priority > 2) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("priority {} (-2..2)", req.priority));
      if (req.flags != 0) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("context flags {:#x}", req.flags));
      if (m.tail.size() > kMaxPrivateData) return Error(GPUP_STATUS_INVALID_PARAMETER, "context private data too large");
      auto ctx = std::make_shared<Context>();
      ctx->cookie = {&w_, w_.next_context_id_++};
      ctx->device = dev->get();
      ctx->process = this;
      ctx->priority = req.priority;
      GPUPDDI_ARG_CREATECONTEXT a{};
      a.struct_size = sizeof a;
      a.NodeOrdinal = req.node;
      a.Priority = req.priority;
      a.hSystemContext = &ctx->cookie;
      a.pPrivateDriverData = m.tail.empty() ? nullptr : m.tail.data();
      a.PrivateDriverDataSize = static_cast<uint32_t>(m.tail.size());
      gpup_status st = ddi.Context.pfnCreateContext((*dev)->kmd, &a);
      if (GPUP_FAILED(st)) return Error(st, fmt::format("KMD CreateContext: {}", gpup_status_message(st)));
      ctx->kmd = a.hContext;
      auto h = handles_.insert(ctx);
      if (!h.ok()) {
        ddi.Context.pfnDestroyContext(ctx->kmd);
        w_.drain_completions_locked();
        return h.error();
      }
      (*dev)->contexts.insert(ctx);
      w_.contexts_[ctx->cookie.id] = ctx.get();
      return reply(CreateContextReply{*h, 0});
    }

    case Op::DestroyContext:
      return destroy_object<Context>(m.as<DestroyContextRequest>().context, &GuestProcess::destroy_context_locked);

    case Op::CreateAllocation: {
      auto req = m.as<CreateAllocationRequest>();
      auto dev = handles_.get<Device>(req.device, ObjectType::Device);
      if (!dev.ok()) return dev.error();
      const uint32_t known = GPUPKMT_ALLOCATION_CPU_VISIBLE | GPUPKMT_ALLOCATION_PROGRAM | GPUPKMT_ALLOCATION_READ_ONLY |
                             GPUPKMT_ALLOCATION_IMAGE;
      if (req.flags & ~known) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("allocation flags {:#x}", req.flags));
      const bool program = req.flags & GPUPKMT_ALLOCATION_PROGRAM;
      const bool cpu_visible = req.flags & GPUPKMT_ALLOCATION_CPU_VISIBLE;
      const bool image = req.flags & GPUPKMT_ALLOCATION_IMAGE;
      if (program && cpu_visible) return Error(GPUP_STATUS_INVALID_PARAMETER, "a program allocation cannot be CPU visible");
      if (image && (!cpu_visible || program))
        return Error(GPUP_STATUS_INVALID_PARAMETER, "an image allocation is CPU visible and not a program");
      if (image && (w_.driver_->ddi().DdiVersion & 0xffffu) < 1)
        return Error(GPUP_STATUS_NOT_SUPPORTED, "the adapter's KMD predates image allocations (DDI 1.1)");
      if (!program && req.size == 0) return Error(GPUP_STATUS_INVALID_PARAMETER, "allocation of 0 bytes");
      if (m.tail.size() > max_tail(Op::CreateAllocation, false)) return Error(GPUP_STATUS_INVALID_PARAMETER, "private data too large");
      std::shared_ptr<Section> out_section;
      auto capacity = output_capacity(req.output, req.output_size, max_tail(Op::CreateAllocation, true), out_section,
                                      "CreateAllocation");
      if (!capacity.ok()) return capacity.error();
      std::vector<uint8_t> priv_copy;
      auto priv = private_data(m, req.private_data, priv_copy, "CreateAllocation");
      if (!priv.ok()) return priv.error();
      const uint64_t size = program ? 0 : req.size;
      const uint64_t max_alloc = std::min(w_.caps_.driver.MaxAllocationSize ? w_.caps_.driver.MaxAllocationSize : UINT64_MAX,
                                          w_.config_.max_vram);
      if (size > max_alloc)
        return Error(GPUP_STATUS_INVALID_PARAMETER,
                     fmt::format("allocation of {} exceeds the largest allowed, {}", format_size(size), format_size(max_alloc)));
      if (add_overflows(w_.vram_used_, size) || w_.vram_used_ + size > w_.config_.max_vram)
        return Error(GPUP_STATUS_QUOTA_EXCEEDED,
                     fmt::format("allocation of {} would bring partition {} to {}, above its max of {}", format_size(size),
                                 w_.config_.vm_name, format_size(w_.vram_used_ + size), format_size(w_.config_.max_vram)));
      if (w_.vram_used_ + size > w_.vram_limit_locked()) {
        // Within its max, but above its min and what gpupd lets it borrow: the memory is another
        // partition's guarantee or already lent out. The same out-of-memory as the max cap.
        ++w_.vram_refused_;
        return Error(GPUP_STATUS_QUOTA_EXCEEDED,
                     fmt::format("allocation of {} would bring partition {} to {}, above its min of {} plus what it "
                                 "could borrow: {}",
                                 format_size(size), w_.config_.vm_name, format_size(w_.vram_used_ + size),
                                 format_size(w_.config_.min_vram),
                                 vram_refusal_.empty() ? std::string("the memory is in use by other partitions")
                                                       : vram_refusal_));
      }
      auto alloc = std::make_shared<Allocation>();
      alloc->size = size;
      alloc->flags = req.flags;
      if (cpu_visible) {
        const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        alloc->backing_size = (size + page - 1) / page * page;
        alloc->memfd.reset(memfd_create("gpup-allocation", MFD_CLOEXEC));
        if (!alloc->memfd || ftruncate(alloc->memfd.get(), static_cast<off_t>(alloc->backing_size)) != 0)
          return Error(GPUP_STATUS_NO_MEMORY, fmt::format("backing store of {}: {}", format_size(size), std::strerror(errno)));
        void* p = mmap(nullptr, alloc->backing_size, PROT_READ | PROT_WRITE, MAP_SHARED, alloc->memfd.get(), 0);
        if (p == MAP_FAILED) return Error(GPUP_STATUS_NO_MEMORY, fmt::format("backing store map: {}", std::strerror(errno)));
        alloc->backing = p;
      }
      std::vector<uint8_t> out(*capacity);
      GPUPDDI_ARG_CREATEALLOCATION a{};
      a.struct_size = sizeof a;
      a.Flags.CpuVisible = cpu_visible;
      a.Flags.Program = program;
      a.Flags.ReadOnly = (req.flags & GPUPKMT_ALLOCATION_READ_ONLY) != 0;
      a.Flags.Image = image;
      a.Size = size;
      a.pSystemMemory = alloc->backing;
      a.pPrivateDriverData = priv->empty() ? nullptr : priv->data();
      a.PrivateDriverDataSize = static_cast<uint32_t>(priv->size());
      a.pOutputData = out.empty() ? nullptr : out.data();
      a.OutputDataSize = *capacity;
      const uint64_t build = program ? w_.build_began_locked(*this, m) : 0;
      gpup_status st = ddi.Memory.pfnCreateAllocation((*dev)->kmd, &a);
      w_.build_ended(build);
      const uint32_t written = std::min(a.OutputDataWritten, *capacity);
      out.resize(written);
      if (out_section && st == GPUP_STATUS_BUILD_FAILED) {
        // The build output goes to the guest's section (checked to hold *capacity bytes at the
        // offset); the reply says how much, with no allocation.
        if (written) std::memcpy(out_section->map + req.output.offset, out.data(), written);
        return reply(CreateAllocationReply{0, written, st, 0});
      }
      if (GPUP_FAILED(st)) {
        if (st == GPUP_STATUS_BUILD_FAILED) return Error(st, std::string(out.begin(), out.end()));
        return Error(st, fmt::format("KMD CreateAllocation of {}: {}", format_size(size), gpup_status_message(st)));
      }
      alloc->ddi = &ddi;
      alloc->device = dev->get();
      alloc->device_kmd = (*dev)->kmd;
      alloc->kmd = a.hAllocation;
      alloc->charged = size;
      alloc->vm_vram = &w_.vram_used_;
      alloc->proc_vram = &vram_used_;
      w_.vram_used_ += size;
      vram_used_ += size;
      auto h = handles_.insert(alloc);
      if (!h.ok()) return h.error();  // the destructor gives everything back
      (*dev)->allocations.insert(alloc);
      CreateAllocationReply rep{*h, written, st, 0};
      if (out_section) {
        if (written) std::memcpy(out_section->map + req.output.offset, out.data(), written);
        return reply(rep);
      }
      return reply(rep, std::move(out));
    }

    case Op::DestroyAllocation:
      return destroy_object<Allocation>(m.as<DestroyAllocationRequest>().allocation, &GuestProcess::destroy_allocation_locked);

    case Op::Lock:
    case Op::Unlock: {
      auto req = m.as<LockRequest>();
      auto alloc = handles_.get<Allocation>(req.allocation, ObjectType::Allocation);
      if (!alloc.ok()) return alloc.error();
      Allocation& al = **alloc;
      if (!al.backing) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("allocation {:#x} is not CPU visible", req.allocation));
      if (m.op() == Op::Unlock) {
        if (al.locks == 0) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("allocation {:#x} is not locked", req.allocation));
        if (--al.locks == 0 && ddi.Memory.pfnUnlock) {
          gpup_status st = ddi.Memory.pfnUnlock(al.device_kmd, al.kmd);
          if (GPUP_FAILED(st)) return Error(st, "KMD Unlock failed");
        }
        return reply(UnlockReply{});
      }
      if (al.locks == 0 && ddi.Memory.pfnLock) {
        gpup_status st = ddi.Memory.pfnLock(al.device_kmd, al.kmd);
        if (GPUP_FAILED(st)) return Error(st, "KMD Lock failed");
      }
      ++al.locks;
      LockReply rep{al.size, 0};
      if (link_->shares_memory()) {
        if (!al.section) al.section = next_section_++;
        rep.section = al.section;
        if (GPUP_FAILED(link_->send_fd(al.section, al.memfd.get())))
          return Error(GPUP_STATUS_CONNECTION_LOST, "could not pass the section");
      }
      return reply(rep);
    }

    case Op::ReadAllocation: {
      auto req = m.as<ReadAllocationRequest>();
      auto alloc = handles_.get<Allocation>(req.allocation, ObjectType::Allocation);
      if (!alloc.ok()) return alloc.error();
      Allocation& al = **alloc;
      if (!al.backing) return Error(GPUP_STATUS_INVALID_PARAMETER, "allocation is not CPU visible");
      if (req.size > max_tail(Op::ReadAllocation, true)) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("read of {} bytes exceeds one message", req.size));
      if (add_overflows(req.offset, req.size) || req.offset + req.size > al.size)
        return Error(GPUP_STATUS_OUT_OF_RANGE, fmt::format("read [{}, +{}) of an allocation of {} bytes", req.offset, req.size, al.size));
      const uint8_t* p = static_cast<const uint8_t*>(al.backing) + req.offset;
      return reply(ReadAllocationReply{}, std::vector<uint8_t>(p, p + req.size));
    }

    case Op::WriteAllocation: {
      auto req = m.as<WriteAllocationRequest>();
      auto alloc = handles_.get<Allocation>(req.allocation, ObjectType::Allocation);
      if (!alloc.ok()) return alloc.error();
      Allocation& al = **alloc;
      if (!al.backing) return Error(GPUP_STATUS_INVALID_PARAMETER, "allocation is not CPU visible");
      if (add_overflows(req.offset, m.tail.size()) || req.offset + m.tail.size() > al.size)
        return Error(GPUP_STATUS_OUT_OF_RANGE, fmt::format("write [{}, +{}) of an allocation of {} bytes", req.offset, m.tail.size(), al.size));
      std::memcpy(static_cast<uint8_t*>(al.backing) + req.offset, m.tail.data(), m.tail.size());
      return reply(WriteAllocationReply{});
    }

    case Op::ReserveGpuVa: {
      auto req = m.as<ReserveGpuVaRequest>();
      auto va = va_.reserve(req.base, req.size);
      if (!va.ok()) return va.error();
      return reply(ReserveGpuVaReply{*va});
    }

    case Op::MapGpuVa: {
      auto req = m.as<MapGpuVaRequest>();
      auto alloc = handles_.get<Allocation>(req.allocation, ObjectType::Allocation);
      if (!alloc.ok()) return alloc.error();
      if ((*alloc)->program()) return Error(GPUP_STATUS_INVALID_PARAMETER, "a program allocation has no memory to map");
      auto st = va_.map(req.va, req.size, *alloc, (*alloc)->size, req.offset, req.protection);
      if (!st.ok()) return st.error();
      return reply(MapGpuVaReply{});
    }

    case Op::FreeGpuVa: {
      auto req = m.as<FreeGpuVaRequest>();
      auto st = va_.free(req.va, req.size);
      if (!st.ok()) return st.error();
      return reply(FreeGpuVaReply{});
    }

    case Op::CreateSyncObject: {
      auto req = m.as<CreateSyncObjectRequest>();
      auto dev = handles_.get<Device>(req.device, ObjectType::Device);
      if (!dev.ok()) return dev.error();
      if (req.type != GPUPKMT_SYNCOBJECT_MONITORED_FENCE)
        return Error(GPUP_STATUS_NOT_SUPPORTED, fmt::format("sync object type {}", req.type));
      auto slot = std::find(fence_slots_used_.begin(), fence_slots_used_.end(), false);
      if (slot == fence_slots_used_.end()) return Error(GPUP_STATUS_QUOTA_EXCEEDED, "all fence slots of this process are in use");
      auto s = std::make_shared<SyncObject>();
      s->device = dev->get();
      s->process = this;
      s->value = req.initial_value;
      s->slot = static_cast<uint32_t>(slot - fence_slots_used_.begin());
      auto h = handles_.insert(s);
      if (!h.ok()) return h.error();
      *slot = true;
      (*dev)->syncs.insert(s);
      publish_fence_locked(*s);
      return reply(CreateSyncObjectReply{*h, s->slot});
    }

    case Op::DestroySyncObject:
      return destroy_object<SyncObject>(m.as<DestroySyncObjectRequest>().sync_object, &GuestProcess::destroy_sync_locked);

    case Op::SignalFromCpu: {
      auto req = m.as<SignalFromCpuRequest>();
      auto s = handles_.get<SyncObject>(req.sync_object, ObjectType::SyncObject);
      if (!s.ok()) return s.error();
      (*s)->value = req.value;
      w_.fence_changed_locked(**s);
      return reply(SignalFromCpuReply{});
    }

    case Op::WaitFromCpu: {
      auto req = m.as<WaitFromCpuRequest>();
      auto s = handles_.get<SyncObject>(req.sync_object, ObjectType::SyncObject);
      if (!s.ok()) return s.error();
      if ((*s)->value >= req.value) return reply(WaitFromCpuReply{(*s)->value});
      if ((*s)->device->state != kDeviceStateNormal)
        return Error((*s)->device->reason, fmt::format("the device of sync object {:#x} was reset", req.sync_object));
      if (cpu_waits_ >= kMaxCpuWaits) return Error(GPUP_STATUS_QUOTA_EXCEEDED, fmt::format("{} CPU waits already pending", cpu_waits_));
      (*s)->waits.push_back({req.event_id, req.value});
      ++cpu_waits_;
      return reply(WaitFromCpuReply{(*s)->value}, {}, GPUP_STATUS_PENDING);
    }

    case Op::Escape: {
      auto req = m.as<EscapeRequest>();
      if (auto s = check_adapter(req.adapter_luid); !s.ok()) return s.error();
      if (req.flags & ~GPUPKMT_ESCAPE_DRIVER_KNOWN) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("escape flags {:#x}", req.flags));
      const bool known = req.flags & GPUPKMT_ESCAPE_DRIVER_KNOWN;
      if (w_.config_.secure && !known)
        return Error(GPUP_STATUS_ACCESS_DENIED, fmt::format("VM {} is a secure VM: only driver-known escapes pass", w_.config_.vm_name));
      if (!ddi.Adapter.pfnEscape) return Error(GPUP_STATUS_NOT_SUPPORTED, "the KMD has no escapes");
      GPUPDDI_HANDLE dev_kmd = nullptr;
      if (req.device) {
        auto dev = handles_.get<Device>(req.device, ObjectType::Device);
        if (!dev.ok()) return dev.error();
        dev_kmd = (*dev)->kmd;
      }
      std::shared_ptr<Section> out_section;
      auto capacity = output_capacity(req.output, req.output_size, max_tail(Op::Escape, true), out_section, "Escape");
      if (!capacity.ok()) return capacity.error();
      std::vector<uint8_t> priv_copy;
      auto priv = private_data(m, req.private_data, priv_copy, "Escape");
      if (!priv.ok()) return priv.error();
      std::vector<uint8_t> out(*capacity);
      uint32_t written = 0;
      GPUPDDI_ARG_ESCAPE e{};
      e.struct_size = sizeof e;
      e.Flags.VirtualMachineData = 1;
      e.Flags.DriverKnownEscape = known;
      e.hKmdProcessHandle = kmd_process_;
      e.hDevice = dev_kmd;
      e.pPrivateDriverData = priv->empty() ? nullptr : priv->data();
      e.PrivateDriverDataSize = static_cast<uint32_t>(priv->size());
      e.pOutputData = out.empty() ? nullptr : out.data();
      e.OutputDataSize = *capacity;
      e.pOutputDataWritten = &written;
      gpup_status st = ddi.Adapter.pfnEscape(w_.adapter_, &e);
      if (GPUP_FAILED(st)) return Error(st, fmt::format("escape refused by the KMD: {}", gpup_status_message(st)));
      written = std::min(written, *capacity);
      out.resize(written);
      if (out_section) {
        if (written) std::memcpy(out_section->map + req.output.offset, out.data(), written);
        return reply(EscapeReply{written, 0});
      }
      return reply(EscapeReply{written, 0}, std::move(out));
    }

    case Op::GetDeviceState: {
      auto req = m.as<GetDeviceStateRequest>();
      auto dev = handles_.get<Device>(req.device, ObjectType::Device);
      if (!dev.ok()) return dev.error();
      return reply(GetDeviceStateReply{(*dev)->state, (*dev)->reason, w_.state_counter_, 0});
    }

    case Op::QueryVideoMemoryInfo: {
      auto req = m.as<QueryVideoMemoryInfoRequest>();
      if (auto s = check_adapter(req.adapter_luid); !s.ok()) return s.error();
      if (req.segment_group > 1) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("segment group {}", req.segment_group));
      // Budget: what this partition could use right now (its min, what it holds above it, and
      // what it could still borrow; never above its max). Usage: this process's. Reservation: the
      // partition's min, which is reserved for it on the adapter whatever others do; a guest cannot
      // reserve more, so AvailableForReservation is that min too.
      QueryVideoMemoryInfoReply rep{};
      const uint64_t limit = w_.vram_limit_locked();
      rep.budget = w_.broker_ ? std::min(w_.config_.max_vram, limit + w_.vram_borrowable_) : limit;
      rep.current_usage = vram_used_;
      rep.current_reservation = w_.config_.min_vram;
      rep.available_for_reservation = w_.config_.min_vram;
      return reply(rep);
    }

    case Op::QueryStatistics: {
      auto req = m.as<QueryStatisticsRequest>();
      Counts c;
      if (req.type == GPUPKMT_QUERYSTATISTICS_VM) {
        c = w_.totals_locked();
      } else if (req.type == GPUPKMT_QUERYSTATISTICS_PROCESS) {
        add_counts(c);
        c.vram_used = vram_used_;
      } else {
        return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("statistics type {}", req.type));
      }
      QueryStatisticsReply rep{c.processes, c.devices, c.contexts, c.allocations, c.sync_objects, c.va_mappings,
                               c.vram_used, w_.config_.max_vram, c.submissions, c.faults};
      return reply(rep);
    }

    case Op::RegisterSection:
      return register_section(m);

    case Op::UnregisterSection: {
      auto req = m.as<UnregisterSectionRequest>();
      auto sec = handles_.get<Section>(req.section, ObjectType::Section);
      if (!sec.ok()) return sec.error();
      destroy_section_locked(*sec);
      return reply(UnregisterSectionReply{});
    }

    default:
      // Every SYNC op in schema.def has a case above; reaching this is a schema/handler mismatch.
      return Error(GPUP_STATUS_NOT_SUPPORTED, fmt::format("{} is not handled by this worker", m.info->name));
  }
}

// ----------------------------------------------------------------------------------------------
// Guest-owned sections

namespace {

std::string seal_names(int seals) {
  std::string s;
  auto add = [&](int bit, const char* name) {
    if (seals & bit) s += (s.empty() ? "" : "|") + std::string(name);
  };
  add(F_SEAL_SHRINK, "F_SEAL_SHRINK");
  add(F_SEAL_GROW, "F_SEAL_GROW");
  add(F_SEAL_SEAL, "F_SEAL_SEAL");
  add(F_SEAL_WRITE, "F_SEAL_WRITE");
#ifdef F_SEAL_FUTURE_WRITE
  add(F_SEAL_FUTURE_WRITE, "F_SEAL_FUTURE_WRITE");
#endif
  return s.empty() ? "none" : s;
}

// Checks a guest's section fd and maps it. The seals are checked before the size: once
// F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL are set the size can never change again, so the size
// seen by fstat is the size for the life of the mapping and no access to it can SIGBUS.
Result<uint8_t*> map_guest_section(int fd, uint64_t size) {
  struct stat st {};
  if (fstat(fd, &st) != 0) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("fstat of the section fd: {}", std::strerror(errno)));
  if (!S_ISREG(st.st_mode))
    return Error(GPUP_STATUS_INVALID_PARAMETER, "the section fd is not a memfd (not a regular file)");
  struct statfs fs {};
  if (fstatfs(fd, &fs) != 0)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("fstatfs of the section fd: {}", std::strerror(errno)));
  if (static_cast<unsigned long>(fs.f_type) == HUGETLBFS_MAGIC)
    return Error(GPUP_STATUS_INVALID_PARAMETER, "the section is a hugetlbfs memfd; sections must be ordinary memfds");
  const int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0)
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("the section fd cannot carry seals ({}): create it with memfd_create(MFD_ALLOW_SEALING)",
                             std::strerror(errno)));
  const int required = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
  if ((seals & required) != required)
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("the section is not sealed against resizing: seals {}, required {}", seal_names(seals),
                             seal_names(required)));
  int write_seals = F_SEAL_WRITE;
#ifdef F_SEAL_FUTURE_WRITE
  write_seals |= F_SEAL_FUTURE_WRITE;
#endif
  if (seals & write_seals)
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("the section is sealed against writing ({}); the host writes output into sections", seal_names(seals & write_seals)));
  const int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || (fl & O_ACCMODE) != O_RDWR)
    return Error(GPUP_STATUS_INVALID_PARAMETER, "the section fd is not open for reading and writing");
  // Sizes are re-read after the seals were seen: nothing can change them from here on.
  if (fstat(fd, &st) != 0 || st.st_size < 0 || static_cast<uint64_t>(st.st_size) != size)
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("the section memfd is {} bytes, the request declares {}", static_cast<long long>(st.st_size), size));
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED)
    return Error(GPUP_STATUS_NO_MEMORY, fmt::format("mapping a section of {}: {}", format_size(size), std::strerror(errno)));
  return static_cast<uint8_t*>(p);
}

}  // namespace

Result<GuestProcess::Reply> GuestProcess::register_section(const Message& m) {
  auto req = m.as<RegisterSectionRequest>();
  UniqueFd fd = std::move(incoming_fd_);
  if (!link_->shares_memory())
    return Error(GPUP_STATUS_NOT_SUPPORTED, "sections need a shared-memory channel; this one is a stream (no fd passing)");
  if (!fd) return Error(incoming_fd_status_ < 0 ? incoming_fd_status_ : GPUP_STATUS_INVALID_PARAMETER,
                        incoming_fd_error_.empty() ? std::string("no file descriptor came with the request") : incoming_fd_error_);
  if (req.size == 0 || req.size > kMaxSectionBytes)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("section of {} bytes (1..{} allowed)", req.size, kMaxSectionBytes));
  if (sections_ >= kMaxSections)
    return Error(GPUP_STATUS_QUOTA_EXCEEDED, fmt::format("process already has {} sections registered, the limit", sections_));
  if (section_bytes_ + req.size > kMaxSectionBytes)
    return Error(GPUP_STATUS_QUOTA_EXCEEDED,
                 fmt::format("a section of {} would bring this process's sections to {}, above the limit of {}",
                             format_size(req.size), format_size(section_bytes_ + req.size), format_size(kMaxSectionBytes)));
  auto map = map_guest_section(fd.get(), req.size);
  if (!map.ok()) return map.error();
  auto sec = std::make_shared<Section>();
  sec->map = *map;
  sec->size = req.size;
  auto h = handles_.insert(sec);
  if (!h.ok()) return h.error();  // the destructor unmaps
  ++sections_;
  section_bytes_ += req.size;
  return reply(RegisterSectionReply{*h, 0});
}

void GuestProcess::destroy_section_locked(const std::shared_ptr<Section>& s) {
  (void)handles_.remove(s->handle);
  --sections_;
  section_bytes_ -= s->size;
  // Unmapped when the last reference (the caller's) goes.
}

Result<std::shared_ptr<Section>> GuestProcess::section_range(const SectionRef& ref, const char* what, const char* field) {
  auto sec = handles_.get<Section>(ref.section, ObjectType::Section);
  if (!sec.ok()) return Error(sec.error().status, fmt::format("{} {}: {}", what, field, sec.error().message));
  if (ref.size == 0) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{} {}: a section reference of 0 bytes", what, field));
  if (ref.size > kMaxBulkDataSize)
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("{} {}: {} bytes exceed the limit of {} bytes", what, field, ref.size, kMaxBulkDataSize));
  if (add_overflows(ref.offset, ref.size) || ref.offset + ref.size > (*sec)->size)
    return Error(GPUP_STATUS_OUT_OF_RANGE, fmt::format("{} {}: bytes [{}, +{}) are outside section {:#x} of {} bytes", what, field,
                                                       ref.offset, ref.size, ref.section, (*sec)->size));
  return *sec;
}

Result<std::span<const uint8_t>> GuestProcess::private_data(const Message& m, const SectionRef& ref, std::vector<uint8_t>& copy,
                                                            const char* what) {
  if (ref.section == 0) {
    if (ref.size != 0 || ref.offset != 0)
      return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{}: private-data reference without a section", what));
    return m.tail;
  }
  if (!m.tail.empty())
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("{}: private data both inline ({} bytes) and in a section", what, m.tail.size()));
  auto sec = section_range(ref, what, "private data");
  if (!sec.ok()) return sec.error();
  // One copy out of the shared mapping; the KMD only ever sees this copy.
  copy.assign((*sec)->map + ref.offset, (*sec)->map + ref.offset + ref.size);
  return std::span<const uint8_t>(copy);
}

Result<uint32_t> GuestProcess::output_capacity(const SectionRef& ref, uint32_t inline_size, size_t inline_room,
                                               std::shared_ptr<Section>& out_section, const char* what) {
  if (ref.section == 0) {
    if (ref.size != 0 || ref.offset != 0)
      return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{}: output reference without a section", what));
    if (inline_size > kMaxOutputData || inline_size > inline_room)
      return Error(GPUP_STATUS_INVALID_PARAMETER,
                   fmt::format("{}: inline output size {} exceeds {} (larger outputs need a section)", what, inline_size,
                               std::min<size_t>(kMaxOutputData, inline_room)));
    return inline_size;
  }
  if (inline_size != 0)
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("{}: output both inline ({} bytes) and in a section", what, inline_size));
  auto sec = section_range(ref, what, "output");
  if (!sec.ok()) return sec.error();
  out_section = *sec;
  return ref.size;
}

// ----------------------------------------------------------------------------------------------
// Async messages: errors become ContextError notifications and fault the context.

void GuestProcess::on_async(const Message& m) {
  switch (m.op()) {
    case Op::SubmitCommand:
      submit_locked(m);
      break;
    case Op::SignalFromGpu:
    case Op::WaitFromGpu: {
      auto req = m.as<SignalFromGpuRequest>();  // same layout as WaitFromGpuRequest
      static_assert(sizeof(SignalFromGpuRequest) == sizeof(WaitFromGpuRequest));
      auto ctx = handles_.get<Context>(req.context, ObjectType::Context);
      if (!ctx.ok()) {
        ContextErrorRequest n{req.context, ctx.error().status, 0};
        notify(Op::ContextError, &n, sizeof n, {reinterpret_cast<const uint8_t*>(ctx.error().message.data()), ctx.error().message.size()});
        return;
      }
      auto s = handles_.get<SyncObject>(req.sync_object, ObjectType::SyncObject);
      if (!s.ok()) {
        fault_context_locked(*ctx, s.error().status, 0, s.error().message);
        return;
      }
      if ((*ctx)->faulted) return;
      Context::Item it{m.op() == Op::SignalFromGpu ? Context::Item::kSignal : Context::Item::kWait, nullptr, *s, req.value};
      (*ctx)->queue.push_back(std::move(it));
      w_.pump_locked(**ctx);
      break;
    }
    default:
      break;
  }
}

void GuestProcess::submit_locked(const Message& m) {
  auto req = m.as<SubmitCommandRequest>();
  auto ctx_r = handles_.get<Context>(req.context, ObjectType::Context);
  if (!ctx_r.ok()) {
    ContextErrorRequest n{req.context, ctx_r.error().status, req.submission_id};
    notify(Op::ContextError, &n, sizeof n,
           {reinterpret_cast<const uint8_t*>(ctx_r.error().message.data()), ctx_r.error().message.size()});
    return;
  }
  auto ctx = *ctx_r;
  if (ctx->faulted) return;  // the guest was told when it faulted
  if (req.flags != 0) return fault_context_locked(ctx, GPUP_STATUS_INVALID_PARAMETER, req.submission_id, fmt::format("submit flags {:#x}", req.flags));
  ++submissions_;

  // Decode and validate the whole buffer before anything is queued: a bad command anywhere means
  // nothing of this submission runs.
  std::vector<Context::Item> items;
  std::shared_ptr<Batch> batch;
  auto fail = [&](gpup_status st, const std::string& why) { fault_context_locked(ctx, st, req.submission_id, why); };
  auto resolve = [&](uint64_t va, uint64_t size, bool write, GPUPDDI_BUFFER_REF& out) -> Status {
    auto r = va_.resolve(va, size, write);
    if (!r.ok()) return r.error();
    // Work on a context may only touch its own device's memory: the device's lifetime bounds it.
    if (r->allocation->device != ctx->device)
      return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPU VA {:#x} maps an allocation of another device", va));
    out.hAllocation = r->allocation->kmd;
    out.Offset = r->offset;
    out.Size = size;
    batch->refs.push_back(r->allocation);
    return {};
  };
  CommandReader reader(m.tail);
  CommandView cv;
  for (;;) {
    auto more = reader.next(cv);
    if (!more.ok()) return fail(more.status(), more.error().message);
    if (!*more) break;
    const size_t idx = reader.index() - 1;
    if (cv.op == CommandOp::SignalFence || cv.op == CommandOp::WaitFence) {
      auto c = cv.as<SignalFenceCommand>();  // same layout as WaitFenceCommand
      static_assert(sizeof(SignalFenceCommand) == sizeof(WaitFenceCommand));
      auto s = handles_.get<SyncObject>(c.sync_object, ObjectType::SyncObject);
      if (!s.ok()) return fail(s.status(), fmt::format("command {}: {}", idx, s.error().message));
      if (batch) {
        items.push_back({Context::Item::kSubmit, std::move(batch), nullptr, 0});
        batch.reset();
      }
      items.push_back({cv.op == CommandOp::SignalFence ? Context::Item::kSignal : Context::Item::kWait, nullptr, *s, c.value});
      continue;
    }
    if (!batch) {
      batch = std::make_shared<Batch>();
      batch->guest_submission = req.submission_id;
    }
    OwnedCommand oc;
    switch (cv.op) {
      case CommandOp::Copy: {
        auto c = cv.as<CopyCommand>();
        oc.cmd.Type = GPUPDDI_COMMAND_COPY;
        if (auto s = resolve(c.src_va, c.size, false, oc.cmd.u.Copy.Src); !s.ok()) return fail(s.status(), fmt::format("command {} (copy source): {}", idx, s.error().message));
        if (auto s = resolve(c.dst_va, c.size, true, oc.cmd.u.Copy.Dst); !s.ok()) return fail(s.status(), fmt::format("command {} (copy destination): {}", idx, s.error().message));
        break;
      }
      case CommandOp::Fill: {
        auto c = cv.as<FillCommand>();
        const uint32_t ps = c.pattern_size;
        if (ps == 0 || ps > GPUPDDI_MAX_FILL_PATTERN || (ps & (ps - 1)) || c.size % ps)
          return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {} (fill): pattern size {} with size {}", idx, ps, c.size));
        oc.cmd.Type = GPUPDDI_COMMAND_FILL;
        if (auto s = resolve(c.dst_va, c.size, true, oc.cmd.u.Fill.Dst); !s.ok()) return fail(s.status(), fmt::format("command {} (fill): {}", idx, s.error().message));
        if (oc.cmd.u.Fill.Dst.Offset % ps) return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {} (fill): offset not a multiple of the pattern", idx));
        oc.cmd.u.Fill.PatternSize = ps;
        std::memcpy(oc.cmd.u.Fill.Pattern, c.pattern, ps);
        break;
      }
      case CommandOp::Dispatch: {
        auto d = parse_dispatch(cv);
        if (!d.ok()) return fail(d.status(), fmt::format("command {}: {}", idx, d.error().message));
        const auto& c = d->cmd;
        auto prog = handles_.get<Allocation>(c.program, ObjectType::Allocation);
        if (!prog.ok()) return fail(prog.status(), fmt::format("command {} (dispatch program): {}", idx, prog.error().message));
        if (!(*prog)->program()) return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {}: allocation {:#x} is not a program", idx, c.program));
        if ((*prog)->device != ctx->device)
          return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {}: program {:#x} belongs to another device", idx, c.program));
        if (c.work_dim < 1 || c.work_dim > 3) return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {}: work_dim {}", idx, c.work_dim));
        for (uint32_t i = 0; i < c.work_dim; ++i) {
          if (c.global_size[i] == 0 || add_overflows(c.global_offset[i], c.global_size[i]))
            return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {}: global size/offset in dimension {}", idx, i));
          if (c.local_size[i] && c.global_size[i] % c.local_size[i])
            return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {}: local size does not divide global size in dimension {}", idx, i));
        }
        batch->refs.push_back(*prog);
        oc.kernel.assign(d->name);
        oc.args.resize(d->args.size());
        oc.values.resize(d->args.size());
        for (size_t i = 0; i < d->args.size(); ++i) {
          const auto& a = d->args[i];
          GPUPDDI_KERNEL_ARG& k = oc.args[i];
          k.Kind = a.desc.kind;
          k.Size = a.desc.size;
          if (a.desc.kind == GPUPDDI_ARG_VALUE || a.desc.kind == GPUPDDI_ARG_SAMPLER) {
            oc.values[i].assign(a.value.begin(), a.value.end());
          } else if (a.desc.kind == GPUPDDI_ARG_BUFFER || a.desc.kind == GPUPDDI_ARG_IMAGE) {
            if (auto s = resolve(a.desc.va, a.desc.range, true, k.Buffer); !s.ok())
              return fail(s.status(), fmt::format("command {} (dispatch argument {}): {}", idx, i, s.error().message));
            if (a.desc.kind == GPUPDDI_ARG_IMAGE && (w_.driver_->ddi().DdiVersion & 0xffffu) < 1)
              return fail(GPUP_STATUS_NOT_SUPPORTED, fmt::format("command {}: image arguments need DDI 1.1", idx));
          } else if (a.desc.kind == GPUPDDI_ARG_LOCAL) {
            if (a.desc.size == 0 || (w_.caps_.info.LocalMemSize && a.desc.size > w_.caps_.info.LocalMemSize))
              return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {}: local argument {} of {} bytes", idx, i, a.desc.size));
          }
        }
        oc.cmd.Type = GPUPDDI_COMMAND_DISPATCH;
        oc.cmd.u.Dispatch.hProgram = (*prog)->kmd;
        oc.cmd.u.Dispatch.WorkDim = c.work_dim;
        oc.cmd.u.Dispatch.ArgCount = static_cast<uint32_t>(oc.args.size());
        for (int i = 0; i < 3; ++i) {
          oc.cmd.u.Dispatch.GlobalOffset[i] = c.global_offset[i];
          oc.cmd.u.Dispatch.GlobalSize[i] = c.global_size[i];
          oc.cmd.u.Dispatch.LocalSize[i] = c.local_size[i];
        }
        break;
      }
      default:
        return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("command {}: {} is not a hardware command", idx, cv.info->name));
    }
    batch->commands.push_back(std::move(oc));
  }
  if (batch) items.push_back({Context::Item::kSubmit, std::move(batch), nullptr, 0});
  for (auto& it : items) ctx->queue.push_back(std::move(it));
  w_.pump_locked(*ctx);
}

void GuestProcess::fault_context_locked(const std::shared_ptr<Context>& ctx, gpup_status status, uint64_t submission_id,
                                        const std::string& why) {
  ++faults_;
  spdlog::warn("process {} ({}): context {:#x} faulted: {}: {}", pid_, name_, ctx->handle, gpup_status_name(status), why);
  ctx->faulted = true;
  ctx->queue.clear();
  Device* dev = ctx->device;
  ContextErrorRequest n{ctx->handle, status, submission_id};
  notify(Op::ContextError, &n, sizeof n, {reinterpret_cast<const uint8_t*>(why.data()), why.size()});
  if (dev->state == kDeviceStateNormal) {
    // The device's state changed: advance the counter in the fence page (a guest's cached
    // GetDeviceState is stale from now on) and say so.
    dev->state = kDeviceStateReset;
    dev->reason = status;
    const uint32_t counter = ++w_.state_counter_;
    fence_page_.bump_state_counter(counter);
    DeviceStateChangedRequest d{dev->handle, dev->state, dev->reason, counter};
    notify(Op::DeviceStateChanged, &d, sizeof d);
  }
}

void GuestProcess::publish_fence_locked(SyncObject& s) {
  fence_page_.set(s.slot, s.value);
  if (!link_->shares_memory()) {
    FenceValueRequest n{s.handle, s.slot, s.value};
    notify(Op::FenceValue, &n, sizeof n);
  }
}

// ----------------------------------------------------------------------------------------------
// Destruction, children first.

void GuestProcess::destroy_context_locked(const std::shared_ptr<Context>& ctx) {
  ctx->queue.clear();
  w_.driver_->ddi().Context.pfnDestroyContext(ctx->kmd);  // waits for the context's work
  w_.drain_completions_locked();                          // so its batches are released now
  if (!ctx->inflight.empty()) {  // completions the KMD never reported
    const int n = static_cast<int>(ctx->inflight.size());
    ctx->inflight.clear();
    w_.inflight_changed_locked(*ctx, -n);  // and the watchdog stops timing it
  }
  w_.contexts_.erase(ctx->cookie.id);
  (void)handles_.remove(ctx->handle);
  ctx->device->contexts.erase(ctx);
}

void GuestProcess::destroy_allocation_locked(const std::shared_ptr<Allocation>& alloc) {
  va_.unmap_allocation(alloc.get());
  (void)handles_.remove(alloc->handle);
  for (auto& dev : devices_) dev->allocations.erase(alloc);
  // The KMD object and the memory go when the last in-flight submission using it completes.
}

void GuestProcess::destroy_sync_locked(const std::shared_ptr<SyncObject>& s) {
  cpu_waits_ -= std::min(cpu_waits_, s->waits.size());
  fence_slots_used_[s->slot] = false;
  (void)handles_.remove(s->handle);
  s->device->syncs.erase(s);
  // Queued GPU waits/signals on it keep the object alive until their contexts go.
}

void GuestProcess::destroy_device_locked(const std::shared_ptr<Device>& dev) {
  {  // scoped: the copies must not keep children alive past the device
    auto contexts = dev->contexts;
    for (auto& c : contexts) destroy_context_locked(c);
  }
  {
    auto allocs = dev->allocations;
    for (auto& a : allocs) destroy_allocation_locked(a);
  }
  {
    auto syncs = dev->syncs;
    for (auto& s : syncs) destroy_sync_locked(s);
  }
  (void)handles_.remove(dev->handle);
  devices_.erase(dev);
  w_.driver_->ddi().Device.pfnDestroyDevice(dev->kmd);
}

void GuestProcess::close() {
  std::lock_guard lock(w_.mu_);
  if (closed_) return;
  closed_ = true;
  auto devices = devices_;
  for (auto& d : devices) destroy_device_locked(d);
  // Remaining references (VA mappings) go with the VA space.
  va_ = VaSpace();
  {
    std::vector<std::shared_ptr<Section>> sections;
    handles_.for_each([&](const std::shared_ptr<Object>& o) {
      if (o->type == ObjectType::Section) sections.push_back(std::static_pointer_cast<Section>(o));
    });
    for (auto& sec : sections) destroy_section_locked(sec);
  }  // unmapped here
  incoming_fd_.reset();
  if (kmd_process_) w_.driver_->ddi().Process.pfnDestroyProcess(w_.adapter_, kmd_process_);
  kmd_process_ = nullptr;
  if (hello_done_) spdlog::info("guest process {} '{}' closed", pid_, name_);
}

// ----------------------------------------------------------------------------------------------
// Worker

Worker::Worker(WorkerConfig config) : config_(std::move(config)) {}

Worker::~Worker() { stop(); }

void Worker::on_log(GPUPDDI_SYSTEM_HANDLE, int level, const char* msg) {
  switch (level) {
    case GPUPDDI_LOG_DEBUG: spdlog::debug("kmd: {}", msg); break;
    case GPUPDDI_LOG_INFO: spdlog::info("kmd: {}", msg); break;
    case GPUPDDI_LOG_WARN: spdlog::warn("kmd: {}", msg); break;
    default: spdlog::error("kmd: {}", msg); break;
  }
}

void Worker::on_complete(GPUPDDI_SYSTEM_HANDLE ctx, uint64_t submission, gpup_status status) {
  auto* cookie = static_cast<Context::Cookie*>(ctx);
  Worker* w = cookie->worker;
  {
    std::lock_guard lock(w->cq_mu_);
    w->cq_.push_back({cookie->id, submission, status});
  }
  w->cq_cv_.notify_one();
}

GPUPDDI_ARG_SETVIRTUALMACHINEDATA Worker::vm_data() const {
  GPUPDDI_ARG_SETVIRTUALMACHINEDATA d{};
  d.struct_size = sizeof d;
  d.Flags.SecureVirtualMachine = config_.secure;
  d.hKmdVmWorkerProcess = kmd_worker_process_;
  d.pVmGuid = &config_.vm_guid;
  d.pVmName = config_.vm_name.c_str();
  d.MinPartitionVRAM = config_.min_vram;
  d.MaxPartitionVRAM = config_.max_vram;
  d.OptimalPartitionVRAM = config_.optimal_vram;
  d.ComputeWeight = config_.compute_weight;
  d.MaxComputePercent = config_.max_compute;
  return d;
}

Status Worker::start() {
  callbacks_.struct_size = sizeof callbacks_;
  callbacks_.hSystem = this;
  callbacks_.pfnLog = &Worker::on_log;
  callbacks_.pfnNotifySubmissionComplete = &Worker::on_complete;
  auto drv = kmd::Driver::load(config_.kmd, callbacks_);
  if (!drv.ok()) return drv.error();
  driver_ = *drv;
  GPUPDDI_ARG_STARTADAPTER sa{};
  sa.struct_size = sizeof sa;
  sa.pConfig = config_.kmd_config.c_str();
  gpup_status st = driver_->ddi().Adapter.pfnStartAdapter(&sa);
  if (GPUP_FAILED(st)) return Error(st, fmt::format("adapter {}: StartAdapter failed: {}", config_.adapter_name, gpup_status_message(st)));
  adapter_ = sa.hAdapter;
  auto caps = kmd::query_adapter_caps(*driver_, adapter_);
  if (!caps.ok()) return caps.error();
  caps_ = *caps;
  if (auto mmu = MmuLayout::from_kmd(caps_.mmu, caps_.levels); !mmu.ok())
    return Error(mmu.status(), fmt::format("adapter {}: KMD {}: {}", config_.adapter_name, driver_->name(), mmu.error().message));
  if (!caps_.driver.MemoryManagementCaps.ParavirtualizationSupported)
    return Error(GPUP_STATUS_NOT_SUPPORTED, fmt::format("adapter {}: KMD {} does not declare ParavirtualizationSupported; it cannot be partitioned",
                                                        config_.adapter_name, driver_->name()));
  if (config_.secure && !caps_.driver.MemoryManagementCaps.IoMmuSecureModeSupported)
    return Error(GPUP_STATUS_NOT_SUPPORTED, fmt::format("secure VM {} cannot start: KMD {} does not declare IoMmuSecureModeSupported",
                                                        config_.vm_name, driver_->name()));
  device_memory_ = caps_.info.GlobalMemSize;
  if (config_.max_vram == 0 || (device_memory_ && config_.max_vram > device_memory_)) config_.max_vram = device_memory_;

  GPUPDDI_ARG_CREATEPROCESS cp{};
  cp.struct_size = sizeof cp;
  cp.Flags.VirtualMachineWorkerProcess = 1;
  std::string name = "gpup-vmwp:" + config_.vm_name;
  cp.ProcessId = static_cast<uint32_t>(getpid());
  cp.ProcessNameLength = static_cast<uint32_t>(name.size());
  cp.pProcessName = name.c_str();
  st = driver_->ddi().Process.pfnCreateProcess(adapter_, &cp);
  if (GPUP_FAILED(st)) return Error(st, "KMD CreateProcess (worker) failed");
  kmd_worker_process_ = cp.hKmdProcess;
  auto d = vm_data();
  st = driver_->ddi().Adapter.pfnSetVirtualMachineData(adapter_, &d);
  if (GPUP_FAILED(st)) return Error(st, "KMD SetVirtualMachineData failed");
  completion_thread_ = std::thread([this] { completion_loop(); });
  // Also without a TDR delay when builds are timed: a later update may set a build timeout.
  if (config_.tdr_delay_ms || config_.build_timeout_s)
    watchdog_ = std::make_unique<TdrWatchdog>(std::chrono::milliseconds(config_.tdr_delay_ms),
                                              [this](const TdrWatchdog::Hang& h) {
                                                if (h.kind == TdrWatchdog::Hang::Kind::kBuild) on_build_hang(h);
                                                else on_hang(h);
                                              });
  spdlog::info("VM {} ({}) on adapter {} ({}): max VRAM {}", config_.vm_name, guid_to_string(config_.vm_guid),
               config_.adapter_name, caps_.info.Name, format_size(config_.max_vram));
  return {};
}

Status Worker::update(const WorkerConfig& c) {
  std::lock_guard lock(mu_);
  // A lowered min: what may be in use under the old one stays held (gpupd counts it the same way)
  // until release_idle_vram() gives it back.
  if (broker_ && c.min_vram < config_.min_vram) vram_hold_ = std::max(vram_hold_, config_.min_vram);
  config_.min_vram = c.min_vram;
  config_.optimal_vram = c.optimal_vram;
  config_.max_vram = (c.max_vram == 0 || (device_memory_ && c.max_vram > device_memory_)) ? device_memory_ : c.max_vram;
  config_.compute_weight = c.compute_weight;
  config_.max_compute = c.max_compute;
  config_.secure = c.secure;
  config_.build_timeout_s = c.build_timeout_s;  // from the next build on
  auto d = vm_data();
  gpup_status st = driver_->ddi().Adapter.pfnSetVirtualMachineData(adapter_, &d);
  if (GPUP_FAILED(st)) return Error(st, "KMD SetVirtualMachineData failed");
  return {};
}

void Worker::stop() {
  std::vector<std::shared_ptr<GuestProcess>> procs;
  {
    std::lock_guard lock(mu_);
    for (auto& [id, p] : processes_) procs.push_back(p);
    processes_.clear();
  }
  for (auto& p : procs) p->close();  // the watchdog still watches: closing waits for the work
  watchdog_.reset();
  {
    std::lock_guard lock(cq_mu_);
    cq_stop_ = true;
  }
  cq_cv_.notify_all();
  if (completion_thread_.joinable()) completion_thread_.join();
  if (driver_ && adapter_) {
    if (kmd_worker_process_) driver_->ddi().Process.pfnDestroyProcess(adapter_, kmd_worker_process_);
    kmd_worker_process_ = nullptr;
    driver_->ddi().Adapter.pfnStopAdapter(adapter_);
    adapter_ = nullptr;
  }
}

std::shared_ptr<GuestProcess> Worker::connect(std::unique_ptr<GuestLink> link) {
  std::lock_guard lock(mu_);
  auto p = std::make_shared<GuestProcess>(*this, std::move(link), next_process_id_++);
  processes_[p->id()] = p;
  return p;
}

void Worker::disconnect(const std::shared_ptr<GuestProcess>& p) {
  p->close();
  std::lock_guard lock(mu_);
  processes_.erase(p->id());
}

void Worker::completion_loop() {
  for (;;) {
    {
      std::unique_lock lock(cq_mu_);
      if (cq_.empty() && !cq_stop_) {
        // Also wakes at the yield deadline: an idle holder gives the device back then.
        const int64_t d = yield_deadline_ns_.load(std::memory_order_relaxed);
        if (d) cq_cv_.wait_until(lock, std::chrono::steady_clock::time_point(std::chrono::nanoseconds(d)));
        else cq_cv_.wait(lock);
      }
      if (cq_stop_ && cq_.empty()) return;
    }
    std::lock_guard lock(mu_);
    drain_completions_locked();
    maybe_release_locked();
  }
}

void Worker::drain_completions_locked() {
  std::deque<Completion> batch;
  {
    std::lock_guard lock(cq_mu_);
    batch.swap(cq_);
  }
  for (const auto& c : batch) apply_completion_locked(c.context_id, c.submission, c.status);
}

void Worker::apply_completion_locked(uint64_t context_id, uint64_t submission, gpup_status status) {
  auto it = contexts_.find(context_id);
  if (it == contexts_.end()) return;  // context destroyed meanwhile
  Context& ctx = *it->second;
  auto sub = ctx.inflight.find(submission);
  uint64_t guest_submission = sub != ctx.inflight.end() ? sub->second->guest_submission : 0;
  if (sub != ctx.inflight.end()) {
    ctx.inflight.erase(sub);  // releases the allocations it used
    inflight_changed_locked(ctx, -1);
  }
  if (GPUP_FAILED(status) && !ctx.faulted) {
    auto self = ctx.process->handles_.get<Context>(ctx.handle, ObjectType::Context);
    if (self.ok()) ctx.process->fault_context_locked(*self, status, guest_submission, "the device failed the submission");
    return;
  }
  pump_locked(ctx);
}

// Moves a context's queue forward: submissions go to the KMD at once (it keeps them in order),
// a GPU wait holds everything behind it until its fence value is reached, a GPU signal happens
// once everything before it has completed.
void Worker::pump_locked(Context& ctx) {
  while (!ctx.queue.empty() && !ctx.faulted) {
    Context::Item& it = ctx.queue.front();
    if (it.kind == Context::Item::kWait) {
      if (it.sync->value < it.value) return;
    } else if (it.kind == Context::Item::kSignal) {
      if (!ctx.inflight.empty()) return;
      auto sync = it.sync;
      const uint64_t v = it.value;
      ctx.queue.pop_front();
      sync->value = v;
      fence_changed_locked(*sync);
      continue;
    } else {
      if (!may_submit_locked()) return need_device_locked();
      auto batch = it.batch;
      std::vector<GPUPDDI_COMMAND> cmds;
      cmds.reserve(batch->commands.size());
      for (auto& oc : batch->commands) {
        if (oc.cmd.Type == GPUPDDI_COMMAND_DISPATCH) {
          for (size_t i = 0; i < oc.args.size(); ++i)
            if (oc.args[i].Kind == GPUPDDI_ARG_VALUE || oc.args[i].Kind == GPUPDDI_ARG_SAMPLER)
              oc.args[i].pValue = oc.values[i].data();
          oc.cmd.u.Dispatch.pKernelName = oc.kernel.c_str();
          oc.cmd.u.Dispatch.pArgs = oc.args.empty() ? nullptr : oc.args.data();
        }
        cmds.push_back(oc.cmd);
      }
      const uint64_t id = next_submission_++;
      ctx.inflight[id] = batch;
      GPUPDDI_ARG_SUBMITCOMMAND s{};
      s.struct_size = sizeof s;
      s.CommandCount = static_cast<uint32_t>(cmds.size());
      s.pCommands = cmds.data();
      s.SubmissionId = id;
      ctx.queue.pop_front();
      inflight_changed_locked(ctx, +1);
      gpup_status st = driver_->ddi().Context.pfnSubmitCommand(ctx.kmd, &s);
      if (GPUP_FAILED(st)) {
        ctx.inflight.erase(id);
        inflight_changed_locked(ctx, -1);
        auto self = ctx.process->handles_.get<Context>(ctx.handle, ObjectType::Context);
        if (self.ok()) ctx.process->fault_context_locked(*self, st, batch->guest_submission, fmt::format("the KMD refused the submission: {}", gpup_status_message(st)));
        return;
      }
      continue;
    }
    ctx.queue.pop_front();
  }
}

// A fence moved: publish it, wake CPU waiters, and let contexts waiting on it go on.
void Worker::fence_changed_locked(SyncObject& s) {
  GuestProcess* p = s.process;
  p->publish_fence_locked(s);
  for (auto w = s.waits.begin(); w != s.waits.end();) {
    if (s.value >= w->value) {
      SignalGuestEventRequest n{w->event_id, s.handle, 0, s.value};
      p->notify(Op::SignalGuestEvent, &n, sizeof n);
      if (p->cpu_waits_) --p->cpu_waits_;
      w = s.waits.erase(w);
    } else {
      ++w;
    }
  }
  // Contexts blocked on this fence; there are few contexts per VM, so look at all of them.
  std::vector<Context*> blocked;
  for (auto& [id, c] : contexts_)
    if (!c->queue.empty() && c->queue.front().kind == Context::Item::kWait && c->queue.front().sync.get() == &s)
      blocked.push_back(c);
  for (Context* c : blocked) pump_locked(*c);
}

void GuestProcess::add_counts(Counts& c) const {
  ++c.processes;
  handles_.for_each([&](const std::shared_ptr<Object>& o) {
    switch (o->type) {
      case ObjectType::Device: ++c.devices; break;
      case ObjectType::Context: ++c.contexts; break;
      case ObjectType::Allocation: ++c.allocations; break;
      case ObjectType::SyncObject: ++c.sync_objects; break;
      case ObjectType::Section: ++c.sections; break;
      default: break;
    }
  });
  c.va_mappings += static_cast<uint32_t>(va_.mapping_count());
  c.section_bytes += section_bytes_;
  c.submissions += submissions_;
  c.faults += faults_;
}

Counts Worker::totals_locked() {
  Counts c;
  for (auto& [id, p] : processes_) {
    if (p->open()) p->add_counts(c);
  }
  // Includes memory of allocations already destroyed but still used by work in flight.
  c.vram_used = vram_used_;
  return c;
}

Counts Worker::totals() {
  std::lock_guard lock(mu_);
  return totals_locked();
}

uint64_t Worker::vram_limit_locked() const {
  if (!broker_) return config_.max_vram;
  return std::min(config_.max_vram, std::max(config_.min_vram, vram_hold_));
}

uint64_t Worker::reserve_vram(uint64_t size, std::string* why) {
  if (!broker_ || size == 0) return 0;
  std::lock_guard ask(ask_mu_);
  uint64_t need = 0, want = 0;
  {
    std::lock_guard lock(mu_);
    const uint64_t in_use = vram_used_ + vram_pending_;
    if (add_overflows(in_use, size) || in_use + size > config_.max_vram) return 0;  // the max cap refuses it
    need = in_use + size;
    vram_pending_ += size;
    const uint64_t limit = vram_limit_locked();
    if (need <= limit) return size;
    want = std::min(config_.max_vram, std::max(need, limit + kVramGranule));
  }
  auto g = broker_->ask(need, want);
  std::lock_guard lock(mu_);
  if (!g.ok()) {
    *why = "gpupd did not answer: " + g.error().message;
    return size;
  }
  vram_hold_ = g->hold;
  vram_borrowable_ = g->borrowable;
  if (!g->granted) *why = g->why;
  return size;
}

void Worker::refresh_vram() {
  if (!broker_) return;
  std::lock_guard ask(ask_mu_);
  auto g = broker_->query();
  if (!g.ok()) return;  // the last numbers stay
  std::lock_guard lock(mu_);
  vram_hold_ = g->hold;
  vram_borrowable_ = g->borrowable;
}

void Worker::release_idle_vram() {
  if (!broker_) return;
  std::unique_lock ask(ask_mu_, std::try_to_lock);
  if (!ask.owns_lock()) return;  // a request is on its way; try at the next tick
  uint64_t target = 0;
  {
    std::lock_guard lock(mu_);
    const uint64_t in_use = vram_used_ + vram_pending_;
    const uint64_t held = std::max(config_.min_vram, vram_hold_);
    // Keep a granule of headroom while it borrows; within its min it needs nothing.
    target = in_use <= config_.min_vram
                 ? config_.min_vram
                 : std::max({config_.min_vram, std::min(config_.max_vram, in_use + kVramGranule), in_use});
    const bool excess = in_use <= config_.min_vram ? held > config_.min_vram
                                                   : held > target + kVramGranule || held > config_.max_vram;
    if (!excess) {
      vram_idle_ticks_ = 0;
      return;
    }
    if (++vram_idle_ticks_ < 2) return;
    vram_idle_ticks_ = 0;
    spdlog::debug("VM {}: giving back device memory: held {}, in use {}, keeping {}", config_.vm_name,
                  format_size(held), format_size(in_use), format_size(target));
    vram_hold_ = target;  // from now on only this may be used
  }
  broker_->release(target);
}

nlohmann::json Worker::stats_json() {
  std::lock_guard lock(mu_);
  Counts t = totals_locked();
  nlohmann::json procs = nlohmann::json::array();
  for (auto& [id, p] : processes_) {
    if (!p->open()) continue;
    procs.push_back({{"pid", p->pid_}, {"name", p->name_}, {"objects", p->handles_.size()}, {"vram_used", p->vram_used_},
                     {"sections", p->sections_}, {"section_bytes", p->section_bytes_},
                     {"submissions", p->submissions_}, {"faults", p->faults_}});
  }
  nlohmann::json j = {
      {"vram_used", vram_used_},
      {"vram_max", config_.max_vram},
      {"vram_min", config_.min_vram},
      {"totals",
       {{"processes", t.processes}, {"devices", t.devices}, {"contexts", t.contexts}, {"allocations", t.allocations},
        {"sync_objects", t.sync_objects}, {"va_mappings", t.va_mappings}, {"submissions", t.submissions}, {"faults", t.faults}}},
      {"processes", procs},
      {"device_busy_ns", busy_ns_locked()},
      {"device_grants", grants_}};
  if (broker_) {  // what it holds of the adapter (min included), borrows above its min, was refused
    const uint64_t held = std::max(config_.min_vram, vram_hold_);
    j["vram_held"] = held;
    j["vram_borrowed"] = held - config_.min_vram;
    j["vram_refused"] = vram_refused_;
  }
  return j;
}

// ----------------------------------------------------------------------------------------------
// Device time: gpupd's grants (gpupd/vidsch.h) and the TDR watchdog

uint64_t Worker::busy_ns_locked() const {
  uint64_t ns = busy_ns_;
  if (inflight_total_)
    ns += static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - busy_since_).count());
  return ns;
}

void Worker::set_device_time_link(DeviceTimeLink* link) {
  std::lock_guard lock(mu_);
  time_link_ = link;
  granted_ = link == nullptr;
}

bool Worker::may_submit_locked() {
  if (!granted_) return false;
  return !yield_at_ || std::chrono::steady_clock::now() < *yield_at_;
}

void Worker::need_device_locked() {
  if (granted_) return maybe_release_locked();  // past its yield deadline: back, with more to do
  if (want_sent_ || !time_link_) return;
  want_sent_ = true;
  time_link_->want();
}

// A context whose next item is device work (not a wait or a signal).
static bool submission_next(const Context& c) {
  return !c.faulted && !c.queue.empty() && c.queue.front().kind == Context::Item::kSubmit;
}

bool Worker::work_ready_locked() const {
  for (const auto& [id, c] : contexts_)
    if (submission_next(*c)) return true;
  return false;
}

void Worker::inflight_changed_locked(Context& ctx, int delta) {
  const auto now = std::chrono::steady_clock::now();
  if (delta > 0) {
    if (inflight_total_ == 0) {
      busy_since_ = now;
      // The gap since the device went idle, when short: the guest's turnaround (an EWMA).
      const auto gap = std::chrono::duration_cast<std::chrono::nanoseconds>(now - idle_began_).count();
      if (gap > 0 && gap < 20'000'000) gap_ewma_ns_ = gap_ewma_ns_ ? (gap_ewma_ns_ * 7 + gap) / 8 : gap;
    }
    inflight_total_ += static_cast<uint64_t>(delta);
  } else {
    inflight_total_ -= std::min<uint64_t>(inflight_total_, static_cast<uint64_t>(-delta));
    if (inflight_total_ == 0) {
      busy_ns_ += static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now - busy_since_).count());
      idle_began_ = now;
    }
  }
  if (watchdog_) {
    // The oldest submission of the context is the one running: it started when it entered an
    // idle context or when the one before it completed (not when a newer one entered, or was
    // refused by the KMD).
    const uint64_t oldest = ctx.inflight.empty() ? 0 : ctx.inflight.begin()->first;
    if (oldest != ctx.watched) {
      ctx.watched = oldest;
      if (oldest) watchdog_->running(ctx.cookie.id, now);
      else watchdog_->idle(ctx.cookie.id);
    }
  }
  if (delta < 0) maybe_release_locked();
}

void Worker::set_wakeup_locked(std::optional<std::chrono::steady_clock::time_point> at) {
  const int64_t ns = at ? std::chrono::duration_cast<std::chrono::nanoseconds>(at->time_since_epoch()).count() : 0;
  if (yield_deadline_ns_.load(std::memory_order_relaxed) == ns) return;
  {
    std::lock_guard cq(cq_mu_);
    yield_deadline_ns_.store(ns, std::memory_order_relaxed);
  }
  cq_cv_.notify_all();
}

// Gives the device back when the yield asks for it; otherwise sets when the completion thread
// must look again (completions look anyway while work is in flight). An idle holder waits a grace
// (kMinIdleGrace..kMaxIdleGrace) for its guest's next work first: a guest reading its last results before sending more
// keeps its turn until its deadline, and at the deadline keeps its place in gpupd's queue ("more").
void Worker::maybe_release_locked() {
  if (!time_link_ || !granted_ || !yield_at_) return set_wakeup_locked(std::nullopt);
  const auto now = std::chrono::steady_clock::now();
  const bool due = now >= *yield_at_;
  if (inflight_total_ != 0) {
    idle_since_.reset();
    return set_wakeup_locked(due ? std::nullopt : yield_at_);
  }
  const bool ready = work_ready_locked();
  if (ready) {
    idle_since_.reset();
    if (!due) return set_wakeup_locked(yield_at_);  // pump_locked submits it
  } else {
    if (!due && !yield_if_idle_) return set_wakeup_locked(yield_at_);
    if (!idle_since_) idle_since_ = now;
    const auto grace = std::clamp<std::chrono::nanoseconds>(std::chrono::nanoseconds(4 * gap_ewma_ns_), kMinIdleGrace,
                                                            kMaxIdleGrace);
    const auto grace_end = *idle_since_ + grace;
    if (now < grace_end) return set_wakeup_locked(due ? grace_end : std::min(*yield_at_, grace_end));
  }
  granted_ = false;
  yield_at_.reset();
  yield_if_idle_ = false;
  idle_since_.reset();
  set_wakeup_locked(std::nullopt);
  want_sent_ = ready;  // gpupd takes "more" as a want
  time_link_->release(busy_ns_locked() / 1000, ready);
}

void Worker::on_grant() {
  std::lock_guard lock(mu_);
  if (!time_link_ || granted_) return;
  granted_ = true;
  want_sent_ = false;
  granted_at_ = std::chrono::steady_clock::now();
  yield_at_.reset();
  yield_if_idle_ = false;
  ++grants_;
  // The partition's waiting contexts, higher priority first (stable: then in creation order).
  std::vector<Context*> ready;
  for (auto& [id, c] : contexts_)
    if (submission_next(*c)) ready.push_back(c);
  std::stable_sort(ready.begin(), ready.end(), [](const Context* a, const Context* b) { return a->priority > b->priority; });
  for (Context* c : ready) pump_locked(*c);
}

void Worker::on_yield(std::chrono::microseconds after, bool if_idle) {
  std::lock_guard lock(mu_);
  if (!time_link_ || !granted_) return;  // released already; the lines crossed
  const auto at = granted_at_ + after;
  if (!yield_at_ || at < *yield_at_) yield_at_ = at;
  yield_if_idle_ = yield_if_idle_ || if_idle;
  maybe_release_locked();
}

void Worker::on_hang(const TdrWatchdog::Hang& hang) {
  if (!time_link_) {
    spdlog::error("context {} ran for {} ms, past the TDR delay of {} ms; nothing resets it here (no gpupd link)",
                  hang.context_id, hang.running.count(), config_.tdr_delay_ms);
    return;
  }
  control::TdrEvent what;
  what.running_ms = static_cast<uint64_t>(std::max<int64_t>(hang.running.count(), 0));
  what.tdr_delay_ms = config_.tdr_delay_ms;
  // The handlers may be stuck behind the hung work (destroying a context waits for it): tell the
  // guests only if the object graph can be had soon; otherwise they learn it from the lost channel.
  std::unique_lock lock(mu_, std::defer_lock);
  if (lock.try_lock_for(std::chrono::milliseconds(200))) {
    auto guilty = contexts_.find(hang.context_id);
    const Device* guilty_device = nullptr;
    if (guilty != contexts_.end()) {
      const Context& c = *guilty->second;
      guilty_device = c.device;
      what.context = c.handle;
      what.pid = c.process->pid_;
      what.process = c.process->name_;
    }
    for (auto& [id, p] : processes_) {
      if (!p->open()) continue;
      for (auto& dev : p->devices_) {
        const gpup_status reason =
            dev.get() == guilty_device ? GPUP_STATUS_CONTEXT_RESET_GUILTY : GPUP_STATUS_CONTEXT_RESET_INNOCENT;
        for (auto& c : dev->contexts) {
          c->faulted = true;
          c->queue.clear();
          const std::string why = reason == GPUP_STATUS_CONTEXT_RESET_GUILTY
                                      ? fmt::format("work ran past the TDR delay of {} ms; the partition was reset", config_.tdr_delay_ms)
                                      : "another context's work ran past the TDR delay; the partition was reset";
          ContextErrorRequest n{c->handle, reason, 0};
          p->notify(Op::ContextError, &n, sizeof n, {reinterpret_cast<const uint8_t*>(why.data()), why.size()});
        }
        dev->state = GPUPKMT_DEVICESTATE_REMOVED;
        dev->reason = reason;
        const uint32_t counter = ++state_counter_;
        p->fence_page_.bump_state_counter(counter);
        DeviceStateChangedRequest d{dev->handle, dev->state, dev->reason, counter};
        p->notify(Op::DeviceStateChanged, &d, sizeof d);
      }
    }
  } else {
    what.guests_told = false;
  }
  spdlog::error("TDR: context {} ran for {} ms (TDR delay {} ms); resetting partition {}", hang.context_id,
                hang.running.count(), config_.tdr_delay_ms, config_.vm_name);
  time_link_->reset(control::to_json(what));
}

uint64_t Worker::build_began_locked(GuestProcess& p, const proto::Message& m) {
  if (!watchdog_ || config_.build_timeout_s == 0) return 0;
  const uint64_t id = next_build_id_++;
  {
    std::lock_guard l(builds_mu_);
    builds_[id] = Build{p.link_.get(), m.op(), m.header.txn, p.pid_, p.name_, config_.build_timeout_s};
  }
  watchdog_->building(id, std::chrono::steady_clock::now(), std::chrono::seconds(config_.build_timeout_s));
  return id;
}

void Worker::build_ended(uint64_t id) {
  if (id == 0) return;
  {
    std::lock_guard l(builds_mu_);
    builds_.erase(id);
  }
  if (watchdog_->built(id) || !time_link_) return;
  // The watchdog answered the guest and is ending this process; nothing more may reach the guest
  // or the KMD from here.
  for (;;) pause();
}

void Worker::on_build_hang(const TdrWatchdog::Hang& hang) {
  Build b;
  {
    std::lock_guard l(builds_mu_);
    auto it = builds_.find(hang.context_id);
    if (it == builds_.end()) return;  // ended meanwhile: build_ended() returns normally
    b = it->second;
  }
  const auto seconds = static_cast<double>(hang.running.count()) / 1000.0;
  if (!time_link_) {
    spdlog::error("a program build of process {} ({}) ran {:.1f} s, past the build timeout of {} s; nothing resets "
                  "it here (no gpupd link)",
                  b.pid, b.process, seconds, b.timeout_s);
    return;
  }
  const std::string why =
      fmt::format("the program build ran {:.1f} s, past partition {}'s build timeout of {} s; the partition was reset",
                  seconds, config_.vm_name, b.timeout_s);
  // The builder learns why; the others find their devices lost with the connection (the build
  // holds the object graph, so they cannot be told one by one).
  (void)b.link->send(proto::encode_error_reply(b.op, b.txn, GPUP_STATUS_DEVICE_REMOVED, why));
  control::TdrEvent what;
  what.kind = control::TdrEvent::Kind::kBuild;
  what.running_ms = static_cast<uint64_t>(std::max<int64_t>(hang.running.count(), 0));
  what.build_timeout_s = b.timeout_s;
  what.pid = b.pid;
  what.process = b.process;
  what.guests_told = false;
  spdlog::error("TDR: a program build of process {} ({}) ran {:.1f} s (build timeout {} s); resetting partition {}",
                b.pid, b.process, seconds, b.timeout_s, config_.vm_name);
  time_link_->reset(control::to_json(what));
}

}  // namespace gpup::vmwp
