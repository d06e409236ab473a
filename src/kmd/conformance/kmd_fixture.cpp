#include "kmd/conformance/kmd_fixture.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace gpup::kmd::test {

namespace {

std::mutex g_log_mu;
std::vector<std::string> g_log;
std::atomic<int> g_reentrant{0};
thread_local int t_in_ddi = 0;

void on_log(GPUPDDI_SYSTEM_HANDLE, int level, const char* message) {
  static const bool verbose = std::getenv("GPUP_TEST_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "[kmd %d] %s\n", level, message);
  if (level < GPUPDDI_LOG_WARN) return;
  std::lock_guard lock(g_log_mu);
  g_log.emplace_back(message);
}

void on_complete(GPUPDDI_SYSTEM_HANDLE h, uint64_t id, gpup_status status) {
  if (t_in_ddi > 0) ++g_reentrant;
  static_cast<Sink*>(h)->add(id, status);
}

}  // namespace

void Sink::add(uint64_t id, gpup_status status) {
  {
    std::lock_guard lock(mu_);
    done_.emplace_back(id, status);
  }
  cv_.notify_all();
}

bool Sink::wait_for(size_t n, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return done_.size() >= n; });
}

std::vector<std::pair<uint64_t, gpup_status>> Sink::snapshot() {
  std::lock_guard lock(mu_);
  return done_;
}

size_t Sink::count() {
  std::lock_guard lock(mu_);
  return done_.size();
}

GPUPDDI_CALLBACKS test_callbacks() {
  GPUPDDI_CALLBACKS cb{};
  cb.struct_size = sizeof(cb);
  cb.pfnLog = on_log;
  cb.pfnNotifySubmissionComplete = on_complete;
  return cb;
}

std::vector<std::string> logged() {
  std::lock_guard lock(g_log_mu);
  return g_log;
}

void clear_log() {
  std::lock_guard lock(g_log_mu);
  g_log.clear();
}

bool log_contains(std::string_view text) {
  std::lock_guard lock(g_log_mu);
  return std::any_of(g_log.begin(), g_log.end(), [&](const std::string& l) { return l.find(text) != std::string::npos; });
}

int reentrant_completions() { return g_reentrant.load(); }

InDdi::InDdi() { ++t_in_ddi; }
InDdi::~InDdi() { --t_in_ddi; }

GPUPDDI_BUFFER_REF ref(GPUPDDI_HANDLE h, uint64_t offset, uint64_t size) {
  GPUPDDI_BUFFER_REF r{};
  r.hAllocation = h;
  r.Offset = offset;
  r.Size = size;
  return r;
}

GPUPDDI_COMMAND copy_cmd(const GPUPDDI_BUFFER_REF& src, const GPUPDDI_BUFFER_REF& dst) {
  GPUPDDI_COMMAND c{};
  c.Type = GPUPDDI_COMMAND_COPY;
  c.u.Copy.Src = src;
  c.u.Copy.Dst = dst;
  return c;
}

GPUPDDI_COMMAND fill_cmd(const GPUPDDI_BUFFER_REF& dst, const void* pattern, uint32_t pattern_size) {
  GPUPDDI_COMMAND c{};
  c.Type = GPUPDDI_COMMAND_FILL;
  c.u.Fill.Dst = dst;
  c.u.Fill.PatternSize = pattern_size;
  std::memcpy(c.u.Fill.Pattern, pattern, std::min<uint32_t>(pattern_size, GPUPDDI_MAX_FILL_PATTERN));
  return c;
}

Args& Args::operator=(const Args& o) {
  if (this == &o) return *this;
  values_ = o.values_;
  list_ = o.list_;
  size_t v = 0;
  for (GPUPDDI_KERNEL_ARG& a : list_) {
    if ((a.Kind == GPUPDDI_ARG_VALUE || a.Kind == GPUPDDI_ARG_SAMPLER) && a.pValue != nullptr) {
      a.pValue = values_[v++].data();
    }
  }
  return *this;
}

