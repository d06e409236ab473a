#include "host/gpupd/driver_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

namespace gpup::gpupd {

namespace {

using nlohmann::json;

Error bad(std::string msg) { return make_error(GPUP_STATUS_INVALID_PARAMETER, std::move(msg)); }
Error sys(const std::string& what) {
  return make_error(GPUP_STATUS_ACCESS_DENIED, fmt::format("{}: {}", what, std::strerror(errno)));
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

std::string basename_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// One field of an INF line: its text (quotes removed, %strings% substituted) and whether it was
// quoted.
struct Field {
  std::string text;
  bool quoted = false;
};

// One logical line of a section, with its line number for messages.
struct Line {
  int number = 0;
  std::string text;  // comment removed, trimmed
};

// Removes a ';' comment that is not inside quotes.
std::string strip_comment(std::string_view line) {
  bool in_quotes = false;
  for (size_t i = 0; i < line.size(); ++i) {
    if (line[i] == '"') in_quotes = !in_quotes;
    if (line[i] == ';' && !in_quotes) return std::string(trim(line.substr(0, i)));
  }
  return std::string(trim(line));
}

class InfParser {
 public:
  InfParser(const std::string& text, const std::string& path) : path_(path) {
    std::istringstream in(text);
    std::string raw, section;
    int number = 0;
    while (std::getline(in, raw)) {
      ++number;
      std::string line = strip_comment(raw);
      if (line.empty()) continue;
      if (line.front() == '[') {
        if (line.back() != ']' || line.size() < 3) {
          error_ = where(number, fmt::format("malformed section header '{}'", raw));
          return;
        }
        section = lower(trim(std::string_view(line).substr(1, line.size() - 2)));
        sections_[section];  // present even when empty
        continue;
      }
      if (section.empty()) {
        error_ = where(number, "text before the first [section]");
        return;
      }
      sections_[section].push_back(Line{number, line});
    }
  }

  const std::string& error() const { return error_; }
  bool has(const std::string& section) const { return sections_.count(section) != 0; }
  const std::vector<Line>& lines(const std::string& section) const {
    static const std::vector<Line> none;
    auto it = sections_.find(section);
    return it == sections_.end() ? none : it->second;
  }
  std::string where(int line, const std::string& what) const { return fmt::format("{}:{}: {}", path_, line, what); }

  // Splits "a, "b,c", %x%" into fields, substituting %name% from [Strings].
  Result<std::vector<Field>> fields(const Line& l, const std::map<std::string, std::string>& strings) const {
    std::vector<Field> out;
    std::string_view s = l.text;
    size_t i = 0;
    for (;;) {
      while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
      Field f;
      if (i < s.size() && s[i] == '"') {
        size_t close = s.find('"', i + 1);
        if (close == std::string_view::npos) return bad(where(l.number, "unterminated quoted string"));
        f.text = std::string(s.substr(i + 1, close - i - 1));
        f.quoted = true;
        i = close + 1;
        while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
        if (i < s.size() && s[i] != ',')
          return bad(where(l.number, fmt::format("unexpected text after the quoted string \"{}\"", f.text)));
      } else {
        size_t comma = s.find(',', i);
        f.text = std::string(trim(s.substr(i, comma == std::string_view::npos ? s.npos : comma - i)));
        i = comma == std::string_view::npos ? s.size() : comma;
      }
      auto sub = substitute(f.text, l.number, strings);
      if (!sub) return sub.error();
      f.text = std::move(*sub);
      out.push_back(std::move(f));
      if (i >= s.size()) break;
      ++i;  // the comma
    }
    return out;
  }

  Result<std::string> substitute(const std::string& text, int line,
                                 const std::map<std::string, std::string>& strings) const {
    std::string out;
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] != '%') {
        out += text[i];
        continue;
      }
      size_t close = text.find('%', i + 1);
      if (close == std::string::npos) return bad(where(line, fmt::format("unterminated %string% in '{}'", text)));
      std::string key = text.substr(i + 1, close - i - 1);
      if (key.empty()) {
        out += '%';  // %% is a literal percent sign
      } else {
        auto it = strings.find(lower(key));
        if (it == strings.end()) return bad(where(line, fmt::format("%{}% is not defined in [Strings]", key)));
        out += it->second;
      }
      i = close;
    }
    return out;
  }

