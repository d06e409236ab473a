/* gpup KMD DDI: the C ABI between the gpup host (gpupd and each gpup-vmwp) and a kernel-mode-driver
 * plugin ("KMD") that drives one kind of compute device.
 *
 * Shape
 *   A plugin is a shared object exporting one symbol, GpupKmdDriverEntry (GPUPDDI_PFN_DRIVERENTRY).
 *   The host fills GPUPDDI_DRIVER_FUNCS.struct_size and DdiVersion, the plugin fills the tables.
 *   Tables are split by object: adapter, process, device, memory, context. Entries marked
 *   "mandatory" below must be non-NULL or the host refuses the plugin at load (with the name of the
 *   missing entry); "optional" entries may be NULL and the host then behaves as documented.
 *
 * Versioning
 *   GPUPDDI_VERSION_MAJOR changes break the ABI; the host refuses a plugin built for another major.
 *   The five function tables are embedded by value in GPUPDDI_DRIVER_FUNCS, so within a major
 *   version each table is frozen (the loader requires its struct_size to match exactly); a minor
 *   version adds entries only as NEW tables appended at the end of GPUPDDI_DRIVER_FUNCS. Argument
 *   structs begin with struct_size and grow only by appending fields, so either side can tell
 *   which fields the other knows.
 *
 * Callbacks
 *   One set of callbacks per plugin per process (given to GpupKmdDriverEntry); a host process
 *   that needs different callbacks loads a plugin once and demultiplexes itself. Each gpup-vmwp
 *   drives one adapter, so this costs nothing today.
 *
 * Trust and validation
 *   The host's object manager validates every guest handle, offset, size and GPU virtual address
 *   before any DDI is called: a KMD receives only its own handles (hAllocation etc. it returned
 *   earlier) and ranges already checked to lie inside the allocation. The only guest-controlled
 *   bytes a KMD sees are private driver data (pPrivateDriverData of allocations, contexts,
 *   escapes and UMDRIVERPRIVATE queries), kernel names and kernel argument values. A KMD must treat
 *   those as hostile: check every size and field, never trust a pointer or handle inside them.
 *
 * Threads
 *   The host calls DDIs for one adapter from any thread but never concurrently for the same
 *   object (two pfnSubmitCommand calls on one context never overlap); a DDI call and completion
 *   callbacks may overlap. Callbacks
 *   (GPUPDDI_CALLBACKS) may be called from any thread the KMD owns, and never from inside a DDI
 *   call of the same object. Pointers passed into a DDI are valid only for the call: copy what
 *   must outlive it.
 *
 * Errors
 *   Every entry returns a gpup_status (gpup/status.h). The host passes it, unchanged, to the guest
 *   when the failure concerns the guest's request.
 *
 * Naming follows the WDDM DDIs the design mirrors: DxgkDdiQueryAdapterInfo becomes
 * pfnQueryAdapterInfo taking GPUPDDI_ARG_QUERYADAPTERINFO, and so on. */
#ifndef GPUP_DDI_H
#define GPUP_DDI_H

#include <stddef.h>
#include <stdint.h>

#include "gpup/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define GPUPDDI_VERSION_MAJOR 1u
#define GPUPDDI_VERSION_MINOR 2u /* 1.1: image allocations, image and sampler arguments;
                                   1.2: GPUPDDI_QAITYPE_SANDBOXNEEDS */
#define GPUPDDI_VERSION ((GPUPDDI_VERSION_MAJOR << 16) | GPUPDDI_VERSION_MINOR)

#define GPUPDDI_DRIVERENTRY_SYMBOL "GpupKmdDriverEntry"

/* A KMD-owned object (adapter, process, device, context, allocation). Opaque to the host; never
 * shown to a guest. */
typedef void* GPUPDDI_HANDLE;
/* A host-owned cookie the KMD hands back in callbacks. */
typedef void* GPUPDDI_SYSTEM_HANDLE;

