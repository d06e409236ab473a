// One guest process's GPU virtual address space (the GpuMMU model, in software).
//
// Guests reserve ranges, then map ranges of their own allocations into them. Every GPU VA in a
// command buffer is resolved here before the KMD sees it: a range that is not wholly inside one
// mapping of the caller's own allocation is a GPU page fault. Addresses are 48-bit, page
// aligned (4 KiB), and never 0.
//
// Not thread-safe: the worker's object lock guards it.
#pragma once
#include <cstdint>
#include <map>
#include <memory>

#include "common/result.h"

namespace gpup::vmwp {

struct Allocation;

class VaSpace {
 public:
  static constexpr uint64_t kPageSize = 4096;
  static constexpr uint64_t kBase = uint64_t{1} << 32;   // first address handed out
  static constexpr uint64_t kLimit = uint64_t{1} << 48;  // one past the last address
  static constexpr size_t kMaxMappings = 65536;

  struct Resolved {
    std::shared_ptr<Allocation> allocation;
    uint64_t offset = 0;  // into the allocation
  };

  // base == 0: anywhere. size is rounded up to pages.
  Result<uint64_t> reserve(uint64_t base, uint64_t size);
  // [va, va+size) must be exactly one reservation; its mappings go with it.
  Status free(uint64_t va, uint64_t size);
  // Maps [offset, offset+size) of alloc at va: page aligned, inside one reservation, not
  // overlapping another mapping, inside the allocation.
  Status map(uint64_t va, uint64_t size, std::shared_ptr<Allocation> alloc, uint64_t alloc_size, uint64_t offset,
             uint32_t protection);
  // GPU_PAGE_FAULT unless [va, va+size) lies inside one mapping with the needed protection.
  Result<Resolved> resolve(uint64_t va, uint64_t size, bool write) const;
  // Drops every mapping of the allocation (it is being destroyed).
  void unmap_allocation(const Allocation* alloc);

  size_t mapping_count() const { return mappings_.size(); }
  size_t reservation_count() const { return reservations_.size(); }

 private:
  struct Mapping {
    uint64_t size;
    std::shared_ptr<Allocation> allocation;
    uint64_t offset;
    uint32_t protection;
  };
  std::map<uint64_t, uint64_t> reservations_;  // start -> size
  std::map<uint64_t, Mapping> mappings_;       // start -> mapping
};

}  // namespace gpup::vmwp
