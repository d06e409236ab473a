#include <gtest/gtest.h>

#include "common/result.h"
#include "common/units.h"

namespace gpup {

TEST(Units, ParsesBinaryAndDecimalUnits) {
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_EQ(parse_size("256MiB"), 256ull << 20);
  EXPECT_EQ(parse_size("256 mib"), 256ull << 20);
  EXPECT_EQ(parse_size("1.5GiB"), 3ull << 29);
  EXPECT_EQ(parse_size("2G"), 2ull << 30);
  EXPECT_EQ(parse_size("1GB"), 1000000000ull);
  EXPECT_FALSE(parse_size(""));
  EXPECT_FALSE(parse_size("MiB"));
  EXPECT_FALSE(parse_size("12 parsecs"));
  EXPECT_FALSE(parse_size("-1"));
  EXPECT_FALSE(parse_size("99999999999 TiB"));
}

TEST(Units, FormatsSizes) {
  EXPECT_EQ(format_size(256ull << 20), "256 MiB");
  EXPECT_EQ(format_size(1536ull << 20), "1.5 GiB");
  EXPECT_EQ(format_size(12), "12 B");
}

TEST(Status, NamesAndMessagesComeFromOneList) {
  EXPECT_STREQ(gpup_status_name(GPUP_STATUS_INVALID_HANDLE), "INVALID_HANDLE");
  EXPECT_STREQ(gpup_status_name(GPUP_STATUS_MESSAGE_TOO_LARGE), "MESSAGE_TOO_LARGE");
  EXPECT_STREQ(gpup_status_name(12345), "UNKNOWN_STATUS");
  Error e(GPUP_STATUS_QUOTA_EXCEEDED, "need 10 MiB, 2 MiB left");
  EXPECT_EQ(e.describe(), "QUOTA_EXCEEDED: need 10 MiB, 2 MiB left");
  Result<int> r = make_error(GPUP_STATUS_NOT_FOUND, "x");
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status(), GPUP_STATUS_NOT_FOUND);
}

}  // namespace gpup
