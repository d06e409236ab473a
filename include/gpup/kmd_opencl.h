/* gpup OpenCL KMD private-data contract: the bytes the guest's OpenCL ICD (the UMD) puts into
 * the DDI's private-data buffers, and what the KMD writes back. Both gpup KMDs (kmd_opencl and
 * kmd_mock) speak it.
 *
 * These bytes cross the guest/host boundary unchanged, so every layout here is fixed: fixed-width
 * little-endian fields, explicit padding, no pointers, no handles, no bit-fields, sizes pinned by
 * static asserts. The KMD treats all of it as hostile (see ddi.h "Trust and validation").
 *
 * Where each structure travels
 *   GPUPDDI_ARG_CREATEALLOCATION with Flags.Program:
 *     pPrivateDriverData = GPUP_OCL_PROGRAM_DESC, then OptionsSize bytes of build options, then
 *                          ContentSize bytes of program content (OpenCL C source or a binary).
 *     pOutputData        <- GPUP_OCL_BUILD_RESULT, then the build log (possibly truncated).
 *   GPUPDDI_ARG_ESCAPE:
 *     pPrivateDriverData = GPUP_OCL_PRIVATE_HEADER{GPUP_OCL_ESCAPE_MAGIC, code}, then the payload.
 *     pOutputData        <- the code's output structure.
 *   GPUPDDI_ARG_QUERYADAPTERINFO with Type GPUPDDI_QAITYPE_UMDRIVERPRIVATE:
 *     pInputData         = GPUP_OCL_PRIVATE_HEADER{GPUP_OCL_QUERY_MAGIC, code}.
 *     pOutputData        <- the code's output structure.
 *
 * Versioning: GPUP_OCL_CONTRACT_VERSION is bumped on any change; structures only grow at the end
 * and carry a Version field where they may grow. Codes are never reused. */
#ifndef GPUP_KMD_OPENCL_H
#define GPUP_KMD_OPENCL_H

#include <stdint.h>

#include "gpup/ddi.h"

