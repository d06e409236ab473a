#include "host/kmd_loader/kmd_loader.h"

#include <dlfcn.h>
#include <fmt/format.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <mutex>

#ifndef GPUP_KMD_DIR
#error "GPUP_KMD_DIR must be defined (the build's plugin directory)"
#endif

namespace gpup::kmd {

namespace {

// One entry per mandatory DDI (ddi.h marks them); the loader refuses a plugin lacking any.
struct MandatoryEntry {
  const char* name;
  bool (*present)(const GPUPDDI_DRIVER_FUNCS&);
};
#define GPUP_MANDATORY_(table, fn) \
  MandatoryEntry { #table "." #fn, [](const GPUPDDI_DRIVER_FUNCS& f) { return f.table.fn != nullptr; } }
const MandatoryEntry kMandatory[] = {
    GPUP_MANDATORY_(Adapter, pfnStartAdapter),      GPUP_MANDATORY_(Adapter, pfnStopAdapter),
    GPUP_MANDATORY_(Adapter, pfnQueryAdapterInfo),  GPUP_MANDATORY_(Adapter, pfnSetVirtualMachineData),
    GPUP_MANDATORY_(Process, pfnCreateProcess),     GPUP_MANDATORY_(Process, pfnDestroyProcess),
    GPUP_MANDATORY_(Device, pfnCreateDevice),       GPUP_MANDATORY_(Device, pfnDestroyDevice),
    GPUP_MANDATORY_(Memory, pfnCreateAllocation),   GPUP_MANDATORY_(Memory, pfnDestroyAllocation),
    GPUP_MANDATORY_(Context, pfnCreateContext),     GPUP_MANDATORY_(Context, pfnDestroyContext),
    GPUP_MANDATORY_(Context, pfnSubmitCommand),
};
#undef GPUP_MANDATORY_

bool is_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string executable_dir() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return {};
  std::string p(buf, static_cast<size_t>(n));
  const size_t slash = p.rfind('/');
  return slash == std::string::npos ? std::string() : p.substr(0, slash);
}

bool same_callbacks(const GPUPDDI_CALLBACKS& a, const GPUPDDI_CALLBACKS& b) {
  return a.hSystem == b.hSystem && a.pfnLog == b.pfnLog && a.pfnNotifySubmissionComplete == b.pfnNotifySubmissionComplete;
}

// Plugins loaded in this process, by canonical path.
std::mutex g_loaded_mu;
std::map<std::string, std::weak_ptr<Driver>>& loaded() {
  static auto* m = new std::map<std::string, std::weak_ptr<Driver>>();
  return *m;
}

template <typename T>
void force_nul(T& field) {
  field[sizeof(field) - 1] = '\0';
}

}  // namespace

std::vector<std::string> kmd_search_dirs() {
  std::vector<std::string> dirs;
  if (const char* env = std::getenv("GPUP_KMD_PATH")) {
    std::string_view rest(env);
    while (!rest.empty()) {
      const size_t colon = rest.find(':');
      std::string_view dir = rest.substr(0, colon);
      if (!dir.empty()) dirs.emplace_back(dir);
      rest = colon == std::string_view::npos ? std::string_view() : rest.substr(colon + 1);
    }
  }
  if (std::string exe = executable_dir(); !exe.empty()) dirs.push_back(exe + "/../lib");
  dirs.emplace_back(GPUP_KMD_DIR);
  return dirs;
}

Result<std::string> resolve_kmd_path(const std::string& name_or_path) {
  if (name_or_path.empty()) return Error(GPUP_STATUS_INVALID_PARAMETER, "empty KMD name");
  if (name_or_path.find('/') != std::string::npos) {
    if (!is_file(name_or_path)) return Error(GPUP_STATUS_NOT_FOUND, fmt::format("KMD {}: no such file", name_or_path));
    return name_or_path;
  }
  for (char c : name_or_path) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-')) {
      return Error(GPUP_STATUS_INVALID_PARAMETER,
                   fmt::format("KMD name '{}' is neither a path nor a short name ([A-Za-z0-9_-]+)", name_or_path));
    }
  }
  const std::string file = "libgpup_kmd_" + name_or_path + ".so";
  std::string tried;
  for (const std::string& dir : kmd_search_dirs()) {
    const std::string candidate = dir + "/" + file;
    if (is_file(candidate)) return candidate;
    tried += (tried.empty() ? "" : ", ") + dir;
  }
  return Error(GPUP_STATUS_NOT_FOUND, fmt::format("KMD '{}' ({}) not found in: {}", name_or_path, file, tried));
}