typedef struct GPUPDDI_GUID {
  uint8_t Bytes[16];
} GPUPDDI_GUID;

/* ------------------------------------------------------------------------------------------ */
/* Callbacks (DxgkCb*) the host provides to the KMD                                            */

enum GPUPDDI_LOG_LEVEL { GPUPDDI_LOG_DEBUG = 0, GPUPDDI_LOG_INFO = 1, GPUPDDI_LOG_WARN = 2, GPUPDDI_LOG_ERROR = 3 };

typedef struct GPUPDDI_CALLBACKS {
  uint32_t struct_size;
  uint32_t Reserved;
  GPUPDDI_SYSTEM_HANDLE hSystem;
  /* Logging through the host's logger. */
  void (*pfnLog)(GPUPDDI_SYSTEM_HANDLE hSystem, int Level, const char* pMessage);
  /* A submission handed to pfnSubmitCommand finished. hSystemContext is the value given at
   * pfnCreateContext; Status is SUCCESS, DEVICE_ERROR (the device failed the work) or
   * CONTEXT_RESET_GUILTY / _INNOCENT after pfnResetEngine. Called exactly once per submission. */
  void (*pfnNotifySubmissionComplete)(GPUPDDI_SYSTEM_HANDLE hSystemContext, uint64_t SubmissionId,
                                      gpup_status Status);
} GPUPDDI_CALLBACKS;

/* ------------------------------------------------------------------------------------------ */
/* Adapter                                                                                     */

typedef struct GPUPDDI_ARG_STARTADAPTER {
  uint32_t struct_size;
  uint32_t Reserved;
  /* KMD-specific configuration from the host's config file, as "key=value" lines
   * (e.g. "platform=Portable Computing Language\ndevice=0"). Unknown keys are an error. */
  const char* pConfig;
  GPUPDDI_HANDLE hAdapter; /* out */
} GPUPDDI_ARG_STARTADAPTER;

/* DXGK_QUERYADAPTERINFOTYPE subset. Values of the WDDM types that exist there are kept. */
typedef enum GPUPDDI_QUERYADAPTERINFOTYPE {
  GPUPDDI_QAITYPE_UMDRIVERPRIVATE = 0,    /* UMD<->KMD private query; in/out private data */
  GPUPDDI_QAITYPE_DRIVERCAPS = 1,         /* out: GPUPDDI_DRIVERCAPS */
  GPUPDDI_QAITYPE_QUERYSEGMENT = 3,       /* out: GPUPDDI_QUERYSEGMENTOUT */
  GPUPDDI_QAITYPE_DEVICEINFO = 15,        /* out: GPUPDDI_DEVICEINFO (gpup addition) */
  GPUPDDI_QAITYPE_GPUMMUCAPS = 22,        /* out: GPUPDDI_GPUMMUCAPS */
  GPUPDDI_QAITYPE_PAGETABLELEVELDESC = 23,/* in: uint32_t level; out: GPUPDDI_PAGETABLELEVELDESC */
  GPUPDDI_QAITYPE_GPUPCAPS = 30,          /* out: GPUPDDI_GPUPCAPS */
  GPUPDDI_QAITYPE_SANDBOXNEEDS = 100,     /* out: text, what the worker jail must hold (gpup, 1.2) */
} GPUPDDI_QUERYADAPTERINFOTYPE;

