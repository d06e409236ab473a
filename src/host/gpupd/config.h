// gpupd's configuration file (TOML).
//
//   # One table per adapter gpupd should manage, in the order adapters are reported.
//   [[adapter]]
//   name = "pocl0"        # required: the operator's name for it (1-64 of [A-Za-z0-9_.-], unique)
//   kmd = "opencl"        # required: KMD plugin name ("opencl" -> libgpup_kmd_opencl.so) or a path
//   [adapter.config]      # optional: handed to the KMD's pfnStartAdapter as "key=value" lines;
//   platform = "Portable Computing Language"   # values are strings, integers or booleans
//   device = "0"
//
//   # optional, top level: added to a partition's max VRAM to give its worker's memory limit
//   # (cgroup.h); an integer number of bytes or a size with a unit. Default 512 MiB (4 GiB in
//   # sanitizer builds).
//   worker_memory_overhead = "512MiB"
//
//   # optional, top level: device time (vidsch.h) and TDR. Work running longer than tdr_delay_ms is
//   # reset; a partition reset tdr_limit_count times within tdr_limit_window_s is marked removed
//   # until `gpup vm reset`. A partition holds the device for scheduler_quantum_ms while others wait.
//   tdr_delay_ms = 2000          # 100 .. 600000
//   tdr_limit_count = 5          # 1 .. 1000
//   tdr_limit_window_s = 60      # 1 .. 86400
//   scheduler_quantum_ms = 10    # 1 .. 1000
//
//   # optional, top level: besides root, the members of this group (as their gid or a
//   # supplementary group) may use gpupd.sock, which is then 0660 and owned by the group (daemon.h).
//   # Resolved when the file is loaded; a group that does not exist is an error.
//   admin_group = "gpup"
//
//   # optional, top level: the unprivileged uids and gids gpupd gives the partitions' workers, one
//   # per partition: [worker_id_base, worker_id_base + worker_id_count). The base is above the
//   # 16-bit range so the ids never meet system users or nobody (65534); the range ends before
//   # 4294967294 ((uid_t)-2) and 4294967295 ((uid_t)-1, "no change" to setresuid).
//   worker_id_base = 1900000000  # 65537 .. 4294967293
//   worker_id_count = 65536      # 1 .. 16777216
//
// No other keys are accepted anywhere, so a typo is an error rather than a silently ignored
// setting. Without a file gpupd uses the built-in default: one adapter "pocl0", kmd "opencl",
// empty config. Errors name the file, the key and the problem, e.g.
//   "/etc/gpup/gpupd.toml: adapter[1].kmd: expected a string, got integer (line 7)".
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/result.h"
#include "host/control/protocol.h"

namespace gpup::gpupd {

struct AdapterConfig {
  std::string name;
  std::string kmd;
  std::vector<std::pair<std::string, std::string>> config;  // in file order

  // "key=value\n" per entry, as pfnStartAdapter takes it.
  std::string config_text() const;
};

// What PoCL and its in-process LLVM need beside the partition's own memory: ~200-300 MiB measured
// with the test programs, with room for larger kernels and their compiler state. A sanitizer build
// (GPUP_SANITIZE, GPUP_FUZZ: GPUP_SANITIZER_BUILD) multiplies that: its shadow memory and quarantine took an ASan worker
// compiling a kernel past 780 MiB resident, so its default is 4 GiB.
#ifdef GPUP_SANITIZER_BUILD
inline constexpr uint64_t kDefaultWorkerMemoryOverhead = 4ull << 30;
#else
inline constexpr uint64_t kDefaultWorkerMemoryOverhead = 512ull << 20;
#endif
inline constexpr uint64_t kMinWorkerMemoryOverhead = 64ull << 20;
inline constexpr uint64_t kMaxWorkerMemoryOverhead = 1ull << 40;

inline constexpr uint32_t kDefaultWorkerIdBase = 1900000000, kDefaultWorkerIdCount = 65536;
// Bounds of the workers' id range (Config::worker_id_base, worker_id_count).
inline constexpr uint32_t kMinWorkerIdBase = 65536 + 1;
inline constexpr uint32_t kMaxWorkerIdCount = 16777216;
inline constexpr uint64_t kWorkerIdLimit = 4294967294;  // (uid_t)-2: the range ends at or before it

struct Config {
  std::string source;  // the file it came from, or "<built-in default>"
  std::vector<AdapterConfig> adapters;
  uint64_t worker_memory_overhead = kDefaultWorkerMemoryOverhead;
  // VidSch and TDR (vidsch.h, worker.h).
  uint32_t tdr_delay_ms = control::kDefaultTdrDelayMs;
  uint32_t tdr_limit_count = control::kDefaultTdrLimitCount;
  uint32_t tdr_limit_window_s = control::kDefaultTdrLimitWindowS;
  uint32_t scheduler_quantum_ms = 10;
  // Who may use gpupd.sock besides root (daemon.h): the group's name, and its gid once resolved.
  std::string admin_group;
  std::optional<gid_t> admin_gid;
  // The workers' uids and gids: [worker_id_base, worker_id_base + worker_id_count).
  uint32_t worker_id_base = kDefaultWorkerIdBase;
  uint32_t worker_id_count = kDefaultWorkerIdCount;
};

// A group's gid by name: nullopt when there is no such group, an error when the group database
// could not be read. lookup_group asks the system (getgrnam_r); tests pass their own.
using GroupLookup = std::function<Result<std::optional<gid_t>>(const std::string& name)>;
Result<std::optional<gid_t>> lookup_group(const std::string& name);

Config default_config();
// Parses TOML text; source names it in error messages. admin_group is resolved with lookup.
Result<Config> parse_config(std::string_view toml_text, const std::string& source,
                            const GroupLookup& lookup = lookup_group);
Result<Config> load_config(const std::string& path, const GroupLookup& lookup = lookup_group);

}  // namespace gpup::gpupd
