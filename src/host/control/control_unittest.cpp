#include <sys/socket.h>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "common/fd.h"
#include "host/control/client.h"
#include "host/control/json_lines.h"
#include "host/control/protocol.h"

namespace gpup::control {
namespace {

TEST(ControlFraming, SplitsLinesAcrossChunks) {
  LineReader r(16);
  ASSERT_TRUE(r.append("{\"a\":").ok());
  EXPECT_FALSE(r.has_line());
  ASSERT_TRUE(r.append("1}\n{\"b\":2}\r\n\n{\"c\"").ok());
  EXPECT_EQ(r.pop(), "{\"a\":1}");
  EXPECT_EQ(r.pop(), "{\"b\":2}");  // '\r' stripped, empty line skipped
  EXPECT_FALSE(r.pop());
  EXPECT_EQ(r.partial_size(), 4u);
}

TEST(ControlFraming, AcceptsLineOfExactlyTheLimit) {
  LineReader r(8);
  ASSERT_TRUE(r.append("12345678\n").ok());
  ASSERT_TRUE(r.append("12345678\r\n").ok());
  EXPECT_EQ(r.pop(), "12345678");
  EXPECT_EQ(r.pop(), "12345678");
}

TEST(ControlFraming, RejectsCompleteLineOverTheLimit) {
  LineReader r(8);
  Status s = r.append("123456789\n");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status(), GPUP_STATUS_MESSAGE_TOO_LARGE);
  EXPECT_NE(s.error().message.find("8-byte limit"), std::string::npos);
  EXPECT_TRUE(r.failed());
  EXPECT_FALSE(r.append("ok\n").ok()) << "a failed reader stays failed";
}

TEST(ControlFraming, RejectsUnterminatedLineOverTheLimitBeforeItEnds) {
  LineReader r(8);
  ASSERT_TRUE(r.append("12345").ok());
  EXPECT_FALSE(r.append("678901").ok()) << "no need to wait for the newline to know it is too long";
}

TEST(ControlFraming, ReadsFromSocketAndReportsEof) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  std::string out = encode_line(json{{"op", "status"}}) + encode_line(json{{"x", "\xff"}});
  auto sent = flush_some(a.get(), out);
  ASSERT_TRUE(sent.ok());
  EXPECT_TRUE(*sent);
  a.reset();
  LineReader r(1024);
  std::string err;
  EXPECT_EQ(read_lines(b.get(), r, &err), ReadOutcome::kEof);
  auto first = parse_object_line(*r.pop());
  ASSERT_TRUE(first.ok());
  EXPECT_EQ((*first)["op"], "status");
  EXPECT_TRUE(parse_object_line(*r.pop()).ok()) << "invalid UTF-8 was replaced when encoding";
}

TEST(ControlFraming, AcceptsOnlyObjects) {
  EXPECT_TRUE(parse_object_line("{}").ok());
  auto arr = parse_object_line("[1,2]");
  ASSERT_FALSE(arr.ok());
  EXPECT_NE(arr.error().message.find("expected a JSON object, got array"), std::string::npos);
  auto bad = parse_object_line("{\"a\":");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("invalid JSON at byte"), std::string::npos);
  EXPECT_FALSE(parse_object_line("").ok());
}

