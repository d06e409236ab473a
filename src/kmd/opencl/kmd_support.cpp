#include "kmd/opencl/kmd_support.h"

#include <algorithm>
#include <atomic>
#include <cstdio>

namespace gpup::kmd {

// ---------------------------------------------------------------------------------------------
// Driver entry and logging

namespace {

GPUPDDI_CALLBACKS g_callbacks{};

}  // namespace

gpup_status driver_entry_prologue(const GPUPDDI_CALLBACKS* pCallbacks, GPUPDDI_DRIVER_FUNCS* pFuncs,
                                  const char* driver_name) {
  if (pFuncs == nullptr || pCallbacks == nullptr) return GPUP_STATUS_INVALID_PARAMETER;
  const uint32_t host_major = pFuncs->DdiVersion >> 16;
  if (host_major != GPUPDDI_VERSION_MAJOR) {
    pFuncs->DdiVersion = GPUPDDI_VERSION;
    return GPUP_STATUS_VERSION_MISMATCH;
  }
  // The function tables are nested by value, so a host of our major always has all of them.
  if (pFuncs->struct_size < sizeof(GPUPDDI_DRIVER_FUNCS)) return GPUP_STATUS_INVALID_PARAMETER;
  constexpr size_t kNotifyEnd =
      offsetof(GPUPDDI_CALLBACKS, pfnNotifySubmissionComplete) + sizeof(pCallbacks->pfnNotifySubmissionComplete);
  if (pCallbacks->struct_size < kNotifyEnd || pCallbacks->pfnNotifySubmissionComplete == nullptr) {
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  GPUPDDI_CALLBACKS copy{};
  std::memcpy(&copy, pCallbacks, std::min<size_t>(pCallbacks->struct_size, sizeof(copy)));
  copy.struct_size = sizeof(copy);
  g_callbacks = copy;

  const uint32_t host_size = pFuncs->struct_size;
  std::memset(static_cast<void*>(pFuncs), 0, sizeof(*pFuncs));
  pFuncs->struct_size = host_size;
  pFuncs->DdiVersion = GPUPDDI_VERSION;
  copy_fixed_string(pFuncs->DriverName, driver_name);
  pFuncs->Adapter.struct_size = sizeof(pFuncs->Adapter);
  pFuncs->Process.struct_size = sizeof(pFuncs->Process);
  pFuncs->Device.struct_size = sizeof(pFuncs->Device);
  pFuncs->Memory.struct_size = sizeof(pFuncs->Memory);
  pFuncs->Context.struct_size = sizeof(pFuncs->Context);
  return GPUP_STATUS_SUCCESS;
}

const GPUPDDI_CALLBACKS& callbacks() { return g_callbacks; }

void log_message(int level, std::string_view message) {
  const GPUPDDI_CALLBACKS& cb = g_callbacks;
  std::string text(message);
  if (cb.pfnLog != nullptr) {
    cb.pfnLog(cb.hSystem, level, text.c_str());
  } else if (level >= GPUPDDI_LOG_WARN) {
    std::fprintf(stderr, "kmd: %s\n", text.c_str());
  }
}

void notify_complete(GPUPDDI_SYSTEM_HANDLE hSystemContext, uint64_t submission_id, gpup_status status) {
  g_callbacks.pfnNotifySubmissionComplete(hSystemContext, submission_id, status);
}

std::string printable(std::string_view s, size_t max_len) {
  std::string out;
  const size_t n = std::min(s.size(), max_len);
  out.reserve(n + 3);
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    out.push_back(c >= 0x20 && c < 0x7f ? static_cast<char>(c) : '?');
  }
  if (s.size() > max_len) out += "...";
  return out;
}

void copy_fixed_string(char* dst, size_t dst_size, std::string_view s) {
  if (dst_size == 0) return;
  const size_t n = std::min(s.size(), dst_size - 1);
  std::memcpy(dst, s.data(), n);
  std::memset(dst + n, 0, dst_size - n);
}

// ---------------------------------------------------------------------------------------------
// Configuration

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

}  // namespace

Result<std::map<std::string, std::string>> parse_config(const char* text,
                                                        std::span<const std::string_view> known_keys) {
  std::map<std::string, std::string> out;
  if (text == nullptr) return out;
  std::string_view rest(text);
  unsigned line_no = 0;
  while (!rest.empty()) {
    const size_t nl = rest.find('\n');
    std::string_view line = trim(rest.substr(0, nl));
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    ++line_no;
    if (line.empty() || line.front() == '#') continue;
    const size_t eq = line.find('=');
    if (eq == std::string_view::npos) {
      return Error(GPUP_STATUS_INVALID_PARAMETER,
                   fmt::format("config line {} '{}' is not key=value", line_no, printable(line)));
    }
    const std::string_view key = trim(line.substr(0, eq));
    const std::string_view value = trim(line.substr(eq + 1));
    if (key.empty()) {
      return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("config line {} has an empty key", line_no));
    }
    if (std::find(known_keys.begin(), known_keys.end(), key) == known_keys.end()) {
      std::string known;
      for (std::string_view k : known_keys) known += (known.empty() ? "" : ", ") + std::string(k);
      return Error(GPUP_STATUS_INVALID_PARAMETER,
                   fmt::format("unknown config key '{}' (known: {})", printable(key), known));
    }
    if (!out.emplace(std::string(key), std::string(value)).second) {
      return Error(GPUP_STATUS_INVALID_PARAMETER, fmt::format("config key '{}' given twice", key));
    }
  }
  return out;
}

