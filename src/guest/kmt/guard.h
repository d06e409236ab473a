// Internal to libgpupkmt: the C ABI boundary. No exception may leave an exported function.
#pragma once
#include <exception>
#include <new>
#include <string>

#include "guest/kmt/session.h"

// Marks the library's exported C entry points (everything else is hidden, see libgpupkmt.map).
#define GPUPKMT_EXPORT extern "C" __attribute__((visibility("default")))

namespace gpup::kmt {

// Runs `f` (returning gpup_status) and turns an escaping exception into a status with a message.
template <typename F>
gpup_status guarded(const char* name, F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return fail(GPUP_STATUS_NO_MEMORY, std::string(name) + ": out of guest memory");
  } catch (const std::exception& e) {
    return fail(GPUP_STATUS_INTERNAL, std::string(name) + ": " + e.what());
  } catch (...) {
    return fail(GPUP_STATUS_INTERNAL, std::string(name) + ": unexpected exception");
  }
}

}  // namespace gpup::kmt
