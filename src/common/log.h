// Logging: spdlog, one named logger per process ("gpupd", "vmwp:NAME", "guest").
#pragma once
#include <spdlog/spdlog.h>

#include <string>

namespace gpup {

// Sets the default logger's name and level. Level comes from GPUP_LOG (trace, debug, info, warn,
// error, off; default warn for guests and info for host processes). Logs go to stderr.
void init_logging(const std::string& name, spdlog::level::level_enum default_level = spdlog::level::info);

}  // namespace gpup
