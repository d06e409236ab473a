// Command-buffer thunks: purely local (no crossing) until GpupKmtSubmitCommand sends the buffer.
// The layout is proto::CommandWriter's (schema.def); nothing here writes a record by hand.
#include "guest/kmt/cmdbuf.h"

#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include <fmt/format.h>

#include "gpup/ddi.h"
#include "guest/kmt/guard.h"

using gpup::kmt::fail;
using gpup::kmt::guarded;

GPUPKMT_EXPORT gpup_status GpupKmtCmdBufCreate(GPUPKMT_CMDBUF** ppCmdBuf) {
  return guarded("GpupKmtCmdBufCreate", [&]() -> gpup_status {
    if (!ppCmdBuf) return fail(GPUP_STATUS_INVALID_PARAMETER, "ppCmdBuf is NULL");
    *ppCmdBuf = new GPUPKMT_CMDBUF();
    return GPUP_STATUS_SUCCESS;
  });
}

GPUPKMT_EXPORT void GpupKmtCmdBufDestroy(GPUPKMT_CMDBUF* pCmdBuf) { delete pCmdBuf; }

GPUPKMT_EXPORT void GpupKmtCmdBufReset(GPUPKMT_CMDBUF* pCmdBuf) {
  if (pCmdBuf) pCmdBuf->writer.clear();
}

namespace {
uint32_t saturate32(size_t v) {
  return v > std::numeric_limits<uint32_t>::max() ? std::numeric_limits<uint32_t>::max() : static_cast<uint32_t>(v);
}
}  // namespace

GPUPKMT_EXPORT uint32_t GpupKmtCmdBufSize(const GPUPKMT_CMDBUF* pCmdBuf) {
  return pCmdBuf ? saturate32(pCmdBuf->writer.size()) : 0;
}

GPUPKMT_EXPORT uint32_t GpupKmtCmdBufCount(const GPUPKMT_CMDBUF* pCmdBuf) {
  return pCmdBuf ? saturate32(pCmdBuf->writer.count()) : 0;
}

GPUPKMT_EXPORT gpup_status GpupKmtCmdCopy(GPUPKMT_CMDBUF* pCmdBuf, uint64_t SrcVa, uint64_t DstVa, uint64_t Size) {
  return guarded("GpupKmtCmdCopy", [&]() -> gpup_status {
    if (!pCmdBuf) return fail(GPUP_STATUS_INVALID_PARAMETER, "pCmdBuf is NULL");
    pCmdBuf->writer.copy(SrcVa, DstVa, Size);
    return GPUP_STATUS_SUCCESS;
  });
}

GPUPKMT_EXPORT gpup_status GpupKmtCmdFill(GPUPKMT_CMDBUF* pCmdBuf, uint64_t DstVa, uint64_t Size, const void* pPattern,
                                          uint32_t PatternSize) {
  return guarded("GpupKmtCmdFill", [&]() -> gpup_status {
    if (!pCmdBuf) return fail(GPUP_STATUS_INVALID_PARAMETER, "pCmdBuf is NULL");
    constexpr uint32_t kMaxPattern = sizeof(gpup::proto::FillCommand::pattern);
    if (!pPattern || PatternSize == 0 || PatternSize > kMaxPattern)
      return fail(GPUP_STATUS_INVALID_PARAMETER,
                  fmt::format("fill pattern of {} bytes at {} (1..{} bytes)", PatternSize, pPattern, kMaxPattern));
    pCmdBuf->writer.fill(DstVa, Size, pPattern, PatternSize);
    return GPUP_STATUS_SUCCESS;
  });
}

GPUPKMT_EXPORT gpup_status GpupKmtCmdDispatch(GPUPKMT_CMDBUF* pCmdBuf, const GPUPKMT_DISPATCH* pDispatch) {
  return guarded("GpupKmtCmdDispatch", [&]() -> gpup_status {
    namespace proto = gpup::proto;
    if (!pCmdBuf || !pDispatch) return fail(GPUP_STATUS_INVALID_PARAMETER, "pCmdBuf or pDispatch is NULL");
    const GPUPKMT_DISPATCH& d = *pDispatch;
    if (!d.pKernelName) return fail(GPUP_STATUS_INVALID_PARAMETER, "pKernelName is NULL");
    if (d.ArgCount > proto::kMaxKernelArgs)  // bounds the conversion below; the writer says why
      return fail(GPUP_STATUS_INVALID_PARAMETER,
                  fmt::format("{} kernel arguments (at most {})", d.ArgCount, proto::kMaxKernelArgs));
    if (d.ArgCount != 0 && !d.pArgs) return fail(GPUP_STATUS_INVALID_PARAMETER, "pArgs is NULL");
    // Bounded scan: a name longer than the limit is refused by dispatch() below.
    const size_t name_len = strnlen(d.pKernelName, proto::kMaxKernelNameLength + 1);
    // The writer checks the work dimension and every argument.
    std::vector<proto::CommandWriter::Arg> args(d.ArgCount);
    for (uint32_t i = 0; i < d.ArgCount; ++i) {
      const GPUPKMT_KERNEL_ARG& in = d.pArgs[i];
      args[i].kind = in.Kind;
      args[i].size = in.Size;
      args[i].va = in.VirtualAddress;
      args[i].range = in.BufferSize;
      args[i].value = in.Kind == GPUPDDI_ARG_VALUE || in.Kind == GPUPDDI_ARG_SAMPLER ? in.pValue : nullptr;
    }
    auto st = pCmdBuf->writer.dispatch(d.hProgram, std::string_view(d.pKernelName, name_len), d.WorkDim,
                                       d.GlobalOffset, d.GlobalSize, d.LocalSize, args);
    if (!st) return fail(st.error());
    return GPUP_STATUS_SUCCESS;
  });
}

GPUPKMT_EXPORT gpup_status GpupKmtCmdSignal(GPUPKMT_CMDBUF* pCmdBuf, GPUPKMT_HANDLE hSyncObject, uint64_t Value) {
  return guarded("GpupKmtCmdSignal", [&]() -> gpup_status {
    if (!pCmdBuf) return fail(GPUP_STATUS_INVALID_PARAMETER, "pCmdBuf is NULL");
    pCmdBuf->writer.signal(hSyncObject, Value);
    return GPUP_STATUS_SUCCESS;
  });
}

GPUPKMT_EXPORT gpup_status GpupKmtCmdWait(GPUPKMT_CMDBUF* pCmdBuf, GPUPKMT_HANDLE hSyncObject, uint64_t Value) {
  return guarded("GpupKmtCmdWait", [&]() -> gpup_status {
    if (!pCmdBuf) return fail(GPUP_STATUS_INVALID_PARAMETER, "pCmdBuf is NULL");
    pCmdBuf->writer.wait(hSyncObject, Value);
    return GPUP_STATUS_SUCCESS;
  });
}
