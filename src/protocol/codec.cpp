#include "protocol/codec.h"

#include <fmt/format.h>

#include "gpup/ddi.h"

namespace gpup::proto {
namespace {

Error protocol_error(std::string m) { return Error(GPUP_STATUS_PROTOCOL_ERROR, std::move(m)); }

constexpr size_t align8(size_t n) { return (n + 7) & ~size_t{7}; }

}  // namespace

Result<Message> decode(std::span<const u8> bytes, Direction dir) {
  if (bytes.size() < sizeof(MessageHeader))
    return protocol_error(fmt::format("message of {} bytes is shorter than the {}-byte header", bytes.size(),
                                      sizeof(MessageHeader)));
  if (bytes.size() > kMaxMessageSize)
    return protocol_error(fmt::format("message of {} bytes exceeds the {}-byte limit", bytes.size(), kMaxMessageSize));
  Message m;
  std::memcpy(&m.header, bytes.data(), sizeof m.header);
  if (m.header.size != bytes.size())
    return protocol_error(fmt::format("header says {} bytes, message has {}", m.header.size, bytes.size()));
  m.info = find_op(m.header.op);
  if (!m.info) return protocol_error(fmt::format("unknown opcode {}", m.header.op));
  if (m.header.flags & ~kFlagReply)
    return protocol_error(fmt::format("{}: unknown flags {:#x}", m.info->name, m.header.flags));

  const bool reply = m.is_reply();
  if (dir == Direction::kGuestToHost) {
    if (reply || m.info->kind == Kind::NOTIFY)
      return protocol_error(fmt::format("{}: a guest may only send requests", m.info->name));
    if (m.header.status != 0) return protocol_error(fmt::format("{}: request carries a status", m.info->name));
    if (m.info->kind == Kind::ASYNC && m.header.txn != 0)
      return protocol_error(fmt::format("{}: async message carries transaction id {}", m.info->name, m.header.txn));
  } else {
    if (m.info->kind == Kind::ASYNC) return protocol_error(fmt::format("{}: async messages have no reply", m.info->name));
    if (m.info->kind == Kind::SYNC && !reply)
      return protocol_error(fmt::format("{}: host sent a request", m.info->name));
    if (m.info->kind == Kind::NOTIFY && reply)
      return protocol_error(fmt::format("{}: notifications have no reply", m.info->name));
  }

  auto payload = bytes.subspan(sizeof(MessageHeader));
  if (reply && m.header.status < 0) {  // error reply: text only
    m.tail = payload;
    return m;
  }
  const bool is_req = !reply;
  const size_t fixed = is_req ? m.info->request_size : m.info->reply_size;
  const bool tail_ok = is_req ? m.info->request_tail : m.info->reply_tail;
  if (payload.size() < fixed)
    return protocol_error(fmt::format("{}: {} payload bytes, the fixed part needs {}", m.info->name, payload.size(), fixed));
  m.fixed = payload.first(fixed);
  m.tail = payload.subspan(fixed);
  if (!tail_ok && !m.tail.empty())
    return protocol_error(fmt::format("{}: {} unexpected bytes after the fixed part", m.info->name, m.tail.size()));
  return m;
}

std::vector<u8> Encoded::flatten() const {
  std::vector<u8> out;
  out.reserve(size());
  for (auto p : parts()) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Result<Encoded> encode_raw(Op op, u16 flags, u64 txn, i32 status, std::span<const u8> fixed, bool tail_allowed,
                           std::span<const u8> tail) {
  if (!tail_allowed && !tail.empty())
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{} carries no tail, {} bytes given", op_name(static_cast<u16>(op)), tail.size()));
  if (fixed.size() > kMaxFixedSize)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("fixed part of {} bytes exceeds {}", fixed.size(), kMaxFixedSize));
  const size_t total = sizeof(MessageHeader) + fixed.size() + tail.size();
  if (total > kMaxMessageSize)
    return Error(GPUP_STATUS_MESSAGE_TOO_LARGE,
                 fmt::format("{} message would be {} bytes; the channel limit is {} bytes (128 KiB) and "
                             "messages are never split",
                             op_name(static_cast<u16>(op)), total, kMaxMessageSize));
  Encoded e;
  e.header.size = static_cast<u32>(total);
  e.header.op = static_cast<u16>(op);
  e.header.flags = flags;
  e.header.txn = txn;
  e.header.status = status;
  std::memcpy(e.fixed_bytes.data(), fixed.data(), fixed.size());
  e.fixed_size = fixed.size();
  e.tail = tail;
  return e;
}

Encoded encode_error_reply(Op op, u64 txn, gpup_status status, std::string_view text) {
  const size_t room = kMaxMessageSize - sizeof(MessageHeader);
  if (text.size() > room) text = text.substr(0, room);
  Encoded e;
  e.header.size = static_cast<u32>(sizeof(MessageHeader) + text.size());
  e.header.op = static_cast<u16>(op);
  e.header.flags = kFlagReply;
  e.header.txn = txn;
  e.header.status = status;
  e.tail = {reinterpret_cast<const u8*>(text.data()), text.size()};
  return e;
}

size_t max_tail(Op op, bool reply) {
  const OpInfo* info = find_op(static_cast<u16>(op));
  if (!info) return 0;
  if (!(reply ? info->reply_tail : info->request_tail)) return 0;
  return kMaxMessageSize - sizeof(MessageHeader) - (reply ? info->reply_size : info->request_size);
}

// --- CommandWriter ---------------------------------------------------------------------------

void CommandWriter::append(const void* p, size_t n) {
  const u8* b = static_cast<const u8*>(p);
  buf_.insert(buf_.end(), b, b + n);
}

void CommandWriter::pad8() { buf_.resize(align8(buf_.size()), 0); }

size_t CommandWriter::begin(CommandOp op, size_t fixed_size) {
  (void)fixed_size;
  size_t start = buf_.size();
  CommandHeader h{static_cast<u16>(op), 0, 0};
  append(&h, sizeof h);
  return start;
}

void CommandWriter::finish(size_t start) {
  pad8();
  const u32 size = static_cast<u32>(buf_.size() - start);
  std::memcpy(buf_.data() + start + offsetof(CommandHeader, size), &size, sizeof size);
  ++count_;
}

void CommandWriter::copy(u64 src_va, u64 dst_va, u64 size) {
  size_t s = begin(CommandOp::Copy, sizeof(CopyCommand));
  CopyCommand c{src_va, dst_va, size};
  append(&c, sizeof c);
  finish(s);
}

void CommandWriter::fill(u64 dst_va, u64 size, const void* pattern, u32 pattern_size) {
  size_t s = begin(CommandOp::Fill, sizeof(FillCommand));
  FillCommand c{};
  c.dst_va = dst_va;
  c.size = size;
  c.pattern_size = pattern_size;
  std::memcpy(c.pattern, pattern, pattern_size <= sizeof c.pattern ? pattern_size : sizeof c.pattern);
  append(&c, sizeof c);
  finish(s);
}

Status CommandWriter::dispatch(u32 program, std::string_view kernel, u32 work_dim, const u64 global_offset[3],
                               const u64 global_size[3], const u64 local_size[3], std::span<const Arg> args) {
  if (kernel.empty() || kernel.size() > kMaxKernelNameLength)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("kernel name of {} bytes (1..{} allowed)", kernel.size(), kMaxKernelNameLength));
  if (work_dim < 1 || work_dim > 3)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("work dimension {} (1..3)", work_dim));
  if (args.size() > kMaxKernelArgs)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{} kernel arguments (at most {})", args.size(), kMaxKernelArgs));
  for (size_t i = 0; i < args.size(); ++i) {
    const Arg& a = args[i];
    switch (a.kind) {
      case GPUPDDI_ARG_VALUE:
      case GPUPDDI_ARG_SAMPLER:
        if (a.size == 0 || a.size > kMaxKernelArgValueSize || !a.value)
          return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("kernel argument {}: value of {} bytes at {} (1..{} bytes)", i,
                                                                  a.size, a.value, kMaxKernelArgValueSize));
        break;
      case GPUPDDI_ARG_BUFFER:
      case GPUPDDI_ARG_LOCAL:
      case GPUPDDI_ARG_NULL_BUFFER:
      case GPUPDDI_ARG_IMAGE:
        break;
      default:
        return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("kernel argument {}: unknown kind {}", i, a.kind));
    }
  }
  size_t s = begin(CommandOp::Dispatch, sizeof(DispatchCommand));
  DispatchCommand c{};
  c.program = program;
  c.work_dim = work_dim;
  c.arg_count = static_cast<u32>(args.size());
  c.name_len = static_cast<u32>(kernel.size());
  for (int i = 0; i < 3; ++i) {
    c.global_offset[i] = global_offset ? global_offset[i] : 0;
    c.global_size[i] = global_size ? global_size[i] : 0;
    c.local_size[i] = local_size ? local_size[i] : 0;
  }
  append(&c, sizeof c);
  append(kernel.data(), kernel.size());
  pad8();
  for (const Arg& a : args) {
    KernelArg k{a.kind, a.size, a.va, a.range};
    append(&k, sizeof k);
    if ((a.kind == GPUPDDI_ARG_VALUE || a.kind == GPUPDDI_ARG_SAMPLER) && a.size) {
      append(a.value, a.size);
      pad8();
    }
  }
  finish(s);
  return {};
}

