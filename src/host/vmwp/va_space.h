// One guest process's GPU virtual address space (the GpuMMU model, in software).
//
// Guests reserve ranges, then map ranges of their own allocations into them. Every GPU VA in a
// command buffer is resolved here before the KMD sees it.
//
// The address space has the shape the KMD describes (GPUMMUCAPS: VA width, page size;
// PAGETABLELEVELDESC per level: index bits, table size): a radix tree of page tables, one per
// process. As in WDDM, level 0 is the leaf level (its entries are PTEs) and translation starts at
// the root, level PageTableLevelCount - 1. A PTE names an allocation (through the mapping that
// made it), the allocation page it maps and the protection. Mapping creates tables down to the
// leaves; unmapping clears PTEs and frees every table left empty (the root included).
//
// resolve() walks the tree: a missing table or PTE, a protection mismatch, or a range that runs
// into an unmapped page or into another allocation is a GPU page fault naming the faulting
// address. Addresses are page aligned, at or above 4 GiB (kBase) and never 0.
//
// Not thread-safe: the worker's object lock guards it.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "common/result.h"
#include "gpup/ddi.h"

namespace gpup::vmwp {

struct Allocation;

// The page-table layout of one adapter, checked once when the worker starts.
struct MmuLayout {
  static constexpr uint32_t kMaxLevels = 8;
  static constexpr uint32_t kMaxIndexBits = 16;  // at most 64 Ki entries in one table
  static constexpr uint32_t kMinVaBits = 33;     // room above kBase
  static constexpr uint32_t kMaxVaBits = 57;
  static constexpr uint64_t kMinPageSize = 4096;
  static constexpr uint64_t kMaxPageSize = uint64_t{2} << 20;

  struct Level {
    uint32_t index_bits = 0;
    uint32_t shift = 0;        // VA bit where this level's index starts
    uint32_t entry_bytes = 0;  // table_bytes / 2^index_bits, as the device stores them
    uint64_t table_bytes = 0;  // PageTableSizeInBytes
  };

  uint32_t va_bits = 0;
  uint32_t page_shift = 0;
  std::vector<Level> levels;  // levels[0] is the leaf level, levels.back() the root

  uint64_t page_size() const { return uint64_t{1} << page_shift; }
  uint64_t limit() const { return uint64_t{1} << va_bits; }

  // 48-bit VA, 4 KiB pages, four levels of 512 eight-byte entries (what gpup's KMDs report).
  static MmuLayout standard();
  // Checks a KMD's description: page size a power of two in [4 KiB, 2 MiB]; VA bits in
  // [33, 57]; 1..8 levels of 1..16 index bits summing to VA bits minus the page shift; each
  // table's size 2^bits entries of 4, 8, 16, 32 or 64 bytes; alignment 0 or a power of two.
  // INVALID_PARAMETER saying what is wrong otherwise.
  static Result<MmuLayout> from_kmd(const GPUPDDI_GPUMMUCAPS& caps, std::span<const GPUPDDI_PAGETABLELEVELDESC> levels);
};

class VaSpace {
 public:
  // The standard layout's values (MmuLayout::standard()); a VaSpace built from another layout
  // answers page_size() / limit() instead.
  static constexpr uint64_t kPageSize = 4096;
  static constexpr uint64_t kBase = uint64_t{1} << 32;   // first address handed out
  static constexpr uint64_t kLimit = uint64_t{1} << 48;  // one past the last address
  static constexpr size_t kMaxMappings = 65536;
  // Host memory the tables of one process may take (8 bytes an entry); past it map() fails with
  // QUOTA_EXCEEDED.
  static constexpr uint64_t kMaxTableHostBytes = uint64_t{64} << 20;

  struct Resolved {
    std::shared_ptr<Allocation> allocation;
    uint64_t offset = 0;  // into the allocation
  };

  VaSpace();
  explicit VaSpace(MmuLayout layout);
  ~VaSpace();
  VaSpace(VaSpace&&) noexcept;
  VaSpace& operator=(VaSpace&&) noexcept;

  // base == 0: anywhere. size is rounded up to pages.
  Result<uint64_t> reserve(uint64_t base, uint64_t size);
  // [va, va+size) must be exactly one reservation; its mappings go with it.
  Status free(uint64_t va, uint64_t size);
  // Maps [offset, offset+size) of alloc at va: page aligned, inside one reservation, not
  // overlapping another mapping, inside the allocation.
  Status map(uint64_t va, uint64_t size, std::shared_ptr<Allocation> alloc, uint64_t alloc_size, uint64_t offset,
             uint32_t protection);
  // Drops the mapping that starts at va.
  Status unmap(uint64_t va);
  // GPU_PAGE_FAULT unless every page of [va, va+size) has a PTE with the needed protection, all
  // of them mapping consecutive pages of one allocation, and the range stays inside the mapped
  // bytes. Walks the tree once per leaf table the range touches.
  Result<Resolved> resolve(uint64_t va, uint64_t size, bool write) const;
  // Drops every mapping of the allocation (it is being destroyed).
  void unmap_allocation(const Allocation* alloc);

  size_t mapping_count() const { return mappings_.size(); }
  size_t reservation_count() const { return reservations_.size(); }
  const MmuLayout& layout() const { return layout_; }
  uint64_t page_size() const { return layout_.page_size(); }
  uint64_t limit() const { return layout_.limit(); }
  // Page tables that exist now, in all levels or in one (0 = leaf).
  size_t table_count() const;
  size_t table_count(uint32_t level) const { return level < table_counts_.size() ? table_counts_[level] : 0; }
  // Their size as the device would store them (sum of PageTableSizeInBytes).
  uint64_t table_bytes() const;

 private:
  struct Table;
  // A PTE as gpup keeps it: protection 0 = not present.
  struct Pte {
    uint32_t protection : 2;
    uint32_t tail : 1;  // the mapping ends inside this page: check its length
    uint32_t slot : 29;  // the mapping (slots_) that names the allocation
    uint32_t page;       // allocation page mapped here
  };
  static_assert(sizeof(Pte) == 8);
  struct Mapping {
    uint64_t va = 0;
    uint64_t size = 0;
    std::shared_ptr<Allocation> allocation;
    uint64_t offset = 0;
    uint32_t protection = 0;
  };

  std::unique_ptr<Table> new_table(uint32_t level);
  void drop_table(uint32_t level);
  Status fill(Table& t, uint32_t level, uint64_t va, uint64_t end, uint32_t slot, uint64_t first_page, uint64_t map_va,
              uint64_t map_end, uint32_t protection);
  void clear(Table& t, uint32_t level, uint64_t va, uint64_t end);
  void clear_range(uint64_t va, uint64_t end);
  const Table* find_leaf(uint64_t va) const;
  void drop_mapping(std::map<uint64_t, uint32_t>::iterator it);

  MmuLayout layout_;
  uint64_t base_ = kBase;
  std::map<uint64_t, uint64_t> reservations_;  // start -> size
  std::map<uint64_t, uint32_t> mappings_;      // start -> slot
  std::vector<Mapping> slots_;                 // slot 0 is never used
  std::vector<uint32_t> free_slots_;
  std::unique_ptr<Table> root_;
  std::vector<size_t> table_counts_;  // per level
  uint64_t table_host_bytes_ = 0;
  // The leaf table of the last resolve (leaves are only freed by clear(), which forgets it).
  mutable const Table* cached_leaf_ = nullptr;
  mutable uint64_t cached_leaf_va_ = 0;
};

}  // namespace gpup::vmwp