bool parse_u64(std::string_view s, uint64_t* out) {
  if (s.empty() || s.size() > 20) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Programs

namespace {

// Bytes [data, data+size) contain no NUL, except possibly the last one. Returns the length
// without that terminating NUL, or SIZE_MAX when a NUL sits elsewhere.
size_t nul_rule_length(const unsigned char* data, size_t size) {
  const void* nul = std::memchr(data, 0, size);
  if (nul == nullptr) return size;
  const size_t at = static_cast<size_t>(static_cast<const unsigned char*>(nul) - data);
  return at + 1 == size ? at : SIZE_MAX;
}

}  // namespace

namespace {

// The text rules of SOURCE content and of COMPILE set texts: no NUL but a terminating one, not
// empty. Copies the text without its NUL into out; false (with why) when a rule is broken.
bool take_text(const unsigned char* data, size_t size, std::vector<unsigned char>* out, std::string* why) {
  const size_t n = nul_rule_length(data, size);
  if (n == SIZE_MAX) {
    *why = "contains a NUL byte before its end";
    return false;
  }
  if (n == 0) {
    *why = "is empty";
    return false;
  }
  out->assign(data, data + n);
  return true;
}

// A COMPILE header's include name: 1..255 bytes, no NUL, no "..", not starting with '/' (PoCL
// writes the headers into a directory under these names).
bool valid_include_name(std::string_view name) {
  return !name.empty() && name.size() <= 255 && name.find('\0') == std::string_view::npos &&
         name.find("..") == std::string_view::npos && name.front() != '/';
}

// Parses the GPUP_OCL_SET_HEADER framing of COMPILE / LINK content (kmd_opencl.h).
Status parse_set(uint32_t format, const unsigned char* content, uint64_t size, std::vector<ProgramImage::Entry>* out) {
  auto bad = [&](std::string m) {
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("program descriptor: {} set: {}", format == GPUP_OCL_PROGRAM_COMPILE ? "COMPILE" : "LINK", m));
  };
  if (size < sizeof(GPUP_OCL_SET_HEADER)) return bad(fmt::format("{} bytes cannot hold the set header", size));
  GPUP_OCL_SET_HEADER header;
  std::memcpy(&header, content, sizeof(header));
  if (header.Magic != GPUP_OCL_SET_MAGIC) return bad(fmt::format("bad magic {:#010x}", header.Magic));
  if (header.Count == 0 || header.Count > GPUP_OCL_MAX_SET_ENTRIES) {
    return bad(fmt::format("Count {} outside 1..{}", header.Count, GPUP_OCL_MAX_SET_ENTRIES));
  }
  out->clear();
  out->reserve(header.Count);
  uint64_t at = sizeof(header);  // at <= size throughout
  for (uint32_t i = 0; i < header.Count; ++i) {
    const uint64_t aligned = (at + 7) & ~uint64_t{7};  // at <= 64 MiB: no overflow
    if (aligned > size) return bad(fmt::format("entry {} starts past the end", i));
    for (uint64_t p = at; p < aligned; ++p) {
      if (content[p] != 0) return bad(fmt::format("padding before entry {} is not zero", i));
    }
    at = aligned;
    if (size - at < sizeof(GPUP_OCL_SET_ENTRY)) return bad(fmt::format("entry {} header is truncated", i));
    GPUP_OCL_SET_ENTRY e;
    std::memcpy(&e, content + at, sizeof(e));
    at += sizeof(e);
    if (e.Reserved != 0) return bad(fmt::format("entry {} Reserved is not zero", i));
    const bool named = format == GPUP_OCL_PROGRAM_COMPILE && i > 0;
    if (!named && e.NameSize != 0) return bad(fmt::format("entry {} must have no name", i));
    if (named && (e.NameSize == 0 || e.NameSize > 255)) {
      return bad(fmt::format("entry {} NameSize {} outside 1..255", i, e.NameSize));
    }
    if (e.NameSize > size - at) return bad(fmt::format("entry {} name is truncated", i));
    const std::string_view name(reinterpret_cast<const char*>(content + at), e.NameSize);
    if (named && !valid_include_name(name)) {
      return bad(fmt::format("entry {} name '{}' is not a plain include name", i, printable(name)));
    }
    at += e.NameSize;
    if (e.DataSize > size - at) {
      return bad(fmt::format("entry {} DataSize {} exceeds the {} bytes left", i, e.DataSize, size - at));
    }
    ProgramImage::Entry entry;
    entry.name.assign(name);
    const unsigned char* data = content + at;
    const size_t data_size = static_cast<size_t>(e.DataSize);
    if (format == GPUP_OCL_PROGRAM_COMPILE) {
      std::string why;
      if (!take_text(data, data_size, &entry.data, &why)) return bad(fmt::format("entry {} text {}", i, why));
    } else {
      if (data_size == 0) return bad(fmt::format("entry {} binary is empty", i));
      entry.data.assign(data, data + data_size);
    }
    at += e.DataSize;
    out->push_back(std::move(entry));
  }
  if (at != size) return bad(fmt::format("{} bytes follow the last entry", size - at));
  return {};
}

}  // namespace

