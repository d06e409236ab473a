// The transport half of a Session: connecting, Hello, request/reply matching, the receiver
// thread, notifications and connection loss. The thunks themselves are in objects.cpp.
#include "guest/kmt/session.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include <fmt/format.h>

#include "protocol/fence_page.h"

namespace gpup::kmt {

// --- errors and logging --------------------------------------------------------------------------

namespace {
thread_local std::string t_last_error;
}  // namespace

gpup_status fail(gpup_status status, std::string text) {
  t_last_error = text.empty() ? std::string(gpup_status_message(status)) : std::move(text);
  return status;
}

const char* last_error_text() { return t_last_error.c_str(); }

void set_last_error_text(std::string text) { t_last_error = std::move(text); }

spdlog::logger& logger() {
  // Deliberately never destroyed: the receiver thread may log while the process exits.
  static spdlog::logger* const instance = [] {
    auto* l = new spdlog::logger("gpupkmt", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    l->set_pattern("[%H:%M:%S.%e] [%n] [%^%l%$] %v");
    auto level = spdlog::level::warn;
    if (const char* env = std::getenv("GPUP_LOG"); env && *env) level = spdlog::level::from_str(env);
    l->set_level(level);
    return l;
  }();
  return *instance;
}

// --- Mapping -----------------------------------------------------------------------------------

Mapping::Mapping(Mapping&& o) noexcept : addr_(std::exchange(o.addr_, nullptr)), len_(std::exchange(o.len_, 0)) {}

Mapping& Mapping::operator=(Mapping&& o) noexcept {
  if (this != &o) {
    reset();
    addr_ = std::exchange(o.addr_, nullptr);
    len_ = std::exchange(o.len_, 0);
  }
  return *this;
}

void Mapping::reset() {
  if (addr_) ::munmap(addr_, len_);
  addr_ = nullptr;
  len_ = 0;
}

gpup_status Mapping::anonymous(size_t len, Mapping& out) {
  if (len == 0) return fail(GPUP_STATUS_INVALID_PARAMETER, "cannot map 0 bytes");
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED)
    return fail(GPUP_STATUS_NO_MEMORY, fmt::format("cannot allocate a {}-byte guest buffer: {}", len, std::strerror(errno)));
  out.reset();
  out.addr_ = p;
  out.len_ = len;
  return GPUP_STATUS_SUCCESS;
}

gpup_status Mapping::shared(int fd, size_t len, int prot, const char* what, Mapping& out) {
  if (len == 0) return fail(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("{}: the host announced 0 bytes", what));
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    return fail(GPUP_STATUS_PROTOCOL_ERROR, fmt::format("{}: fstat of the host's section failed: {}", what, std::strerror(errno)));
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) < len)
    return fail(GPUP_STATUS_PROTOCOL_ERROR,
                fmt::format("{}: the host's section is {} bytes, {} announced", what, st.st_size, len));
  void* p = ::mmap(nullptr, len, prot, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED)
    return fail(GPUP_STATUS_NO_MEMORY, fmt::format("{}: cannot map {} bytes: {}", what, len, std::strerror(errno)));
  out.reset();
  out.addr_ = p;
  out.len_ = len;
  return GPUP_STATUS_SUCCESS;
}

// --- connecting ----------------------------------------------------------------------------------

