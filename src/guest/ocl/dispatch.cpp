// The ICD dispatch table and the three symbols libgpupocl exports to the ICD loader.
//
// Every slot of cl_icd_dispatch is filled. What a partition does not carry (SVM, pipes,
// GL/EGL/D3D sharing, IL programs, and images and samplers on a device without them) answers
// with the error the OpenCL specification gives for a device without the feature, never a crash.
#include <string_view>

#include "guest/ocl/icd.h"

#define GPUP_OCL_EXPORT extern "C" __attribute__((visibility("default")))

namespace gpup::ocl::api {

// platform.cpp
cl_int GetPlatformIDs(cl_uint, cl_platform_id*, cl_uint*);
cl_int GetPlatformInfo(cl_platform_id, cl_platform_info, size_t, void*, size_t*);
cl_int GetDeviceIDs(cl_platform_id, cl_device_type, cl_uint, cl_device_id*, cl_uint*);
cl_int GetDeviceInfo(cl_device_id, cl_device_info, size_t, void*, size_t*);
cl_int CreateSubDevices(cl_device_id, const cl_device_partition_property*, cl_uint, cl_device_id*, cl_uint*);
cl_int RetainDevice(cl_device_id);
cl_int ReleaseDevice(cl_device_id);
cl_int GetDeviceAndHostTimer(cl_device_id, cl_ulong*, cl_ulong*);
cl_int GetHostTimer(cl_device_id, cl_ulong*);
cl_context CreateContext(const cl_context_properties*, cl_uint, const cl_device_id*,
                         void(CL_CALLBACK*)(const char*, const void*, size_t, void*), void*, cl_int*);
cl_context CreateContextFromType(const cl_context_properties*, cl_device_type,
                                 void(CL_CALLBACK*)(const char*, const void*, size_t, void*), void*, cl_int*);
cl_int RetainContext(cl_context);
cl_int ReleaseContext(cl_context);
cl_int GetContextInfo(cl_context, cl_context_info, size_t, void*, size_t*);
cl_int SetContextDestructorCallback(cl_context, void(CL_CALLBACK*)(cl_context, void*), void*);
// memory.cpp
cl_mem CreateBuffer(cl_context, cl_mem_flags, size_t, void*, cl_int*);
cl_mem CreateBufferWithProperties(cl_context, const cl_mem_properties*, cl_mem_flags, size_t, void*, cl_int*);
cl_mem CreateSubBuffer(cl_mem, cl_mem_flags, cl_buffer_create_type, const void*, cl_int*);
cl_int RetainMemObject(cl_mem);
cl_int ReleaseMemObject(cl_mem);
cl_int SetMemObjectDestructorCallback(cl_mem, void(CL_CALLBACK*)(cl_mem, void*), void*);
cl_int GetMemObjectInfo(cl_mem, cl_mem_info, size_t, void*, size_t*);
// program.cpp
cl_program CreateProgramWithSource(cl_context, cl_uint, const char**, const size_t*, cl_int*);
cl_program CreateProgramWithBinary(cl_context, cl_uint, const cl_device_id*, const size_t*, const unsigned char**,
                                   cl_int*, cl_int*);
cl_program CreateProgramWithBuiltInKernels(cl_context, cl_uint, const cl_device_id*, const char*, cl_int*);
cl_program CreateProgramWithIL(cl_context, const void*, size_t, cl_int*);
cl_int RetainProgram(cl_program);
cl_int ReleaseProgram(cl_program);
cl_int BuildProgram(cl_program, cl_uint, const cl_device_id*, const char*, void(CL_CALLBACK*)(cl_program, void*), void*);
cl_int CompileProgram(cl_program, cl_uint, const cl_device_id*, const char*, cl_uint, const cl_program*, const char**,
                      void(CL_CALLBACK*)(cl_program, void*), void*);
cl_program LinkProgram(cl_context, cl_uint, const cl_device_id*, const char*, cl_uint, const cl_program*,
                       void(CL_CALLBACK*)(cl_program, void*), void*, cl_int*);
cl_int UnloadCompiler();
cl_int UnloadPlatformCompiler(cl_platform_id);
cl_int GetProgramInfo(cl_program, cl_program_info, size_t, void*, size_t*);
cl_int GetProgramBuildInfo(cl_program, cl_device_id, cl_program_build_info, size_t, void*, size_t*);
cl_int SetProgramReleaseCallback(cl_program, void(CL_CALLBACK*)(cl_program, void*), void*);
cl_int SetProgramSpecializationConstant(cl_program, cl_uint, size_t, const void*);
cl_kernel CreateKernel(cl_program, const char*, cl_int*);
cl_int CreateKernelsInProgram(cl_program, cl_uint, cl_kernel*, cl_uint*);
cl_kernel CloneKernel(cl_kernel, cl_int*);
cl_int RetainKernel(cl_kernel);
cl_int ReleaseKernel(cl_kernel);
cl_int SetKernelArg(cl_kernel, cl_uint, size_t, const void*);
cl_int SetKernelArgSVMPointer(cl_kernel, cl_uint, const void*);
cl_int SetKernelExecInfo(cl_kernel, cl_kernel_exec_info, size_t, const void*);
cl_int GetKernelInfo(cl_kernel, cl_kernel_info, size_t, void*, size_t*);
cl_int GetKernelArgInfo(cl_kernel, cl_uint, cl_kernel_arg_info, size_t, void*, size_t*);
cl_int GetKernelWorkGroupInfo(cl_kernel, cl_device_id, cl_kernel_work_group_info, size_t, void*, size_t*);
cl_int GetKernelSubGroupInfo(cl_kernel, cl_device_id, cl_kernel_sub_group_info, size_t, const void*, size_t, void*,
                             size_t*);
// queue.cpp
cl_command_queue CreateCommandQueue(cl_context, cl_device_id, cl_command_queue_properties, cl_int*);
cl_command_queue CreateCommandQueueWithProperties(cl_context, cl_device_id, const cl_queue_properties*, cl_int*);
cl_int RetainCommandQueue(cl_command_queue);
cl_int ReleaseCommandQueue(cl_command_queue);
cl_int GetCommandQueueInfo(cl_command_queue, cl_command_queue_info, size_t, void*, size_t*);
cl_int SetCommandQueueProperty(cl_command_queue, cl_command_queue_properties, cl_bool, cl_command_queue_properties*);
cl_int SetDefaultDeviceCommandQueue(cl_context, cl_device_id, cl_command_queue);
cl_int Flush(cl_command_queue);
cl_int Finish(cl_command_queue);
cl_int EnqueueReadBuffer(cl_command_queue, cl_mem, cl_bool, size_t, size_t, void*, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueWriteBuffer(cl_command_queue, cl_mem, cl_bool, size_t, size_t, const void*, cl_uint, const cl_event*,
                          cl_event*);
cl_int EnqueueReadBufferRect(cl_command_queue, cl_mem, cl_bool, const size_t*, const size_t*, const size_t*, size_t,
                             size_t, size_t, size_t, void*, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueWriteBufferRect(cl_command_queue, cl_mem, cl_bool, const size_t*, const size_t*, const size_t*, size_t,
                              size_t, size_t, size_t, const void*, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueCopyBuffer(cl_command_queue, cl_mem, cl_mem, size_t, size_t, size_t, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueCopyBufferRect(cl_command_queue, cl_mem, cl_mem, const size_t*, const size_t*, const size_t*, size_t,
                             size_t, size_t, size_t, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueFillBuffer(cl_command_queue, cl_mem, const void*, size_t, size_t, size_t, cl_uint, const cl_event*,
                         cl_event*);
void* EnqueueMapBuffer(cl_command_queue, cl_mem, cl_bool, cl_map_flags, size_t, size_t, cl_uint, const cl_event*,
                       cl_event*, cl_int*);
cl_int EnqueueUnmapMemObject(cl_command_queue, cl_mem, void*, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueMigrateMemObjects(cl_command_queue, cl_uint, const cl_mem*, cl_mem_migration_flags, cl_uint,
                                const cl_event*, cl_event*);
cl_int EnqueueNDRangeKernel(cl_command_queue, cl_kernel, cl_uint, const size_t*, const size_t*, const size_t*, cl_uint,
                            const cl_event*, cl_event*);
cl_int EnqueueTask(cl_command_queue, cl_kernel, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueNativeKernel(cl_command_queue, void(CL_CALLBACK*)(void*), void*, size_t, cl_uint, const cl_mem*,
                           const void**, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueMarker(cl_command_queue, cl_event*);
cl_int EnqueueBarrier(cl_command_queue);
cl_int EnqueueWaitForEvents(cl_command_queue, cl_uint, const cl_event*);
cl_int EnqueueMarkerWithWaitList(cl_command_queue, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueBarrierWithWaitList(cl_command_queue, cl_uint, const cl_event*, cl_event*);
// image.cpp
cl_mem CreateImage2D(cl_context, cl_mem_flags, const cl_image_format*, size_t, size_t, size_t, void*, cl_int*);
cl_mem CreateImage3D(cl_context, cl_mem_flags, const cl_image_format*, size_t, size_t, size_t, size_t, size_t, void*,
                     cl_int*);
cl_mem CreateImage(cl_context, cl_mem_flags, const cl_image_format*, const cl_image_desc*, void*, cl_int*);
cl_mem CreateImageWithProperties(cl_context, const cl_mem_properties*, cl_mem_flags, const cl_image_format*,
                                 const cl_image_desc*, void*, cl_int*);
cl_int GetSupportedImageFormats(cl_context, cl_mem_flags, cl_mem_object_type, cl_uint, cl_image_format*, cl_uint*);
cl_int GetImageInfo(cl_mem, cl_image_info, size_t, void*, size_t*);
cl_sampler CreateSampler(cl_context, cl_bool, cl_addressing_mode, cl_filter_mode, cl_int*);
cl_sampler CreateSamplerWithProperties(cl_context, const cl_sampler_properties*, cl_int*);
cl_int RetainSampler(cl_sampler);
cl_int ReleaseSampler(cl_sampler);
cl_int GetSamplerInfo(cl_sampler, cl_sampler_info, size_t, void*, size_t*);
// queue.cpp (images)
cl_int EnqueueReadImage(cl_command_queue, cl_mem, cl_bool, const size_t*, const size_t*, size_t, size_t, void*,
                        cl_uint, const cl_event*, cl_event*);
cl_int EnqueueWriteImage(cl_command_queue, cl_mem, cl_bool, const size_t*, const size_t*, size_t, size_t,
                         const void*, cl_uint, const cl_event*, cl_event*);
cl_int EnqueueCopyImage(cl_command_queue, cl_mem, cl_mem, const size_t*, const size_t*, const size_t*, cl_uint,
                        const cl_event*, cl_event*);
cl_int EnqueueCopyImageToBuffer(cl_command_queue, cl_mem, cl_mem, const size_t*, const size_t*, size_t, cl_uint,
                                const cl_event*, cl_event*);
cl_int EnqueueCopyBufferToImage(cl_command_queue, cl_mem, cl_mem, size_t, const size_t*, const size_t*, cl_uint,
                                const cl_event*, cl_event*);
void* EnqueueMapImage(cl_command_queue, cl_mem, cl_bool, cl_map_flags, const size_t*, const size_t*, size_t*,
                      size_t*, cl_uint, const cl_event*, cl_event*, cl_int*);
cl_int EnqueueFillImage(cl_command_queue, cl_mem, const void*, const size_t*, const size_t*, cl_uint,
                        const cl_event*, cl_event*);
// event.cpp
cl_int WaitForEvents(cl_uint, const cl_event*);
cl_int GetEventInfo(cl_event, cl_event_info, size_t, void*, size_t*);
cl_int RetainEvent(cl_event);
cl_int ReleaseEvent(cl_event);
cl_event CreateUserEvent(cl_context, cl_int*);
cl_int SetUserEventStatus(cl_event, cl_int);
cl_int SetEventCallback(cl_event, cl_int, void(CL_CALLBACK*)(cl_event, cl_int, void*), void*);
cl_int GetEventProfilingInfo(cl_event, cl_profiling_info, size_t, void*, size_t*);

void* GetExtensionFunctionAddress(const char* name);
void* GetExtensionFunctionAddressForPlatform(cl_platform_id p, const char* name);

namespace {

template <typename T>
T* refuse(cl_int* errcode_ret, cl_int e) {
  if (errcode_ret) *errcode_ret = e;
  return nullptr;
}

cl_int context_or(cl_context c, cl_int e) { return valid(c) ? e : CL_INVALID_CONTEXT; }
cl_int queue_or(cl_command_queue q, cl_int e) { return valid(q) ? e : CL_INVALID_COMMAND_QUEUE; }

// --- GL / EGL sharing: no context is created from a GL or EGL context ----------------------------

cl_mem CreateFromGLBuffer(cl_context c, cl_mem_flags, cl_GLuint, int* err) {
  return refuse<_cl_mem>(err, context_or(c, CL_INVALID_CONTEXT));
}
cl_mem CreateFromGLTexture2D(cl_context c, cl_mem_flags, cl_GLenum, cl_GLint, cl_GLuint, cl_int* err) {
  return refuse<_cl_mem>(err, context_or(c, CL_INVALID_CONTEXT));
}
cl_mem CreateFromGLTexture3D(cl_context c, cl_mem_flags, cl_GLenum, cl_GLint, cl_GLuint, cl_int* err) {
  return refuse<_cl_mem>(err, context_or(c, CL_INVALID_CONTEXT));
}
cl_mem CreateFromGLTexture(cl_context c, cl_mem_flags, cl_GLenum, cl_GLint, cl_GLuint, cl_int* err) {
  return refuse<_cl_mem>(err, context_or(c, CL_INVALID_CONTEXT));
}
cl_mem CreateFromGLRenderbuffer(cl_context c, cl_mem_flags, cl_GLuint, cl_int* err) {
  return refuse<_cl_mem>(err, context_or(c, CL_INVALID_CONTEXT));
}
cl_int GetGLObjectInfo(cl_mem, cl_gl_object_type*, cl_GLuint*) { return CL_INVALID_GL_OBJECT; }
cl_int GetGLTextureInfo(cl_mem, cl_gl_texture_info, size_t, void*, size_t*) { return CL_INVALID_GL_OBJECT; }
cl_int EnqueueAcquireGLObjects(cl_command_queue q, cl_uint, const cl_mem*, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_CONTEXT);
}
cl_int EnqueueReleaseGLObjects(cl_command_queue q, cl_uint, const cl_mem*, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_CONTEXT);
}
cl_int GetGLContextInfoKHR(const cl_context_properties*, cl_gl_context_info, size_t, void*, size_t*) {
  return CL_INVALID_OPERATION;
}
cl_event CreateEventFromGLsyncKHR(cl_context c, cl_GLsync, cl_int* err) {
  return refuse<_cl_event>(err, context_or(c, CL_INVALID_CONTEXT));
}
cl_mem CreateFromEGLImageKHR(cl_context c, CLeglDisplayKHR, CLeglImageKHR, cl_mem_flags,
                             const cl_egl_image_properties_khr*, cl_int* err) {
  return refuse<_cl_mem>(err, context_or(c, CL_INVALID_CONTEXT));
}
cl_int EnqueueAcquireEGLObjectsKHR(cl_command_queue q, cl_uint, const cl_mem*, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_CONTEXT);
}
cl_int EnqueueReleaseEGLObjectsKHR(cl_command_queue q, cl_uint, const cl_mem*, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_CONTEXT);
}
cl_event CreateEventFromEGLSyncKHR(cl_context c, CLeglSyncKHR, CLeglDisplayKHR, cl_int* err) {
  return refuse<_cl_event>(err, context_or(c, CL_INVALID_CONTEXT));
}

// --- device fission (EXT), pipes, SVM: not carried ---------------------------------------------

cl_int CreateSubDevicesEXT(cl_device_id d, const cl_device_partition_property_ext*, cl_uint, cl_device_id*, cl_uint*) {
  return valid(d) ? CL_INVALID_VALUE : CL_INVALID_DEVICE;
}
cl_int RetainDeviceEXT(cl_device_id d) { return RetainDevice(d); }
cl_int ReleaseDeviceEXT(cl_device_id d) { return ReleaseDevice(d); }
cl_mem CreatePipe(cl_context c, cl_mem_flags, cl_uint, cl_uint, const cl_pipe_properties*, cl_int* err) {
  return refuse<_cl_mem>(err, context_or(c, CL_INVALID_OPERATION));
}
cl_int GetPipeInfo(cl_mem, cl_pipe_info, size_t, void*, size_t*) { return CL_INVALID_MEM_OBJECT; }
void* SVMAlloc(cl_context, cl_svm_mem_flags, size_t, unsigned int) { return nullptr; }
void SVMFree(cl_context, void*) {}
cl_int EnqueueSVMFree(cl_command_queue q, cl_uint, void**, void(CL_CALLBACK*)(cl_command_queue, cl_uint, void**, void*),
                      void*, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_OPERATION);
}
cl_int EnqueueSVMMemcpy(cl_command_queue q, cl_bool, void*, const void*, size_t, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_OPERATION);
}
cl_int EnqueueSVMMemFill(cl_command_queue q, void*, const void*, size_t, size_t, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_OPERATION);
}
cl_int EnqueueSVMMap(cl_command_queue q, cl_bool, cl_map_flags, void*, size_t, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_OPERATION);
}
cl_int EnqueueSVMUnmap(cl_command_queue q, void*, cl_uint, const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_OPERATION);
}
cl_int EnqueueSVMMigrateMem(cl_command_queue q, cl_uint, const void**, const size_t*, cl_mem_migration_flags, cl_uint,
                            const cl_event*, cl_event*) {
  return queue_or(q, CL_INVALID_OPERATION);
}

// Direct3D and DX9 media sharing concern Windows only. Their slots hold a function that answers
// CL_INVALID_OPERATION whatever it is passed (its arguments are ignored; on the SysV ABI a
// caller's extra arguments are harmless).
cl_int NoD3DSharing() { return CL_INVALID_OPERATION; }
template <typename Slot>
void refuse_d3d(Slot& slot) {
  slot = reinterpret_cast<Slot>(&NoD3DSharing);
}

cl_icd_dispatch make_dispatch() {
  cl_icd_dispatch d{};
  d.clGetPlatformIDs = GetPlatformIDs;
  d.clGetPlatformInfo = GetPlatformInfo;
  d.clGetDeviceIDs = GetDeviceIDs;
  d.clGetDeviceInfo = GetDeviceInfo;
  d.clCreateContext = CreateContext;
  d.clCreateContextFromType = CreateContextFromType;
  d.clRetainContext = RetainContext;
  d.clReleaseContext = ReleaseContext;
  d.clGetContextInfo = GetContextInfo;
  d.clCreateCommandQueue = CreateCommandQueue;
  d.clRetainCommandQueue = RetainCommandQueue;
  d.clReleaseCommandQueue = ReleaseCommandQueue;
  d.clGetCommandQueueInfo = GetCommandQueueInfo;
  d.clSetCommandQueueProperty = SetCommandQueueProperty;
  d.clCreateBuffer = CreateBuffer;
  d.clCreateImage2D = CreateImage2D;
  d.clCreateImage3D = CreateImage3D;
  d.clRetainMemObject = RetainMemObject;
  d.clReleaseMemObject = ReleaseMemObject;
  d.clGetSupportedImageFormats = GetSupportedImageFormats;
  d.clGetMemObjectInfo = GetMemObjectInfo;
  d.clGetImageInfo = GetImageInfo;
  d.clCreateSampler = CreateSampler;
  d.clRetainSampler = RetainSampler;
  d.clReleaseSampler = ReleaseSampler;
  d.clGetSamplerInfo = GetSamplerInfo;
  d.clCreateProgramWithSource = CreateProgramWithSource;
  d.clCreateProgramWithBinary = CreateProgramWithBinary;
  d.clRetainProgram = RetainProgram;
  d.clReleaseProgram = ReleaseProgram;
  d.clBuildProgram = BuildProgram;
  d.clUnloadCompiler = UnloadCompiler;
  d.clGetProgramInfo = GetProgramInfo;
  d.clGetProgramBuildInfo = GetProgramBuildInfo;
  d.clCreateKernel = CreateKernel;
  d.clCreateKernelsInProgram = CreateKernelsInProgram;
  d.clRetainKernel = RetainKernel;
  d.clReleaseKernel = ReleaseKernel;
  d.clSetKernelArg = SetKernelArg;
  d.clGetKernelInfo = GetKernelInfo;
  d.clGetKernelWorkGroupInfo = GetKernelWorkGroupInfo;
  d.clWaitForEvents = WaitForEvents;
  d.clGetEventInfo = GetEventInfo;
  d.clRetainEvent = RetainEvent;
  d.clReleaseEvent = ReleaseEvent;
  d.clGetEventProfilingInfo = GetEventProfilingInfo;
  d.clFlush = Flush;
  d.clFinish = Finish;
  d.clEnqueueReadBuffer = EnqueueReadBuffer;
  d.clEnqueueWriteBuffer = EnqueueWriteBuffer;
  d.clEnqueueCopyBuffer = EnqueueCopyBuffer;
  d.clEnqueueReadImage = EnqueueReadImage;
  d.clEnqueueWriteImage = EnqueueWriteImage;
  d.clEnqueueCopyImage = EnqueueCopyImage;
  d.clEnqueueCopyImageToBuffer = EnqueueCopyImageToBuffer;
  d.clEnqueueCopyBufferToImage = EnqueueCopyBufferToImage;
  d.clEnqueueMapBuffer = EnqueueMapBuffer;
  d.clEnqueueMapImage = EnqueueMapImage;
  d.clEnqueueUnmapMemObject = EnqueueUnmapMemObject;
  d.clEnqueueNDRangeKernel = EnqueueNDRangeKernel;
  d.clEnqueueTask = EnqueueTask;
  d.clEnqueueNativeKernel = EnqueueNativeKernel;
  d.clEnqueueMarker = EnqueueMarker;
  d.clEnqueueWaitForEvents = EnqueueWaitForEvents;
  d.clEnqueueBarrier = EnqueueBarrier;
  d.clGetExtensionFunctionAddress = GetExtensionFunctionAddress;
  d.clCreateFromGLBuffer = CreateFromGLBuffer;
  d.clCreateFromGLTexture2D = CreateFromGLTexture2D;
  d.clCreateFromGLTexture3D = CreateFromGLTexture3D;
  d.clCreateFromGLRenderbuffer = CreateFromGLRenderbuffer;
  d.clGetGLObjectInfo = GetGLObjectInfo;
  d.clGetGLTextureInfo = GetGLTextureInfo;
  d.clEnqueueAcquireGLObjects = EnqueueAcquireGLObjects;
  d.clEnqueueReleaseGLObjects = EnqueueReleaseGLObjects;
  d.clGetGLContextInfoKHR = GetGLContextInfoKHR;
  refuse_d3d(d.clGetDeviceIDsFromD3D10KHR);
  refuse_d3d(d.clCreateFromD3D10BufferKHR);
  refuse_d3d(d.clCreateFromD3D10Texture2DKHR);
  refuse_d3d(d.clCreateFromD3D10Texture3DKHR);
  refuse_d3d(d.clEnqueueAcquireD3D10ObjectsKHR);
  refuse_d3d(d.clEnqueueReleaseD3D10ObjectsKHR);
  d.clSetEventCallback = SetEventCallback;
  d.clCreateSubBuffer = CreateSubBuffer;
  d.clSetMemObjectDestructorCallback = SetMemObjectDestructorCallback;
  d.clCreateUserEvent = CreateUserEvent;
  d.clSetUserEventStatus = SetUserEventStatus;
  d.clEnqueueReadBufferRect = EnqueueReadBufferRect;
  d.clEnqueueWriteBufferRect = EnqueueWriteBufferRect;
  d.clEnqueueCopyBufferRect = EnqueueCopyBufferRect;
  d.clCreateSubDevicesEXT = CreateSubDevicesEXT;
  d.clRetainDeviceEXT = RetainDeviceEXT;
  d.clReleaseDeviceEXT = ReleaseDeviceEXT;
  d.clCreateEventFromGLsyncKHR = CreateEventFromGLsyncKHR;
  d.clCreateSubDevices = CreateSubDevices;
  d.clRetainDevice = RetainDevice;
  d.clReleaseDevice = ReleaseDevice;
  d.clCreateImage = CreateImage;
  d.clCreateProgramWithBuiltInKernels = CreateProgramWithBuiltInKernels;
  d.clCompileProgram = CompileProgram;
  d.clLinkProgram = LinkProgram;
  d.clUnloadPlatformCompiler = UnloadPlatformCompiler;
  d.clGetKernelArgInfo = GetKernelArgInfo;
  d.clEnqueueFillBuffer = EnqueueFillBuffer;
  d.clEnqueueFillImage = EnqueueFillImage;
  d.clEnqueueMigrateMemObjects = EnqueueMigrateMemObjects;
  d.clEnqueueMarkerWithWaitList = EnqueueMarkerWithWaitList;
  d.clEnqueueBarrierWithWaitList = EnqueueBarrierWithWaitList;
  d.clGetExtensionFunctionAddressForPlatform = GetExtensionFunctionAddressForPlatform;
  d.clCreateFromGLTexture = CreateFromGLTexture;
  refuse_d3d(d.clGetDeviceIDsFromD3D11KHR);
  refuse_d3d(d.clCreateFromD3D11BufferKHR);
  refuse_d3d(d.clCreateFromD3D11Texture2DKHR);
  refuse_d3d(d.clCreateFromD3D11Texture3DKHR);
  refuse_d3d(d.clCreateFromDX9MediaSurfaceKHR);
  refuse_d3d(d.clEnqueueAcquireD3D11ObjectsKHR);
  refuse_d3d(d.clEnqueueReleaseD3D11ObjectsKHR);
  refuse_d3d(d.clGetDeviceIDsFromDX9MediaAdapterKHR);
  refuse_d3d(d.clEnqueueAcquireDX9MediaSurfacesKHR);
  refuse_d3d(d.clEnqueueReleaseDX9MediaSurfacesKHR);
  d.clCreateFromEGLImageKHR = CreateFromEGLImageKHR;
  d.clEnqueueAcquireEGLObjectsKHR = EnqueueAcquireEGLObjectsKHR;
  d.clEnqueueReleaseEGLObjectsKHR = EnqueueReleaseEGLObjectsKHR;
  d.clCreateEventFromEGLSyncKHR = CreateEventFromEGLSyncKHR;
  d.clCreateCommandQueueWithProperties = CreateCommandQueueWithProperties;
  d.clCreatePipe = CreatePipe;
  d.clGetPipeInfo = GetPipeInfo;
  d.clSVMAlloc = SVMAlloc;
  d.clSVMFree = SVMFree;
  d.clEnqueueSVMFree = EnqueueSVMFree;
  d.clEnqueueSVMMemcpy = EnqueueSVMMemcpy;
  d.clEnqueueSVMMemFill = EnqueueSVMMemFill;
  d.clEnqueueSVMMap = EnqueueSVMMap;
  d.clEnqueueSVMUnmap = EnqueueSVMUnmap;
  d.clCreateSamplerWithProperties = CreateSamplerWithProperties;
  d.clSetKernelArgSVMPointer = SetKernelArgSVMPointer;
  d.clSetKernelExecInfo = SetKernelExecInfo;
  d.clGetKernelSubGroupInfoKHR = GetKernelSubGroupInfo;
  d.clCloneKernel = CloneKernel;
  d.clCreateProgramWithIL = CreateProgramWithIL;
  d.clEnqueueSVMMigrateMem = EnqueueSVMMigrateMem;
  d.clGetDeviceAndHostTimer = GetDeviceAndHostTimer;
  d.clGetHostTimer = GetHostTimer;
  d.clGetKernelSubGroupInfo = GetKernelSubGroupInfo;
  d.clSetDefaultDeviceCommandQueue = SetDefaultDeviceCommandQueue;
  d.clSetProgramReleaseCallback = SetProgramReleaseCallback;
  d.clSetProgramSpecializationConstant = SetProgramSpecializationConstant;
  d.clCreateBufferWithProperties = CreateBufferWithProperties;
  d.clCreateImageWithProperties = CreateImageWithProperties;
  d.clSetContextDestructorCallback = SetContextDestructorCallback;
  return d;
}

}  // namespace

}  // namespace gpup::ocl::api

