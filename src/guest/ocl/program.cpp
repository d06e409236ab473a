// Programs and kernels.
//
// A build, compile or link is one program allocation created on the host (one round trip): its
// private data carries the options and the content, and the KMD answers with the build log, the
// kernel table and the binary (GPUP_OCL_PROGRAM_INFO). Everything the application asks about the
// program or its kernels afterwards is answered from that answer; clSetKernelArg crosses nothing.
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "guest/ocl/icd.h"

namespace gpup::ocl {

namespace {

constexpr uint32_t kInlineOutput = 60 * 1024;  // the build output asked for first

size_t align8(size_t n) { return (n + 7) & ~size_t{7}; }

struct BuildInput {
  uint32_t format = GPUP_OCL_PROGRAM_SOURCE;
  std::string options;
  std::vector<uint8_t> content;
};

// Parses the KMD's answer (GPUP_OCL_BUILD_RESULT, log, GPUP_OCL_PROGRAM_INFO). The host is the
// device's driver, but its answer is still checked against the buffer it arrived in.
bool parse_output(const uint8_t* p, size_t n, Build* b, cl_int* build_error) {
  GPUP_OCL_BUILD_RESULT r;
  if (n < sizeof r) return false;
  std::memcpy(&r, p, sizeof r);
  if (r.LogBytes > n - sizeof r) return false;
  *build_error = r.BuildError;
  b->log.assign(reinterpret_cast<const char*>(p + sizeof r), r.LogBytes);
  size_t at = align8(sizeof r + r.LogBytes);
  GPUP_OCL_PROGRAM_INFO info;
  if (at + sizeof info > n) return true;  // no program info (a failed build may end here)
  std::memcpy(&info, p + at, sizeof info);
  if (info.Magic != GPUP_OCL_PROGRAM_INFO_MAGIC) return false;
  at += sizeof info;
  b->binary_type = info.BinaryType;
  b->binary_size = info.BinarySize;
  b->table_complete = info.KernelTableComplete != 0;
  if (info.KernelTableSize > n - at) return false;
  const size_t table_end = at + info.KernelTableSize;
  for (uint32_t k = 0; k < info.KernelCount; ++k) {
    KernelMeta meta;
    if (at + sizeof meta.info > table_end) return false;
    std::memcpy(&meta.info, p + at, sizeof meta.info);
    at += sizeof meta.info;
    if (size_t{meta.info.NameSize} + meta.info.AttributesSize > table_end - at) return false;
    meta.name.assign(reinterpret_cast<const char*>(p + at), meta.info.NameSize);
    meta.attributes.assign(reinterpret_cast<const char*>(p + at + meta.info.NameSize), meta.info.AttributesSize);
    at = align8(at + meta.info.NameSize + meta.info.AttributesSize);
    for (uint32_t a = 0; a < meta.info.NumArgs; ++a) {
      ArgMeta arg;
      if (at + sizeof arg.info > table_end) return false;
      std::memcpy(&arg.info, p + at, sizeof arg.info);
      at += sizeof arg.info;
      if (size_t{arg.info.TypeNameSize} + arg.info.NameSize > table_end - at) return false;
      arg.type_name.assign(reinterpret_cast<const char*>(p + at), arg.info.TypeNameSize);
      arg.name.assign(reinterpret_cast<const char*>(p + at + arg.info.TypeNameSize), arg.info.NameSize);
      at = align8(at + arg.info.TypeNameSize + arg.info.NameSize);
      meta.args.push_back(std::move(arg));
    }
    b->kernels.push_back(std::move(meta));
  }
  at = table_end;
  if (info.BinaryBytes != 0) {
    if (info.BinaryBytes != info.BinarySize || info.BinaryBytes > n - at) return false;
    b->binary.assign(p + at, p + at + info.BinaryBytes);
  }
  return true;
}

// Creates the program allocation on the host. Returns the CL error of the build (CL_SUCCESS,
// CL_BUILD_PROGRAM_FAILURE, CL_INVALID_BUILD_OPTIONS, ...) with `b` filled.
cl_int host_build(GPUPKMT_HANDLE hw_device, cl_device_id d, const BuildInput& in, uint32_t output_capacity, Build* b) {
  GPUP_OCL_PROGRAM_DESC desc{GPUP_OCL_PROGRAM_MAGIC, GPUP_OCL_PROGRAM_VERSION, in.format,
                             static_cast<uint32_t>(in.options.size()), static_cast<uint32_t>(in.content.size()), 0};
  std::vector<uint8_t> priv(sizeof desc + in.options.size() + in.content.size());
  std::memcpy(priv.data(), &desc, sizeof desc);
  std::memcpy(priv.data() + sizeof desc, in.options.data(), in.options.size());
  if (!in.content.empty()) std::memcpy(priv.data() + sizeof desc + in.options.size(), in.content.data(), in.content.size());
  std::vector<uint8_t> out(output_capacity);
  GPUPKMT_CREATEALLOCATION ca{};
  ca.hDevice = hw_device;
  ca.Flags = GPUPKMT_ALLOCATION_PROGRAM;
  ca.pPrivateDriverData = priv.data();
  ca.PrivateDriverDataSize = static_cast<uint32_t>(priv.size());
  ca.pOutputData = out.data();
  ca.OutputDataSize = output_capacity;
  gpup_status s = GpupKmtCreateAllocation(&ca);
  b->device = d;
  b->hw_device = hw_device;
  b->options = in.options;
  b->format = in.format;
  b->content = in.content;
  cl_int build_error = CL_SUCCESS;
  const bool parsed = parse_output(out.data(), std::min<size_t>(ca.OutputDataWritten, out.size()), b, &build_error);
  if (s == GPUP_STATUS_SUCCESS) {
    b->allocation = ca.hAllocation;
    if (!parsed) return CL_OUT_OF_RESOURCES;
    return CL_SUCCESS;
  }
  if (s == GPUP_STATUS_BUILD_FAILED || ca.KmdStatus == GPUP_STATUS_BUILD_FAILED) {
    if (!parsed || build_error == CL_SUCCESS) build_error = CL_BUILD_PROGRAM_FAILURE;
    return build_error;
  }
  log_failure("building a program on the host", s);
  if (b->log.empty()) b->log = GpupKmtGetLastErrorMessage();
  // The host reset the partition during the build (it ran past the partition's build timeout):
  // a failed build, whose log says why, as applications look for one.
  if (s == GPUP_STATUS_DEVICE_REMOVED) return CL_BUILD_PROGRAM_FAILURE;
  return cl_error_from_status(s, CL_OUT_OF_HOST_MEMORY);
}

// The headers an application's "-I DIR" options make visible. The device compiles on the host, in a
// worker that sees none of the guest's files, so the guest ships them: every regular file under
// each directory (3 levels deep at most; up to kMaxIncludeFiles files of at most 1 MiB, 16 MiB in
// all), named by its path below the directory, the first directory's file winning as in a search
// path. Empty when the options name no directory.
constexpr size_t kMaxIncludeFiles = 512, kMaxIncludeFile = 1u << 20, kMaxIncludeBytes = 16u << 20;

void collect_headers(const std::string& dir, const std::string& prefix, int depth,
                     std::vector<std::pair<std::string, std::string>>& out, size_t& bytes) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') names.emplace_back(e->d_name);
  ::closedir(d);
  std::sort(names.begin(), names.end());
  for (const auto& n : names) {
    const std::string path = dir + "/" + n, name = prefix.empty() ? n : prefix + "/" + n;
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      if (depth < 3) collect_headers(path, name, depth + 1, out, bytes);
      continue;
    }
    if (!S_ISREG(st.st_mode) || static_cast<size_t>(st.st_size) > kMaxIncludeFile ||
        bytes + static_cast<size_t>(st.st_size) > kMaxIncludeBytes || out.size() >= kMaxIncludeFiles)
      continue;
    if (std::any_of(out.begin(), out.end(), [&](const auto& h) { return h.first == name; })) continue;
    std::ifstream in(path, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in && !in.eof()) continue;
    bytes += text.str().size();
    out.emplace_back(name, text.str());
  }
}

