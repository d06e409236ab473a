// gpupd: the partition manager. Owns the adapters (adapter-level KMD DDIs only), the persistent
// partitions, one supervised gpup-vmwp per partition, and the operator socket.
//
// Runtime directory (--runtime-dir):  gpupd.sock (0600, or 0660 and the admin group's; below),
//                                     gpupd.pid (flock'ed while gpupd runs),
//                                     vms/<vm>/vrd.sock (each worker's VRD endpoint).
// State directory (--state-dir):      partitions.json (state.h): the partitions, and each one's
//                                     reset history and whether it is removed (quarantined), written
//                                     whenever a worker counts a reset, on removal and on vm.reset.
//
// Who may use gpupd.sock: root, and the members of the config's admin_group (its gid or one of
// their supplementary groups). The file mode keeps others from connecting; gpupd also checks every
// connection's credentials as the kernel recorded them at connect() (SO_PEERCRED, SO_PEERGROUPS),
// so a socket mode widened by mistake, a process with CAP_DAC_OVERRIDE or a file-system uid that
// differs from its uid still gets no further. A refused connection gets one reply,
// {"ok":false,"error":"permission denied: ..."}, and is closed; it is logged at warn. Requests
// that change state are logged at info with who sent them.
//
// Everything after create() runs on one thread in one event loop: the operator socket, worker
// control channels, worker pidfds, a signalfd (SIGTERM/SIGINT stop gpupd cleanly) and timers.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/result.h"
#include "host/control/protocol.h"
#include "host/gpupd/adapter.h"
#include "host/gpupd/config.h"
#include "host/gpupd/peer.h"
#include "host/gpupd/event_loop.h"
#include "host/gpupd/state.h"
#include "host/gpupd/worker.h"

namespace gpup::gpupd {

inline constexpr const char* kVersion = GPUP_VERSION;

struct DaemonOptions {
  Config config;
  std::string runtime_dir;
  std::string state_dir;
  WorkerOptions worker;  // worker.vmwp_path: the gpup-vmwp to run
  std::chrono::milliseconds client_timeout{10000};
  size_t max_clients = 64;
};

// Empty when p may use the operator socket; otherwise the reply's error, "permission denied: ...".
std::string operator_refusal(const Peer& p, const Config& config);

// Blocks SIGTERM, SIGINT and SIGHUP (gpupd takes them from a signalfd) and ignores SIGPIPE. Call it
// before any thread exists (KMD plugins may start threads) so no thread can take those signals.
void block_daemon_signals();

// <runtime-dir>/gpupd.pid, locked with flock for the daemon's lifetime and removed at exit.
class PidFile {
 public:
  // Fails with "another gpupd (pid N) is running on runtime dir D" while one holds the lock.
  static Result<PidFile> acquire(const std::string& path);
  PidFile() = default;
  PidFile(PidFile&&) = default;
  PidFile& operator=(PidFile&&) = default;
  ~PidFile();

 private:
  std::string path_;
  UniqueFd fd_;
};

class Daemon {
 public:
  // Takes the pid file, loads the state (refusing a corrupt one), starts the adapters, listens on
  // the operator socket and starts a worker for every persisted partition, except those persisted
  // as removed: they stay removed, with their reset history, until vm.reset.
  static Result<std::unique_ptr<Daemon>> create(DaemonOptions opts);
  ~Daemon();

  // Serves until a shutdown request or SIGTERM/SIGINT; then stops every worker (SIGKILL for those
  // that do not stop in time), removes the socket and returns the exit code.
  int run();

 private:
  struct Vm {
    control::VmSpec spec;
    std::unique_ptr<Worker> worker;
    bool busy = false;  // a vm.set or vm.remove is in progress
    ResetHistory resets;  // as loaded; handed to the worker when it is made, then the worker's
  };
  struct Client {
    UniqueFd fd;
    control::LineReader in{control::kMaxRequestLine};
    std::string out;
    EventLoop::TimerId deadline = 0;
    Peer peer;
    bool refused = false;  // refused at accept: only its input is drained until it closes
    bool busy = false;     // a request is being answered
    bool eof = false;      // the client has shut down its writing side
  };
  using Reply = std::function<void(Result<control::json>)>;

  explicit Daemon(DaemonOptions opts);
  Status init();

  // operator socket
  void on_accept();
  void on_client(uint64_t id, uint32_t events);
  void next_request(uint64_t id);
  void close_client(uint64_t id);
  void arm_client_deadline(uint64_t id);
  Reply replier(uint64_t id);
  void send_reply(uint64_t id, Result<control::json> r);
  void refuse_client(uint64_t id, const std::string& why);
  void drain_refused(uint64_t id);
  void dispatch(const Peer& peer, const control::json& req, Reply reply);

  // ops
  control::json status_json() const;
  control::json adapters_json() const;
  control::json vm_json(const Vm& vm) const;
  void op_vm_add(const control::json& req, Reply reply);
  void op_vm_show(const control::json& req, Reply reply);
  void op_vm_set(const control::json& req, Reply reply);
  void op_vm_remove(const control::json& req, Reply reply);
  void op_vm_start(const control::json& req, Reply reply);  // also vm.reset

  // partitions and workers
  const AdapterInfo* find_adapter(const std::string& name) const;
  std::vector<control::VmSpec> specs() const;
  // Writes the state file: these partitions, with the reset history of each.
  Status persist(const std::vector<control::VmSpec>& specs);
  Result<control::ConfigureMessage> configure_message(const std::string& vm);
  // The partition's worker, made (with its persisted reset history) on first use.
  Worker& ensure_worker(Vm& vm);
  void start_worker(Vm& vm);

  void on_signal();
  void begin_shutdown(const std::string& why);
  void finish_shutdown();

  DaemonOptions opts_;
  EventLoop loop_;
  PidFile pidfile_;
  std::string socket_path_;
  std::string state_path_;
  UniqueFd listen_fd_;
  UniqueFd signal_fd_;
  std::vector<Adapter> adapters_;
  std::map<std::string, uint64_t> luids_;
  std::map<std::string, Vm> vms_;
  std::map<uint64_t, Client> clients_;
  uint64_t next_client_ = 1;
  std::chrono::steady_clock::time_point started_;
  bool shutting_down_ = false;
  size_t workers_stopping_ = 0;
  EventLoop::TimerId shutdown_timer_ = 0;
  EventLoop::TimerId vidsch_timer_ = 0;
};

}  // namespace gpup::gpupd