Args& Args::bytes(const void* p, uint32_t size) {
  values_.emplace_back(static_cast<const unsigned char*>(p), static_cast<const unsigned char*>(p) + size);
  GPUPDDI_KERNEL_ARG a{};
  a.Kind = GPUPDDI_ARG_VALUE;
  a.Size = size;
  a.pValue = values_.back().data();
  list_.push_back(a);
  return *this;
}

Args& Args::buffer(const GPUPDDI_BUFFER_REF& r) {
  GPUPDDI_KERNEL_ARG a{};
  a.Kind = GPUPDDI_ARG_BUFFER;
  a.Buffer = r;
  list_.push_back(a);
  return *this;
}

Args& Args::local(uint32_t size) {
  GPUPDDI_KERNEL_ARG a{};
  a.Kind = GPUPDDI_ARG_LOCAL;
  a.Size = size;
  list_.push_back(a);
  return *this;
}

Args& Args::null_buffer() {
  GPUPDDI_KERNEL_ARG a{};
  a.Kind = GPUPDDI_ARG_NULL_BUFFER;
  list_.push_back(a);
  return *this;
}

Args& Args::image(const GPUPDDI_BUFFER_REF& r) {
  GPUPDDI_KERNEL_ARG a{};
  a.Kind = GPUPDDI_ARG_IMAGE;
  a.Buffer = r;
  list_.push_back(a);
  return *this;
}

Args& Args::sampler(const GPUP_OCL_SAMPLER_DESC& d) { return sampler_bytes(&d, sizeof(d)); }

Args& Args::sampler_bytes(const void* p, uint32_t size) {
  bytes(p, size);
  list_.back().Kind = GPUPDDI_ARG_SAMPLER;
  return *this;
}

GPUP_OCL_IMAGE_DESC image_desc(uint32_t type, uint32_t order, uint32_t data_type, uint64_t width, uint64_t height,
                               uint64_t depth, uint64_t array_size, uint64_t row_pitch, uint64_t slice_pitch) {
  GPUP_OCL_IMAGE_DESC d{};
  d.Magic = GPUP_OCL_IMAGE_MAGIC;
  d.ImageType = type;
  d.ChannelOrder = order;
  d.ChannelDataType = data_type;
  d.Flags = 1;  // CL_MEM_READ_WRITE
  d.Width = width;
  d.Height = height;
  d.Depth = depth;
  d.ArraySize = array_size;
  d.RowPitch = row_pitch;
  d.SlicePitch = slice_pitch;
  return d;
}

Dispatch::Dispatch(GPUPDDI_HANDLE program, std::string name, Args args, uint64_t global_size, uint64_t local_size)
    : program(program), name(std::move(name)), args(std::move(args)) {
  global[0] = global_size;
  local[0] = local_size;
}

GPUPDDI_COMMAND Dispatch::cmd() const {
  GPUPDDI_COMMAND c{};
  c.Type = GPUPDDI_COMMAND_DISPATCH;
  GPUPDDI_DISPATCH& d = c.u.Dispatch;
  d.hProgram = program;
  d.pKernelName = name.c_str();
  d.WorkDim = dims;
  d.ArgCount = static_cast<uint32_t>(args.list().size());
  d.pArgs = args.list().data();
  for (int i = 0; i < 3; ++i) {
    d.GlobalOffset[i] = offset[i];
    d.GlobalSize[i] = global[i];
    d.LocalSize[i] = local[i];
  }
  return c;
}

std::vector<unsigned char> program_desc(uint32_t format, std::string_view options, std::string_view content,
                                        uint32_t version) {
  GPUP_OCL_PROGRAM_DESC d{};
  d.Magic = GPUP_OCL_PROGRAM_MAGIC;
  d.Version = version;
  d.Format = format;
  d.OptionsSize = static_cast<uint32_t>(options.size());
  d.ContentSize = static_cast<uint32_t>(content.size());
  std::vector<unsigned char> out(sizeof(d) + options.size() + content.size());
  std::memcpy(out.data(), &d, sizeof(d));
  if (!options.empty()) std::memcpy(out.data() + sizeof(d), options.data(), options.size());
  if (!content.empty()) std::memcpy(out.data() + sizeof(d) + options.size(), content.data(), content.size());
  return out;
}