Result<std::shared_ptr<Driver>> Driver::load(const std::string& name_or_path, const GPUPDDI_CALLBACKS& callbacks) {
  auto resolved = resolve_kmd_path(name_or_path);
  if (!resolved) return resolved.error();
  char canonical_buf[PATH_MAX];
  if (::realpath(resolved->c_str(), canonical_buf) == nullptr) {
    return Error(GPUP_STATUS_NOT_FOUND, fmt::format("KMD {}: {}", *resolved, std::strerror(errno)));
  }
  const std::string path(canonical_buf);
  if (callbacks.pfnNotifySubmissionComplete == nullptr) {
    return Error(GPUP_STATUS_INVALID_PARAMETER, "KMD callbacks lack pfnNotifySubmissionComplete");
  }

  std::lock_guard lock(g_loaded_mu);
  if (auto it = loaded().find(path); it != loaded().end()) {
    if (std::shared_ptr<Driver> existing = it->second.lock()) {
      if (same_callbacks(*existing->callbacks_, callbacks)) return existing;
      return Error(GPUP_STATUS_ALREADY_EXISTS,
                   fmt::format("KMD {} is already loaded in this process with other callbacks", path));
    }
  }

  std::shared_ptr<Driver> driver(new Driver());
  driver->path_ = path;
  driver->callbacks_ = std::make_unique<GPUPDDI_CALLBACKS>(callbacks);
  driver->callbacks_->struct_size = sizeof(GPUPDDI_CALLBACKS);

  dlerror();
  driver->dl_ = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (driver->dl_ == nullptr) {
    const char* why = dlerror();
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("KMD {} cannot be loaded: {}", path, why ? why : "?"));
  }
  auto entry = reinterpret_cast<GPUPDDI_PFN_DRIVERENTRY>(::dlsym(driver->dl_, GPUPDDI_DRIVERENTRY_SYMBOL));
  if (entry == nullptr) {
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("KMD {} does not export {}", path, GPUPDDI_DRIVERENTRY_SYMBOL));
  }

  GPUPDDI_DRIVER_FUNCS& f = driver->funcs_;
  f.struct_size = sizeof(f);
  f.DdiVersion = GPUPDDI_VERSION;
  const gpup_status s = entry(driver->callbacks_.get(), &f);
  const uint32_t major = f.DdiVersion >> 16;
  if (s == GPUP_STATUS_VERSION_MISMATCH || (s == GPUP_STATUS_SUCCESS && major != GPUPDDI_VERSION_MAJOR)) {
    return Error(GPUP_STATUS_VERSION_MISMATCH,
                 fmt::format("KMD {} implements DDI {}.{}; this host needs major {}", path, major, f.DdiVersion & 0xffff,
                             GPUPDDI_VERSION_MAJOR));
  }
  if (s != GPUP_STATUS_SUCCESS) {
    return Error(s, fmt::format("KMD {}: {} failed: {}", path, GPUPDDI_DRIVERENTRY_SYMBOL, gpup_status_name(s)));
  }
  // The tables are nested by value, so within one major none of them can change size.
  const struct {
    const char* name;
    uint32_t got, want;
  } sizes[] = {{"Adapter", f.Adapter.struct_size, sizeof(f.Adapter)},
               {"Process", f.Process.struct_size, sizeof(f.Process)},
               {"Device", f.Device.struct_size, sizeof(f.Device)},
               {"Memory", f.Memory.struct_size, sizeof(f.Memory)},
               {"Context", f.Context.struct_size, sizeof(f.Context)}};
  for (const auto& t : sizes) {
    if (t.got != t.want) {
      return Error(GPUP_STATUS_VERSION_MISMATCH,
                   fmt::format("KMD {}: {} table struct_size {}, this host's is {}", path, t.name, t.got, t.want));
    }
  }
  std::string missing;
  for (const MandatoryEntry& m : kMandatory) {
    if (!m.present(f)) missing += (missing.empty() ? "" : ", ") + std::string(m.name);
  }
  if (!missing.empty()) {
    return Error(GPUP_STATUS_NOT_SUPPORTED, fmt::format("KMD {} lacks mandatory DDI {}", path, missing));
  }
  if (std::memchr(f.DriverName, '\0', sizeof(f.DriverName)) == nullptr) {
    return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("KMD {}: DriverName is not NUL-terminated", path));
  }
  driver->name_ = f.DriverName;
  if (driver->name_.empty()) driver->name_ = path.substr(path.rfind('/') + 1);
  loaded()[path] = driver;
  return driver;
}

Driver::~Driver() {
  if (dl_ != nullptr) ::dlclose(dl_);
}

Result<std::string> query_sandbox_needs(const Driver& driver, GPUPDDI_HANDLE hAdapter) {
  std::string text(kMaxSandboxNeeds, '\0');
  uint32_t written = 0;
  GPUPDDI_ARG_QUERYADAPTERINFO args{};
  args.struct_size = sizeof(args);
  args.Type = GPUPDDI_QAITYPE_SANDBOXNEEDS;
  args.OutputDataSize = kMaxSandboxNeeds;
  args.pOutputData = text.data();
  args.pOutputDataWritten = &written;
  const gpup_status s = driver.ddi().Adapter.pfnQueryAdapterInfo(hAdapter, &args);
  if (s == GPUP_STATUS_NOT_SUPPORTED) return std::string();
  if (s != GPUP_STATUS_SUCCESS)
    return Error(s, fmt::format("KMD {}: query SANDBOXNEEDS failed: {}", driver.name(), gpup_status_name(s)));
  if (written == 0 || written > kMaxSandboxNeeds || text[written - 1] != '\0' || text.find('\0') != written - 1)
    return Error(GPUP_STATUS_INTERNAL,
                 fmt::format("KMD {}: SANDBOXNEEDS is not one NUL-terminated text ({} bytes)", driver.name(), written));
  text.resize(written - 1);
  return text;
}