void CommandWriter::signal(u32 sync_object, u64 value) {
  size_t s = begin(CommandOp::SignalFence, sizeof(SignalFenceCommand));
  SignalFenceCommand c{sync_object, 0, value};
  append(&c, sizeof c);
  finish(s);
}

void CommandWriter::wait(u32 sync_object, u64 value) {
  size_t s = begin(CommandOp::WaitFence, sizeof(WaitFenceCommand));
  WaitFenceCommand c{sync_object, 0, value};
  append(&c, sizeof c);
  finish(s);
}

// --- CommandReader ---------------------------------------------------------------------------

Result<bool> CommandReader::next(CommandView& out) {
  if (pos_ == buf_.size()) return false;
  const size_t left = buf_.size() - pos_;
  if (left < sizeof(CommandHeader))
    return protocol_error(fmt::format("command {} at byte {}: {} bytes left, header needs {}", index_, pos_, left, sizeof(CommandHeader)));
  CommandHeader h;
  std::memcpy(&h, buf_.data() + pos_, sizeof h);
  const CommandInfo* info = find_command(h.op);
  if (!info) return protocol_error(fmt::format("command {} at byte {}: unknown op {}", index_, pos_, h.op));
  if (h.size % 8 != 0 || h.size < sizeof(CommandHeader) + info->size || h.size > left)
    return protocol_error(fmt::format("command {} ({}) at byte {}: bad record size {} ({} bytes left, at least {} needed, multiple of 8)",
                                      index_, info->name, pos_, h.size, left, sizeof(CommandHeader) + info->size));
  auto rec = buf_.subspan(pos_ + sizeof(CommandHeader), h.size - sizeof(CommandHeader));
  out.op = info->op;
  out.info = info;
  out.fixed = rec.first(info->size);
  out.tail = rec.subspan(info->size);
  if (!info->tail && out.tail.size() >= 8)
    return protocol_error(fmt::format("command {} ({}): {} unexpected bytes", index_, info->name, out.tail.size()));
  pos_ += h.size;
  ++index_;
  return true;
}