std::string set_content(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string out;
  GPUP_OCL_SET_HEADER h{GPUP_OCL_SET_MAGIC, static_cast<uint32_t>(entries.size())};
  out.append(reinterpret_cast<const char*>(&h), sizeof(h));
  for (const auto& [name, data] : entries) {
    out.resize((out.size() + 7) / 8 * 8, '\0');
    GPUP_OCL_SET_ENTRY e{static_cast<uint32_t>(name.size()), 0, data.size()};
    out.append(reinterpret_cast<const char*>(&e), sizeof(e));
    out += name;
    out += data;
  }
  return out;
}

const ProgramInfo::Kernel* ProgramInfo::find(std::string_view name) const {
  for (const Kernel& k : kernels) {
    if (k.name == name) return &k;
  }
  return nullptr;
}

namespace {

// Parses out[at..size) as GPUP_OCL_PROGRAM_INFO and what follows; gtest failures for every
// layout rule broken.
void parse_program_info(const std::vector<unsigned char>& out, size_t at, size_t size, ProgramInfo* p) {
  auto take = [&](void* dst, size_t n) {
    EXPECT_LE(at + n, size) << "program info runs past the written output";
    if (at + n > size) return false;
    std::memcpy(dst, out.data() + at, n);
    at += n;
    return true;
  };
  auto str = [&](std::string* dst, size_t n) {
    if (at + n > size) {
      ADD_FAILURE() << "string runs past the written output";
      return false;
    }
    dst->assign(reinterpret_cast<const char*>(out.data()) + at, n);
    at += n;
    return true;
  };
  auto pad = [&] {
    while (at % 8 != 0 && at < size) {
      EXPECT_EQ(out[at], 0) << "padding at " << at;
      ++at;
    }
  };
  if (!take(&p->info, sizeof(p->info))) return;
  EXPECT_EQ(p->info.Magic, GPUP_OCL_PROGRAM_INFO_MAGIC);
  const size_t table_start = at;
  for (uint32_t k = 0; k < p->info.KernelCount; ++k) {
    ProgramInfo::Kernel kernel;
    if (!take(&kernel.info, sizeof(kernel.info)) || !str(&kernel.name, kernel.info.NameSize) ||
        !str(&kernel.attributes, kernel.info.AttributesSize)) {
      return;
    }
    pad();
    for (uint32_t a = 0; a < kernel.info.NumArgs; ++a) {
      ProgramInfo::Arg arg;
      if (!take(&arg.info, sizeof(arg.info)) || !str(&arg.type_name, arg.info.TypeNameSize) ||
          !str(&arg.name, arg.info.NameSize)) {
        return;
      }
      EXPECT_EQ(arg.info.Reserved, 0u);
      pad();
      kernel.args.push_back(std::move(arg));
    }
    p->kernels.push_back(std::move(kernel));
  }
  EXPECT_EQ(at - table_start, p->info.KernelTableSize);
  EXPECT_LE(p->info.BinaryBytes, p->info.BinarySize);
  if (p->info.BinaryBytes > 0) {
    EXPECT_EQ(p->info.BinaryBytes, p->info.BinarySize);
    str(&p->binary, static_cast<size_t>(p->info.BinaryBytes));
    pad();
  }
  EXPECT_EQ(at, size) << "nothing written after the binary";
}

}  // namespace

// ---------------------------------------------------------------------------------------------