std::vector<std::pair<std::string, std::string>> include_dir_headers(const std::string& options) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t bytes = 0;
  std::istringstream words(options);
  std::string w;
  while (words >> w) {
    std::string dir;
    if (w == "-I") {
      if (!(words >> dir)) break;
    } else if (w.size() > 2 && w.compare(0, 2, "-I") == 0) {
      dir = w.substr(2);
    } else {
      continue;
    }
    if (dir.size() >= 2 && dir.front() == '"' && dir.back() == '"') dir = dir.substr(1, dir.size() - 2);
    collect_headers(dir, "", 0, out, bytes);
  }
  return out;
}

std::shared_ptr<Build> run_build(cl_context c, const BuildInput& in, cl_int* err) {
  cl_device_id d = c->devices.front();
  auto b = std::make_shared<Build>();
  *err = host_build(c->hw_device, d, in, kInlineOutput, b.get());
  // A kernel table that did not fit (hundreds of kernels): ask again with more room; the answer
  // then travels in a shared section.
  for (uint32_t room = 1u << 20; *err == CL_SUCCESS && !b->table_complete && room <= (32u << 20); room *= 8) {
    auto again = std::make_shared<Build>();
    *err = host_build(c->hw_device, d, in, room, again.get());
    b = std::move(again);
  }
  // A compiled object's binary is needed for linking: ask again with room for it.
  if (*err == CL_SUCCESS && b->binary.empty() && b->binary_size != 0 &&
      b->binary_type == CL_PROGRAM_BINARY_TYPE_COMPILED_OBJECT) {
    auto again = std::make_shared<Build>();
    const uint64_t want = b->binary_size + (uint64_t{2} << 20);
    if (want <= GPUPKMT_MAX_OUTPUT_DATA_SIZE && host_build(c->hw_device, d, in, static_cast<uint32_t>(want), again.get()) == CL_SUCCESS)
      b = std::move(again);
  }
  b->status = *err == CL_SUCCESS ? CL_BUILD_SUCCESS : CL_BUILD_ERROR;
  return b;
}

