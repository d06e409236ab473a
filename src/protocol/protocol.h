// gpup wire protocol: types generated from schema.def. See schema.def for the rules.
#pragma once
#include <bit>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "gpup/status.h"

static_assert(std::endian::native == std::endian::little,
              "the gpup wire format is little-endian and encoded by memcpy; a big-endian port "
              "needs byte-swapping accessors generated from schema.def");

namespace gpup::proto {

using u8 = uint8_t;
using u16 = uint16_t;
using u32 = uint32_t;
using u64 = uint64_t;
using i32 = int32_t;

// Interface versions. A guest offers [version_min, version_max]; the host picks the highest it
// supports inside that range or refuses with VERSION_MISMATCH.
// Version 2: guest-owned shared sections (RegisterSection, UnregisterSection) and section
// references in CreateAllocation and Escape, whose fixed parts grew: version 1 is not spoken.
inline constexpr u32 kVersion = 2;
inline constexpr u32 kLastCompatibleVersion = 2;
inline constexpr size_t kMaxMessageSize = 128 * 1024;  // the whole message, header included
// KMD output returned in a reply tail: at most this many bytes (larger capacities need a section).
inline constexpr u32 kMaxInlineOutput = 64 * 1024;
// Guest-owned sections, per guest process: how many may be registered at once, and their bytes
// in all. One section is at most kMaxSectionBytes.
inline constexpr u32 kMaxSections = 64;
inline constexpr u64 kMaxSectionBytes = u64{256} << 20;
// The most private data, and the largest output capacity, one request may name in a section:
// the OpenCL contract's largest program content (64 MiB) plus room for its header and options.
inline constexpr u32 kMaxBulkDataSize = (64u << 20) + (64u << 10);
inline constexpr u32 kFencePageMagic = 0x45434e46;    // "FNCE"
inline constexpr u16 kFlagReply = 0x1;

enum class Kind : u8 { SYNC, ASYNC, NOTIFY };

#define TAIL_NONE false
#define TAIL_BYTES true

// --- structs --------------------------------------------------------------------------------
#define F(t, n) t n;
#define A(t, n, c) t n[c];
#define GPUP_STRUCT(Name, fields) \
  struct Name {                   \
    fields                        \
  };
#define GPUP_MESSAGE(Name, ord, kind, rqt, rqf, rpt, rpf) \
  struct Name##Request {                                  \
    rqf                                                   \
  };                                                      \
  struct Name##Reply {                                    \
    rpf                                                   \
  };
#define GPUP_COMMAND(Name, ord, tail, fields) \
  struct Name##Command {                      \
    fields                                    \
  };
#include "protocol/schema.def"
#undef GPUP_STRUCT
#undef GPUP_MESSAGE
#undef GPUP_COMMAND
#undef F
#undef A