void KmdFixture::open(const std::string& name, const char* config) {
  kmd = name;
  auto loaded = Driver::load(name, test_callbacks());
  ASSERT_TRUE(loaded.ok()) << loaded.error().message;
  driver = *loaded;

  GPUPDDI_ARG_STARTADAPTER start{};
  start.struct_size = sizeof(start);
  start.pConfig = config;
  ASSERT_EQ(ddi().Adapter.pfnStartAdapter(&start), GPUP_STATUS_SUCCESS);
  adapter = start.hAdapter;
  ASSERT_NE(adapter, nullptr);

  GPUPDDI_ARG_CREATEPROCESS wp{};
  wp.struct_size = sizeof(wp);
  wp.Flags.VirtualMachineWorkerProcess = 1;
  wp.pProcessName = "vmwp";
  wp.ProcessNameLength = 4;
  ASSERT_EQ(ddi().Process.pfnCreateProcess(adapter, &wp), GPUP_STATUS_SUCCESS);
  worker = wp.hKmdProcess;

  GPUPDDI_ARG_CREATEPROCESS vp{};
  vp.struct_size = sizeof(vp);
  vp.Flags.VirtualMachineProcess = 1;
  vp.hKmdVmWorkerProcess = worker;
  vp.ProcessId = 1234;
  vp.pProcessName = "guest-app";
  vp.ProcessNameLength = 9;
  ASSERT_EQ(ddi().Process.pfnCreateProcess(adapter, &vp), GPUP_STATUS_SUCCESS);
  vm_process = vp.hKmdProcess;

  GPUPDDI_ARG_CREATEDEVICE cd{};
  cd.struct_size = sizeof(cd);
  cd.hKmdProcess = vm_process;
  ASSERT_EQ(ddi().Device.pfnCreateDevice(adapter, &cd), GPUP_STATUS_SUCCESS);
  device = cd.hDevice;

  ASSERT_EQ(query(GPUPDDI_QAITYPE_DEVICEINFO, &info, sizeof(info)), GPUP_STATUS_SUCCESS);
  align = std::max<uint64_t>(info.MemBaseAddrAlignBits / 8, 1);
}

void KmdFixture::close() {
  if (adapter != nullptr) {
    for (auto& c : contexts_) ddi().Context.pfnDestroyContext(c->h);
    contexts_.clear();
    for (auto& a : allocations_) ddi().Memory.pfnDestroyAllocation(device, a.h);
    if (device) ddi().Device.pfnDestroyDevice(device);
    if (vm_process) ddi().Process.pfnDestroyProcess(adapter, vm_process);
    if (worker) ddi().Process.pfnDestroyProcess(adapter, worker);
    ddi().Adapter.pfnStopAdapter(adapter);
  }
  for (auto& a : allocations_) std::free(a.mem);
  allocations_.clear();
  contexts_.clear();
  adapter = device = worker = vm_process = nullptr;
}

void KmdFixture::stop_adapter_now() {
  ddi().Adapter.pfnStopAdapter(adapter);
  adapter = device = worker = vm_process = nullptr;
}

gpup_status KmdFixture::query(uint32_t type, void* out, uint32_t out_size, const void* in, uint32_t in_size,
                              uint32_t* written) {
  GPUPDDI_ARG_QUERYADAPTERINFO a{};
  a.struct_size = sizeof(a);
  a.Type = type;
  a.pInputData = in;
  a.InputDataSize = in_size;
  a.pOutputData = out;
  a.OutputDataSize = out_size;
  a.pOutputDataWritten = written;
  InDdi guard;
  return ddi().Adapter.pfnQueryAdapterInfo(adapter, &a);
}

gpup_status KmdFixture::escape(const void* data, uint32_t size, void* out, uint32_t out_size, bool driver_known,
                               uint32_t* written) {
  if (ddi().Adapter.pfnEscape == nullptr) return GPUP_STATUS_NOT_SUPPORTED;
  GPUPDDI_ARG_ESCAPE a{};
  a.struct_size = sizeof(a);
  a.Flags.VirtualMachineData = 1;
  a.Flags.DriverKnownEscape = driver_known ? 1 : 0;
  a.hKmdProcessHandle = vm_process;
  a.hDevice = device;
  a.pPrivateDriverData = data;
  a.PrivateDriverDataSize = size;
  a.pOutputData = out;
  a.OutputDataSize = out_size;
  a.pOutputDataWritten = written;
  InDdi guard;
  return ddi().Adapter.pfnEscape(adapter, &a);
}

gpup_status KmdFixture::create_allocation(GPUPDDI_ARG_CREATEALLOCATION* args) {
  gpup_status s;
  {
    InDdi guard;
    s = ddi().Memory.pfnCreateAllocation(device, args);
  }
  if (s == GPUP_STATUS_SUCCESS) allocations_.push_back({args->hAllocation, nullptr});
  return s;
}

