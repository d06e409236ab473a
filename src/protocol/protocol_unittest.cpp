// Codec tests. The per-message tests are generated from schema.def, so a new message is covered
// the moment it is defined.
#include <gtest/gtest.h>

#include <random>

#include "gpup/ddi.h"
#include "protocol/codec.h"

namespace gpup::proto {
namespace {

std::mt19937_64 rng(1234);

template <typename T>
T random_struct() {
  T v;
  auto* p = reinterpret_cast<u8*>(&v);
  for (size_t i = 0; i < sizeof v; ++i) p[i] = static_cast<u8>(rng());
  return v;
}

std::vector<u8> random_bytes(size_t n) {
  std::vector<u8> v(n);
  for (auto& b : v) b = static_cast<u8>(rng());
  return v;
}

template <Op O>
void round_trip_one() {
  using T = MessageTraits<O>;
  SCOPED_TRACE(T::name);
  const bool guest_sends = T::kind != Kind::NOTIFY;
  auto req = random_struct<typename T::Request>();
  for (size_t tail_len : {size_t{0}, size_t{1}, size_t{4096}, max_tail(O, false)}) {
    auto tail = random_bytes(T::request_tail ? tail_len : 0);
    const u64 txn = T::kind == Kind::SYNC ? 77 : 0;
    auto enc = encode_raw(O, 0, txn, 0, {reinterpret_cast<const u8*>(&req), sizeof req}, T::request_tail, tail);
    ASSERT_TRUE(enc.ok()) << enc.error().describe();
    auto bytes = enc->flatten();
    ASSERT_EQ(bytes.size(), sizeof(MessageHeader) + sizeof req + tail.size());
    auto dec = decode(bytes, guest_sends ? Direction::kGuestToHost : Direction::kHostToGuest);
    ASSERT_TRUE(dec.ok()) << dec.error().describe();
    EXPECT_EQ(dec->op(), O);
    EXPECT_EQ(dec->header.txn, txn);
    auto back = dec->template as<typename T::Request>();
    EXPECT_EQ(0, std::memcmp(&back, &req, sizeof req));
    EXPECT_TRUE(std::equal(dec->tail.begin(), dec->tail.end(), tail.begin(), tail.end()));
    // The other direction must refuse it.
    EXPECT_FALSE(decode(bytes, guest_sends ? Direction::kHostToGuest : Direction::kGuestToHost).ok());
    // Truncated by one byte: the size no longer matches, and a header fixed up to the shorter
    // length leaves the fixed part short when there is no tail.
    auto cut = bytes;
    cut.pop_back();
    EXPECT_FALSE(decode(cut, guest_sends ? Direction::kGuestToHost : Direction::kHostToGuest).ok());
    if (!T::request_tail || tail.empty()) {
      u32 sz = static_cast<u32>(cut.size());
      std::memcpy(cut.data(), &sz, 4);
      EXPECT_FALSE(decode(cut, guest_sends ? Direction::kGuestToHost : Direction::kHostToGuest).ok());
    }
    if (!T::request_tail) break;
  }
  if (!T::request_tail) {
    u8 extra = 1;
    EXPECT_EQ(encode_request(req, 1, {&extra, 1}).status(), GPUP_STATUS_INVALID_PARAMETER);
    // A forged message with an extra byte is refused by the decoder.
    auto enc = encode_raw(O, 0, T::kind == Kind::SYNC ? 1 : 0, 0, {reinterpret_cast<const u8*>(&req), sizeof req}, true, {&extra, 1});
    ASSERT_TRUE(enc.ok());
    EXPECT_EQ(decode(enc->flatten(), guest_sends ? Direction::kGuestToHost : Direction::kHostToGuest).status(),
              GPUP_STATUS_PROTOCOL_ERROR);
  }
  if constexpr (T::kind == Kind::SYNC) {
    auto rep = random_struct<typename T::Reply>();
    auto tail = random_bytes(T::reply_tail ? 100 : 0);
    auto enc = encode_reply<O>(rep, 99, tail);
    ASSERT_TRUE(enc.ok());
    const auto bytes = enc->flatten();  // the decoded message refers into these bytes
    auto dec = decode(bytes, Direction::kHostToGuest);
    ASSERT_TRUE(dec.ok()) << dec.error().describe();
    EXPECT_TRUE(dec->is_reply());
    auto back = dec->template as<typename T::Reply>();
    EXPECT_EQ(0, std::memcmp(&back, &rep, sizeof rep));
    EXPECT_TRUE(std::equal(dec->tail.begin(), dec->tail.end(), tail.begin(), tail.end()));
    EXPECT_FALSE(decode(bytes, Direction::kGuestToHost).ok());
    auto err = encode_error_reply(O, 5, GPUP_STATUS_INVALID_HANDLE, "allocation 0x41 is not open");
    const auto err_bytes = err.flatten();
    auto derr = decode(err_bytes, Direction::kHostToGuest);
    ASSERT_TRUE(derr.ok());
    EXPECT_EQ(derr->header.status, GPUP_STATUS_INVALID_HANDLE);
    EXPECT_EQ(derr->tail_text(), "allocation 0x41 is not open");
  }
}

TEST(Protocol, EveryMessageRoundTrips) {
#define TAIL_NONE false
#define TAIL_BYTES true
#define GPUP_STRUCT(Name, fields)
#define GPUP_COMMAND(Name, ord, tail, fields)
#define GPUP_MESSAGE(Name, ord, kind, rqt, rqf, rpt, rpf) round_trip_one<Op::Name>();
#include "protocol/schema.def"
#undef GPUP_MESSAGE
#undef GPUP_COMMAND
#undef GPUP_STRUCT
}

TEST(Protocol, OpTableMatchesSchema) {
  size_t n = 0;
  const OpInfo* ops = all_ops(&n);
  ASSERT_GT(n, 20u);
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(find_op(static_cast<u16>(ops[i].op)), &ops[i]);
    EXPECT_STRNE(ops[i].name, "unknown");
  }
  EXPECT_EQ(find_op(0), nullptr);
  EXPECT_EQ(find_op(9999), nullptr);
  EXPECT_STREQ(op_name(static_cast<u16>(Op::CreateAllocation)), "CreateAllocation");
}

TEST(Protocol, MessageLimitIsExactly128KiB) {
  EscapeRequest req{};
  const size_t room = max_tail(Op::Escape, false);
  std::vector<u8> tail(room);
  auto ok = encode_request(req, 1, tail);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->size(), 128u * 1024);
  EXPECT_TRUE(decode(ok->flatten(), Direction::kGuestToHost).ok());
  tail.push_back(0);
  auto too_big = encode_request(req, 1, tail);
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status(), GPUP_STATUS_MESSAGE_TOO_LARGE);
  EXPECT_NE(too_big.error().message.find("131073"), std::string::npos) << too_big.error().message;
}

