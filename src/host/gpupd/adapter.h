// An adapter as gpupd manages it: the KMD loaded in gpupd for adapter-level DDIs only
// (pfnStartAdapter, pfnQueryAdapterInfo, pfnStopAdapter), and what gpupd learnt from it.
//
// gpupd never runs guest work: device work happens in each VM's gpup-vmwp, which loads the same KMD
// itself. A KMD that fails to load or start leaves the adapter "failed" with the reason; gpupd keeps
// running and reports it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "host/gpupd/config.h"

namespace gpup::gpupd {

enum class AdapterState { kReady, kFailed };
const char* to_string(AdapterState s);

struct AdapterInfo {
  std::string name;
  uint64_t luid = 0;
  std::string kmd;          // as configured ("opencl" or a path)
  std::string kmd_path;     // the plugin file actually loaded (absolute), empty if it failed to load
  std::string config_text;  // "key=value\n" lines for pfnStartAdapter
  AdapterState state = AdapterState::kFailed;
  std::string error;        // why it failed

  std::string driver_name;  // GPUPDDI_DRIVER_FUNCS.DriverName
  std::string device_name, device_vendor, device_version, platform;
  uint64_t total_vram = 0;  // GPUPDDI_DEVICEINFO.GlobalMemSize
  uint32_t compute_units = 0;
  bool paravirtualization = false;  // DRIVERCAPS.MemoryManagementCaps.ParavirtualizationSupported
  bool secure_capable = false;      // ... IoMmuSecureModeSupported
  bool live_migration = false;      // GPUPCAPS.LiveMigration
  std::string sandbox_needs;        // GPUPDDI_QAITYPE_SANDBOXNEEDS (jail.h parses it)

  bool partitionable() const { return state == AdapterState::kReady && paravirtualization; }
  // Why vm.add must refuse this adapter; empty when partitionable.
  std::string not_partitionable_reason() const;
};

// Keeps a started KMD adapter alive; destroying it calls pfnStopAdapter and unloads the plugin.
class AdapterRuntime {
 public:
  virtual ~AdapterRuntime() = default;
};

struct Adapter {
  AdapterInfo info;
  std::unique_ptr<AdapterRuntime> runtime;  // null when failed
};

// Loads the KMD, starts the adapter with its config and queries its capabilities. Never fails as a
// call: a problem yields an adapter in state kFailed with error set.
Adapter open_adapter(const AdapterConfig& cfg, uint64_t luid);

}  // namespace gpup::gpupd