Result<AdapterCaps> query_adapter_caps(const Driver& driver, GPUPDDI_HANDLE hAdapter) {
  const GPUPDDI_ADAPTER_FUNCS& ddi = driver.ddi().Adapter;
  AdapterCaps caps;
  auto query = [&](uint32_t type, const char* what, void* out, uint32_t size, const void* in = nullptr,
                   uint32_t in_size = 0) -> Status {
    uint32_t written = 0;
    GPUPDDI_ARG_QUERYADAPTERINFO args{};
    args.struct_size = sizeof(args);
    args.Type = type;
    args.pInputData = in;
    args.InputDataSize = in_size;
    args.OutputDataSize = size;
    args.pOutputData = out;
    args.pOutputDataWritten = &written;
    const gpup_status s = ddi.pfnQueryAdapterInfo(hAdapter, &args);
    if (s != GPUP_STATUS_SUCCESS) {
      return Error(s, fmt::format("KMD {}: query {} failed: {}", driver.name(), what, gpup_status_name(s)));
    }
    if (written != size) {
      return Error(GPUP_STATUS_INTERNAL,
                   fmt::format("KMD {}: query {} wrote {} bytes, expected {}", driver.name(), what, written, size));
    }
    return {};
  };
  Status s = query(GPUPDDI_QAITYPE_DRIVERCAPS, "DRIVERCAPS", &caps.driver, sizeof(caps.driver));
  if (s) s = query(GPUPDDI_QAITYPE_GPUPCAPS, "GPUPCAPS", &caps.gpup, sizeof(caps.gpup));
  if (s) s = query(GPUPDDI_QAITYPE_GPUMMUCAPS, "GPUMMUCAPS", &caps.mmu, sizeof(caps.mmu));
  if (s) s = query(GPUPDDI_QAITYPE_QUERYSEGMENT, "QUERYSEGMENT", &caps.segments, sizeof(caps.segments));
  if (s) s = query(GPUPDDI_QAITYPE_DEVICEINFO, "DEVICEINFO", &caps.info, sizeof(caps.info));
  if (!s) return s.error();
  constexpr uint32_t kMaxLevels = 8;
  if (caps.mmu.PageTableLevelCount == 0 || caps.mmu.PageTableLevelCount > kMaxLevels) {
    return Error(GPUP_STATUS_INTERNAL, fmt::format("KMD {} reports {} page-table levels (1..{} expected)",
                                                   driver.name(), caps.mmu.PageTableLevelCount, kMaxLevels));
  }
  if (caps.segments.NbSegment == 0 || caps.segments.NbSegment > GPUPDDI_MAX_SEGMENTS) {
    return Error(GPUP_STATUS_INTERNAL, fmt::format("KMD {} reports {} segments (1..{} expected)", driver.name(),
                                                   caps.segments.NbSegment, GPUPDDI_MAX_SEGMENTS));
  }
  for (uint32_t level = 0; level < caps.mmu.PageTableLevelCount; ++level) {
    GPUPDDI_PAGETABLELEVELDESC desc{};
    const std::string what = fmt::format("PAGETABLELEVELDESC({})", level);
    Status ls = query(GPUPDDI_QAITYPE_PAGETABLELEVELDESC, what.c_str(), &desc, sizeof(desc), &level, sizeof(level));
    if (!ls) return ls.error();
    caps.levels.push_back(desc);
  }
  force_nul(caps.info.Name);
  force_nul(caps.info.Vendor);
  force_nul(caps.info.DriverVersion);
  force_nul(caps.info.Platform);
  return caps;
}

Result<std::string> config_to_kmd_lines(const std::map<std::string, std::string>& config) {
  std::string out;
  auto bad_char = [](const std::string& s) { return s.find_first_of(std::string("\n\r\0", 3)) != std::string::npos; };
  for (const auto& [key, value] : config) {
    const bool spaced = !key.empty() && (std::isspace(static_cast<unsigned char>(key.front())) ||
                                         std::isspace(static_cast<unsigned char>(key.back())));
    if (key.empty() || spaced || key.front() == '#' || key.find('=') != std::string::npos || bad_char(key)) {
      return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("KMD config key '{}' is not usable", key));
    }
    if (bad_char(value)) {
      return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("KMD config value of '{}' contains a line break or NUL", key));
    }
    out += key;
    out += '=';
    out += value;
    out += '\n';
  }
  return out;
}

}  // namespace gpup::kmd