Result<ProgramImage> parse_program_desc(const void* data, uint32_t size) {
  auto bad = [](std::string m) { return Error(GPUP_STATUS_INVALID_PARAMETER, "program descriptor: " + m); };
  if (data == nullptr || size < sizeof(GPUP_OCL_PROGRAM_DESC)) {
    return bad(fmt::format("{} bytes of private data, need at least {}", data ? size : 0u,
                           sizeof(GPUP_OCL_PROGRAM_DESC)));
  }
  GPUP_OCL_PROGRAM_DESC desc;  // read the header exactly once
  std::memcpy(&desc, data, sizeof(desc));
  if (desc.Magic != GPUP_OCL_PROGRAM_MAGIC) return bad(fmt::format("bad magic {:#010x}", desc.Magic));
  if (desc.Version != 1 && desc.Version != GPUP_OCL_PROGRAM_VERSION) {
    return bad(fmt::format("unsupported version {}", desc.Version));
  }
  if (desc.Reserved != 0) return bad("Reserved is not zero");
  const bool v1_format = desc.Format == GPUP_OCL_PROGRAM_SOURCE || desc.Format == GPUP_OCL_PROGRAM_BINARY;
  const bool v2_format = desc.Format == GPUP_OCL_PROGRAM_COMPILE || desc.Format == GPUP_OCL_PROGRAM_LINK;
  if (!v1_format && !(v2_format && desc.Version >= 2)) {
    return bad(fmt::format("unknown format {} for version {}", desc.Format, desc.Version));
  }
  if (desc.OptionsSize > GPUP_OCL_MAX_OPTIONS_SIZE) {
    return bad(fmt::format("OptionsSize {} exceeds {}", desc.OptionsSize, GPUP_OCL_MAX_OPTIONS_SIZE));
  }
  if (desc.ContentSize == 0 || desc.ContentSize > GPUP_OCL_MAX_CONTENT_SIZE) {
    return bad(fmt::format("ContentSize {} outside 1..{}", desc.ContentSize, GPUP_OCL_MAX_CONTENT_SIZE));
  }
  // Both sizes are below 2^32, so the 64-bit sum cannot overflow.
  const uint64_t total = uint64_t{sizeof(desc)} + desc.OptionsSize + desc.ContentSize;
  if (total != size) {
    return bad(fmt::format("header {} + options {} + content {} = {} bytes, but {} were given", sizeof(desc),
                           desc.OptionsSize, desc.ContentSize, total, size));
  }
  const auto* bytes = static_cast<const unsigned char*>(data);
  const unsigned char* options = bytes + sizeof(desc);
  const unsigned char* content = options + desc.OptionsSize;

  ProgramImage image;
  image.version = desc.Version;
  image.format = desc.Format;
  if (desc.OptionsSize > 0) {
    const size_t n = nul_rule_length(options, desc.OptionsSize);
    if (n == SIZE_MAX) return bad("options contain a NUL byte before their end");
    image.options.assign(reinterpret_cast<const char*>(options), n);
  }
  switch (desc.Format) {
    case GPUP_OCL_PROGRAM_SOURCE: {
      std::string why;
      if (!take_text(content, desc.ContentSize, &image.content, &why)) return bad("source " + why);
      break;
    }
    case GPUP_OCL_PROGRAM_BINARY:
      image.content.assign(content, content + desc.ContentSize);
      break;
    default:
      if (Status s = parse_set(desc.Format, content, desc.ContentSize, &image.entries); !s) return s.error();
      break;
  }
  return image;
}

uint32_t write_build_result(void* out, uint32_t capacity, int32_t build_error, std::string_view log) {
  while (!log.empty() && log.back() == '\0') log.remove_suffix(1);
  if (out == nullptr || capacity < sizeof(GPUP_OCL_BUILD_RESULT)) return 0;
  const uint64_t log_size = std::min<uint64_t>(log.size(), UINT32_MAX);
  const uint32_t room = capacity - static_cast<uint32_t>(sizeof(GPUP_OCL_BUILD_RESULT));
  const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(room, log_size));
  GPUP_OCL_BUILD_RESULT header{};
  header.BuildError = build_error;
  header.LogSize = static_cast<uint32_t>(log_size);
  header.LogBytes = n;
  header.Truncated = n < log.size() ? 1u : 0u;
  auto* dst = static_cast<unsigned char*>(out);
  std::memcpy(dst, &header, sizeof(header));
  if (n > 0) std::memcpy(dst + sizeof(header), log.data(), n);
  return static_cast<uint32_t>(sizeof(header)) + n;
}

namespace {

constexpr uint64_t align8(uint64_t v) { return (v + 7) & ~uint64_t{7}; }

uint64_t kernel_size(const KernelDescription& k) {
  uint64_t n = align8(sizeof(GPUP_OCL_KERNEL_INFO) + uint64_t{k.name.size()} + k.attributes.size());
  for (const ArgDescription& a : k.args) {
    n += align8(sizeof(GPUP_OCL_KERNEL_ARG_INFO) + uint64_t{a.type_name.size()} + a.name.size());
  }
  return n;
}

// Appends bytes at *at and zero-pads to 8; the caller checked the room.
void put(unsigned char* out, uint64_t* at, const void* bytes, size_t n) {
  if (n > 0) std::memcpy(out + *at, bytes, n);
  *at += n;
}
void pad(unsigned char* out, uint64_t* at) {
  const uint64_t end = align8(*at);
  std::memset(out + *at, 0, static_cast<size_t>(end - *at));
  *at = end;
}

uint32_t clamp32(size_t n) { return static_cast<uint32_t>(std::min<size_t>(n, UINT32_MAX)); }

}  // namespace

uint64_t kernel_table_size(const ProgramDescription& program) {
  uint64_t n = 0;
  for (const KernelDescription& k : program.kernels) n += kernel_size(k);
  return n;
}