KmdFixture::Buffer KmdFixture::cpu_buffer(uint64_t size) {
  const uint64_t rounded = (size + 4095) / 4096 * 4096;
  auto* mem = static_cast<unsigned char*>(std::aligned_alloc(4096, rounded));
  std::memset(mem, 0, rounded);
  GPUPDDI_ARG_CREATEALLOCATION a{};
  a.struct_size = sizeof(a);
  a.Flags.CpuVisible = 1;
  a.Size = size;
  a.pSystemMemory = mem;
  const gpup_status s = create_allocation(&a);
  EXPECT_EQ(s, GPUP_STATUS_SUCCESS);
  if (s != GPUP_STATUS_SUCCESS) {
    std::free(mem);
    return {};
  }
  allocations_.back().mem = mem;
  return {a.hAllocation, mem, size};
}

KmdFixture::Buffer KmdFixture::device_buffer(uint64_t size) {
  GPUPDDI_ARG_CREATEALLOCATION a{};
  a.struct_size = sizeof(a);
  a.Size = size;
  const gpup_status s = create_allocation(&a);
  EXPECT_EQ(s, GPUP_STATUS_SUCCESS);
  return {s == GPUP_STATUS_SUCCESS ? a.hAllocation : nullptr, nullptr, size};
}

KmdFixture::Buffer KmdFixture::image(const GPUP_OCL_IMAGE_DESC& desc, uint64_t size, gpup_status* status,
                                     GPUPDDI_ALLOCATIONFLAGS extra_flags, uint32_t desc_size) {
  const uint64_t rounded = (size + 4095) / 4096 * 4096;
  auto* mem = static_cast<unsigned char*>(std::aligned_alloc(4096, rounded));
  std::memset(mem, 0, rounded);
  std::vector<unsigned char> data(desc_size, 0);
  std::memcpy(data.data(), &desc, std::min<size_t>(desc_size, sizeof(desc)));
  GPUPDDI_ARG_CREATEALLOCATION a{};
  a.struct_size = sizeof(a);
  a.Flags = extra_flags;
  a.Flags.Image = 1;
  a.Flags.CpuVisible = 1;
  a.Size = size;
  a.pSystemMemory = mem;
  a.pPrivateDriverData = data.data();
  a.PrivateDriverDataSize = desc_size;
  *status = create_allocation(&a);
  if (*status != GPUP_STATUS_SUCCESS) {
    std::free(mem);
    return {};
  }
  allocations_.back().mem = mem;
  return {a.hAllocation, mem, size};
}

void KmdFixture::destroy_allocation(GPUPDDI_HANDLE h) {
  auto it = std::find_if(allocations_.begin(), allocations_.end(), [&](const Owned& o) { return o.h == h; });
  ASSERT_NE(it, allocations_.end());
  ddi().Memory.pfnDestroyAllocation(device, h);
  std::free(it->mem);
  allocations_.erase(it);
}

KmdFixture::Built KmdFixture::build(std::string_view content, uint32_t format, std::string_view options,
                                    uint32_t out_capacity, uint32_t version) {
  const std::vector<unsigned char> desc = program_desc(format, options, content, version);
  std::vector<unsigned char> out(out_capacity);
  GPUPDDI_ARG_CREATEALLOCATION a{};
  a.struct_size = sizeof(a);
  a.Flags.Program = 1;
  a.pPrivateDriverData = desc.data();
  a.PrivateDriverDataSize = static_cast<uint32_t>(desc.size());
  a.pOutputData = out_capacity ? out.data() : nullptr;
  a.OutputDataSize = out_capacity;
  Built b;
  b.status = create_allocation(&a);
  b.h = b.status == GPUP_STATUS_SUCCESS ? a.hAllocation : nullptr;
  b.written = a.OutputDataWritten;
  EXPECT_LE(b.written, out_capacity);
  if (b.written >= sizeof(GPUP_OCL_BUILD_RESULT)) {
    std::memcpy(&b.result, out.data(), sizeof(b.result));
    b.log.assign(reinterpret_cast<const char*>(out.data()) + sizeof(b.result),
                 std::min<size_t>(b.result.LogBytes, b.written - sizeof(b.result)));
    const size_t log_end = sizeof(b.result) + b.result.LogBytes;
    const bool info_expected =
        version >= 2 && out_capacity >= sizeof(GPUP_OCL_BUILD_RESULT) + sizeof(GPUP_OCL_PROGRAM_INFO);
    if (info_expected) {
      const size_t info_at = (log_end + 7) / 8 * 8;
      EXPECT_GE(b.written, info_at + sizeof(GPUP_OCL_PROGRAM_INFO)) << "version 2 output has the program info";
      if (b.written >= info_at + sizeof(GPUP_OCL_PROGRAM_INFO)) {
        b.has_info = true;
        parse_program_info(out, info_at, b.written, &b.info);
      }
    } else {
      EXPECT_EQ(b.written, log_end);
    }
  }
  return b;
}