TEST(ControlObjectReader, ChecksTypesAndRanges) {
  json j = json::parse(R"({"n":5,"neg":-1,"f":1.5,"s":"abc","b":true,"o":{},"a":[1,2,3]})");
  ObjectReader r(j, "vm");
  EXPECT_EQ(r.u64("n"), 5u);
  EXPECT_EQ(r.str("s", 3), "abc");
  EXPECT_EQ(r.boolean("b"), true);
  EXPECT_TRUE(r.object("o"));
  EXPECT_TRUE(r.array("a", 3));
  EXPECT_FALSE(r.opt_u64("missing"));
  EXPECT_TRUE(r.ok());

  ObjectReader neg(j, "vm");
  EXPECT_FALSE(neg.u64("neg"));
  EXPECT_EQ(neg.error(), "vm.neg: expected a non-negative integer, got negative integer");
  ObjectReader flt(j, "vm");
  EXPECT_FALSE(flt.u64("f"));
  EXPECT_EQ(flt.error(), "vm.f: expected a non-negative integer, got number with a fraction");
  ObjectReader range(j, "vm");
  EXPECT_FALSE(range.u64("n", 1, 4));
  EXPECT_EQ(range.error(), "vm.n: 5 is outside 1..4");
  ObjectReader len(j, "vm");
  EXPECT_FALSE(len.str("s", 2));
  EXPECT_EQ(len.error(), "vm.s: longer than 2 bytes");
  ObjectReader items(j, "vm");
  EXPECT_FALSE(items.array("a", 2));
  ObjectReader missing(j, "vm");
  EXPECT_FALSE(missing.str("nope", 10));
  EXPECT_EQ(missing.error(), "vm.nope: missing");
  ObjectReader unknown(j, "req");
  unknown.only({"n", "neg", "f", "s", "b", "o"});
  EXPECT_EQ(unknown.error(), "req.a: unknown field");
  ObjectReader notobj(json::array(), "vm");
  EXPECT_EQ(notobj.error(), "vm: expected an object, got array");
}

TEST(ControlProtocol, NamesAreChecked) {
  EXPECT_TRUE(validate_name("vm-1_a.b", "vm").ok());
  EXPECT_TRUE(validate_name(std::string(64, 'a'), "vm").ok());
  EXPECT_FALSE(validate_name(std::string(65, 'a'), "vm").ok());
  EXPECT_FALSE(validate_name("", "vm").ok());
  EXPECT_FALSE(validate_name("..", "vm").ok());
  EXPECT_FALSE(validate_name(".hidden", "vm").ok());
  EXPECT_FALSE(validate_name("-x", "vm").ok());
  EXPECT_FALSE(validate_name("a/b", "vm").ok());
  EXPECT_FALSE(validate_name("a b", "vm").ok());
  EXPECT_EQ(validate_name("a b", "vm").error().message,
            "vm name 'a b' is invalid: use 1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit");
}

TEST(ControlProtocol, GuidsAreRandomV4) {
  std::string g = new_guid();
  ASSERT_EQ(g.size(), 36u);
  EXPECT_EQ(g[14], '4');
  EXPECT_NE(std::string("89ab").find(g[19]), std::string::npos);
  EXPECT_TRUE(parse_guid(g));
  EXPECT_NE(g, new_guid());
  EXPECT_FALSE(parse_guid("0123456789abcdef0123456789abcdef0123"));
  EXPECT_FALSE(parse_guid("zzzzzzzz-0000-4000-8000-000000000000"));
}

TEST(ControlProtocol, ConfigureMessageRoundTrips) {
  ConfigureMessage m;
  m.vm = VmSpec{"v1", new_guid(), "pocl0", 1 << 20, 4 << 20, 2 << 20, 100, 50, true};
  m.adapter = AdapterSpec{"pocl0", 0x1234, "/usr/lib/libgpup_kmd_opencl.so", "platform=x\ndevice=0\n"};
  m.endpoint = "/run/gpup/vms/v1/vrd.sock";
  m.log_level = "info";
  json j = json::parse(encode_line(to_json(m)));
  EXPECT_EQ(j["op"], "configure");
  auto back = configure_from_json(j);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(*back, m);

  json bad = to_json(m);
  bad["vm"]["min_vram"] = 8 << 20;  // above max
  EXPECT_FALSE(configure_from_json(bad).ok());
  bad = to_json(m);
  bad["adapter"]["kmd"] = "relative.so";
  EXPECT_FALSE(configure_from_json(bad).ok());
  bad = to_json(m);
  bad["vm"]["max_compute"] = 0;
  EXPECT_FALSE(configure_from_json(bad).ok());
}

// The decoder's message for j, or "accepted".
template <typename Decode>
std::string refusal(Decode decode, const json& j) {
  auto r = decode(j);
  return r.ok() ? std::string("accepted") : r.error().message;
}

VmSpec sample_vm() { return VmSpec{"v1", new_guid(), "pocl0", 1 << 20, 4 << 20, 2 << 20, 100, 50, false, {1000}, {}}; }

