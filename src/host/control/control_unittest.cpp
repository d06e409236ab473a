#include <sys/socket.h>

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

TEST(ControlProtocol, WorkerStatsAreSanitized) {
  json in = json::parse(R"({"vram_used":10,"vram_max":100,"evil":"x",
    "totals":{"processes":1,"devices":2,"submissions":3,"Bad Key":4,"neg":-1,"text":"t"},
    "processes":[{"pid":42,"name":"app","vram_used":10,"extra":[1],"faults":2}]})");
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