gpup_status KmdFixture::build_raw(const void* data, uint32_t size) {
  GPUPDDI_ARG_CREATEALLOCATION a{};
  a.struct_size = sizeof(a);
  a.Flags.Program = 1;
  a.pPrivateDriverData = data;
  a.PrivateDriverDataSize = size;
  const gpup_status s = create_allocation(&a);
  if (s == GPUP_STATUS_SUCCESS) destroy_allocation(a.hAllocation);
  return s;
}

gpup_status KmdFixture::lock(GPUPDDI_HANDLE h) {
  if (ddi().Memory.pfnLock == nullptr) return GPUP_STATUS_SUCCESS;
  InDdi guard;
  return ddi().Memory.pfnLock(device, h);
}

gpup_status KmdFixture::unlock(GPUPDDI_HANDLE h) {
  if (ddi().Memory.pfnUnlock == nullptr) return GPUP_STATUS_SUCCESS;
  InDdi guard;
  return ddi().Memory.pfnUnlock(device, h);
}

KmdFixture::Context* KmdFixture::context() {
  auto c = std::make_unique<Context>();
  c->sink = std::make_unique<Sink>();
  GPUPDDI_ARG_CREATECONTEXT a{};
  a.struct_size = sizeof(a);
  a.hSystemContext = c->sink.get();
  gpup_status s;
  {
    InDdi guard;
    s = ddi().Context.pfnCreateContext(device, &a);
  }
  EXPECT_EQ(s, GPUP_STATUS_SUCCESS);
  if (s != GPUP_STATUS_SUCCESS) return nullptr;
  c->h = a.hContext;
  contexts_.push_back(std::move(c));
  return contexts_.back().get();
}

void KmdFixture::destroy_context(Context* c) {
  auto it = std::find_if(contexts_.begin(), contexts_.end(), [&](const auto& p) { return p.get() == c; });
  ASSERT_NE(it, contexts_.end());
  {
    InDdi guard;
    ddi().Context.pfnDestroyContext(c->h);
  }
  contexts_.erase(it);
}

gpup_status KmdFixture::submit(Context* c, const std::vector<GPUPDDI_COMMAND>& commands, uint64_t id) {
  GPUPDDI_ARG_SUBMITCOMMAND a{};
  a.struct_size = sizeof(a);
  a.CommandCount = static_cast<uint32_t>(commands.size());
  a.pCommands = commands.data();
  a.SubmissionId = id;
  InDdi guard;
  return ddi().Context.pfnSubmitCommand(c->h, &a);
}

gpup_status KmdFixture::run(Context* c, const std::vector<GPUPDDI_COMMAND>& commands) {
  const size_t before = c->sink->count();
  const uint64_t id = next_id_++;
  const gpup_status s = submit(c, commands, id);
  if (s != GPUP_STATUS_SUCCESS) return s;
  if (!c->sink->wait_for(before + 1)) return GPUP_STATUS_INTERNAL;
  const auto done = c->sink->snapshot();
  EXPECT_EQ(done[before].first, id);
  return done[before].second;
}

}  // namespace gpup::kmd::test
