// The fence page's wake-up rule, shared by the worker (and the thunk's fake host), which writes
// slots, and the guest thunk, which sleeps on them.
//
// A slot is a u64 fence value. The writer stores a new value (release order) and then calls
// wake_fence_sleepers on it; a reader that wants a value it has not seen yet calls
// sleep_on_fence with the value it read. The futex word is the value's low 32 bits, compared by
// the kernel under the futex lock, so a store between the read and the sleep is never missed (a
// fence would have to advance by exactly 2^32 meanwhile). The futex is shared (not
// FUTEX_PRIVATE): the worker and the guest map the same memfd.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <bit>
#include <climits>

#include "protocol/protocol.h"

namespace gpup::proto {

// The futex word of a fence value: its low 32 bits.
inline const u32* fence_futex_word(const u64* value) {
  return reinterpret_cast<const u32*>(value) + (std::endian::native == std::endian::big ? 1 : 0);
}

// Wakes every thread sleeping on the slot. One system call whether anyone sleeps or not: a
// guest's view of the page is read-only, so it cannot say that it does.
inline void wake_fence_sleepers(const u64* value) {
  ::syscall(SYS_futex, fence_futex_word(value), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Sleeps while the slot still holds `seen`, for at most `timeout` (relative); returns on a wake, a
// changed value, a signal or the timeout alike: the caller reads the slot again.
inline void sleep_on_fence(const u64* value, u64 seen, const timespec& timeout) {
  ::syscall(SYS_futex, fence_futex_word(value), FUTEX_WAIT, static_cast<u32>(seen), &timeout, nullptr, 0);
}

}  // namespace gpup::proto
