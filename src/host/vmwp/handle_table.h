// Per-guest-process handle table.
//
// A guest never sees a host pointer: every object it names is a 32-bit handle from this table.
// Layout (as the GPU-PV host uses): bits 0-5 instance (always 0 here), bits 6-29 index,
// bits 30-31 a uniqueness counter bumped on every reuse of the slot. A freed slot is not reused
// until kReuseDelay other slots have been freed, so a stale handle fails rather than aliasing a
// new object. Lookup checks index, uniqueness and type; each failure has its own message.
//
// Not thread-safe: the worker's object lock guards it.
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "common/result.h"

namespace gpup::vmwp {

enum class ObjectType : uint8_t { Free = 0, Device = 3, Allocation = 5, Context = 7, SyncObject = 8, Section = 9 };

const char* object_type_name(ObjectType t);

struct Object {
  explicit Object(ObjectType t) : type(t) {}
  virtual ~Object() = default;
  const ObjectType type;
  uint32_t handle = 0;
};

class HandleTable {
 public:
  static constexpr uint32_t kIndexShift = 6;
  static constexpr uint32_t kIndexBits = 24;
  static constexpr uint32_t kUniqueShift = 30;
  static constexpr uint32_t kInstanceMask = (1u << kIndexShift) - 1;
  static constexpr size_t kReuseDelay = 128;

  explicit HandleTable(size_t max_objects = 65536) : max_objects_(max_objects) { entries_.resize(1); }

  // QUOTA_EXCEEDED when the process already holds max_objects.
  Result<uint32_t> insert(std::shared_ptr<Object> obj) {
    if (live_ >= max_objects_)
      return Error(GPUP_STATUS_QUOTA_EXCEEDED, fmt::format("process holds {} objects, the limit", live_));
    uint32_t index;
    if (free_.size() > kReuseDelay) {
      index = free_.front();
      free_.pop_front();
    } else {
      if (entries_.size() >= (1u << kIndexBits)) return Error(GPUP_STATUS_QUOTA_EXCEEDED, "handle space exhausted");
      index = static_cast<uint32_t>(entries_.size());
      entries_.emplace_back();
    }
    Entry& e = entries_[index];
    e.unique = static_cast<uint8_t>((e.unique + 1) & 3);
    e.obj = std::move(obj);
    const uint32_t h = (index << kIndexShift) | (uint32_t{e.unique} << kUniqueShift);
    e.obj->handle = h;
    ++live_;
    return h;
  }

  // The object of that type, or INVALID_HANDLE / OBJECT_TYPE_MISMATCH with the reason.
  template <typename T>
  Result<std::shared_ptr<T>> get(uint32_t handle, ObjectType type) const {
    auto e = find(handle);
    if (!e.ok()) return e.error();
    Object* o = (*e)->obj.get();
    if (o->type != type)
      return Error(GPUP_STATUS_OBJECT_TYPE_MISMATCH,
                   fmt::format("handle {:#x} is of type {}, expected {}", handle, object_type_name(o->type), object_type_name(type)));
    return std::static_pointer_cast<T>((*e)->obj);
  }

  // Removes and returns the object.
  Result<std::shared_ptr<Object>> remove(uint32_t handle) {
    auto e = find(handle);
    if (!e.ok()) return e.error();
    Entry* entry = const_cast<Entry*>(*e);
    auto obj = std::move(entry->obj);
    entry->obj.reset();
    free_.push_back(handle >> kIndexShift & ((1u << kIndexBits) - 1));
    --live_;
    return obj;
  }

  size_t size() const { return live_; }

  template <typename F>
  void for_each(F&& f) const {
    for (const auto& e : entries_)
      if (e.obj) f(e.obj);
  }

 private:
  struct Entry {
    std::shared_ptr<Object> obj;
    uint8_t unique = 0;
  };

  Result<const Entry*> find(uint32_t handle) const {
    if (handle == 0) return Error(GPUP_STATUS_INVALID_HANDLE, "null handle");
    if (handle & kInstanceMask) return Error(GPUP_STATUS_INVALID_HANDLE, fmt::format("handle {:#x} is malformed", handle));
    const uint32_t index = handle >> kIndexShift & ((1u << kIndexBits) - 1);
    const uint32_t unique = handle >> kUniqueShift;
    if (index == 0 || index >= entries_.size())
      return Error(GPUP_STATUS_INVALID_HANDLE, fmt::format("handle {:#x} was never issued to this process", handle));
    const Entry& e = entries_[index];
    if (!e.obj || e.unique != unique)
      return Error(GPUP_STATUS_INVALID_HANDLE, fmt::format("handle {:#x} is stale (its object was destroyed)", handle));
    return &e;
  }

  std::vector<Entry> entries_;
  std::deque<uint32_t> free_;
  size_t live_ = 0;
  size_t max_objects_;
};

}  // namespace gpup::vmwp