uint32_t write_program_output(void* out, uint32_t capacity, uint32_t version, int32_t build_error,
                              std::string_view log, const ProgramDescription* program) {
  constexpr uint64_t kResult = sizeof(GPUP_OCL_BUILD_RESULT);
  constexpr uint64_t kInfo = sizeof(GPUP_OCL_PROGRAM_INFO);
  if (version < 2 || out == nullptr || capacity < kResult + kInfo) {
    return write_build_result(out, capacity, build_error, log);
  }
  while (!log.empty() && log.back() == '\0') log.remove_suffix(1);
  static const ProgramDescription kFailed;
  const ProgramDescription& p = program != nullptr ? *program : kFailed;
  const uint64_t table = kernel_table_size(p);

  // The log gets what the header and the whole table leave (the largest L with
  // align8(kResult + L) + kInfo + table <= capacity), or nothing when they do not fit.
  uint64_t log_room = 0;
  if (kResult + kInfo + table <= capacity) {
    log_room = ((capacity - kInfo - table) & ~uint64_t{7}) - kResult;
  }
  const uint32_t written_log = write_build_result(out, static_cast<uint32_t>(kResult + std::min<uint64_t>(log_room, log.size())),
                                                  build_error, log);
  auto* dst = static_cast<unsigned char*>(out);
  uint64_t at = written_log;
  pad(dst, &at);
  const uint64_t info_at = at;
  at += kInfo;

  GPUP_OCL_PROGRAM_INFO info{};
  info.Magic = GPUP_OCL_PROGRAM_INFO_MAGIC;
  info.BinaryType = p.binary_type;
  info.KernelTableComplete = 1;
  for (const KernelDescription& k : p.kernels) {
    if (at + kernel_size(k) > capacity) {
      info.KernelTableComplete = 0;
      break;
    }
    GPUP_OCL_KERNEL_INFO ki = k.info;
    ki.NameSize = clamp32(k.name.size());
    ki.AttributesSize = clamp32(k.attributes.size());
    ki.NumArgs = clamp32(k.args.size());
    ki.Reserved = 0;
    put(dst, &at, &ki, sizeof(ki));
    put(dst, &at, k.name.data(), k.name.size());
    put(dst, &at, k.attributes.data(), k.attributes.size());
    pad(dst, &at);
    for (const ArgDescription& a : k.args) {
      GPUP_OCL_KERNEL_ARG_INFO ai = a.info;
      ai.TypeNameSize = clamp32(a.type_name.size());
      ai.NameSize = clamp32(a.name.size());
      ai.Reserved = 0;
      put(dst, &at, &ai, sizeof(ai));
      put(dst, &at, a.type_name.data(), a.type_name.size());
      put(dst, &at, a.name.data(), a.name.size());
      pad(dst, &at);
    }
    ++info.KernelCount;
  }
  info.KernelTableSize = at - info_at - kInfo;
  info.BinarySize = p.binary_size;
  if (info.KernelTableComplete && p.binary_size > 0 && p.binary.size() == p.binary_size &&
      p.binary_size <= capacity && at + align8(p.binary_size) <= capacity) {
    put(dst, &at, p.binary.data(), p.binary.size());
    pad(dst, &at);
    info.BinaryBytes = p.binary_size;
  }
  std::memcpy(dst + info_at, &info, sizeof(info));
  return static_cast<uint32_t>(at);
}

// ---------------------------------------------------------------------------------------------
// Escapes and queries

uint64_t fnv1a64(std::span<const unsigned char> bytes) {
  uint64_t h = GPUP_OCL_FNV1A64_OFFSET;
  for (unsigned char b : bytes) {
    h ^= b;
    h *= GPUP_OCL_FNV1A64_PRIME;
  }
  return h;
}

