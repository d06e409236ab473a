#include <fcntl.h>
#include <sys/socket.h>

#include <cerrno>
#include <filesystem>

#include <gtest/gtest.h>

#include "common/fd.h"
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

namespace gpup {
namespace {

size_t open_fds() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

TEST(FdPassing, OneDescriptorArrivesUsable) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd r(p[0]), w(p[1]);
  const char msg[] = "hello";
  const int fd = w.get();
  ASSERT_EQ(send_with_fds(a.get(), msg, sizeof msg, std::span<const int>(&fd, 1), 0), ssize_t(sizeof msg));
  char got[16] = {};
  std::vector<UniqueFd> fds;
  ReceivedFds info;
  ASSERT_EQ(receive_with_fds(b.get(), got, sizeof got, &fds, 1, 0, &info), ssize_t(sizeof msg));
  EXPECT_STREQ(got, "hello");
  ASSERT_EQ(fds.size(), 1u);
  EXPECT_EQ(info.extra, 0u);
  EXPECT_FALSE(info.fds_truncated || info.data_truncated);
  EXPECT_EQ(::fcntl(fds[0].get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  ASSERT_EQ(::write(fds[0].get(), "x", 1), 1);  // the received end writes into our pipe
  char c = 0;
  EXPECT_EQ(::read(r.get(), &c, 1), 1);
  EXPECT_EQ(c, 'x');
}

// A peer attaching more than the receiver takes: the others are closed, none leaks.
TEST(FdPassing, DescriptorsBeyondTheLimitAreClosedNotLeaked) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  std::vector<int> many(5, a.get());
  const size_t before = open_fds();
  ASSERT_EQ(send_with_fds(a.get(), "m", 1, many, 0), 1);
  char got = 0;
  std::vector<UniqueFd> fds;
  ReceivedFds info;
  ASSERT_EQ(receive_with_fds(b.get(), &got, 1, &fds, 2, 0, &info), 1);
  EXPECT_EQ(fds.size(), 2u);
  EXPECT_EQ(info.extra, 3u);
  fds.clear();
  EXPECT_EQ(open_fds(), before) << "a received descriptor leaked";
  // And with nowhere to put them at all.
  ASSERT_EQ(send_with_fds(a.get(), "n", 1, many, 0), 1);
  ASSERT_EQ(receive_with_fds(b.get(), &got, 1, nullptr, 0, 0, &info), 1);
  EXPECT_EQ(info.extra, 5u);
  EXPECT_EQ(open_fds(), before);
}

TEST(FdPassing, TooManyToSendIsRefused) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  std::vector<int> many(kMaxFdsPerMessage + 1, a.get());
  errno = 0;
  EXPECT_EQ(send_with_fds(a.get(), "m", 1, many, 0), -1);
  EXPECT_EQ(errno, EINVAL);
}

}  // namespace
}  // namespace gpup
