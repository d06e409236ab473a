// The gpup control protocol: gpupd's operator socket and the gpupd <-> gpup-vmwp channel.
//
// Both are JSON lines (json_lines.h). This header is the one definition of the records that cross
// them, so gpupd, the CLI and the worker encode and decode the same fields.
//
// Operator socket: <runtime-dir>/gpupd.sock (SOCK_STREAM). A client writes a request line
//   {"op":"<op>", ...args}
// and reads one reply line
//   {"ok":true,"result":<value>}  or  {"ok":false,"error":"<message>"}
// then may send another request or close. Ops and their arguments are listed in
// src/host/gpupd/daemon.cpp (Daemon::dispatch).
//
// Worker channel: gpupd starts `gpup-vmwp --vm NAME --control-fd 3` with one end of a
// SOCK_STREAM socketpair on fd 3, and writes
//   {"op":"configure","vm":<VmSpec>,"adapter":<AdapterSpec>,"endpoint":"<path>","log_level":"info"}
// The worker answers exactly one of
//   {"event":"ready","endpoint":"<path>"}       (endpoint must equal the one it was given)
//   {"event":"error","message":"<why>"}        (then exits; gpupd marks the VM failed)
// After ready, gpupd sends requests with a numeric "id" (1, 2, ...), one reply each:
//   {"op":"stats","id":N}                 -> {"reply":N,"ok":true,"stats":<WorkerStats>}
//   {"op":"update","id":N,"vm":<VmSpec>}  -> {"reply":N,"ok":true}  (after pfnSetVirtualMachineData)
//   {"op":"shutdown","id":N}              -> {"reply":N,"ok":true}, then the worker closes its guests
//                                            and exits 0
// and any request may fail with {"reply":N,"ok":false,"error":"<why>"}. The worker may ask gpupd for
// device memory above its min with {"ask":N,...} lines, answered by {"answer":N,...} at once
// (gpupd/worker.h). The worker must exit when fd 3 reaches EOF (gpupd died). Lines from the worker are capped at kMaxWorkerLine; a longer or
// malformed line, a reply to an unknown id or a missed deadline counts against the worker (see
// gpupd's worker.h for what gpupd does then).
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "host/control/json_lines.h"