TEST(Protocol, EncodedOwnsItsFixedPart) {
  auto enc = encode_request(CreateDeviceRequest{0x1234, 0, 0}, 9);  // a temporary request
  ASSERT_TRUE(enc.ok());
  const auto bytes = enc->flatten();
  auto dec = decode(bytes, Direction::kGuestToHost);
  ASSERT_TRUE(dec.ok());
  EXPECT_EQ(dec->as<CreateDeviceRequest>().adapter_luid, 0x1234u);
  static_assert(kMaxFixedSize >= sizeof(HelloRequest));
}

TEST(Protocol, DecoderRejectsMalformedHeaders) {
  CreateDeviceRequest req{};
  auto enc = encode_request(req, 3);
  ASSERT_TRUE(enc.ok());
  auto good = enc->flatten();
  ASSERT_TRUE(decode(good, Direction::kGuestToHost).ok());

  auto bad = good;
  bad[4] = 0xff;  // unknown opcode
  bad[5] = 0xff;
  EXPECT_EQ(decode(bad, Direction::kGuestToHost).status(), GPUP_STATUS_PROTOCOL_ERROR);
  bad = good;
  bad[6] = 0x80;  // unknown flag
  EXPECT_EQ(decode(bad, Direction::kGuestToHost).status(), GPUP_STATUS_PROTOCOL_ERROR);
  bad = good;
  bad[6] = kFlagReply;  // guest sending a reply
  EXPECT_EQ(decode(bad, Direction::kGuestToHost).status(), GPUP_STATUS_PROTOCOL_ERROR);
  bad = good;
  bad[16] = 1;  // request with a status
  EXPECT_EQ(decode(bad, Direction::kGuestToHost).status(), GPUP_STATUS_PROTOCOL_ERROR);
  EXPECT_EQ(decode(std::span<const u8>(good.data(), 10), Direction::kGuestToHost).status(), GPUP_STATUS_PROTOCOL_ERROR);
  std::vector<u8> huge(kMaxMessageSize + 1);
  EXPECT_EQ(decode(huge, Direction::kGuestToHost).status(), GPUP_STATUS_PROTOCOL_ERROR);
}

