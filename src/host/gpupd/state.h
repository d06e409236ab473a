// gpupd's persistent state: <state-dir>/partitions.json.
//
//   {"version":1,
//    "adapters":{"pocl0":{"luid":1234567}},          # LUIDs handed out, stable across restarts
//    "partitions":[<VmSpec>, ...]}                    # see control/protocol.h
//
// A partition that was ever reset (worker.h: TDR, or a worker ended by a fault signal) also carries
//   "resets":{"total":N,                  # resets counted since it was added
//             "last":"why",               # the last reset's reason
//             "times":[S, ...],           # wall-clock seconds since the epoch of those still within
//                                         # tdr_limit_window when written, oldest first
//             "removed":"why"}            # only while it is removed (quarantined): not started
//                                         # until `gpup vm reset`
// so a restarted gpupd neither starts a quarantined partition nor forgets resets that count toward
// the limit. Files without "resets" (older gpupd) load as partitions with no history.
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

// Reasons are cut to this many bytes when written and refused above it when read.
inline constexpr size_t kMaxResetReasonLength = 2048;
// Reset times must lie in 1 .. this (2200-01-01T00:00:00Z): far enough for any real clock, and
// within what system_clock's nanoseconds can hold.
inline constexpr uint64_t kMaxResetTime = 7258118400;

// One partition's reset history as kept in the file (worker.h turns it into steady-clock times).
struct ResetHistory {
  uint64_t total = 0;
  std::string last;             // the last reset's reason
  std::vector<uint64_t> times;  // seconds since the epoch, oldest first, within the window when written
  std::string removed;          // why the partition is removed; empty: it is not
  bool empty() const { return total == 0 && last.empty() && times.empty() && removed.empty(); }
  bool operator==(const ResetHistory&) const = default;
};

struct PersistentState {
  std::map<std::string, uint64_t> luids;       // adapter name -> LUID
  std::vector<control::VmSpec> partitions;     // ordered by name
  std::map<std::string, ResetHistory> resets;  // partition name -> its history; none: no resets
  bool operator==(const PersistentState&) const = default;
};

// Histories of partitions not in s.partitions, and empty ones, are not written.
control::json to_json(const PersistentState& s);
// source names the file in messages. A partition may carry at most 2 * tdr_limit_count reset times
// (gpupd keeps at most tdr_limit_count; the slack lets the limit be lowered a little).
Result<PersistentState> state_from_json(const control::json& j, const std::string& source,
                                        uint32_t tdr_limit_count = control::kDefaultTdrLimitCount);

// A missing file is an empty state; anything unreadable or invalid is an error naming the file.
Result<PersistentState> load_state(const std::string& path, uint32_t tdr_limit_count = control::kDefaultTdrLimitCount);
Status save_state(const std::string& path, const PersistentState& s);

// Replaces path with contents atomically and durably.
Status write_file_atomic(const std::string& path, std::string_view contents, unsigned mode = 0640);

// The LUID guests see for an adapter: derived from its name (FNV-1a), so it is the same on every
// host with the same configuration, non-zero, below 2^63, and different from every LUID in taken.
uint64_t derive_luid(std::string_view adapter_name, const std::map<std::string, uint64_t>& taken);

}  // namespace gpup::gpupd