gpup_status handle_escape(const GPUPDDI_ARG_ESCAPE* args, const GPUPDDI_DEVICEINFO& info) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->pOutputDataWritten != nullptr) *args->pOutputDataWritten = 0;
  if (args->pPrivateDriverData == nullptr || args->PrivateDriverDataSize < sizeof(GPUP_OCL_PRIVATE_HEADER)) {
    logf(GPUPDDI_LOG_WARN, "escape: {} bytes of private data, need a {}-byte header", args->PrivateDriverDataSize,
         sizeof(GPUP_OCL_PRIVATE_HEADER));
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  GPUP_OCL_PRIVATE_HEADER header;
  std::memcpy(&header, args->pPrivateDriverData, sizeof(header));
  if (header.Magic != GPUP_OCL_ESCAPE_MAGIC) {
    logf(GPUPDDI_LOG_WARN, "escape: bad magic {:#010x}", header.Magic);
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  const std::span<const unsigned char> payload(
      static_cast<const unsigned char*>(args->pPrivateDriverData) + sizeof(header),
      args->PrivateDriverDataSize - sizeof(header));

  // Adding an escape: a code in kmd_opencl.h (private bit set unless a secure VM may send it), a
  // case here, a conformance test. Everything else is refused.
  const bool known = header.Code == GPUP_OCL_ESCAPE_DEVICE_INFO;
  if (args->Flags.DriverKnownEscape && !known) {
    logf(GPUPDDI_LOG_WARN, "escape: code {:#010x} is not a driver-known escape", header.Code);
    return GPUP_STATUS_ACCESS_DENIED;
  }
  switch (header.Code) {
    case GPUP_OCL_ESCAPE_DEVICE_INFO: {
      if (!payload.empty()) return GPUP_STATUS_INVALID_PARAMETER;
      if (args->pOutputData == nullptr) return GPUP_STATUS_INVALID_PARAMETER;
      if (args->OutputDataSize < sizeof(GPUP_OCL_ESCAPE_DEVICE_INFO_OUT)) return GPUP_STATUS_BUFFER_TOO_SMALL;
      GPUP_OCL_ESCAPE_DEVICE_INFO_OUT out{};
      out.Info = info;
      std::memcpy(args->pOutputData, &out, sizeof(out));
      if (args->pOutputDataWritten != nullptr) *args->pOutputDataWritten = sizeof(out);
      return GPUP_STATUS_SUCCESS;
    }
    case GPUP_OCL_ESCAPE_CHECKSUM: {
      if (args->pOutputData == nullptr) return GPUP_STATUS_INVALID_PARAMETER;
      if (args->OutputDataSize < sizeof(GPUP_OCL_ESCAPE_CHECKSUM_OUT)) return GPUP_STATUS_BUFFER_TOO_SMALL;
      GPUP_OCL_ESCAPE_CHECKSUM_OUT out{};
      out.ByteCount = payload.size();
      out.Fnv1a64 = fnv1a64(payload);
      std::memcpy(args->pOutputData, &out, sizeof(out));
      if (args->pOutputDataWritten != nullptr) *args->pOutputDataWritten = sizeof(out);
      return GPUP_STATUS_SUCCESS;
    }
    default:
      logf(GPUPDDI_LOG_WARN, "escape: unknown code {:#010x}", header.Code);
      return GPUP_STATUS_NOT_SUPPORTED;
  }
}

InfoList encode_info_list(const std::map<uint32_t, std::vector<unsigned char>>& records) {
  uint64_t total = sizeof(GPUP_OCL_INFO_LIST);
  for (const auto& [param, value] : records) total += sizeof(GPUP_OCL_INFO_RECORD) + align8(value.size());
  if (total > UINT32_MAX) throw std::length_error("device info list exceeds 4 GiB");
  InfoList out(static_cast<size_t>(total), 0);
  GPUP_OCL_INFO_LIST header{};
  header.Magic = GPUP_OCL_INFO_LIST_MAGIC;
  header.Count = static_cast<uint32_t>(records.size());
  header.TotalSize = static_cast<uint32_t>(total);
  std::memcpy(out.data(), &header, sizeof(header));
  size_t at = sizeof(header);
  for (const auto& [param, value] : records) {
    const GPUP_OCL_INFO_RECORD r{param, static_cast<uint32_t>(value.size())};
    std::memcpy(out.data() + at, &r, sizeof(r));
    at += sizeof(r);
    if (!value.empty()) std::memcpy(out.data() + at, value.data(), value.size());
    at += static_cast<size_t>(align8(value.size()));
  }
  return out;
}

namespace {

// Copies an encoded GPUP_OCL_INFO_LIST into a query's output; when it does not fit, only the
// list header (so the UMD learns TotalSize), or nothing when even that does not fit, and
// BUFFER_TOO_SMALL.
gpup_status write_info_list(const GPUPDDI_ARG_QUERYADAPTERINFO* args, const InfoList& list) {
  if (args->pOutputData == nullptr) return GPUP_STATUS_INVALID_PARAMETER;
  if (list.size() < sizeof(GPUP_OCL_INFO_LIST)) return GPUP_STATUS_INTERNAL;  // never encoded
  if (args->OutputDataSize < list.size()) {
    if (args->OutputDataSize < sizeof(GPUP_OCL_INFO_LIST)) return GPUP_STATUS_BUFFER_TOO_SMALL;
    std::memcpy(args->pOutputData, list.data(), sizeof(GPUP_OCL_INFO_LIST));
    if (args->pOutputDataWritten != nullptr) *args->pOutputDataWritten = sizeof(GPUP_OCL_INFO_LIST);
    return GPUP_STATUS_BUFFER_TOO_SMALL;
  }
  std::memcpy(args->pOutputData, list.data(), list.size());
  if (args->pOutputDataWritten != nullptr) *args->pOutputDataWritten = static_cast<uint32_t>(list.size());
  return GPUP_STATUS_SUCCESS;
}

}  // namespace

gpup_status handle_umd_private_query(const GPUPDDI_ARG_QUERYADAPTERINFO* args, const GPUP_OCL_UMD_INFO& info,
                                     const InfoList& device_info, const InfoList& image_formats) {
  if (args->pInputData == nullptr || args->InputDataSize != sizeof(GPUP_OCL_PRIVATE_HEADER)) {
    logf(GPUPDDI_LOG_WARN, "UMD-private query: {} bytes of input, need exactly {}", args->InputDataSize,
         sizeof(GPUP_OCL_PRIVATE_HEADER));
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  GPUP_OCL_PRIVATE_HEADER header;
  std::memcpy(&header, args->pInputData, sizeof(header));
  if (header.Magic != GPUP_OCL_QUERY_MAGIC) {
    logf(GPUPDDI_LOG_WARN, "UMD-private query: bad magic {:#010x}", header.Magic);
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  switch (header.Code) {
    case GPUP_OCL_QUERY_UMD_INFO:
      return write_query_output(args, info);
    case GPUP_OCL_QUERY_DEVICE_INFO:
      return write_info_list(args, device_info);
    case GPUP_OCL_QUERY_IMAGE_FORMATS:
      return write_info_list(args, image_formats);
    default:
      logf(GPUPDDI_LOG_WARN, "UMD-private query: unknown code {:#010x}", header.Code);
      return GPUP_STATUS_NOT_SUPPORTED;
  }
}

// ---------------------------------------------------------------------------------------------
// Images and samplers

uint32_t image_element_size(uint32_t order, uint32_t type) {
  using namespace cl_values;
  // Packed types hold every channel of a pixel in one word.
  switch (type) {
    case kUnormShort565:
    case kUnormShort555:
      return order == kRGB || order == kRGBx ? 2 : 0;
    case kUnormInt101010:
      return order == kRGB || order == kRGBx ? 4 : 0;
    case kUnormInt101010_2:
      return order == kRGBA ? 4 : 0;
    default:
      break;
  }
  if (order == kDepthStencil) return type == kUnormInt24 ? 4 : type == kFloat ? 8 : 0;
  uint32_t channel = 0;
  switch (type) {
    case kSnormInt8: case kUnormInt8: case kSignedInt8: case kUnsignedInt8: channel = 1; break;
    case kSnormInt16: case kUnormInt16: case kSignedInt16: case kUnsignedInt16: case kHalfFloat: channel = 2; break;
    case kSignedInt32: case kUnsignedInt32: case kFloat: channel = 4; break;
    case kUnormInt24: return order == kDepth ? 4 : 0;
    default: return 0;
  }
  switch (order) {
    case kR: case kA: case kIntensity: case kLuminance: case kDepth: return channel;
    case kRG: case kRA: case kRx: return 2 * channel;
    case kRGB: case kRGx: case kSRGB: return 3 * channel;
    case kRGBA: case kBGRA: case kARGB: case kABGR: case kRGBx: case kSRGBx: case kSRGBA: case kSBGRA:
      return 4 * channel;
    default: return 0;
  }
}

void ImageFormats::set(uint32_t image_type, uint64_t access, std::vector<Format> formats) {
  lists_[GPUP_OCL_IMAGE_FORMATS_KEY(image_type, access)] = std::move(formats);
}

bool ImageFormats::supports(uint32_t image_type, uint64_t access, uint32_t order, uint32_t type) const {
  auto it = lists_.find(GPUP_OCL_IMAGE_FORMATS_KEY(image_type, access));
  if (it == lists_.end()) return false;
  return std::any_of(it->second.begin(), it->second.end(),
                     [&](const Format& f) { return f.order == order && f.type == type; });
}

InfoList ImageFormats::encode() const {
  std::map<uint32_t, std::vector<unsigned char>> records;
  for (const auto& [key, formats] : lists_) {
    std::vector<unsigned char> value(formats.size() * 8);
    for (size_t i = 0; i < formats.size(); ++i) {
      std::memcpy(value.data() + i * 8, &formats[i].order, 4);
      std::memcpy(value.data() + i * 8 + 4, &formats[i].type, 4);
    }
    records.emplace(key, std::move(value));
  }
  return encode_info_list(records);
}

Result<ImageLayout> parse_image_desc(const void* data, uint32_t size, uint64_t allocation_size, bool read_only) {
  using namespace cl_values;
  auto bad = [](std::string m) { return Error(GPUP_STATUS_INVALID_PARAMETER, "image descriptor: " + m); };
  if (data == nullptr || size != sizeof(GPUP_OCL_IMAGE_DESC)) {
    return bad(fmt::format("{} bytes of private data, need exactly {}", data ? size : 0u, sizeof(GPUP_OCL_IMAGE_DESC)));
  }
  GPUP_OCL_IMAGE_DESC d;  // read the guest's bytes exactly once
  std::memcpy(&d, data, sizeof(d));
  if (d.Magic != GPUP_OCL_IMAGE_MAGIC) return bad(fmt::format("bad magic {:#010x}", d.Magic));

  ImageLayout l;
  l.image_type = d.ImageType;
  l.channel_order = d.ChannelOrder;
  l.channel_type = d.ChannelDataType;
  // Which of height, depth, array size and slice pitch the type uses.
  bool uses_height = false, uses_depth = false, uses_array = false;
  switch (d.ImageType) {
    case kImage1D: break;
    case kImage2D: uses_height = true; break;
    case kImage3D: uses_height = uses_depth = true; break;
    case kImage1DArray: uses_array = true; break;
    case kImage2DArray: uses_height = uses_array = true; break;
    default: return bad(fmt::format("image type {:#x} is not 1D, 2D, 3D, 1D array or 2D array", d.ImageType));
  }
  if (d.Width == 0) return bad("Width is 0");
  if (uses_height != (d.Height != 0)) return bad(fmt::format("Height {} for image type {:#x}", d.Height, d.ImageType));
  if (uses_depth != (d.Depth != 0)) return bad(fmt::format("Depth {} for image type {:#x}", d.Depth, d.ImageType));
  if (uses_array != (d.ArraySize != 0)) {
    return bad(fmt::format("ArraySize {} for image type {:#x}", d.ArraySize, d.ImageType));
  }
  l.width = d.Width;
  l.height = d.Height;
  l.depth = d.Depth;
  l.array_size = d.ArraySize;

  l.element_size = image_element_size(d.ChannelOrder, d.ChannelDataType);
  if (l.element_size == 0) {
    return bad(fmt::format("channel order {:#x} with data type {:#x} is not an image format", d.ChannelOrder,
                           d.ChannelDataType));
  }
  switch (d.Flags) {
    case 0: l.access = kMemReadWrite; break;
    case kMemReadWrite: case kMemReadOnly: case kMemWriteOnly: l.access = d.Flags; break;
    default: return bad(fmt::format("Flags {:#x} are not exactly one access flag", d.Flags));
  }
  if (read_only && l.access != kMemReadOnly) return bad("a read-only allocation holds only a READ_ONLY image");

  // Row: at least width * element size, a multiple of the element size.
  uint64_t row_min = 0;
  if (__builtin_mul_overflow(d.Width, uint64_t{l.element_size}, &row_min)) return bad("Width overflows");
  if (d.RowPitch < row_min || d.RowPitch % l.element_size != 0) {
    return bad(fmt::format("RowPitch {} below {} or not a multiple of the {}-byte element", d.RowPitch, row_min,
                           l.element_size));
  }
  l.row_pitch = d.RowPitch;
  // Slice: 3D and 2D arrays at least height rows (a whole number of them); 1D arrays use the
  // row pitch (SlicePitch 0 or equal to it); 1D and 2D images have none.
  const bool slices = uses_depth || (uses_array && uses_height);
  if (slices) {
    uint64_t slice_min = 0;
    if (__builtin_mul_overflow(d.Height, d.RowPitch, &slice_min)) return bad("Height * RowPitch overflows");
    if (d.SlicePitch < slice_min || d.SlicePitch % d.RowPitch != 0) {
      return bad(fmt::format("SlicePitch {} below {} or not a multiple of RowPitch", d.SlicePitch, slice_min));
    }
    l.slice_pitch = d.SlicePitch;
  } else if (d.ImageType == kImage1DArray) {
    if (d.SlicePitch != 0 && d.SlicePitch != d.RowPitch) {
      return bad(fmt::format("SlicePitch {} of a 1D array is neither 0 nor RowPitch", d.SlicePitch));
    }
    l.slice_pitch = d.RowPitch;
  } else if (d.SlicePitch != 0) {
    return bad(fmt::format("SlicePitch {} for an image without slices", d.SlicePitch));
  }

  // One past the last byte: the last pixel's row, slice and array layer, then one row's pixels.
  const uint64_t rows = uses_height ? d.Height : 1;
  const uint64_t layers = uses_depth ? d.Depth : uses_array ? d.ArraySize : 1;
  const uint64_t layer_pitch = uses_array && !uses_height ? d.RowPitch : l.slice_pitch;
  uint64_t end = 0, part = 0;
  if (__builtin_mul_overflow(rows - 1, d.RowPitch, &end) || __builtin_mul_overflow(layers - 1, layer_pitch, &part) ||
      __builtin_add_overflow(end, part, &end) || __builtin_add_overflow(end, row_min, &end)) {
    return bad("the image's extent overflows");
  }
  if (end > allocation_size) {
    return bad(fmt::format("the image ends at byte {}, past the {}-byte allocation", end, allocation_size));
  }
  l.bytes = end;
  return l;
}

Result<GPUP_OCL_SAMPLER_DESC> parse_sampler_desc(const void* data, uint32_t size) {
  using namespace cl_values;
  auto bad = [](std::string m) { return Error(GPUP_STATUS_INVALID_PARAMETER, "sampler: " + m); };
  if (data == nullptr || size != sizeof(GPUP_OCL_SAMPLER_DESC)) {
    return bad(fmt::format("{} bytes, need exactly {}", data ? size : 0u, sizeof(GPUP_OCL_SAMPLER_DESC)));
  }
  GPUP_OCL_SAMPLER_DESC d;
  std::memcpy(&d, data, sizeof(d));
  if (d.NormalizedCoords > 1) return bad(fmt::format("NormalizedCoords {} is not 0 or 1", d.NormalizedCoords));
  if (d.AddressingMode < kAddressNone || d.AddressingMode > kAddressMirroredRepeat) {
    return bad(fmt::format("unknown addressing mode {:#x}", d.AddressingMode));
  }
  if (d.FilterMode != kFilterNearest && d.FilterMode != kFilterLinear) {
    return bad(fmt::format("unknown filter mode {:#x}", d.FilterMode));
  }
  if (!d.NormalizedCoords && (d.AddressingMode == kAddressRepeat || d.AddressingMode == kAddressMirroredRepeat)) {
    return bad("REPEAT and MIRRORED_REPEAT need normalized coordinates");
  }
  if (d.Reserved != 0) return bad("Reserved is not 0");
  return d;
}

GPUPDDI_GPUMMUCAPS standard_mmu_caps(bool cache_coherent) {
  GPUPDDI_GPUMMUCAPS caps{};
  caps.ReadOnlyMemorySupported = 1;
  caps.NoExecuteMemorySupported = 0;
  caps.CacheCoherentMemorySupported = cache_coherent ? 1 : 0;
  caps.VirtualAddressBitCount = 48;
  caps.PageTableLevelCount = kMmuLevels;
  caps.PageSizeInBytes = 4096;
  // A leaf table covers 512 4 KiB pages = 2 MiB; with 64 KiB pages it needs 32 eight-byte entries.
  caps.LeafPageTableSizeFor64KPagesInBytes = (512 / 16) * 8;
  return caps;
}

GPUPDDI_QUERYSEGMENTOUT standard_segments(uint64_t global_mem_size) {
  GPUPDDI_QUERYSEGMENTOUT out{};
  out.NbSegment = 2;
  out.Segments[0].BaseAddress = 0;  // segment 1: device memory
  out.Segments[0].Size = global_mem_size;
  out.Segments[1].BaseAddress = global_mem_size;  // segment 2: system memory the device sees
  out.Segments[1].Size = global_mem_size;
  out.Segments[1].CpuVisible = 1;
  out.Segments[1].Aperture = 1;
  return out;
}

gpup_status answer_page_table_level(const GPUPDDI_ARG_QUERYADAPTERINFO* args) {
  if (args->pInputData == nullptr || args->InputDataSize != sizeof(uint32_t)) return GPUP_STATUS_INVALID_PARAMETER;
  uint32_t level;
  std::memcpy(&level, args->pInputData, sizeof(level));
  if (level >= kMmuLevels) return GPUP_STATUS_INVALID_PARAMETER;
  GPUPDDI_PAGETABLELEVELDESC desc{};
  desc.PageTableIndexBitCount = 9;
  desc.PageTableSegmentId = 1;
  desc.PagingProcessPageTableSegmentId = 1;
  desc.PageTableSizeInBytes = 4096;
  desc.PageTableAlignmentInBytes = 4096;
  return write_query_output(args, desc);
}

// ---------------------------------------------------------------------------------------------
// Processes and VM data

namespace {

constexpr size_t kMaxNameLength = 256;

std::string guid_string(const GPUPDDI_GUID& g) {
  const uint8_t* b = g.Bytes;
  return fmt::format("{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                     b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
                     b[15]);
}

}  // namespace

gpup_status ProcessTable::create(GPUPDDI_ARG_CREATEPROCESS* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  const GPUPDDI_CREATEPROCESSFLAGS f = args->Flags;
  if (f.Reserved != 0) return GPUP_STATUS_INVALID_PARAMETER;
  if (f.VirtualMachineProcess && f.VirtualMachineWorkerProcess) {
    log_message(GPUPDDI_LOG_WARN, "CreateProcess: VirtualMachineProcess and VirtualMachineWorkerProcess are exclusive");
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  if (args->ProcessNameLength > 0 && args->pProcessName == nullptr) return GPUP_STATUS_INVALID_PARAMETER;

  auto process = std::make_unique<Process>();
  process->flags = f;
  process->host_cookie = args->hDxgkProcess;
  process->guest_pid = args->ProcessId;
  if (args->pProcessName != nullptr) {  // kept for logs: bounded, printable
    const size_t n = std::min<size_t>(args->ProcessNameLength, kMaxNameLength);
    process->name = printable(std::string_view(args->pProcessName, n), kMaxNameLength);
  }

  std::lock_guard lock(mu_);
  if (f.VirtualMachineProcess) {
    auto it = processes_.find(static_cast<const KmdObject*>(args->hKmdVmWorkerProcess));
    if (it == processes_.end() || !it->second->is_worker()) {
      log_message(GPUPDDI_LOG_WARN, "CreateProcess: VirtualMachineProcess needs hKmdVmWorkerProcess to be a "
                                    "live VirtualMachineWorkerProcess");
      return GPUP_STATUS_INVALID_PARAMETER;
    }
    process->worker_id = it->second->id;
  } else if (args->hKmdVmWorkerProcess != nullptr) {
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  process->id = next_id_++;
  logf(GPUPDDI_LOG_DEBUG, "process {} '{}' pid {} created ({}{})", process->id, process->name, process->guest_pid,
       f.VirtualMachineWorkerProcess ? "VM worker"
       : f.VirtualMachineProcess     ? "VM process"
       : f.SystemProcess             ? "system"
                                     : "host",
       process->worker_id ? fmt::format(", worker {}", process->worker_id) : std::string());
  args->hKmdProcess = adopt_locked(processes_, std::move(process));
  return GPUP_STATUS_SUCCESS;
}

void ProcessTable::destroy(GPUPDDI_HANDLE h) {
  std::unique_ptr<Process> dead;
  {
    std::lock_guard lock(mu_);
    dead = take_locked(processes_, static_cast<const KmdObject*>(h), "DestroyProcess: unknown process handle");
    if (dead == nullptr) return;
    if (dead->is_worker()) {
      for (auto& [key, p] : processes_) {
        if (p->worker_id == dead->id) {
          logf(GPUPDDI_LOG_WARN, "DestroyProcess: worker {} destroyed before its VM process {}", dead->id, p->id);
        }
      }
    }
  }
  logf(GPUPDDI_LOG_DEBUG, "process {} '{}' destroyed", dead->id, dead->name);
}

gpup_status ProcessTable::set_vm_data(const GPUPDDI_ARG_SETVIRTUALMACHINEDATA* args) {
  if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->Flags.Reserved != 0 || args->pVmGuid == nullptr) return GPUP_STATUS_INVALID_PARAMETER;
  if (args->ComputeWeight < 1 || args->ComputeWeight > 10000 || args->MaxComputePercent < 1 ||
      args->MaxComputePercent > 100) {
    logf(GPUPDDI_LOG_WARN, "SetVirtualMachineData: ComputeWeight {} (1..10000) / MaxComputePercent {} (1..100)",
         args->ComputeWeight, args->MaxComputePercent);
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  if (args->MaxPartitionVRAM != 0 && args->MinPartitionVRAM > args->MaxPartitionVRAM) {
    logf(GPUPDDI_LOG_WARN, "SetVirtualMachineData: MinPartitionVRAM {} > MaxPartitionVRAM {}", args->MinPartitionVRAM,
         args->MaxPartitionVRAM);
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  VmData data;
  data.guid = *args->pVmGuid;
  if (args->pVmName != nullptr) {
    data.name = printable(std::string_view(args->pVmName, strnlen(args->pVmName, kMaxNameLength)), kMaxNameLength);
  }
  data.min_vram = args->MinPartitionVRAM;
  data.max_vram = args->MaxPartitionVRAM;
  data.optimal_vram = args->OptimalPartitionVRAM;
  data.compute_weight = args->ComputeWeight;
  data.max_compute_percent = args->MaxComputePercent;
  data.secure = args->Flags.SecureVirtualMachine != 0;

  std::lock_guard lock(mu_);
  auto it = processes_.find(static_cast<const KmdObject*>(args->hKmdVmWorkerProcess));
  if (it == processes_.end() || !it->second->is_worker()) {
    log_message(GPUPDDI_LOG_WARN, "SetVirtualMachineData: hKmdVmWorkerProcess is not a live worker process");
    return GPUP_STATUS_INVALID_PARAMETER;
  }
  Process& worker = *it->second;
  data.updates = worker.vm ? worker.vm->updates + 1 : 1;
  logf(GPUPDDI_LOG_INFO,
       "VM '{}' {} {}: secure={} VRAM min/optimal/max {}/{}/{} compute weight {} cap {}% (worker process {})",
       data.name, guid_string(data.guid), data.updates == 1 ? "registered" : "updated", data.secure, data.min_vram,
       data.optimal_vram, data.max_vram, data.compute_weight, data.max_compute_percent, worker.id);
  worker.vm = std::make_unique<VmData>(std::move(data));
  return GPUP_STATUS_SUCCESS;
}

Process* ProcessTable::find(GPUPDDI_HANDLE h) {
  return find_owned(mu_, processes_, static_cast<const KmdObject*>(h));
}

void ProcessTable::clear() {
  OwnedObjects<Process> dead;
  std::lock_guard lock(mu_);
  dead.swap(processes_);
}

size_t ProcessTable::size() {
  std::lock_guard lock(mu_);
  return processes_.size();
}

gpup_status write_query_text(const GPUPDDI_ARG_QUERYADAPTERINFO* args, std::string_view text) {
  if (args->pOutputDataWritten == nullptr) return GPUP_STATUS_INVALID_PARAMETER;
  const size_t need = text.size() + 1;
  if (need > UINT32_MAX) return GPUP_STATUS_INTERNAL;
  *args->pOutputDataWritten = static_cast<uint32_t>(need);
  if (args->pOutputData == nullptr || args->OutputDataSize < need) return GPUP_STATUS_BUFFER_TOO_SMALL;
  std::memcpy(args->pOutputData, text.data(), text.size());
  static_cast<char*>(args->pOutputData)[text.size()] = '\0';
  return GPUP_STATUS_SUCCESS;
}

}  // namespace gpup::kmd