ConfigureMessage sample_configure() {
  ConfigureMessage m;
  m.vm = sample_vm();
  m.adapter = AdapterSpec{"pocl0", 0x1234, "/usr/lib/libgpup_kmd_opencl.so", "platform=x\n"};
  m.endpoint = "/run/gpup/vms/v1/vrd.sock";
  m.log_level = "warning";
  m.tdr_delay_ms = 500;
  return m;
}

TEST(ControlProtocol, ConfigureRefusesWhatItDoesNotKnow) {
  auto decode = [](const json& j) { return configure_from_json(j); };
  json j = to_json(sample_configure());
  EXPECT_EQ(refusal(decode, j), "accepted");
  json bad = j;
  bad["extra"] = 1;
  EXPECT_EQ(refusal(decode, bad), "configure.extra: unknown field");
  bad = j;
  bad["log_level"] = "loud";
  EXPECT_EQ(refusal(decode, bad), "configure.log_level: 'loud' is not a log level");
  bad = j;
  bad.erase("tdr_delay_ms");
  EXPECT_EQ(refusal(decode, bad), "configure.tdr_delay_ms: missing");
  bad = j;
  bad["tdr_delay_ms"] = kMaxTdrDelayMs + 1;
  EXPECT_EQ(refusal(decode, bad), "configure.tdr_delay_ms: 600001 is outside 100..600000");
  bad = j;
  bad["vm"]["pci_slot"] = 3;
  EXPECT_EQ(refusal(decode, bad), "vm.pci_slot: unknown field");
  bad = j;
  bad["adapter"]["luid"] = "0x1234";
  EXPECT_EQ(refusal(decode, bad), "adapter.luid: expected a non-negative integer, got string");
  bad = j;
  bad["endpoint"] = "vrd.sock";
  EXPECT_EQ(refusal(decode, bad), "configure.endpoint: not an absolute path");
}

// Each line of the worker channel, through its encoder, the wire, and back.
TEST(ControlWorkerChannel, EveryLineRoundTrips) {
  auto through_the_wire = [](const auto& m) { return json::parse(encode_line(to_json(m))); };
  auto check = [&](const auto& m, auto decode) {
    auto back = decode(through_the_wire(m));
    ASSERT_TRUE(back.ok()) << back.error().message << " in " << encode_line(to_json(m));
    EXPECT_EQ(*back, m) << encode_line(to_json(m));
  };
  check(sample_configure(), [](const json& j) { return configure_from_json(j); });

  auto request = [](const json& j) { return worker_request_from_json(j); };
  check(WorkerRequest{WorkerOp::kStats, 1, std::nullopt}, request);
  check(WorkerRequest{WorkerOp::kUpdate, 2, sample_vm()}, request);
  check(WorkerRequest{WorkerOp::kShutdown, 3, std::nullopt}, request);

  json stats = *sanitize_worker_stats(json::parse(
      R"({"vram_used":10,"vram_max":100,"vram_held":20,"totals":{"processes":1,"submissions":3},
          "processes":[{"pid":42,"name":"app","vram_used":10}]})"));
  check(WorkerReply{1, true, {}, stats}, [](const json& j) { return worker_reply_from_json(j, WorkerOp::kStats); });
  check(WorkerReply{1, true, {}, stats}, [](const json& j) { return worker_reply_from_json(j); });
  check(WorkerReply{2, true, {}, std::nullopt}, [](const json& j) { return worker_reply_from_json(j, WorkerOp::kUpdate); });
  check(WorkerReply{3, false, "KMD refused", std::nullopt},
        [](const json& j) { return worker_reply_from_json(j, WorkerOp::kUpdate); });

  check(ReadyEvent{"/run/gpup/vms/v1/vrd.sock", 1}, [](const json& j) { return ready_event_from_json(j); });
  check(ReadyEvent{"/run/gpup/vms/v1/vrd.sock", std::nullopt}, [](const json& j) { return ready_event_from_json(j); });
  check(ErrorEvent{"no such KMD"}, [](const json& j) { return error_event_from_json(j); });
  auto tdr = [](const json& j) { return tdr_event_from_json(j); };
  check(TdrEvent{2100, 2000, 0x40000001u, 42u, std::string("app"), true}, tdr);
  check(TdrEvent{2100, 2000, std::nullopt, std::nullopt, std::nullopt, false}, tdr);
  check(TdrEvent{.running_ms = 5100, .pid = 42u, .process = std::string("app"), .guests_told = false,
                 .kind = TdrEvent::Kind::kBuild, .build_timeout_s = 5},
        tdr);

  auto ask = [](const json& j) { return vram_ask_from_json(j); };
  check(VramAsk{1, false, 16 << 20, 96 << 20}, ask);
  check(VramAsk{2, true, 0, 0}, ask);
  auto answer = [](const json& j) { return vram_answer_from_json(j); };
  check(VramAnswer{1, true, 96 << 20, 32 << 20, 16u << 20, 256u << 20, ""}, answer);
  check(VramAnswer{2, false, 16 << 20, 0, 16u << 20, 256u << 20, "partition v1 would need 1 GiB"}, answer);
  check(VramAnswer{3, true, 96 << 20, 0, std::nullopt, std::nullopt, ""}, answer);

  auto sched = [](const json& j) { return sched_request_from_json(j); };
  check(SchedRequest{SchedRequest::Kind::kWant}, sched);
  check(SchedRequest{SchedRequest::Kind::kRelease, 1234, true}, sched);
  auto notice = [](const json& j) { return sched_notice_from_json(j); };
  check(SchedNotice{SchedNotice::Kind::kGrant}, notice);
  check(SchedNotice{SchedNotice::Kind::kYield, 10000, true}, notice);
}

