#include "guest/kmt/fake_host.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "protocol/fence_page.h"

namespace gpup::kmt::test {

namespace {

using Bytes = std::span<const uint8_t>;

template <typename Notify>
std::vector<uint8_t> note(const Notify& n, Bytes tail = {}) {
  auto enc = proto::encode_request(n, 0, tail);
  return enc ? enc->flatten() : std::vector<uint8_t>();
}

Bytes bytes_of(const std::string& s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }

}  // namespace

proto::AdapterDesc fake_adapter() {
  proto::AdapterDesc d{};
  d.luid = kFakeLuid;
  d.flags = 0x2;  // COMPUTE_ONLY
  d.budget = 1ull << 30;
  std::snprintf(d.description, sizeof d.description, "gpup fake adapter");
  return d;
}

FakeHost::FakeHost(Options options) : options_(std::move(options)) {
  static std::atomic<int> counter{0};
  path_ = fmt::format("/tmp/gpupkmt-test-{}-{}.sock", ::getpid(), counter.fetch_add(1));
  auto l = channel::Listener::listen_unix(path_);
  if (!l) throw std::runtime_error("listen_unix: " + l.error().describe());
  listener_ = std::make_unique<channel::Listener>(std::move(*l));

  fence_page_size_ = sizeof(proto::FencePageHeader) + size_t{options_.fence_slots} * 8;
  fence_fd_.reset(::memfd_create("fake-fence-page", MFD_CLOEXEC));
  if (!fence_fd_ || ::ftruncate(fence_fd_.get(), static_cast<off_t>(fence_page_size_)) != 0)
    throw std::runtime_error("fence page memfd");
  void* p = ::mmap(nullptr, fence_page_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fence_fd_.get(), 0);
  if (p == MAP_FAILED) throw std::runtime_error("fence page mmap");
  fence_page_ = static_cast<uint8_t*>(p);
  proto::FencePageHeader h{proto::kFencePageMagic, options_.fence_slots, 0, 0};
  std::memcpy(fence_page_, &h, sizeof h);
  stream_fences_.assign(options_.fence_slots, 0);

  thread_ = std::thread([this] { serve(); });
}

FakeHost::~FakeHost() {
  stop_ = true;
  std::shared_ptr<channel::Channel> ch;
  {
    std::lock_guard lk(mu_);
    ch = ch_;
  }
  if (ch) ch->shutdown();
  thread_.join();
  ::munmap(fence_page_, fence_page_size_);
  for (auto& [h, sec] : sections_) ::munmap(sec.map, sec.size);
}

size_t FakeHost::live_sections() const {
  std::lock_guard lk(mu_);
  return sections_.size();
}

std::span<uint8_t> FakeHost::section_span(uint32_t section, uint64_t offset, uint64_t size) const {
  std::lock_guard lk(mu_);
  auto it = sections_.find(section);
  if (it == sections_.end() || offset > it->second.size || size > it->second.size - offset) return {};
  return {it->second.map + offset, size};
}

std::vector<uint8_t> FakeHost::last_private_data() const {
  std::lock_guard lk(mu_);
  return last_private_data_;
}

std::vector<uint8_t> FakeHost::private_data_of(const proto::Message& m) const {
  proto::SectionRef ref{};
  if (m.op() == proto::Op::CreateAllocation) ref = m.as<proto::CreateAllocationRequest>().private_data;
  if (m.op() == proto::Op::Escape) ref = m.as<proto::EscapeRequest>().private_data;
  if (ref.section == 0) return {m.tail.begin(), m.tail.end()};
  auto span = section_span(ref.section, ref.offset, ref.size);
  return {span.begin(), span.end()};
}

void FakeHost::set_hook(Hook hook) {
  std::lock_guard lk(mu_);
  hook_ = std::move(hook);
}

uint64_t FakeHost::received(proto::Op op) const {
  std::lock_guard lk(mu_);
  auto it = counts_.find(static_cast<uint16_t>(op));
  return it == counts_.end() ? 0 : it->second;
}

bool FakeHost::wait_received(proto::Op op, uint64_t n, int timeout_ms) const {
  std::unique_lock lk(mu_);
  return cv_.wait_for(lk, std::chrono::milliseconds(timeout_ms), [&] {
    auto it = handled_.find(static_cast<uint16_t>(op));
    return it != handled_.end() && it->second >= n;
  });
}

bool FakeHost::shares_memory() const {
  std::lock_guard lk(mu_);
  return ch_ && ch_->shares_memory();
}

void FakeHost::send(const proto::Encoded& enc) {
  std::shared_ptr<channel::Channel> ch;
  {
    std::lock_guard lk(mu_);
    ch = ch_;
  }
  if (!ch) return;
  auto parts = enc.parts();
  (void)ch->send(std::span<const std::span<const uint8_t>>(parts));
}

void FakeHost::send_raw(Bytes bytes) {
  std::shared_ptr<channel::Channel> ch;
  {
    std::lock_guard lk(mu_);
    ch = ch_;
  }
  if (ch && !bytes.empty()) (void)ch->send(bytes);
}

void FakeHost::reply_error(const proto::Message& req, gpup_status status, const std::string& text) {
  send(proto::encode_error_reply(req.op(), req.header.txn, status, text));
}

void FakeHost::drop_connection() {
  std::shared_ptr<channel::Channel> ch;
  {
    std::lock_guard lk(mu_);
    ch = ch_;
  }
  if (ch) ch->shutdown();
}

uint64_t FakeHost::fence_locked(uint32_t slot) const {
  if (ch_ && ch_->shares_memory()) {
    return __atomic_load_n(reinterpret_cast<const uint64_t*>(fence_page_ + sizeof(proto::FencePageHeader)) + slot,
                           __ATOMIC_ACQUIRE);
  }
  return stream_fences_[slot];
}

void FakeHost::set_fence_locked(uint32_t sync_object, uint64_t value, std::vector<std::vector<uint8_t>>& notes) {
  auto it = sync_slots_.find(sync_object);
  if (it == sync_slots_.end()) return;
  const uint32_t slot = it->second;
  if (ch_ && ch_->shares_memory()) {
    uint64_t* v = reinterpret_cast<uint64_t*>(fence_page_ + sizeof(proto::FencePageHeader)) + slot;
    __atomic_store_n(v, value, __ATOMIC_RELEASE);
    proto::wake_fence_sleepers(v);  // as the worker does
  } else {
    stream_fences_[slot] = value;
    notes.push_back(note(proto::FenceValueRequest{sync_object, slot, value}));
  }
}

void FakeHost::set_fence(uint32_t sync_object, uint64_t value) {
  std::vector<std::vector<uint8_t>> notes;
  {
    std::lock_guard lk(mu_);
    set_fence_locked(sync_object, value, notes);
  }
  for (auto& n : notes) send_raw(n);
}

void FakeHost::signal(uint32_t sync_object, uint64_t value) {
  std::vector<std::vector<uint8_t>> notes;
  {
    std::lock_guard lk(mu_);
    set_fence_locked(sync_object, value, notes);
    for (auto it = waits_.begin(); it != waits_.end();) {
      if (it->sync_object == sync_object && it->value <= value) {
        notes.push_back(note(proto::SignalGuestEventRequest{it->event_id, sync_object, 0, value}));
        it = waits_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& n : notes) send_raw(n);
}

void FakeHost::context_error(uint32_t context, gpup_status status, uint64_t submission_id, const std::string& text) {
  send_raw(note(proto::ContextErrorRequest{context, status, submission_id}, bytes_of(text)));
}

void FakeHost::device_state_changed(uint32_t device, uint32_t state, gpup_status reason) {
  std::vector<uint8_t> n;
  {
    std::lock_guard lk(mu_);
    device_state_ = state;
    device_reason_ = reason;
    ++state_counter_;
    __atomic_store_n(reinterpret_cast<uint32_t*>(fence_page_ + offsetof(proto::FencePageHeader, device_state_counter)),
                     state_counter_, __ATOMIC_RELEASE);
    n = note(proto::DeviceStateChangedRequest{device, state, reason, state_counter_});
  }
  send_raw(n);
}

void FakeHost::set_device_state_silently(uint32_t state, gpup_status reason) {
  std::lock_guard lk(mu_);
  device_state_ = state;
  device_reason_ = reason;
  ++state_counter_;
  __atomic_store_n(reinterpret_cast<uint32_t*>(fence_page_ + offsetof(proto::FencePageHeader, device_state_counter)),
                   state_counter_, __ATOMIC_RELEASE);
}

std::vector<uint8_t> FakeHost::allocation_bytes(uint32_t allocation) const {
  std::lock_guard lk(mu_);
  auto it = allocations_.find(allocation);
  if (it == allocations_.end()) return {};
  std::vector<uint8_t> out(it->second.size);
  if (::pread(it->second.memfd.get(), out.data(), out.size(), 0) != static_cast<ssize_t>(out.size())) out.clear();
  return out;
}

void FakeHost::fill_allocation(uint32_t allocation, uint8_t seed) {
  std::lock_guard lk(mu_);
  auto it = allocations_.find(allocation);
  if (it == allocations_.end()) return;
  std::vector<uint8_t> b(it->second.size);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(seed + i * 7);
  (void)!::pwrite(it->second.memfd.get(), b.data(), b.size(), 0);
}

std::vector<uint8_t> FakeHost::last_submission() const {
  std::lock_guard lk(mu_);
  return last_submission_;
}

uint64_t FakeHost::last_submission_id() const {
  std::lock_guard lk(mu_);
  return last_submission_id_;
}

void FakeHost::serve() {
  std::shared_ptr<channel::Channel> ch;
  while (!stop_) {
    auto r = listener_->accept(100);
    if (r) {
      ch = std::shared_ptr<channel::Channel>(std::move(*r));
      break;
    }
  }
  if (!ch) return;
  {
    std::lock_guard lk(mu_);
    ch_ = ch;
  }
  std::vector<uint8_t> buf;
  while (!stop_) {
    const gpup_status st = ch->receive(buf, 100);
    if (st == GPUP_STATUS_TIMEOUT) continue;
    if (st != GPUP_STATUS_SUCCESS) break;
    auto m = proto::decode(buf, proto::Direction::kGuestToHost);
    if (!m) {
      fmt::print(stderr, "fake host: guest sent a malformed message: {}\n", m.error().describe());
      break;
    }
    Hook hook;
    {
      std::lock_guard lk(mu_);  // counted before the reply goes out: a returned call is counted
      ++counts_[m->header.op];
      hook = hook_;
    }
    if (!hook || !hook(*this, *m)) handle(*m);
    {
      std::lock_guard lk(mu_);  // and once its effects are in place, for wait_received()
      ++handled_[m->header.op];
    }
    cv_.notify_all();
  }
}

void FakeHost::handle(const proto::Message& m) {
  using proto::Op;
  switch (m.op()) {
    case Op::Hello: {
      if (options_.hello_error < 0) {
        reply_error(m, options_.hello_error, options_.hello_error_text);
        return;
      }
      proto::HelloReply rep{};
      rep.version = proto::kVersion;
      rep.adapter_count = static_cast<uint32_t>(options_.adapters.size());
      rep.fence_slots = options_.fence_slots;
      rep.max_message_size = proto::kMaxMessageSize;
      if (shares_memory()) {
        rep.fence_section = 1;
        std::shared_ptr<channel::Channel> ch;
        {
          std::lock_guard lk(mu_);
          ch = ch_;
        }
        (void)ch->send_fd(rep.fence_section, fence_fd_.get());
      }
      reply<Op::Hello>(m, rep,
                       Bytes(reinterpret_cast<const uint8_t*>(options_.adapters.data()),
                             options_.adapters.size() * sizeof(proto::AdapterDesc)));
      return;
    }
    case Op::CreateDevice: {
      uint32_t h, counter;
      {
        std::lock_guard lk(mu_);
        h = 0x100 + next_handle_++;
        counter = state_counter_;
      }
      reply<Op::CreateDevice>(m, {h, counter});
      return;
    }
    case Op::CreateContext: {
      uint32_t h;
      {
        std::lock_guard lk(mu_);
        h = 0x200 + next_handle_++;
      }
      reply<Op::CreateContext>(m, {h, 0});
      return;
    }
    case Op::RegisterSection: {
      const auto req = m.as<proto::RegisterSectionRequest>();
      std::shared_ptr<channel::Channel> ch;
      {
        std::lock_guard lk(mu_);
        ch = ch_;
      }
      UniqueFd fd;
      if (ch->receive_fd(req.fd_id, fd, 2000) != GPUP_STATUS_SUCCESS) {
        reply_error(m, GPUP_STATUS_INVALID_PARAMETER, "fake host: no fd with the section");
        return;
      }
      const int seals = ::fcntl(fd.get(), F_GET_SEALS);
      struct stat st {};
      if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)) != (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) ||
          ::fstat(fd.get(), &st) != 0 || static_cast<uint64_t>(st.st_size) != req.size) {
        reply_error(m, GPUP_STATUS_INVALID_PARAMETER, "fake host: section not sealed or of the wrong size");
        return;
      }
      void* p = ::mmap(nullptr, req.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
      if (p == MAP_FAILED) {
        reply_error(m, GPUP_STATUS_NO_MEMORY, "fake host: mmap");
        return;
      }
      uint32_t h;
      {
        std::lock_guard lk(mu_);
        h = 0x500 + next_handle_++;
        sections_[h] = {static_cast<uint8_t*>(p), req.size};
      }
      reply<Op::RegisterSection>(m, {h, 0});
      return;
    }
    case Op::UnregisterSection: {
      const auto req = m.as<proto::UnregisterSectionRequest>();
      bool found = false;
      {
        std::lock_guard lk(mu_);
        auto it = sections_.find(req.section);
        if (it != sections_.end()) {
          ::munmap(it->second.map, it->second.size);
          sections_.erase(it);
          found = true;
        }
      }
      if (!found) {
        reply_error(m, GPUP_STATUS_INVALID_HANDLE, "fake host: no such section");
        return;
      }
      reply<Op::UnregisterSection>(m, {0});
      return;
    }
    case Op::CreateAllocation: {
      const auto req = m.as<proto::CreateAllocationRequest>();
      {
        auto priv = private_data_of(m);
        std::lock_guard lk(mu_);
        last_private_data_ = std::move(priv);
      }
      Allocation a;
      a.memfd.reset(::memfd_create("fake-allocation", MFD_CLOEXEC));
      a.size = req.size;
      if (::ftruncate(a.memfd.get(), static_cast<off_t>(req.size)) != 0) {
        reply_error(m, GPUP_STATUS_NO_MEMORY, "ftruncate");
        return;
      }
      uint32_t h;
      {
        std::lock_guard lk(mu_);
        h = 0x300 + next_handle_++;
        allocations_[h] = std::move(a);
      }
      if (req.output.section != 0) {
        auto out = section_span(req.output.section, req.output.offset, req.output.size);
        const std::string text = out.size() >= 5 ? "built" : "";
        std::memcpy(out.data(), text.data(), text.size());
        reply<Op::CreateAllocation>(m, {h, static_cast<uint32_t>(text.size()), 0, 0});
        return;
      }
      const std::string out = req.output_size >= 5 ? "built" : "";
      reply<Op::CreateAllocation>(m, {h, static_cast<uint32_t>(out.size()), 0, 0}, bytes_of(out));
      return;
    }
    case Op::DestroyAllocation: {
      const auto req = m.as<proto::DestroyAllocationRequest>();
      {
        std::lock_guard lk(mu_);
        allocations_.erase(req.allocation);
      }
      reply<Op::DestroyAllocation>(m, {0});
      return;
    }
    case Op::Lock: {
      const auto req = m.as<proto::LockRequest>();
      std::shared_ptr<channel::Channel> ch;
      int fd = -1;
      uint64_t size = 0, section = 0;
      {
        std::lock_guard lk(mu_);
        auto it = allocations_.find(req.allocation);
        if (it == allocations_.end()) {
          ch = nullptr;
        } else {
          ch = ch_;
          fd = it->second.memfd.get();
          size = it->second.size;
          if (ch_->shares_memory()) section = next_section_++;
        }
      }
      if (!ch) {
        reply_error(m, GPUP_STATUS_INVALID_HANDLE, "no such allocation");
        return;
      }
      if (section) (void)ch->send_fd(section, fd);
      reply<Op::Lock>(m, {size, section});
      return;
    }
    case Op::ReadAllocation: {
      const auto req = m.as<proto::ReadAllocationRequest>();
      std::vector<uint8_t> data(req.size);
      {
        std::lock_guard lk(mu_);
        auto it = allocations_.find(req.allocation);
        if (it == allocations_.end() || ::pread(it->second.memfd.get(), data.data(), data.size(),
                                                static_cast<off_t>(req.offset)) != static_cast<ssize_t>(data.size())) {
          data.clear();
        }
      }
      if (data.size() != req.size) {
        reply_error(m, GPUP_STATUS_OUT_OF_RANGE, "read outside the allocation");
        return;
      }
      reply<Op::ReadAllocation>(m, {0}, data);
      return;
    }
    case Op::WriteAllocation: {
      const auto req = m.as<proto::WriteAllocationRequest>();
      bool ok = false;
      {
        std::lock_guard lk(mu_);
        auto it = allocations_.find(req.allocation);
        ok = it != allocations_.end() && ::pwrite(it->second.memfd.get(), m.tail.data(), m.tail.size(),
                                                  static_cast<off_t>(req.offset)) == static_cast<ssize_t>(m.tail.size());
      }
      if (!ok) {
        reply_error(m, GPUP_STATUS_OUT_OF_RANGE, "write outside the allocation");
        return;
      }
      reply<Op::WriteAllocation>(m, {0});
      return;
    }
    case Op::ReserveGpuVa: {
      const auto req = m.as<proto::ReserveGpuVaRequest>();
      reply<Op::ReserveGpuVa>(m, {req.base ? req.base : 0x1'0000'0000ull});
      return;
    }
    case Op::SubmitCommand: {
      std::lock_guard lk(mu_);
      last_submission_.assign(m.tail.begin(), m.tail.end());
      last_submission_id_ = m.as<proto::SubmitCommandRequest>().submission_id;
      return;
    }
    case Op::CreateSyncObject: {
      const auto req = m.as<proto::CreateSyncObjectRequest>();
      uint32_t h, slot;
      {
        std::lock_guard lk(mu_);
        h = 0x400 + next_handle_++;
        slot = static_cast<uint32_t>(sync_slots_.size());
        sync_slots_[h] = slot;
        // The initial value goes into the page; on a stream channel no notification is sent (the
        // guest seeds its copy from the request).
        if (ch_->shares_memory()) {
          __atomic_store_n(reinterpret_cast<uint64_t*>(fence_page_ + sizeof(proto::FencePageHeader)) + slot,
                           req.initial_value, __ATOMIC_RELEASE);
        } else {
          stream_fences_[slot] = req.initial_value;
        }
      }
      reply<Op::CreateSyncObject>(m, {h, slot});
      return;
    }
    case Op::SignalFromCpu: {
      const auto req = m.as<proto::SignalFromCpuRequest>();
      signal(req.sync_object, req.value);
      reply<Op::SignalFromCpu>(m, {0});
      return;
    }
    case Op::SignalFromGpu: {
      const auto req = m.as<proto::SignalFromGpuRequest>();
      signal(req.sync_object, req.value);
      return;
    }
    case Op::WaitFromGpu:
      return;
    case Op::WaitFromCpu: {
      const auto req = m.as<proto::WaitFromCpuRequest>();
      uint64_t cur = 0;
      bool reached = false;
      {
        std::lock_guard lk(mu_);
        auto it = sync_slots_.find(req.sync_object);
        if (it != sync_slots_.end()) {
          cur = fence_locked(it->second);
          reached = cur >= req.value;
          if (!reached) waits_.push_back({req.event_id, req.sync_object, req.value});
        }
      }
      reply<Op::WaitFromCpu>(m, {cur}, {}, reached ? GPUP_STATUS_SUCCESS : GPUP_STATUS_PENDING);
      return;
    }
    case Op::Escape: {
      // Echoes the private data into the output, as much as fits.
      const auto req = m.as<proto::EscapeRequest>();
      auto priv = private_data_of(m);
      {
        std::lock_guard lk(mu_);
        last_private_data_ = priv;
      }
      if (req.output.section != 0) {
        auto out = section_span(req.output.section, req.output.offset, req.output.size);
        const size_t n = std::min(priv.size(), out.size());
        if (n) std::memcpy(out.data(), priv.data(), n);
        reply<Op::Escape>(m, {static_cast<uint32_t>(n), 0});
        return;
      }
      const size_t n = std::min<size_t>(priv.size(), req.output_size);
      reply<Op::Escape>(m, {static_cast<uint32_t>(n), 0}, Bytes(priv.data(), n));
      return;
    }
    case Op::QueryAdapterInfo: {
      const auto req = m.as<proto::QueryAdapterInfoRequest>();
      const uint32_t v = req.type * 10;
      const size_t n = req.output_size >= sizeof v ? sizeof v : 0;
      reply<Op::QueryAdapterInfo>(m, {static_cast<uint32_t>(n), 0}, Bytes(reinterpret_cast<const uint8_t*>(&v), n));
      return;
    }
    case Op::GetDeviceState: {
      proto::GetDeviceStateReply rep{};
      {
        std::lock_guard lk(mu_);
        rep.state = device_state_;
        rep.reason = device_reason_;
        rep.state_counter = state_counter_;
      }
      reply<Op::GetDeviceState>(m, rep);
      return;
    }
    case Op::QueryVideoMemoryInfo:
      reply<Op::QueryVideoMemoryInfo>(m, {1ull << 30, 4096, 0, 1ull << 29});
      return;
    case Op::QueryStatistics:
      reply<Op::QueryStatistics>(m, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
      return;
    case Op::DestroyDevice:
      reply<Op::DestroyDevice>(m, {0});
      return;
    case Op::DestroyContext:
      reply<Op::DestroyContext>(m, {0});
      return;
    case Op::Unlock:
      reply<Op::Unlock>(m, {0});
      return;
    case Op::MapGpuVa:
      reply<Op::MapGpuVa>(m, {0});
      return;
    case Op::FreeGpuVa:
      reply<Op::FreeGpuVa>(m, {0});
      return;
    case Op::DestroySyncObject:
      reply<Op::DestroySyncObject>(m, {0});
      return;
    default:
      if (m.info->kind == proto::Kind::SYNC) reply_error(m, GPUP_STATUS_NOT_SUPPORTED, "fake host: not implemented");
      return;
  }
}

}  // namespace gpup::kmt::test
