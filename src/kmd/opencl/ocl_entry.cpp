// libgpup_kmd_opencl.so: the DDI entry points. They are kmd_support.h's DdiEntryPoints over this
// KMD's Adapter, Device and Context: each one recovers its object from the handle, runs the body
// with exceptions contained (kmd_support.h guarded) and returns a gpup_status.
#include "kmd/opencl/ocl_kmd.h"

extern "C" __attribute__((visibility("default"))) gpup_status GpupKmdDriverEntry(const GPUPDDI_CALLBACKS* pCallbacks,
                                                                                 GPUPDDI_DRIVER_FUNCS* pFuncs) {
  using namespace gpup::kmd::ocl;
  return gpup::kmd::driver_entry<Adapter, Device, Context>(pCallbacks, pFuncs, "kmd_opencl");
}