#ifdef __cplusplus
extern "C" {
#endif

#define GPUP_OCL_CONTRACT_VERSION 1u

/* Four-character tags, stored little-endian so the bytes read "GOCL", "GOCE", "GOCQ". */
#define GPUP_OCL_FOURCC(a, b, c, d) \
  ((uint32_t)(a) | ((uint32_t)(b) << 8) | ((uint32_t)(c) << 16) | ((uint32_t)(d) << 24))

/* ------------------------------------------------------------------------------------------ */
/* Programs                                                                                    */

#define GPUP_OCL_PROGRAM_MAGIC GPUP_OCL_FOURCC('G', 'O', 'C', 'L')
#define GPUP_OCL_PROGRAM_VERSION 1u

/* GPUP_OCL_PROGRAM_DESC.Format */
#define GPUP_OCL_PROGRAM_SOURCE 1u /* OpenCL C source text */
#define GPUP_OCL_PROGRAM_BINARY 2u /* a device binary, as clGetProgramInfo(CL_PROGRAM_BINARIES) gave it */

/* The largest options string and the largest program content the KMDs accept. */
#define GPUP_OCL_MAX_OPTIONS_SIZE 4096u
#define GPUP_OCL_MAX_CONTENT_SIZE (64u << 20)

/* Header of a program allocation's private data. The whole private data is exactly
 *   sizeof(GPUP_OCL_PROGRAM_DESC) + OptionsSize + ContentSize bytes
 * (computed without overflow; anything else is INVALID_PARAMETER).
 *
 * Options: OptionsSize bytes (may be 0) of clBuildProgram options. They contain no NUL byte,
 *   except that the last byte may be a single terminating NUL. The KMD may append options of its
 *   own (kmd_opencl appends -cl-kernel-arg-info, which it needs to check argument kinds).
 * Content: ContentSize bytes, 1..GPUP_OCL_MAX_CONTENT_SIZE.
 *   SOURCE: OpenCL C text without NUL bytes, except that the last byte may be a terminating NUL.
 *   BINARY: opaque device binary bytes. */
typedef struct GPUP_OCL_PROGRAM_DESC {
  uint32_t Magic;       /* GPUP_OCL_PROGRAM_MAGIC */
  uint32_t Version;     /* GPUP_OCL_PROGRAM_VERSION */
  uint32_t Format;      /* GPUP_OCL_PROGRAM_SOURCE or GPUP_OCL_PROGRAM_BINARY */
  uint32_t OptionsSize; /* bytes of options following this header */
  uint32_t ContentSize; /* bytes of content following the options */
  uint32_t Reserved;    /* must be 0 */
} GPUP_OCL_PROGRAM_DESC;

/* Written to the program allocation's output buffer by pfnCreateAllocation, on success and on
 * BUILD_FAILED alike, when OutputDataSize can hold at least this header. The log follows it:
 * LogBytes bytes (no terminating NUL), the first LogBytes of the LogSize-byte log. */
typedef struct GPUP_OCL_BUILD_RESULT {
  int32_t BuildError;  /* the cl_int the build returned: CL_SUCCESS (0), CL_BUILD_PROGRAM_FAILURE
                          (-11), CL_INVALID_BUILD_OPTIONS (-43), CL_INVALID_BINARY (-42), ... */
  uint32_t LogSize;    /* bytes of the complete log, without a terminating NUL */
  uint32_t LogBytes;   /* bytes of log that follow this header */
  uint32_t Truncated;  /* 1 when LogBytes < LogSize */
} GPUP_OCL_BUILD_RESULT;

/* ------------------------------------------------------------------------------------------ */
/* Escapes and UMD-private queries                                                             */

typedef struct GPUP_OCL_PRIVATE_HEADER {
  uint32_t Magic; /* GPUP_OCL_ESCAPE_MAGIC for escapes, GPUP_OCL_QUERY_MAGIC for queries */
  uint32_t Code;  /* GPUP_OCL_ESCAPE_* or GPUP_OCL_QUERY_* */
} GPUP_OCL_PRIVATE_HEADER;

#define GPUP_OCL_ESCAPE_MAGIC GPUP_OCL_FOURCC('G', 'O', 'C', 'E')
#define GPUP_OCL_QUERY_MAGIC GPUP_OCL_FOURCC('G', 'O', 'C', 'Q')

/* Escape codes. Codes with GPUP_OCL_ESCAPE_PRIVATE_BIT set are driver-private (debug and test
 * tools); the others are driver-known, i.e. documented here and allowed from a secure VM. A KMD
 * refuses a driver-private code with ACCESS_DENIED when the host marked the escape
 * Flags.DriverKnownEscape, and any code it does not know with NOT_SUPPORTED. */
#define GPUP_OCL_ESCAPE_PRIVATE_BIT 0x80000000u
#define GPUP_OCL_ESCAPE_IS_DRIVER_KNOWN(code) (((code) & GPUP_OCL_ESCAPE_PRIVATE_BIT) == 0u)

/* Driver-known. Payload: none (the private data is exactly the header).
 * Output: GPUP_OCL_ESCAPE_DEVICE_INFO_OUT. */
#define GPUP_OCL_ESCAPE_DEVICE_INFO 0x00000001u
/* Driver-private. Payload: any bytes (0 or more) after the header.
 * Output: GPUP_OCL_ESCAPE_CHECKSUM_OUT over the payload. Used to prove a large message arrived
 * intact. */
#define GPUP_OCL_ESCAPE_CHECKSUM 0x80000001u

typedef struct GPUP_OCL_ESCAPE_DEVICE_INFO_OUT {
  GPUPDDI_DEVICEINFO Info; /* the same answer as GPUPDDI_QAITYPE_DEVICEINFO */
} GPUP_OCL_ESCAPE_DEVICE_INFO_OUT;

/* 64-bit FNV-1a: offset basis 0xcbf29ce484222325, prime 0x100000001b3. */
#define GPUP_OCL_FNV1A64_OFFSET 0xcbf29ce484222325ull
#define GPUP_OCL_FNV1A64_PRIME 0x100000001b3ull

typedef struct GPUP_OCL_ESCAPE_CHECKSUM_OUT {
  uint64_t ByteCount; /* payload bytes (PrivateDriverDataSize - sizeof(GPUP_OCL_PRIVATE_HEADER)) */
  uint64_t Fnv1a64;   /* FNV-1a of the payload */
} GPUP_OCL_ESCAPE_CHECKSUM_OUT;

/* UMD-private query codes (input is exactly the header). */
#define GPUP_OCL_QUERY_UMD_INFO 0x00000001u /* output: GPUP_OCL_UMD_INFO */

/* GPUP_OCL_UMD_INFO.ProgramFormats bits */
#define GPUP_OCL_PROGRAM_FORMAT_BIT(format) (1u << (format))

/* What the ICD needs to describe the device beyond GPUPDDI_DEVICEINFO. Strings are
 * NUL-terminated, truncated to fit (Extensions at a space boundary). */
typedef struct GPUP_OCL_UMD_INFO {
  uint32_t ContractVersion;       /* GPUP_OCL_CONTRACT_VERSION */
  uint32_t ProgramFormats;        /* GPUP_OCL_PROGRAM_FORMAT_BIT(GPUP_OCL_PROGRAM_SOURCE) | ... */
  uint32_t AddressBits;           /* CL_DEVICE_ADDRESS_BITS */
  uint32_t MaxWorkItemDimensions; /* CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS, at most 3 reported */
  uint64_t MaxWorkItemSizes[3];   /* CL_DEVICE_MAX_WORK_ITEM_SIZES */
  uint64_t MaxParameterSize;      /* CL_DEVICE_MAX_PARAMETER_SIZE */
  uint64_t MaxConstantBufferSize; /* CL_DEVICE_MAX_CONSTANT_BUFFER_SIZE */
  char DeviceVersion[64];         /* CL_DEVICE_VERSION */
  char OpenCLCVersion[64];        /* CL_DEVICE_OPENCL_C_VERSION */
  char Extensions[1024];          /* CL_DEVICE_EXTENSIONS */
} GPUP_OCL_UMD_INFO;

/* ------------------------------------------------------------------------------------------ */
/* Layout pins                                                                                 */

#ifdef __cplusplus
#define GPUP_OCL_STATIC_ASSERT_(cond, msg) static_assert(cond, msg)
#else
#define GPUP_OCL_STATIC_ASSERT_(cond, msg) _Static_assert(cond, msg)
#endif
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_PROGRAM_DESC) == 24, "GPUP_OCL_PROGRAM_DESC layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_BUILD_RESULT) == 16, "GPUP_OCL_BUILD_RESULT layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_PRIVATE_HEADER) == 8, "GPUP_OCL_PRIVATE_HEADER layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_ESCAPE_CHECKSUM_OUT) == 16, "GPUP_OCL_ESCAPE_CHECKSUM_OUT layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUPDDI_DEVICEINFO) == 360, "GPUPDDI_DEVICEINFO layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_ESCAPE_DEVICE_INFO_OUT) == 360, "GPUP_OCL_ESCAPE_DEVICE_INFO_OUT layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_UMD_INFO) == 1208, "GPUP_OCL_UMD_INFO layout");
#undef GPUP_OCL_STATIC_ASSERT_

#ifdef __cplusplus
}
#endif
#endif /* GPUP_KMD_OPENCL_H */