// --- layout checks: no hidden padding anywhere --------------------------------------------------
#define F(t, n) +sizeof(t)
#define A(t, n, c) +sizeof(t) * (c)
#define GPUP_CHECK_(T, sum)                                                          \
  static_assert(sizeof(T) == (sum), #T " has compiler-inserted padding: add pad fields"); \
  static_assert(std::is_trivially_copyable_v<T> && std::is_standard_layout_v<T>);
#define GPUP_STRUCT(Name, fields) GPUP_CHECK_(Name, 0 fields)
#define GPUP_MESSAGE(Name, ord, kind, rqt, rqf, rpt, rpf) \
  GPUP_CHECK_(Name##Request, 0 rqf) GPUP_CHECK_(Name##Reply, 0 rpf)
#define GPUP_COMMAND(Name, ord, tail, fields) GPUP_CHECK_(Name##Command, 0 fields)
#include "protocol/schema.def"
#undef GPUP_STRUCT
#undef GPUP_MESSAGE
#undef GPUP_COMMAND
#undef F
#undef A
#undef GPUP_CHECK_

static_assert(sizeof(MessageHeader) == 24);
static_assert(offsetof(MessageHeader, txn) == 8);
static_assert(sizeof(CommandHeader) == 8);
static_assert(sizeof(KernelArg) == 24);
static_assert(sizeof(SectionRef) == 16);

// The largest fixed part of any message, request or reply (an Encoded message stores its own).
#define GPUP_STRUCT(Name, fields)
#define GPUP_COMMAND(Name, ord, tail, fields)
#define GPUP_MESSAGE(Name, ord, kind, rqt, rqf, rpt, rpf) sizeof(Name##Request), sizeof(Name##Reply),
inline constexpr size_t kMaxFixedSize = [] {
  size_t m = 0;
  for (size_t s : {
#include "protocol/schema.def"
       size_t{0}})
    m = s > m ? s : m;
  return m;
}();
#undef GPUP_MESSAGE
#undef GPUP_COMMAND
#undef GPUP_STRUCT

// --- opcodes ---------------------------------------------------------------------------------
#define GPUP_STRUCT(Name, fields)
#define GPUP_COMMAND(Name, ord, tail, fields)
#define GPUP_MESSAGE(Name, ord, kind, rqt, rqf, rpt, rpf) Name = ord,
enum class Op : u16 {
#include "protocol/schema.def"
};
#undef GPUP_MESSAGE
#undef GPUP_COMMAND

#define GPUP_MESSAGE(Name, ord, kind, rqt, rqf, rpt, rpf)
#define GPUP_COMMAND(Name, ord, tail, fields) Name = ord,
enum class CommandOp : u16 {
#include "protocol/schema.def"
};
#undef GPUP_MESSAGE
#undef GPUP_COMMAND
#undef GPUP_STRUCT

// --- traits ----------------------------------------------------------------------------------
template <Op>
struct MessageTraits;
template <typename Req>
struct RequestTraits;
#define GPUP_STRUCT(Name, fields)
#define GPUP_COMMAND(Name, ord, tail, fields)
#define GPUP_MESSAGE(Name, ord, kind_, rqt, rqf, rpt, rpf)              \
  template <>                                                           \
  struct MessageTraits<Op::Name> {                                      \
    using Request = Name##Request;                                      \
    using Reply = Name##Reply;                                          \
    static constexpr Op op = Op::Name;                                  \
    static constexpr Kind kind = Kind::kind_;                           \
    static constexpr bool request_tail = rqt;                           \
    static constexpr bool reply_tail = rpt;                             \
    static constexpr const char* name = #Name;                          \
  };                                                                    \
  template <>                                                           \
  struct RequestTraits<Name##Request> : MessageTraits<Op::Name> {};
#include "protocol/schema.def"
#undef GPUP_MESSAGE
#undef GPUP_COMMAND
#undef GPUP_STRUCT

template <CommandOp>
struct CommandTraits;
template <typename Cmd>
struct CommandStructTraits;
#define GPUP_STRUCT(Name, fields)
#define GPUP_MESSAGE(Name, ord, kind_, rqt, rqf, rpt, rpf)
#define GPUP_COMMAND(Name, ord, tail_, fields)                                  \
  template <>                                                                   \
  struct CommandTraits<CommandOp::Name> {                                       \
    using Struct = Name##Command;                                               \
    static constexpr CommandOp op = CommandOp::Name;                            \
    static constexpr bool tail = tail_;                                         \
    static constexpr const char* name = #Name;                                  \
  };                                                                            \
  template <>                                                                   \
  struct CommandStructTraits<Name##Command> : CommandTraits<CommandOp::Name> {};
#include "protocol/schema.def"
#undef GPUP_MESSAGE
#undef GPUP_COMMAND
#undef GPUP_STRUCT

// Run-time description of an opcode, for the decoder and for logs.
struct OpInfo {
  Op op;
  const char* name;
  Kind kind;
  bool request_tail;
  bool reply_tail;
  size_t request_size;
  size_t reply_size;
};
// nullptr for an ordinal the schema does not define.
const OpInfo* find_op(u16 ordinal);
const char* op_name(u16 ordinal);  // "unknown" when undefined

struct CommandInfo {
  CommandOp op;
  const char* name;
  bool tail;
  size_t size;
};
const CommandInfo* find_command(u16 ordinal);

// Every defined opcode, in schema order (for tests and fuzzers).
const OpInfo* all_ops(size_t* count);
const CommandInfo* all_commands(size_t* count);

#undef TAIL_NONE
#undef TAIL_BYTES

}  // namespace gpup::proto