 private:
  std::string path_;
  std::string error_;
  std::map<std::string, std::vector<Line>> sections_;
};

// key = value (value unquoted); false when the line has no '='.
bool key_value(const std::string& line, std::string* key, std::string* value) {
  auto eq = line.find('=');
  if (eq == std::string::npos) return false;
  *key = lower(trim(std::string_view(line).substr(0, eq)));
  std::string v(trim(std::string_view(line).substr(eq + 1)));
  if (v.size() >= 2 && v.front() == '"' && v.back() == '"') v = v.substr(1, v.size() - 2);
  *value = v;
  return true;
}

// A path relative to a root that cannot leave it: no absolute path, no "..", no "." or empty
// component, no backslash (INF files of Windows use them; here they would be part of a name).
std::optional<std::string> relative_path_problem(const std::string& p) {
  if (p.empty()) return "is empty";
  if (p.size() > 1024) return "is longer than 1024 characters";
  if (p.front() == '/') return "is absolute";
  if (p.find('\\') != std::string::npos) return "contains a backslash (use '/')";
  if (p.find('\0') != std::string::npos) return "contains a NUL character";
  size_t start = 0;
  while (start <= p.size()) {
    size_t slash = p.find('/', start);
    std::string part = p.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (part.empty()) return "has an empty component";
    if (part == "..") return "leaves its directory ('..')";
    if (part == ".") return "has a '.' component";
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return std::nullopt;
}

Result<uint32_t> parse_reg_type(const std::string& text) {
  std::string t(trim(text));
  if (t.empty()) return uint32_t{0};  // an omitted type is REG_SZ
  char* end = nullptr;
  errno = 0;
  unsigned long v = std::strtoul(t.c_str(), &end, 0);
  if (errno != 0 || end == t.c_str() || *end != '\0' || v > 0xffffffffUL)
    return bad(fmt::format("'{}' is not a registry value type", t));
  return static_cast<uint32_t>(v);
}

constexpr uint32_t kRegSz = 0x00000000, kRegMultiSz = 0x00010000;

Status mkdirs(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    std::string part = dir.substr(0, pos);
    if (::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) return sys("cannot create directory " + part);
  }
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return make_error(GPUP_STATUS_ACCESS_DENIED, fmt::format("{} is not a directory", dir));
  return {};
}

Result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return sys("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return sys("cannot read " + path);
  return ss.str();
}

// Writes bytes to <path>.gpup-new and renames it over path: a guest that has the old file mapped
// keeps its copy, and no reader sees half a file.
Status write_replace(const std::string& path, const std::string& bytes, mode_t mode, const timespec* mtime) {
  std::string tmp = path + ".gpup-new";
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
  if (fd < 0) return sys("cannot create " + tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      Error e = sys("cannot write " + tmp);
      ::close(fd);
      ::unlink(tmp.c_str());
      return e;
    }
    done += static_cast<size_t>(n);
  }
  ::fchmod(fd, mode);  // not narrowed by the umask
  if (mtime) {
    timespec times[2] = {*mtime, *mtime};
    ::futimens(fd, times);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Error e = sys("cannot replace " + path);
    ::unlink(tmp.c_str());
    return e;
  }
  return {};
}

int64_t ns_of(const timespec& t) { return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec; }

// An OpenCL ICD manifest names one library. If it is a file of this package, name it by its place
// in the store instead.
std::string translate_icd(const std::string& bytes, const DriverPackage& pkg, const std::string& store_dir) {
  std::istringstream in(bytes);
  std::string line;
  while (std::getline(in, line)) {
    std::string lib(trim(line));
    if (lib.empty()) continue;
    std::string name = basename_of(lib);
    for (const auto& f : pkg.files)
      if (basename_of(f.source) == name && !f.destination.ends_with(".icd"))
        return store_dir + "/" + f.destination + "\n";
    return bytes;
  }
  return bytes;
}

}  // namespace

std::string FileVersion::str() const { return fmt::format("{}.{}.{}.{}", parts[0], parts[1], parts[2], parts[3]); }