// The wire text is what gpupd and the worker exchanged before the codec: same keys, same values.
TEST(ControlWorkerChannel, WireTextIsUnchanged) {
  EXPECT_EQ(encode_line(to_json(WorkerRequest{WorkerOp::kShutdown, 7, std::nullopt})), "{\"id\":7,\"op\":\"shutdown\"}\n");
  EXPECT_EQ(encode_line(to_json(WorkerReply{7, false, "no", std::nullopt})), "{\"error\":\"no\",\"ok\":false,\"reply\":7}\n");
  EXPECT_EQ(encode_line(to_json(ReadyEvent{"/e", 1})), "{\"endpoint\":\"/e\",\"event\":\"ready\",\"pid\":1}\n");
  EXPECT_EQ(encode_line(to_json(VramAsk{3, false, 1, 2})), "{\"ask\":3,\"need\":1,\"op\":\"vram\",\"want\":2}\n");
  EXPECT_EQ(encode_line(to_json(VramAsk{4, true, 0, 0})), "{\"ask\":4,\"op\":\"vram\"}\n");
  EXPECT_EQ(encode_line(to_json(VramAnswer{3, false, 5, 0, 5u, 9u, "full"})),
            "{\"answer\":3,\"borrowable\":0,\"error\":\"full\",\"granted\":false,\"hold\":5,\"max\":9,\"min\":5,\"ok\":true}\n");
  EXPECT_EQ(encode_line(to_json(SchedRequest{SchedRequest::Kind::kRelease, 5, false})),
            "{\"busy_us\":5,\"more\":false,\"sched\":\"release\"}\n");
  EXPECT_EQ(encode_line(to_json(SchedNotice{SchedNotice::Kind::kYield, 10000, true})),
            "{\"after_us\":10000,\"if_idle\":true,\"sched\":\"yield\"}\n");
  EXPECT_EQ(encode_line(to_json(TdrEvent{2100, 2000, 5u, 42u, std::string("app"), false})),
            "{\"context\":5,\"event\":\"tdr\",\"guests_told\":false,\"pid\":42,\"process\":\"app\",\"running_ms\":2100,"
            "\"tdr_delay_ms\":2000}\n");
  EXPECT_EQ(encode_line(to_json(TdrEvent{.running_ms = 5100, .pid = 42u, .guests_told = false,
                                         .kind = TdrEvent::Kind::kBuild, .build_timeout_s = 5})),
            "{\"build_timeout_s\":5,\"event\":\"tdr\",\"guests_told\":false,\"kind\":\"build\",\"pid\":42,"
            "\"running_ms\":5100}\n");
}