/* GPUPDDI_QAITYPE_SANDBOXNEEDS: what a VM worker driving this adapter needs from the host beyond
 * the shared libraries loaded into the process that started the adapter (the host gives the
 * worker those, its own program and the KMD plugin). The worker runs guest work, so it is jailed
 * (its own uid, no capabilities, its own namespaces, a root holding only what is listed here);
 * anything not declared does not exist for it. Asked of a started adapter, in the host process
 * (never with VirtualMachineData set). Output: UTF-8 text, one need per line, NUL-terminated;
 * *pOutputDataWritten = bytes including the NUL; BUFFER_TOO_SMALL (with *pOutputDataWritten =
 * the size needed) when OutputDataSize cannot hold it. Lines:
 *   ro PATH          a file or directory the KMD or its device runtime reads (read-only)
 *   exec PATH        a program the KMD runs (e.g. a linker); read-only and executable
 *   dev PATH         a device node the KMD opens read-write (a real GPU's render node)
 *   env NAME=VALUE   set in the worker's environment (e.g. a cache variable pointing into
 *                    the worker's private writable cache, $GPUP_CACHE_DIR below)
 *   passenv NAME     passed from the host's environment when set there
 * PATH is absolute; the host resolves symbolic links and shows each path at its real location
 * with its links. Inside the jail $GPUP_CACHE_DIR (in env values) is the worker's private,
 * size-bounded, writable cache directory and /tmp its scratch space. Unknown line kinds make the
 * host refuse to start the worker. Optional: a KMD answering NOT_SUPPORTED gets only the host's
 * part. */

typedef struct GPUPDDI_QUERYADAPTERINFOFLAGS {
  uint32_t VirtualMachineData : 1;   /* the query comes from a VM partition */
  uint32_t SecureVirtualMachine : 1; /* ... and that partition is a secure VM */
  uint32_t Reserved : 30;
} GPUPDDI_QUERYADAPTERINFOFLAGS;

typedef struct GPUPDDI_ARG_QUERYADAPTERINFO {
  uint32_t struct_size;
  uint32_t Type; /* GPUPDDI_QUERYADAPTERINFOTYPE */
  GPUPDDI_QUERYADAPTERINFOFLAGS Flags;
  uint32_t Reserved;
  GPUPDDI_HANDLE hKmdProcessHandle; /* the VM process asking, or NULL for host queries */
  const void* pInputData;
  uint32_t InputDataSize;
  uint32_t OutputDataSize;  /* capacity of pOutputData */
  void* pOutputData;
  uint32_t* pOutputDataWritten; /* out: bytes written; may be NULL for fixed-size types */
} GPUPDDI_ARG_QUERYADAPTERINFO;

typedef struct GPUPDDI_VIDMMCAPS {
  uint32_t ParavirtualizationSupported : 1; /* the master switch: adapter may be partitioned */
  uint32_t IoMmuSecureModeSupported : 1;    /* device memory access is isolated per process */
  uint32_t Reserved : 30;
} GPUPDDI_VIDMMCAPS;

typedef struct GPUPDDI_DRIVERCAPS {
  uint32_t WDDMVersion;                      /* the WDDM level the KMD models, e.g. 0x2006 */
  GPUPDDI_VIDMMCAPS MemoryManagementCaps;
  uint32_t ComputeOnly : 1;                  /* MCDM: no display */
  uint32_t SupportPerEngineTDR : 1;          /* pfnResetEngine can reset one context */
  uint32_t Reserved : 30;
  uint32_t NodeCount;                        /* engines */
  uint64_t MaxAllocationSize;                /* largest single allocation the device accepts */
} GPUPDDI_DRIVERCAPS;

typedef struct GPUPDDI_GPUPCAPS {
  uint32_t VirtualMachineHibernation : 1;
  uint32_t HotDriverUpdate : 1;
  uint32_t LiveMigration : 1;
  uint32_t ScatterMapReserve : 1;
  uint32_t Reserved : 28;
} GPUPDDI_GPUPCAPS;