Result<FileVersion> parse_file_version(std::string_view text) {
  FileVersion v;
  std::string t(trim(text));
  size_t i = 0, part = 0;
  if (t.empty()) return bad("empty version");
  while (true) {
    if (part == 4) return bad(fmt::format("version '{}' has more than 4 parts", t));
    size_t start = i;
    uint32_t n = 0;
    while (i < t.size() && t[i] >= '0' && t[i] <= '9') {
      n = n * 10 + uint32_t(t[i] - '0');
      if (n > 65535) return bad(fmt::format("version '{}': a part is larger than 65535", t));
      ++i;
    }
    if (i == start) return bad(fmt::format("version '{}' is not of the form a.b.c.d", t));
    v.parts[part++] = n;
    if (i == t.size()) break;
    if (t[i] != '.') return bad(fmt::format("version '{}' is not of the form a.b.c.d", t));
    ++i;
  }
  return v;
}

const char* to_string(CopyMode m) { return m == CopyMode::kOverwrite ? "CopyToVmOverwrite" : "CopyToVmWhenNewer"; }

std::string kmd_inf_path(const std::string& kmd_path) {
  auto slash = kmd_path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : kmd_path.substr(0, slash);
  std::string name = slash == std::string::npos ? kmd_path : kmd_path.substr(slash + 1);
  if (name.rfind("lib", 0) == 0) name = name.substr(3);
  if (auto so = name.find(".so"); so != std::string::npos) name = name.substr(0, so);
  return dir + "/" + name + ".inf";
}