// Partitions persisted before builds had a timeout load with the default; a bad one is refused.
TEST(ControlProtocol, BuildTimeoutDefaultsWhenAbsentAndIsRanged) {
  VmSpec vm = sample_vm();
  vm.build_timeout_s = 7;
  json j = to_json(vm);
  EXPECT_EQ(j["build_timeout_s"], 7);
  auto back = exact_vm_spec_from_json(j);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(*back, vm);
  j.erase("build_timeout_s");
  back = exact_vm_spec_from_json(j);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->build_timeout_s, kDefaultBuildTimeoutS);
  for (uint64_t bad : {uint64_t{0}, uint64_t{kMaxBuildTimeoutS} + 1}) {
    j["build_timeout_s"] = bad;
    back = exact_vm_spec_from_json(j);
    ASSERT_FALSE(back.ok());
    EXPECT_EQ(back.error().message, fmt::format("vm.build_timeout_s: {} is outside 1..3600", bad));
  }
}

// A build's reset names its timeout, not a TDR delay, and carries no context; a work reset no kind.
TEST(ControlWorkerChannel, BuildResetsAreChecked) {
  auto d = [](const json& j) { return tdr_event_from_json(j); };
  EXPECT_EQ(refusal(d, json::parse(R"({"event":"tdr","kind":"build","running_ms":5100,"build_timeout_s":5})")),
            "accepted");
  EXPECT_EQ(refusal(d, json::parse(R"({"event":"tdr","kind":"build","running_ms":5100,"tdr_delay_ms":2000})")),
            "tdr.tdr_delay_ms: unknown field");
  EXPECT_EQ(refusal(d, json::parse(R"({"event":"tdr","kind":"build","running_ms":1,"build_timeout_s":0})")),
            "tdr.build_timeout_s: 0 is outside 1..3600");
  EXPECT_EQ(refusal(d, json::parse(R"({"event":"tdr","kind":"build","running_ms":1,"build_timeout_s":5,"context":1})")),
            "tdr.context: unknown field");
  EXPECT_EQ(refusal(d, json::parse(R"({"event":"tdr","kind":"work","running_ms":1,"tdr_delay_ms":2000})")),
            "tdr: kind is 'work', not build");
  EXPECT_EQ(refusal(d, json::parse(R"({"event":"tdr","running_ms":1,"build_timeout_s":5})")),
            "tdr.build_timeout_s: unknown field");
}

TEST(ControlWorkerChannel, RequestsAreChecked) {
  auto d = [](const json& j) { return worker_request_from_json(j); };
  EXPECT_EQ(refusal(d, json::parse(R"({"op":"stats"})")), "request.id: missing");
  EXPECT_EQ(refusal(d, json::parse(R"({"op":"stats","id":"1"})")), "request.id: expected a non-negative integer, got string");
  EXPECT_EQ(refusal(d, json::parse(R"({"op":"stats","id":0})")), "request.id: 0 is outside 1..18446744073709551615");
  EXPECT_EQ(refusal(d, json::parse(R"({"op":"stats","id":1,"force":true})")), "request.force: unknown field");
  EXPECT_EQ(refusal(d, json::parse(R"({"op":"reboot","id":1})")), "request.op: unknown op 'reboot'");
  EXPECT_EQ(refusal(d, json::parse(R"({"op":"update","id":1})")), "request.vm: missing");
  json stats_with_vm{{"op", "stats"}, {"id", 1}, {"vm", to_json(sample_vm())}};
  EXPECT_EQ(refusal(d, stats_with_vm), "request.vm: only an update carries one, not stats");
  json update{{"op", "update"}, {"id", 1}, {"vm", to_json(sample_vm())}};
  EXPECT_EQ(refusal(d, update), "accepted");
  update["vm"]["max_compute"] = 0;
  EXPECT_EQ(refusal(d, update), "request.vm.max_compute: 0 is outside 1..100");
  update["vm"] = to_json(sample_vm());
  update["vm"]["other_vm"] = "v2";
  EXPECT_EQ(refusal(d, update), "request.vm.other_vm: unknown field");
  for (const auto& r : {stats_with_vm, update})
    EXPECT_EQ(d(r).status(), GPUP_STATUS_PROTOCOL_ERROR);
}