/* CacheCoherentMemorySupported: the backing store of a CpuVisible allocation (pSystemMemory) is
 * the memory the device itself reads and writes (zero copy), coherently with the CPU. What the
 * guest's UMD may then rely on, once it has locked the allocation's mapping (pfnLock) one time:
 *   - after the work that touches the allocation has completed (its submission's completion was
 *     reported, i.e. its fence was reached), the mapping holds the device's writes;
 *   - writes the guest makes to the mapping while no work that touches the allocation is in
 *     flight are seen by device work submitted afterwards;
 * with no further pfnLock / pfnUnlock. Accesses that overlap in-flight work are not ordered (as
 * for any shared memory). When the bit is 0 the UMD must bracket CPU access with pfnLock (before
 * reading) and pfnUnlock (after writing). kmd_opencl sets it from CL_DEVICE_HOST_UNIFIED_MEMORY
 * (its CpuVisible buffers are CL_MEM_USE_HOST_PTR buffers over pSystemMemory); the conformance
 * test CacheCoherentMemoryNeedsNoLockUnlock checks the contract on every KMD that sets it. */
typedef struct GPUPDDI_GPUMMUCAPS {
  uint32_t ReadOnlyMemorySupported : 1;
  uint32_t NoExecuteMemorySupported : 1;
  uint32_t CacheCoherentMemorySupported : 1; /* see above */
  uint32_t Reserved : 29;
  uint32_t VirtualAddressBitCount;
  uint32_t PageTableLevelCount;
  uint32_t PageSizeInBytes;                  /* leaf page size */
  uint64_t LeafPageTableSizeFor64KPagesInBytes;
} GPUPDDI_GPUMMUCAPS;

typedef struct GPUPDDI_PAGETABLELEVELDESC {
  uint32_t PageTableIndexBitCount;
  uint32_t PageTableSegmentId;
  uint32_t PagingProcessPageTableSegmentId;
  uint32_t Reserved;
  uint64_t PageTableSizeInBytes;
  uint64_t PageTableAlignmentInBytes;
} GPUPDDI_PAGETABLELEVELDESC;

#define GPUPDDI_MAX_SEGMENTS 4
/* Segment ids are 1-based, as in WDDM: Segments[i] is segment i + 1. */
typedef struct GPUPDDI_SEGMENTDESCRIPTOR {
  uint64_t BaseAddress;
  uint64_t Size;
  uint32_t CpuVisible : 1;
  uint32_t Aperture : 1;   /* system memory seen by the device */
  uint32_t Reserved : 30;
  uint32_t Reserved2;
} GPUPDDI_SEGMENTDESCRIPTOR;

typedef struct GPUPDDI_QUERYSEGMENTOUT {
  uint32_t NbSegment;
  uint32_t Reserved;
  GPUPDDI_SEGMENTDESCRIPTOR Segments[GPUPDDI_MAX_SEGMENTS];
} GPUPDDI_QUERYSEGMENTOUT;

/* What the device really is, as its native API reports it. Strings are NUL-terminated. */
typedef struct GPUPDDI_DEVICEINFO {
  char Name[128];
  char Vendor[64];
  char DriverVersion[64];
  char Platform[64];
  uint64_t GlobalMemSize;
  uint64_t MaxAllocSize;
  uint64_t LocalMemSize;
  uint32_t ComputeUnits;
  uint32_t MaxWorkGroupSize;
  uint32_t MemBaseAddrAlignBits; /* sub-range (offset) alignment the device needs, in bits */
  uint32_t Reserved;
} GPUPDDI_DEVICEINFO;

typedef struct GPUPDDI_VIRTUALMACHINEDATAFLAGS {
  uint32_t SecureVirtualMachine : 1;
  uint32_t Reserved : 31;
} GPUPDDI_VIRTUALMACHINEDATAFLAGS;

/* Called when a VM partition starts and again on every change of its settings. */
typedef struct GPUPDDI_ARG_SETVIRTUALMACHINEDATA {
  uint32_t struct_size;
  GPUPDDI_VIRTUALMACHINEDATAFLAGS Flags;
  GPUPDDI_HANDLE hKmdVmWorkerProcess;  /* the VM's worker-process object (pfnCreateProcess) */
  const GPUPDDI_GUID* pVmGuid;
  const char* pVmName;
  uint64_t MinPartitionVRAM;
  uint64_t MaxPartitionVRAM;
  uint64_t OptimalPartitionVRAM;
  uint32_t ComputeWeight;      /* relative share of device time, 1..10000 */
  uint32_t MaxComputePercent;  /* cap on the share of device time, 1..100 */
} GPUPDDI_ARG_SETVIRTUALMACHINEDATA;

