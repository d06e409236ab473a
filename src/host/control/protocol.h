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
// SOCK_STREAM socketpair on fd 3. Every line on it is one of the records below, written by its
// to_json and read by its *_from_json, on both sides (gpupd/worker.cpp, vmwp/main.cpp, and the
// tests' fake_vmwp): a decoder takes a line only with every field of its type and range and no
// key it does not know.
//   gpupd -> worker
//     {"op":"configure","vm":<VmSpec>,"adapter":<AdapterSpec>,"endpoint":..,"log_level":..,
//      "tdr_delay_ms":N}                                         ConfigureMessage, the first line
//     {"op":"stats"|"update"|"shutdown","id":N[,"vm":<VmSpec>]}  WorkerRequest
//     {"answer":N,"ok":true,"granted":B,"hold":N,"borrowable":N[,"min":N,"max":N][,"error":..]}
//                                                                VramAnswer
//     {"sched":"grant"}, {"sched":"yield","after_us":N,"if_idle":B}   SchedNotice
//   worker -> gpupd
//     {"event":"ready","endpoint":..[,"pid":N]}, {"event":"error","message":..}
//                                                                ReadyEvent, ErrorEvent
//     {"reply":N,"ok":true[,"stats":<stats>]}, {"reply":N,"ok":false,"error":..}   WorkerReply
//     {"ask":N,"op":"vram"[,"need":N,"want":N]}                  VramAsk
//     {"sched":"want"}, {"sched":"release","busy_us":N,"more":B}  SchedRequest
//     {"event":"tdr","running_ms":N,"tdr_delay_ms":N,...}        TdrEvent, then it exits
//     {"event":"tdr","kind":"build","running_ms":N,"build_timeout_s":N,...}   (a build, the same)
// The worker answers configure with exactly one of ready (endpoint equal to the one it was given)
// or error (then exits; gpupd marks the VM failed). After ready, gpupd numbers its requests from 1
// and the worker replies to each once: stats with its statistics; update after
// pfnSetVirtualMachineData; shutdown, then it closes its guests and exits 0. The worker may ask for
// device memory above its min (each ask answered at once) and for device time (gpupd/vidsch.h).
// It must exit when fd 3 reaches EOF (gpupd died). Lines from the worker are capped at
// kMaxWorkerLine; a longer line, a line no decoder takes, one out of turn (an ask before ready, a
// second ready), a reply to an id never issued or a missed deadline counts against the worker
// (gpupd/worker.h: it is killed). No line from a worker names a partition or carries settings:
// gpupd applies each to that worker's own partition.
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
// Defaults and limits of a partition's device time and TDR, written here only: gpupd's config
// (gpupd/config.h), admission and the worker (vmwp/worker.h) take them from here.
// TDR: work running longer than the delay is reset; a partition reset more than the limit count of
// times within the window is marked removed until an operator resets it (gpup vm reset).
inline constexpr uint32_t kDefaultTdrDelayMs = 2000, kMinTdrDelayMs = 100, kMaxTdrDelayMs = 600000;
inline constexpr uint32_t kDefaultTdrLimitCount = 5, kDefaultTdrLimitWindowS = 60;

// A device program build (the KMD's pfnCreateAllocation of a program) running longer than a
// partition's build_timeout_s resets it as a TDR does: a compiler cannot be stopped midway, and the
// partition's other work waits behind the build. Generous by default: big kernels (hashcat's, a
// BLAS library's) take minutes to build on a CPU device.
inline constexpr uint32_t kDefaultBuildTimeoutS = 300, kMinBuildTimeoutS = 1, kMaxBuildTimeoutS = 3600;

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
  uint32_t build_timeout_s = kDefaultBuildTimeoutS;  // absent in JSON: the default
  bool operator==(const VmSpec&) const = default;
};
inline constexpr size_t kMaxAllowIds = 64;
json to_json(const VmSpec& vm);
// Strict: every field present with its type and range, min <= optimal <= max, valid names and GUID.
// Other keys are the caller's (the state file keeps a partition's resets beside these).
Result<VmSpec> vm_spec_from_json(const json& j, std::string_view context = "vm");
// The same, and no other key: a VmSpec on the worker channel (configure, update).
Result<VmSpec> exact_vm_spec_from_json(const json& j, std::string_view context = "vm");

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
// Also checks log_level is one of kLogLevels and vm.adapter names the adapter.
Result<ConfigureMessage> configure_from_json(const json& j);
inline constexpr std::array<std::string_view, 7> kLogLevels = {"trace", "debug", "info", "warning",
                                                               "error", "critical", "off"};

// --- The rest of the worker channel (see the top of this file). Decoders of these fail with
// GPUP_STATUS_PROTOCOL_ERROR and a message naming the field ("ask.need: missing").