// A binary too large for the first answer is fetched when the application asks for it, by
// building the same input again with room for it (the host's compiler cache makes that cheap).
void ensure_binary(Build* b) {
  if (!b->binary.empty() || b->binary_size == 0 || b->format == 0) return;
  Build again;
  BuildInput in{b->format, b->options, b->content};
  // Room for the log and the kernel table again, then the binary.
  const uint64_t want = b->binary_size + (uint64_t{2} << 20);
  if (want > GPUPKMT_MAX_OUTPUT_DATA_SIZE) return;
  if (host_build(b->hw_device, b->device, in, static_cast<uint32_t>(want), &again) == CL_SUCCESS) b->binary = std::move(again.binary);
}

std::string options_string(const char* options) { return options ? std::string(options) : std::string(); }

// Entries start 8-byte aligned; the set ends with the last entry's data (no trailing padding).
void append_set_entry(std::vector<uint8_t>* set, std::string_view name, const void* data, size_t size) {
  GPUP_OCL_SET_ENTRY e{static_cast<uint32_t>(name.size()), 0, size};
  const size_t at = align8(set->size());
  set->resize(at + sizeof e + name.size() + size, 0);
  std::memcpy(set->data() + at, &e, sizeof e);
  if (!name.empty()) std::memcpy(set->data() + at + sizeof e, name.data(), name.size());
  if (size) std::memcpy(set->data() + at + sizeof e + name.size(), data, size);
}

std::vector<uint8_t> set_header(uint32_t count) {
  GPUP_OCL_SET_HEADER h{GPUP_OCL_SET_MAGIC, count};
  std::vector<uint8_t> v(sizeof h);
  std::memcpy(v.data(), &h, sizeof h);
  return v;
}

cl_int check_device_list(cl_program p, cl_uint num_devices, const cl_device_id* device_list) {
  if ((num_devices == 0) != (device_list == nullptr)) return CL_INVALID_VALUE;
  for (cl_uint i = 0; i < num_devices; ++i) {
    if (!valid(device_list[i]) ||
        std::find(p->devices.begin(), p->devices.end(), device_list[i]) == p->devices.end())
      return CL_INVALID_DEVICE;
  }
  return CL_SUCCESS;
}

cl_program new_program(cl_context c) {
  auto* p = new _cl_program();
  p->context = c;
  context_retain(c);
  p->devices = c->devices;
  return p;
}

template <typename T>
T* fail(cl_int* errcode_ret, cl_int e) {
  if (errcode_ret) *errcode_ret = e;
  return nullptr;
}

}  // namespace

Build::~Build() {
  if (allocation != 0) {
    GPUPKMT_DESTROYALLOCATION d{hw_device, allocation};
    if (gpup_status s = GpupKmtDestroyAllocation(&d); GPUP_FAILED(s)) log_failure("destroying a program", s);
  }
}

void program_retain(cl_program p) { p->refs.fetch_add(1, std::memory_order_relaxed); }