typedef struct GPUPDDI_ESCAPEFLAGS {
  uint32_t HardwareAccess : 1;
  uint32_t VirtualMachineData : 1;  /* the escape comes from a VM partition */
  uint32_t DriverKnownEscape : 1;   /* a documented escape (the only kind a secure VM may send) */
  uint32_t Reserved : 29;
} GPUPDDI_ESCAPEFLAGS;

typedef struct GPUPDDI_ARG_ESCAPE {
  uint32_t struct_size;
  GPUPDDI_ESCAPEFLAGS Flags;
  GPUPDDI_HANDLE hKmdProcessHandle;
  GPUPDDI_HANDLE hDevice;                /* may be NULL */
  const void* pPrivateDriverData;        /* guest-controlled: validate */
  uint32_t PrivateDriverDataSize;
  uint32_t OutputDataSize;               /* capacity of pOutputData */
  void* pOutputData;
  uint32_t* pOutputDataWritten;          /* out */
} GPUPDDI_ARG_ESCAPE;

typedef struct GPUPDDI_ARG_RESETENGINE {
  uint32_t struct_size;
  uint32_t NodeOrdinal;
  GPUPDDI_HANDLE hContext;  /* the guilty context, or NULL to reset the whole engine */
} GPUPDDI_ARG_RESETENGINE;

typedef struct GPUPDDI_ADAPTER_FUNCS {
  uint32_t struct_size;
  uint32_t Reserved;
  /* mandatory */
  gpup_status (*pfnStartAdapter)(GPUPDDI_ARG_STARTADAPTER* pArgs);
  /* mandatory. Destroys everything still open on the adapter; completions of work still in
   * flight are reported before it returns. */
  void (*pfnStopAdapter)(GPUPDDI_HANDLE hAdapter);
  /* mandatory */
  gpup_status (*pfnQueryAdapterInfo)(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_QUERYADAPTERINFO* pArgs);
  /* mandatory (MCDM requires it) */
  gpup_status (*pfnSetVirtualMachineData)(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_SETVIRTUALMACHINEDATA* pArgs);
  /* optional: NULL means escapes fail with NOT_SUPPORTED */
  gpup_status (*pfnEscape)(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_ESCAPE* pArgs);
  /* optional: NULL (or NOT_SUPPORTED) makes the host recover by restarting the VM's worker */
  gpup_status (*pfnResetEngine)(GPUPDDI_HANDLE hAdapter, const GPUPDDI_ARG_RESETENGINE* pArgs);
} GPUPDDI_ADAPTER_FUNCS;

/* ------------------------------------------------------------------------------------------ */
/* Process                                                                                     */

typedef struct GPUPDDI_CREATEPROCESSFLAGS {
  uint32_t SystemProcess : 1;
  uint32_t GdiProcess : 1;
  uint32_t VirtualMachineProcess : 1;        /* one guest process of a VM */
  uint32_t VirtualMachineWorkerProcess : 1;  /* the VM's worker; does no device work itself */
  uint32_t Reserved : 28;
} GPUPDDI_CREATEPROCESSFLAGS;

typedef struct GPUPDDI_ARG_CREATEPROCESS {
  uint32_t struct_size;
  GPUPDDI_CREATEPROCESSFLAGS Flags;
  GPUPDDI_SYSTEM_HANDLE hDxgkProcess;     /* host's cookie for the process */
  GPUPDDI_HANDLE hKmdVmWorkerProcess;     /* set with VirtualMachineProcess: the VM's worker process */
  uint32_t ProcessId;                     /* guest-side pid, informational */
  uint32_t ProcessNameLength;             /* bytes, without the terminating NUL */
  const char* pProcessName;               /* may be NULL */
  GPUPDDI_HANDLE hKmdProcess;             /* out */
} GPUPDDI_ARG_CREATEPROCESS;