// gpupd's requests after ready; vm with update only (the partition's new settings).
enum class WorkerOp { kStats, kUpdate, kShutdown };
const char* to_string(WorkerOp op);
std::optional<WorkerOp> worker_op_from_string(std::string_view op);
struct WorkerRequest {
  WorkerOp op = WorkerOp::kStats;
  uint64_t id = 0;  // from 1
  std::optional<VmSpec> vm;
  bool operator==(const WorkerRequest&) const = default;
};
json to_json(const WorkerRequest& m);
Result<WorkerRequest> worker_request_from_json(const json& j);

// The worker's reply to request id: ok (stats carries its statistics when it answers stats), or
// not, with why.
struct WorkerReply {
  uint64_t id = 0;
  bool ok = true;
  std::string error;          // !ok only; the encoder cuts it to kMaxMessageLength bytes
  std::optional<json> stats;  // decoded: what sanitize_worker_stats keeps
  bool operator==(const WorkerReply&) const = default;
};
json to_json(const WorkerReply& m);
// op: the request it answers, when known: an ok reply carries stats exactly when it answers stats.
Result<WorkerReply> worker_reply_from_json(const json& j, std::optional<WorkerOp> op = std::nullopt);

// The worker's answer to configure: ready to serve at endpoint (pid: its own, in its pid namespace;
// for logs), or why it cannot (then it exits).
struct ReadyEvent {
  std::string endpoint;
  std::optional<uint32_t> pid;
  bool operator==(const ReadyEvent&) const = default;
};
json to_json(const ReadyEvent& m);
Result<ReadyEvent> ready_event_from_json(const json& j);
struct ErrorEvent {
  std::string message;  // the encoder cuts it to kMaxMessageLength bytes
  bool operator==(const ErrorEvent&) const = default;
};
json to_json(const ErrorEvent& m);
Result<ErrorEvent> error_event_from_json(const json& j);

// The worker's TDR watchdog reset the partition (then the worker exits with kWorkerExitReset):
// device work ran running_ms, past tdr_delay_ms (kind work); or a program build ran running_ms,
// past the partition's build_timeout_s (kind build: "kind":"build" and "build_timeout_s" on the
// wire instead of "tdr_delay_ms"). Which context (work only), guest pid and program, when the
// worker could tell; guests_told false when they learn it only from the lost connection.
struct TdrEvent {
  enum class Kind { kWork, kBuild };
  uint64_t running_ms = 0;
  uint32_t tdr_delay_ms = kDefaultTdrDelayMs;  // kWork
  std::optional<uint32_t> context, pid;
  std::optional<std::string> process;  // at most kMaxProcessName bytes
  bool guests_told = true;             // on the wire only when false
  Kind kind = Kind::kWork;
  uint32_t build_timeout_s = 0;        // kBuild
  bool operator==(const TdrEvent&) const = default;
};
json to_json(const TdrEvent& m);
Result<TdrEvent> tdr_event_from_json(const json& j);

// Device memory above the partition's min (gpupd/vram_pool.h): the worker asks to hold want in
// all, at least need (need <= want), or, with query, only what it holds and could borrow now.
// Asks are numbered by the worker, from 1; gpupd answers each at once with what it holds now.
struct VramAsk {
  uint64_t id = 0;
  bool query = false;
  uint64_t need = 0, want = 0;  // not with query
  bool operator==(const VramAsk&) const = default;
};
json to_json(const VramAsk& m);
Result<VramAsk> vram_ask_from_json(const json& j);
struct VramAnswer {
  uint64_t id = 0;
  bool granted = false;  // hold covers need
  uint64_t hold = 0;     // what the partition holds now, its min included
  uint64_t borrowable = 0;
  std::optional<uint64_t> min, max;  // the partition's, when gpupd has an arbiter
  std::string why;                   // refused: the numbers ("error" on the wire, only when refused)
  bool operator==(const VramAnswer&) const = default;
};
json to_json(const VramAnswer& m);  // "ok":true always: a refusal is granted:false
Result<VramAnswer> vram_answer_from_json(const json& j);

// Device time (gpupd/vidsch.h has what they mean). From the worker: want, or release (busy_us:
// its device work in flight so far; more: work still waiting).
inline constexpr uint64_t kMaxBusyUs = UINT64_MAX / 1000;  // stays exact in nanoseconds
struct SchedRequest {
  enum class Kind { kWant, kRelease } kind = Kind::kWant;
  uint64_t busy_us = 0;  // release only
  bool more = false;     // release only
  bool operator==(const SchedRequest&) const = default;
};
json to_json(const SchedRequest& m);
Result<SchedRequest> sched_request_from_json(const json& j);
// From gpupd: grant, or yield once after_us after the grant have passed (if_idle: or as soon as
// the worker is idle).
inline constexpr uint64_t kMaxYieldAfterUs = 3600ull * 1000 * 1000;  // far above any quantum or cap
struct SchedNotice {
  enum class Kind { kGrant, kYield } kind = Kind::kGrant;
  uint64_t after_us = 0;  // yield only
  bool if_idle = false;   // yield only
  bool operator==(const SchedNotice&) const = default;
};
json to_json(const SchedNotice& m);
Result<SchedNotice> sched_notice_from_json(const json& j);

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
