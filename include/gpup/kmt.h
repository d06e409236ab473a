/* libgpupkmt: the guest thunk library of gpup (D3DKMT-style).
 *
 * A guest process has no device driver. Its user-mode driver (the OpenCL ICD) or a program calls
 * these thunks; each one is either answered from local objects kept in the guest or marshalled as
 * one message over the paravirtual channel to the VM's worker on the host (its VRD endpoint,
 * named by the environment variable GPUP_VRD, e.g. "unix:/run/gpup/vms/a/vrd.sock" or
 * "tcp:10.0.0.1:7000"; `gpup run` sets it).
 *
 * Crossing budget (round trips to the host):
 *   EnumAdapters, OpenAdapterFromLuid, CloseAdapter, QueryAdapterInfo(ADAPTERTYPE):   0
 *   Lock of an allocation already locked, Unlock of a nested lock:                     0
 *   WaitForSynchronizationObjectFromCpu on a value already reached:                    0
 *   GetDeviceState while the host has reported no change:                              0
 *   SubmitCommand, SignalFromGpu, WaitFromGpu: one one-way (async) message, no reply
 *   CreateAllocation, Escape with bulk data (see Limits): 1, plus 1 to register a shared
 *     section when none is cached, plus 1 to unregister one when the cache is full
 *   everything else:                                                                   1
 * The first call of a process connects to the VRD and negotiates the protocol version.
 *
 * Handles are 32-bit values chosen by the host, identical on both sides; adapter handles are
 * local to the guest process. All calls are thread-safe. Every call returns a gpup_status; on
 * failure GpupKmtGetLastErrorMessage() gives the host's explanation for this thread.
 *
 * Limits: a message is at most 128 KiB, header included, and is never split. CreateContext and
 * QueryAdapterInfo input that would not fit fails with GPUP_STATUS_MESSAGE_TOO_LARGE before
 * anything is sent.
 *
 * Bulk data: CreateAllocation and Escape take private driver data of up to
 * GPUPKMT_MAX_PRIVATE_DATA_SIZE bytes and use output capacities of up to
 * GPUPKMT_MAX_OUTPUT_DATA_SIZE bytes. What fits a message travels inline (private data up to the
 * message limit, output up to 64 KiB). The rest travels, transparently, through a shared section:
 * memory this process creates (a sealed memfd), registers with the host once and reuses (up to two
 * idle sections of at most 16 MiB each are kept per process; larger or surplus ones are
 * unregistered after the call). The host copies the private data out of the section before the
 * KMD sees it, and writes the output into it. The host allows 64 sections and 256 MiB of sections
 * per process; beyond that a call fails with GPUP_STATUS_QUOTA_EXCEEDED.
 * On the stream transport (no shared memory) there are no sections: private data that does not fit
 * a message fails with GPUP_STATUS_MESSAGE_TOO_LARGE, naming its size, before anything is sent,
 * and output capacities are used only up to 64 KiB. Private data above
 * GPUPKMT_MAX_PRIVATE_DATA_SIZE fails with GPUP_STATUS_MESSAGE_TOO_LARGE on either transport. */
#ifndef GPUP_KMT_H
#define GPUP_KMT_H

#include <stddef.h>
#include <stdint.h>

#include "gpup/ddi.h" /* the adapter query structs (GPUPDDI_DRIVERCAPS, ...) are shared */
#include "gpup/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef uint32_t GPUPKMT_HANDLE;

#define GPUPKMT_ADAPTERS_MAX 16
#define GPUPKMT_MAX_MESSAGE_SIZE (128u * 1024u)
/* The most private driver data, and the largest output capacity used, of one CreateAllocation or
 * Escape (64 MiB of program content plus 64 KiB for headers and options). Larger capacities are
 * used only up to this size. */
#define GPUPKMT_MAX_PRIVATE_DATA_SIZE ((64u << 20) + (64u << 10))
#define GPUPKMT_MAX_OUTPUT_DATA_SIZE ((64u << 20) + (64u << 10))

/* Thread-local text of the last failure in this thread ("" if none). */
const char* GpupKmtGetLastErrorMessage(void);

/* Connects now rather than at the first thunk; optional. `endpoint` NULL means $GPUP_VRD.
 * Fails with CONNECTION_LOST if no VRD answers, VERSION_MISMATCH if the host speaks no version
 * this library does. */
gpup_status GpupKmtConnect(const char* endpoint);
/* Closes the connection; the host destroys everything the process still has open. */
void GpupKmtDisconnect(void);

/* --- adapters (answered locally) ------------------------------------------------------------ */

