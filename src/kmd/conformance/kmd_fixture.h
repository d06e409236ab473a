// Test harness for KMD plugins: loads one through gpup_kmd_loader, starts an adapter, creates a
// VM worker process, a VM process and a device, and keeps track of everything a test creates so
// it is destroyed in DDI order at the end. Completions land in one Sink per context.
//
// Threads: the fixture is used from the test's thread (and from threads a test starts, each on
// its own contexts). Completion callbacks arrive on the KMD's threads and only touch Sinks.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "gpup/ddi.h"
#include "gpup/kmd_opencl.h"
#include "host/kmd_loader/kmd_loader.h"

namespace gpup::kmd::test {

// Completions of one context, in arrival order.
class Sink {
 public:
  void add(uint64_t id, gpup_status status);
  // Waits until at least n completions arrived; false on timeout.
  bool wait_for(size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(30));
  std::vector<std::pair<uint64_t, gpup_status>> snapshot();
  size_t count();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<uint64_t, gpup_status>> done_;
};

// Callbacks given to every KMD under test.
GPUPDDI_CALLBACKS test_callbacks();
// Log lines the KMD sent since the last clear (only WARN and above are kept).
std::vector<std::string> logged();
void clear_log();
bool log_contains(std::string_view text);
// Completions that arrived on a thread while it was inside a DDI call (must stay 0).
int reentrant_completions();

// RAII marker: the current thread is inside a DDI call.
struct InDdi {
  InDdi();
  ~InDdi();
};

GPUPDDI_BUFFER_REF ref(GPUPDDI_HANDLE h, uint64_t offset, uint64_t size);
GPUPDDI_COMMAND copy_cmd(const GPUPDDI_BUFFER_REF& src, const GPUPDDI_BUFFER_REF& dst);
GPUPDDI_COMMAND fill_cmd(const GPUPDDI_BUFFER_REF& dst, const void* pattern, uint32_t pattern_size);

// Kernel arguments with owned value storage (addresses stay stable).
class Args {
 public:
  Args() = default;
  Args(const Args& o) { *this = o; }
  Args& operator=(const Args& o);
  Args(Args&&) = default;  // a moved deque keeps its elements where they are
  Args& operator=(Args&&) = default;

  template <typename T>
  Args& value(const T& v) {
    return bytes(&v, sizeof(T));
  }
  Args& bytes(const void* p, uint32_t size);
  Args& buffer(const GPUPDDI_BUFFER_REF& r);
  Args& local(uint32_t size);
  Args& null_buffer();
  Args& image(const GPUPDDI_BUFFER_REF& r);  // GPUPDDI_ARG_IMAGE
  Args& sampler(const GPUP_OCL_SAMPLER_DESC& d);  // GPUPDDI_ARG_SAMPLER with a copy of d
  Args& sampler_bytes(const void* p, uint32_t size);  // GPUPDDI_ARG_SAMPLER with any bytes
  const std::vector<GPUPDDI_KERNEL_ARG>& list() const { return list_; }

 private:
  std::vector<GPUPDDI_KERNEL_ARG> list_;
  std::deque<std::vector<unsigned char>> values_;
};

// A dispatch command and the storage it points into.
struct Dispatch {
  Dispatch(GPUPDDI_HANDLE program, std::string name, Args args, uint64_t global, uint64_t local = 0);
  GPUPDDI_COMMAND cmd() const;

