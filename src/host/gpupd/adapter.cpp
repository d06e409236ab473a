#include "host/gpupd/adapter.h"

#include <fmt/format.h>

namespace gpup::gpupd {

const char* to_string(AdapterState s) {
  switch (s) {
    case AdapterState::kReady: return "ready";
    case AdapterState::kFailed: return "failed";
  }
  return "?";
}

std::string AdapterInfo::not_partitionable_reason() const {
  if (state == AdapterState::kFailed) return fmt::format("adapter {} failed: {}", name, error);
  if (!paravirtualization)
    return fmt::format("adapter {}: KMD {} does not declare ParavirtualizationSupported; it cannot be partitioned",
                       name, driver_name);
  return {};
}

}  // namespace gpup::gpupd