namespace gpup::control {

inline constexpr const char* kSocketName = "gpupd.sock";
inline constexpr const char* kPidFileName = "gpupd.pid";
inline constexpr const char* kLogFileName = "gpupd.log";
inline constexpr const char* kStateFileName = "partitions.json";
inline constexpr const char* kVmsDirName = "vms";
inline constexpr const char* kEndpointName = "vrd.sock";

inline constexpr size_t kMaxRequestLine = 64 * 1024;   // operator -> gpupd
inline constexpr size_t kMaxReplyLine = 16u << 20;     // gpupd -> operator
inline constexpr size_t kMaxWorkerLine = 1u << 20;     // worker -> gpupd
inline constexpr size_t kMaxToWorkerLine = 256 * 1024; // gpupd -> worker (configure carries the KMD config)

inline constexpr size_t kMaxVmNameLength = 64;
inline constexpr size_t kMaxAdapterNameLength = 64;
inline constexpr size_t kMaxPathLength = 4096;
inline constexpr size_t kMaxMessageLength = 4096;      // error texts from a peer
inline constexpr size_t kMaxKmdConfigLength = 64 * 1024;
inline constexpr size_t kMaxProcessName = 260;         // as the Windows process-name limit
inline constexpr size_t kMaxStatsProcesses = 4096;
inline constexpr size_t kUnixPathMax = 107;            // sockaddr_un.sun_path minus the NUL

// A worker that reset its partition after a TDR (gpupd/vidsch.h) exits with this status, after its
// {"event":"tdr",...} line.
inline constexpr int kWorkerExitReset = 75;
// TDR: work running longer than the delay is reset; a partition reset more than the limit count of
// times within the window is marked removed until an operator resets it (gpup vm reset).
inline constexpr uint32_t kDefaultTdrDelayMs = 2000, kMinTdrDelayMs = 100, kMaxTdrDelayMs = 600000;
inline constexpr uint32_t kDefaultTdrLimitCount = 5, kDefaultTdrLimitWindowS = 60;

inline constexpr uint32_t kMinComputeWeight = 1, kMaxComputeWeight = 10000, kDefaultComputeWeight = 100;
inline constexpr uint32_t kMinComputePercent = 1, kMaxComputePercent = 100;

// $GPUP_RUNTIME_DIR or /run/gpup; $GPUP_STATE_DIR or /var/lib/gpup.
std::string default_runtime_dir();
std::string default_state_dir();
std::string socket_path(std::string_view runtime_dir);
std::string pid_file_path(std::string_view runtime_dir);
std::string vm_dir(std::string_view runtime_dir, std::string_view vm);
std::string vm_endpoint(std::string_view runtime_dir, std::string_view vm);

// Names of VMs and adapters: 1-64 characters of [A-Za-z0-9_.-], the first a letter or digit
// (they become directory names and command-line arguments). what is "vm" or "adapter".
Status validate_name(std::string_view name, std::string_view what);

// 16 random bytes as a version-4 GUID, "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx" (lower case).
std::string new_guid();
// Checks the canonical text form; returns the 16 bytes in text order.
std::optional<std::array<uint8_t, 16>> parse_guid(std::string_view text);

// One partition's settings, as persisted, shown and sent to its worker.
struct VmSpec {
  std::string name;
  std::string guid;
  std::string adapter;
  uint64_t min_vram = 0;
  uint64_t max_vram = 0;
  uint64_t optimal_vram = 0;
  uint32_t compute_weight = kDefaultComputeWeight;
  uint32_t max_compute = kMaxComputePercent;
  bool secure = false;
  // Who may connect to its VRD endpoint besides root (uids, gids); at most kMaxAllowIds each.
  std::vector<uint32_t> allow_users, allow_groups;
  bool operator==(const VmSpec&) const = default;
};
inline constexpr size_t kMaxAllowIds = 64;
json to_json(const VmSpec& vm);
// Strict: every field present with its type and range, min <= optimal <= max, valid names and GUID.
Result<VmSpec> vm_spec_from_json(const json& j, std::string_view context = "vm");

// The adapter a worker drives.
struct AdapterSpec {
  std::string name;
  uint64_t luid = 0;
  std::string kmd;     // absolute path of the KMD plugin
  std::string config;  // "key=value\n" lines for pfnStartAdapter
  bool operator==(const AdapterSpec&) const = default;
};
json to_json(const AdapterSpec& a);
Result<AdapterSpec> adapter_spec_from_json(const json& j, std::string_view context = "adapter");

struct ConfigureMessage {
  VmSpec vm;
  AdapterSpec adapter;
  std::string endpoint;
  std::string log_level;
  uint32_t tdr_delay_ms = kDefaultTdrDelayMs;
  bool operator==(const ConfigureMessage&) const = default;
};
json to_json(const ConfigureMessage& m);  // includes "op":"configure"
Result<ConfigureMessage> configure_from_json(const json& j);

// A guest connection gpupd accepted on a partition's VRD endpoint and hands to its worker: one
// SOCK_SEQPACKET message on the worker's fd kWorkerGuestFd, these bytes (little-endian) with the
// socket attached (SCM_RIGHTS). The ids are the host's, as SO_PEERCRED gave them to gpupd.
inline constexpr int kWorkerControlFd = 3, kWorkerGuestFd = 4;
struct GuestHandoff {
  int32_t pid = 0;
  uint32_t uid = 0, gid = 0;
};
inline constexpr size_t kGuestHandoffSize = 12;
void encode(const GuestHandoff& h, uint8_t out[kGuestHandoffSize]);
GuestHandoff decode_guest_handoff(const uint8_t in[kGuestHandoffSize]);

// Checks a worker's stats object and returns a copy holding only the known, well-typed fields:
//   {"vram_used":N,"vram_max":N,"vram_min":N,"vram_held":N,"vram_borrowed":N,"vram_refused":N,
//    "totals":{"processes":N,"devices":N,"contexts":N,"allocations":N,"sync_objects":N},
//    "processes":[{"pid":N,"name":"...","vram_used":N,"devices":N,"contexts":N,
//                  "allocations":N,"sync_objects":N}, ...]}
// vram_used and vram_max are required; the other vram_ fields and the counters are optional; at most kMaxStatsProcesses
// processes, names at most kMaxProcessName bytes. Other counters (snake_case keys, at most 32
// characters, non-negative integer values; up to 32 per object) are kept, e.g. "submissions";
// anything else is dropped.
Result<json> sanitize_worker_stats(const json& stats);

}  // namespace gpup::control