typedef struct GPUPDDI_PROCESS_FUNCS {
  uint32_t struct_size;
  uint32_t Reserved;
  /* mandatory */
  gpup_status (*pfnCreateProcess)(GPUPDDI_HANDLE hAdapter, GPUPDDI_ARG_CREATEPROCESS* pArgs);
  /* mandatory. The host destroys the process's devices first. */
  void (*pfnDestroyProcess)(GPUPDDI_HANDLE hAdapter, GPUPDDI_HANDLE hKmdProcess);
} GPUPDDI_PROCESS_FUNCS;

/* ------------------------------------------------------------------------------------------ */
/* Device                                                                                      */

typedef struct GPUPDDI_ARG_CREATEDEVICE {
  uint32_t struct_size;
  uint32_t Flags;
  GPUPDDI_HANDLE hKmdProcess;
  GPUPDDI_HANDLE hDevice; /* out */
} GPUPDDI_ARG_CREATEDEVICE;

typedef struct GPUPDDI_DEVICE_FUNCS {
  uint32_t struct_size;
  uint32_t Reserved;
  /* mandatory */
  gpup_status (*pfnCreateDevice)(GPUPDDI_HANDLE hAdapter, GPUPDDI_ARG_CREATEDEVICE* pArgs);
  /* mandatory. The host destroys the device's contexts and allocations first. */
  void (*pfnDestroyDevice)(GPUPDDI_HANDLE hDevice);
} GPUPDDI_DEVICE_FUNCS;

/* ------------------------------------------------------------------------------------------ */
/* Memory                                                                                      */

typedef struct GPUPDDI_ALLOCATIONFLAGS {
  uint32_t CpuVisible : 1;  /* pSystemMemory is the guest-mappable backing store */
  uint32_t Program : 1;     /* holds kernel code described by the private data; no device memory */
  uint32_t ReadOnly : 1;    /* device may only read it */
  /* (1.1) also an image, described by the private data (KMD-defined; kmd_opencl: a
   * GPUP_OCL_IMAGE_DESC), over the same bytes in a linear layout: always CpuVisible, and still
   * usable as a buffer by COPY and FILL. Dispatch arguments of kind GPUPDDI_ARG_IMAGE name it. */
  uint32_t Image : 1;
  uint32_t Reserved : 28;
} GPUPDDI_ALLOCATIONFLAGS;

typedef struct GPUPDDI_ARG_CREATEALLOCATION {
  uint32_t struct_size;
  GPUPDDI_ALLOCATIONFLAGS Flags;
  uint64_t Size;               /* bytes of device memory, > 0 unless Flags.Program */
  /* CpuVisible: the host-provided backing store, Size bytes, page aligned, shared with the
   * guest. The KMD may use it as the device memory itself (zero copy) or keep the device copy
   * in step at pfnLock/pfnUnlock. NULL otherwise. */
  void* pSystemMemory;
  const void* pPrivateDriverData; /* guest-controlled: validate */
  uint32_t PrivateDriverDataSize;
  uint32_t OutputDataSize;        /* capacity of pOutputData (e.g. a build log) */
  void* pOutputData;
  uint32_t OutputDataWritten;     /* out */
  uint32_t Reserved;
  GPUPDDI_HANDLE hAllocation;     /* out */
} GPUPDDI_ARG_CREATEALLOCATION;

