// VaSpace as a GpuMMU: page-table layouts from KMD descriptions, the radix tree they give, and
// the faults a walk reports.
#include "host/vmwp/va_space.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <ostream>
#include <string>
#include <vector>

#include "gpup/kmt.h"

namespace gpup::vmwp {
namespace {

constexpr uint32_t kRW = GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE;
constexpr uint32_t kRO = GPUPKMT_PROTECTION_READ;

// VaSpace never looks inside an Allocation: a distinct address per fake is enough.
std::shared_ptr<Allocation> fake_allocation() {
  auto owner = std::make_shared<uint64_t>(0);
  return std::shared_ptr<Allocation>(owner, reinterpret_cast<Allocation*>(owner.get()));
}

struct Desc {
  std::string name;
  uint32_t va_bits;
  uint32_t page_size;
  std::vector<uint32_t> bits;  // level 0 (leaf) first
  uint32_t entry_bytes = 8;
};

void PrintTo(const Desc& d, std::ostream* os) { *os << d.name; }

GPUPDDI_GPUMMUCAPS caps_of(const Desc& d) {
  GPUPDDI_GPUMMUCAPS caps{};
  caps.ReadOnlyMemorySupported = 1;
  caps.VirtualAddressBitCount = d.va_bits;
  caps.PageTableLevelCount = static_cast<uint32_t>(d.bits.size());
  caps.PageSizeInBytes = d.page_size;
  return caps;
}

std::vector<GPUPDDI_PAGETABLELEVELDESC> levels_of(const Desc& d) {
  std::vector<GPUPDDI_PAGETABLELEVELDESC> out;
  for (uint32_t b : d.bits) {
    GPUPDDI_PAGETABLELEVELDESC l{};
    l.PageTableIndexBitCount = b;
    l.PageTableSegmentId = 1;
    l.PagingProcessPageTableSegmentId = 1;
    l.PageTableSizeInBytes = (uint64_t{1} << b) * d.entry_bytes;
    l.PageTableAlignmentInBytes = 4096;
    out.push_back(l);
  }
  return out;
}

Result<MmuLayout> layout_of(const Desc& d) { return MmuLayout::from_kmd(caps_of(d), levels_of(d)); }

// --- layouts ----------------------------------------------------------------------------------

TEST(MmuLayout, WhatGpupKmdsReportIsTheStandardLayout) {
  auto l = layout_of({"kmd", 48, 4096, {9, 9, 9, 9}});
  ASSERT_TRUE(l.ok()) << l.error().message;
  const MmuLayout s = MmuLayout::standard();
  EXPECT_EQ(l->va_bits, s.va_bits);
  EXPECT_EQ(l->page_shift, s.page_shift);
  ASSERT_EQ(l->levels.size(), s.levels.size());
  for (size_t i = 0; i < s.levels.size(); ++i) {
    EXPECT_EQ(l->levels[i].index_bits, s.levels[i].index_bits);
    EXPECT_EQ(l->levels[i].shift, s.levels[i].shift);
    EXPECT_EQ(l->levels[i].entry_bytes, s.levels[i].entry_bytes);
    EXPECT_EQ(l->levels[i].table_bytes, s.levels[i].table_bytes);
  }
  EXPECT_EQ(s.page_size(), VaSpace::kPageSize);
  EXPECT_EQ(s.limit(), VaSpace::kLimit);
}

TEST(MmuLayout, OneLevelAndLargePagesAreAccepted) {
  auto one = layout_of({"", 36, 2 << 20, {15}});
  ASSERT_TRUE(one.ok()) << one.error().message;
  EXPECT_EQ(one->levels.size(), 1u);
  EXPECT_EQ(one->levels[0].shift, 21u);
  auto big = layout_of({"", 48, 65536, {5, 9, 9, 9}, 16});
  ASSERT_TRUE(big.ok()) << big.error().message;
  EXPECT_EQ(big->page_shift, 16u);
  EXPECT_EQ(big->levels[3].shift, 16u + 5 + 9 + 9);
  EXPECT_EQ(big->levels[0].entry_bytes, 16u);
}

TEST(MmuLayout, InconsistentDescriptionsAreRefused) {
  auto refused = [](const GPUPDDI_GPUMMUCAPS& c, const std::vector<GPUPDDI_PAGETABLELEVELDESC>& l, const char* what) {
    auto r = MmuLayout::from_kmd(c, l);
    EXPECT_FALSE(r.ok()) << what;
    if (!r.ok()) {
      EXPECT_EQ(r.status(), GPUP_STATUS_INVALID_PARAMETER) << what;
      EXPECT_NE(r.error().message.find("GPU MMU"), std::string::npos) << r.error().message;
    }
  };
  const Desc good{"good", 48, 4096, {9, 9, 9, 9}};
  auto c = caps_of(good);
  auto l = levels_of(good);
  ASSERT_TRUE(MmuLayout::from_kmd(c, l).ok());

  refused(caps_of({"", 48, 4096, {9, 9, 9, 8}}), levels_of({"", 48, 4096, {9, 9, 9, 8}}), "bits short of VA bits");
  refused(caps_of({"", 48, 4096, {9, 9, 9, 10}}), levels_of({"", 48, 4096, {9, 9, 9, 10}}), "bits past VA bits");
  refused(caps_of({"", 48, 65536, {9, 9, 9, 9}}), levels_of({"", 48, 65536, {9, 9, 9, 9}}), "4 KiB levels with 64 KiB pages");
  {
    auto z = c;
    z.PageTableLevelCount = 0;
    refused(z, {}, "zero levels");
  }
  refused(c, {l.begin(), l.begin() + 3}, "fewer descriptions than levels");
  {
    const Desc nine{"", 48, 4096, {4, 4, 4, 4, 4, 4, 4, 4, 4}};
    refused(caps_of(nine), levels_of(nine), "nine levels");
  }
  refused(caps_of({"", 48, 4096, {0, 18, 9, 9}}), levels_of({"", 48, 4096, {0, 18, 9, 9}}), "a level of 0 bits");
  refused(caps_of({"", 48, 4096, {18, 18}}), levels_of({"", 48, 4096, {18, 18}}), "tables of 2^18 entries");
  {
    auto p = c;
    p.PageSizeInBytes = 12288;
    refused(p, l, "page size not a power of two");
    p.PageSizeInBytes = 2048;
    refused(p, l, "page size below 4 KiB");
    p.PageSizeInBytes = 0;
    refused(p, l, "page size 0");
  }
  {
    auto v = c;
    v.VirtualAddressBitCount = 64;
    refused(v, l, "64 VA bits");
    v.VirtualAddressBitCount = 0;
    refused(v, l, "0 VA bits");
  }
  {
    auto t = l;
    t[1].PageTableSizeInBytes = 4095;
    refused(c, t, "table size not a multiple of the entries");
    t[1].PageTableSizeInBytes = 512 * 2;
    refused(c, t, "2-byte entries");
    t[1].PageTableSizeInBytes = 512 * 128;
    refused(c, t, "128-byte entries");
    t[1].PageTableSizeInBytes = uint64_t{1} << 62;
    refused(c, t, "absurd table size");
    t[1].PageTableSizeInBytes = 0;
    refused(c, t, "table size 0");
    t = l;
    t[2].PageTableAlignmentInBytes = 3000;
    refused(c, t, "alignment not a power of two");
  }
}

// --- the tree, for several shapes ---------------------------------------------------------------

class VaSpaceLayouts : public ::testing::TestWithParam<Desc> {
 protected:
  void SetUp() override {
    auto l = layout_of(GetParam());
    ASSERT_TRUE(l.ok()) << l.error().message;
    layout_ = *l;
    page_ = layout_.page_size();
    leaf_span_ = uint64_t{1} << (layout_.levels[0].shift + layout_.levels[0].index_bits);
  }
  VaSpace make() const { return VaSpace(layout_); }

