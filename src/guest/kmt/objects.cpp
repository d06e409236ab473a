// The thunks: each is answered from guest-local state or marshalled as exactly one message (see
// the crossing budget in gpup/kmt.h), except that CreateAllocation and Escape with bulk data may
// first register a shared section (and afterwards unregister one). Locking rules are in session.h.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "guest/kmt/cmdbuf.h"
#include "guest/kmt/session.h"
#include "protocol/fence_page.h"

namespace gpup::kmt {

namespace {

using Bytes = std::span<const uint8_t>;

// Input bytes of a (pointer, size) pair; INVALID_PARAMETER for a NULL pointer with a size.
gpup_status input(const void* p, uint32_t size, const char* what, Bytes& out) {
  if (size != 0 && p == nullptr) return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{} is NULL with size {}", what, size));
  out = Bytes(static_cast<const uint8_t*>(p), size);
  return GPUP_STATUS_SUCCESS;
}

gpup_status check_output(const void* p, uint32_t size, const char* what) {
  if (size != 0 && p == nullptr) return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{} is NULL with size {}", what, size));
  return GPUP_STATUS_SUCCESS;
}

// Copies a reply's output tail to the caller. The host was told the capacity, so a longer tail or
// a `written` that disagrees with the tail is a broken reply.
gpup_status copy_output(const char* op, uint32_t written, Bytes tail, void* out, uint32_t capacity,
                        uint32_t* out_written) {
  if (written != tail.size())
    return fail(GPUP_STATUS_PROTOCOL_ERROR,
                fmt::format("{} reply: written = {} but {} output bytes follow", op, written, tail.size()));
  if (tail.size() > capacity)
    return fail(GPUP_STATUS_PROTOCOL_ERROR,
                fmt::format("{} reply: {} output bytes for a {}-byte buffer", op, tail.size(), capacity));
  if (!tail.empty()) std::memcpy(out, tail.data(), tail.size());
  *out_written = written;
  return GPUP_STATUS_SUCCESS;
}

gpup_status bad_handle(const char* kind, GPUPKMT_HANDLE h) {
  return fail(GPUP_STATUS_INVALID_HANDLE, fmt::format("{} {:#x} is not open in this process", kind, h));
}

// Largest chunk of a ReadAllocation reply / WriteAllocation request, whole 4 KiB pages.
size_t read_chunk() { return proto::max_tail(proto::Op::ReadAllocation, true) & ~size_t{4095}; }
size_t write_chunk() { return proto::max_tail(proto::Op::WriteAllocation, false) & ~size_t{4095}; }

}  // namespace

// --- adapters (local) --------------------------------------------------------------------------

// Handles are unique across object types within a process (the host issues them from one
// table), so a handle found under another type is a wrong-type handle, not an unknown one.
gpup_status Session::bad_handle_locked(const char* kind, GPUPKMT_HANDLE h) const {
  const char* actual = devices_.count(h) ? "device"
                       : contexts_.count(h) ? "context"
                       : allocations_.count(h) ? "allocation"
                       : syncs_.count(h) ? "synchronization object"
                                         : nullptr;
  if (actual && std::strcmp(actual, kind) != 0)
    return fail(GPUP_STATUS_OBJECT_TYPE_MISMATCH, fmt::format("handle {:#x} is of type {}, expected {}", h, actual, kind));
  return bad_handle(kind, h);
}

bool Session::adapter_luid_locked(GPUPKMT_HANDLE h, uint64_t* luid) const {
  if (h < kAdapterHandleBase) return false;
  const size_t i = h - kAdapterHandleBase;
  if (i >= adapters_.size() || adapter_refs_[i] == 0) return false;
  *luid = adapters_[i].luid;
  return true;
}

gpup_status Session::adapter_luid(GPUPKMT_HANDLE h, uint64_t* luid) {
  std::lock_guard lk(mu_);
  if (!adapter_luid_locked(h, luid)) return bad_handle("adapter", h);
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::enum_adapters(GPUPKMT_ENUMADAPTERS* a) {
  std::lock_guard lk(mu_);
  const auto n = static_cast<uint32_t>(adapters_.size());
  if (a->pAdapters == nullptr) {
    a->NumAdapters = n;
    return GPUP_STATUS_SUCCESS;
  }
  if (a->NumAdapters < n) {
    const uint32_t capacity = a->NumAdapters;
    a->NumAdapters = n;
    return fail(GPUP_STATUS_BUFFER_TOO_SMALL, fmt::format("{} adapters present, room for {}", n, capacity));
  }
  for (uint32_t i = 0; i < n; ++i)
    if (adapter_refs_[i] == UINT32_MAX) return fail(GPUP_STATUS_NO_MEMORY, "adapter opened too many times");
  for (uint32_t i = 0; i < n; ++i) {
    ++adapter_refs_[i];
    GPUPKMT_ADAPTERINFO& info = a->pAdapters[i];
    info = {};
    info.hAdapter = kAdapterHandleBase + i;
    info.Flags = adapters_[i].flags | GPUPKMT_ADAPTERFLAG_PARAVIRTUALIZED;
    info.AdapterLuid = adapters_[i].luid;
    info.Budget = adapters_[i].budget;
    static_assert(sizeof info.Description == sizeof adapters_[i].description);
    std::memcpy(info.Description, adapters_[i].description, sizeof info.Description);  // NUL-terminated at Hello
  }
  a->NumAdapters = n;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::open_adapter(GPUPKMT_OPENADAPTERFROMLUID* a) {
  std::lock_guard lk(mu_);
  for (size_t i = 0; i < adapters_.size(); ++i) {
    if (adapters_[i].luid != a->AdapterLuid) continue;
    if (adapter_refs_[i] == UINT32_MAX) return fail(GPUP_STATUS_NO_MEMORY, "adapter opened too many times");
    ++adapter_refs_[i];
    a->hAdapter = kAdapterHandleBase + static_cast<GPUPKMT_HANDLE>(i);
    return GPUP_STATUS_SUCCESS;
  }
  return fail(GPUP_STATUS_NOT_FOUND, fmt::format("no adapter with LUID {:#x} in this VM", a->AdapterLuid));
}

gpup_status Session::close_adapter(const GPUPKMT_CLOSEADAPTER* a) {
  std::lock_guard lk(mu_);
  uint64_t luid;
  if (!adapter_luid_locked(a->hAdapter, &luid)) return bad_handle("adapter", a->hAdapter);
  --adapter_refs_[a->hAdapter - kAdapterHandleBase];
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::query_adapter_info(GPUPKMT_QUERYADAPTERINFO* a) {
  Bytes in;
  if (gpup_status st = input(a->pInputData, a->InputDataSize, "pInputData", in); st < 0) return st;
  if (gpup_status st = check_output(a->pOutputData, a->OutputDataSize, "pOutputData"); st < 0) return st;
  a->OutputDataWritten = 0;
  uint64_t luid = 0;
  if (a->Type == GPUPKMT_QAITYPE_ADAPTERTYPE) {  // answered locally, as GPU-PV's guest does
    uint32_t flags;
    {
      std::lock_guard lk(mu_);
      if (!adapter_luid_locked(a->hAdapter, &luid)) return bad_handle("adapter", a->hAdapter);
      flags = adapters_[a->hAdapter - kAdapterHandleBase].flags;
    }
    if (a->OutputDataSize < sizeof(GPUPKMT_ADAPTERTYPE))
      return fail(GPUP_STATUS_BUFFER_TOO_SMALL, fmt::format("ADAPTERTYPE needs {} output bytes, {} given",
                                                            sizeof(GPUPKMT_ADAPTERTYPE), a->OutputDataSize));
    GPUPKMT_ADAPTERTYPE t{};
    t.Paravirtualized = 1;
    t.ComputeOnly = (flags & GPUPKMT_ADAPTERFLAG_COMPUTE_ONLY) ? 1 : 0;
    t.DisplaySupported = 0;
    t.SecureVirtualMachine = (flags & GPUPKMT_ADAPTERFLAG_SECURE_VM) ? 1 : 0;
    std::memcpy(a->pOutputData, &t, sizeof t);
    a->OutputDataWritten = sizeof t;
    return GPUP_STATUS_SUCCESS;
  }
  if (gpup_status st = adapter_luid(a->hAdapter, &luid); st < 0) return st;
  proto::QueryAdapterInfoRequest req{};
  req.adapter_luid = luid;
  req.type = a->Type;
  req.output_size = a->OutputDataSize;
  Reply r;
  if (gpup_status st = call(req, in, r); st < 0) return st;
  const auto rep = r.fixed<proto::QueryAdapterInfoReply>();
  return copy_output("QueryAdapterInfo", rep.written, r.tail(), a->pOutputData, a->OutputDataSize,
                     &a->OutputDataWritten);
}

// --- devices and contexts ------------------------------------------------------------------------

gpup_status Session::create_device(GPUPKMT_CREATEDEVICE* a) {
  uint64_t luid;
  if (gpup_status st = adapter_luid(a->hAdapter, &luid); st < 0) return st;
  proto::CreateDeviceRequest req{};
  req.adapter_luid = luid;
  req.flags = a->Flags;
  // Registered on the receiver thread, so a DeviceStateChanged right after the reply finds it.
  OnReply enter = [this, luid](const proto::Message& m) {
    const auto rep = m.as<proto::CreateDeviceReply>();
    if (rep.device == 0) return;
    DeviceObj d;
    d.adapter_luid = luid;
    d.state_counter = rep.state_counter;
    if (!devices_.insert_or_assign(rep.device, std::move(d)).second)
      logger().warn("CreateDevice: the host reused device handle {:#x}", rep.device);
  };
  Reply r;
  if (gpup_status st = call(req, {}, r, std::move(enter)); st < 0) return st;
  const auto rep = r.fixed<proto::CreateDeviceReply>();
  if (rep.device == 0) return fail(GPUP_STATUS_PROTOCOL_ERROR, "CreateDevice reply: device handle 0");
  a->hDevice = rep.device;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::destroy_device(const GPUPKMT_DESTROYDEVICE* a) {
  {
    std::lock_guard lk(mu_);
    if (!devices_.count(a->hDevice)) return bad_handle_locked("device", a->hDevice);
  }
  proto::DestroyDeviceRequest req{};
  req.device = a->hDevice;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;

  // The host destroyed the children; forget them here too.
  std::vector<std::shared_ptr<LockState>> locks;
  {
    std::lock_guard lk(mu_);
    const GPUPKMT_HANDLE dev = a->hDevice;
    std::erase_if(contexts_, [dev](const auto& kv) { return kv.second.device == dev; });
    for (auto it = allocations_.begin(); it != allocations_.end();) {
      if (it->second.device == dev) {
        locks.push_back(it->second.lock);
        it = allocations_.erase(it);
      } else {
        ++it;
      }
    }
    std::erase_if(syncs_, [dev](const auto& kv) { return kv.second.device == dev; });
    fail_waiters_locked([dev](const Waiter& w) { return w.device == dev; }, GPUP_STATUS_INVALID_HANDLE,
                        fmt::format("device {:#x} was destroyed during the wait", dev));
    devices_.erase(dev);
  }
  for (auto& ls : locks) {  // LockState::mu after mu_ is released (lock order)
    std::lock_guard al(ls->mu);
    ls->destroyed = true;
    ls->count = 0;
    ls->map.reset();
  }
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::create_context(GPUPKMT_CREATECONTEXT* a) {
  Bytes priv;
  if (gpup_status st = input(a->pPrivateDriverData, a->PrivateDriverDataSize, "pPrivateDriverData", priv); st < 0)
    return st;
  {
    std::lock_guard lk(mu_);
    if (!devices_.count(a->hDevice)) return bad_handle_locked("device", a->hDevice);
  }
  proto::CreateContextRequest req{};
  req.device = a->hDevice;
  req.node = a->NodeOrdinal;
  req.priority = a->Priority;
  req.flags = a->Flags;
  // Registered on the receiver thread, so a ContextError right after the reply finds it.
  OnReply enter = [this, dev = a->hDevice](const proto::Message& m) {
    const auto rep = m.as<proto::CreateContextReply>();
    if (rep.context != 0 && devices_.count(dev)) contexts_.insert_or_assign(rep.context, ContextObj{dev, 0, {}});
  };
  Reply r;
  if (gpup_status st = call(req, priv, r, std::move(enter)); st < 0) return st;
  const auto rep = r.fixed<proto::CreateContextReply>();
  if (rep.context == 0) return fail(GPUP_STATUS_PROTOCOL_ERROR, "CreateContext reply: context handle 0");
  a->hContext = rep.context;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::destroy_context(const GPUPKMT_DESTROYCONTEXT* a) {
  {
    std::lock_guard lk(mu_);
    if (!contexts_.count(a->hContext)) return bad_handle_locked("context", a->hContext);
  }
  proto::DestroyContextRequest req{};
  req.context = a->hContext;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  std::lock_guard lk(mu_);
  contexts_.erase(a->hContext);
  return GPUP_STATUS_SUCCESS;
}

// --- allocations ---------------------------------------------------------------------------------

// --- bulk data: shared sections ----------------------------------------------------------------

static_assert(GPUPKMT_MAX_PRIVATE_DATA_SIZE == proto::kMaxBulkDataSize &&
              GPUPKMT_MAX_OUTPUT_DATA_SIZE == proto::kMaxBulkDataSize);

Session::Bulk::~Bulk() {
  if (section) session->release_section(std::move(section));
}

gpup_status Session::acquire_section(uint64_t size, std::unique_ptr<GuestSection>& out) {
  {
    std::lock_guard lk(sections_mu_);
    auto best = idle_sections_.end();
    for (auto it = idle_sections_.begin(); it != idle_sections_.end(); ++it)
      if ((*it)->size >= size && (best == idle_sections_.end() || (*it)->size < (*best)->size)) best = it;
    if (best != idle_sections_.end()) {
      out = std::move(*best);
      idle_sections_.erase(best);
      return GPUP_STATUS_SUCCESS;
    }
  }
  if (lost()) return lost_error();
  const uint64_t bytes = (size + kSectionGranularity - 1) / kSectionGranularity * kSectionGranularity;
  UniqueFd fd(::memfd_create("gpupkmt-section", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return fail(GPUP_STATUS_NO_MEMORY, fmt::format("shared section: memfd_create: {}", std::strerror(errno)));
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0)
    return fail(GPUP_STATUS_NO_MEMORY, fmt::format("shared section of {} bytes: ftruncate: {}", bytes, std::strerror(errno)));
  // Sealed against resizing for good, so the host's mapping can never lose its pages.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    return fail(GPUP_STATUS_INTERNAL, fmt::format("shared section: F_ADD_SEALS: {}", std::strerror(errno)));
  auto sec = std::make_unique<GuestSection>();
  sec->size = bytes;
  if (gpup_status st = Mapping::shared(fd.get(), bytes, PROT_READ | PROT_WRITE, "shared section", sec->map); st < 0)
    return st;
  const uint64_t id = next_fd_id_.fetch_add(1, std::memory_order_relaxed);
  if (gpup_status st = ch_->send_fd(id, fd.get()); st != GPUP_STATUS_SUCCESS) {
    std::string why = channel::last_error().message;
    if (st == GPUP_STATUS_CONNECTION_LOST || st == GPUP_STATUS_PROTOCOL_ERROR) {
      lose("the connection to the host was lost while passing a section: " + why);
      return lost_error();
    }
    return fail(st, "passing a shared section to the host: " + why);
  }
  Reply r;
  if (gpup_status st = call(proto::RegisterSectionRequest{id, bytes}, {}, r); st < 0) return st;
  const auto rep = r.fixed<proto::RegisterSectionReply>();
  if (rep.section == 0) return fail(GPUP_STATUS_PROTOCOL_ERROR, "RegisterSection reply: section handle 0");
  sec->handle = rep.section;
  out = std::move(sec);
  return GPUP_STATUS_SUCCESS;
}

void Session::release_section(std::unique_ptr<GuestSection> sec) {
  if (!sec) return;
  if (!lost() && sec->size <= kMaxCachedSectionBytes) {
    std::lock_guard lk(sections_mu_);
    if (idle_sections_.size() < kMaxIdleSections) {
      idle_sections_.push_back(std::move(sec));
      return;
    }
  }
  if (!lost()) {
    const std::string saved = last_error_text();
    Reply r;
    if (call(proto::UnregisterSectionRequest{sec->handle, 0}, {}, r) < 0)
      logger().warn("unregistering shared section {:#x}: {}", sec->handle, last_error_text());
    set_last_error_text(saved);
  }
  // The mapping goes with `sec`; a lost session's host side is gone already.
}

gpup_status Session::prepare_bulk(proto::Op op, Bytes priv, uint32_t out_capacity, Bulk& b) {
  const char* name = proto::op_name(static_cast<uint16_t>(op));
  if (priv.size() > GPUPKMT_MAX_PRIVATE_DATA_SIZE)
    return fail(GPUP_STATUS_MESSAGE_TOO_LARGE,
                fmt::format("{}: private driver data of {} bytes exceeds the limit of {} bytes; nothing was sent", name,
                            priv.size(), GPUPKMT_MAX_PRIVATE_DATA_SIZE));
  const uint32_t cap = std::min<uint32_t>(out_capacity, GPUPKMT_MAX_OUTPUT_DATA_SIZE);
  const bool priv_inline = priv.size() <= proto::max_tail(op, false);
  const bool out_inline = cap <= proto::kMaxInlineOutput;
  if (!shares_memory_) {
    if (!priv_inline) {
      const proto::OpInfo* info = proto::find_op(static_cast<uint16_t>(op));
      const size_t total = sizeof(proto::MessageHeader) + info->request_size + priv.size();
      return fail(GPUP_STATUS_MESSAGE_TOO_LARGE,
                  fmt::format("{} message would be {} bytes; the channel limit is {} bytes (128 KiB), and its {} bytes of "
                              "private driver data could only travel in a shared section, which the stream transport "
                              "cannot pass; nothing was sent",
                              name, total, proto::kMaxMessageSize, priv.size()));
    }
    b.tail = priv;
    b.inline_output = std::min<uint32_t>(cap, proto::kMaxInlineOutput);
    return GPUP_STATUS_SUCCESS;
  }
  if (priv_inline && out_inline) {
    b.tail = priv;
    b.inline_output = cap;
    return GPUP_STATUS_SUCCESS;
  }
  const uint64_t priv_bytes = priv_inline ? 0 : (priv.size() + 7) & ~uint64_t{7};
  if (gpup_status st = acquire_section(priv_bytes + (out_inline ? 0 : cap), b.section); st < 0) return st;
  auto* base = static_cast<uint8_t*>(b.section->map.data());
  if (priv_inline) {
    b.tail = priv;
  } else {
    std::memcpy(base, priv.data(), priv.size());
    b.private_data = {b.section->handle, static_cast<uint32_t>(priv.size()), 0};
  }
  if (out_inline) {
    b.inline_output = cap;
  } else {
    b.output = {b.section->handle, cap, priv_bytes};
  }
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::copy_section_output(const char* op, uint32_t written, Bytes tail, const Bulk& b, void* out,
                                         uint32_t* out_written) {
  if (!tail.empty())
    return fail(GPUP_STATUS_PROTOCOL_ERROR,
                fmt::format("{} reply: {} output bytes inline although the output went to a section", op, tail.size()));
  if (written > b.output.size)
    return fail(GPUP_STATUS_PROTOCOL_ERROR,
                fmt::format("{} reply: {} output bytes written for a {}-byte capacity", op, written, b.output.size));
  if (written) std::memcpy(out, static_cast<const uint8_t*>(b.section->map.data()) + b.output.offset, written);
  *out_written = written;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::create_allocation(GPUPKMT_CREATEALLOCATION* a) {
  Bytes priv;
  if (gpup_status st = input(a->pPrivateDriverData, a->PrivateDriverDataSize, "pPrivateDriverData", priv); st < 0)
    return st;
  if (gpup_status st = check_output(a->pOutputData, a->OutputDataSize, "pOutputData"); st < 0) return st;
  a->OutputDataWritten = 0;
  a->KmdStatus = GPUP_STATUS_SUCCESS;
  a->hAllocation = 0;
  {
    std::lock_guard lk(mu_);
    if (!devices_.count(a->hDevice)) return bad_handle_locked("device", a->hDevice);
  }
  Bulk bulk(this);
  if (gpup_status st = prepare_bulk(proto::Op::CreateAllocation, priv, a->OutputDataSize, bulk); st < 0) return st;
  proto::CreateAllocationRequest req{};
  req.device = a->hDevice;
  req.flags = a->Flags;
  req.size = a->Size;
  req.output_size = bulk.inline_output;
  req.private_data = bulk.private_data;
  req.output = bulk.output;
  Reply r;
  const gpup_status st = call(req, bulk.tail, r);
  if (st < 0) {
    a->KmdStatus = st;
    if (st == GPUP_STATUS_BUILD_FAILED && r.msg.info != nullptr) {
      // The error reply's tail is the KMD's build output: give the caller what fits.
      const size_t n = std::min<size_t>(r.tail().size(), a->OutputDataSize);
      if (n) std::memcpy(a->pOutputData, r.tail().data(), n);
      a->OutputDataWritten = static_cast<uint32_t>(n);
    }
    return st;
  }
  const auto rep = r.fixed<proto::CreateAllocationReply>();
  if (bulk.output.section != 0) {
    if (gpup_status cst = copy_section_output("CreateAllocation", rep.written, r.tail(), bulk, a->pOutputData,
                                              &a->OutputDataWritten);
        cst < 0)
      return cst;
    if (rep.allocation == 0 && rep.kmd_status == GPUP_STATUS_BUILD_FAILED) {
      // A failed build with its output in the section: the reply carries no allocation.
      a->KmdStatus = rep.kmd_status;
      return fail(GPUP_STATUS_BUILD_FAILED,
                  fmt::format("the KMD could not build the program; its build output ({} bytes) is in pOutputData",
                              rep.written));
    }
  }
  if (rep.allocation == 0) return fail(GPUP_STATUS_PROTOCOL_ERROR, "CreateAllocation reply: allocation handle 0");
  if (bulk.output.section == 0) {
    if (gpup_status cst = copy_output("CreateAllocation", rep.written, r.tail(), a->pOutputData, bulk.inline_output,
                                      &a->OutputDataWritten);
        cst < 0)
      return cst;
  }
  a->KmdStatus = rep.kmd_status;
  {
    std::lock_guard lk(mu_);
    if (devices_.count(a->hDevice)) {
      AllocationObj obj;
      obj.device = a->hDevice;
      allocations_.insert_or_assign(rep.allocation, std::move(obj));
    }
  }
  a->hAllocation = rep.allocation;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::destroy_allocation(const GPUPKMT_DESTROYALLOCATION* a) {
  std::shared_ptr<LockState> ls;
  {
    std::lock_guard lk(mu_);
    auto it = allocations_.find(a->hAllocation);
    if (it == allocations_.end() || it->second.device != a->hDevice) return bad_handle_locked("allocation", a->hAllocation);
    ls = it->second.lock;
  }
  std::lock_guard al(ls->mu);  // held across the round trip: no Lock may slip in between
  if (ls->destroyed) return bad_handle("allocation", a->hAllocation);
  // A locked allocation is unmapped here first; its bytes are not written back.
  ls->map.reset();
  ls->count = 0;
  ls->copied = false;
  proto::DestroyAllocationRequest req{};
  req.device = a->hDevice;
  req.allocation = a->hAllocation;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  ls->destroyed = true;
  std::lock_guard lk(mu_);
  if (auto it = allocations_.find(a->hAllocation); it != allocations_.end() && it->second.lock == ls)
    allocations_.erase(it);
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::map_section(uint64_t section, uint64_t size, Mapping& out) {
  if (!shares_memory_)
    return fail(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("Lock reply names section {} on a stream channel", section));
  UniqueFd fd;
  const gpup_status st = ch_->receive_fd(section, fd, kFdTimeoutMs);
  if (st != GPUP_STATUS_SUCCESS)
    return fail(st == GPUP_STATUS_TIMEOUT ? GPUP_STATUS_PROTOCOL_ERROR : st,
                fmt::format("Lock: section {} did not arrive: {}", section, channel::last_error().message));
  return Mapping::shared(fd.get(), static_cast<size_t>(size), PROT_READ | PROT_WRITE, "Lock", out);
  // fd closes here; the mapping keeps the section alive.
}

gpup_status Session::fetch_copy(GPUPKMT_HANDLE allocation, uint64_t size, Mapping& out) {
  Mapping m;
  if (gpup_status st = Mapping::anonymous(static_cast<size_t>(size), m); st < 0) return st;
  const size_t chunk = read_chunk();
  auto* dst = static_cast<uint8_t*>(m.data());
  for (uint64_t off = 0; off < size;) {
    const uint64_t n = std::min<uint64_t>(chunk, size - off);
    proto::ReadAllocationRequest req{};
    req.allocation = allocation;
    req.size = static_cast<uint32_t>(n);  // n <= chunk < 4 GiB
    req.offset = off;
    Reply r;
    if (gpup_status st = call(req, {}, r); st < 0) return st;
    if (r.tail().size() != n)
      return fail(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("ReadAllocation at offset {}: asked for {} bytes, received {}",
                                                          off, n, r.tail().size()));
    std::memcpy(dst + off, r.tail().data(), n);
    off += n;
  }
  out = std::move(m);
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::write_back(GPUPKMT_HANDLE allocation, const Mapping& data, uint64_t size) {
  const size_t chunk = write_chunk();
  const auto* src = static_cast<const uint8_t*>(data.data());
  for (uint64_t off = 0; off < size;) {
    const uint64_t n = std::min<uint64_t>(chunk, size - off);
    proto::WriteAllocationRequest req{};
    req.allocation = allocation;
    req.offset = off;
    Reply r;
    if (gpup_status st = call(req, Bytes(src + off, static_cast<size_t>(n)), r); st < 0) return st;
    off += n;
  }
  return GPUP_STATUS_SUCCESS;
}

void Session::unlock_quietly(GPUPKMT_HANDLE device, GPUPKMT_HANDLE allocation) {
  const std::string keep = last_error_text();  // the caller reports the first failure
  proto::UnlockRequest req{};
  req.device = device;
  req.allocation = allocation;
  Reply r;
  (void)call(req, {}, r);
  set_last_error_text(keep);
}

gpup_status Session::lock(GPUPKMT_LOCK* a) {
  std::shared_ptr<LockState> ls;
  {
    std::lock_guard lk(mu_);
    auto it = allocations_.find(a->hAllocation);
    if (it == allocations_.end() || it->second.device != a->hDevice) return bad_handle_locked("allocation", a->hAllocation);
    ls = it->second.lock;
  }
  std::lock_guard al(ls->mu);
  if (ls->destroyed) return bad_handle("allocation", a->hAllocation);
  if (ls->count > 0) {  // nested: no crossing
    if (ls->count == UINT32_MAX) return fail(GPUP_STATUS_INVALID_PARAMETER, "too many nested locks");
    ++ls->count;
    a->pData = ls->map.data();
    a->Size = ls->size;
    return GPUP_STATUS_SUCCESS;
  }
  proto::LockRequest req{};
  req.device = a->hDevice;
  req.allocation = a->hAllocation;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  const auto rep = r.fixed<proto::LockReply>();
  gpup_status st;
  Mapping map;
  if (rep.size == 0 || rep.size > SIZE_MAX / 2) {
    st = fail(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("Lock reply: size {}", rep.size));
  } else if (rep.section != 0) {
    st = map_section(rep.section, rep.size, map);
  } else {
    st = fetch_copy(a->hAllocation, rep.size, map);
  }
  if (st < 0) {
    unlock_quietly(a->hDevice, a->hAllocation);  // the host counted this Lock
    return st;
  }
  ls->map = std::move(map);
  ls->copied = rep.section == 0;
  ls->size = rep.size;
  ls->count = 1;
  a->pData = ls->map.data();
  a->Size = ls->size;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::unlock(const GPUPKMT_UNLOCK* a) {
  std::shared_ptr<LockState> ls;
  {
    std::lock_guard lk(mu_);
    auto it = allocations_.find(a->hAllocation);
    if (it == allocations_.end() || it->second.device != a->hDevice) return bad_handle_locked("allocation", a->hAllocation);
    ls = it->second.lock;
  }
  std::lock_guard al(ls->mu);
  if (ls->destroyed) return bad_handle("allocation", a->hAllocation);
  if (ls->count == 0)
    return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("allocation {:#x} is not locked", a->hAllocation));
  if (ls->count > 1) {  // nested: no crossing
    --ls->count;
    return GPUP_STATUS_SUCCESS;
  }
  // Last unlock: write a private copy back, then release on both sides whatever happens (a
  // failed write-back leaves no half-locked state behind; the first error is returned).
  gpup_status st = GPUP_STATUS_SUCCESS;
  if (ls->copied) st = write_back(a->hAllocation, ls->map, ls->size);
  ls->count = 0;
  ls->copied = false;
  ls->map.reset();
  if (st < 0) {
    unlock_quietly(a->hDevice, a->hAllocation);
    return st;
  }
  proto::UnlockRequest req{};
  req.device = a->hDevice;
  req.allocation = a->hAllocation;
  Reply r;
  return call(req, {}, r);
}

// --- GPU virtual addresses -----------------------------------------------------------------------

gpup_status Session::reserve_gpu_va(GPUPKMT_RESERVEGPUVA* a) {
  proto::ReserveGpuVaRequest req{};
  req.base = a->BaseAddress;
  req.size = a->Size;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  a->VirtualAddress = r.fixed<proto::ReserveGpuVaReply>().va;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::map_gpu_va(const GPUPKMT_MAPGPUVA* a) {
  {
    std::lock_guard lk(mu_);
    if (!allocations_.count(a->hAllocation)) return bad_handle_locked("allocation", a->hAllocation);
  }
  proto::MapGpuVaRequest req{};
  req.allocation = a->hAllocation;
  req.protection = a->Protection;
  req.va = a->VirtualAddress;
  req.offset = a->OffsetInAllocation;
  req.size = a->Size;
  Reply r;
  return call(req, {}, r);
}

gpup_status Session::free_gpu_va(const GPUPKMT_FREEGPUVA* a) {
  proto::FreeGpuVaRequest req{};
  req.va = a->BaseAddress;
  req.size = a->Size;
  Reply r;
  return call(req, {}, r);
}

// --- submission ------------------------------------------------------------------------------------

gpup_status Session::submit_command(GPUPKMT_SUBMITCOMMAND* a) {
  a->SubmissionId = 0;
  if (a->pCmdBuf == nullptr) return fail(GPUP_STATUS_INVALID_PARAMETER, "pCmdBuf is NULL");
  {
    std::lock_guard lk(mu_);
    auto c = contexts_.find(a->hContext);
    if (c == contexts_.end()) return bad_handle_locked("context", a->hContext);
    if (c->second.error < 0) return fail(c->second.error, c->second.error_text);  // faulted: nothing sent
  }
  const Bytes cmds = a->pCmdBuf->writer.bytes();
  const size_t room = proto::max_tail(proto::Op::SubmitCommand, false);
  if (cmds.size() > room)
    return fail(GPUP_STATUS_MESSAGE_TOO_LARGE,
                fmt::format("command buffer of {} bytes ({} commands) exceeds the {} bytes one SubmitCommand message "
                            "can carry (128 KiB channel limit; messages are never split): submit smaller batches",
                            cmds.size(), a->pCmdBuf->writer.count(), room));
  proto::SubmitCommandRequest req{};
  req.context = a->hContext;
  req.flags = a->Flags;
  req.submission_id = next_submission_.fetch_add(1, std::memory_order_relaxed);
  if (gpup_status st = post(req, cmds); st < 0) return st;
  a->SubmissionId = req.submission_id;
  return GPUP_STATUS_SUCCESS;
}

// --- synchronization -------------------------------------------------------------------------------

gpup_status Session::create_sync_object(GPUPKMT_CREATESYNCHRONIZATIONOBJECT* a) {
  if (a->Type != GPUPKMT_SYNCOBJECT_MONITORED_FENCE)
    return fail(GPUP_STATUS_INVALID_PARAMETER, fmt::format("synchronization object type {} (only monitored fences)", a->Type));
  {
    std::lock_guard lk(mu_);
    if (!devices_.count(a->hDevice)) return bad_handle_locked("device", a->hDevice);
  }
  proto::CreateSyncObjectRequest req{};
  req.device = a->hDevice;
  req.type = a->Type;
  req.initial_value = a->InitialValue;
  // Registered (and, on a stream channel, the local fence copy seeded) on the receiver thread, so
  // that FenceValue / SignalGuestEvent notifications sent after the reply are applied after it.
  OnReply enter = [this, dev = a->hDevice, init = a->InitialValue](const proto::Message& m) {
    const auto rep = m.as<proto::CreateSyncObjectReply>();
    if (rep.sync_object == 0 || rep.fence_slot >= fence_slots_) return;
    if (local_fences_) __atomic_store_n(&local_fences_[rep.fence_slot], init, __ATOMIC_RELEASE);
    if (devices_.count(dev)) syncs_.insert_or_assign(rep.sync_object, SyncObj{dev, rep.fence_slot});
  };
  Reply r;
  if (gpup_status st = call(req, {}, r, std::move(enter)); st < 0) return st;
  const auto rep = r.fixed<proto::CreateSyncObjectReply>();
  if (rep.sync_object == 0 || rep.fence_slot >= fence_slots_) {
    const gpup_status st = fail(GPUP_STATUS_PROTOCOL_ERROR,
                                fmt::format("CreateSyncObject reply: handle {:#x}, fence slot {} of {}",
                                            rep.sync_object, rep.fence_slot, fence_slots_));
    if (rep.sync_object != 0) {
      const std::string keep = last_error_text();
      proto::DestroySyncObjectRequest d{};
      d.sync_object = rep.sync_object;
      Reply dr;
      (void)call(d, {}, dr);
      set_last_error_text(keep);
    }
    return st;
  }
  a->hSyncObject = rep.sync_object;
  a->pFenceValue = fence_values_ + rep.fence_slot;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::destroy_sync_object(const GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT* a) {
  {
    std::lock_guard lk(mu_);
    if (!syncs_.count(a->hSyncObject)) return bad_handle_locked("synchronization object", a->hSyncObject);
  }
  proto::DestroySyncObjectRequest req{};
  req.sync_object = a->hSyncObject;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  std::lock_guard lk(mu_);
  syncs_.erase(a->hSyncObject);
  const GPUPKMT_HANDLE h = a->hSyncObject;
  fail_waiters_locked([h](const Waiter& w) { return w.sync_object == h; }, GPUP_STATUS_INVALID_HANDLE,
                      fmt::format("synchronization object {:#x} was destroyed during the wait", h));
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::signal_from_cpu(const GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT* a) {
  uint32_t slot;
  {
    std::lock_guard lk(mu_);
    auto s = syncs_.find(a->hSyncObject);
    if (s == syncs_.end()) return bad_handle_locked("synchronization object", a->hSyncObject);
    slot = s->second.slot;
  }
  proto::SignalFromCpuRequest req{};
  req.sync_object = a->hSyncObject;
  req.value = a->Value;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  raise_local_fence(slot, a->Value);  // stream: visible at once, whatever the notification order
  return GPUP_STATUS_SUCCESS;
}

// SignalFromGpu and WaitFromGpu: the same checks and the same one-way message, different op.
template <typename Req>
gpup_status Session::gpu_fence_op(GPUPKMT_HANDLE context, GPUPKMT_HANDLE sync_object, uint64_t value) {
  {
    std::lock_guard lk(mu_);
    if (!syncs_.count(sync_object)) return bad_handle_locked("synchronization object", sync_object);
    auto c = contexts_.find(context);
    if (c == contexts_.end()) return bad_handle_locked("context", context);
    if (c->second.error < 0) return fail(c->second.error, c->second.error_text);
  }
  Req req{};
  req.context = context;
  req.sync_object = sync_object;
  req.value = value;
  return post(req);
}

gpup_status Session::signal_from_gpu(const GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT* a) {
  return gpu_fence_op<proto::SignalFromGpuRequest>(a->hContext, a->hSyncObject, a->Value);
}

gpup_status Session::wait_from_gpu(const GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT* a) {
  return gpu_fence_op<proto::WaitFromGpuRequest>(a->hContext, a->hSyncObject, a->Value);
}

bool Session::sleep_on_page(uint32_t slot, uint64_t value, std::chrono::steady_clock::time_point until) const {
  for (;;) {
    const uint64_t now_value = fence_value(slot);
    if (now_value >= value) return true;
    const auto left = until - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return false;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    timespec ts{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
    proto::sleep_on_fence(fence_values_ + slot, now_value, ts);
  }
}

gpup_status Session::wait_from_cpu(const GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT* a) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  uint32_t slot;
  GPUPKMT_HANDLE device;
  {
    std::lock_guard lk(mu_);
    auto s = syncs_.find(a->hSyncObject);
    if (s == syncs_.end()) return bad_handle_locked("synchronization object", a->hSyncObject);
    slot = s->second.slot;
    device = s->second.device;
  }
  if (fence_value(slot) >= a->Value) return GPUP_STATUS_SUCCESS;  // no crossing

  const auto timed_out = [&] {
    return fail(GPUP_STATUS_TIMEOUT, fmt::format("synchronization object {:#x} did not reach {} within {} ms (at {})",
                                                 a->hSyncObject, a->Value, a->TimeoutMs, fence_value(slot)));
  };
  // Why waiting is pointless (SUCCESS: it is not).
  const auto unusable_locked = [&](std::string* text) -> gpup_status {
    if (lost_) {
      *text = lost_text_;
      return GPUP_STATUS_CONNECTION_LOST;
    }
    auto d = devices_.find(device);
    return d != devices_.end() ? device_failure(d->second, text) : GPUP_STATUS_SUCCESS;
  };
  // Sleep on the slot itself first, without a message, for up to page_wait_: the host wakes the
  // shared page's slot with every new value, and on a stream channel the receiver does the same
  // for the local copy when a FenceValue notification arrives. Longer waits go on below, where
  // the host's signal and a lost device or connection end them.
  if (a->TimeoutMs != 0 && page_wait_.count() > 0) {
    {
      std::lock_guard lk(mu_);
      std::string text;
      if (gpup_status why = unusable_locked(&text); why < 0) return fail(why, text);
    }
    auto until = start + page_wait_;
    if (a->TimeoutMs > 0) until = std::min(until, start + std::chrono::milliseconds(a->TimeoutMs));
    if (sleep_on_page(slot, a->Value, until)) return GPUP_STATUS_SUCCESS;
  }
  Waiter w;
  w.event_id = next_event_.fetch_add(1, std::memory_order_relaxed);
  w.sync_object = a->hSyncObject;
  w.device = device;
  {
    std::lock_guard lk(mu_);
    std::string text;
    if (gpup_status why = unusable_locked(&text); why < 0) return fail(why, text);
    // The shared page is authoritative: a zero timeout needs no crossing.
    if (a->TimeoutMs == 0 && page_state_counter_ != nullptr) return timed_out();
    waiters_.emplace(w.event_id, &w);  // before sending: the signal may beat the reply
  }
  struct Unregister {
    Session* s;
    uint64_t id;
    ~Unregister() {
      std::lock_guard lk(s->mu_);
      s->waiters_.erase(id);
    }
  } unregister{this, w.event_id};

  proto::WaitFromCpuRequest req{};
  req.sync_object = a->hSyncObject;
  req.value = a->Value;
  req.event_id = w.event_id;
  Reply r;
  const gpup_status st = call(req, {}, r, {}, /*allow_pending=*/true);
  if (st < 0) return st;
  raise_local_fence(slot, r.fixed<proto::WaitFromCpuReply>().current_value);
  if (st == GPUP_STATUS_SUCCESS) return GPUP_STATUS_SUCCESS;  // reached meanwhile

  // PENDING: the host sends SignalGuestEvent(event_id). Check the page briefly first; a signal
  // that then arrives for this event is ignored.
  const auto spin_end = Clock::now() + std::chrono::microseconds(20);
  while (Clock::now() < spin_end) {
    if (fence_value(slot) >= a->Value) return GPUP_STATUS_SUCCESS;
  }
  std::unique_lock lk(mu_);
  const auto done = [&] { return w.done; };
  if (a->TimeoutMs < 0) {
    w.cv.wait(lk, done);
  } else if (!w.cv.wait_until(lk, start + std::chrono::milliseconds(a->TimeoutMs), done)) {
    lk.unlock();
    if (fence_value(slot) >= a->Value) return GPUP_STATUS_SUCCESS;
    return timed_out();
  }
  if (w.status < 0) return fail(w.status, w.text);
  return GPUP_STATUS_SUCCESS;
}

// --- escapes, state, statistics --------------------------------------------------------------------

gpup_status Session::escape(GPUPKMT_ESCAPE* a) {
  Bytes priv;
  if (gpup_status st = input(a->pPrivateDriverData, a->PrivateDriverDataSize, "pPrivateDriverData", priv); st < 0)
    return st;
  if (gpup_status st = check_output(a->pOutputData, a->OutputDataSize, "pOutputData"); st < 0) return st;
  a->OutputDataWritten = 0;
  uint64_t luid;
  {
    std::lock_guard lk(mu_);
    if (!adapter_luid_locked(a->hAdapter, &luid)) return bad_handle("adapter", a->hAdapter);
    if (a->hDevice != 0) {
      auto d = devices_.find(a->hDevice);
      if (d == devices_.end()) return bad_handle_locked("device", a->hDevice);
      if (d->second.adapter_luid != luid)
        return fail(GPUP_STATUS_INVALID_PARAMETER,
                    fmt::format("device {:#x} belongs to another adapter than {:#x}", a->hDevice, a->hAdapter));
    }
  }
  Bulk bulk(this);
  if (gpup_status st = prepare_bulk(proto::Op::Escape, priv, a->OutputDataSize, bulk); st < 0) return st;
  proto::EscapeRequest req{};
  req.adapter_luid = luid;
  req.device = a->hDevice;
  req.flags = a->Flags;
  req.output_size = bulk.inline_output;
  req.private_data = bulk.private_data;
  req.output = bulk.output;
  Reply r;
  if (gpup_status st = call(req, bulk.tail, r); st < 0) return st;
  const auto rep = r.fixed<proto::EscapeReply>();
  if (bulk.output.section != 0)
    return copy_section_output("Escape", rep.written, r.tail(), bulk, a->pOutputData, &a->OutputDataWritten);
  return copy_output("Escape", rep.written, r.tail(), a->pOutputData, bulk.inline_output, &a->OutputDataWritten);
}

gpup_status Session::get_device_state(GPUPKMT_GETDEVICESTATE* a) {
  {
    std::lock_guard lk(mu_);
    auto d = devices_.find(a->hDevice);
    if (d == devices_.end()) return bad_handle_locked("device", a->hDevice);
    const DeviceObj& dev = d->second;
    if (dev.error < 0) {  // a faulted context: RESET with its reason, no crossing
      a->State = GPUPKMT_DEVICESTATE_RESET;
      a->Reason = dev.error;
      return GPUP_STATUS_SUCCESS;
    }
    // Without a fence page, notifications are the only source of change.
    const bool fresh = page_state_counter_ == nullptr ||
                       __atomic_load_n(page_state_counter_, __ATOMIC_ACQUIRE) == dev.state_counter;
    if (fresh) {
      a->State = dev.state;
      a->Reason = dev.reason;
      return GPUP_STATUS_SUCCESS;
    }
  }
  proto::GetDeviceStateRequest req{};
  req.device = a->hDevice;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  const auto rep = r.fixed<proto::GetDeviceStateReply>();
  if (rep.state > GPUPKMT_DEVICESTATE_REMOVED)
    return fail(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("GetDeviceState reply: unknown state {}", rep.state));
  std::lock_guard lk(mu_);
  auto d = devices_.find(a->hDevice);
  if (d != devices_.end()) {
    d->second.state = rep.state;
    d->second.reason = rep.reason;
    d->second.state_counter = rep.state_counter;
    if (d->second.error < 0) {  // a ContextError overtook the reply
      a->State = GPUPKMT_DEVICESTATE_RESET;
      a->Reason = d->second.error;
      return GPUP_STATUS_SUCCESS;
    }
  }
  a->State = rep.state;
  a->Reason = rep.reason;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::query_video_memory_info(GPUPKMT_QUERYVIDEOMEMORYINFO* a) {
  uint64_t luid;
  if (gpup_status st = adapter_luid(a->hAdapter, &luid); st < 0) return st;
  proto::QueryVideoMemoryInfoRequest req{};
  req.adapter_luid = luid;
  req.segment_group = 0;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  const auto rep = r.fixed<proto::QueryVideoMemoryInfoReply>();
  a->Budget = rep.budget;
  a->CurrentUsage = rep.current_usage;
  a->CurrentReservation = rep.current_reservation;
  a->AvailableForReservation = rep.available_for_reservation;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Session::query_statistics(GPUPKMT_QUERYSTATISTICS* a) {
  proto::QueryStatisticsRequest req{};
  req.type = a->Type;
  Reply r;
  if (gpup_status st = call(req, {}, r); st < 0) return st;
  const auto rep = r.fixed<proto::QueryStatisticsReply>();
  a->Processes = rep.processes;
  a->Devices = rep.devices;
  a->Contexts = rep.contexts;
  a->Allocations = rep.allocations;
  a->SyncObjects = rep.sync_objects;
  a->VaMappings = rep.va_mappings;
  a->Reserved = 0;
  a->VramUsed = rep.vram_used;
  a->VramMax = rep.vram_max;
  a->Submissions = rep.submissions;
  a->Faults = rep.faults;
  return GPUP_STATUS_SUCCESS;
}

}  // namespace gpup::kmt