TEST(ControlWorkerChannel, RepliesAreChecked) {
  auto any = [](const json& j) { return worker_reply_from_json(j); };
  auto to_stats = [](const json& j) { return worker_reply_from_json(j, WorkerOp::kStats); };
  auto to_update = [](const json& j) { return worker_reply_from_json(j, WorkerOp::kUpdate); };
  EXPECT_EQ(refusal(any, json::parse(R"({"reply":1})")), "reply.ok: missing");
  EXPECT_EQ(refusal(any, json::parse(R"({"reply":1,"ok":"yes"})")), "reply.ok: expected true or false, got string");
  EXPECT_EQ(refusal(any, json::parse(R"({"reply":0,"ok":true})")), "reply.reply: 0 is outside 1..18446744073709551615");
  EXPECT_EQ(refusal(any, json::parse(R"({"reply":1,"ok":true,"vm":"v2"})")), "reply.vm: unknown field");
  EXPECT_EQ(refusal(any, json::parse(R"({"reply":1,"ok":false})")), "reply.error: missing");
  EXPECT_EQ(refusal(any, json::parse(R"({"reply":1,"ok":true,"error":"x"})")), "reply: error in an ok reply");
  EXPECT_EQ(refusal(any, json{{"reply", 1}, {"ok", false}, {"error", std::string(kMaxMessageLength + 1, 'x')}}),
            "reply.error: longer than 4096 bytes");
  EXPECT_EQ(refusal(to_stats, json::parse(R"({"reply":1,"ok":true})")), "reply.stats: missing");
  json stats = json::parse(R"({"reply":1,"ok":true,"stats":{"vram_used":1,"vram_max":2}})");
  EXPECT_EQ(refusal(to_stats, stats), "accepted");
  EXPECT_EQ(refusal(to_update, stats), "reply.stats: not in a reply to update");
  stats["stats"]["vram_used"] = "1";
  EXPECT_EQ(refusal(to_stats, stats), "stats.vram_used: expected a non-negative integer, got string");
  EXPECT_EQ(refusal(to_stats, json::parse(R"({"reply":1,"ok":false,"error":"x","stats":{}})")), "reply: stats in a refusal");
}

TEST(ControlWorkerChannel, EventsAreChecked) {
  auto ready = [](const json& j) { return ready_event_from_json(j); };
  EXPECT_EQ(refusal(ready, json::parse(R"({"event":"ready"})")), "ready.endpoint: missing");
  EXPECT_EQ(refusal(ready, json::parse(R"({"event":"ready","endpoint":3})")), "ready.endpoint: expected a string, got integer");
  EXPECT_EQ(refusal(ready, json::parse(R"({"event":"ready","endpoint":"/e","pid":0})")), "ready.pid: 0 is outside 1..2147483647");
  EXPECT_EQ(refusal(ready, json::parse(R"({"event":"ready","endpoint":"/e","vm":"v2"})")), "ready.vm: unknown field");
  EXPECT_EQ(refusal(ready, json::parse(R"({"event":"tdr","endpoint":"/e"})")), "ready: event is 'tdr', not ready");
  EXPECT_EQ(refusal(ready, json{{"event", "ready"}, {"endpoint", std::string(kUnixPathMax + 1, 'e')}}),
            "ready.endpoint: longer than 107 bytes");

  auto error = [](const json& j) { return error_event_from_json(j); };
  EXPECT_EQ(refusal(error, json::parse(R"({"event":"error"})")), "error.message: missing");
  EXPECT_EQ(refusal(error, json::parse(R"({"event":"error","message":"m","code":1})")), "error.code: unknown field");
  EXPECT_EQ(refusal(error, json{{"event", "error"}, {"message", std::string(kMaxMessageLength + 1, 'm')}}),
            "error.message: longer than 4096 bytes");
  // A producer's long text is cut to what the decoder takes.
  auto cut = error_event_from_json(to_json(ErrorEvent{std::string(kMaxMessageLength + 100, 'm')}));
  ASSERT_TRUE(cut.ok()) << cut.error().message;
  EXPECT_EQ(cut->message.size(), kMaxMessageLength);

  auto tdr = [](const json& j) { return tdr_event_from_json(j); };
  EXPECT_EQ(refusal(tdr, json::parse(R"({"event":"tdr","tdr_delay_ms":2000})")), "tdr.running_ms: missing");
  EXPECT_EQ(refusal(tdr, json::parse(R"({"event":"tdr","running_ms":1,"tdr_delay_ms":50})")),
            "tdr.tdr_delay_ms: 50 is outside 100..600000");
  EXPECT_EQ(refusal(tdr, json::parse(R"({"event":"tdr","running_ms":1,"tdr_delay_ms":2000,"context":4294967296})")),
            "tdr.context: 4294967296 is outside 0..4294967295");
  EXPECT_EQ(refusal(tdr, json::parse(R"({"event":"tdr","running_ms":1,"tdr_delay_ms":2000,"guests_told":"no"})")),
            "tdr.guests_told: expected true or false, got string");
  EXPECT_EQ(refusal(tdr, json::parse(R"({"event":"tdr","running_ms":1,"tdr_delay_ms":2000,"vm":"v2"})")),
            "tdr.vm: unknown field");
  EXPECT_EQ(refusal(tdr, json{{"event", "tdr"}, {"running_ms", 1}, {"tdr_delay_ms", 2000},
                              {"process", std::string(kMaxProcessName + 1, 'p')}}),
            "tdr.process: longer than 260 bytes");
}