  MmuLayout layout_;
  uint64_t page_ = 0;
  uint64_t leaf_span_ = 0;  // VA one leaf table covers
};

TEST_P(VaSpaceLayouts, MapResolveUnmap) {
  VaSpace va = make();
  EXPECT_EQ(va.page_size(), page_);
  EXPECT_EQ(va.table_count(), 0u);
  auto base = va.reserve(0, 4 * page_);
  ASSERT_TRUE(base.ok()) << base.error().message;
  EXPECT_EQ(*base % page_, 0u);
  EXPECT_GE(*base, VaSpace::kBase);
  auto alloc = fake_allocation();
  ASSERT_TRUE(va.map(*base + page_, 2 * page_, alloc, 8 * page_, 3 * page_, kRW).ok());
  // One table per level now.
  EXPECT_EQ(va.table_count(), layout_.levels.size());
  for (uint32_t i = 0; i < layout_.levels.size(); ++i) EXPECT_EQ(va.table_count(i), 1u) << "level " << i;
  uint64_t bytes = 0;
  for (const auto& l : layout_.levels) bytes += l.table_bytes;
  EXPECT_EQ(va.table_bytes(), bytes);

  auto r = va.resolve(*base + page_ + 100, 50, true);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->allocation, alloc);
  EXPECT_EQ(r->offset, 3 * page_ + 100);
  // A range over both pages of the mapping: one buffer.
  r = va.resolve(*base + page_ + 8, 2 * page_ - 8, false);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->offset, 3 * page_ + 8);
  // The reserved pages either side are holes.
  EXPECT_EQ(va.resolve(*base, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(va.resolve(*base + 3 * page_, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);

  ASSERT_TRUE(va.unmap(*base + page_).ok());
  EXPECT_EQ(va.mapping_count(), 0u);
  EXPECT_EQ(va.table_count(), 0u) << "every table, the root too, is freed once empty";
  EXPECT_EQ(va.table_bytes(), 0u);
  EXPECT_EQ(va.resolve(*base + page_ + 100, 50, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_FALSE(va.unmap(*base + page_).ok());
  // Mappable again.
  ASSERT_TRUE(va.map(*base + page_, 2 * page_, alloc, 8 * page_, 0, kRW).ok());
  EXPECT_TRUE(va.resolve(*base + page_, 2 * page_, true).ok());
  ASSERT_TRUE(va.free(*base, 4 * page_).ok());
  EXPECT_EQ(va.table_count(), 0u);
  EXPECT_EQ(va.reservation_count(), 0u);
}

TEST_P(VaSpaceLayouts, RangesCrossLeafTables) {
  VaSpace va = make();
  // Four pages straddling a leaf-table boundary above kBase.
  const uint64_t boundary = ((VaSpace::kBase + leaf_span_) & ~(leaf_span_ - 1)) + leaf_span_;
  auto base = va.reserve(boundary - 2 * page_, 4 * page_);
  ASSERT_TRUE(base.ok()) << base.error().message;
  auto alloc = fake_allocation();
  ASSERT_TRUE(va.map(*base, 4 * page_, alloc, 4 * page_, 0, kRW).ok());
  EXPECT_EQ(va.table_count(0), 2u) << "two leaves";
  auto r = va.resolve(*base + 1, 4 * page_ - 1, true);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->offset, 1u);
  r = va.resolve(boundary - 4, 8, false);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->offset, 2 * page_ - 4);
  // One byte further than the mapping: the fault names the first unmapped address.
  auto f = va.resolve(*base, 4 * page_ + 1, false);
  ASSERT_EQ(f.status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_NE(f.error().message.find(fmt::format("{:#x}", *base + 4 * page_)), std::string::npos) << f.error().message;

  // Unmapping drops both leaves and the whole path.
  ASSERT_TRUE(va.free(*base, 4 * page_).ok());
  EXPECT_EQ(va.table_count(), 0u);
  EXPECT_EQ(va.resolve(boundary, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
}

TEST_P(VaSpaceLayouts, HolesAndOtherProcessesFault) {
  VaSpace a = make(), b = make();
  auto base = a.reserve(0, 6 * page_);
  ASSERT_TRUE(base.ok());
  ASSERT_TRUE(b.reserve(*base, 6 * page_).ok()) << "same VA range, other process";
  auto alloc_a = fake_allocation(), alloc_b = fake_allocation();
  ASSERT_TRUE(a.map(*base, page_, alloc_a, page_, 0, kRW).ok());
  ASSERT_TRUE(a.map(*base + 2 * page_, page_, alloc_a, page_, 0, kRW).ok());
  // A range over the hole between two mappings faults at the hole.
  auto f = a.resolve(*base + page_ - 4, page_ + 8, false);
  ASSERT_EQ(f.status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_NE(f.error().message.find(fmt::format("{:#x}", *base + page_)), std::string::npos) << f.error().message;
  // The other process has nothing at those addresses, even once it maps elsewhere.
  EXPECT_EQ(b.resolve(*base, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  ASSERT_TRUE(b.map(*base + 4 * page_, page_, alloc_b, page_, 0, kRW).ok());
  EXPECT_EQ(b.resolve(*base, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(b.resolve(*base + 2 * page_, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(a.resolve(*base + 4 * page_, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  auto rb = b.resolve(*base + 4 * page_, 4, true);
  ASSERT_TRUE(rb.ok());
  EXPECT_EQ(rb->allocation, alloc_b);
  // Unreserved, below kBase, 0, beyond the VA width, wrapping.
  EXPECT_EQ(a.resolve(0, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(a.resolve(VaSpace::kBase - 8, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(a.resolve(a.limit() - 4, 8, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(a.resolve(a.limit() + page_, 8, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(a.resolve(UINT64_MAX - 4, 16, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(a.resolve(*base, 0, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
}

TEST_P(VaSpaceLayouts, ProtectionFaults) {
  VaSpace va = make();
  auto base = va.reserve(0, 3 * page_);
  ASSERT_TRUE(base.ok());
  auto alloc = fake_allocation();
  ASSERT_TRUE(va.map(*base, page_, alloc, 3 * page_, 0, kRW).ok());
  ASSERT_TRUE(va.map(*base + page_, 2 * page_, alloc, 3 * page_, page_, kRO).ok());
  EXPECT_TRUE(va.resolve(*base + page_, 2 * page_, false).ok());
  auto f = va.resolve(*base + page_ + 16, 8, true);
  ASSERT_EQ(f.status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_NE(f.error().message.find("read-only"), std::string::npos) << f.error().message;
  // A write starting in the writable page runs into the read-only one: a fault at its start.
  f = va.resolve(*base + page_ - 8, 16, true);
  ASSERT_EQ(f.status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_NE(f.error().message.find(fmt::format("{:#x}", *base + page_)), std::string::npos) << f.error().message;
  // Reads across both: consecutive pages of the same allocation.
  auto r = va.resolve(*base + page_ - 8, 16, false);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->offset, page_ - 8);
  // Bad protections are refused at map time.
  auto base2 = va.reserve(0, page_);
  ASSERT_TRUE(base2.ok());
  EXPECT_FALSE(va.map(*base2, page_, alloc, page_, 0, 0).ok());
  EXPECT_FALSE(va.map(*base2, page_, alloc, page_, 0, 4).ok());
}

TEST_P(VaSpaceLayouts, RangesStayInOneAllocationAndInsideTheMappedBytes) {
  VaSpace va = make();
  auto base = va.reserve(0, 6 * page_);
  ASSERT_TRUE(base.ok());
  auto x = fake_allocation(), y = fake_allocation();
  // x pages 0,1 then y page 1: adjacent in VA, not one buffer.
  ASSERT_TRUE(va.map(*base, 2 * page_, x, 4 * page_, 0, kRW).ok());
  ASSERT_TRUE(va.map(*base + 2 * page_, page_, y, 4 * page_, page_, kRW).ok());
  EXPECT_EQ(va.resolve(*base + 2 * page_ - 4, 8, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  // x page 3 after x pages 0,1: same allocation, not consecutive.
  ASSERT_TRUE(va.unmap(*base + 2 * page_).ok());
  ASSERT_TRUE(va.map(*base + 2 * page_, page_, x, 4 * page_, 3 * page_, kRW).ok());
  EXPECT_EQ(va.resolve(*base + 2 * page_ - 4, 8, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  // x page 2: consecutive, so the range is one buffer of x.
  ASSERT_TRUE(va.unmap(*base + 2 * page_).ok());
  ASSERT_TRUE(va.map(*base + 2 * page_, page_, x, 4 * page_, 2 * page_, kRW).ok());
  auto r = va.resolve(*base + 2 * page_ - 4, 8, false);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->offset, 2 * page_ - 4);

  // A mapping that ends inside a page: bytes past its end fault though the page has a PTE.
  auto small = fake_allocation();
  ASSERT_TRUE(va.map(*base + 4 * page_, page_ + 100, small, page_ + 100, 0, kRW).ok());
  EXPECT_TRUE(va.resolve(*base + 4 * page_, page_ + 100, true).ok());
  EXPECT_TRUE(va.resolve(*base + 5 * page_ + 99, 1, true).ok());
  EXPECT_EQ(va.resolve(*base + 5 * page_ + 96, 8, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(va.resolve(*base + 5 * page_ + 100, 1, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  // Its partial page is its own: the next mapping starts on the next page.
  EXPECT_EQ(va.map(*base + 5 * page_, page_, x, 4 * page_, 0, kRW).status(), GPUP_STATUS_ALREADY_EXISTS);
}

TEST_P(VaSpaceLayouts, MapChecksAndAllocationTeardown) {
  VaSpace va = make();
  auto base = va.reserve(0, 4 * page_);
  ASSERT_TRUE(base.ok());
  auto x = fake_allocation(), y = fake_allocation();
  EXPECT_FALSE(va.map(*base + page_ / 2, page_, x, page_, 0, kRW).ok()) << "unaligned VA";
  EXPECT_FALSE(va.map(*base, page_, x, 2 * page_, page_ / 2, kRW).ok()) << "unaligned offset";
  EXPECT_EQ(va.map(*base, 2 * page_, x, page_, 0, kRW).status(), GPUP_STATUS_OUT_OF_RANGE);
  EXPECT_FALSE(va.map(*base + 3 * page_, 2 * page_, x, 2 * page_, 0, kRW).ok()) << "leaves the reservation";
  EXPECT_FALSE(va.map(*base + 4 * page_, page_, x, page_, 0, kRW).ok()) << "unreserved";
  EXPECT_EQ(va.table_count(), 0u) << "refused maps leave no tables";
  ASSERT_TRUE(va.map(*base, page_, x, page_, 0, kRW).ok());
  ASSERT_TRUE(va.map(*base + page_, page_, y, page_, 0, kRW).ok());
  ASSERT_TRUE(va.map(*base + 2 * page_, 2 * page_, x, 2 * page_, 0, kRO).ok());
  EXPECT_EQ(va.map(*base + page_, page_, x, page_, 0, kRW).status(), GPUP_STATUS_ALREADY_EXISTS);
  va.unmap_allocation(x.get());
  EXPECT_EQ(va.mapping_count(), 1u);
  EXPECT_EQ(va.resolve(*base, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_EQ(va.resolve(*base + 2 * page_, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_TRUE(va.resolve(*base + page_, 4, true).ok());
  EXPECT_EQ(va.table_count(), layout_.levels.size());
  va.unmap_allocation(y.get());
  EXPECT_EQ(va.table_count(), 0u);
}

TEST_P(VaSpaceLayouts, TablesAreFreedPerSubtree) {
  VaSpace va = make();
  // Three one-page mappings, each in its own leaf table.
  const uint64_t start = ((VaSpace::kBase + leaf_span_) & ~(leaf_span_ - 1)) + leaf_span_;
  auto base = va.reserve(start, 3 * leaf_span_);
  ASSERT_TRUE(base.ok()) << base.error().message;
  auto alloc = fake_allocation();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(va.map(*base + i * leaf_span_, page_, alloc, page_, 0, kRW).ok());
  EXPECT_EQ(va.table_count(0), 3u);
  const size_t with_three = va.table_count();
  // The leaf cache follows each resolve to its own leaf.
  for (int round = 0; round < 2; ++round)
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(va.resolve(*base + i * leaf_span_ + 8, 8, false).ok());
  ASSERT_TRUE(va.unmap(*base + leaf_span_).ok());
  EXPECT_EQ(va.table_count(0), 2u);
  EXPECT_LT(va.table_count(), with_three);
  EXPECT_EQ(va.resolve(*base + leaf_span_ + 8, 8, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  EXPECT_TRUE(va.resolve(*base + 2 * leaf_span_ + 8, 8, false).ok());
  ASSERT_TRUE(va.free(*base, 3 * leaf_span_).ok());
  EXPECT_EQ(va.table_count(), 0u);
}

TEST_P(VaSpaceLayouts, MovingKeepsTablesAndForgetsNothing) {
  VaSpace va = make();
  auto base = va.reserve(0, page_);
  ASSERT_TRUE(base.ok());
  auto alloc = fake_allocation();
  ASSERT_TRUE(va.map(*base, page_, alloc, page_, 0, kRW).ok());
  ASSERT_TRUE(va.resolve(*base, 4, false).ok());  // caches the leaf
  VaSpace moved(std::move(va));
  EXPECT_TRUE(moved.resolve(*base, 4, false).ok());
  va = make();
  EXPECT_EQ(va.resolve(*base, 4, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  va = std::move(moved);
  EXPECT_TRUE(va.resolve(*base, 4, true).ok());
}

INSTANTIATE_TEST_SUITE_P(Shapes, VaSpaceLayouts,
                         ::testing::Values(Desc{"TwoLevels4K", 40, 4096, {14, 14}},
                                           Desc{"FourLevels4K", 48, 4096, {9, 9, 9, 9}},
                                           Desc{"TwoLevels64K", 48, 65536, {16, 16}},
                                           Desc{"FourLevels64K", 48, 65536, {5, 9, 9, 9}, 16}),
                         [](const auto& info) { return info.param.name; });

// --- limits -----------------------------------------------------------------------------------

TEST(VaSpace, PageTableMemoryIsBoundedAndRolledBack) {
  auto l = layout_of({"", 40, 4096, {14, 14}});  // leaves of 16 Ki entries (128 KiB each)
  ASSERT_TRUE(l.ok());
  VaSpace va(*l);
  const uint64_t leaf_span = uint64_t{1} << 26;
  const uint64_t leaf_host = (uint64_t{1} << 14) * 8;
  const size_t fits = (VaSpace::kMaxTableHostBytes - leaf_host) / leaf_host;  // beside the root
  auto base = va.reserve(VaSpace::kBase, (fits + 8) * leaf_span);
  ASSERT_TRUE(base.ok()) << base.error().message;
  auto alloc = fake_allocation();
  size_t i = 0;
  for (; i < fits; ++i) ASSERT_TRUE(va.map(*base + i * leaf_span, 4096, alloc, 4096, 0, kRW).ok()) << i;
  // One more leaf does not fit; a mapping over several leaves fails whole.
  EXPECT_EQ(va.map(*base + i * leaf_span, 4096, alloc, 4096, 0, kRW).status(), GPUP_STATUS_QUOTA_EXCEEDED);
  EXPECT_EQ(va.table_count(0), fits);
  ASSERT_TRUE(va.unmap(*base).ok());
  EXPECT_EQ(va.map(*base + i * leaf_span - 4096, 2 * 4096 + leaf_span, alloc, 4 * leaf_span, 0, kRW).status(),
            GPUP_STATUS_QUOTA_EXCEEDED);
  EXPECT_EQ(va.table_count(0), fits - 1);
  EXPECT_EQ(va.mapping_count(), fits - 1);
  EXPECT_TRUE(va.resolve(*base + (i - 1) * leaf_span, 8, false).ok());
  EXPECT_EQ(va.resolve(*base + i * leaf_span, 8, false).status(), GPUP_STATUS_GPU_PAGE_FAULT);
  ASSERT_TRUE(va.free(*base, (fits + 8) * leaf_span).ok());
  EXPECT_EQ(va.table_count(), 0u);
}

TEST(VaSpace, LargeRangeResolvesPerLeaf) {
  VaSpace va;
  const uint64_t size = uint64_t{1} << 30;  // 256 Ki pages over 512 leaves
  auto base = va.reserve(0, size);
  ASSERT_TRUE(base.ok());
  auto alloc = fake_allocation();
  ASSERT_TRUE(va.map(*base, size, alloc, size, 0, kRW).ok());
  EXPECT_EQ(va.table_count(0), size / (uint64_t{2} << 20));
  for (int i = 0; i < 8; ++i) {
    auto r = va.resolve(*base + 5, size - 5, true);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->offset, 5u);
  }
  ASSERT_TRUE(va.free(*base, size).ok());
  EXPECT_EQ(va.table_count(), 0u);
}

}  // namespace
}  // namespace gpup::vmwp