Result<DispatchView> parse_dispatch(const CommandView& view) {
  DispatchView d;
  d.cmd = view.as<DispatchCommand>();
  const auto& c = d.cmd;
  if (c.name_len == 0 || c.name_len > kMaxKernelNameLength)
    return protocol_error(fmt::format("dispatch: kernel name length {} (1..{})", c.name_len, kMaxKernelNameLength));
  if (c.arg_count > kMaxKernelArgs)
    return protocol_error(fmt::format("dispatch: {} arguments (at most {})", c.arg_count, kMaxKernelArgs));
  auto tail = view.tail;
  const size_t name_room = align8(c.name_len);
  if (tail.size() < name_room)
    return protocol_error(fmt::format("dispatch: kernel name of {} bytes, {} bytes present", c.name_len, tail.size()));
  d.name = {reinterpret_cast<const char*>(tail.data()), c.name_len};
  for (char ch : d.name)
    if (ch == '\0') return protocol_error("dispatch: kernel name contains NUL");
  tail = tail.subspan(name_room);
  d.args.reserve(c.arg_count);
  for (u32 i = 0; i < c.arg_count; ++i) {
    if (tail.size() < sizeof(KernelArg))
      return protocol_error(fmt::format("dispatch: argument {} truncated", i));
    DispatchView::Arg a;
    std::memcpy(&a.desc, tail.data(), sizeof a.desc);
    tail = tail.subspan(sizeof(KernelArg));
    switch (a.desc.kind) {
      case GPUPDDI_ARG_VALUE:
      case GPUPDDI_ARG_SAMPLER: {
        if (a.desc.size == 0 || a.desc.size > kMaxKernelArgValueSize)
          return protocol_error(fmt::format("dispatch: argument {} value size {} (1..{})", i, a.desc.size, kMaxKernelArgValueSize));
        const size_t room = align8(a.desc.size);
        if (tail.size() < room) return protocol_error(fmt::format("dispatch: argument {} value truncated", i));
        a.value = tail.first(a.desc.size);
        tail = tail.subspan(room);
        break;
      }
      case GPUPDDI_ARG_BUFFER:
      case GPUPDDI_ARG_LOCAL:
      case GPUPDDI_ARG_NULL_BUFFER:
      case GPUPDDI_ARG_IMAGE:
        break;
      default:
        return protocol_error(fmt::format("dispatch: argument {} has unknown kind {}", i, a.desc.kind));
    }
    d.args.push_back(a);
  }
  if (!tail.empty()) return protocol_error(fmt::format("dispatch: {} trailing bytes", tail.size()));
  return d;
}

}  // namespace gpup::proto
