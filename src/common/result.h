// Error and Result<T>: a gpup_status with a human explanation, or a value.
#pragma once
#include <cassert>
#include <string>
#include <utility>
#include <variant>

#include "gpup/status.h"

namespace gpup {

struct Error {
  gpup_status status = GPUP_STATUS_INTERNAL;
  std::string message;  // says what was wrong, with the numbers that matter

  Error() = default;
  Error(gpup_status s, std::string m) : status(s), message(std::move(m)) {}
  // "INVALID_HANDLE: allocation 0x40000041 is not open in this process"
  std::string describe() const;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T v) : v_(std::move(v)) {}         // NOLINT: implicit by design
  Result(Error e) : v_(std::move(e)) {}     // NOLINT
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  T& operator*() { return value(); }
  T* operator->() { return &value(); }
  const Error& error() const { return std::get<1>(v_); }
  gpup_status status() const { return ok() ? GPUP_STATUS_SUCCESS : error().status; }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error e) : err_(std::move(e)), ok_(false) {}  // NOLINT
  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const { return err_; }
  gpup_status status() const { return ok_ ? GPUP_STATUS_SUCCESS : err_.status; }

 private:
  Error err_;
  bool ok_ = true;
};

using Status = Result<void>;

inline Error make_error(gpup_status s, std::string m) { return Error(s, std::move(m)); }

}  // namespace gpup
