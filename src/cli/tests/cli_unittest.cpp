#include <gtest/gtest.h>

#include "cli/cli.h"

namespace gpup::cli {
namespace {

TEST(CliTable, AlignsColumnsWithoutTrailingBlanks) {
  Table t({"NAME", "SIZE", "STATE"}, {false, true, false});
  t.add({"pocl0", "3.8 GiB", "ready"});
  t.add({"mock-long-name", "1 GiB", ""});
  EXPECT_EQ(t.render(),
            "NAME               SIZE  STATE\n"
            "pocl0           3.8 GiB  ready\n"
            "mock-long-name    1 GiB\n");
}

TEST(CliFormat, DurationsAndLuids) {
  EXPECT_EQ(format_duration(42), "42s");
  EXPECT_EQ(format_duration(3723), "1h 2m 3s");
  EXPECT_EQ(format_duration(90061), "1d 1h 1m");
  EXPECT_EQ(format_luid(0x1234), "0x0000000000001234");
}

TEST(CliFormat, SizeOptionsNameTheOption) {
  EXPECT_EQ(parse_size_option("256MiB", "--max-vram"), 256ull << 20);
  try {
    parse_size_option("lots", "--max-vram");
    FAIL();
  } catch (const CliError& e) {
    EXPECT_STREQ(e.what(), "--max-vram: 'lots' is not a size (use bytes or a unit: 256MiB, 1.5GiB)");
    EXPECT_EQ(e.code, 1);
  }
}

TEST(CliReplies, MissingOrMistypedFieldsFallBack) {
  json j{{"s", "x"}, {"n", 5}, {"b", true}, {"neg", -1}};
  EXPECT_EQ(str(j, "s"), "x");
  EXPECT_EQ(str(j, "n", "dflt"), "dflt");
  EXPECT_EQ(u64(j, "n"), 5u);
  EXPECT_EQ(u64(j, "neg", 7), 7u);
  EXPECT_TRUE(flag(j, "b"));
  EXPECT_FALSE(flag(j, "missing"));
}

TEST(CliClient, NotRunningMessageNamesTheSocket) {
  Context ctx{"/nonexistent-gpup-run", "/nonexistent-gpup-state"};
  try {
    call(ctx, json{{"op", "status"}});
    FAIL();
  } catch (const CliError& e) {
    EXPECT_STREQ(e.what(), "gpupd is not running (no socket at /nonexistent-gpup-run/gpupd.sock)");
  }
}

}  // namespace
}  // namespace gpup::cli
