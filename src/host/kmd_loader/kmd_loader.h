// Loading KMD plugins (gpup/ddi.h) and asking a started adapter what it is.
//
// Ownership and threads
//   A Driver is one dlopen'ed plugin with its filled GPUPDDI_DRIVER_FUNCS. It is shared
//   (std::shared_ptr) by everything that calls into it and dlcloses the plugin when the last
//   reference goes. Whoever started adapters must stop them (pfnStopAdapter) before dropping the
//   last reference: a plugin's threads must not outlive its code. (kmd_opencl is linked
//   -z nodelete and never unmapped; the mock is.)
//   A plugin keeps the callbacks of its last driver entry, process-wide. So one process holds at
//   most one Driver per plugin file: load() of a file already loaded returns the same Driver
//   when the callbacks are identical and refuses (ALREADY_EXISTS) when they differ.
//   Driver's accessors are immutable and safe from any thread; load() is thread-safe.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/result.h"
#include "gpup/ddi.h"

namespace gpup::kmd {

class Driver {
 public:
  // name_or_path: a path containing '/' is used as it is; a short name such as "opencl" or
  // "mock" is the file libgpup_kmd_<name>.so, searched in kmd_search_dirs() order.
  // Calls GpupKmdDriverEntry with a copy of callbacks that the Driver keeps alive, then checks
  // the DDI major version, every table's struct_size and every mandatory entry; a plugin lacking
  // any is refused with NOT_SUPPORTED naming each missing entry
  // ("KMD <path> lacks mandatory DDI Context.pfnCreateContext").
  static Result<std::shared_ptr<Driver>> load(const std::string& name_or_path, const GPUPDDI_CALLBACKS& callbacks);

  ~Driver();
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  const GPUPDDI_DRIVER_FUNCS& ddi() const { return funcs_; }
  const std::string& path() const { return path_; }  // the canonical path of the plugin file
  const std::string& name() const { return name_; }  // DriverName

 private:
  Driver() = default;

  void* dl_ = nullptr;
  std::string path_;
  std::string name_;
  std::unique_ptr<GPUPDDI_CALLBACKS> callbacks_;  // stable address: the plugin keeps the pointer
  GPUPDDI_DRIVER_FUNCS funcs_{};
};

// Where short names are looked up, in order: each directory of $GPUP_KMD_PATH (colon-separated,
// empty entries skipped), <directory of the running executable>/../lib, the compile-time
// GPUP_KMD_DIR.
std::vector<std::string> kmd_search_dirs();
// The file a name_or_path refers to (see Driver::load), or NOT_FOUND naming every place tried.
// Short names must be [A-Za-z0-9_-]+.
Result<std::string> resolve_kmd_path(const std::string& name_or_path);

// What a started adapter reports to the host (queries without VM flags).
struct AdapterCaps {
  GPUPDDI_DRIVERCAPS driver{};
  GPUPDDI_GPUPCAPS gpup{};
  GPUPDDI_GPUMMUCAPS mmu{};
  std::vector<GPUPDDI_PAGETABLELEVELDESC> levels;  // mmu.PageTableLevelCount entries, level 0 first
  GPUPDDI_QUERYSEGMENTOUT segments{};
  GPUPDDI_DEVICEINFO info{};  // strings forced NUL-terminated
};

// Runs DRIVERCAPS, GPUPCAPS, GPUMMUCAPS, PAGETABLELEVELDESC (each level), QUERYSEGMENT and
// DEVICEINFO on hAdapter. Fails with the KMD's status and the query's name, or with INTERNAL
// when an answer is inconsistent (wrong size written, too many levels or segments).
// GPUPDDI_QAITYPE_SANDBOXNEEDS's text (ddi.h); empty when the KMD answers NOT_SUPPORTED. At most
// kMaxSandboxNeeds bytes.
inline constexpr uint32_t kMaxSandboxNeeds = 64 * 1024;
Result<std::string> query_sandbox_needs(const Driver& driver, GPUPDDI_HANDLE hAdapter);
Result<AdapterCaps> query_adapter_caps(const Driver& driver, GPUPDDI_HANDLE hAdapter);

// Turns a [kmd] config table into pfnStartAdapter's "key=value\n" lines, keys in map order.
// INVALID_PARAMETER for an empty key, a key with '=', '#' at its start or surrounding spaces,
// and for a key or value containing a line break or NUL (either would inject another line).
Result<std::string> config_to_kmd_lines(const std::map<std::string, std::string>& config);

}  // namespace gpup::kmd
