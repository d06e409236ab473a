// open_adapter over the KMD loader: the adapter-level DDIs gpupd itself performs.
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "host/control/json_lines.h"
#include "host/gpupd/adapter.h"
#include "host/kmd_loader/kmd_loader.h"

namespace gpup::gpupd {
namespace {

std::string fixed_string(const char* s, size_t cap) { return control::printable(std::string(s, strnlen(s, cap)), cap); }

// The callbacks gpupd gives every KMD. One set for the whole process: a plugin keeps the callbacks
// of its last driver entry, so every adapter using the same plugin must share them (the loader
// refuses a second load of a plugin with different ones).
void kmd_log(GPUPDDI_SYSTEM_HANDLE, int level, const char* msg) {
  std::string text = msg ? control::printable(msg, 2048) : std::string("(null)");
  auto lvl = level <= GPUPDDI_LOG_DEBUG ? spdlog::level::debug
             : level == GPUPDDI_LOG_INFO ? spdlog::level::info
             : level == GPUPDDI_LOG_WARN ? spdlog::level::warn
                                         : spdlog::level::err;
  spdlog::log(lvl, "kmd: {}", text);
}

void kmd_submission_complete(GPUPDDI_SYSTEM_HANDLE, uint64_t id, gpup_status) {
  // gpupd submits no work, so no completion can be for it.
  spdlog::warn("kmd reported completion of submission {} to gpupd, which submits no work; ignored", id);
}

const GPUPDDI_CALLBACKS& daemon_callbacks() {
  static const GPUPDDI_CALLBACKS cb = [] {
    GPUPDDI_CALLBACKS c{};
    c.struct_size = sizeof c;
    c.hSystem = nullptr;
    c.pfnLog = &kmd_log;
    c.pfnNotifySubmissionComplete = &kmd_submission_complete;
    return c;
  }();
  return cb;
}

// A started adapter: stopped (pfnStopAdapter) before the last reference to its driver goes.
class KmdAdapterRuntime final : public AdapterRuntime {
 public:
  KmdAdapterRuntime(std::shared_ptr<kmd::Driver> d, GPUPDDI_HANDLE h) : driver_(std::move(d)), adapter_(h) {}
  ~KmdAdapterRuntime() override { driver_->ddi().Adapter.pfnStopAdapter(adapter_); }

 private:
  std::shared_ptr<kmd::Driver> driver_;
  GPUPDDI_HANDLE adapter_;
};

}  // namespace

Adapter open_adapter(const AdapterConfig& cfg, uint64_t luid) {
  Adapter a;
  a.info.name = cfg.name;
  a.info.luid = luid;
  a.info.kmd = cfg.kmd;
  a.info.config_text = cfg.config_text();
  a.info.state = AdapterState::kFailed;

  auto driver = kmd::Driver::load(cfg.kmd, daemon_callbacks());
  if (!driver) {
    a.info.error = driver.error().message;
    return a;
  }
  std::shared_ptr<kmd::Driver> d = *driver;
  const auto& ddi = d->ddi();
  a.info.driver_name = control::printable(d->name(), 64);
  a.info.kmd_path = d->path();

  GPUPDDI_ARG_STARTADAPTER start{};
  start.struct_size = sizeof start;
  start.pConfig = a.info.config_text.c_str();
  gpup_status st = ddi.Adapter.pfnStartAdapter(&start);
  if (GPUP_FAILED(st) || !start.hAdapter) {
    a.info.error = fmt::format("KMD {} failed pfnStartAdapter: {} ({})", a.info.driver_name, gpup_status_name(st),
                               gpup_status_message(st));
    return a;
  }
  auto rt = std::make_unique<KmdAdapterRuntime>(d, start.hAdapter);

  auto caps = kmd::query_adapter_caps(*d, start.hAdapter);
  if (!caps) {
    a.info.error = fmt::format("KMD {}: querying adapter capabilities failed: {}", a.info.driver_name,
                               caps.error().message);
    return a;  // rt's destructor stops the adapter
  }
  const auto& info = caps->info;
  a.info.device_name = fixed_string(info.Name, sizeof info.Name);
  a.info.device_vendor = fixed_string(info.Vendor, sizeof info.Vendor);
  a.info.device_version = fixed_string(info.DriverVersion, sizeof info.DriverVersion);
  a.info.platform = fixed_string(info.Platform, sizeof info.Platform);
  a.info.total_vram = info.GlobalMemSize;
  a.info.compute_units = info.ComputeUnits;
  a.info.paravirtualization = caps->driver.MemoryManagementCaps.ParavirtualizationSupported != 0;
  a.info.secure_capable = caps->driver.MemoryManagementCaps.IoMmuSecureModeSupported != 0;
  a.info.live_migration = caps->gpup.LiveMigration != 0;
  auto needs = kmd::query_sandbox_needs(*d, start.hAdapter);
  if (!needs) {
    a.info.error = needs.error().message;
    return a;
  }
  a.info.sandbox_needs = std::move(*needs);
  a.info.state = AdapterState::kReady;
  a.runtime = std::move(rt);
  return a;
}

}  // namespace gpup::gpupd
