#include "host/vmwp/va_space.h"

#include <fmt/format.h>

#include "gpup/kmt.h"

namespace gpup::vmwp {
namespace {

bool add_overflows(uint64_t a, uint64_t b) { return a + b < a; }
uint64_t round_up(uint64_t v) { return (v + VaSpace::kPageSize - 1) & ~(VaSpace::kPageSize - 1); }

}  // namespace

Result<uint64_t> VaSpace::reserve(uint64_t base, uint64_t size) {
  if (size == 0 || size > kLimit - kBase)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPU VA reservation of {:#x} bytes", size));
  size = round_up(size);
  if (base != 0) {
    if (base % kPageSize || base < kBase || add_overflows(base, size) || base + size > kLimit)
      return Error(GPUP_STATUS_INVALID_PARAMETER,
                   fmt::format("GPU VA range [{:#x}, +{:#x}) is not page aligned inside [{:#x}, {:#x})", base, size, kBase, kLimit));
    auto next = reservations_.lower_bound(base);
    if (next != reservations_.end() && next->first < base + size)
      return Error(GPUP_STATUS_ALREADY_EXISTS, fmt::format("GPU VA {:#x} overlaps reservation at {:#x}", base, next->first));
    if (next != reservations_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second > base)
        return Error(GPUP_STATUS_ALREADY_EXISTS, fmt::format("GPU VA {:#x} overlaps reservation at {:#x}", base, prev->first));
    }
    reservations_.emplace(base, size);
    return base;
  }
  // First fit above kBase, leaving a guard page between reservations.
  uint64_t cursor = kBase;
  for (const auto& [start, len] : reservations_) {
    if (start >= cursor && start - cursor >= size) break;
    cursor = std::max(cursor, start + len + kPageSize);
  }
  if (cursor > kLimit || kLimit - cursor < size)
    return Error(GPUP_STATUS_NO_MEMORY, fmt::format("no free GPU VA range of {:#x} bytes", size));
  reservations_.emplace(cursor, size);
  return cursor;
}

Status VaSpace::free(uint64_t va, uint64_t size) {
  auto it = reservations_.find(va);
  if (it == reservations_.end() || it->second != round_up(size))
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("[{:#x}, +{:#x}) is not a GPU VA reservation of this process", va, size));
  const uint64_t end = va + it->second;
  for (auto m = mappings_.lower_bound(va); m != mappings_.end() && m->first < end;) m = mappings_.erase(m);
  reservations_.erase(it);
  return {};
}

Status VaSpace::map(uint64_t va, uint64_t size, std::shared_ptr<Allocation> alloc, uint64_t alloc_size, uint64_t offset,
                    uint32_t protection) {
  if (size == 0 || va % kPageSize || offset % kPageSize || add_overflows(va, size))
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPU VA mapping [{:#x}, +{:#x}) at offset {:#x}: must be non-empty and page aligned", va, size, offset));
  if (protection == 0 || (protection & ~(GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE)))
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("protection {:#x}", protection));
  if (add_overflows(offset, size) || offset + size > alloc_size)
    return Error(GPUP_STATUS_OUT_OF_RANGE, fmt::format("mapping [{:#x}, +{:#x}) of an allocation of {:#x} bytes", offset, size, alloc_size));
  if (mappings_.size() >= kMaxMappings) return Error(GPUP_STATUS_QUOTA_EXCEEDED, "too many GPU VA mappings");
  auto r = reservations_.upper_bound(va);
  if (r == reservations_.begin()) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPU VA {:#x} is not reserved", va));
  --r;
  if (va + size > r->first + r->second)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPU VA mapping [{:#x}, +{:#x}) leaves its reservation", va, size));
  auto next = mappings_.lower_bound(va);
  if (next != mappings_.end() && next->first < va + size)
    return Error(GPUP_STATUS_ALREADY_EXISTS, fmt::format("GPU VA {:#x} overlaps the mapping at {:#x}", va, next->first));
  if (next != mappings_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.size > va)
      return Error(GPUP_STATUS_ALREADY_EXISTS, fmt::format("GPU VA {:#x} overlaps the mapping at {:#x}", va, prev->first));
  }
  mappings_.emplace(va, Mapping{size, std::move(alloc), offset, protection});
  return {};
}

Result<VaSpace::Resolved> VaSpace::resolve(uint64_t va, uint64_t size, bool write) const {
  if (size == 0 || add_overflows(va, size))
    return Error(GPUP_STATUS_GPU_PAGE_FAULT, fmt::format("GPU VA range [{:#x}, +{:#x}) is invalid", va, size));
  auto m = mappings_.upper_bound(va);
  if (m == mappings_.begin())
    return Error(GPUP_STATUS_GPU_PAGE_FAULT, fmt::format("GPU VA {:#x} is not mapped in this process", va));
  --m;
  const uint64_t start = m->first;
  const Mapping& map = m->second;
  if (va + size > start + map.size)
    return Error(GPUP_STATUS_GPU_PAGE_FAULT,
                 fmt::format("GPU VA range [{:#x}, +{:#x}) is outside this process's mappings", va, size));
  if (write && !(map.protection & GPUPKMT_PROTECTION_WRITE))
    return Error(GPUP_STATUS_GPU_PAGE_FAULT, fmt::format("GPU VA {:#x} is mapped read-only", va));
  return Resolved{map.allocation, map.offset + (va - start)};
}

void VaSpace::unmap_allocation(const Allocation* alloc) {
  for (auto m = mappings_.begin(); m != mappings_.end();)
    m = m->second.allocation.get() == alloc ? mappings_.erase(m) : std::next(m);
}

}  // namespace gpup::vmwp
