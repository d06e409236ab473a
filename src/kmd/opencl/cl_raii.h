// Owning references to OpenCL objects, and cl_int error names for logs.
#pragma once

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#include <CL/cl.h>

#include <utility>

namespace gpup::kmd::ocl {

// Holds one reference (as returned by clCreate* or taken with clRetain*) and releases it on
// destruction. Move-only.
template <typename T, cl_int(CL_API_CALL* Release)(T)>
class ClRef {
 public:
  ClRef() = default;
  explicit ClRef(T handle) : h_(handle) {}
  ClRef(const ClRef&) = delete;
  ClRef& operator=(const ClRef&) = delete;
  ClRef(ClRef&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  ClRef& operator=(ClRef&& o) noexcept {
    if (this != &o) reset(std::exchange(o.h_, nullptr));
    return *this;
  }
  ~ClRef() { reset(); }

  T get() const { return h_; }
  explicit operator bool() const { return h_ != nullptr; }
  // For out-parameters (clEnqueue*(..., &event)): releases the current reference first.
  T* out() {
    reset();
    return &h_;
  }
  void reset(T handle = nullptr) {
    if (h_ != nullptr) Release(h_);
    h_ = handle;
  }

 private:
  T h_ = nullptr;
};

using ClContext = ClRef<cl_context, clReleaseContext>;
using ClQueue = ClRef<cl_command_queue, clReleaseCommandQueue>;
using ClMem = ClRef<cl_mem, clReleaseMemObject>;
using ClProgram = ClRef<cl_program, clReleaseProgram>;
using ClKernel = ClRef<cl_kernel, clReleaseKernel>;
using ClEvent = ClRef<cl_event, clReleaseEvent>;
using ClSampler = ClRef<cl_sampler, clReleaseSampler>;

// "CL_INVALID_VALUE" for -30; "CL_UNKNOWN_ERROR" for codes it does not know (log the number too).
const char* cl_error_name(cl_int err);

}  // namespace gpup::kmd::ocl
