// Memory objects: buffers and sub-buffers.
//
// A buffer is one CPU-visible allocation of the partition (charged to its budget), mapped once at
// a GPU VA of the process's arena. Its bytes are a shared section between guest and host: the
// guest moves data with memcpy on the mapping (after the work that touches the buffer has
// completed), never through messages. A sub-buffer is a range of its parent's allocation.
#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <set>

#include "guest/ocl/icd.h"

namespace gpup::ocl {

Backing::~Backing() {
  if (allocation != 0) {
    GPUPKMT_DESTROYALLOCATION d{hw_device, allocation};
    if (gpup_status s = GpupKmtDestroyAllocation(&d); GPUP_FAILED(s)) log_failure("destroying a buffer", s);
  }
  if (va != 0) device->va_release(va, va_size);
}

cl_int Backing::map(uint8_t** out) {
  std::lock_guard lock(mu);
  if (mapping == nullptr) {
    GPUPKMT_LOCK l{hw_device, allocation, nullptr, 0};
    if (gpup_status s = GpupKmtLock(&l); GPUP_FAILED(s)) {
      log_failure("mapping a buffer", s);
      return cl_error_from_status(s, CL_MEM_OBJECT_ALLOCATION_FAILURE);
    }
    mapping = static_cast<uint8_t*>(l.pData);
  }
  *out = mapping;
  return CL_SUCCESS;
}

cl_int Backing::begin(uint8_t** out) {
  if (device->persistent_maps) return map(out);
  GPUPKMT_LOCK l{hw_device, allocation, nullptr, 0};
  if (gpup_status s = GpupKmtLock(&l); GPUP_FAILED(s)) {
    log_failure("locking a buffer", s);
    return cl_error_from_status(s, CL_MEM_OBJECT_ALLOCATION_FAILURE);
  }
  *out = static_cast<uint8_t*>(l.pData);
  return CL_SUCCESS;
}

cl_int Backing::end() {
  if (device->persistent_maps) return CL_SUCCESS;
  GPUPKMT_UNLOCK u{hw_device, allocation};
  if (gpup_status s = GpupKmtUnlock(&u); GPUP_FAILED(s)) {
    log_failure("unlocking a buffer", s);
    return cl_error_from_status(s);
  }
  return CL_SUCCESS;
}

void mem_retain(cl_mem m) { m->refs.fetch_add(1, std::memory_order_relaxed); }

void mem_release(cl_mem m) {
  if (m->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  for (auto it = m->destructors.rbegin(); it != m->destructors.rend(); ++it) it->first(m, it->second);
  cl_mem parent = m->parent;
  cl_context context = m->context;
  // A whole buffer's allocation no other object shares: no command uses it any more (commands
  // retain their memory objects until they complete), so the next buffer of its size may have it.
  if (parent == nullptr && m->backing && !m->backing->image && m->backing.use_count() == 1 && m->maps.empty()) {
    context->buffer_pool->put(std::move(m->backing));
  }
  m->magic = Magic::kDead;
  delete m;  // the backing goes with the last object sharing it
  if (parent) mem_release(parent);
  context_release(context);
}

namespace {

constexpr cl_mem_flags kAccessFlags = CL_MEM_READ_WRITE | CL_MEM_WRITE_ONLY | CL_MEM_READ_ONLY;
constexpr cl_mem_flags kHostPtrFlags = CL_MEM_USE_HOST_PTR | CL_MEM_ALLOC_HOST_PTR | CL_MEM_COPY_HOST_PTR;
constexpr cl_mem_flags kHostAccessFlags = CL_MEM_HOST_WRITE_ONLY | CL_MEM_HOST_READ_ONLY | CL_MEM_HOST_NO_ACCESS;

bool more_than_one(cl_mem_flags f) { return (f & (f - 1)) != 0; }

}  // namespace

cl_int check_mem_flags(cl_mem_flags flags) {
  if (flags & ~(kAccessFlags | kHostPtrFlags | kHostAccessFlags | CL_MEM_KERNEL_READ_AND_WRITE))
    return CL_INVALID_VALUE;
  if (more_than_one(flags & kAccessFlags)) return CL_INVALID_VALUE;
  if (more_than_one(flags & kHostAccessFlags)) return CL_INVALID_VALUE;
  if ((flags & CL_MEM_USE_HOST_PTR) && (flags & (CL_MEM_ALLOC_HOST_PTR | CL_MEM_COPY_HOST_PTR))) return CL_INVALID_VALUE;
  return CL_SUCCESS;
}

namespace {

cl_mem fail(cl_int* errcode_ret, cl_int e) {
  if (errcode_ret) *errcode_ret = e;
  return nullptr;
}

}  // namespace

namespace {

bool out_of_memory(gpup_status s) { return s == GPUP_STATUS_QUOTA_EXCEEDED || s == GPUP_STATUS_NO_MEMORY; }

// A new allocation of `size` bytes at a new GPU VA; *status says why not.
cl_int new_backing(cl_context c, size_t size, const GPUP_OCL_IMAGE_DESC* image, std::shared_ptr<Backing>* out,
                   gpup_status* status) {
  cl_device_id d = c->devices.front();
  auto backing = std::make_shared<Backing>();
  backing->device = d;
  backing->hw_device = c->hw_device;
  backing->size = size;
  backing->image = image != nullptr;
  GPUPKMT_CREATEALLOCATION ca{};
  ca.hDevice = c->hw_device;
  ca.Flags = GPUPKMT_ALLOCATION_CPU_VISIBLE | (image ? GPUPKMT_ALLOCATION_IMAGE : 0u);
  ca.Size = size;
  ca.pPrivateDriverData = image;
  ca.PrivateDriverDataSize = image ? sizeof *image : 0;
  if (*status = GpupKmtCreateAllocation(&ca); GPUP_FAILED(*status)) {
    log_failure(image ? "creating an image" : "creating a buffer", *status);
    return cl_error_from_status(*status, CL_MEM_OBJECT_ALLOCATION_FAILURE);
  }
  backing->allocation = ca.hAllocation;
  backing->va_size = (size + 4095) & ~uint64_t{4095};
  backing->va = d->va_alloc(backing->va_size);
  if (backing->va == 0) {
    *status = GPUP_STATUS_NO_MEMORY;  // the arena is full
    return CL_OUT_OF_RESOURCES;
  }
  GPUPKMT_MAPGPUVA mv{backing->allocation, GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE, backing->va, 0, size};
  if (*status = GpupKmtMapGpuVirtualAddress(&mv); GPUP_FAILED(*status)) {
    log_failure("mapping a memory object at its GPU VA", *status);
    return cl_error_from_status(*status, CL_MEM_OBJECT_ALLOCATION_FAILURE);
  }
  *out = std::move(backing);
  return CL_SUCCESS;
}

constexpr uint64_t kPoolMaxBytes = uint64_t{64} << 20;
constexpr size_t kPoolMaxCount = 32;

}  // namespace

cl_int make_backing(cl_context c, size_t size, const GPUP_OCL_IMAGE_DESC* image, std::shared_ptr<Backing>* out) {
  if (image == nullptr) {
    if (auto b = c->buffer_pool->take(size)) {
      *out = std::move(b);
      return CL_SUCCESS;
    }
  }
  gpup_status status = GPUP_STATUS_SUCCESS;
  cl_int err = new_backing(c, size, image, out, &status);
  // Pooled allocations count against the budget and hold arena space: give them back, try again.
  if (err != CL_SUCCESS && out_of_memory(status) && BufferPool::clear_all()) {
    err = new_backing(c, size, image, out, &status);
  }
  return err;
}

namespace {

// Every live pool of the process. Held while a pool is cleared by clear_all, so a context being
// released (close) waits for it before destroying its thunk device.
std::mutex g_pools_mu;
std::set<BufferPool*> g_pools;

}  // namespace

BufferPool::BufferPool() {
  std::lock_guard lock(g_pools_mu);
  g_pools.insert(this);
}

void BufferPool::close() {
  {
    std::lock_guard lock(g_pools_mu);
    g_pools.erase(this);
  }
  clear();
}

bool BufferPool::clear_all() {
  std::lock_guard lock(g_pools_mu);
  bool any = false;
  for (BufferPool* p : g_pools) any = p->clear() || any;
  return any;
}

void BufferPool::configure(uint64_t budget) {
  const char* env = std::getenv("GPUP_OCL_POOL");
  const bool off = env != nullptr && std::string_view(env) == "0";
  std::lock_guard lock(mu_);
  max_bytes_ = off ? 0 : std::min(budget / 8, kPoolMaxBytes);
  max_count_ = off ? 0 : kPoolMaxCount;
}

std::shared_ptr<Backing> BufferPool::take(uint64_t size) {
  std::lock_guard lock(mu_);
  // Newest first: its pages are the likeliest to be resident.
  for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
    if ((*it)->size != size) continue;
    std::shared_ptr<Backing> b = std::move(*it);
    free_.erase(std::next(it).base());
    bytes_ -= b->va_size;
    return b;
  }
  return nullptr;
}

void BufferPool::put(std::shared_ptr<Backing> b) {
  std::deque<std::shared_ptr<Backing>> evicted;  // destroyed outside the lock (round trips)
  {
    std::lock_guard lock(mu_);
    if (b->va_size > max_bytes_ || max_count_ == 0) return;  // b is destroyed on return
    while (!free_.empty() && (bytes_ + b->va_size > max_bytes_ || free_.size() >= max_count_)) {
      bytes_ -= free_.front()->va_size;
      evicted.push_back(std::move(free_.front()));
      free_.pop_front();
    }
    bytes_ += b->va_size;
    free_.push_back(std::move(b));
  }
}

bool BufferPool::clear() {
  std::deque<std::shared_ptr<Backing>> all;
  {
    std::lock_guard lock(mu_);
    all.swap(free_);
    bytes_ = 0;
  }
  return !all.empty();
}

}  // namespace gpup::ocl