namespace gpup::ocl {
const cl_icd_dispatch kDispatch = api::make_dispatch();
}

// ------------------------------------------------------------------------------------------------
// Exported: what the ICD loader looks up.

GPUP_OCL_EXPORT cl_int clIcdGetPlatformIDsKHR(cl_uint num_entries, cl_platform_id* platforms, cl_uint* num_platforms) {
  return gpup::ocl::api::GetPlatformIDs(num_entries, platforms, num_platforms);
}

GPUP_OCL_EXPORT void* clGetExtensionFunctionAddress(const char* name) {
  return gpup::ocl::api::GetExtensionFunctionAddress(name);
}

GPUP_OCL_EXPORT void* clGetExtensionFunctionAddressForPlatform(cl_platform_id p, const char* name) {
  return gpup::ocl::api::GetExtensionFunctionAddressForPlatform(p, name);
}

void* gpup::ocl::api::GetExtensionFunctionAddressForPlatform(cl_platform_id p, const char* name) {
  if (p != nullptr && !gpup::ocl::valid(p)) return nullptr;
  return GetExtensionFunctionAddress(name);
}

GPUP_OCL_EXPORT cl_int clGetPlatformInfo(cl_platform_id p, cl_platform_info param, size_t n, void* v, size_t* ret) {
  return gpup::ocl::api::GetPlatformInfo(p, param, n, v, ret);
}

void* gpup::ocl::api::GetExtensionFunctionAddress(const char* name) {
  if (name == nullptr) return nullptr;
  const std::string_view n(name);
  if (n == "clIcdGetPlatformIDsKHR") return reinterpret_cast<void*>(&clIcdGetPlatformIDsKHR);
  return nullptr;
}
