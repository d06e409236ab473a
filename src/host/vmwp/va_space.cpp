#include "host/vmwp/va_space.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <string>
#include <utility>

#include "gpup/kmt.h"

namespace gpup::vmwp {
namespace {

bool add_overflows(uint64_t a, uint64_t b) { return a + b < a; }

Error page_fault(uint64_t va, std::string_view why) {
  return Error(GPUP_STATUS_GPU_PAGE_FAULT, fmt::format("GPU page fault at VA {:#x}: {}", va, why));
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Layout

MmuLayout MmuLayout::standard() {
  MmuLayout l;
  l.va_bits = 48;
  l.page_shift = 12;
  uint32_t shift = l.page_shift;
  for (int i = 0; i < 4; ++i) {
    l.levels.push_back(Level{9, shift, 8, 4096});
    shift += 9;
  }
  return l;
}

Result<MmuLayout> MmuLayout::from_kmd(const GPUPDDI_GPUMMUCAPS& caps, std::span<const GPUPDDI_PAGETABLELEVELDESC> levels) {
  auto bad = [](std::string why) { return Error(GPUP_STATUS_INVALID_PARAMETER, "inconsistent GPU MMU description: " + why); };
  const uint64_t page = caps.PageSizeInBytes;
  if (!std::has_single_bit(page) || page < kMinPageSize || page > kMaxPageSize)
    return bad(fmt::format("page size {:#x} is not a power of two in [{:#x}, {:#x}]", page, kMinPageSize, kMaxPageSize));
  if (caps.VirtualAddressBitCount < kMinVaBits || caps.VirtualAddressBitCount > kMaxVaBits)
    return bad(fmt::format("{} VA bits (expected {}..{})", caps.VirtualAddressBitCount, kMinVaBits, kMaxVaBits));
  if (caps.PageTableLevelCount == 0 || caps.PageTableLevelCount > kMaxLevels)
    return bad(fmt::format("{} page-table levels (expected 1..{})", caps.PageTableLevelCount, kMaxLevels));
  if (levels.size() != caps.PageTableLevelCount)
    return bad(fmt::format("{} level descriptions for {} levels", levels.size(), caps.PageTableLevelCount));
  MmuLayout l;
  l.va_bits = caps.VirtualAddressBitCount;
  l.page_shift = static_cast<uint32_t>(std::countr_zero(page));
  uint32_t shift = l.page_shift;
  for (size_t i = 0; i < levels.size(); ++i) {
    const GPUPDDI_PAGETABLELEVELDESC& d = levels[i];
    const uint32_t bits = d.PageTableIndexBitCount;
    if (bits == 0 || bits > kMaxIndexBits) return bad(fmt::format("level {} has {} index bits (expected 1..{})", i, bits, kMaxIndexBits));
    const uint64_t entries = uint64_t{1} << bits;
    const uint64_t entry = d.PageTableSizeInBytes / entries;
    if (d.PageTableSizeInBytes % entries || !std::has_single_bit(entry) || entry < 4 || entry > 64)
      return bad(fmt::format("level {}: a table of {} bytes for {} entries (4 to 64 bytes an entry expected)", i,
                             d.PageTableSizeInBytes, entries));
    if (d.PageTableAlignmentInBytes != 0 && !std::has_single_bit(d.PageTableAlignmentInBytes))
      return bad(fmt::format("level {}: table alignment {:#x} is not a power of two", i, d.PageTableAlignmentInBytes));
    l.levels.push_back(Level{bits, shift, static_cast<uint32_t>(entry), d.PageTableSizeInBytes});
    shift += bits;
    if (shift > l.va_bits) break;  // reported below
  }
  if (shift != l.va_bits) {
    std::string bits;
    for (const auto& d : levels) bits += (bits.empty() ? "" : "+") + std::to_string(d.PageTableIndexBitCount);
    return bad(fmt::format("the levels' index bits ({}) and the page shift ({}) do not add up to the {} VA bits", bits,
                           l.page_shift, l.va_bits));
  }
  return l;
}

// ----------------------------------------------------------------------------------------------
// Tables

struct VaSpace::Table {
  uint32_t live = 0;                         // present entries
  std::vector<std::unique_ptr<Table>> next;  // levels above the leaf
  std::vector<Pte> ptes;                     // the leaf level
};

VaSpace::VaSpace() : VaSpace(MmuLayout::standard()) {}
VaSpace::VaSpace(MmuLayout layout) : layout_(std::move(layout)), slots_(1), table_counts_(layout_.levels.size(), 0) {}
VaSpace::~VaSpace() = default;
// The cached leaf belongs to the tables, which move along; the source forgets it (a moved-from
// VaSpace may only be assigned to or destroyed).
VaSpace::VaSpace(VaSpace&& o) noexcept
    : layout_(std::move(o.layout_)),
      base_(o.base_),
      reservations_(std::move(o.reservations_)),
      mappings_(std::move(o.mappings_)),
      slots_(std::move(o.slots_)),
      free_slots_(std::move(o.free_slots_)),
      root_(std::move(o.root_)),
      table_counts_(std::move(o.table_counts_)),
      table_host_bytes_(std::exchange(o.table_host_bytes_, 0)),
      cached_leaf_(std::exchange(o.cached_leaf_, nullptr)),
      cached_leaf_va_(o.cached_leaf_va_) {}

VaSpace& VaSpace::operator=(VaSpace&& o) noexcept {
  if (this == &o) return *this;
  layout_ = std::move(o.layout_);
  base_ = o.base_;
  reservations_ = std::move(o.reservations_);
  mappings_ = std::move(o.mappings_);
  root_ = std::move(o.root_);
  slots_ = std::move(o.slots_);
  free_slots_ = std::move(o.free_slots_);
  table_counts_ = std::move(o.table_counts_);
  table_host_bytes_ = std::exchange(o.table_host_bytes_, 0);
  cached_leaf_ = std::exchange(o.cached_leaf_, nullptr);
  cached_leaf_va_ = o.cached_leaf_va_;
  return *this;
}

std::unique_ptr<VaSpace::Table> VaSpace::new_table(uint32_t level) {
  const size_t entries = size_t{1} << layout_.levels[level].index_bits;
  const uint64_t host = entries * 8;
  if (table_host_bytes_ + host > kMaxTableHostBytes) return nullptr;
  auto t = std::make_unique<Table>();
  if (level == 0)
    t->ptes.assign(entries, Pte{});
  else
    t->next.resize(entries);
  table_host_bytes_ += host;
  ++table_counts_[level];
  return t;
}

void VaSpace::drop_table(uint32_t level) {
  table_host_bytes_ -= (uint64_t{1} << layout_.levels[level].index_bits) * 8;
  --table_counts_[level];
}

size_t VaSpace::table_count() const {
  size_t n = 0;
  for (size_t c : table_counts_) n += c;
  return n;
}

uint64_t VaSpace::table_bytes() const {
  uint64_t n = 0;
  for (size_t i = 0; i < table_counts_.size(); ++i) n += table_counts_[i] * layout_.levels[i].table_bytes;
  return n;
}

// Writes PTEs for [va, end) under t (a table of `level` covering va). map_va / map_end bound the
// whole mapping, first_page is the allocation page mapped at map_va.
Status VaSpace::fill(Table& t, uint32_t level, uint64_t va, uint64_t end, uint32_t slot, uint64_t first_page,
                     uint64_t map_va, uint64_t map_end, uint32_t protection) {
  const MmuLayout::Level& lv = layout_.levels[level];
  const uint64_t span = uint64_t{1} << lv.shift;
  const uint64_t mask = (uint64_t{1} << lv.index_bits) - 1;
  while (va < end) {
    const size_t i = (va >> lv.shift) & mask;
    const uint64_t entry_end = std::min(end, (va & ~(span - 1)) + span);
    if (level == 0) {
      Pte& p = t.ptes[i];
      p.protection = protection;
      p.slot = slot;
      p.page = static_cast<uint32_t>(first_page + ((va - map_va) >> layout_.page_shift));
      p.tail = map_end < va + span;
      ++t.live;
    } else {
      auto& child = t.next[i];
      if (!child) {
        child = new_table(level - 1);
        if (!child)
          return Error(GPUP_STATUS_QUOTA_EXCEEDED,
                       fmt::format("GPU page tables of this process would exceed {} MiB", kMaxTableHostBytes >> 20));
        ++t.live;
      }
      if (auto s = fill(*child, level - 1, va, entry_end, slot, first_page, map_va, map_end, protection); !s) return s;
    }
    va = entry_end;
  }
  return {};
}

// Clears the PTEs of [va, end) under t and frees every table below t left empty.
void VaSpace::clear(Table& t, uint32_t level, uint64_t va, uint64_t end) {
  const MmuLayout::Level& lv = layout_.levels[level];
  const uint64_t span = uint64_t{1} << lv.shift;
  const uint64_t mask = (uint64_t{1} << lv.index_bits) - 1;
  while (va < end) {
    const size_t i = (va >> lv.shift) & mask;
    const uint64_t entry_end = std::min(end, (va & ~(span - 1)) + span);
    if (level == 0) {
      if (t.ptes[i].protection) {
        t.ptes[i] = Pte{};
        --t.live;
      }
    } else if (auto& child = t.next[i]) {
      clear(*child, level - 1, va, entry_end);
      if (child->live == 0) {
        child.reset();
        drop_table(level - 1);
        --t.live;
      }
    }
    va = entry_end;
  }
}

void VaSpace::clear_range(uint64_t va, uint64_t end) {
  cached_leaf_ = nullptr;
  if (!root_) return;
  const uint32_t top = static_cast<uint32_t>(layout_.levels.size() - 1);
  clear(*root_, top, va, end);
  if (root_->live == 0) {
    root_.reset();
    drop_table(top);
  }
}

const VaSpace::Table* VaSpace::find_leaf(uint64_t va) const {
  const Table* t = root_.get();
  for (size_t level = layout_.levels.size() - 1; t && level > 0; --level) {
    const MmuLayout::Level& lv = layout_.levels[level];
    t = t->next[(va >> lv.shift) & ((uint64_t{1} << lv.index_bits) - 1)].get();
  }
  return t;
}

// ----------------------------------------------------------------------------------------------
// Reservations and mappings

Result<uint64_t> VaSpace::reserve(uint64_t base, uint64_t size) {
  const uint64_t page = page_size(), limit = this->limit();
  if (size == 0 || size > limit - base_)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPU VA reservation of {:#x} bytes", size));
  size = (size + page - 1) & ~(page - 1);
  if (base != 0) {
    if (base % page || base < base_ || add_overflows(base, size) || base + size > limit)
      return Error(GPUP_STATUS_INVALID_PARAMETER,
                   fmt::format("GPU VA range [{:#x}, +{:#x}) is not page aligned inside [{:#x}, {:#x})", base, size, base_, limit));
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
  // First fit above base_, leaving a guard page between reservations.
  uint64_t cursor = base_;
  for (const auto& [start, len] : reservations_) {
    if (start >= cursor && start - cursor >= size) break;
    cursor = std::max(cursor, start + len + page);
  }
  if (cursor > limit || limit - cursor < size)
    return Error(GPUP_STATUS_NO_MEMORY, fmt::format("no free GPU VA range of {:#x} bytes", size));
  reservations_.emplace(cursor, size);
  return cursor;
}

void VaSpace::drop_mapping(std::map<uint64_t, uint32_t>::iterator it) {
  const uint32_t slot = it->second;
  Mapping& m = slots_[slot];
  clear_range(m.va, m.va + m.size);
  m = Mapping{};
  free_slots_.push_back(slot);
  mappings_.erase(it);
}

Status VaSpace::free(uint64_t va, uint64_t size) {
  const uint64_t page = page_size();
  auto it = reservations_.find(va);
  if (it == reservations_.end() || add_overflows(size, page) || it->second != ((size + page - 1) & ~(page - 1)))
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("[{:#x}, +{:#x}) is not a GPU VA reservation of this process", va, size));
  const uint64_t end = va + it->second;
  for (auto m = mappings_.lower_bound(va); m != mappings_.end() && m->first < end; m = mappings_.lower_bound(va)) drop_mapping(m);
  reservations_.erase(it);
  return {};
}

Status VaSpace::map(uint64_t va, uint64_t size, std::shared_ptr<Allocation> alloc, uint64_t alloc_size, uint64_t offset,
                    uint32_t protection) {
  const uint64_t page = page_size();
  if (size == 0 || va % page || offset % page || add_overflows(va, size))
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("GPU VA mapping [{:#x}, +{:#x}) at offset {:#x}: must be non-empty and aligned to {:#x}-byte pages", va, size, offset, page));
  if (protection == 0 || (protection & ~(GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE)))
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("protection {:#x}", protection));
  if (add_overflows(offset, size) || offset + size > alloc_size)
    return Error(GPUP_STATUS_OUT_OF_RANGE, fmt::format("mapping [{:#x}, +{:#x}) of an allocation of {:#x} bytes", offset, size, alloc_size));
  if (((offset + size - 1) >> layout_.page_shift) > UINT32_MAX)
    return Error(GPUP_STATUS_OUT_OF_RANGE, fmt::format("allocation offset {:#x} is beyond what a PTE can name", offset + size - 1));
  if (mappings_.size() >= kMaxMappings) return Error(GPUP_STATUS_QUOTA_EXCEEDED, "too many GPU VA mappings");
  auto r = reservations_.upper_bound(va);
  if (r == reservations_.begin()) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPU VA {:#x} is not reserved", va));
  --r;
  if (va + size > r->first + r->second)
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("GPU VA mapping [{:#x}, +{:#x}) leaves its reservation", va, size));
  // Mappings own whole pages: one may start on the page after another's partial last page.
  const uint64_t end = (va + size + page - 1) & ~(page - 1);
  auto next = mappings_.lower_bound(va);
  if (next != mappings_.end() && next->first < end)
    return Error(GPUP_STATUS_ALREADY_EXISTS, fmt::format("GPU VA {:#x} overlaps the mapping at {:#x}", va, next->first));
  if (next != mappings_.begin()) {
    auto prev = std::prev(next);
    const Mapping& pm = slots_[prev->second];
    if (pm.va + pm.size > va)
      return Error(GPUP_STATUS_ALREADY_EXISTS, fmt::format("GPU VA {:#x} overlaps the mapping at {:#x}", va, prev->first));
  }

  uint32_t slot;
  if (!free_slots_.empty()) {
    slot = free_slots_.back();
    free_slots_.pop_back();
  } else {
    slot = static_cast<uint32_t>(slots_.size());
    slots_.emplace_back();
  }
  const uint32_t top = static_cast<uint32_t>(layout_.levels.size() - 1);
  Status s;
  if (!root_) root_ = new_table(top);
  if (!root_)
    s = Error(GPUP_STATUS_QUOTA_EXCEEDED, fmt::format("GPU page tables of this process would exceed {} MiB", kMaxTableHostBytes >> 20));
  else
    s = fill(*root_, top, va, end, slot, offset >> layout_.page_shift, va, va + size, protection);
  if (!s) {
    clear_range(va, end);  // the PTEs written so far and the tables left empty
    free_slots_.push_back(slot);
    return s;
  }
  slots_[slot] = Mapping{va, size, std::move(alloc), offset, protection};
  mappings_.emplace(va, slot);
  return {};
}

Status VaSpace::unmap(uint64_t va) {
  auto it = mappings_.find(va);
  if (it == mappings_.end()) return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("no GPU VA mapping starts at {:#x}", va));
  drop_mapping(it);
  return {};
}

void VaSpace::unmap_allocation(const Allocation* alloc) {
  for (auto m = mappings_.begin(); m != mappings_.end();) {
    if (slots_[m->second].allocation.get() == alloc) {
      const uint64_t next = m->first + 1;
      drop_mapping(m);
      m = mappings_.lower_bound(next);
    } else {
      ++m;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Translation

Result<VaSpace::Resolved> VaSpace::resolve(uint64_t va, uint64_t size, bool write) const {
  if (size == 0 || add_overflows(va, size))
    return Error(GPUP_STATUS_GPU_PAGE_FAULT, fmt::format("GPU VA range [{:#x}, +{:#x}) is invalid", va, size));
  const uint64_t end = va + size;
  if (end > limit()) return page_fault(std::max(va, limit()), fmt::format("outside the {}-bit GPU VA space", layout_.va_bits));
  const uint32_t shift = layout_.page_shift;
  const uint64_t page = page_size();
  const MmuLayout::Level& leaf_level = layout_.levels[0];
  const uint64_t leaf_span = uint64_t{1} << (leaf_level.shift + leaf_level.index_bits);
  const uint64_t pte_mask = (uint64_t{1} << leaf_level.index_bits) - 1;

  Resolved out;
  uint32_t first_slot = 0;
  uint64_t next_page = 0;  // the allocation page the next VA page must map
  uint64_t cur = va;
  while (cur < end) {
    const uint64_t leaf_va = cur & ~(leaf_span - 1);
    const Table* leaf = cached_leaf_ && cached_leaf_va_ == leaf_va ? cached_leaf_ : find_leaf(cur);
    if (!leaf) return page_fault(cur, "outside this process's mappings (no page table)");
    cached_leaf_ = leaf;
    cached_leaf_va_ = leaf_va;
    const uint64_t leaf_end = std::min(end, leaf_va + leaf_span);
    while (cur < leaf_end) {
      const Pte& p = leaf->ptes[(cur >> shift) & pte_mask];
      if (!p.protection) return page_fault(cur, "outside this process's mappings (no PTE)");
      if (write && !(p.protection & GPUPKMT_PROTECTION_WRITE)) return page_fault(cur, "mapped read-only");
      if (first_slot == 0) {
        first_slot = p.slot;
        out.allocation = slots_[p.slot].allocation;
        out.offset = (uint64_t{p.page} << shift) + (cur & (page - 1));
      } else if (p.page != next_page || (p.slot != first_slot && slots_[p.slot].allocation != out.allocation)) {
        return page_fault(cur, "the range runs into another mapping");
      }
      const uint64_t page_end = (cur & ~(page - 1)) + page;
      if (p.tail) {
        const Mapping& m = slots_[p.slot];
        if (std::min(end, page_end) > m.va + m.size) return page_fault(m.va + m.size, "outside this process's mappings (past the end of one)");
      }
      next_page = uint64_t{p.page} + 1;
      cur = page_end;
    }
  }
  return out;
}

}  // namespace gpup::vmwp
