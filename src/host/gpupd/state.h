// gpupd's persistent state: <state-dir>/partitions.json.
//
//   {"version":1,
//    "adapters":{"pocl0":{"luid":1234567}},          # LUIDs handed out, stable across restarts
//    "partitions":[<VmSpec>, ...]}                    # see control/protocol.h
//
// Written atomically (temporary file in the same directory, fsync, rename, fsync of the directory)
// so a crash leaves either the old or the new file. A file that exists but does not parse or check
// is never reset: loading fails with a message naming the file, and gpupd refuses to start.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "host/control/protocol.h"

namespace gpup::gpupd {

inline constexpr int kStateVersion = 1;

struct PersistentState {
  std::map<std::string, uint64_t> luids;       // adapter name -> LUID
  std::vector<control::VmSpec> partitions;     // ordered by name
  bool operator==(const PersistentState&) const = default;
};

control::json to_json(const PersistentState& s);
// source names the file in messages.
Result<PersistentState> state_from_json(const control::json& j, const std::string& source);

// A missing file is an empty state; anything unreadable or invalid is an error naming the file.
Result<PersistentState> load_state(const std::string& path);
Status save_state(const std::string& path, const PersistentState& s);

// Replaces path with contents atomically and durably.
Status write_file_atomic(const std::string& path, std::string_view contents, unsigned mode = 0640);

// The LUID guests see for an adapter: derived from its name (FNV-1a), so it is the same on every
// host with the same configuration, non-zero, below 2^63, and different from every LUID in taken.
uint64_t derive_luid(std::string_view adapter_name, const std::map<std::string, uint64_t>& taken);

}  // namespace gpup::gpupd