void program_release(cl_program p) {
  if (p->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  for (auto it = p->release_callbacks.rbegin(); it != p->release_callbacks.rend(); ++it) it->first(p, it->second);
  cl_context c = p->context;
  p->magic = Magic::kDead;
  delete p;
  context_release(c);
}

void kernel_retain(cl_kernel k) { k->refs.fetch_add(1, std::memory_order_relaxed); }

void kernel_release(cl_kernel k) {
  if (k->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  cl_program p = k->program;
  p->kernels_attached.fetch_sub(1, std::memory_order_relaxed);
  k->magic = Magic::kDead;
  delete k;
  program_release(p);
}

}  // namespace gpup::ocl

using namespace gpup::ocl;

namespace gpup::ocl::api {

cl_program CreateProgramWithSource(cl_context c, cl_uint count, const char** strings, const size_t* lengths,
                                   cl_int* errcode_ret) {
  if (!valid(c)) return fail<_cl_program>(errcode_ret, CL_INVALID_CONTEXT);
  if (count == 0 || strings == nullptr) return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
  std::string source;
  for (cl_uint i = 0; i < count; ++i) {
    if (strings[i] == nullptr) return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
    if (lengths == nullptr || lengths[i] == 0) source += strings[i];
    else source.append(strings[i], lengths[i]);
  }
  cl_program p = new_program(c);
  p->source = std::move(source);
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return p;
}

cl_program CreateProgramWithBinary(cl_context c, cl_uint num_devices, const cl_device_id* device_list,
                                   const size_t* lengths, const unsigned char** binaries, cl_int* binary_status,
                                   cl_int* errcode_ret) {
  if (!valid(c)) return fail<_cl_program>(errcode_ret, CL_INVALID_CONTEXT);
  if (num_devices == 0 || device_list == nullptr) return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
  for (cl_uint i = 0; i < num_devices; ++i) {
    if (!valid(device_list[i]) ||
        std::find(c->devices.begin(), c->devices.end(), device_list[i]) == c->devices.end())
      return fail<_cl_program>(errcode_ret, CL_INVALID_DEVICE);
  }
  if (lengths == nullptr || binaries == nullptr) return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
  for (cl_uint i = 0; i < num_devices; ++i) {
    if (lengths[i] == 0 || binaries[i] == nullptr) {
      if (binary_status) binary_status[i] = CL_INVALID_VALUE;
      return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
    }
  }
  // The host device checks the binary now, as a native implementation does at creation: it is
  // built without options, and that build serves a later clBuildProgram with no options.
  BuildInput in;
  in.format = GPUP_OCL_PROGRAM_BINARY;
  in.content.assign(binaries[0], binaries[0] + lengths[0]);
  auto b = std::make_shared<Build>();
  const cl_int err = host_build(c->hw_device, device_list[0], in, kInlineOutput, b.get());
  if (err == CL_INVALID_BINARY || err == CL_BUILD_PROGRAM_FAILURE) {
    if (binary_status) binary_status[0] = CL_INVALID_BINARY;
    return fail<_cl_program>(errcode_ret, CL_INVALID_BINARY);
  }
  if (err != CL_SUCCESS) return fail<_cl_program>(errcode_ret, err);
  b->binary = in.content;  // what the application gave is what it reads back
  b->binary_size = b->binary.size();
  b->status = CL_BUILD_NONE;
  cl_program p = new_program(c);
  p->devices.assign(device_list, device_list + 1);
  p->input_binary = std::move(in.content);
  p->build = std::move(b);
  if (binary_status) {
    for (cl_uint i = 0; i < num_devices; ++i) binary_status[i] = CL_SUCCESS;
  }
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return p;
}

cl_program CreateProgramWithBuiltInKernels(cl_context c, cl_uint num_devices, const cl_device_id* device_list,
                                           const char* kernel_names, cl_int* errcode_ret) {
  if (!valid(c)) return fail<_cl_program>(errcode_ret, CL_INVALID_CONTEXT);
  if (num_devices == 0 || device_list == nullptr || kernel_names == nullptr)
    return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
  for (cl_uint i = 0; i < num_devices; ++i)
    if (!valid(device_list[i])) return fail<_cl_program>(errcode_ret, CL_INVALID_DEVICE);
  return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);  // CL_DEVICE_BUILT_IN_KERNELS is empty
}

cl_program CreateProgramWithIL(cl_context c, const void*, size_t, cl_int* errcode_ret) {
  if (!valid(c)) return fail<_cl_program>(errcode_ret, CL_INVALID_CONTEXT);
  return fail<_cl_program>(errcode_ret, CL_INVALID_OPERATION);  // no IL is supported
}

cl_int RetainProgram(cl_program p) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  program_retain(p);
  return CL_SUCCESS;
}

cl_int ReleaseProgram(cl_program p) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  program_release(p);
  return CL_SUCCESS;
}

cl_int BuildProgram(cl_program p, cl_uint num_devices, const cl_device_id* device_list, const char* options,
                    void(CL_CALLBACK* notify)(cl_program, void*), void* user_data) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  if (cl_int e = check_device_list(p, num_devices, device_list); e != CL_SUCCESS) return e;
  if (notify == nullptr && user_data != nullptr) return CL_INVALID_VALUE;
  if (p->kernels_attached.load() != 0) return CL_INVALID_OPERATION;
  BuildInput in;
  in.options = options_string(options);
  {
    std::lock_guard lock(p->mu);
    if (!p->input_binary.empty() && in.options.empty() && p->build && p->build->allocation != 0 &&
        p->build->options.empty()) {
      p->build->status = CL_BUILD_SUCCESS;  // the build made when the binary was checked
      if (notify) notify(p, user_data);
      return CL_SUCCESS;
    }
    if (!p->input_binary.empty()) {
      in.format = GPUP_OCL_PROGRAM_BINARY;
      in.content = p->input_binary;
    } else if (!p->source.empty()) {
      in.content.assign(p->source.begin(), p->source.end());
    } else {
      return CL_INVALID_OPERATION;  // a linked program: nothing to build from
    }
  }
  cl_int err = CL_SUCCESS;
  std::shared_ptr<Build> b;
  auto headers = in.format == GPUP_OCL_PROGRAM_SOURCE ? include_dir_headers(in.options)
                                                      : std::vector<std::pair<std::string, std::string>>();
  if (headers.empty()) {
    b = run_build(p->context, in, &err);
  } else {
    // The guest's include directories travel with the source: compile with them as headers,
    // then link into the executable the build would have made.
    BuildInput compile;
    compile.format = GPUP_OCL_PROGRAM_COMPILE;
    compile.options = in.options;
    std::vector<uint8_t> set = set_header(static_cast<uint32_t>(1 + headers.size()));
    append_set_entry(&set, {}, in.content.data(), in.content.size());
    for (const auto& [name, text] : headers) append_set_entry(&set, name, text.data(), text.size());
    compile.content = std::move(set);
    b = run_build(p->context, compile, &err);
    if (err == CL_SUCCESS) {
      BuildInput link;
      link.format = GPUP_OCL_PROGRAM_LINK;
      std::vector<uint8_t> objects = set_header(1);
      append_set_entry(&objects, {}, b->binary.data(), b->binary.size());
      link.content = std::move(objects);
      std::string compile_log = b->log;
      b = run_build(p->context, link, &err);
      b->log = compile_log + b->log;
    }
    b->options = in.options;
  }
  {
    std::lock_guard lock(p->mu);
    p->build = b;
  }
  if (notify) notify(p, user_data);
  return err;
}

