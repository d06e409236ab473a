// The device-memory arbiter (vram_pool.h) as pure logic: partitions on a 1 GiB adapter, grants
// above the min, refusals that name the numbers, releases, worker exits and changed settings.
#include <gtest/gtest.h>

#include "host/gpupd/vram_pool.h"

namespace gpup::gpupd {
namespace {

using control::VmSpec;
constexpr uint64_t MiB = 1ull << 20, GiB = 1ull << 30;

VmSpec vm(const std::string& name, uint64_t min, uint64_t max, const std::string& adapter = "gpu0") {
  VmSpec s;
  s.name = name;
  s.adapter = adapter;
  s.min_vram = min;
  s.max_vram = max;
  s.optimal_vram = max;
  return s;
}

class Arbiter : public ::testing::Test {
 protected:
  std::vector<VmSpec> specs;
  VramArbiter arb{[this] { return specs; },
                  [](const std::string& a) { return a == "gpu0" ? GiB : a == "gpu1" ? 256 * MiB : uint64_t{0}; }};
  VmSpec& spec(const std::string& name) {
    for (auto& s : specs)
      if (s.name == name) return s;
    throw std::runtime_error("no vm " + name);
  }
  // Sum over gpu0's partitions of what each holds (its min, or more while it borrows).
  uint64_t held_on_gpu0() {
    uint64_t sum = 0;
    for (auto& s : specs)
      if (s.adapter == "gpu0") sum += arb.query(s.name).hold;
    return sum;
  }
};

TEST_F(Arbiter, MinIsHeldWithoutAsking) {
  specs = {vm("a", 256 * MiB, GiB), vm("b", 0, GiB)};
  arb.attach("a");
  auto q = arb.query("a");
  EXPECT_TRUE(q.granted);
  EXPECT_EQ(q.hold, 256 * MiB);
  EXPECT_EQ(q.min, 256 * MiB);
  EXPECT_EQ(q.borrowable, 768 * MiB);
  EXPECT_EQ(arb.query("b").borrowable, 768 * MiB);  // a's min is never lent
  EXPECT_EQ(arb.borrowed("a"), 0u);
}

TEST_F(Arbiter, BorrowerGetsAllUnreservedMemoryAndNoMore) {
  specs = {vm("a", 256 * MiB, GiB), vm("b", 0, GiB)};
  arb.attach("a");
  arb.attach("b");
  auto g = arb.request("b", 512 * MiB, 512 * MiB);
  EXPECT_TRUE(g.granted);
  EXPECT_EQ(g.hold, 512 * MiB);
  EXPECT_EQ(g.borrowable, 256 * MiB);
  // Wants more than is left: gets what is left, as it still covers what it needs.
  g = arb.request("b", 600 * MiB, GiB);
  EXPECT_TRUE(g.granted);
  EXPECT_EQ(g.hold, 768 * MiB);
  EXPECT_EQ(g.borrowable, 0u);
  // Needs more than is left: refused, its hold unchanged, and the message has the numbers.
  g = arb.request("b", 768 * MiB + 1, 784 * MiB);
  EXPECT_FALSE(g.granted);
  EXPECT_EQ(g.hold, 768 * MiB);
  EXPECT_NE(g.why.find("256 MiB their reserved mins"), std::string::npos) << g.why;
  EXPECT_NE(g.why.find("gpu0's 1 GiB"), std::string::npos) << g.why;
  // a still has its whole min, and can never be pushed below it.
  EXPECT_EQ(arb.query("a").hold, 256 * MiB);
  EXPECT_EQ(held_on_gpu0(), GiB);
  EXPECT_EQ(arb.borrowed("b"), 768 * MiB);
  EXPECT_EQ(arb.borrowed_on("gpu0"), 768 * MiB);
}

TEST_F(Arbiter, NeverMoreThanMax) {
  specs = {vm("a", 0, 300 * MiB)};
  auto g = arb.request("a", 100 * MiB, 900 * MiB);
  EXPECT_TRUE(g.granted);
  EXPECT_EQ(g.hold, 300 * MiB);
  g = arb.request("a", 301 * MiB, 301 * MiB);
  EXPECT_FALSE(g.granted);
  EXPECT_NE(g.why.find("above its max of 300 MiB"), std::string::npos) << g.why;
  EXPECT_EQ(g.hold, 300 * MiB);
}

TEST_F(Arbiter, AskingForLessReturnsMemoryToOthers) {
  specs = {vm("a", 128 * MiB, GiB), vm("b", 0, GiB)};
  ASSERT_TRUE(arb.request("b", 896 * MiB, 896 * MiB).granted);
  EXPECT_FALSE(arb.request("a", 200 * MiB, 200 * MiB).granted);
  auto r = arb.request("b", 100 * MiB, 100 * MiB);
  EXPECT_TRUE(r.granted);
  EXPECT_EQ(r.hold, 100 * MiB);
  EXPECT_TRUE(arb.request("a", 200 * MiB, 200 * MiB).granted);
  // Asking below the min keeps the min.
  EXPECT_EQ(arb.request("a", 0, 0).hold, 128 * MiB);
}

TEST_F(Arbiter, WorkerExitReturnsEverythingItBorrowed) {
  specs = {vm("a", 128 * MiB, GiB), vm("b", 0, GiB)};
  arb.attach("b");
  ASSERT_TRUE(arb.request("b", 896 * MiB, 896 * MiB).granted);
  EXPECT_EQ(arb.query("a").borrowable, 0u);
  arb.release_all("b");
  EXPECT_EQ(arb.query("b").hold, 0u);
  EXPECT_EQ(arb.query("a").borrowable, 896 * MiB);
  EXPECT_EQ(arb.borrowed_on("gpu0"), 0u);
}

TEST_F(Arbiter, AdaptersArePoolsOfTheirOwn) {
  specs = {vm("a", 0, GiB), vm("c", 0, 256 * MiB, "gpu1")};
  ASSERT_TRUE(arb.request("a", GiB, GiB).granted);
  auto g = arb.request("c", 256 * MiB, 256 * MiB);
  EXPECT_TRUE(g.granted);
  EXPECT_EQ(arb.borrowed_on("gpu1"), 256 * MiB);
  EXPECT_EQ(arb.borrowed_on("gpu0"), GiB);
}

TEST_F(Arbiter, NewMinMustFitWhatOthersHoldNow) {
  specs = {vm("b", 0, GiB)};
  arb.attach("b");
  ASSERT_TRUE(arb.request("b", 900 * MiB, 900 * MiB).granted);
  // A new partition's min, or a raised min, has to fit beside what b borrows.
  auto s = arb.check_min("new", "gpu0", 200 * MiB);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message.find("900 MiB"), std::string::npos) << s.error().message;
  EXPECT_TRUE(arb.check_min("new", "gpu0", 124 * MiB).ok());
  EXPECT_TRUE(arb.check_min("new", "gpu1", 200 * MiB).ok());
  // b itself may turn what it holds into its min.
  EXPECT_TRUE(arb.check_min("b", "gpu0", 900 * MiB).ok());
  specs.push_back(vm("new", 124 * MiB, GiB));
  EXPECT_EQ(held_on_gpu0(), GiB);
  EXPECT_FALSE(arb.request("new", 125 * MiB, 125 * MiB).granted);
  EXPECT_TRUE(arb.request("new", 124 * MiB, 124 * MiB).granted);
}

TEST_F(Arbiter, RaisedMinAbsorbsWhatWasBorrowed) {
  specs = {vm("a", 0, GiB), vm("b", 0, GiB)};
  arb.attach("a");
  ASSERT_TRUE(arb.request("a", 300 * MiB, 300 * MiB).granted);
  ASSERT_TRUE(arb.check_min("a", "gpu0", 512 * MiB).ok());
  spec("a").min_vram = 512 * MiB;  // vm set a --min-vram 512MiB
  EXPECT_EQ(arb.query("a").hold, 512 * MiB);
  EXPECT_EQ(arb.borrowed("a"), 0u);
  EXPECT_EQ(arb.query("b").borrowable, 512 * MiB);
}

TEST_F(Arbiter, LoweredMinStaysHeldUntilTheWorkerGivesItBack) {
  specs = {vm("a", 512 * MiB, GiB), vm("b", 0, GiB)};
  arb.attach("a");
  spec("a").min_vram = 64 * MiB;  // a's worker may still use up to 512 MiB
  EXPECT_EQ(arb.query("a").hold, 512 * MiB);
  EXPECT_EQ(arb.query("b").borrowable, 512 * MiB);
  // Once the worker asks for less, the rest is free.
  EXPECT_EQ(arb.request("a", 100 * MiB, 100 * MiB).hold, 100 * MiB);
  EXPECT_EQ(arb.query("b").borrowable, 924 * MiB);
  // A partition that is not running has only its min.
  spec("b").min_vram = 0;
  arb.release_all("a");
  spec("a").min_vram = 32 * MiB;
  EXPECT_EQ(arb.query("a").hold, 32 * MiB);
}

TEST_F(Arbiter, LoweredMaxCapsLaterGrants) {
  specs = {vm("a", 0, GiB)};
  ASSERT_TRUE(arb.request("a", 600 * MiB, 600 * MiB).granted);
  spec("a").max_vram = 256 * MiB;  // vm set a --max-vram 256MiB: what is held stays until given back
  EXPECT_FALSE(arb.request("a", 700 * MiB, 700 * MiB).granted);
  EXPECT_EQ(arb.request("a", 200 * MiB, 256 * MiB).hold, 256 * MiB);
  EXPECT_EQ(arb.query("a").borrowable, 0u);
}

TEST_F(Arbiter, RemovedPartitionFreesItsShare) {
  specs = {vm("a", 256 * MiB, GiB), vm("b", 0, GiB)};
  arb.attach("a");
  ASSERT_TRUE(arb.request("a", 512 * MiB, 512 * MiB).granted);
  EXPECT_EQ(arb.query("b").borrowable, 512 * MiB);
  specs.erase(specs.begin());  // vm remove a
  EXPECT_EQ(arb.query("b").borrowable, GiB);
  EXPECT_FALSE(arb.query("a").granted);
  EXPECT_FALSE(arb.request("a", 1, 1).granted);
}

}  // namespace
}  // namespace gpup::gpupd
