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

#define GPUP_OCL_CONTRACT_VERSION 3u /* 3: images and samplers */

/* Four-character tags, stored little-endian so the bytes read "GOCL", "GOCE", "GOCQ". */
#define GPUP_OCL_FOURCC(a, b, c, d) \
  ((uint32_t)(a) | ((uint32_t)(b) << 8) | ((uint32_t)(c) << 16) | ((uint32_t)(d) << 24))

/* ------------------------------------------------------------------------------------------ */
/* Programs                                                                                    */

#define GPUP_OCL_PROGRAM_MAGIC GPUP_OCL_FOURCC('G', 'O', 'C', 'L')
/* Version 1: the output is GPUP_OCL_BUILD_RESULT and the log.
 * Version 2: adds the COMPILE and LINK formats, and the output continues with
 *            GPUP_OCL_PROGRAM_INFO (kernels, arguments, the binary) after the log. */
#define GPUP_OCL_PROGRAM_VERSION 2u

/* GPUP_OCL_PROGRAM_DESC.Format */
#define GPUP_OCL_PROGRAM_SOURCE 1u  /* OpenCL C source text; built (clBuildProgram) */
#define GPUP_OCL_PROGRAM_BINARY 2u  /* a binary as CL_PROGRAM_BINARIES gave it; built (clBuildProgram) */
#define GPUP_OCL_PROGRAM_COMPILE 3u /* (v2) a GPUP_OCL_SOURCE_SET; compiled only (clCompileProgram) */
#define GPUP_OCL_PROGRAM_LINK 4u    /* (v2) a GPUP_OCL_BINARY_SET; linked (clLinkProgram) */

/* The largest options string and the largest program content the KMDs accept. */
#define GPUP_OCL_MAX_OPTIONS_SIZE 4096u
#define GPUP_OCL_MAX_CONTENT_SIZE (64u << 20)

/* Header of a program allocation's private data. The whole private data is exactly
 *   sizeof(GPUP_OCL_PROGRAM_DESC) + OptionsSize + ContentSize bytes
 * (computed without overflow; anything else is INVALID_PARAMETER).
 *
 * Options: OptionsSize bytes (may be 0) of clBuildProgram options. They contain no NUL byte,
 *   except that the last byte may be a single terminating NUL. The KMD may append options of its
 *   own (kmd_opencl appends -cl-kernel-arg-info to the build, compile and link options: it needs
 *   argument kinds, and PoCL keeps argument info through binaries and links only when the
 *   option is given again to clBuildProgram / clLinkProgram).
 * Content: ContentSize bytes, 1..GPUP_OCL_MAX_CONTENT_SIZE.
 *   SOURCE: OpenCL C text without NUL bytes, except that the last byte may be a terminating NUL;
 *           not empty.
 *   BINARY: opaque device binary bytes.
 *   COMPILE, LINK: a set, see below. */
typedef struct GPUP_OCL_PROGRAM_DESC {
  uint32_t Magic;       /* GPUP_OCL_PROGRAM_MAGIC */
  uint32_t Version;     /* 1 or 2 (GPUP_OCL_PROGRAM_VERSION); selects the output format */
  uint32_t Format;      /* GPUP_OCL_PROGRAM_*; COMPILE and LINK need Version 2 */
  uint32_t OptionsSize; /* bytes of options following this header */
  uint32_t ContentSize; /* bytes of content following the options */
  uint32_t Reserved;    /* must be 0 */
} GPUP_OCL_PROGRAM_DESC;

/* COMPILE content: the main source and the headers it may #include by name (clCompileProgram's
 * input_headers / header_include_names). A GPUP_OCL_SET_HEADER, then Count entries
 * (1..GPUP_OCL_MAX_SET_ENTRIES), each a GPUP_OCL_SET_ENTRY then NameSize bytes of name then
 * DataSize bytes of text. Every entry starts 8-byte aligned counted from the start of the content
 * (the first right after the header), zero bytes padding the gap before it; the content ends
 * with the last entry's data (no padding after it), so the set is exactly ContentSize bytes.
 * Entry 0 is the main source and has NameSize 0; the others have names of 1..255 bytes without
 * NUL, without "..", not starting with '/'. Texts follow the SOURCE rules (not empty, at most a
 * terminating NUL). */
/* LINK content: the programs to link (clLinkProgram's input_programs), each a binary exactly as
 * the KMD returned it in GPUP_OCL_PROGRAM_INFO for a COMPILE or LINK (with -create-library)
 * program. Same framing as COMPILE with NameSize 0 for every entry; Count >= 1; DataSize >= 1.
 * "-create-library" in the options makes a library (BinaryType CL_PROGRAM_BINARY_TYPE_LIBRARY).
 *
 * Only an executable (SOURCE, BINARY of an executable, LINK without -create-library) can be
 * dispatched; a dispatch naming a compiled object or a library is INVALID_PARAMETER. */