cl_int CompileProgram(cl_program p, cl_uint num_devices, const cl_device_id* device_list, const char* options,
                      cl_uint num_headers, const cl_program* headers, const char** header_names,
                      void(CL_CALLBACK* notify)(cl_program, void*), void* user_data) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  if (cl_int e = check_device_list(p, num_devices, device_list); e != CL_SUCCESS) return e;
  if (notify == nullptr && user_data != nullptr) return CL_INVALID_VALUE;
  if ((num_headers == 0) != (headers == nullptr) || (num_headers == 0) != (header_names == nullptr))
    return CL_INVALID_VALUE;
  if (p->kernels_attached.load() != 0) return CL_INVALID_OPERATION;
  if (p->source.empty()) return CL_INVALID_OPERATION;
  std::vector<uint8_t> set = set_header(1 + num_headers);
  append_set_entry(&set, {}, p->source.data(), p->source.size());
  for (cl_uint i = 0; i < num_headers; ++i) {
    if (!valid(headers[i])) return CL_INVALID_PROGRAM;
    if (header_names[i] == nullptr) return CL_INVALID_VALUE;
    append_set_entry(&set, header_names[i], headers[i]->source.data(), headers[i]->source.size());
  }
  BuildInput in;
  in.format = GPUP_OCL_PROGRAM_COMPILE;
  in.options = options_string(options);
  in.content = std::move(set);
  cl_int err = CL_SUCCESS;
  auto b = run_build(p->context, in, &err);
  {
    std::lock_guard lock(p->mu);
    p->build = b;
  }
  if (notify) notify(p, user_data);
  return err == CL_BUILD_PROGRAM_FAILURE ? CL_COMPILE_PROGRAM_FAILURE : err;
}

cl_program LinkProgram(cl_context c, cl_uint num_devices, const cl_device_id* device_list, const char* options,
                       cl_uint num_inputs, const cl_program* inputs, void(CL_CALLBACK* notify)(cl_program, void*),
                       void* user_data, cl_int* errcode_ret) {
  if (!valid(c)) return fail<_cl_program>(errcode_ret, CL_INVALID_CONTEXT);
  if ((num_devices == 0) != (device_list == nullptr)) return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
  for (cl_uint i = 0; i < num_devices; ++i)
    if (!valid(device_list[i])) return fail<_cl_program>(errcode_ret, CL_INVALID_DEVICE);
  if (num_inputs == 0 || inputs == nullptr) return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
  if (notify == nullptr && user_data != nullptr) return fail<_cl_program>(errcode_ret, CL_INVALID_VALUE);
  std::vector<uint8_t> set = set_header(num_inputs);
  for (cl_uint i = 0; i < num_inputs; ++i) {
    if (!valid(inputs[i])) return fail<_cl_program>(errcode_ret, CL_INVALID_PROGRAM);
    std::lock_guard lock(inputs[i]->mu);
    const std::shared_ptr<Build>& b = inputs[i]->build;
    if (!b || b->status != CL_BUILD_SUCCESS || b->binary.empty() ||
        (b->binary_type != CL_PROGRAM_BINARY_TYPE_COMPILED_OBJECT && b->binary_type != CL_PROGRAM_BINARY_TYPE_LIBRARY))
      return fail<_cl_program>(errcode_ret, CL_INVALID_OPERATION);
    append_set_entry(&set, {}, b->binary.data(), b->binary.size());
  }
  BuildInput in;
  in.format = GPUP_OCL_PROGRAM_LINK;
  in.options = options_string(options);
  in.content = std::move(set);
  cl_program p = new_program(c);
  cl_int err = CL_SUCCESS;
  p->build = run_build(c, in, &err);
  if (notify) notify(p, user_data);
  if (err == CL_INVALID_LINKER_OPTIONS) {
    program_release(p);
    return fail<_cl_program>(errcode_ret, err);
  }
  if (errcode_ret) *errcode_ret = err == CL_BUILD_PROGRAM_FAILURE ? CL_LINK_PROGRAM_FAILURE : err;
  return p;
}

cl_int UnloadCompiler() { return CL_SUCCESS; }
cl_int UnloadPlatformCompiler(cl_platform_id p) { return valid(p) ? CL_SUCCESS : CL_INVALID_PLATFORM; }

