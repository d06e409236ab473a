// The device-memory arbiter of gpupd (VidMm's minimum guarantee), as plain logic.
//
// Every partition may use its min_vram without asking: admission keeps the mins of an adapter's
// partitions within its memory. Above its min a worker must hold a grant from gpupd. gpupd keeps,
// per running worker, the absolute amount it holds ("hold", min included) and keeps, per adapter,
//
//     sum over its partitions of max(min_i, hold_i)  <=  the adapter's total memory
//
// so memory one partition borrows is never memory another one was promised. A partition that is
// not running holds exactly its min. A worker asks for a new hold (need: the least that lets its
// allocation proceed; want: what it would like, its allocation rounded up to a granule); it gets
// as much of want as fits, or nothing when even need does not fit, and never more than its max.
// Asking for less returns memory. Everything a worker held returns when it exits (release_all).
//
// The partitions' settings are read from gpupd (specs_fn) on every call, so `vm set`, `vm add`
// and `vm remove` need no bookkeeping here. When a running partition's min is lowered, what its
// worker may still be using under the old min stays held for it until the worker gives it back
// (the worker does the same on its side), so lowering a min never lends out memory in use.
// Raising a min, or adding a partition, must fit what the others hold now: check_min().
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/result.h"
#include "host/control/protocol.h"

namespace gpup::gpupd {

class VramArbiter {
 public:
  using SpecsFn = std::function<std::vector<control::VmSpec>()>;
  using TotalFn = std::function<uint64_t(const std::string& adapter)>;  // 0: unknown adapter
  VramArbiter(SpecsFn specs, TotalFn total);

  struct Answer {
    bool granted = false;  // the hold covers need
    uint64_t hold = 0;     // what the partition holds now (min included)
    uint64_t min = 0, max = 0;
    uint64_t borrowable = 0;  // what it could add to its hold right now
    std::string why;          // when not granted: the numbers
  };
  // A worker of vm asks to hold `want` bytes in all, at least `need` (need <= want). Asking below
  // the current hold releases the difference (down to the min, never below).
  Answer request(const std::string& vm, uint64_t need, uint64_t want);
  // What vm holds and could borrow, without changing anything.
  Answer query(const std::string& vm);
  // The worker of vm runs (from then on a lowered min is tracked, see above) / is gone: it holds
  // its min again.
  void attach(const std::string& vm);
  void release_all(const std::string& vm);

  // Whether vm (new, or existing with a new min) could have `min` on adapter given what the
  // other partitions hold now. The error names the numbers.
  Status check_min(const std::string& vm, const std::string& adapter, uint64_t min);

  // max(min, hold) - min for vm: what it borrows now.
  uint64_t borrowed(const std::string& vm);
  // Sum of borrowed over the partitions of adapter.
  uint64_t borrowed_on(const std::string& adapter);

 private:
  struct Held {
    uint64_t hold = 0;      // absolute, may be below the min (then the min counts)
    uint64_t last_min = 0;  // the min this was last seen with
  };
  // Fresh settings; applies lowered mins (see above). Returns the specs.
  std::vector<control::VmSpec> sync();
  static uint64_t effective(const control::VmSpec& vm, const std::map<std::string, Held>& held);
  // Sum of effective holds on adapter, leaving out except_vm.
  uint64_t in_use(const std::vector<control::VmSpec>& specs, const std::string& adapter,
                  const std::string& except_vm) const;
  Answer answer_for(const std::vector<control::VmSpec>& specs, const control::VmSpec& vm) const;

  SpecsFn specs_fn_;
  TotalFn total_fn_;
  std::map<std::string, Held> held_;  // partitions with a running worker
};

}  // namespace gpup::gpupd