Session::Session(std::unique_ptr<channel::Channel> ch) : ch_(std::move(ch)), shares_memory_(ch_->shares_memory()) {
  if (const char* v = std::getenv("GPUP_FENCE_SLEEP_MS"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long ms = std::strtol(v, &end, 10);
    if (*end == '\0' && ms >= 0 && ms <= 60000) {
      page_wait_ = std::chrono::milliseconds(ms);
    } else {
      logger().warn("GPUP_FENCE_SLEEP_MS=\"{}\": expected 0 .. 60000; using {} ms", v, page_wait_.count());
    }
  }
}

Session::~Session() { shutdown(); }

Result<std::shared_ptr<Session>> Session::connect(const std::string& endpoint, const channel::ChannelOptions& options) {
  auto ch = channel::connect(endpoint, options);
  if (!ch) {
    gpup_status st = ch.error().status;
    switch (st) {
      case GPUP_STATUS_VERSION_MISMATCH:  // the channel layer's own version
      case GPUP_STATUS_INVALID_PARAMETER:  // a malformed endpoint
      case GPUP_STATUS_NOT_SUPPORTED:      // e.g. GPUP_TRANSPORT=shm over TCP
      case GPUP_STATUS_NO_MEMORY:
        break;
      default:  // nobody there, refused, timed out, garbage answer: no VRD answers
        st = GPUP_STATUS_CONNECTION_LOST;
        break;
    }
    return Error(st, fmt::format("cannot connect to the VRD at \"{}\": {}", endpoint, ch.error().describe()));
  }
  std::shared_ptr<Session> s(new Session(std::move(*ch)));

  // The receiver thread runs with every signal blocked: the application's handlers stay on its
  // own threads.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  try {
    s->receiver_ = std::thread([p = s.get()] { p->receive_loop(); });
  } catch (const std::system_error& e) {
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return Error(GPUP_STATUS_NO_MEMORY, fmt::format("cannot start the receiver thread: {}", e.what()));
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  pthread_setname_np(s->receiver_.native_handle(), "gpupkmt-rx");

  if (const gpup_status st = s->hello(); st < 0) return Error(st, last_error_text());  // ~Session joins
  return s;
}

namespace {

// /proc/self/comm without the newline, cut to fit.
void process_name(char (&out)[64]) {
  std::memset(out, 0, sizeof out);
  std::ifstream f("/proc/self/comm");
  std::string name;
  if (f) std::getline(f, name);
  if (name.empty()) name = "unknown";
  std::memcpy(out, name.data(), std::min(name.size(), sizeof out - 1));
}

}  // namespace

gpup_status Session::hello() {
  proto::HelloRequest req{};
  req.version_min = proto::kLastCompatibleVersion;
  req.version_max = proto::kVersion;
  req.guest_caps = 0;
  req.pid = static_cast<uint32_t>(::getpid());
  process_name(req.process_name);

  Reply r;
  gpup_status st = call(req, {}, r);
  if (st < 0) return st;  // e.g. VERSION_MISMATCH with the host's text
  const auto rep = r.fixed<proto::HelloReply>();
  if (rep.version < proto::kLastCompatibleVersion || rep.version > proto::kVersion)
    return fail(GPUP_STATUS_VERSION_MISMATCH,
                fmt::format("the host chose protocol version {}; this library speaks {}..{}", rep.version,
                            proto::kLastCompatibleVersion, proto::kVersion));
  if (rep.adapter_count > GPUPKMT_ADAPTERS_MAX)
    return fail(GPUP_STATUS_PROTOCOL_ERROR,
                fmt::format("Hello reply: {} adapters (at most {})", rep.adapter_count, GPUPKMT_ADAPTERS_MAX));
  // adapter_count <= 16, so the product cannot overflow.
  const size_t want = size_t{rep.adapter_count} * sizeof(proto::AdapterDesc);
  if (r.tail().size() != want)
    return fail(GPUP_STATUS_PROTOCOL_ERROR,
                fmt::format("Hello reply: {} adapters need {} tail bytes, {} received", rep.adapter_count, want,
                            r.tail().size()));
  if (rep.fence_slots > kMaxFenceSlots)
    return fail(GPUP_STATUS_PROTOCOL_ERROR,
                fmt::format("Hello reply: {} fence slots (at most {})", rep.fence_slots, kMaxFenceSlots));

  std::vector<proto::AdapterDesc> adapters(rep.adapter_count);
  for (uint32_t i = 0; i < rep.adapter_count; ++i) {
    std::memcpy(&adapters[i], r.tail().data() + size_t{i} * sizeof(proto::AdapterDesc), sizeof(proto::AdapterDesc));
    adapters[i].description[sizeof adapters[i].description - 1] = '\0';
  }

  Mapping page;
  std::unique_ptr<uint64_t[]> local;
  const uint64_t* values = nullptr;
  const uint32_t* counter = nullptr;
  if (shares_memory_ && rep.fence_section != 0) {
    UniqueFd fd;
    st = ch_->receive_fd(rep.fence_section, fd, kFdTimeoutMs);
    if (st != GPUP_STATUS_SUCCESS)
      return fail(st == GPUP_STATUS_TIMEOUT ? GPUP_STATUS_PROTOCOL_ERROR : st,
                  fmt::format("Hello: the fence page (section {}) did not arrive: {}", rep.fence_section,
                              channel::last_error().message));
    const size_t bytes = sizeof(proto::FencePageHeader) + size_t{rep.fence_slots} * sizeof(uint64_t);
    st = Mapping::shared(fd.get(), bytes, PROT_READ, "fence page", page);
    if (st < 0) return st;
    proto::FencePageHeader h;
    std::memcpy(&h, page.data(), sizeof h);
    if (h.magic != proto::kFencePageMagic || h.fence_slots != rep.fence_slots)
      return fail(GPUP_STATUS_PROTOCOL_ERROR,
                  fmt::format("fence page: magic {:#x} (want {:#x}), {} slots (Hello said {})", h.magic,
                              proto::kFencePageMagic, h.fence_slots, rep.fence_slots));
    const auto* base = static_cast<const uint8_t*>(page.data());
    values = reinterpret_cast<const uint64_t*>(base + sizeof(proto::FencePageHeader));
    counter = reinterpret_cast<const uint32_t*>(base + offsetof(proto::FencePageHeader, device_state_counter));
  } else {
    if (rep.fence_section != 0)
      logger().warn("Hello: the host named fence section {} on a stream channel; using notifications",
                    rep.fence_section);
    local = std::make_unique<uint64_t[]>(std::max<size_t>(rep.fence_slots, 1));  // zeroed
    values = local.get();
  }

  std::lock_guard lk(mu_);  // the receiver reads these while applying notifications
  version_ = rep.version;
  adapters_ = std::move(adapters);
  adapter_refs_.assign(adapters_.size(), 0);
  fence_slots_ = rep.fence_slots;
  fence_page_ = std::move(page);
  local_fences_ = std::move(local);
  fence_values_ = values;
  page_state_counter_ = counter;
  logger().debug("connected: protocol {}, {} adapter(s), {} fence slots, {} transport", version_, adapters_.size(),
                 fence_slots_, shares_memory_ ? "shared-memory" : "stream");
  return GPUP_STATUS_SUCCESS;
}

void Session::shutdown() {
  std::lock_guard lk(shutdown_mu_);
  lose("the connection to the host was closed by this process", /*expected=*/true);
  if (receiver_.joinable()) {
    if (receiver_.get_id() == std::this_thread::get_id()) {
      receiver_.detach();  // cannot happen through the API; never join ourselves
    } else {
      receiver_.join();
    }
  }
}

// --- requests --------------------------------------------------------------------------------------

gpup_status Session::lost_error() {
  std::lock_guard lk(mu_);
  return fail(GPUP_STATUS_CONNECTION_LOST, lost_text_);
}

gpup_status Session::send_encoded(const proto::Encoded& enc) {
  if (lost_flag_.load(std::memory_order_acquire)) return lost_error();
  const auto parts = enc.parts();
  const gpup_status st = ch_->send(std::span<const std::span<const uint8_t>>(parts));
  if (st == GPUP_STATUS_SUCCESS) {
    messages_sent_.fetch_add(1, std::memory_order_relaxed);
    return st;
  }
  std::string why = channel::last_error().message;
  if (st == GPUP_STATUS_CONNECTION_LOST || st == GPUP_STATUS_PROTOCOL_ERROR) {
    lose("the connection to the host was lost while sending: " + why);
    return lost_error();
  }
  return fail(st, std::move(why));
}

gpup_status Session::exchange(proto::Op op, const proto::Encoded& enc, Reply& out, OnReply on_reply,
                              bool allow_pending) {
  PendingCall pc;
  pc.op = op;
  pc.on_reply = std::move(on_reply);
  const uint64_t txn = enc.header.txn;
  {
    std::lock_guard lk(mu_);
    if (lost_) return fail(GPUP_STATUS_CONNECTION_LOST, lost_text_);
    pending_.emplace(txn, &pc);
  }
  const gpup_status sent = send_encoded(enc);
  std::unique_lock lk(mu_);
  if (sent != GPUP_STATUS_SUCCESS) {
    pending_.erase(txn);  // no-op if lose() already completed it
    return sent;          // the text is set
  }
  round_trips_.fetch_add(1, std::memory_order_relaxed);
  pc.cv.wait(lk, [&] { return pc.done; });  // the receiver or lose() removed the entry
  if (pc.lost) return fail(GPUP_STATUS_CONNECTION_LOST, lost_text_);
  lk.unlock();

  out.bytes = std::move(pc.bytes);  // the buffer moves, so msg's spans stay valid
  out.msg = pc.msg;
  const gpup_status status = out.msg.header.status;
  if (status < 0) return fail(status, std::string(out.msg.tail_text()));
  if (status == GPUP_STATUS_SUCCESS || (status == GPUP_STATUS_PENDING && allow_pending)) return status;
  return fail(GPUP_STATUS_PROTOCOL_ERROR,
              fmt::format("{} reply: unexpected status {} ({})", out.msg.info->name, status, gpup_status_name(status)));
}

// --- the receiver thread ------------------------------------------------------------------------

void Session::receive_loop() {
  std::vector<uint8_t> buf;
  for (;;) {
    const gpup_status st = ch_->receive(buf, -1);
    if (st != GPUP_STATUS_SUCCESS) {
      lose(fmt::format("the connection to the host was lost: {}", channel::last_error().describe()));
      return;
    }
    auto m = proto::decode(buf, proto::Direction::kHostToGuest);
    if (!m) {
      lose("malformed message from the host: " + m.error().message);
      return;
    }
    if (m->is_reply()) {
      std::string why;
      if (!deliver(std::move(buf), *m, why)) {
        lose(why);
        return;
      }
      buf = std::vector<uint8_t>();
    } else {
      notifications_.fetch_add(1, std::memory_order_relaxed);
      on_notification(*m);
    }
  }
}

bool Session::deliver(std::vector<uint8_t>&& bytes, const proto::Message& m, std::string& why) {
  std::lock_guard lk(mu_);
  auto it = pending_.find(m.header.txn);
  if (it == pending_.end()) {
    why = fmt::format("the host replied to {} transaction {}, which no call is waiting for", m.info->name, m.header.txn);
    return false;
  }
  PendingCall* pc = it->second;
  if (pc->op != m.op()) {
    why = fmt::format("the host answered {} transaction {} with a {} reply", proto::op_name(static_cast<uint16_t>(pc->op)),
                      m.header.txn, m.info->name);
    return false;
  }
  pending_.erase(it);
  if (m.header.status >= 0 && pc->on_reply) pc->on_reply(m);
  pc->msg = m;
  pc->bytes = std::move(bytes);
  pc->done = true;
  pc->cv.notify_one();  // under mu_: the caller cannot return (and free pc) before we let go
  return true;
}

void Session::complete_waiter_locked(Waiter& w, gpup_status status, const std::string& text) {
  if (w.done) return;
  w.done = true;
  w.status = status;
  w.text = text;
  w.cv.notify_one();
}

void Session::fail_waiters_locked(const std::function<bool(const Waiter&)>& match, gpup_status status,
                                  const std::string& text) {
  for (auto& [id, w] : waiters_)
    if (match(*w)) complete_waiter_locked(*w, status, text);
}

gpup_status Session::device_failure(const DeviceObj& d, std::string* text) {
  if (d.error < 0) {
    *text = d.error_text;
    return d.error;
  }
  if (d.state == GPUPKMT_DEVICESTATE_REMOVED) {
    *text = "the device was removed from this VM";
    return d.reason < 0 ? d.reason : GPUP_STATUS_DEVICE_REMOVED;
  }
  if (d.state == GPUPKMT_DEVICESTATE_RESET) {
    *text = "the device was reset";
    return d.reason < 0 ? d.reason : GPUP_STATUS_CONTEXT_RESET_INNOCENT;
  }
  return GPUP_STATUS_SUCCESS;
}

uint64_t Session::fence_value(uint32_t slot) const {
  return __atomic_load_n(fence_values_ + slot, __ATOMIC_ACQUIRE);
}

void Session::raise_local_fence(uint32_t slot, uint64_t value) {
  if (!local_fences_ || slot >= fence_slots_) return;
  uint64_t* p = &local_fences_[slot];
  uint64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (cur < value) {
    if (__atomic_compare_exchange_n(p, &cur, value, true, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
      proto::wake_fence_sleepers(p);  // as the host wakes a shared page's slot
      return;
    }
  }
}

void Session::on_notification(const proto::Message& m) {
  switch (m.op()) {
    case proto::Op::SignalGuestEvent: {
      const auto n = m.as<proto::SignalGuestEventRequest>();
      std::lock_guard lk(mu_);
      if (local_fences_) {
        if (auto s = syncs_.find(n.sync_object); s != syncs_.end()) raise_local_fence(s->second.slot, n.value);
      }
      // A missing waiter timed out or saw the value in the page first: nothing to do.
      if (auto w = waiters_.find(n.event_id); w != waiters_.end())
        complete_waiter_locked(*w->second, GPUP_STATUS_SUCCESS, {});
      break;
    }
    case proto::Op::FenceValue: {
      const auto n = m.as<proto::FenceValueRequest>();
      std::lock_guard lk(mu_);
      if (!local_fences_) break;  // the shared page is authoritative
      if (n.slot >= fence_slots_) {
        logger().warn("FenceValue for slot {} of {}; ignored", n.slot, fence_slots_);
        break;
      }
      __atomic_store_n(&local_fences_[n.slot], n.value, __ATOMIC_RELEASE);
      proto::wake_fence_sleepers(&local_fences_[n.slot]);
      break;
    }
    case proto::Op::DeviceStateChanged: {
      const auto n = m.as<proto::DeviceStateChangedRequest>();
      if (n.state > GPUPKMT_DEVICESTATE_REMOVED) {
        logger().warn("DeviceStateChanged: device {:#x} state {} unknown; ignored", n.device, n.state);
        break;
      }
      std::lock_guard lk(mu_);
      auto d = devices_.find(n.device);
      if (d == devices_.end()) break;  // destroyed meanwhile
      d->second.state = n.state;
      d->second.reason = n.reason;
      d->second.state_counter = n.state_counter;
      std::string text;
      const gpup_status why = device_failure(d->second, &text);
      if (why < 0) {
        const GPUPKMT_HANDLE dev = n.device;
        fail_waiters_locked([dev](const Waiter& w) { return w.device == dev; }, why, text);
      }
      break;
    }
    case proto::Op::ContextError: {
      const auto n = m.as<proto::ContextErrorRequest>();
      const gpup_status status = n.status < 0 ? n.status : GPUP_STATUS_DEVICE_ERROR;
      std::string text(m.tail_text());
      if (text.empty()) text = gpup_status_message(status);
      text += fmt::format(" (context {:#x}, submission {})", n.context, n.submission_id);
      std::lock_guard lk(mu_);
      auto c = contexts_.find(n.context);
      if (c == contexts_.end()) {
        logger().debug("ContextError for unknown context {:#x}: {}", n.context, text);
        break;
      }
      logger().info("context {:#x} faulted: {}: {}", n.context, gpup_status_name(status), text);
      if (c->second.error >= 0) {
        c->second.error = status;
        c->second.error_text = text;
      }
      const GPUPKMT_HANDLE dev = c->second.device;
      auto d = devices_.find(dev);
      if (d == devices_.end()) break;
      if (d->second.error >= 0) {
        d->second.error = status;
        d->second.error_text = text;
      }
      fail_waiters_locked([dev](const Waiter& w) { return w.device == dev; }, d->second.error, d->second.error_text);
      break;
    }
    default:
      // decode() admits only the schema's notifications; one this library has no use for is
      // harmless.
      logger().debug("ignoring notification {}", m.info->name);
      break;
  }
}

void Session::lose(const std::string& why, bool expected) {
  {
    std::lock_guard lk(mu_);
    if (lost_) return;
    lost_ = true;
    lost_text_ = why;
    lost_flag_.store(true, std::memory_order_release);
    for (auto& [txn, pc] : pending_) {
      pc->lost = true;
      pc->done = true;
      pc->cv.notify_one();
    }
    pending_.clear();
    for (auto& [id, w] : waiters_) complete_waiter_locked(*w, GPUP_STATUS_CONNECTION_LOST, why);
  }
  if (!expected) logger().error("{}", why);
  ch_->shutdown();
}

void Session::channel_stats(GPUPKMT_CHANNELSTATS* out) const {
  out->MessagesSent = messages_sent_.load(std::memory_order_relaxed);
  out->RoundTrips = round_trips_.load(std::memory_order_relaxed);
  out->NotificationsReceived = notifications_.load(std::memory_order_relaxed);
  out->SharedMemory = shares_memory_ ? 1 : 0;
  out->ProtocolVersion = version_;
}

}  // namespace gpup::kmt
