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
// No other keys are accepted anywhere, so a typo is an error rather than a silently ignored
// setting. Without a file gpupd uses the built-in default: one adapter "pocl0", kmd "opencl",
// empty config. Errors name the file, the key and the problem, e.g.
//   "/etc/gpup/gpupd.toml: adapter[1].kmd: expected a string, got integer (line 7)".
#pragma once
#include <cstdint>
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

struct Config {
  std::string source;  // the file it came from, or "<built-in default>"
  std::vector<AdapterConfig> adapters;
  uint64_t worker_memory_overhead = kDefaultWorkerMemoryOverhead;
  // VidSch and TDR (vidsch.h, worker.h).
  uint32_t tdr_delay_ms = control::kDefaultTdrDelayMs;
  uint32_t tdr_limit_count = control::kDefaultTdrLimitCount;
  uint32_t tdr_limit_window_s = control::kDefaultTdrLimitWindowS;
  uint32_t scheduler_quantum_ms = 10;
};

Config default_config();
// Parses TOML text; source names it in error messages.
Result<Config> parse_config(std::string_view toml_text, const std::string& source);
Result<Config> load_config(const std::string& path);

}  // namespace gpup::gpupd
