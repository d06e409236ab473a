// The gpup operator CLI: shared pieces of its commands.
//
// Every command talks to gpupd over <runtime-dir>/gpupd.sock (control/protocol.h). Failures are
// thrown as CliError and printed by main as one line, "gpup: <message>", with exit status 1.
#pragma once
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace gpup::cli {

using nlohmann::json;

struct CliError : std::runtime_error {
  explicit CliError(const std::string& message, int exit_code = 1)
      : std::runtime_error(message), code(exit_code) {}
  int code;  // the process exit status
};

// Where the host lives: $GPUP_RUNTIME_DIR / $GPUP_STATE_DIR or /run/gpup, /var/lib/gpup.
struct Context {
  std::string runtime_dir;
  std::string state_dir;
  std::string socket() const;
  std::string log_file() const;
};
Context context_from_env();

// Sends one request to gpupd and returns its result; throws CliError with gpupd's message, or
// "gpupd is not running (no socket at ...)".
json call(const Context& ctx, const json& request, std::chrono::milliseconds timeout = std::chrono::seconds(30));

// An aligned text table: columns separated by two spaces, no trailing blanks.
class Table {
 public:
  explicit Table(std::vector<std::string> headers, std::vector<bool> right_aligned = {});
  void add(std::vector<std::string> row);
  std::string render() const;

 private:
  std::vector<std::string> headers_;
  std::vector<bool> right_;
  std::vector<std::vector<std::string>> rows_;
};

// Typed reads of gpupd's replies, tolerant of absent fields (gpupd is trusted, but an older or
// newer one may lack a field).
std::string str(const json& j, const char* key, const std::string& fallback = "");
uint64_t u64(const json& j, const char* key, uint64_t fallback = 0);
bool flag(const json& j, const char* key, bool fallback = false);
// "1h 2m 3s", "42s"
std::string format_duration(uint64_t seconds);
// "0x00001234abcd5678"
std::string format_luid(uint64_t luid);
// parse_size with the option named in the error.
uint64_t parse_size_option(const std::string& text, const std::string& option);
// The directory of the running executable.
std::string self_dir();

// Commands. Each prints its output and returns the process exit status.
int cmd_host_start(const Context& ctx, const std::string& config, const std::string& vmwp, bool foreground);
int cmd_host_stop(const Context& ctx);
int cmd_host_status(const Context& ctx, bool as_json);
int cmd_adapters(const Context& ctx, bool as_json);

struct VmOptions {
  std::string adapter;
  std::string min_vram, max_vram, optimal_vram;  // as typed; empty when not given
  int64_t compute_weight = -1;                   // -1 when not given
  int64_t max_compute = -1;
  int64_t build_timeout = -1;                    // seconds
  bool secure = false;
  // --allow-user / --allow-group: names or numeric ids; "none" clears the list. Unset: not given.
  std::vector<std::string> allow_users, allow_groups;
};
int cmd_vm_add(const Context& ctx, const std::string& name, const VmOptions& o, bool as_json);
int cmd_vm_set(const Context& ctx, const std::string& name, const VmOptions& o, bool as_json);
int cmd_vm_list(const Context& ctx, bool as_json);
int cmd_vm_show(const Context& ctx, const std::string& name, bool as_json);
int cmd_vm_remove(const Context& ctx, const std::string& name);
int cmd_vm_start(const Context& ctx, const std::string& name, bool as_json);
// Forgets a partition's TDR/crash resets and starts it again (also one marked removed).
int cmd_vm_reset(const Context& ctx, const std::string& name, bool as_json);
struct RunOptions {
  bool sandbox = true;             // --no-sandbox: a plain child process (debugging)
  bool network = false;            // --network: keep the host's network
  bool allow_unsandboxed = false;  // --allow-unsandboxed: run unconfined if namespaces are refused
};
int cmd_run(const Context& ctx, const std::string& vm, const std::vector<std::string>& command,
            const RunOptions& opts = {});

}  // namespace gpup::cli