#define GPUPKMT_ADAPTERFLAG_PARAVIRTUALIZED 0x1
#define GPUPKMT_ADAPTERFLAG_COMPUTE_ONLY 0x2
#define GPUPKMT_ADAPTERFLAG_SECURE_VM 0x4

typedef struct GPUPKMT_ADAPTERINFO {
  GPUPKMT_HANDLE hAdapter; /* opened by EnumAdapters; close with CloseAdapter */
  uint32_t Flags;          /* GPUPKMT_ADAPTERFLAG_* */
  uint64_t AdapterLuid;
  uint64_t Budget;         /* the partition's video memory budget */
  char Description[80];
} GPUPKMT_ADAPTERINFO;

typedef struct GPUPKMT_ENUMADAPTERS {
  uint32_t NumAdapters;            /* in: capacity of pAdapters; out: adapters present */
  GPUPKMT_ADAPTERINFO* pAdapters;  /* NULL: only count */
} GPUPKMT_ENUMADAPTERS;
/* BUFFER_TOO_SMALL (with NumAdapters set) when the capacity is short. */
gpup_status GpupKmtEnumAdapters(GPUPKMT_ENUMADAPTERS* pArgs);

typedef struct GPUPKMT_OPENADAPTERFROMLUID {
  uint64_t AdapterLuid;
  GPUPKMT_HANDLE hAdapter; /* out */
} GPUPKMT_OPENADAPTERFROMLUID;
gpup_status GpupKmtOpenAdapterFromLuid(GPUPKMT_OPENADAPTERFROMLUID* pArgs);

typedef struct GPUPKMT_CLOSEADAPTER {
  GPUPKMT_HANDLE hAdapter;
} GPUPKMT_CLOSEADAPTER;
gpup_status GpupKmtCloseAdapter(const GPUPKMT_CLOSEADAPTER* pArgs);

/* Query types. Values other than ADAPTERTYPE are the DDI's (GPUPDDI_QAITYPE_*): they reach the
 * KMD with Flags.VirtualMachineData set, and the output is the same struct. */
#define GPUPKMT_QAITYPE_ADAPTERTYPE 0x10000u /* out: GPUPKMT_ADAPTERTYPE, answered locally */

typedef struct GPUPKMT_ADAPTERTYPE {
  uint32_t Paravirtualized : 1;
  uint32_t ComputeOnly : 1;
  uint32_t DisplaySupported : 1;
  uint32_t SecureVirtualMachine : 1;
  uint32_t Reserved : 28;
} GPUPKMT_ADAPTERTYPE;

typedef struct GPUPKMT_QUERYADAPTERINFO {
  GPUPKMT_HANDLE hAdapter;
  uint32_t Type;              /* GPUPDDI_QAITYPE_* or GPUPKMT_QAITYPE_* */
  const void* pInputData;     /* e.g. the level for PAGETABLELEVELDESC */
  uint32_t InputDataSize;
  uint32_t OutputDataSize;
  void* pOutputData;
  uint32_t OutputDataWritten; /* out */
} GPUPKMT_QUERYADAPTERINFO;
gpup_status GpupKmtQueryAdapterInfo(GPUPKMT_QUERYADAPTERINFO* pArgs);

/* --- devices and contexts ---------------------------------------------------------------------- */

typedef struct GPUPKMT_CREATEDEVICE {
  GPUPKMT_HANDLE hAdapter;
  uint32_t Flags;
  GPUPKMT_HANDLE hDevice; /* out */
} GPUPKMT_CREATEDEVICE;
gpup_status GpupKmtCreateDevice(GPUPKMT_CREATEDEVICE* pArgs);

typedef struct GPUPKMT_DESTROYDEVICE {
  GPUPKMT_HANDLE hDevice;
} GPUPKMT_DESTROYDEVICE;
/* Destroys the device's contexts, allocations and synchronization objects too. */
gpup_status GpupKmtDestroyDevice(const GPUPKMT_DESTROYDEVICE* pArgs);

typedef struct GPUPKMT_CREATECONTEXT {
  GPUPKMT_HANDLE hDevice;
  uint32_t NodeOrdinal;
  int32_t Priority; /* -2..2 */
  uint32_t Flags;
  const void* pPrivateDriverData;
  uint32_t PrivateDriverDataSize;
  GPUPKMT_HANDLE hContext; /* out */
} GPUPKMT_CREATECONTEXT;
gpup_status GpupKmtCreateContext(GPUPKMT_CREATECONTEXT* pArgs);