#define GPUP_OCL_SET_MAGIC GPUP_OCL_FOURCC('G', 'O', 'C', 'S')
#define GPUP_OCL_MAX_SET_ENTRIES 256u

typedef struct GPUP_OCL_SET_HEADER {
  uint32_t Magic; /* GPUP_OCL_SET_MAGIC */
  uint32_t Count;
} GPUP_OCL_SET_HEADER;

typedef struct GPUP_OCL_SET_ENTRY {
  uint32_t NameSize;
  uint32_t Reserved; /* 0 */
  uint64_t DataSize;
} GPUP_OCL_SET_ENTRY;

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

/* Version 2 output, after GPUP_OCL_BUILD_RESULT and its LogBytes of log, at the next 8-byte
 * boundary (offsets count from the start of the output buffer). It is present exactly when
 * OutputDataSize >= sizeof(GPUP_OCL_BUILD_RESULT) + sizeof(GPUP_OCL_PROGRAM_INFO); otherwise
 * the output ends with the log, as in version 1. When present, the log is truncated so that this
 * header and the whole kernel table fit; if even an empty log leaves too little room for the
 * table, the log is left out (LogBytes 0) and the table is cut. Everything the ICD answers
 * locally about a built program and its kernels:
 *
 *   GPUP_OCL_PROGRAM_INFO
 *   KernelCount times: GPUP_OCL_KERNEL_INFO, its name (NameSize bytes), its attributes
 *                      (AttributesSize bytes), padding to 8; then NumArgs times:
 *                      GPUP_OCL_KERNEL_ARG_INFO, type name (TypeNameSize), argument name
 *                      (NameSize), padding to 8
 *   BinaryBytes bytes of the program binary (CL_PROGRAM_BINARIES), padding to 8
 *
 * Strings carry no terminating NUL; padding bytes are zero. When the kernel table does not fit,
 * KernelTableComplete is 0, the table holds the first KernelCount kernels that fit whole,
 * BinaryBytes is 0, and the UMD must retry with a larger buffer; when only the binary (with its
 * padding) does not fit, BinaryBytes is 0 while BinarySize says how large it is. A compiled
 * object or a library has no kernels (KernelCount 0, KernelTableComplete 1) but a binary. A
 * failed build reports KernelCount 0 and no binary (BinarySize 0), even where the device still
 * has one. */
#define GPUP_OCL_PROGRAM_INFO_MAGIC GPUP_OCL_FOURCC('G', 'O', 'C', 'P')

typedef struct GPUP_OCL_PROGRAM_INFO {
  uint32_t Magic;               /* GPUP_OCL_PROGRAM_INFO_MAGIC */
  uint32_t BinaryType;          /* CL_PROGRAM_BINARY_TYPE_* of the built program */
  uint32_t KernelCount;         /* kernels described (CL_PROGRAM_NUM_KERNELS for an executable) */
  uint32_t KernelTableComplete; /* 1 when every kernel (and argument) is described */
  uint64_t KernelTableSize;     /* bytes of the kernel table that follows */
  uint64_t BinarySize;          /* bytes of the complete binary (0: the device gave none) */
  uint64_t BinaryBytes;         /* bytes of binary present after the table: 0 or BinarySize */
} GPUP_OCL_PROGRAM_INFO;

typedef struct GPUP_OCL_KERNEL_INFO {
  uint32_t NameSize;       /* CL_KERNEL_FUNCTION_NAME */
  uint32_t AttributesSize; /* CL_KERNEL_ATTRIBUTES */
  uint32_t NumArgs;        /* CL_KERNEL_NUM_ARGS */
  uint32_t Reserved;
  /* clGetKernelWorkGroupInfo on the host device */
  uint64_t WorkGroupSize;                  /* CL_KERNEL_WORK_GROUP_SIZE */
  uint64_t CompileWorkGroupSize[3];        /* CL_KERNEL_COMPILE_WORK_GROUP_SIZE */
  uint64_t LocalMemSize;                   /* CL_KERNEL_LOCAL_MEM_SIZE (without __local args) */
  uint64_t PreferredWorkGroupSizeMultiple; /* CL_KERNEL_PREFERRED_WORK_GROUP_SIZE_MULTIPLE */
  uint64_t PrivateMemSize;                 /* CL_KERNEL_PRIVATE_MEM_SIZE */
} GPUP_OCL_KERNEL_INFO;

