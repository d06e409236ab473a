/* vector_add: a gpup guest program written against the thunk API (gpup/kmt.h) alone.
 *
 * It finds its partition's adapter, builds an OpenCL C kernel on the host, fills two vectors,
 * adds them on the device, checks every element, and reports its partition's memory use.
 * Run it in a partition:  gpup run --vm NAME -- build/bin/gpup-sample-vector-add [N [hold]]
 * With "hold" it keeps its buffers until its standard input closes, so the host's view of the
 * partition can be looked at while the memory is in use. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpup/kmd_opencl.h"
#include "gpup/kmt.h"

#define TRY(expr)                                                                              \
  do {                                                                                         \
    gpup_status s_ = (expr);                                                                   \
    if (GPUP_FAILED(s_)) {                                                                     \
      fprintf(stderr, "vector_add: %s failed: %s: %s\n", #expr, gpup_status_name(s_),          \
              GpupKmtGetLastErrorMessage());                                                   \
      exit(1);                                                                                 \
    }                                                                                          \
  } while (0)

static const char* kSource =
    "__kernel void vadd(__global const float* a, __global const float* b, __global float* c) {\n"
    "  size_t i = get_global_id(0);\n"
    "  c[i] = a[i] + b[i];\n"
    "}\n";

typedef struct {
  GPUPKMT_HANDLE alloc;
  uint64_t va;
} Buffer;

static Buffer make_buffer(GPUPKMT_HANDLE device, uint64_t size) {
  Buffer b;
  GPUPKMT_CREATEALLOCATION ca = {0};
  ca.hDevice = device;
  ca.Flags = GPUPKMT_ALLOCATION_CPU_VISIBLE;
  ca.Size = size;
  TRY(GpupKmtCreateAllocation(&ca));
  b.alloc = ca.hAllocation;
  GPUPKMT_RESERVEGPUVA rv = {0, size, 0};
  TRY(GpupKmtReserveGpuVirtualAddress(&rv));
  b.va = rv.VirtualAddress;
  GPUPKMT_MAPGPUVA mv = {b.alloc, GPUPKMT_PROTECTION_READ | GPUPKMT_PROTECTION_WRITE, b.va, 0, size};
  TRY(GpupKmtMapGpuVirtualAddress(&mv));
  return b;
}

static float* lock(GPUPKMT_HANDLE device, Buffer b) {
  GPUPKMT_LOCK l = {device, b.alloc, NULL, 0};
  TRY(GpupKmtLock(&l));
  return (float*)l.pData;
}

static void unlock(GPUPKMT_HANDLE device, Buffer b) {
  GPUPKMT_UNLOCK u = {device, b.alloc};
  TRY(GpupKmtUnlock(&u));
}

int main(int argc, char** argv) {
  const uint32_t n = argc > 1 ? (uint32_t)strtoul(argv[1], NULL, 0) : (1u << 20);
  const char* vm = getenv("GPUP_VM") ? getenv("GPUP_VM") : "?";

  GPUPKMT_ADAPTERINFO adapters[4];
  GPUPKMT_ENUMADAPTERS en = {4, adapters};
  TRY(GpupKmtEnumAdapters(&en));
  printf("[%s] adapter: %s (LUID %#" PRIx64 ", budget %" PRIu64 " MiB)\n", vm, adapters[0].Description,
         adapters[0].AdapterLuid, adapters[0].Budget >> 20);

  GPUPKMT_CREATEDEVICE cd = {adapters[0].hAdapter, 0, 0};
  TRY(GpupKmtCreateDevice(&cd));
  GPUPKMT_CREATECONTEXT cc = {0};
  cc.hDevice = cd.hDevice;
  TRY(GpupKmtCreateContext(&cc));
  GPUPKMT_CREATESYNCHRONIZATIONOBJECT cs = {0};
  cs.hDevice = cd.hDevice;
  cs.Type = GPUPKMT_SYNCOBJECT_MONITORED_FENCE;
  TRY(GpupKmtCreateSynchronizationObject(&cs));

  /* The kernel travels as a program allocation; the host compiles it. */
  size_t src_len = strlen(kSource);
  size_t priv_len = sizeof(GPUP_OCL_PROGRAM_DESC) + src_len;
  unsigned char* priv = malloc(priv_len);
  GPUP_OCL_PROGRAM_DESC desc = {GPUP_OCL_PROGRAM_MAGIC, GPUP_OCL_PROGRAM_VERSION, GPUP_OCL_PROGRAM_SOURCE, 0,
                                (uint32_t)src_len, 0};
  memcpy(priv, &desc, sizeof desc);
  memcpy(priv + sizeof desc, kSource, src_len);
  char log[4096];
  GPUPKMT_CREATEALLOCATION prog = {0};
  prog.hDevice = cd.hDevice;
  prog.Flags = GPUPKMT_ALLOCATION_PROGRAM;
  prog.pPrivateDriverData = priv;
  prog.PrivateDriverDataSize = (uint32_t)priv_len;
  prog.pOutputData = log;
  prog.OutputDataSize = sizeof log;
  TRY(GpupKmtCreateAllocation(&prog));
  free(priv);
  printf("[%s] kernel built on the host\n", vm);

  const uint64_t bytes = (uint64_t)n * sizeof(float);
  Buffer a = make_buffer(cd.hDevice, bytes), b = make_buffer(cd.hDevice, bytes), c = make_buffer(cd.hDevice, bytes);
  float* pa = lock(cd.hDevice, a);
  float* pb = lock(cd.hDevice, b);
  for (uint32_t i = 0; i < n; ++i) {
    pa[i] = (float)i;
    pb[i] = (float)(2 * i);
  }
  unlock(cd.hDevice, a);
  unlock(cd.hDevice, b);

  GPUPKMT_CMDBUF* cb;
  TRY(GpupKmtCmdBufCreate(&cb));
  GPUPKMT_KERNEL_ARG args[3] = {{GPUPDDI_ARG_BUFFER, 0, NULL, a.va, bytes},
                                {GPUPDDI_ARG_BUFFER, 0, NULL, b.va, bytes},
                                {GPUPDDI_ARG_BUFFER, 0, NULL, c.va, bytes}};
  GPUPKMT_DISPATCH d = {0};
  d.hProgram = prog.hAllocation;
  d.pKernelName = "vadd";
  d.WorkDim = 1;
  d.GlobalSize[0] = n;
  d.ArgCount = 3;
  d.pArgs = args;
  TRY(GpupKmtCmdDispatch(cb, &d));
  TRY(GpupKmtCmdSignal(cb, cs.hSyncObject, 1));
  GPUPKMT_SUBMITCOMMAND sc = {cc.hContext, 0, cb, 0};
  TRY(GpupKmtSubmitCommand(&sc));
  GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT w = {cs.hSyncObject, 1, 0, 30000};
  TRY(GpupKmtWaitForSynchronizationObjectFromCpu(&w));

  float* pc = lock(cd.hDevice, c);
  uint32_t wrong = 0;
  for (uint32_t i = 0; i < n; ++i)
    if (pc[i] != (float)(3 * i)) ++wrong;
  unlock(cd.hDevice, c);
  printf("[%s] c = a + b over %u elements: %u wrong\n", vm, n, wrong);

  GPUPKMT_QUERYVIDEOMEMORYINFO mem = {adapters[0].hAdapter};
  TRY(GpupKmtQueryVideoMemoryInfo(&mem));
  GPUPKMT_QUERYSTATISTICS st = {GPUPKMT_QUERYSTATISTICS_VM};
  TRY(GpupKmtQueryStatistics(&st));
  printf("[%s] partition memory: this process uses %" PRIu64 " MiB of a %" PRIu64 " MiB budget; the VM holds %u allocations\n",
         vm, mem.CurrentUsage >> 20, mem.Budget >> 20, st.Allocations);

  if (argc > 2 && strcmp(argv[2], "hold") == 0) {
    printf("[%s] holding its buffers until stdin closes\n", vm);
    fflush(stdout);
    while (getchar() != EOF) {
    }
  }

  GpupKmtCmdBufDestroy(cb);
  GPUPKMT_DESTROYDEVICE dd = {cd.hDevice};
  TRY(GpupKmtDestroyDevice(&dd));
  return wrong ? 1 : 0;
}