TEST(ControlWorkerChannel, VramLinesAreChecked) {
  auto ask = [](const json& j) { return vram_ask_from_json(j); };
  EXPECT_EQ(refusal(ask, json::parse(R"({"ask":1,"op":"vram","need":1})")), "ask.want: missing");
  EXPECT_EQ(refusal(ask, json::parse(R"({"ask":1,"op":"vram","need":2,"want":1})")), "ask: need 2 is above want 1");
  EXPECT_EQ(refusal(ask, json::parse(R"({"ask":1,"op":"gpu"})")), "ask: op is 'gpu', not vram");
  EXPECT_EQ(refusal(ask, json::parse(R"({"ask":0,"op":"vram"})")), "ask.ask: 0 is outside 1..18446744073709551615");
  EXPECT_EQ(refusal(ask, json::parse(R"({"ask":1,"op":"vram","need":-1,"want":1})")),
            "ask.need: expected a non-negative integer, got negative integer");
  EXPECT_EQ(refusal(ask, json::parse(R"({"ask":1,"op":"vram","vm":"v2"})")), "ask.vm: unknown field");

  auto answer = [](const json& j) { return vram_answer_from_json(j); };
  EXPECT_EQ(refusal(answer, json::parse(R"({"answer":1,"ok":true,"granted":true,"borrowable":0})")), "answer.hold: missing");
  EXPECT_EQ(refusal(answer, json::parse(R"({"answer":1,"ok":false,"granted":true,"hold":1,"borrowable":0})")),
            "answer: ok is false (a refusal is granted:false)");
  EXPECT_EQ(refusal(answer, json::parse(R"({"answer":1,"ok":true,"granted":true,"hold":1,"borrowable":0,"error":"x"})")),
            "answer: error in a grant");
  EXPECT_EQ(refusal(answer, json::parse(R"({"answer":1,"ok":true,"granted":1,"hold":1,"borrowable":0})")),
            "answer.granted: expected true or false, got integer");
  EXPECT_EQ(refusal(answer, json::parse(R"({"answer":1,"ok":true,"granted":true,"hold":1,"borrowable":0,"x":0})")),
            "answer.x: unknown field");
}