/* GPUP_OCL_KERNEL_ARG_INFO.Kind: the GPUPDDI_KERNEL_ARG_KIND the argument takes at dispatch
 * (GPUPDDI_ARG_VALUE, GPUPDDI_ARG_BUFFER for __global/__constant pointers, which also accept
 * GPUPDDI_ARG_NULL_BUFFER, GPUPDDI_ARG_LOCAL), or GPUP_OCL_ARG_UNSUPPORTED (images, samplers,
 * pipes, queues, events, or no argument info: the guest cannot name such objects).
 * Qualifiers and names are 0 / empty when the device has no argument info.
 *
 * Value sizes, as the host's clSetKernelArg checks them (the KMD observes them on the built
 * kernel, so the ICD can refuse exactly what the host would, with CL_INVALID_ARG_SIZE):
 *   VALUE:  clSetKernelArg accepts arg_size == ValueSize, and also arg_size == ValueSizeAlt
 *           when that is not 0 (PoCL accepts 3/4 of the size of any type whose size is a
 *           multiple of 4, for 3-component vectors: int takes 3 or 4 bytes, float4 12 or 16).
 *           ValueSize 0: no fixed size, any arg_size from 1 is accepted (PoCL: struct and union
 *           arguments); the KMD still refuses 0 and more than MaxParameterSize at dispatch.
 *   BUFFER: ValueSize is sizeof(cl_mem) as the host sees it; ValueSizeAlt 0.
 *   LOCAL, UNSUPPORTED: both 0 (a __local argument takes any non-zero size). */
#define GPUP_OCL_ARG_UNSUPPORTED 0u

typedef struct GPUP_OCL_KERNEL_ARG_INFO {
  uint32_t AddressQualifier; /* CL_KERNEL_ARG_ADDRESS_QUALIFIER */
  uint32_t AccessQualifier;  /* CL_KERNEL_ARG_ACCESS_QUALIFIER */
  uint64_t TypeQualifier;    /* CL_KERNEL_ARG_TYPE_QUALIFIER */
  uint32_t Kind;             /* see above */
  uint32_t ValueSize;        /* see above */
  uint32_t TypeNameSize;     /* CL_KERNEL_ARG_TYPE_NAME */
  uint32_t NameSize;         /* CL_KERNEL_ARG_NAME */
  uint32_t ValueSizeAlt;     /* see above */
  uint32_t Reserved;         /* 0 */
} GPUP_OCL_KERNEL_ARG_INFO;

/* ------------------------------------------------------------------------------------------ */
/* Images and samplers (contract version 3)                                                    */

/* The private data of an allocation created with Flags.Image (and CpuVisible): the image the
 * KMD makes over the allocation's bytes, in a linear layout the guest also reads and writes
 * directly: pixel (x, y, z) of array slice a starts at byte
 *   x * element size + y * RowPitch + (z + a) * SlicePitch
 * (1D arrays use RowPitch as their slice pitch, as OpenCL does). The allocation's Size must be
 * at least the last byte of the image. ImageType is a CL_MEM_OBJECT_IMAGE* value other than
 * IMAGE1D_BUFFER; unused dimensions are 0; pitches are never 0 for the dimensions that use them
 * and at least width * element size (row) and height * RowPitch (slice). The host device must
 * support the format for the image type (GPUP_OCL_QUERY_IMAGE_FORMATS); anything else is
 * INVALID_PARAMETER. Flags: the cl_mem_flags access bits (CL_MEM_READ_WRITE, _READ_ONLY,
 * _WRITE_ONLY) only. */
typedef struct GPUP_OCL_IMAGE_DESC {
  uint32_t Magic;             /* GPUP_OCL_IMAGE_MAGIC */
  uint32_t ImageType;         /* CL_MEM_OBJECT_IMAGE1D, _IMAGE2D, _IMAGE3D, _IMAGE1D_ARRAY, _IMAGE2D_ARRAY */
  uint32_t ChannelOrder;      /* cl_channel_order */
  uint32_t ChannelDataType;   /* cl_channel_type */
  uint64_t Flags;             /* cl_mem_flags access bits */
  uint64_t Width, Height, Depth, ArraySize;
  uint64_t RowPitch, SlicePitch;
} GPUP_OCL_IMAGE_DESC;
#define GPUP_OCL_IMAGE_MAGIC GPUP_OCL_FOURCC('G', 'O', 'C', 'M')

