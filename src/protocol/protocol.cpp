#include "protocol/protocol.h"

#include <iterator>

namespace gpup::proto {
namespace {

#define TAIL_NONE false
#define TAIL_BYTES true
#define GPUP_STRUCT(Name, fields)
#define GPUP_COMMAND(Name, ord, tail, fields)
#define GPUP_MESSAGE(Name, ord, kind_, rqt, rqf, rpt, rpf) \
  {Op::Name, #Name, Kind::kind_, rqt, rpt, sizeof(Name##Request), sizeof(Name##Reply)},
constexpr OpInfo kOps[] = {
#include "protocol/schema.def"
};
#undef GPUP_MESSAGE
#undef GPUP_COMMAND

#define GPUP_MESSAGE(Name, ord, kind_, rqt, rqf, rpt, rpf)
#define GPUP_COMMAND(Name, ord, tail_, fields) {CommandOp::Name, #Name, tail_, sizeof(Name##Command)},
constexpr CommandInfo kCommands[] = {
#include "protocol/schema.def"
};
#undef GPUP_MESSAGE
#undef GPUP_COMMAND
#undef GPUP_STRUCT
#undef TAIL_NONE
#undef TAIL_BYTES

// Ordinals must be unique: checked at compile time.
constexpr bool unique_ordinals() {
  for (size_t i = 0; i < std::size(kOps); ++i)
    for (size_t j = i + 1; j < std::size(kOps); ++j)
      if (kOps[i].op == kOps[j].op) return false;
  for (size_t i = 0; i < std::size(kCommands); ++i)
    for (size_t j = i + 1; j < std::size(kCommands); ++j)
      if (kCommands[i].op == kCommands[j].op) return false;
  return true;
}
static_assert(unique_ordinals(), "schema.def reuses an ordinal");

}  // namespace

const OpInfo* find_op(u16 ordinal) {
  for (const auto& o : kOps)
    if (static_cast<u16>(o.op) == ordinal) return &o;
  return nullptr;
}

const char* op_name(u16 ordinal) {
  const OpInfo* o = find_op(ordinal);
  return o ? o->name : "unknown";
}

const CommandInfo* find_command(u16 ordinal) {
  for (const auto& c : kCommands)
    if (static_cast<u16>(c.op) == ordinal) return &c;
  return nullptr;
}

const OpInfo* all_ops(size_t* count) {
  *count = std::size(kOps);
  return kOps;
}

const CommandInfo* all_commands(size_t* count) {
  *count = std::size(kCommands);
  return kCommands;
}

}  // namespace gpup::proto