cl_int GetProgramInfo(cl_program p, cl_program_info param, size_t n, void* v, size_t* ret) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  // Held throughout: a build's status and binary change under it (clBuildProgram of a checked
  // binary, a binary fetched on demand).
  std::lock_guard lock(p->mu);
  std::shared_ptr<Build> b = p->build;
  const bool executable = b && b->status == CL_BUILD_SUCCESS && b->binary_type == CL_PROGRAM_BINARY_TYPE_EXECUTABLE &&
                          b->allocation != 0;
  if (b && (param == CL_PROGRAM_BINARY_SIZES || param == CL_PROGRAM_BINARIES)) ensure_binary(b.get());
  switch (param) {
    case CL_PROGRAM_REFERENCE_COUNT: return info_value(n, v, ret, cl_uint(p->refs.load()));
    case CL_PROGRAM_CONTEXT: return info_value(n, v, ret, p->context);
    case CL_PROGRAM_NUM_DEVICES: return info_value(n, v, ret, cl_uint(p->devices.size()));
    case CL_PROGRAM_DEVICES: return info_array(n, v, ret, p->devices);
    case CL_PROGRAM_SOURCE: return info_string(n, v, ret, p->source);
    case CL_PROGRAM_IL: return info_bytes(n, v, ret, nullptr, 0);
    case CL_PROGRAM_BINARY_SIZES: {
      std::vector<size_t> sizes(p->devices.size(), b ? b->binary.size() : 0);
      return info_array(n, v, ret, sizes);
    }
    case CL_PROGRAM_BINARIES: {
      const size_t bytes = p->devices.size() * sizeof(unsigned char*);
      if (v != nullptr) {
        if (n < bytes) return CL_INVALID_VALUE;
        auto** out = static_cast<unsigned char**>(v);
        if (b && out[0] != nullptr && !b->binary.empty()) std::memcpy(out[0], b->binary.data(), b->binary.size());
      }
      if (ret) *ret = bytes;
      return CL_SUCCESS;
    }
    case CL_PROGRAM_NUM_KERNELS:
      if (!executable) return CL_INVALID_PROGRAM_EXECUTABLE;
      return info_value(n, v, ret, size_t(b->kernels.size()));
    case CL_PROGRAM_KERNEL_NAMES: {
      if (!executable) return CL_INVALID_PROGRAM_EXECUTABLE;
      std::string names;
      for (const auto& k : b->kernels) names += (names.empty() ? "" : ";") + k.name;
      return info_string(n, v, ret, names);
    }
    case CL_PROGRAM_SCOPE_GLOBAL_CTORS_PRESENT:
    case CL_PROGRAM_SCOPE_GLOBAL_DTORS_PRESENT: return info_value(n, v, ret, cl_bool{CL_FALSE});
    default: return CL_INVALID_VALUE;
  }
}

cl_int GetProgramBuildInfo(cl_program p, cl_device_id d, cl_program_build_info param, size_t n, void* v, size_t* ret) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  if (!valid(d) || std::find(p->devices.begin(), p->devices.end(), d) == p->devices.end()) return CL_INVALID_DEVICE;
  std::lock_guard lock(p->mu);
  std::shared_ptr<Build> b = p->build;
  const bool from_binary_unbuilt = b && b->allocation == 0 && b->status == CL_BUILD_NONE;
  switch (param) {
    case CL_PROGRAM_BUILD_STATUS: return info_value(n, v, ret, b ? b->status : cl_build_status{CL_BUILD_NONE});
    case CL_PROGRAM_BUILD_OPTIONS: return info_string(n, v, ret, b ? b->options : std::string());
    case CL_PROGRAM_BUILD_LOG: return info_string(n, v, ret, b ? b->log : std::string());
    case CL_PROGRAM_BINARY_TYPE:
      return info_value(n, v, ret,
                        b && (b->status == CL_BUILD_SUCCESS || from_binary_unbuilt) ? b->binary_type
                                                                                     : cl_program_binary_type{CL_PROGRAM_BINARY_TYPE_NONE});
    case CL_PROGRAM_BUILD_GLOBAL_VARIABLE_TOTAL_SIZE: return info_value(n, v, ret, size_t{0});
    default: return CL_INVALID_VALUE;
  }
}

cl_int SetProgramReleaseCallback(cl_program p, void(CL_CALLBACK* fn)(cl_program, void*), void* user_data) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  if (fn == nullptr) return CL_INVALID_VALUE;
  std::lock_guard lock(p->mu);
  p->release_callbacks.emplace_back(fn, user_data);
  return CL_SUCCESS;
}

cl_int SetProgramSpecializationConstant(cl_program p, cl_uint, size_t, const void*) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  return CL_INVALID_OPERATION;  // only IL programs have specialization constants
}

// ------------------------------------------------------------------------------------------------
// Kernels

namespace {

cl_kernel make_kernel(cl_program p, const std::shared_ptr<Build>& b, const KernelMeta* meta) {
  auto* k = new _cl_kernel();
  k->program = p;
  program_retain(p);
  p->kernels_attached.fetch_add(1, std::memory_order_relaxed);
  k->build = b;
  k->meta = meta;
  k->args.resize(meta->args.size());
  return k;
}

std::shared_ptr<Build> executable_build(cl_program p) {
  std::lock_guard lock(p->mu);
  const auto& b = p->build;
  if (!b || b->status != CL_BUILD_SUCCESS || b->binary_type != CL_PROGRAM_BINARY_TYPE_EXECUTABLE || b->allocation == 0)
    return nullptr;
  return b;
}

}  // namespace

cl_kernel CreateKernel(cl_program p, const char* name, cl_int* errcode_ret) {
  if (!valid(p)) return fail<_cl_kernel>(errcode_ret, CL_INVALID_PROGRAM);
  auto b = executable_build(p);
  if (!b) return fail<_cl_kernel>(errcode_ret, CL_INVALID_PROGRAM_EXECUTABLE);
  if (name == nullptr) return fail<_cl_kernel>(errcode_ret, CL_INVALID_VALUE);
  for (const auto& meta : b->kernels) {
    if (meta.name != name) continue;
    if (errcode_ret) *errcode_ret = CL_SUCCESS;
    return make_kernel(p, b, &meta);
  }
  return fail<_cl_kernel>(errcode_ret, CL_INVALID_KERNEL_NAME);
}