/* The value of a GPUPDDI_ARG_SAMPLER argument (Size == sizeof). */
typedef struct GPUP_OCL_SAMPLER_DESC {
  uint32_t NormalizedCoords; /* CL_TRUE / CL_FALSE */
  uint32_t AddressingMode;   /* cl_addressing_mode */
  uint32_t FilterMode;       /* cl_filter_mode */
  uint32_t Reserved;         /* 0 */
} GPUP_OCL_SAMPLER_DESC;

/* GPUP_OCL_KERNEL_ARG_INFO.Kind for image and sampler parameters (version 3 KMDs): the kinds
 * GPUPDDI_ARG_IMAGE and GPUPDDI_ARG_SAMPLER; ValueSize is the host's sizeof(cl_mem) for images
 * and sizeof(cl_sampler) for samplers (what clSetKernelArg takes), ValueSizeAlt 0. */

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
#define GPUP_OCL_QUERY_UMD_INFO 0x00000001u    /* output: GPUP_OCL_UMD_INFO */
#define GPUP_OCL_QUERY_DEVICE_INFO 0x00000002u /* (v2) output: GPUP_OCL_INFO_LIST of device info */
/* (v3) output: GPUP_OCL_INFO_LIST whose records are keyed by image type and access: Param is
 * GPUP_OCL_IMAGE_FORMATS_KEY(type, flags) and the value an array of cl_image_format, as
 * clGetSupportedImageFormats answers for that CL_MEM_OBJECT_IMAGE* type and exactly one of
 * CL_MEM_READ_WRITE, CL_MEM_READ_ONLY, CL_MEM_WRITE_ONLY (and CL_MEM_KERNEL_READ_AND_WRITE where
 * the host knows it). Empty when the device has no image support. */
#define GPUP_OCL_QUERY_IMAGE_FORMATS 0x00000003u
#define GPUP_OCL_IMAGE_FORMATS_KEY(type, flags) ((uint32_t)(((type) & 0xffffu) << 16) | (uint32_t)((flags) & 0xffffu))

/* GPUP_OCL_QUERY_DEVICE_INFO: every clGetDeviceInfo parameter of OpenCL 1.0 to 3.0 that the host
 * device answers with CL_SUCCESS, exactly as it answers it, except the parameters whose values
 * are host pointers or handles (CL_DEVICE_PLATFORM, CL_DEVICE_PARENT_DEVICE), which are left out.
 * The UMD overrides what the partition changes (memory sizes, name, ...). Records are sorted by
 * Param and unique:
 *   GPUP_OCL_INFO_LIST, then Count times: GPUP_OCL_INFO_RECORD, Size bytes, padding to 8.
 * Values are the raw bytes clGetDeviceInfo returns (strings with their terminating NUL, size_t
 * as the host's 8 bytes). When the output buffer is too small, nothing but the list header is
 * written (and nothing at all when the buffer cannot hold it), with TotalSize saying how large
 * the buffer must be, and the query fails with BUFFER_TOO_SMALL. The list is read once, when
 * the adapter starts. */
#define GPUP_OCL_INFO_LIST_MAGIC GPUP_OCL_FOURCC('G', 'O', 'C', 'I')

typedef struct GPUP_OCL_INFO_LIST {
  uint32_t Magic;     /* GPUP_OCL_INFO_LIST_MAGIC */
  uint32_t Count;     /* records */
  uint32_t TotalSize; /* bytes, this header included */
  uint32_t Reserved;
} GPUP_OCL_INFO_LIST;

typedef struct GPUP_OCL_INFO_RECORD {
  uint32_t Param; /* the cl_device_info value */
  uint32_t Size;  /* bytes of the value that follow */
} GPUP_OCL_INFO_RECORD;

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
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_SET_HEADER) == 8, "GPUP_OCL_SET_HEADER layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_SET_ENTRY) == 16, "GPUP_OCL_SET_ENTRY layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_PROGRAM_INFO) == 40, "GPUP_OCL_PROGRAM_INFO layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_KERNEL_INFO) == 72, "GPUP_OCL_KERNEL_INFO layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_KERNEL_ARG_INFO) == 40, "GPUP_OCL_KERNEL_ARG_INFO layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_INFO_LIST) == 16, "GPUP_OCL_INFO_LIST layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_INFO_RECORD) == 8, "GPUP_OCL_INFO_RECORD layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_IMAGE_DESC) == 72, "GPUP_OCL_IMAGE_DESC layout");
GPUP_OCL_STATIC_ASSERT_(sizeof(GPUP_OCL_SAMPLER_DESC) == 16, "GPUP_OCL_SAMPLER_DESC layout");
#undef GPUP_OCL_STATIC_ASSERT_

#ifdef __cplusplus
}
#endif
#endif /* GPUP_KMD_OPENCL_H */