typedef struct GPUPDDI_MEMORY_FUNCS {
  uint32_t struct_size;
  uint32_t Reserved;
  /* mandatory. May fail with BUILD_FAILED for a program allocation, with the log in pOutputData;
   * the host then reports the log and destroys nothing (no allocation was made). */
  gpup_status (*pfnCreateAllocation)(GPUPDDI_HANDLE hDevice, GPUPDDI_ARG_CREATEALLOCATION* pArgs);
  /* mandatory. The host guarantees no submitted work still uses the allocation. */
  void (*pfnDestroyAllocation)(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation);
  /* optional: make pSystemMemory current before the guest reads it (device -> backing store) */
  gpup_status (*pfnLock)(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation);
  /* optional: publish guest writes in pSystemMemory to the device (backing store -> device) */
  gpup_status (*pfnUnlock)(GPUPDDI_HANDLE hDevice, GPUPDDI_HANDLE hAllocation);
} GPUPDDI_MEMORY_FUNCS;

/* ------------------------------------------------------------------------------------------ */
/* Context and submission                                                                      */

typedef struct GPUPDDI_ARG_CREATECONTEXT {
  uint32_t struct_size;
  uint32_t NodeOrdinal;
  int32_t Priority;                       /* -2 (lowest) .. 2 (highest) within the partition */
  uint32_t Flags;
  GPUPDDI_SYSTEM_HANDLE hSystemContext;   /* given back in pfnNotifySubmissionComplete */
  const void* pPrivateDriverData;         /* guest-controlled: validate */
  uint32_t PrivateDriverDataSize;
  uint32_t Reserved;
  GPUPDDI_HANDLE hContext;                /* out */
} GPUPDDI_ARG_CREATECONTEXT;

/* A range of an allocation, already checked by the host to lie inside it: Size > 0, and the
 * allocation belongs to the device of the context the command is submitted on. A KMD whose device
 * needs sub-ranges aligned (OpenCL's CL_DEVICE_MEM_BASE_ADDR_ALIGN) fails a misaligned Offset
 * with INVALID_PARAMETER before queuing anything. */
typedef struct GPUPDDI_BUFFER_REF {
  GPUPDDI_HANDLE hAllocation;
  uint64_t Offset;
  uint64_t Size;
} GPUPDDI_BUFFER_REF;

typedef enum GPUPDDI_COMMAND_TYPE {
  GPUPDDI_COMMAND_COPY = 1,
  GPUPDDI_COMMAND_FILL = 2,
  GPUPDDI_COMMAND_DISPATCH = 3,
} GPUPDDI_COMMAND_TYPE;

typedef struct GPUPDDI_COPY {
  GPUPDDI_BUFFER_REF Src;
  GPUPDDI_BUFFER_REF Dst; /* Dst.Size == Src.Size */
} GPUPDDI_COPY;

#define GPUPDDI_MAX_FILL_PATTERN 128
typedef struct GPUPDDI_FILL {
  GPUPDDI_BUFFER_REF Dst;  /* Dst.Size is a multiple of PatternSize, Offset too */
  uint32_t PatternSize;    /* 1, 2, 4, ..., 128 */
  uint8_t Pattern[GPUPDDI_MAX_FILL_PATTERN];
} GPUPDDI_FILL;

typedef enum GPUPDDI_KERNEL_ARG_KIND {
  GPUPDDI_ARG_VALUE = 1,       /* Size bytes at pValue */
  GPUPDDI_ARG_BUFFER = 2,      /* Buffer: a range of the caller's own allocation */
  GPUPDDI_ARG_LOCAL = 3,       /* Size bytes of work-group local memory */
  GPUPDDI_ARG_NULL_BUFFER = 4, /* a NULL buffer argument */
  GPUPDDI_ARG_IMAGE = 5,       /* (1.1) Buffer: the whole of an allocation made with Flags.Image */
  GPUPDDI_ARG_SAMPLER = 6,     /* (1.1) Size bytes at pValue describing a sampler (KMD-defined;
                                  kmd_opencl: a GPUP_OCL_SAMPLER_DESC) */
} GPUPDDI_KERNEL_ARG_KIND;