TEST(Protocol, CommandBufferRoundTrip) {
  CommandWriter w;
  w.copy(0x1000, 0x2000, 64);
  u32 pat = 0xdeadbeef;
  w.fill(0x3000, 128, &pat, 4);
  int v = 7;
  CommandWriter::Arg args[] = {{GPUPDDI_ARG_BUFFER, 0, 0x4000, 256, nullptr},
                               {GPUPDDI_ARG_VALUE, sizeof v, 0, 0, &v},
                               {GPUPDDI_ARG_LOCAL, 512, 0, 0, nullptr}};
  u64 gs[3] = {64, 1, 1};
  ASSERT_TRUE(w.dispatch(9, "add_i32", 1, nullptr, gs, nullptr, args).ok());
  w.signal(5, 42);
  w.wait(6, 43);
  EXPECT_EQ(w.count(), 5u);

  CommandReader r(w.bytes());
  CommandView cv;
  std::vector<CommandOp> seen;
  for (;;) {
    auto more = r.next(cv);
    ASSERT_TRUE(more.ok()) << more.error().describe();
    if (!*more) break;
    seen.push_back(cv.op);
    if (cv.op == CommandOp::Copy) {
      auto c = cv.as<CopyCommand>();
      EXPECT_EQ(c.src_va, 0x1000u);
      EXPECT_EQ(c.size, 64u);
    } else if (cv.op == CommandOp::Fill) {
      auto f = cv.as<FillCommand>();
      EXPECT_EQ(f.pattern_size, 4u);
      EXPECT_EQ(0, std::memcmp(f.pattern, &pat, 4));
    } else if (cv.op == CommandOp::Dispatch) {
      auto d = parse_dispatch(cv);
      ASSERT_TRUE(d.ok()) << d.error().describe();
      EXPECT_EQ(d->name, "add_i32");
      EXPECT_EQ(d->cmd.program, 9u);
      ASSERT_EQ(d->args.size(), 3u);
      EXPECT_EQ(d->args[0].desc.va, 0x4000u);
      int back;
      ASSERT_EQ(d->args[1].value.size(), sizeof back);
      std::memcpy(&back, d->args[1].value.data(), sizeof back);
      EXPECT_EQ(back, 7);
      EXPECT_EQ(d->args[2].desc.size, 512u);
    } else if (cv.op == CommandOp::SignalFence) {
      EXPECT_EQ(cv.as<SignalFenceCommand>().value, 42u);
    }
  }
  EXPECT_EQ(seen.size(), 5u);
}

TEST(Protocol, CommandReaderRejectsMalformedRecords) {
  CommandWriter w;
  w.copy(1, 2, 3);
  auto good = std::vector<u8>(w.bytes().begin(), w.bytes().end());
  CommandView cv;
  {
    auto bad = good;
    bad[0] = 99;  // unknown op
    CommandReader r(bad);
    EXPECT_EQ(r.next(cv).status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {
    auto bad = good;
    u32 sz = 12;  // not a multiple of 8
    std::memcpy(bad.data() + 4, &sz, 4);
    CommandReader r(bad);
    EXPECT_EQ(r.next(cv).status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {
    auto bad = good;
    u32 sz = 0xfffffff8;  // past the end
    std::memcpy(bad.data() + 4, &sz, 4);
    CommandReader r(bad);
    EXPECT_EQ(r.next(cv).status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
  {
    std::vector<u8> bad(good.begin(), good.begin() + 5);  // truncated header
    CommandReader r(bad);
    EXPECT_EQ(r.next(cv).status(), GPUP_STATUS_PROTOCOL_ERROR);
  }
}

TEST(Protocol, DispatchParserRejectsLies) {
  CommandWriter w;
  int v = 1;
  CommandWriter::Arg args[] = {{GPUPDDI_ARG_VALUE, sizeof v, 0, 0, &v}};
  u64 gs[3] = {1, 1, 1};
  ASSERT_TRUE(w.dispatch(1, "k", 1, nullptr, gs, nullptr, args).ok());
  auto good = std::vector<u8>(w.bytes().begin(), w.bytes().end());
  const size_t fixed_at = sizeof(CommandHeader);
  auto parse = [](std::vector<u8>& b) {
    CommandReader r(b);
    CommandView cv;
    auto more = r.next(cv);
    if (!more.ok()) return more.status();
    return parse_dispatch(cv).status();
  };
  EXPECT_EQ(parse(good), GPUP_STATUS_SUCCESS);
  auto bad = good;
  u32 n = 5;  // claims 5 args
  std::memcpy(bad.data() + fixed_at + offsetof(DispatchCommand, arg_count), &n, 4);
  EXPECT_EQ(parse(bad), GPUP_STATUS_PROTOCOL_ERROR);
  bad = good;
  n = 100000;  // huge name
  std::memcpy(bad.data() + fixed_at + offsetof(DispatchCommand, name_len), &n, 4);
  EXPECT_EQ(parse(bad), GPUP_STATUS_PROTOCOL_ERROR);
  bad = good;
  n = 0;  // arg count 0 leaves trailing bytes
  std::memcpy(bad.data() + fixed_at + offsetof(DispatchCommand, arg_count), &n, 4);
  EXPECT_EQ(parse(bad), GPUP_STATUS_PROTOCOL_ERROR);
  bad = good;
  u32 kind = 77;
  std::memcpy(bad.data() + fixed_at + sizeof(DispatchCommand) + 8, &kind, 4);
  EXPECT_EQ(parse(bad), GPUP_STATUS_PROTOCOL_ERROR);

  std::string long_name(kMaxKernelNameLength + 1, 'x');
  EXPECT_EQ(w.dispatch(1, long_name, 1, nullptr, gs, nullptr, {}).status(), GPUP_STATUS_INVALID_PARAMETER);
}

}  // namespace
}  // namespace gpup::proto
