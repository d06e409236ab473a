// The driver store: the files of a KMD package that a VM's guest needs (its UMD, the OpenCL ICD
// manifest naming it), copied by gpupd into the VM's HostDriverStore when the VM's worker starts.
//
// A KMD package is the plugin plus a manifest in INF syntax beside it: for
// <dir>/libgpup_kmd_<name>.so, gpupd reads <dir>/gpup_kmd_<name>.inf (kmd_inf_path). A plugin
// without one has no guest files; its VMs get an empty store.
//
// The manifest (docs/OPERATIONS.md, "The driver store", has the full syntax):
//
//   [Version]
//   Signature = "$GPUP$"
//   Class     = ComputeAccelerator            ; compute-only adapters (MCDM); anything else is refused
//   DriverVer = 05/14/2025,0.1.0.0            ; date, version: the default version of every file
//
//   [DDInstall]
//   ; HKR,"<copy mode>",<value name>,<type>,"<source>"[,"<destination>"]
//   HKR,"CopyToVmOverwrite",GpupOcl,%REG_MULTI_SZ%,"libgpupocl.so","lib/libgpupocl.so"
//   HKR,"CopyToVmWhenNewer",GpupIcd,%REG_MULTI_SZ%,"gpup-icd/gpup.icd","OpenCL/vendors/gpup.icd"
//
//   [FileVersions]                            ; optional per-file versions (by source)
//   libgpupocl.so = 0.1.0.3
//
//   [Strings]
//   REG_SZ       = 0x00000000
//   REG_MULTI_SZ = 0x00010000
//
// Sources are relative to the manifest's directory, destinations relative to the store; both must
// stay inside (no "..", no absolute path, no empty component). An omitted or empty destination is
// the source's file name. Copy modes, as Windows applies CopyToVmOverwrite / CopyToVmWhenNewer:
//   Overwrite  the store's file is always replaced.
//   WhenNewer  replaced only when the host's file is newer: a higher version wins; with equal
//              versions, a later modification time. A file missing from the store is copied.
// ELF files carry no version resource, so the version each store file was copied with is kept in
// the store's manifest, <store>/.gpup-store.json (a file without an entry counts as version 0). A
// copied file keeps its source's modification time, which WhenNewer compares with the host file's.
//
// Path translation: an OpenCL ICD manifest (a destination ending in ".icd") names its library.
// When that library is a file of the same package (the same file name as one of its sources), the
// copy names it by its path in the store instead, as Windows rewrites a UMD's path for the VM.
//
// Threading: plain functions, no shared state; gpupd calls them on its event-loop thread.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "common/result.h"

namespace gpup::gpupd {

inline constexpr const char* kDriverStoreDirName = "HostDriverStore";
inline constexpr const char* kDriverStoreManifest = ".gpup-store.json";

// a.b.c.d, compared from the most significant part.
struct FileVersion {
  std::array<uint32_t, 4> parts{};
  auto operator<=>(const FileVersion&) const = default;
  std::string str() const;
};
// "1", "1.2", "1.2.3" or "1.2.3.4" (missing parts are 0), each part 0..65535 as in Windows.
Result<FileVersion> parse_file_version(std::string_view text);

enum class CopyMode { kOverwrite, kWhenNewer };
const char* to_string(CopyMode m);

struct StoreFile {
  CopyMode mode = CopyMode::kOverwrite;
  std::string value_name;   // the HKR value name, for messages only
  std::string source;       // relative to the package directory
  std::string destination;  // relative to the store
  FileVersion version;      // [FileVersions] entry, else DriverVer's
};

struct DriverPackage {
  std::string inf_path;     // the manifest it came from
  std::string directory;    // its directory: sources are relative to it
  std::string class_name;   // "ComputeAccelerator"
  std::string driver_date;  // DriverVer's date, as written
  FileVersion driver_version;
  std::vector<StoreFile> files;
};

// Parses a manifest's text. Errors name the file and line: "x.inf:12: ...".
Result<DriverPackage> parse_inf(const std::string& text, const std::string& inf_path);
Result<DriverPackage> load_inf(const std::string& inf_path);

// <dir of plugin>/<plugin file name without "lib" and ".so">.inf
std::string kmd_inf_path(const std::string& kmd_path);

// What populate_store did with one file.
struct StoreAction {
  std::string destination;
  bool copied = false;
  std::string reason;  // "absent", "overwrite", "newer version 0.2.0.0 > 0.1.0.0", "store copy is newer (...)"
};

// Brings <store_dir> (created if missing, mode 0755) up to date with the package: every file by its
// copy mode, written to a temporary name and renamed, then the store's manifest. Stops at the first
// failure (a missing source, an unwritable store), naming the file.
Result<std::vector<StoreAction>> populate_store(const DriverPackage& pkg, const std::string& store_dir);

// What gpupd does when a VM's worker starts: creates <store_dir>, loads the KMD's manifest (none:
// an empty store, logged) and populates the store, logging each file copied or kept. Errors (a bad
// manifest, a missing source) fail the start: the guest could not load its UMD.
Status prepare_vm_store(const std::string& vm, const std::string& kmd_path, const std::string& store_dir);

// Removes a VM's store (when the VM is removed). Missing is fine.
void remove_store(const std::string& store_dir);

}  // namespace gpup::gpupd