using namespace gpup::ocl;

namespace gpup::ocl::api {

cl_mem CreateBufferWithProperties(cl_context c, const cl_mem_properties* props, cl_mem_flags flags, size_t size,
                                  void* host_ptr, cl_int* errcode_ret) {
  if (!valid(c)) return fail(errcode_ret, CL_INVALID_CONTEXT);
  if (props != nullptr && props[0] != 0) return fail(errcode_ret, CL_INVALID_PROPERTY);
  if (flags == 0) flags = CL_MEM_READ_WRITE;
  if (cl_int e = check_mem_flags(flags); e != CL_SUCCESS) return fail(errcode_ret, e);
  cl_device_id d = c->devices.front();
  if (size == 0 || size > d->max_alloc) return fail(errcode_ret, CL_INVALID_BUFFER_SIZE);
  const bool wants_ptr = (flags & (CL_MEM_USE_HOST_PTR | CL_MEM_COPY_HOST_PTR)) != 0;
  if (wants_ptr != (host_ptr != nullptr)) return fail(errcode_ret, CL_INVALID_HOST_PTR);

  std::shared_ptr<Backing> backing;
  if (cl_int e = make_backing(c, size, nullptr, &backing); e != CL_SUCCESS) return fail(errcode_ret, e);
  if (wants_ptr) {
    uint8_t* p = nullptr;
    if (cl_int e = backing->begin(&p); e != CL_SUCCESS) return fail(errcode_ret, e);
    std::memcpy(p, host_ptr, size);
    if (cl_int e = backing->end(); e != CL_SUCCESS) return fail(errcode_ret, e);
  }

  auto* m = new _cl_mem();
  m->context = c;
  context_retain(c);
  m->flags = flags;
  m->size = size;
  m->host_ptr = (flags & CL_MEM_USE_HOST_PTR) ? host_ptr : nullptr;
  if (props != nullptr) m->properties.assign(props, props + 1);
  m->backing = std::move(backing);
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return m;
}

cl_mem CreateBuffer(cl_context c, cl_mem_flags flags, size_t size, void* host_ptr, cl_int* errcode_ret) {
  return CreateBufferWithProperties(c, nullptr, flags, size, host_ptr, errcode_ret);
}

cl_mem CreateSubBuffer(cl_mem parent, cl_mem_flags flags, cl_buffer_create_type type, const void* info,
                       cl_int* errcode_ret) {
  if (!valid(parent) || parent->parent != nullptr || parent->type != CL_MEM_OBJECT_BUFFER)
    return fail(errcode_ret, CL_INVALID_MEM_OBJECT);
  if (flags & (kHostPtrFlags | ~(kAccessFlags | kHostPtrFlags | kHostAccessFlags)))
    return fail(errcode_ret, CL_INVALID_VALUE);
  if (more_than_one(flags & kAccessFlags) || more_than_one(flags & kHostAccessFlags))
    return fail(errcode_ret, CL_INVALID_VALUE);
  const cl_mem_flags pf = parent->flags;
  // Access must not widen what the parent allows.
  if (((pf & CL_MEM_WRITE_ONLY) && (flags & (CL_MEM_READ_WRITE | CL_MEM_READ_ONLY))) ||
      ((pf & CL_MEM_READ_ONLY) && (flags & (CL_MEM_READ_WRITE | CL_MEM_WRITE_ONLY))) ||
      ((pf & CL_MEM_HOST_WRITE_ONLY) && (flags & CL_MEM_HOST_READ_ONLY)) ||
      ((pf & CL_MEM_HOST_READ_ONLY) && (flags & CL_MEM_HOST_WRITE_ONLY)) ||
      ((pf & CL_MEM_HOST_NO_ACCESS) && (flags & (CL_MEM_HOST_READ_ONLY | CL_MEM_HOST_WRITE_ONLY))))
    return fail(errcode_ret, CL_INVALID_VALUE);
  if (type != CL_BUFFER_CREATE_TYPE_REGION || info == nullptr) return fail(errcode_ret, CL_INVALID_VALUE);
  const auto* region = static_cast<const cl_buffer_region*>(info);
  if (region->size == 0) return fail(errcode_ret, CL_INVALID_BUFFER_SIZE);
  if (region->origin > parent->size || region->size > parent->size - region->origin)
    return fail(errcode_ret, CL_INVALID_VALUE);
  cl_device_id d = parent->context->devices.front();
  if (region->origin % (d->mem_base_addr_align / 8) != 0) return fail(errcode_ret, CL_MISALIGNED_SUB_BUFFER_OFFSET);

  auto* m = new _cl_mem();
  m->context = parent->context;
  context_retain(m->context);
  m->parent = parent;
  mem_retain(parent);
  // Unspecified access and host-access flags are inherited, as are the host-pointer flags.
  cl_mem_flags f = flags;
  if ((flags & kAccessFlags) == 0) f |= pf & kAccessFlags;
  if ((flags & kHostAccessFlags) == 0) f |= pf & kHostAccessFlags;
  f |= pf & kHostPtrFlags;
  m->flags = f;
  m->size = region->size;
  m->origin = region->origin;
  m->host_ptr = parent->host_ptr ? static_cast<uint8_t*>(parent->host_ptr) + region->origin : nullptr;
  m->backing = parent->backing;
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return m;
}

cl_int RetainMemObject(cl_mem m) {
  if (!valid(m)) return CL_INVALID_MEM_OBJECT;
  mem_retain(m);
  return CL_SUCCESS;
}

cl_int ReleaseMemObject(cl_mem m) {
  if (!valid(m)) return CL_INVALID_MEM_OBJECT;
  mem_release(m);
  return CL_SUCCESS;
}

cl_int SetMemObjectDestructorCallback(cl_mem m, void(CL_CALLBACK* fn)(cl_mem, void*), void* user_data) {
  if (!valid(m)) return CL_INVALID_MEM_OBJECT;
  if (fn == nullptr) return CL_INVALID_VALUE;
  std::lock_guard lock(m->mu);
  m->destructors.emplace_back(fn, user_data);
  return CL_SUCCESS;
}

cl_int GetMemObjectInfo(cl_mem m, cl_mem_info param, size_t n, void* v, size_t* ret) {
  if (!valid(m)) return CL_INVALID_MEM_OBJECT;
  switch (param) {
    case CL_MEM_TYPE: return info_value(n, v, ret, m->type);
    case CL_MEM_FLAGS: return info_value(n, v, ret, m->flags);
    case CL_MEM_SIZE: return info_value(n, v, ret, m->size);
    case CL_MEM_HOST_PTR: return info_value(n, v, ret, m->host_ptr);
    case CL_MEM_MAP_COUNT: {
      std::lock_guard lock(m->mu);
      return info_value(n, v, ret, cl_uint(m->map_count));
    }
    case CL_MEM_REFERENCE_COUNT: return info_value(n, v, ret, cl_uint(m->refs.load()));
    case CL_MEM_CONTEXT: return info_value(n, v, ret, m->context);
    case CL_MEM_ASSOCIATED_MEMOBJECT: return info_value(n, v, ret, m->parent);
    case CL_MEM_OFFSET: return info_value(n, v, ret, m->parent ? m->origin : size_t{0});
    case CL_MEM_USES_SVM_POINTER: return info_value(n, v, ret, cl_bool{CL_FALSE});
    case CL_MEM_PROPERTIES: return info_array(n, v, ret, m->properties);
    default: return CL_INVALID_VALUE;
  }
}

}  // namespace gpup::ocl::api