cl_int CreateKernelsInProgram(cl_program p, cl_uint num_kernels, cl_kernel* kernels, cl_uint* num_kernels_ret) {
  if (!valid(p)) return CL_INVALID_PROGRAM;
  auto b = executable_build(p);
  if (!b) return CL_INVALID_PROGRAM_EXECUTABLE;
  if (kernels != nullptr && num_kernels < b->kernels.size()) return CL_INVALID_VALUE;
  if (kernels != nullptr) {
    for (size_t i = 0; i < b->kernels.size(); ++i) kernels[i] = make_kernel(p, b, &b->kernels[i]);
  }
  if (num_kernels_ret) *num_kernels_ret = static_cast<cl_uint>(b->kernels.size());
  return CL_SUCCESS;
}

cl_kernel CloneKernel(cl_kernel source, cl_int* errcode_ret) {
  if (!valid(source)) return fail<_cl_kernel>(errcode_ret, CL_INVALID_KERNEL);
  cl_kernel k = make_kernel(source->program, source->build, source->meta);
  {
    std::lock_guard lock(source->mu);
    k->args = source->args;
  }
  if (errcode_ret) *errcode_ret = CL_SUCCESS;
  return k;
}

cl_int RetainKernel(cl_kernel k) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  kernel_retain(k);
  return CL_SUCCESS;
}

cl_int ReleaseKernel(cl_kernel k) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  kernel_release(k);
  return CL_SUCCESS;
}

cl_int SetKernelArg(cl_kernel k, cl_uint index, size_t size, const void* value) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  if (index >= k->meta->args.size()) return CL_INVALID_ARG_INDEX;
  const GPUP_OCL_KERNEL_ARG_INFO& info = k->meta->args[index].info;
  ArgValue a;
  a.set = true;
  switch (info.Kind) {
    case GPUPDDI_ARG_BUFFER: {
      if (size != sizeof(cl_mem)) return CL_INVALID_ARG_SIZE;
      cl_mem m = value ? *static_cast<const cl_mem*>(value) : nullptr;
      if (m == nullptr) {
        a.kind = GPUPDDI_ARG_NULL_BUFFER;
      } else {
        if (!valid(m) || m->type != CL_MEM_OBJECT_BUFFER) return CL_INVALID_MEM_OBJECT;
        if (m->context != k->program->context) return CL_INVALID_MEM_OBJECT;
        a.kind = GPUPDDI_ARG_BUFFER;
        a.mem = m;
      }
      break;
    }
    case GPUPDDI_ARG_LOCAL:
      if (value != nullptr) return CL_INVALID_ARG_VALUE;
      if (size == 0) return CL_INVALID_ARG_SIZE;
      if (size > UINT32_MAX) return CL_INVALID_ARG_SIZE;
      a.kind = GPUPDDI_ARG_LOCAL;
      a.local_size = static_cast<uint32_t>(size);
      break;
    case GPUPDDI_ARG_VALUE:
      if (value == nullptr) return CL_INVALID_ARG_VALUE;
      if (info.ValueSize != 0 && size != info.ValueSize && (info.ValueSizeAlt == 0 || size != info.ValueSizeAlt))
        return CL_INVALID_ARG_SIZE;
      if (size == 0) return CL_INVALID_ARG_SIZE;
      if (value == nullptr) return CL_INVALID_ARG_VALUE;
      a.kind = GPUPDDI_ARG_VALUE;
      a.bytes.assign(static_cast<const uint8_t*>(value), static_cast<const uint8_t*>(value) + size);
      break;
    case GPUPDDI_ARG_IMAGE: {
      if (size != sizeof(cl_mem)) return CL_INVALID_ARG_SIZE;
      if (value == nullptr) return CL_INVALID_ARG_VALUE;
      cl_mem m = *static_cast<const cl_mem*>(value);
      if (!valid(m) || !m->is_image() || m->context != k->program->context) return CL_INVALID_MEM_OBJECT;
      a.kind = GPUPDDI_ARG_IMAGE;
      a.mem = m;
      break;
    }
    case GPUPDDI_ARG_SAMPLER: {
      if (size != sizeof(cl_sampler)) return CL_INVALID_ARG_SIZE;
      if (value == nullptr) return CL_INVALID_ARG_VALUE;
      cl_sampler sm = *static_cast<const cl_sampler*>(value);
      if (!valid(sm) || sm->context != k->program->context) return CL_INVALID_SAMPLER;
      // The sampler's properties travel with each dispatch; the host makes (and caches) the object.
      GPUP_OCL_SAMPLER_DESC d{};
      d.NormalizedCoords = sm->normalized ? 1u : 0u;
      d.AddressingMode = sm->addressing;
      d.FilterMode = sm->filter;
      a.kind = GPUPDDI_ARG_SAMPLER;
      a.bytes.assign(reinterpret_cast<const uint8_t*>(&d), reinterpret_cast<const uint8_t*>(&d) + sizeof d);
      break;
    }
    default:
      return CL_INVALID_ARG_VALUE;  // pipes, queues: not carried by a partition
  }
  std::lock_guard lock(k->mu);
  k->args[index] = std::move(a);
  return CL_SUCCESS;
}