Result<DriverPackage> parse_inf(const std::string& text, const std::string& inf_path) {
  InfParser p(text, inf_path);
  if (!p.error().empty()) return bad(p.error());
  DriverPackage pkg;
  pkg.inf_path = inf_path;
  auto slash = inf_path.rfind('/');
  pkg.directory = slash == std::string::npos ? "." : inf_path.substr(0, slash);
  if (pkg.directory.empty()) pkg.directory = "/";

  std::map<std::string, std::string> strings;
  for (const auto& l : p.lines("strings")) {
    std::string k, v;
    if (!key_value(l.text, &k, &v)) return bad(p.where(l.number, "a [Strings] line must be name = value"));
    strings[k] = v;
  }

  if (!p.has("version")) return bad(fmt::format("{}: no [Version] section", inf_path));
  bool have_driver_ver = false;
  for (const auto& l : p.lines("version")) {
    std::string k, v;
    if (!key_value(l.text, &k, &v)) return bad(p.where(l.number, "a [Version] line must be name = value"));
    auto sub = p.substitute(v, l.number, strings);
    if (!sub) return sub.error();
    if (k == "class") {
      pkg.class_name = *sub;
    } else if (k == "driverver") {
      auto comma = sub->find(',');
      if (comma == std::string::npos)
        return bad(p.where(l.number, fmt::format("DriverVer '{}' is not 'mm/dd/yyyy,a.b.c.d'", *sub)));
      pkg.driver_date = std::string(trim(std::string_view(*sub).substr(0, comma)));
      int mm = 0, dd = 0, yyyy = 0;
      char tail = 0;
      if (std::sscanf(pkg.driver_date.c_str(), "%2d/%2d/%4d%c", &mm, &dd, &yyyy, &tail) != 3 || mm < 1 || mm > 12 ||
          dd < 1 || dd > 31 || yyyy < 1980)
        return bad(p.where(l.number, fmt::format("DriverVer date '{}' is not mm/dd/yyyy", pkg.driver_date)));
      auto v2 = parse_file_version(std::string_view(*sub).substr(comma + 1));
      if (!v2) return bad(p.where(l.number, "DriverVer: " + v2.error().message));
      pkg.driver_version = *v2;
      have_driver_ver = true;
    }
  }
  if (pkg.class_name.empty()) return bad(fmt::format("{}: [Version] has no Class", inf_path));
  if (lower(pkg.class_name) != "computeaccelerator")
    return bad(fmt::format("{}: Class={} is not a compute accelerator package (Class=ComputeAccelerator)", inf_path,
                           pkg.class_name));
  if (!have_driver_ver) return bad(fmt::format("{}: [Version] has no DriverVer", inf_path));

  std::map<std::string, FileVersion> versions;
  for (const auto& l : p.lines("fileversions")) {
    std::string k, v;
    if (!key_value(l.text, &k, &v)) return bad(p.where(l.number, "a [FileVersions] line must be source = a.b.c.d"));
    auto ver = parse_file_version(v);
    if (!ver) return bad(p.where(l.number, ver.error().message));
    // keys were lower-cased; sources are compared the same way
    versions[k] = *ver;
  }

  std::set<std::string> destinations;
  for (const auto& l : p.lines("ddinstall")) {
    auto fields = p.fields(l, strings);
    if (!fields) return fields.error();
    auto& f = *fields;
    if (lower(f[0].text) != "hkr")
      return bad(p.where(l.number, fmt::format("unsupported [DDInstall] directive '{}' (only HKR lines)", f[0].text)));
    if (f.size() < 5)
      return bad(p.where(l.number, "an HKR line is HKR,\"CopyToVm...\",<name>,<type>,\"<source>\"[,\"<destination>\"]"));
    StoreFile sf;
    std::string key = lower(f[1].text);
    if (key == "copytovmoverwrite") sf.mode = CopyMode::kOverwrite;
    else if (key == "copytovmwhennewer") sf.mode = CopyMode::kWhenNewer;
    else
      return bad(p.where(l.number, fmt::format("unknown key \"{}\" (CopyToVmOverwrite or CopyToVmWhenNewer)", f[1].text)));
    sf.value_name = f[2].text;
    auto type = parse_reg_type(f[3].text);
    if (!type) return bad(p.where(l.number, type.error().message));
    size_t nstrings = f.size() - 4;
    if (*type == kRegSz) {
      if (nstrings != 1) return bad(p.where(l.number, "a REG_SZ value holds one string, the source"));
    } else if (*type == kRegMultiSz) {
      if (nstrings > 2) return bad(p.where(l.number, "a REG_MULTI_SZ value holds at most 2 strings: source, destination"));
    } else {
      return bad(p.where(l.number, fmt::format("value type {:#x} is neither REG_SZ nor REG_MULTI_SZ", *type)));
    }
    sf.source = f[4].text;
    sf.destination = nstrings == 2 && !f[5].text.empty() ? f[5].text : basename_of(sf.source);
    if (auto why = relative_path_problem(sf.source))
      return bad(p.where(l.number, fmt::format("source '{}' {}", sf.source, *why)));
    if (auto why = relative_path_problem(sf.destination))
      return bad(p.where(l.number, fmt::format("destination '{}' {}", sf.destination, *why)));
    if (sf.destination == kDriverStoreManifest || sf.destination.find(".gpup-new") != std::string::npos)
      return bad(p.where(l.number, fmt::format("destination '{}' is reserved by the store", sf.destination)));
    if (!destinations.insert(sf.destination).second)
      return bad(p.where(l.number, fmt::format("destination '{}' is listed twice", sf.destination)));
    auto v = versions.find(lower(sf.source));
    sf.version = v == versions.end() ? pkg.driver_version : v->second;
    pkg.files.push_back(std::move(sf));
  }
  // A destination may not be a directory another destination needs ("a" and "a/b").
  for (const auto& d : destinations) {
    auto next = destinations.upper_bound(d);
    if (next != destinations.end() && next->rfind(d + "/", 0) == 0)
      return bad(fmt::format("{}: destination '{}' is both a file and the directory of '{}'", inf_path, d, *next));
  }
  return pkg;
}

Result<DriverPackage> load_inf(const std::string& inf_path) {
  auto text = read_file(inf_path);
  if (!text) return text.error();
  return parse_inf(*text, inf_path);
}

