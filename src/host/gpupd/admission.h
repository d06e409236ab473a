// Admission control for partitions (VidMm's part of gpupd), as pure functions over plain data.
//
// Semantics gpup gives the Hyper-V partition settings:
//   min_vram      reserved for the partition when it is admitted: the mins of all partitions on an
//                 adapter never exceed its memory (GPUPDDI_DEVICEINFO.GlobalMemSize);
//   max_vram      hard cap on what the partition's guests may allocate (default: all of it);
//   optimal_vram  the target the KMD and scheduler aim for (default: max); min <= optimal <= max;
//   compute_weight relative share of device time, 1..10000 (default 100);
//   max_compute   cap on the share of device time in percent, 1..100 (default 100);
//   secure        a secure VM: needs a KMD with IoMmuSecureModeSupported;
//   build_timeout_s  a device program build running longer is reset, 1..3600 (default 300).
// Every refusal says which numbers did not fit, with units.
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"
#include "host/control/protocol.h"
#include "host/gpupd/adapter.h"

namespace gpup::gpupd {

// A vm.add or vm.set request before admission; absent fields take defaults (add) or keep their
// current values (set).
struct VmRequest {
  std::string name;
  std::optional<std::string> adapter;
  std::optional<uint64_t> min_vram, max_vram, optimal_vram;
  std::optional<uint32_t> compute_weight, max_compute;
  std::optional<bool> secure;
  std::optional<uint32_t> build_timeout_s;
  std::optional<std::vector<uint32_t>> allow_users, allow_groups;  // replace the lists when given
};

// Parses the "vm" object of a request. Sizes are byte counts or strings with units ("256MiB",
// "1.5 GiB"). for_add: "name" is required; otherwise "name" and "adapter" are not accepted.
Result<VmRequest> parse_vm_request(const control::json& vm, bool for_add);

// Sum of min_vram of the partitions on adapter, leaving out except_vm.
uint64_t reserved_vram(const std::vector<control::VmSpec>& vms, std::string_view adapter,
                       std::string_view except_vm = {});

// Decides a new partition: picks the adapter (the named one; else the only one configured; else
// the first partitionable one), fills defaults and checks it against the adapter and the others.
Result<control::VmSpec> admit_new_vm(const VmRequest& req, const std::vector<const AdapterInfo*>& adapters,
                                     const std::vector<control::VmSpec>& existing, std::string guid);

// Decides new settings for an existing partition. When no optimal is given, an optimal that was at
// the old max follows the new max, and optimal is kept within the new [min, max].
Result<control::VmSpec> admit_vm_change(const control::VmSpec& current, const VmRequest& change,
                                        const AdapterInfo* adapter, const std::vector<control::VmSpec>& existing);

}  // namespace gpup::gpupd