typedef struct GPUPDDI_KERNEL_ARG {
  uint32_t Kind;
  uint32_t Size;
  const void* pValue;
  GPUPDDI_BUFFER_REF Buffer;
} GPUPDDI_KERNEL_ARG;

typedef struct GPUPDDI_DISPATCH {
  GPUPDDI_HANDLE hProgram;    /* an allocation created with Flags.Program */
  const char* pKernelName;    /* NUL-terminated, 1..256 bytes, guest-chosen: the KMD looks it up */
  uint32_t WorkDim;           /* 1..3 */
  uint32_t ArgCount;
  uint64_t GlobalOffset[3];
  uint64_t GlobalSize[3];
  uint64_t LocalSize[3];      /* all zero: let the device choose */
  const GPUPDDI_KERNEL_ARG* pArgs;
} GPUPDDI_DISPATCH;

typedef struct GPUPDDI_COMMAND {
  uint32_t Type; /* GPUPDDI_COMMAND_TYPE */
  uint32_t Reserved;
  union {
    GPUPDDI_COPY Copy;
    GPUPDDI_FILL Fill;
    GPUPDDI_DISPATCH Dispatch;
  } u;
} GPUPDDI_COMMAND;

typedef struct GPUPDDI_ARG_SUBMITCOMMAND {
  uint32_t struct_size;
  uint32_t CommandCount;
  const GPUPDDI_COMMAND* pCommands;
  uint64_t SubmissionId; /* echoed by pfnNotifySubmissionComplete */
} GPUPDDI_ARG_SUBMITCOMMAND;

typedef struct GPUPDDI_CONTEXT_FUNCS {
  uint32_t struct_size;
  uint32_t Reserved;
  /* mandatory */
  gpup_status (*pfnCreateContext)(GPUPDDI_HANDLE hDevice, GPUPDDI_ARG_CREATECONTEXT* pArgs);
  /* mandatory. Waits for (or aborts) the context's work; all its completions have been
   * reported when it returns. */
  void (*pfnDestroyContext)(GPUPDDI_HANDLE hContext);
  /* mandatory. Queues the commands in order behind the context's earlier submissions and returns
   * without waiting. A failure returned here means nothing was queued and no completion follows;
   * a failure during execution is reported through pfnNotifySubmissionComplete. */
  gpup_status (*pfnSubmitCommand)(GPUPDDI_HANDLE hContext, const GPUPDDI_ARG_SUBMITCOMMAND* pArgs);
} GPUPDDI_CONTEXT_FUNCS;

/* ------------------------------------------------------------------------------------------ */
/* Driver entry                                                                                */

typedef struct GPUPDDI_DRIVER_FUNCS {
  uint32_t struct_size;  /* in: sizeof(GPUPDDI_DRIVER_FUNCS) of the host */
  uint32_t DdiVersion;   /* in: host's GPUPDDI_VERSION; out: the KMD's */
  char DriverName[64];   /* out: e.g. "kmd_opencl" */
  GPUPDDI_ADAPTER_FUNCS Adapter;
  GPUPDDI_PROCESS_FUNCS Process;
  GPUPDDI_DEVICE_FUNCS Device;
  GPUPDDI_MEMORY_FUNCS Memory;
  GPUPDDI_CONTEXT_FUNCS Context;
} GPUPDDI_DRIVER_FUNCS;

/* Exported by every KMD plugin as GpupKmdDriverEntry. pCallbacks stays valid until the plugin is
 * unloaded. Returns VERSION_MISMATCH when the host's major version is not the KMD's. */
typedef gpup_status (*GPUPDDI_PFN_DRIVERENTRY)(const GPUPDDI_CALLBACKS* pCallbacks,
                                               GPUPDDI_DRIVER_FUNCS* pFuncs);

#ifdef __cplusplus
}
#endif
#endif /* GPUP_DDI_H */
