// kmd_opencl: what a worker driving an OpenCL platform needs inside its jail
// (GPUPDDI_QAITYPE_SANDBOXNEEDS, ddi.h). The shared libraries the platform loaded come from the
// host; here are the rest: the ICD loader's vendor files, and for PoCL its kernel headers and
// built-in library, the linker it runs per kernel build with the files it links against, and
// clang's resource directory. An operator's adapter config adds paths for other platforms
// (sandbox_ro, sandbox_dev, sandbox_exec: colon-separated absolute paths).
#include <dlfcn.h>
#include <link.h>
#include <sys/stat.h>

#include <climits>
#include <cstdlib>
#include <string>
#include <vector>

#include "kmd/opencl/ocl_kmd.h"

namespace gpup::kmd::ocl {
namespace {

bool exists(const std::string& p) {
  struct stat st {};
  return !p.empty() && ::stat(p.c_str(), &st) == 0;
}

std::string real(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : std::string();
}

std::string dir_of(const std::string& p) {
  auto slash = p.rfind('/');
  return slash == std::string::npos || slash == 0 ? std::string("/") : p.substr(0, slash);
}

// The path of the first loaded object whose file name starts with prefix.
std::string loaded(const char* prefix) {
  struct Find {
    const char* prefix;
    std::string path;
  } f{prefix, {}};
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* f = static_cast<Find*>(data);
        const char* name = info->dlpi_name;
        if (name == nullptr || name[0] != '/') return 0;
        std::string_view base(name);
        base.remove_prefix(base.rfind('/') + 1);
        if (base.rfind(f->prefix, 0) != 0) return 0;
        f->path = name;
        return 1;
      },
      &f);
  return f.path;
}

void add_list(std::string& out, const char* kind, const std::string& colon_list) {
  size_t start = 0;
  while (start <= colon_list.size()) {
    size_t end = colon_list.find(':', start);
    if (end == std::string::npos) end = colon_list.size();
    if (end > start) out += fmt::format("{} {}\n", kind, colon_list.substr(start, end - start));
    start = end + 1;
  }
}

}  // namespace

Result<std::string> sandbox_needs(const std::map<std::string, std::string>& cfg) {
  std::string out;
  // The ICD loader reads its vendor files at the first clGetPlatformIDs.
  if (const char* v = std::getenv("OCL_ICD_VENDORS"); v && v[0] == '/') {
    out += fmt::format("ro {}\npassenv OCL_ICD_VENDORS\n", v);
  } else if (exists("/etc/OpenCL/vendors")) {
    out += "ro /etc/OpenCL/vendors\n";
  }
  // PoCL: found by its library, wherever it is installed.
  if (std::string pocl = loaded("libpocl.so"); !pocl.empty()) {
    // It finds its data beside its library: <libdir>/../../share/pocl; devices in <libdir>/pocl.
    for (const std::string& p : {real(dir_of(pocl) + "/../../share/pocl"), real(dir_of(real(pocl)) + "/../../share/pocl")})
      if (exists(p) && out.find("ro " + p + "\n") == std::string::npos) out += fmt::format("ro {}\n", p);
    // Each kernel build links a shared object with the system linker against gcc's runtime.
    if (exists("/usr/bin/ld")) out += "exec /usr/bin/ld\n";
    if (exists("/usr/lib/gcc")) out += "ro /usr/lib/gcc\n";
    // The in-process clang's builtin headers.
    if (std::string clang = loaded("libclang-cpp.so"); !clang.empty()) {
      std::string resources = dir_of(real(clang)) + "/clang";
      if (exists(resources)) out += fmt::format("ro {}\n", resources);
    }
    // Device discovery (hwloc and PoCL): CPU topology, NUMA nodes, huge pages.
    for (const char* p : {"/sys/devices/system/cpu", "/sys/devices/system/node", "/sys/kernel/mm/hugepages"})
      if (exists(p)) out += fmt::format("ro {}\n", p);
    // Its compiled-kernel cache, private to the partition; tuning variables pass through.
    out += "env POCL_CACHE_DIR=$GPUP_CACHE_DIR/pocl\n";
    for (const char* v : {"POCL_MEMORY_LIMIT", "POCL_MAX_PTHREAD_COUNT", "POCL_CPU_MAX_CU_COUNT", "POCL_DEVICES",
                          "POCL_DEBUG", "POCL_AFFINITY", "POCL_WORK_GROUP_METHOD", "POCL_CPU_LOCAL_MEM_SIZE",
                          "POCL_EXTRA_BUILD_FLAGS", "POCL_KERNEL_CACHE"})
      out += fmt::format("passenv {}\n", v);
  }
  for (const auto& [key, kind] : {std::pair<const char*, const char*>{"sandbox_ro", "ro"},
                                  {"sandbox_dev", "dev"},
                                  {"sandbox_exec", "exec"}})
    if (auto it = cfg.find(key); it != cfg.end()) {
      for (char c : it->second)
        if (c == '\n' || c == '\r')
          return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("config {} holds a line break", key));
      add_list(out, kind, it->second);
    }
  return out;
}

}  // namespace gpup::kmd::ocl
