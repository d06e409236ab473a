// kmd_opencl: program allocations (build, compile, link), what the guest learns about a built
// program (GPUP_OCL_PROGRAM_INFO, kmd_opencl.h), and the kernels dispatches use.
#include <algorithm>
#include <tuple>

#include "kmd/opencl/ocl_kmd.h"

namespace gpup::kmd::ocl {

namespace {

// Always added to the guest's build, compile and link options: argument kinds must be known to
// keep a guest from passing a value where the kernel expects a cl_mem or a cl_sampler (see classify_arg). PoCL
// drops argument info from a program built from a binary or linked unless the option is given
// again at that step.
constexpr const char* kRequiredOptions = "-cl-kernel-arg-info";

std::string with_required_options(const std::string& guest) {
  return guest.empty() ? kRequiredOptions : guest + " " + kRequiredOptions;
}

std::string build_log(cl_program program, cl_device_id device) {
  size_t n = 0;
  if (clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n) != CL_SUCCESS || n == 0) return {};
  std::string log(n, '\0');
  if (clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr) != CL_SUCCESS) return {};
  while (!log.empty() && log.back() == '\0') log.pop_back();
  return log;
}

std::string arg_string(cl_kernel k, cl_uint index, cl_kernel_arg_info what, cl_int* err) {
  size_t n = 0;
  *err = clGetKernelArgInfo(k, index, what, 0, nullptr, &n);
  if (*err != CL_SUCCESS) return {};
  std::string s(n, '\0');
  *err = clGetKernelArgInfo(k, index, what, n, s.data(), nullptr);
  if (*err != CL_SUCCESS) return {};
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

std::string kernel_string(cl_kernel k, cl_kernel_info what) {
  size_t n = 0;
  if (clGetKernelInfo(k, what, 0, nullptr, &n) != CL_SUCCESS || n == 0) return {};
  std::string s(n, '\0');
  if (clGetKernelInfo(k, what, n, s.data(), nullptr) != CL_SUCCESS) return {};
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// The CL_MEM_OBJECT_IMAGE* type of an image parameter's type name, 0 for the image types the
// guest cannot make (image1d_buffer_t, depth and multi-sample images), or -1 when the name is
// not an image type at all.
int64_t image_type_of(std::string_view type) {
  if (type == "image1d_t") return CL_MEM_OBJECT_IMAGE1D;
  if (type == "image2d_t") return CL_MEM_OBJECT_IMAGE2D;
  if (type == "image3d_t") return CL_MEM_OBJECT_IMAGE3D;
  if (type == "image1d_array_t") return CL_MEM_OBJECT_IMAGE1D_ARRAY;
  if (type == "image2d_array_t") return CL_MEM_OBJECT_IMAGE2D_ARRAY;
  const bool image_like = type.size() > 7 && type.compare(0, 5, "image") == 0 && type.back() == 't' &&
                          type[type.size() - 2] == '_' && type.find('*') == std::string_view::npos;
  return image_like ? 0 : -1;
}

// What kind of DDI argument a kernel parameter takes (and, for images, the image type it
// declares). Only __global/__constant pointers take a cl_mem, only __local pointers take a local
// size, only plain private values take bytes; image parameters take an image allocation,
// sampler_t a sampler descriptor; pipes, queues, events and the image types the guest cannot
// create are not supported.
std::pair<Kernel::ArgKind, uint32_t> classify_arg(cl_kernel k, cl_uint index) {
  cl_kernel_arg_address_qualifier address = 0;
  cl_int err = clGetKernelArgInfo(k, index, CL_KERNEL_ARG_ADDRESS_QUALIFIER, sizeof(address), &address, nullptr);
  if (err != CL_SUCCESS) return {Kernel::ArgKind::kUnknown, 0};
  const std::string type = arg_string(k, index, CL_KERNEL_ARG_TYPE_NAME, &err);
  if (err != CL_SUCCESS || type.empty()) return {Kernel::ArgKind::kUnknown, 0};
  // Images are __global objects to some implementations (PoCL), private to others.
  if (const int64_t image = image_type_of(type); image >= 0) {
    if (image == 0) return {Kernel::ArgKind::kUnsupported, 0};
    return {Kernel::ArgKind::kImage, static_cast<uint32_t>(image)};
  }
  const bool pointer = type.back() == '*';
  auto starts = [&](std::string_view p) { return type.compare(0, p.size(), p) == 0; };
  switch (address) {
    case CL_KERNEL_ARG_ADDRESS_GLOBAL:
    case CL_KERNEL_ARG_ADDRESS_CONSTANT:
      return {pointer ? Kernel::ArgKind::kBuffer : Kernel::ArgKind::kUnsupported, 0};
    case CL_KERNEL_ARG_ADDRESS_LOCAL:
      return {pointer ? Kernel::ArgKind::kLocal : Kernel::ArgKind::kUnsupported, 0};
    case CL_KERNEL_ARG_ADDRESS_PRIVATE:
      if (type == "sampler_t") return {Kernel::ArgKind::kSampler, 0};
      if (pointer || starts("sampler_t") || starts("pipe") || starts("queue_t") || starts("clk_event_t") ||
          starts("event_t") || starts("reserve_id_t")) {
        return {Kernel::ArgKind::kUnsupported, 0};
      }
      return {Kernel::ArgKind::kValue, 0};
    default:
      return {Kernel::ArgKind::kUnknown, 0};
  }
}

uint32_t contract_kind(Kernel::ArgKind k) {
  switch (k) {
    case Kernel::ArgKind::kBuffer: return GPUPDDI_ARG_BUFFER;
    case Kernel::ArgKind::kLocal: return GPUPDDI_ARG_LOCAL;
    case Kernel::ArgKind::kValue: return GPUPDDI_ARG_VALUE;
    case Kernel::ArgKind::kImage: return GPUPDDI_ARG_IMAGE;
    case Kernel::ArgKind::kSampler: return GPUPDDI_ARG_SAMPLER;
    case Kernel::ArgKind::kUnsupported:
    case Kernel::ArgKind::kUnknown: break;
  }
  return GPUP_OCL_ARG_UNSUPPORTED;
}

// The argument sizes clSetKernelArg accepts for value argument index of k, observed on k (a
// kernel no dispatch uses): ValueSize / ValueSizeAlt of GPUP_OCL_KERNEL_ARG_INFO. The smallest
// accepted size s in 1..max_size is found first; then every size up to 2s + 2 is tried, which
// tells a type size that also takes 3/4 of itself (PoCL: 3 and 4 for an int) from one that takes
// anything (PoCL: structs). Size 0 is never tried: PoCL asserts on it for struct arguments.
// zeros holds max_size zero bytes. Cost: about three calls per byte of the type.
std::pair<uint32_t, uint32_t> probe_value_sizes(cl_kernel k, cl_uint index, size_t max_size,
                                                const unsigned char* zeros) {
  auto accepts = [&](size_t s) { return clSetKernelArg(k, index, s, zeros) == CL_SUCCESS; };
  size_t first = 0;
  for (size_t s = 1; s <= max_size && first == 0; ++s) {
    if (accepts(s)) first = s;
  }
  if (first == 0) return {0, 0};
  std::vector<size_t> accepted = {first};
  const size_t last = std::min(max_size, 2 * first + 2);
  for (size_t s = first + 1; s <= last && accepted.size() <= 2; ++s) {
    if (accepts(s)) accepted.push_back(s);
  }
  if (accepted.size() > 2) return {0, 0};  // no fixed size
  if (accepted.size() == 1) return {static_cast<uint32_t>(first), 0};
  return {static_cast<uint32_t>(accepted[1]), static_cast<uint32_t>(accepted[0])};
}

template <typename T>
T work_group_value(cl_kernel k, cl_device_id device, cl_kernel_work_group_info what) {
  T v{};
  return clGetKernelWorkGroupInfo(k, device, what, sizeof(v), &v, nullptr) == CL_SUCCESS ? v : T{};
}

// The Kernel a dispatch uses: argument kinds and the work-group limit.
Result<std::shared_ptr<Kernel>> make_kernel(ClKernel k, std::string name, cl_device_id device) {
  auto entry = std::make_shared<Kernel>();
  entry->name = std::move(name);
  cl_uint nargs = 0;
  if (cl_int err = clGetKernelInfo(k.get(), CL_KERNEL_NUM_ARGS, sizeof(nargs), &nargs, nullptr); err != CL_SUCCESS) {
    return Error(GPUP_STATUS_DEVICE_ERROR, fmt::format("CL_KERNEL_NUM_ARGS: {}", cl_error_name(err)));
  }
  entry->kinds.reserve(nargs);
  entry->image_types.assign(nargs, 0);
  entry->access.assign(nargs, 0);
  for (cl_uint i = 0; i < nargs; ++i) {
    const auto [kind, image_type] = classify_arg(k.get(), i);
    entry->kinds.push_back(kind);
    if (kind == Kernel::ArgKind::kImage) {
      cl_kernel_arg_access_qualifier access = 0;
      if (clGetKernelArgInfo(k.get(), i, CL_KERNEL_ARG_ACCESS_QUALIFIER, sizeof(access), &access, nullptr) !=
          CL_SUCCESS) {
        entry->kinds.back() = Kernel::ArgKind::kUnknown;
        continue;
      }
      entry->image_types[i] = image_type;
      entry->access[i] = access;
    }
  }
  const size_t wg = work_group_value<size_t>(k.get(), device, CL_KERNEL_WORK_GROUP_SIZE);
  entry->work_group_size = wg != 0 ? wg : 1;
  entry->kernel = std::move(k);
  return entry;
}

// Describes one kernel for GPUP_OCL_PROGRAM_INFO. Uses scratch, a kernel object of its own, to
// observe value sizes (it is left with arguments set).
KernelDescription describe_kernel(const Kernel& kernel, cl_kernel scratch, cl_device_id device,
                                  const std::vector<unsigned char>& zeros) {
  cl_kernel k = kernel.kernel.get();
  KernelDescription d;
  d.name = kernel.name;
  d.attributes = kernel_string(k, CL_KERNEL_ATTRIBUTES);
  GPUP_OCL_KERNEL_INFO& info = d.info;
  info.WorkGroupSize = work_group_value<size_t>(k, device, CL_KERNEL_WORK_GROUP_SIZE);
  size_t compile_wg[3] = {};
  if (clGetKernelWorkGroupInfo(k, device, CL_KERNEL_COMPILE_WORK_GROUP_SIZE, sizeof(compile_wg), compile_wg, nullptr) ==
      CL_SUCCESS) {
    for (int i = 0; i < 3; ++i) info.CompileWorkGroupSize[i] = compile_wg[i];
  }
  info.LocalMemSize = work_group_value<cl_ulong>(k, device, CL_KERNEL_LOCAL_MEM_SIZE);
  info.PreferredWorkGroupSizeMultiple =
      work_group_value<size_t>(k, device, CL_KERNEL_PREFERRED_WORK_GROUP_SIZE_MULTIPLE);
  info.PrivateMemSize = work_group_value<cl_ulong>(k, device, CL_KERNEL_PRIVATE_MEM_SIZE);

  d.args.resize(kernel.kinds.size());
  for (cl_uint i = 0; i < d.args.size(); ++i) {
    ArgDescription& a = d.args[i];
    GPUP_OCL_KERNEL_ARG_INFO& ai = a.info;
    cl_kernel_arg_address_qualifier address = 0;
    cl_kernel_arg_access_qualifier access = 0;
    cl_kernel_arg_type_qualifier type = 0;
    if (clGetKernelArgInfo(k, i, CL_KERNEL_ARG_ADDRESS_QUALIFIER, sizeof(address), &address, nullptr) == CL_SUCCESS &&
        clGetKernelArgInfo(k, i, CL_KERNEL_ARG_ACCESS_QUALIFIER, sizeof(access), &access, nullptr) == CL_SUCCESS &&
        clGetKernelArgInfo(k, i, CL_KERNEL_ARG_TYPE_QUALIFIER, sizeof(type), &type, nullptr) == CL_SUCCESS) {
      ai.AddressQualifier = address;
      ai.AccessQualifier = access;
      ai.TypeQualifier = type;
    }
    cl_int err = CL_SUCCESS;
    a.type_name = arg_string(k, i, CL_KERNEL_ARG_TYPE_NAME, &err);  // empty when not available
    a.name = arg_string(k, i, CL_KERNEL_ARG_NAME, &err);
    ai.Kind = contract_kind(kernel.kinds[i]);
    if (kernel.kinds[i] == Kernel::ArgKind::kValue) {
      std::tie(ai.ValueSize, ai.ValueSizeAlt) = probe_value_sizes(scratch, i, zeros.size(), zeros.data());
    } else if (kernel.kinds[i] == Kernel::ArgKind::kBuffer || kernel.kinds[i] == Kernel::ArgKind::kImage) {
      ai.ValueSize = sizeof(cl_mem);
    } else if (kernel.kinds[i] == Kernel::ArgKind::kSampler) {
      ai.ValueSize = sizeof(cl_sampler);
    }
  }
  return d;
}

cl_program_binary_type binary_type_of(cl_program program, cl_device_id device) {
  cl_program_binary_type type = CL_PROGRAM_BINARY_TYPE_NONE;
  if (clGetProgramBuildInfo(program, device, CL_PROGRAM_BINARY_TYPE, sizeof(type), &type, nullptr) != CL_SUCCESS) {
    return CL_PROGRAM_BINARY_TYPE_NONE;
  }
  return type;
}

// The program's binary for its one device: its size, and the bytes when they fit max_bytes.
Status read_binary(cl_program program, uint64_t max_bytes, ProgramDescription* out) {
  cl_uint ndevices = 0;
  cl_int err = clGetProgramInfo(program, CL_PROGRAM_NUM_DEVICES, sizeof(ndevices), &ndevices, nullptr);
  if (err != CL_SUCCESS || ndevices != 1) {
    return Error(GPUP_STATUS_DEVICE_ERROR, fmt::format("CL_PROGRAM_NUM_DEVICES: {} ({} devices)", cl_error_name(err), ndevices));
  }
  size_t size = 0;
  if ((err = clGetProgramInfo(program, CL_PROGRAM_BINARY_SIZES, sizeof(size), &size, nullptr)) != CL_SUCCESS) {
    return Error(GPUP_STATUS_DEVICE_ERROR, fmt::format("CL_PROGRAM_BINARY_SIZES: {}", cl_error_name(err)));
  }
  out->binary_size = size;
  if (size == 0 || size > max_bytes) return {};
  out->binary.resize(size);
  unsigned char* ptr = out->binary.data();
  if ((err = clGetProgramInfo(program, CL_PROGRAM_BINARIES, sizeof(ptr), &ptr, nullptr)) != CL_SUCCESS) {
    return Error(GPUP_STATUS_DEVICE_ERROR, fmt::format("CL_PROGRAM_BINARIES: {}", cl_error_name(err)));
  }
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Program

Result<std::shared_ptr<Kernel>> Program::kernel(const std::string& name, cl_device_id device) {
  if (binary_type_ != CL_PROGRAM_BINARY_TYPE_EXECUTABLE) {
    return Error(GPUP_STATUS_INVALID_PARAMETER,
                 fmt::format("kernel '{}': the program is a {}, not an executable; link it first", printable(name),
                             binary_type_ == CL_PROGRAM_BINARY_TYPE_LIBRARY ? "library" : "compiled object"));
  }
  std::lock_guard lock(mu_);
  if (auto it = kernels_.find(name); it != kernels_.end()) return it->second;
  cl_int err = CL_SUCCESS;
  ClKernel k(clCreateKernel(program_.get(), name.c_str(), &err));
  if (err != CL_SUCCESS) {
    if (err == CL_INVALID_KERNEL_NAME) {
      return Error(GPUP_STATUS_NOT_FOUND, fmt::format("the program has no kernel '{}'", printable(name)));
    }
    return Error(status_from_cl(err), fmt::format("clCreateKernel('{}'): {} ({})", printable(name), cl_error_name(err), err));
  }
  auto entry = make_kernel(std::move(k), name, device);
  if (!entry) return entry.error();
  kernels_.emplace(name, *entry);
  return *entry;
}

void Program::add_kernel(std::shared_ptr<Kernel> kernel) {
  std::lock_guard lock(mu_);
  const std::string name = kernel->name;
  kernels_.emplace(name, std::move(kernel));
}

Result<ProgramDescription> Program::describe(cl_device_id device, const DeviceFacts& facts, uint64_t max_binary) {
  ProgramDescription d;
  d.binary_type = static_cast<uint32_t>(binary_type_);
  if (binary_type_ == CL_PROGRAM_BINARY_TYPE_EXECUTABLE) {
    cl_uint n = 0;
    cl_int err = clCreateKernelsInProgram(program_.get(), 0, nullptr, &n);
    if (err != CL_SUCCESS) {
      return Error(status_from_cl(err), fmt::format("clCreateKernelsInProgram: {} ({})", cl_error_name(err), err));
    }
    // Two kernel objects per kernel: one for dispatches (cached), one to observe value sizes on.
    std::vector<cl_kernel> raw(n), scratch_raw(n);
    if (n > 0 && (err = clCreateKernelsInProgram(program_.get(), n, raw.data(), nullptr)) != CL_SUCCESS) {
      return Error(status_from_cl(err), fmt::format("clCreateKernelsInProgram: {} ({})", cl_error_name(err), err));
    }
    std::vector<ClKernel> kernels, scratch;
    kernels.reserve(n);
    for (cl_kernel k : raw) kernels.emplace_back(k);
    if (n > 0 && (err = clCreateKernelsInProgram(program_.get(), n, scratch_raw.data(), nullptr)) != CL_SUCCESS) {
      return Error(status_from_cl(err), fmt::format("clCreateKernelsInProgram: {} ({})", cl_error_name(err), err));
    }
    scratch.reserve(n);
    for (cl_kernel k : scratch_raw) scratch.emplace_back(k);
    // clCreateKernelsInProgram returns kernels in the same order both times; matched by name anyway.
    std::map<std::string, cl_kernel> scratch_by_name;
    for (const ClKernel& k : scratch) scratch_by_name.emplace(kernel_string(k.get(), CL_KERNEL_FUNCTION_NAME), k.get());

    const std::vector<unsigned char> zeros(facts.max_parameter_size, 0);
    d.kernels.reserve(n);
    for (ClKernel& k : kernels) {
      std::string name = kernel_string(k.get(), CL_KERNEL_FUNCTION_NAME);
      auto found = scratch_by_name.find(name);
      if (name.empty() || found == scratch_by_name.end()) {
        return Error(GPUP_STATUS_DEVICE_ERROR, "a kernel of the program has no CL_KERNEL_FUNCTION_NAME");
      }
      auto entry = make_kernel(std::move(k), name, device);
      if (!entry) return entry.error();
      d.kernels.push_back(describe_kernel(**entry, found->second, device, zeros));
      add_kernel(std::move(*entry));
    }
  }
  if (Status s = read_binary(program_.get(), max_binary, &d); !s) return s.error();
  return d;
}

// ---------------------------------------------------------------------------------------------
// Program allocations

gpup_status Device::create_program(GPUPDDI_ARG_CREATEALLOCATION* args, Allocation* alloc) {
  auto image = parse_program_desc(args->pPrivateDriverData, args->PrivateDriverDataSize);
  if (!image) {
    logf(GPUPDDI_LOG_WARN, "CreateAllocation: {}", image.error().message);
    return image.error().status;
  }
  const DeviceFacts& facts = adapter->facts;
  cl_context context = adapter->context.get();
  cl_device_id device = facts.device;
  const uint32_t version = image->version;
  // A build, compile or link the device refused: the output carries its error and log.
  auto refused = [&](cl_int err, std::string log, const char* what) {
    if (log.empty()) log = fmt::format("{} failed: {} ({})", what, cl_error_name(err), err);
    args->OutputDataWritten =
        write_program_output(args->pOutputData, args->OutputDataSize, version, err, log, nullptr);
    logf(GPUPDDI_LOG_INFO, "CreateAllocation: {} failed: {} ({}), {}-byte log", what, cl_error_name(err), err,
         log.size());
    return err == CL_OUT_OF_HOST_MEMORY || err == CL_OUT_OF_RESOURCES ? GPUP_STATUS_NO_MEMORY : GPUP_STATUS_BUILD_FAILED;
  };
  auto creation_failed = [&](cl_int err) {
    logf(GPUPDDI_LOG_WARN, "CreateAllocation: creating the program: {} ({})", cl_error_name(err), err);
    return status_from_cl(err);
  };

  // The options and the sources are the guest's: "-I dir", "-include file" or #include can make
  // the compiler read files of this process's file system (and echo them into the log). The
  // worker process's sandbox is what confines that; the KMD does not filter options. Include
  // names of COMPILE headers are checked by parse_program_desc (PoCL writes files under them).
  const std::string options = with_required_options(image->options);
  cl_int err = CL_SUCCESS;
  ClProgram program;
  std::string log;
  switch (image->format) {
    case GPUP_OCL_PROGRAM_SOURCE:
    case GPUP_OCL_PROGRAM_BINARY: {
      if (image->format == GPUP_OCL_PROGRAM_SOURCE) {
        const char* text = reinterpret_cast<const char*>(image->content.data());
        const size_t length = image->content.size();
        program.reset(clCreateProgramWithSource(context, 1, &text, &length, &err));
      } else {
        const unsigned char* bin = image->content.data();
        const size_t length = image->content.size();
        cl_int binary_status = CL_SUCCESS;
        program.reset(clCreateProgramWithBinary(context, 1, &device, &length, &bin, &binary_status, &err));
        if (err == CL_SUCCESS && binary_status != CL_SUCCESS) err = binary_status;
        if (err == CL_INVALID_BINARY) return refused(err, "the device does not accept this program binary", "build");
      }
      if (err != CL_SUCCESS) return creation_failed(err);
      err = clBuildProgram(program.get(), 1, &device, options.c_str(), nullptr, nullptr);
      log = build_log(program.get(), device);
      if (err != CL_SUCCESS) return refused(err, std::move(log), "clBuildProgram");
      break;
    }
    case GPUP_OCL_PROGRAM_COMPILE: {
      std::vector<ClProgram> headers;
      std::vector<cl_program> header_handles;
      std::vector<const char*> names;
      for (size_t i = 0; i < image->entries.size(); ++i) {
        const ProgramImage::Entry& e = image->entries[i];
        const char* text = reinterpret_cast<const char*>(e.data.data());
        const size_t length = e.data.size();
        ClProgram p(clCreateProgramWithSource(context, 1, &text, &length, &err));
        if (err != CL_SUCCESS) return creation_failed(err);
        if (i == 0) {
          program = std::move(p);
        } else {
          header_handles.push_back(p.get());
          names.push_back(e.name.c_str());
          headers.push_back(std::move(p));
        }
      }
      err = clCompileProgram(program.get(), 1, &device, options.c_str(), static_cast<cl_uint>(header_handles.size()),
                             header_handles.empty() ? nullptr : header_handles.data(),
                             names.empty() ? nullptr : names.data(), nullptr, nullptr);
      log = build_log(program.get(), device);
      if (err != CL_SUCCESS) return refused(err, std::move(log), "clCompileProgram");
      break;
    }
    case GPUP_OCL_PROGRAM_LINK: {
      std::vector<ClProgram> inputs;
      std::vector<cl_program> input_handles;
      for (size_t i = 0; i < image->entries.size(); ++i) {
        const unsigned char* bin = image->entries[i].data.data();
        const size_t length = image->entries[i].data.size();
        cl_int binary_status = CL_SUCCESS;
        ClProgram p(clCreateProgramWithBinary(context, 1, &device, &length, &bin, &binary_status, &err));
        if (err == CL_SUCCESS && binary_status != CL_SUCCESS) err = binary_status;
        if (err == CL_INVALID_BINARY) {
          return refused(err, fmt::format("link input {} is not a binary the device accepts", i), "link");
        }
        if (err != CL_SUCCESS) return creation_failed(err);
        input_handles.push_back(p.get());
        inputs.push_back(std::move(p));
      }
      program.reset(clLinkProgram(context, 1, &device, options.c_str(), static_cast<cl_uint>(input_handles.size()),
                                  input_handles.data(), nullptr, nullptr, &err));
      if (program) log = build_log(program.get(), device);
      if (err != CL_SUCCESS) return refused(err, std::move(log), "clLinkProgram");
      if (!program) return refused(CL_LINK_PROGRAM_FAILURE, std::move(log), "clLinkProgram");
      break;
    }
    default:
      return GPUP_STATUS_INTERNAL;  // parse_program_desc admits no other format
  }

  const cl_program_binary_type type = binary_type_of(program.get(), device);
  auto built = std::make_unique<Program>(std::move(program), type);
  if (version >= 2 && args->pOutputData != nullptr &&
      args->OutputDataSize >= sizeof(GPUP_OCL_BUILD_RESULT) + sizeof(GPUP_OCL_PROGRAM_INFO)) {
    auto described = built->describe(device, facts, args->OutputDataSize);
    if (!described) {
      logf(GPUPDDI_LOG_WARN, "CreateAllocation: describing the built program: {}", described.error().message);
      return described.error().status;
    }
    args->OutputDataWritten =
        write_program_output(args->pOutputData, args->OutputDataSize, version, CL_SUCCESS, log, &*described);
  } else {
    args->OutputDataWritten = write_program_output(args->pOutputData, args->OutputDataSize, version, CL_SUCCESS, log, nullptr);
  }
  alloc->program = std::move(built);
  return GPUP_STATUS_SUCCESS;
}

}  // namespace gpup::kmd::ocl