cl_int SetKernelArgSVMPointer(cl_kernel k, cl_uint, const void*) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  return CL_INVALID_OPERATION;  // no SVM
}

cl_int SetKernelExecInfo(cl_kernel k, cl_kernel_exec_info, size_t, const void*) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  return CL_INVALID_OPERATION;  // the exec infos are all about SVM
}

cl_int GetKernelInfo(cl_kernel k, cl_kernel_info param, size_t n, void* v, size_t* ret) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  switch (param) {
    case CL_KERNEL_FUNCTION_NAME: return info_string(n, v, ret, k->meta->name);
    case CL_KERNEL_NUM_ARGS: return info_value(n, v, ret, cl_uint(k->meta->args.size()));
    case CL_KERNEL_REFERENCE_COUNT: return info_value(n, v, ret, cl_uint(k->refs.load()));
    case CL_KERNEL_CONTEXT: return info_value(n, v, ret, k->program->context);
    case CL_KERNEL_PROGRAM: return info_value(n, v, ret, k->program);
    case CL_KERNEL_ATTRIBUTES: return info_string(n, v, ret, k->meta->attributes);
    default: return CL_INVALID_VALUE;
  }
}

cl_int GetKernelArgInfo(cl_kernel k, cl_uint index, cl_kernel_arg_info param, size_t n, void* v, size_t* ret) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  if (index >= k->meta->args.size()) return CL_INVALID_ARG_INDEX;
  const ArgMeta& a = k->meta->args[index];
  switch (param) {
    case CL_KERNEL_ARG_ADDRESS_QUALIFIER:
      return info_value(n, v, ret, cl_kernel_arg_address_qualifier(a.info.AddressQualifier));
    case CL_KERNEL_ARG_ACCESS_QUALIFIER:
      return info_value(n, v, ret, cl_kernel_arg_access_qualifier(a.info.AccessQualifier));
    case CL_KERNEL_ARG_TYPE_QUALIFIER:
      return info_value(n, v, ret, cl_kernel_arg_type_qualifier(a.info.TypeQualifier));
    case CL_KERNEL_ARG_TYPE_NAME:
      if (a.type_name.empty()) return CL_KERNEL_ARG_INFO_NOT_AVAILABLE;
      return info_string(n, v, ret, a.type_name);
    case CL_KERNEL_ARG_NAME:
      if (a.name.empty()) return CL_KERNEL_ARG_INFO_NOT_AVAILABLE;
      return info_string(n, v, ret, a.name);
    default: return CL_INVALID_VALUE;
  }
}

cl_int GetKernelWorkGroupInfo(cl_kernel k, cl_device_id d, cl_kernel_work_group_info param, size_t n, void* v,
                              size_t* ret) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  const auto& devices = k->program->devices;
  if (d == nullptr) {
    if (devices.size() != 1) return CL_INVALID_DEVICE;
  } else if (!valid(d) || std::find(devices.begin(), devices.end(), d) == devices.end()) {
    return CL_INVALID_DEVICE;
  }
  const GPUP_OCL_KERNEL_INFO& i = k->meta->info;
  switch (param) {
    case CL_KERNEL_WORK_GROUP_SIZE: return info_value(n, v, ret, size_t(i.WorkGroupSize));
    case CL_KERNEL_COMPILE_WORK_GROUP_SIZE: {
      size_t s[3] = {size_t(i.CompileWorkGroupSize[0]), size_t(i.CompileWorkGroupSize[1]),
                     size_t(i.CompileWorkGroupSize[2])};
      return info_bytes(n, v, ret, s, sizeof s);
    }
    case CL_KERNEL_LOCAL_MEM_SIZE: {
      cl_ulong total = i.LocalMemSize;
      std::lock_guard lock(k->mu);
      for (const auto& a : k->args)
        if (a.set && a.kind == GPUPDDI_ARG_LOCAL) total += a.local_size;
      return info_value(n, v, ret, total);
    }
    case CL_KERNEL_PREFERRED_WORK_GROUP_SIZE_MULTIPLE:
      return info_value(n, v, ret, size_t(i.PreferredWorkGroupSizeMultiple));
    case CL_KERNEL_PRIVATE_MEM_SIZE: return info_value(n, v, ret, cl_ulong(i.PrivateMemSize));
    case CL_KERNEL_GLOBAL_WORK_SIZE: return CL_INVALID_VALUE;  // only for custom devices and built-ins
    default: return CL_INVALID_VALUE;
  }
}

cl_int GetKernelSubGroupInfo(cl_kernel k, cl_device_id, cl_kernel_sub_group_info, size_t, const void*, size_t, void*,
                             size_t*) {
  if (!valid(k)) return CL_INVALID_KERNEL;
  return CL_INVALID_OPERATION;  // sub-group queries are not carried
}

}  // namespace gpup::ocl::api
