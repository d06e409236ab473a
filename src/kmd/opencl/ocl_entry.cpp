// libgpup_kmd_opencl.so: the DDI entry points. Each one recovers its object from the handle,
// runs the body with exceptions contained (kmd_support.h guarded) and returns a gpup_status.
#include "kmd/opencl/ocl_kmd.h"

namespace gpup::kmd::ocl {
namespace {

gpup_status StartAdapter(GPUPDDI_ARG_STARTADAPTER* args) {
  return guarded("StartAdapter", [&]() -> gpup_status {
    if (!arg_ok(args)) return GPUP_STATUS_INVALID_PARAMETER;
    auto adapter = Adapter::start(args->pConfig);
    if (!adapter) {
      logf(GPUPDDI_LOG_ERROR, "StartAdapter: {}", adapter.error().message);
      return adapter.error().status;
    }
    args->hAdapter = to_handle(adapter->release());
    return GPUP_STATUS_SUCCESS;
  });
}

void StopAdapter(GPUPDDI_HANDLE hAdapter) {
  guarded_void("StopAdapter", [&] { delete from_handle<Adapter>(hAdapter); });
}

gpup_status QueryAdapterInfo(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_QUERYADAPTERINFO* args) {
  return guarded("QueryAdapterInfo", [&]() -> gpup_status {
    Adapter* a = from_handle<Adapter>(hAdapter);
    return a ? a->query(args) : GPUP_STATUS_INVALID_HANDLE;
  });
}

gpup_status SetVirtualMachineData(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_SETVIRTUALMACHINEDATA* args) {
  return guarded("SetVirtualMachineData", [&]() -> gpup_status {
    Adapter* a = from_handle<Adapter>(hAdapter);
    return a ? a->processes.set_vm_data(args) : GPUP_STATUS_INVALID_HANDLE;
  });
}

gpup_status Escape(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_ESCAPE* args) {
  return guarded("Escape", [&]() -> gpup_status {
    Adapter* a = from_handle<Adapter>(hAdapter);
    return a ? handle_escape(args, a->facts.info) : GPUP_STATUS_INVALID_HANDLE;
  });
}

gpup_status CreateProcess(GPUPDDI_HANDLE hAdapter, GPUPDDI_ARG_CREATEPROCESS* args) {
  return guarded("CreateProcess", [&]() -> gpup_status {
    Adapter* a = from_handle<Adapter>(hAdapter);
    return a ? a->processes.create(args) : GPUP_STATUS_INVALID_HANDLE;
  });
}

void DestroyProcess(GPUPDDI_HANDLE hAdapter, GPUPDDI_HANDLE hKmdProcess) {
  guarded_void("DestroyProcess", [&] {
    if (Adapter* a = from_handle<Adapter>(hAdapter)) a->processes.destroy(hKmdProcess);
  });
}

gpup_status CreateDevice(GPUPDDI_HANDLE hAdapter, GPUPDDI_ARG_CREATEDEVICE* args) {
  return guarded("CreateDevice", [&]() -> gpup_status {
    Adapter* a = from_handle<Adapter>(hAdapter);
    return a ? a->create_device(args) : GPUP_STATUS_INVALID_HANDLE;
  });
}

void DestroyDevice(GPUPDDI_HANDLE hDevice) {
  guarded_void("DestroyDevice", [&] {
    if (Device* d = from_handle<Device>(hDevice)) d->adapter->destroy_device(d);
  });
}

gpup_status CreateAllocation(GPUPDDI_HANDLE hDevice, GPUPDDI_ARG_CREATEALLOCATION* args) {
  return guarded("CreateAllocation", [&]() -> gpup_status {
    Device* d = from_handle<Device>(hDevice);
    return d ? d->create_allocation(args) : GPUP_STATUS_INVALID_HANDLE;
  });
}

void DestroyAllocation(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation) {
  guarded_void("DestroyAllocation", [&] {
    if (Device* d = from_handle<Device>(hDevice)) d->destroy_allocation(hAllocation);
  });
}

gpup_status Lock(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation) {
  return guarded("Lock", [&]() -> gpup_status {
    Device* d = from_handle<Device>(hDevice);
    return d ? d->lock(hAllocation) : GPUP_STATUS_INVALID_HANDLE;
  });
}

gpup_status Unlock(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation) {
  return guarded("Unlock", [&]() -> gpup_status {
    Device* d = from_handle<Device>(hDevice);
    return d ? d->unlock(hAllocation) : GPUP_STATUS_INVALID_HANDLE;
  });
}

gpup_status CreateContext(GPUPDDI_HANDLE hDevice, GPUPDDI_ARG_CREATECONTEXT* args) {
  return guarded("CreateContext", [&]() -> gpup_status {
    Device* d = from_handle<Device>(hDevice);
    return d ? d->create_context(args) : GPUP_STATUS_INVALID_HANDLE;
  });
}

void DestroyContext(GPUPDDI_HANDLE hContext) {
  guarded_void("DestroyContext", [&] {
    if (Context* c = from_handle<Context>(hContext)) c->device()->destroy_context(c);
  });
}

gpup_status SubmitCommand(GPUPDDI_HANDLE hContext, const GPUPDDI_ARG_SUBMITCOMMAND* args) {
  return guarded("SubmitCommand", [&]() -> gpup_status {
    Context* c = from_handle<Context>(hContext);
    return c ? c->submit(args) : GPUP_STATUS_INVALID_HANDLE;
  });
}

}  // namespace
}  // namespace gpup::kmd::ocl

extern "C" __attribute__((visibility("default"))) gpup_status GpupKmdDriverEntry(const GPUPDDI_CALLBACKS* pCallbacks,
                                                                                 GPUPDDI_DRIVER_FUNCS* pFuncs) {
  using namespace gpup::kmd::ocl;
  const gpup_status s = gpup::kmd::driver_entry_prologue(pCallbacks, pFuncs, "kmd_opencl");
  if (s != GPUP_STATUS_SUCCESS) return s;
  pFuncs->Adapter.pfnStartAdapter = StartAdapter;
  pFuncs->Adapter.pfnStopAdapter = StopAdapter;
  pFuncs->Adapter.pfnQueryAdapterInfo = QueryAdapterInfo;
  pFuncs->Adapter.pfnSetVirtualMachineData = SetVirtualMachineData;
  pFuncs->Adapter.pfnEscape = Escape;
  pFuncs->Adapter.pfnResetEngine = nullptr;  // OpenCL cannot abort a running kernel
  pFuncs->Process.pfnCreateProcess = CreateProcess;
  pFuncs->Process.pfnDestroyProcess = DestroyProcess;
  pFuncs->Device.pfnCreateDevice = CreateDevice;
  pFuncs->Device.pfnDestroyDevice = DestroyDevice;
  pFuncs->Memory.pfnCreateAllocation = CreateAllocation;
  pFuncs->Memory.pfnDestroyAllocation = DestroyAllocation;
  pFuncs->Memory.pfnLock = Lock;
  pFuncs->Memory.pfnUnlock = Unlock;
  pFuncs->Context.pfnCreateContext = CreateContext;
  pFuncs->Context.pfnDestroyContext = DestroyContext;
  pFuncs->Context.pfnSubmitCommand = SubmitCommand;
  return GPUP_STATUS_SUCCESS;
}