typedef struct GPUPKMT_DESTROYCONTEXT {
  GPUPKMT_HANDLE hContext;
} GPUPKMT_DESTROYCONTEXT;
gpup_status GpupKmtDestroyContext(const GPUPKMT_DESTROYCONTEXT* pArgs);

/* --- allocations ------------------------------------------------------------------------------ */

#define GPUPKMT_ALLOCATION_CPU_VISIBLE 0x1u /* may be locked (mapped) by the guest */
#define GPUPKMT_ALLOCATION_PROGRAM 0x2u     /* kernel code described by the private data */
#define GPUPKMT_ALLOCATION_READ_ONLY 0x4u
#define GPUPKMT_ALLOCATION_IMAGE 0x8u       /* with CPU_VISIBLE: also an image, described by the
                                               private data (the KMD's; needs DDI 1.1) */

typedef struct GPUPKMT_CREATEALLOCATION {
  GPUPKMT_HANDLE hDevice;
  uint32_t Flags;                 /* GPUPKMT_ALLOCATION_* */
  uint64_t Size;
  const void* pPrivateDriverData; /* to the KMD (e.g. a program's source and build options) */
  uint32_t PrivateDriverDataSize; /* up to GPUPKMT_MAX_PRIVATE_DATA_SIZE (see Limits above) */
  uint32_t OutputDataSize;        /* capacity of pOutputData (used up to GPUPKMT_MAX_OUTPUT_DATA_SIZE) */
  void* pOutputData;              /* from the KMD (e.g. the build log) */
  uint32_t OutputDataWritten;     /* out */
  gpup_status KmdStatus;          /* out: the KMD's own status (BUILD_FAILED with a log) */
  GPUPKMT_HANDLE hAllocation;     /* out */
} GPUPKMT_CREATEALLOCATION;
gpup_status GpupKmtCreateAllocation(GPUPKMT_CREATEALLOCATION* pArgs);

typedef struct GPUPKMT_DESTROYALLOCATION {
  GPUPKMT_HANDLE hDevice;
  GPUPKMT_HANDLE hAllocation;
} GPUPKMT_DESTROYALLOCATION;
gpup_status GpupKmtDestroyAllocation(const GPUPKMT_DESTROYALLOCATION* pArgs);

typedef struct GPUPKMT_LOCK {
  GPUPKMT_HANDLE hDevice;
  GPUPKMT_HANDLE hAllocation;
  void* pData;   /* out: the allocation's bytes, valid until the last Unlock */
  uint64_t Size; /* out */
} GPUPKMT_LOCK;
/* Maps a CPU_VISIBLE allocation. Locks nest: only the first crosses to the host. On a stream
 * transport (no shared memory) the bytes are fetched into a guest buffer and written back by the
 * last Unlock. */
gpup_status GpupKmtLock(GPUPKMT_LOCK* pArgs);

typedef struct GPUPKMT_UNLOCK {
  GPUPKMT_HANDLE hDevice;
  GPUPKMT_HANDLE hAllocation;
} GPUPKMT_UNLOCK;
gpup_status GpupKmtUnlock(const GPUPKMT_UNLOCK* pArgs);

/* --- GPU virtual addresses (one address space per guest process) ------------------------------ */

typedef struct GPUPKMT_RESERVEGPUVA {
  uint64_t BaseAddress;    /* 0: anywhere */
  uint64_t Size;
  uint64_t VirtualAddress; /* out */
} GPUPKMT_RESERVEGPUVA;
gpup_status GpupKmtReserveGpuVirtualAddress(GPUPKMT_RESERVEGPUVA* pArgs);

#define GPUPKMT_PROTECTION_READ 0x1u
#define GPUPKMT_PROTECTION_WRITE 0x2u

typedef struct GPUPKMT_MAPGPUVA {
  GPUPKMT_HANDLE hAllocation;
  uint32_t Protection;
  uint64_t VirtualAddress; /* inside a reserved range, page aligned */
  uint64_t OffsetInAllocation;
  uint64_t Size;
} GPUPKMT_MAPGPUVA;
gpup_status GpupKmtMapGpuVirtualAddress(const GPUPKMT_MAPGPUVA* pArgs);

typedef struct GPUPKMT_FREEGPUVA {
  uint64_t BaseAddress;
  uint64_t Size;
} GPUPKMT_FREEGPUVA;
gpup_status GpupKmtFreeGpuVirtualAddress(const GPUPKMT_FREEGPUVA* pArgs);

/* --- command buffers and submission ----------------------------------------------------------- */

typedef struct GPUPKMT_CMDBUF GPUPKMT_CMDBUF; /* guest-side command buffer */

gpup_status GpupKmtCmdBufCreate(GPUPKMT_CMDBUF** ppCmdBuf);
void GpupKmtCmdBufDestroy(GPUPKMT_CMDBUF* pCmdBuf);
void GpupKmtCmdBufReset(GPUPKMT_CMDBUF* pCmdBuf);
uint32_t GpupKmtCmdBufSize(const GPUPKMT_CMDBUF* pCmdBuf);   /* bytes */
uint32_t GpupKmtCmdBufCount(const GPUPKMT_CMDBUF* pCmdBuf);  /* commands */

gpup_status GpupKmtCmdCopy(GPUPKMT_CMDBUF* pCmdBuf, uint64_t SrcVa, uint64_t DstVa, uint64_t Size);
gpup_status GpupKmtCmdFill(GPUPKMT_CMDBUF* pCmdBuf, uint64_t DstVa, uint64_t Size, const void* pPattern,
                           uint32_t PatternSize);

typedef struct GPUPKMT_KERNEL_ARG {
  uint32_t Kind;          /* GPUPDDI_ARG_VALUE / BUFFER / LOCAL / NULL_BUFFER / IMAGE / SAMPLER */
  uint32_t Size;          /* VALUE, SAMPLER: bytes at pValue; LOCAL: bytes of local memory */
  const void* pValue;
  uint64_t VirtualAddress; /* BUFFER: a range of the caller's own mapped allocations;
                              IMAGE: the whole of one of its image allocations */
  uint64_t BufferSize;
} GPUPKMT_KERNEL_ARG;

typedef struct GPUPKMT_DISPATCH {
  GPUPKMT_HANDLE hProgram; /* a PROGRAM allocation */
  const char* pKernelName;
  uint32_t WorkDim;
  uint32_t ArgCount;
  uint64_t GlobalOffset[3];
  uint64_t GlobalSize[3];
  uint64_t LocalSize[3];   /* zeros: device chooses */
  const GPUPKMT_KERNEL_ARG* pArgs;
} GPUPKMT_DISPATCH;
gpup_status GpupKmtCmdDispatch(GPUPKMT_CMDBUF* pCmdBuf, const GPUPKMT_DISPATCH* pDispatch);
gpup_status GpupKmtCmdSignal(GPUPKMT_CMDBUF* pCmdBuf, GPUPKMT_HANDLE hSyncObject, uint64_t Value);
gpup_status GpupKmtCmdWait(GPUPKMT_CMDBUF* pCmdBuf, GPUPKMT_HANDLE hSyncObject, uint64_t Value);

typedef struct GPUPKMT_SUBMITCOMMAND {
  GPUPKMT_HANDLE hContext;
  uint32_t Flags;
  const GPUPKMT_CMDBUF* pCmdBuf;
  uint64_t SubmissionId; /* out: echoed in errors about this submission */
} GPUPKMT_SUBMITCOMMAND;
/* One async message. Errors the host finds later (a forged handle in a command, a GPU VA outside
 * the caller's mappings) mark the context faulted and are returned by the next wait on a
 * synchronization object of its device and by GetDeviceState. */
gpup_status GpupKmtSubmitCommand(GPUPKMT_SUBMITCOMMAND* pArgs);

/* --- synchronization (monitored fences) -------------------------------------------------------- */

#define GPUPKMT_SYNCOBJECT_MONITORED_FENCE 1u

typedef struct GPUPKMT_CREATESYNCHRONIZATIONOBJECT {
  GPUPKMT_HANDLE hDevice;
  uint32_t Type;           /* GPUPKMT_SYNCOBJECT_MONITORED_FENCE */
  uint64_t InitialValue;
  GPUPKMT_HANDLE hSyncObject;              /* out */
  const volatile uint64_t* pFenceValue;    /* out: the current value, updated by the host */
} GPUPKMT_CREATESYNCHRONIZATIONOBJECT;
gpup_status GpupKmtCreateSynchronizationObject(GPUPKMT_CREATESYNCHRONIZATIONOBJECT* pArgs);

typedef struct GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT {
  GPUPKMT_HANDLE hSyncObject;
} GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT;
gpup_status GpupKmtDestroySynchronizationObject(const GPUPKMT_DESTROYSYNCHRONIZATIONOBJECT* pArgs);

typedef struct GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT {
  GPUPKMT_HANDLE hSyncObject;
  uint64_t Value;
  GPUPKMT_HANDLE hContext; /* FromGpu only: signalled after the context's earlier work */
} GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT;
gpup_status GpupKmtSignalSynchronizationObjectFromCpu(const GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT* pArgs);
gpup_status GpupKmtSignalSynchronizationObjectFromGpu(const GPUPKMT_SIGNALSYNCHRONIZATIONOBJECT* pArgs);

typedef struct GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT {
  GPUPKMT_HANDLE hSyncObject;
  uint64_t Value;
  GPUPKMT_HANDLE hContext; /* FromGpu only: the context's later work waits */
  int32_t TimeoutMs;       /* FromCpu only: -1 forever; TIMEOUT when it expires */
} GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT;
gpup_status GpupKmtWaitForSynchronizationObjectFromCpu(const GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT* pArgs);
gpup_status GpupKmtWaitForSynchronizationObjectFromGpu(const GPUPKMT_WAITFORSYNCHRONIZATIONOBJECT* pArgs);

/* --- escapes, state, statistics ------------------------------------------------------------- */

#define GPUPKMT_ESCAPE_DRIVER_KNOWN 0x1u /* a documented escape: the only kind a secure VM passes */

typedef struct GPUPKMT_ESCAPE {
  GPUPKMT_HANDLE hAdapter;
  GPUPKMT_HANDLE hDevice; /* optional */
  uint32_t Flags;         /* GPUPKMT_ESCAPE_* */
  const void* pPrivateDriverData;
  uint32_t PrivateDriverDataSize; /* up to GPUPKMT_MAX_PRIVATE_DATA_SIZE (see Limits above) */
  uint32_t OutputDataSize;        /* used up to GPUPKMT_MAX_OUTPUT_DATA_SIZE */
  void* pOutputData;
  uint32_t OutputDataWritten; /* out */
} GPUPKMT_ESCAPE;
gpup_status GpupKmtEscape(GPUPKMT_ESCAPE* pArgs);

#define GPUPKMT_DEVICESTATE_NORMAL 0u
#define GPUPKMT_DEVICESTATE_RESET 1u   /* a context of this device was reset or faulted */
#define GPUPKMT_DEVICESTATE_REMOVED 2u /* the adapter is gone for this VM */

typedef struct GPUPKMT_GETDEVICESTATE {
  GPUPKMT_HANDLE hDevice;
  uint32_t State;      /* out: GPUPKMT_DEVICESTATE_* */
  gpup_status Reason;  /* out: why (e.g. GPU_PAGE_FAULT, CONTEXT_RESET_GUILTY) */
} GPUPKMT_GETDEVICESTATE;
gpup_status GpupKmtGetDeviceState(GPUPKMT_GETDEVICESTATE* pArgs);

typedef struct GPUPKMT_QUERYVIDEOMEMORYINFO {
  GPUPKMT_HANDLE hAdapter;
  uint64_t Budget;                  /* out: what this partition may use */
  uint64_t CurrentUsage;            /* out: what this process uses */
  uint64_t CurrentReservation;      /* out */
  uint64_t AvailableForReservation; /* out */
} GPUPKMT_QUERYVIDEOMEMORYINFO;
gpup_status GpupKmtQueryVideoMemoryInfo(GPUPKMT_QUERYVIDEOMEMORYINFO* pArgs);

#define GPUPKMT_QUERYSTATISTICS_PROCESS 1u /* this guest process */
#define GPUPKMT_QUERYSTATISTICS_VM 2u      /* the whole partition (every guest process of the VM) */

typedef struct GPUPKMT_QUERYSTATISTICS {
  uint32_t Type;
  uint32_t Processes;
  uint32_t Devices;
  uint32_t Contexts;
  uint32_t Allocations;
  uint32_t SyncObjects;
  uint32_t VaMappings;
  uint32_t Reserved;
  uint64_t VramUsed;
  uint64_t VramMax;
  uint64_t Submissions;
  uint64_t Faults;
} GPUPKMT_QUERYSTATISTICS;
gpup_status GpupKmtQueryStatistics(GPUPKMT_QUERYSTATISTICS* pArgs);

/* --- introspection, for tests and tools -------------------------------------------------------- */

typedef struct GPUPKMT_CHANNELSTATS {
  uint64_t MessagesSent;     /* requests and async messages sent to the host */
  uint64_t RoundTrips;       /* of which waited for a reply */
  uint64_t NotificationsReceived;
  uint32_t SharedMemory;     /* 1: shared-memory rings; 0: stream transport */
  uint32_t ProtocolVersion;
} GPUPKMT_CHANNELSTATS;
gpup_status GpupKmtGetChannelStats(GPUPKMT_CHANNELSTATS* pStats);

#ifdef __cplusplus
}
#endif
#endif /* GPUP_KMT_H */
