// Internal to libgpupkmt: the guest-side command buffer behind the opaque GPUPKMT_CMDBUF.
#pragma once
#include "gpup/kmt.h"
#include "protocol/codec.h"

// Owned by the caller (GpupKmtCmdBufCreate / GpupKmtCmdBufDestroy). Not thread-safe: one thread
// records into a buffer at a time; SubmitCommand only reads it (and copies it into the message).
struct GPUPKMT_CMDBUF {
  gpup::proto::CommandWriter writer;
};
