/* gpup status codes: one type from the KMD DDI through the wire to the guest thunks.
 *
 * Zero is success, positive values are non-error outcomes (a wait that timed out), negative
 * values are errors. The numeric values are part of the wire protocol: never renumber, only
 * append. The list is an X-macro so the names and messages cannot drift from the enum. */
#ifndef GPUP_STATUS_H
#define GPUP_STATUS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GPUP_STATUS_LIST(X)                                                                   \
  X(SUCCESS, 0, "success")                                                                    \
  X(TIMEOUT, 1, "the wait timed out")                                                         \
  X(PENDING, 2, "the operation is still pending")                                             \
  X(INVALID_PARAMETER, -1, "invalid parameter")                                               \
  X(INVALID_HANDLE, -2, "invalid handle")                                                     \
  X(OBJECT_TYPE_MISMATCH, -3, "handle refers to an object of another type")                   \
  X(NO_MEMORY, -4, "out of host memory")                                                      \
  X(QUOTA_EXCEEDED, -5, "partition video memory budget exceeded")                             \
  X(NOT_SUPPORTED, -6, "not supported")                                                       \
  X(ACCESS_DENIED, -7, "access denied")                                                       \
  X(DEVICE_REMOVED, -8, "the device was removed")                                             \
  X(CONTEXT_RESET_GUILTY, -9, "the context was reset because of its own work")                \
  X(CONTEXT_RESET_INNOCENT, -10, "the context was reset because of another context's work")  \
  X(CONNECTION_LOST, -11, "the connection to the host was lost")                              \
  X(MESSAGE_TOO_LARGE, -12, "message larger than the 128 KiB channel limit")                  \
  X(VERSION_MISMATCH, -13, "incompatible protocol version")                                   \
  X(PROTOCOL_ERROR, -14, "malformed message")                                                 \
  X(BUFFER_TOO_SMALL, -15, "buffer too small")                                                \
  X(GPU_PAGE_FAULT, -16, "GPU virtual address outside the caller's mappings")                 \
  X(OUT_OF_RANGE, -17, "offset or size outside the object")                                   \
  X(BUILD_FAILED, -18, "program build failed")                                                \
  X(NOT_FOUND, -19, "not found")                                                              \
  X(ALREADY_EXISTS, -20, "already exists")                                                    \
  X(BUSY, -21, "the object is busy")                                                          \
  X(INTERNAL, -22, "internal error")                                                          \
  X(DEVICE_ERROR, -23, "the device reported an error")

typedef int32_t gpup_status;

enum {
#define GPUP_STATUS_ENUM_(name, value, text) GPUP_STATUS_##name = value,
  GPUP_STATUS_LIST(GPUP_STATUS_ENUM_)
#undef GPUP_STATUS_ENUM_
};

#define GPUP_SUCCEEDED(s) ((s) >= 0)
#define GPUP_FAILED(s) ((s) < 0)

/* Short identifier ("INVALID_HANDLE") and human message for a status; never NULL. */
const char* gpup_status_name(gpup_status s);
const char* gpup_status_message(gpup_status s);

#ifdef __cplusplus
}
#endif
#endif /* GPUP_STATUS_H */