  GPUPDDI_HANDLE program;
  std::string name;
  Args args;
  uint32_t dims = 1;
  uint64_t offset[3] = {};
  uint64_t global[3] = {1, 1, 1};
  uint64_t local[3] = {};
};

// A GPUP_OCL_IMAGE_DESC (Magic set, Flags READ_WRITE).
GPUP_OCL_IMAGE_DESC image_desc(uint32_t type, uint32_t order, uint32_t data_type, uint64_t width, uint64_t height,
                               uint64_t depth, uint64_t array_size, uint64_t row_pitch, uint64_t slice_pitch);

// The private data of a program allocation.
std::vector<unsigned char> program_desc(uint32_t format, std::string_view options, std::string_view content,
                                        uint32_t version = GPUP_OCL_PROGRAM_VERSION);
// COMPILE / LINK content (GPUP_OCL_SET_HEADER framing): (name, data) entries.
std::string set_content(const std::vector<std::pair<std::string, std::string>>& entries);

// The version 2 output after the log (GPUP_OCL_PROGRAM_INFO), parsed with every bound checked.
struct ProgramInfo {
  struct Arg {
    GPUP_OCL_KERNEL_ARG_INFO info{};
    std::string type_name, name;
  };
  struct Kernel {
    GPUP_OCL_KERNEL_INFO info{};
    std::string name, attributes;
    std::vector<Arg> args;
  };
  GPUP_OCL_PROGRAM_INFO info{};
  std::vector<Kernel> kernels;
  std::string binary;
  const Kernel* find(std::string_view name) const;
};

class KmdFixture {
 public:
  struct Buffer {
    GPUPDDI_HANDLE h = nullptr;
    unsigned char* mem = nullptr;  // backing store (CPU-visible only)
    uint64_t size = 0;
  };
  struct Built {
    gpup_status status = GPUP_STATUS_INTERNAL;
    GPUPDDI_HANDLE h = nullptr;
    uint32_t written = 0;
    GPUP_OCL_BUILD_RESULT result{};
    std::string log;
    bool has_info = false;  // version 2 output with GPUP_OCL_PROGRAM_INFO
    ProgramInfo info;
  };
  struct Context {
    GPUPDDI_HANDLE h = nullptr;
    std::unique_ptr<Sink> sink;
  };

  ~KmdFixture() { close(); }

  // Loads kmd, starts an adapter with config, creates the processes and the device. Check
  // HasFatalFailure() after it.
  void open(const std::string& kmd, const char* config = "");
  // Destroys everything in DDI order and stops the adapter. Idempotent.
  void close();
  // Stops the adapter with everything still open (tests pfnStopAdapter's cleanup) and forgets it.
  void stop_adapter_now();

  const GPUPDDI_DRIVER_FUNCS& ddi() const { return driver->ddi(); }

  gpup_status query(uint32_t type, void* out, uint32_t out_size, const void* in = nullptr, uint32_t in_size = 0,
                    uint32_t* written = nullptr);
  gpup_status escape(const void* data, uint32_t size, void* out, uint32_t out_size, bool driver_known = false,
                     uint32_t* written = nullptr);

  Buffer cpu_buffer(uint64_t size);   // zeroed backing store; asserts success
  Buffer device_buffer(uint64_t size);
  // An image allocation (Flags.Image | CpuVisible, plus extra_flags) of size bytes over a zeroed,
  // page-aligned backing store, described by desc_size bytes of desc; *status gets the result.
  Buffer image(const GPUP_OCL_IMAGE_DESC& desc, uint64_t size, gpup_status* status,
               GPUPDDI_ALLOCATIONFLAGS extra_flags = {}, uint32_t desc_size = sizeof(GPUP_OCL_IMAGE_DESC));
  gpup_status create_allocation(GPUPDDI_ARG_CREATEALLOCATION* args);  // tracked when it succeeds
  void destroy_allocation(GPUPDDI_HANDLE h);
  Built build(std::string_view content, uint32_t format = GPUP_OCL_PROGRAM_SOURCE, std::string_view options = {},
              uint32_t out_capacity = 64 << 10, uint32_t version = GPUP_OCL_PROGRAM_VERSION);
  gpup_status build_raw(const void* data, uint32_t size);  // destroys the program if it was made
  gpup_status lock(GPUPDDI_HANDLE h);
  gpup_status unlock(GPUPDDI_HANDLE h);

  Context* context();
  void destroy_context(Context* c);
  gpup_status submit(Context* c, const std::vector<GPUPDDI_COMMAND>& commands, uint64_t id);
  // Submits and waits for that one completion; returns its status (or INTERNAL on timeout).
  gpup_status run(Context* c, const std::vector<GPUPDDI_COMMAND>& commands);

  std::string kmd;
  std::shared_ptr<Driver> driver;
  GPUPDDI_HANDLE adapter = nullptr;
  GPUPDDI_HANDLE worker = nullptr;
  GPUPDDI_HANDLE vm_process = nullptr;
  GPUPDDI_HANDLE device = nullptr;
  GPUPDDI_DEVICEINFO info{};
  uint64_t align = 1;  // MemBaseAddrAlignBits / 8

 private:
  struct Owned {
    GPUPDDI_HANDLE h;
    unsigned char* mem;
  };
  std::vector<Owned> allocations_;
  std::vector<std::unique_ptr<Context>> contexts_;
  uint64_t next_id_ = 1;
};

}  // namespace gpup::kmd::test
