// Encoding and decoding of gpup messages and command buffers (layouts from schema.def).
//
// Decoding is the host's first line of defence: decode() runs on a private copy of the bytes
// (the channel copies a message out of shared memory exactly once) and checks everything the
// schema says before any handler sees a field. Checks hold in release builds.
#pragma once
#include <array>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "protocol/protocol.h"

namespace gpup::proto {

enum class Direction { kGuestToHost, kHostToGuest };

// A checked message. `fixed` is exactly the schema's fixed part for this message (empty for an
// error reply); `tail` is what follows it.
struct Message {
  MessageHeader header{};
  const OpInfo* info = nullptr;
  std::span<const u8> fixed;
  std::span<const u8> tail;

  Op op() const { return info->op; }
  bool is_reply() const { return (header.flags & kFlagReply) != 0; }
  template <typename T>
  T as() const {
    static_assert(std::is_trivially_copyable_v<T>);
    T v{};
    std::memcpy(&v, fixed.data(), fixed.size() < sizeof(T) ? fixed.size() : sizeof(T));
    return v;
  }
  std::string_view tail_text() const {
    return {reinterpret_cast<const char*>(tail.data()), tail.size()};
  }
};

// Checks a whole message:
//  - size field equals the byte count; header <= size <= kMaxMessageSize;
//  - the opcode is defined;
//  - guest -> host: a SYNC or ASYNC request (reply flag clear, status 0);
//    host -> guest: a reply to a SYNC op, or a NOTIFY;
//  - the payload holds the fixed part, and no tail where the schema allows none;
//  - a reply with status < 0 carries no fixed part; its tail is the error text.
// Errors are PROTOCOL_ERROR with a message naming the field and values.
Result<Message> decode(std::span<const u8> bytes, Direction dir);

// A message ready for gather-send: header, fixed part and tail as separate spans. The header and
// the fixed part are copied in (so a temporary request struct is fine); the tail, which may be
// large, is referred to and must outlive the Encoded.
struct Encoded {
  MessageHeader header{};
  std::array<u8, kMaxFixedSize> fixed_bytes{};
  size_t fixed_size = 0;
  std::span<const u8> tail;

  size_t size() const { return header.size; }
  std::span<const u8> fixed() const { return {fixed_bytes.data(), fixed_size}; }
  std::array<std::span<const u8>, 3> parts() const {
    return {std::span<const u8>(reinterpret_cast<const u8*>(&header), sizeof header), fixed(), tail};
  }
  std::vector<u8> flatten() const;
};

// Refuses (MESSAGE_TOO_LARGE, naming both sizes) a message over kMaxMessageSize before it exists,
// and a tail on a message whose schema allows none (INVALID_PARAMETER).
Result<Encoded> encode_raw(Op op, u16 flags, u64 txn, i32 status, std::span<const u8> fixed,
                           bool tail_allowed, std::span<const u8> tail);

template <typename Req>
Result<Encoded> encode_request(const Req& req, u64 txn, std::span<const u8> tail = {}) {
  using T = RequestTraits<Req>;
  return encode_raw(T::op, 0, txn, 0, {reinterpret_cast<const u8*>(&req), sizeof req}, T::request_tail, tail);
}

template <Op O>
Result<Encoded> encode_reply(const typename MessageTraits<O>::Reply& rep, u64 txn,
                             std::span<const u8> tail = {}, i32 status = GPUP_STATUS_SUCCESS) {
  using T = MessageTraits<O>;
  return encode_raw(O, kFlagReply, txn, status, {reinterpret_cast<const u8*>(&rep), sizeof rep},
                    T::reply_tail, tail);
}

// A failed request's reply: status < 0, the error text as the tail (cut to fit the limit).
Encoded encode_error_reply(Op op, u64 txn, gpup_status status, std::string_view text);

// Largest tail a message of this op can carry in the given direction.
size_t max_tail(Op op, bool reply);

// --- command buffers -------------------------------------------------------------------------

inline constexpr u32 kMaxKernelNameLength = 256;
inline constexpr u32 kMaxKernelArgs = 128;
inline constexpr u32 kMaxKernelArgValueSize = 4096;

// Builds a command buffer. Records are 8-byte aligned; see schema.def.
class CommandWriter {
 public:
  struct Arg {
    u32 kind = 0;          // GPUPDDI_KERNEL_ARG_KIND
    u32 size = 0;          // VALUE: bytes at value; LOCAL: bytes of local memory
    u64 va = 0;            // BUFFER: start of the GPU VA range
    u64 range = 0;         // BUFFER: length of the range
    const void* value = nullptr;
  };

  void copy(u64 src_va, u64 dst_va, u64 size);
  // pattern_size 1..128; the pattern is copied.
  void fill(u64 dst_va, u64 size, const void* pattern, u32 pattern_size);
  // Refuses (INVALID_PARAMETER) a work dimension outside 1..3, names or args over the limits above,
  // an unknown argument kind, and a VALUE argument without bytes. The host checks all of it again.
  Status dispatch(u32 program, std::string_view kernel, u32 work_dim, const u64 global_offset[3],
                  const u64 global_size[3], const u64 local_size[3], std::span<const Arg> args);
  void signal(u32 sync_object, u64 value);
  void wait(u32 sync_object, u64 value);

  std::span<const u8> bytes() const { return buf_; }
  size_t size() const { return buf_.size(); }
  size_t count() const { return count_; }
  bool empty() const { return buf_.empty(); }
  void clear() {
    buf_.clear();
    count_ = 0;
  }

 private:
  size_t begin(CommandOp op, size_t fixed_size);
  void append(const void* p, size_t n);
  void pad8();
  void finish(size_t start);
  std::vector<u8> buf_;
  size_t count_ = 0;
};

struct CommandView {
  CommandOp op{};
  const CommandInfo* info = nullptr;
  std::span<const u8> fixed;
  std::span<const u8> tail;
  template <typename T>
  T as() const {
    T v{};
    std::memcpy(&v, fixed.data(), sizeof(T));
    return v;
  }
};

// Walks a command buffer. next() returns false at the end; a malformed record (size not a
// multiple of 8, shorter than its fixed part, past the end, unknown op, tail where none is
// allowed) is PROTOCOL_ERROR naming the record index and byte offset.
class CommandReader {
 public:
  explicit CommandReader(std::span<const u8> buf) : buf_(buf) {}
  Result<bool> next(CommandView& out);
  size_t index() const { return index_; }

 private:
  std::span<const u8> buf_;
  size_t pos_ = 0;
  size_t index_ = 0;
};

struct DispatchView {
  DispatchCommand cmd{};
  std::string_view name;
  struct Arg {
    KernelArg desc{};
    std::span<const u8> value;  // VALUE args only
  };
  std::vector<Arg> args;
};

// Parses and checks a Dispatch record's tail: name length and characters, arg count, each arg's
// kind and value size, and that the tail is consumed exactly.
Result<DispatchView> parse_dispatch(const CommandView& view);

}  // namespace gpup::proto