Result<std::vector<StoreAction>> populate_store(const DriverPackage& pkg, const std::string& store_dir_in) {
  if (Status s = mkdirs(store_dir_in); !s.ok()) return s.error();
  std::error_code ec;
  std::string store_dir = std::filesystem::absolute(store_dir_in, ec).lexically_normal().string();
  if (ec) store_dir = store_dir_in;
  while (store_dir.size() > 1 && store_dir.back() == '/') store_dir.pop_back();

  std::string manifest_path = store_dir + "/" + kDriverStoreManifest;
  json manifest = json::object();
  if (auto text = read_file(manifest_path); text.ok()) {
    json parsed = json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_object() && parsed.contains("files") && parsed["files"].is_object()) manifest = parsed;
  }
  if (!manifest.contains("files")) manifest["files"] = json::object();

  std::vector<StoreAction> actions;
  for (const auto& f : pkg.files) {
    std::string src = pkg.directory + "/" + f.source;
    std::string dst = store_dir + "/" + f.destination;
    struct stat sst {};
    if (::stat(src.c_str(), &sst) != 0) return sys(fmt::format("{} {}: source {}", to_string(f.mode), f.value_name, src));
    if (!S_ISREG(sst.st_mode))
      return make_error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("{} {}: source {} is not a regular file",
                                                                   to_string(f.mode), f.value_name, src));
    StoreAction a{f.destination, false, ""};
    struct stat dstst {};
    bool present = ::lstat(dst.c_str(), &dstst) == 0;
    if (present && !S_ISREG(dstst.st_mode))
      return make_error(GPUP_STATUS_ACCESS_DENIED, fmt::format("{} exists and is not a regular file", dst));
    if (f.mode == CopyMode::kOverwrite) {
      a.copied = true;
      a.reason = "overwrite";
    } else if (!present) {
      a.copied = true;
      a.reason = "absent from the store";
    } else {
      FileVersion stored;  // 0.0.0.0 when the manifest does not know the file
      const json& entry = manifest["files"].value(f.destination, json::object());
      if (entry.is_object() && entry.contains("version") && entry["version"].is_string())
        if (auto v = parse_file_version(entry["version"].get<std::string>()); v.ok()) stored = *v;
      if (f.version > stored) {
        a.copied = true;
        a.reason = fmt::format("newer version {} > {}", f.version.str(), stored.str());
      } else if (f.version < stored) {
        a.reason = fmt::format("store has a newer version {} > {}", stored.str(), f.version.str());
      } else if (ns_of(sst.st_mtim) > ns_of(dstst.st_mtim)) {
        a.copied = true;
        a.reason = fmt::format("same version {}, host file modified later", f.version.str());
      } else {
        a.reason = fmt::format("same version {}, store copy not older", f.version.str());
      }
    }
    if (a.copied) {
      auto slash = dst.rfind('/');
      if (Status s = mkdirs(dst.substr(0, slash)); !s.ok()) return s.error();
      auto bytes = read_file(src);
      if (!bytes) return bytes.error();
      std::string content = *bytes;
      if (f.destination.ends_with(".icd"))
        content = translate_icd(content, pkg, store_dir);
      mode_t mode = (sst.st_mode & 0111) ? 0755 : 0644;
      if (Status s = write_replace(dst, content, mode, &sst.st_mtim); !s.ok()) return s.error();
      manifest["files"][f.destination] = json{{"source", src},
                                              {"mode", to_string(f.mode)},
                                              {"version", f.version.str()},
                                              {"mtime_ns", ns_of(sst.st_mtim)}};
    }
    actions.push_back(std::move(a));
  }
  manifest["package"] = pkg.inf_path;
  manifest["driver_version"] = pkg.driver_version.str();
  if (Status s = write_replace(manifest_path, manifest.dump(2) + "\n", 0644, nullptr); !s.ok()) return s.error();
  return actions;
}

Status prepare_vm_store(const std::string& vm, const std::string& kmd_path, const std::string& store_dir) {
  if (Status s = mkdirs(store_dir); !s.ok()) return s;
  std::string inf = kmd_inf_path(kmd_path);
  if (::access(inf.c_str(), F_OK) != 0) {
    spdlog::info("vm {}: KMD {} has no package manifest ({}); its driver store stays empty", vm, kmd_path, inf);
    return {};
  }
  auto pkg = load_inf(inf);
  if (!pkg) return make_error(pkg.error().status, fmt::format("driver store: {}", pkg.error().message));
  auto actions = populate_store(*pkg, store_dir);
  if (!actions) return make_error(actions.error().status, fmt::format("driver store {}: {}", store_dir, actions.error().message));
  for (const auto& a : *actions)
    spdlog::info("vm {}: driver store {}: {} ({})", vm, a.destination, a.copied ? "copied" : "kept", a.reason);
  return {};
}

void remove_store(const std::string& store_dir) {
  std::error_code ec;
  std::filesystem::remove_all(store_dir, ec);
}

}  // namespace gpup::gpupd