TEST(ControlWorkerChannel, SchedulerLinesAreChecked) {
  auto want = [](const json& j) { return sched_request_from_json(j); };
  EXPECT_EQ(refusal(want, json::parse(R"({"sched":"release","busy_us":1})")), "sched.more: missing");
  EXPECT_EQ(refusal(want, json::parse(R"({"sched":"want","more":true})")), "sched.more: unknown field");
  EXPECT_EQ(refusal(want, json::parse(R"({"sched":"grant"})")), "sched: sched is 'grant', not want or release");
  EXPECT_EQ(refusal(want, json::parse(R"({"sched":"release","busy_us":-1,"more":true})")),
            "sched.busy_us: expected a non-negative integer, got negative integer");
  EXPECT_EQ(refusal(want, json{{"sched", "release"}, {"busy_us", kMaxBusyUs + 1}, {"more", true}}),
            fmt::format("sched.busy_us: {} is outside 0..{}", kMaxBusyUs + 1, kMaxBusyUs));

  auto notice = [](const json& j) { return sched_notice_from_json(j); };
  EXPECT_EQ(refusal(notice, json::parse(R"({"sched":"yield","after_us":1})")), "sched.if_idle: missing");
  EXPECT_EQ(refusal(notice, json::parse(R"({"sched":"want"})")), "sched: sched is 'want', not grant or yield");
  EXPECT_EQ(refusal(notice, json::parse(R"({"sched":"grant","vm":"v2"})")), "sched.vm: unknown field");
  EXPECT_EQ(refusal(notice, json{{"sched", "yield"}, {"after_us", kMaxYieldAfterUs + 1}, {"if_idle", false}}),
            fmt::format("sched.after_us: {} is outside 0..{}", kMaxYieldAfterUs + 1, kMaxYieldAfterUs));
  EXPECT_EQ(refusal(notice, json::parse(R"({"sched":7})")), "sched.sched: expected a string, got integer");
}

TEST(ControlProtocol, WorkerStatsAreSanitized) {
  json in = json::parse(R"({"vram_used":10,"vram_max":100,"evil":"x",
    "totals":{"processes":1,"devices":2,"submissions":3,"Bad Key":4,"neg":-1,"text":"t"},
    "processes":[{"pid":42,"name":"app","vram_used":10,"extra":[1],"faults":2},{"name":"\u001b[2J\u00e9"}]})");
  auto out = sanitize_worker_stats(in);
  ASSERT_TRUE(out.ok()) << out.error().message;
  EXPECT_FALSE(out->contains("evil"));
  EXPECT_EQ((*out)["totals"]["devices"], 2);
  EXPECT_EQ((*out)["totals"]["submissions"], 3) << "other counters pass";
  EXPECT_FALSE((*out)["totals"].contains("Bad Key"));
  EXPECT_FALSE((*out)["totals"].contains("neg"));
  EXPECT_FALSE((*out)["totals"].contains("text"));
  EXPECT_EQ((*out)["processes"][0]["name"], "app");
  EXPECT_EQ((*out)["processes"][0]["faults"], 2);
  EXPECT_FALSE((*out)["processes"][0].contains("extra"));
  EXPECT_EQ((*out)["processes"][1]["name"], "?[2J??") << "a name reaches the operator's terminal: ASCII only";
  json wide = json{{"vram_used", 0}, {"vram_max", 0}, {"totals", json::object()}};
  for (int i = 0; i < 100; ++i) wide["totals"]["c" + std::to_string(i)] = i;
  EXPECT_EQ((*sanitize_worker_stats(wide))["totals"].size(), 32u) << "extra counters are capped";

  EXPECT_FALSE(sanitize_worker_stats(json::parse(R"({"vram_used":"10","vram_max":1})")).ok());
  EXPECT_FALSE(sanitize_worker_stats(json::parse(R"({"vram_used":1})")).ok());
  auto badproc = sanitize_worker_stats(json::parse(R"({"vram_used":1,"vram_max":1,"processes":[{"pid":-3}]})"));
  ASSERT_FALSE(badproc.ok());
  EXPECT_NE(badproc.error().message.find("stats.processes[0].pid"), std::string::npos);
  json many = json{{"vram_used", 0}, {"vram_max", 0}, {"processes", json::array()}};
  for (size_t i = 0; i <= kMaxStatsProcesses; ++i) many["processes"].push_back(json::object());
  EXPECT_FALSE(sanitize_worker_stats(many).ok());
}

TEST(ControlClient, ReportsDaemonNotRunning) {
  auto r = call("/nonexistent-gpup-dir/gpupd.sock", json{{"op", "status"}}, std::chrono::milliseconds(500));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status(), GPUP_STATUS_NOT_FOUND);
  EXPECT_EQ(r.error().message, "gpupd is not running (no socket at /nonexistent-gpup-dir/gpupd.sock)");
}

}  // namespace
}  // namespace gpup::control
