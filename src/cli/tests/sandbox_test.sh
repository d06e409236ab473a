#!/usr/bin/env bash
# The guest sandbox and the driver store, end to end: a private gpupd with partitions a and b on
# the OpenCL KMD; checks that a started VM's HostDriverStore holds the package's files, then runs
# sandbox_probe in partition a and requires that everything the sandbox denies fails inside
# (host device nodes, the host's OpenCL ICDs and their libraries, partition b's endpoint, gpupd's
# control socket) while its own endpoint works and its ICD is loaded from its store. A control run
# with --no-sandbox shows the same paths are reachable without the sandbox.
#
#   sandbox_test.sh --gpup PATH --kmd-dir DIR --build-dir DIR --probe PATH
#
# If this host refuses a namespace the sandbox needs, gpup run fails (exit 125, "sandbox: ...")
# and so does this test: it never passes silently without confinement.
set -uo pipefail

GPUP="" KMD_DIR="" BUILD_DIR="" PROBE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --gpup) GPUP="$2"; shift 2 ;;
    --kmd-dir) KMD_DIR="$2"; shift 2 ;;
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --probe) PROBE="$2"; shift 2 ;;
    *) echo "sandbox_test.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$GPUP" ] && [ -x "$PROBE" ] || { echo "sandbox_test.sh: --gpup and --probe must be built programs" >&2; exit 2; }

TMP="$(mktemp -d /tmp/gpup-sbx-test-XXXXXX)"
RUN="$TMP/run"
host() {
  env -u OCL_ICD_FILENAMES -u OCL_ICD_VENDORS -u GPUP_ICD_DIR GPUP_RUNTIME_DIR="$RUN" GPUP_STATE_DIR="$TMP/state" \
    GPUP_LOG=info GPUP_KMD_PATH="$KMD_DIR" POCL_CACHE_DIR="$BUILD_DIR/pocl-cache" "$@"
}
HOST_UP=0
cleanup() {
  [ "$HOST_UP" = 1 ] && host timeout 60 "$GPUP" host stop >>"$TMP/host.log" 2>&1
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; echo "--- host log (tail) ---"; tail -n 30 "$RUN/gpupd.log" 2>/dev/null; exit 1; }

mkdir -p "$BUILD_DIR/pocl-cache"
printf '[[adapter]]\nname = "pocl0"\nkmd = "opencl"\n' >"$TMP/gpupd.toml"
host timeout 120 "$GPUP" host start --config "$TMP/gpupd.toml" >>"$TMP/host.log" 2>&1 || { cat "$TMP/host.log"; fail "host start"; }
HOST_UP=1
host timeout 60 "$GPUP" vm add a --max-vram 256MiB >>"$TMP/host.log" 2>&1 || { cat "$TMP/host.log"; fail "vm add a"; }
host timeout 60 "$GPUP" vm add b --max-vram 256MiB >>"$TMP/host.log" 2>&1 || { cat "$TMP/host.log"; fail "vm add b"; }

# The driver store of a started VM: the UMD and an ICD manifest naming it by its store path.
STORE="$(cd "$RUN" && pwd -P)/vms/a/HostDriverStore"
[ -f "$STORE/lib/libgpupocl.so" ] || fail "no $STORE/lib/libgpupocl.so"
cmp -s "$STORE/lib/libgpupocl.so" "$KMD_DIR/libgpupocl.so" || fail "the store's libgpupocl.so differs from the build's"
[ "$(cat "$STORE/OpenCL/vendors/gpup.icd")" = "$STORE/lib/libgpupocl.so" ] ||
  fail "gpup.icd in the store names '$(cat "$STORE/OpenCL/vendors/gpup.icd")', not the store's library"
grep -q '"version": "0.1.0.0"' "$STORE/.gpup-store.json" || fail "the store's manifest records no version"
grep -q "driver store lib/libgpupocl.so: copied" "$RUN/gpupd.log" || fail "gpupd did not log the store copy"
echo "ok   driver store of vm a populated: $STORE"

# What the guest must not reach: host device nodes that exist here (at least one), the host's
# OpenCL ICD files and the libraries they name, partition b's endpoint and gpupd's socket.
openable() {
  python3 -c 'import os, sys; os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK))' "$1" 2>/dev/null
}
DENY=()
for n in /dev/kvm /dev/mem /dev/kmsg /dev/console /dev/tty0 /dev/loop0 /dev/loop-control /dev/hwrng /dev/fuse \
         /dev/btrfs-control /dev/cpu_dma_latency /dev/vda /dev/sda /dev/nvme0 /dev/dri/* /dev/nvidia*; do
  # only nodes this host lets us open: their failure inside is then the sandbox's doing
  [ -e "$n" ] && [ ! -d "$n" ] && openable "$n" && DENY+=(--deny-open "$n")
done
[ ${#DENY[@]} -gt 0 ] || fail "no host device node to try"
NICD=0
for icd in /etc/OpenCL/vendors/*.icd; do
  [ -f "$icd" ] || continue
  DENY+=(--deny-open "$icd")
  lib="$(head -n1 "$icd" | tr -d '[:space:]')"
  case "$lib" in
    /*) path="$lib" ;;
    *) path="$(ldconfig -p | awk -v n="$lib" '$1 == n { print $NF; exit }')"
       [ -n "$path" ] || for d in /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu /usr/lib /lib; do
         [ -e "$d/$lib" ] && { path="$d/$lib"; break; }; done ;;
  esac
  [ -n "$path" ] && [ -e "$path" ] && { DENY+=(--deny-open "$path"); NICD=$((NICD + 1)); }
done
[ "$NICD" -gt 0 ] || fail "no host OpenCL ICD (and library) to try (pocl-opencl-icd is installed by install-deps.sh)"
DENY+=(--deny-connect "$RUN/vms/b/vrd.sock" --deny-connect "$RUN/gpupd.sock")
# The host's secrets under /etc that this test can read (it runs as root in CI): a guest's /etc
# has none of them. At least the shadow file must be among them.
NSECRET=0
for f in /etc/shadow /etc/gshadow /etc/sudoers /etc/ssh/ssh_host_*_key /etc/ssl/private/* /etc/machine-id; do
  [ -f "$f" ] && openable "$f" && { DENY+=(--deny-open "$f"); NSECRET=$((NSECRET + 1)); }
done
[ "$NSECRET" -gt 0 ] || echo "note: no host secret under /etc is readable by this user; that check is empty here"


# What programs read from /etc is there: accounts, the linker's cache, certificates.
for f in /etc/passwd /etc/ld.so.cache /etc/ssl/certs; do
  [ -e "$f" ] || continue
  host "$GPUP" run --vm a -- /bin/sh -c "test -r $f" || fail "$f is not readable inside"
done
host "$GPUP" run --vm a -- /bin/sh -c 'test ! -e /etc/shadow && test ! -e /etc/ssl/private' ||
  fail "/etc/shadow or /etc/ssl/private exists inside"
echo "ok   the guest's /etc has what programs read and no secret"

echo "--- confined: gpup run --vm a -- sandbox_probe"
host timeout 120 "$GPUP" run --vm a -- "$PROBE" --expect-store "$STORE" "${DENY[@]}" >"$TMP/probe.out" 2>"$TMP/probe.err"
rc=$?
cat "$TMP/probe.out"
[ $rc = 0 ] || { cat "$TMP/probe.err"; fail "the probe in the sandbox exited $rc"; }
grep -q '^PROBE OK$' "$TMP/probe.out" || fail "no PROBE OK"

echo "--- control: gpup run --no-sandbox --vm a -- sandbox_probe --unconfined"
host timeout 120 "$GPUP" run --no-sandbox --vm a -- "$PROBE" --unconfined "${DENY[@]}" >"$TMP/ctl.out" 2>"$TMP/ctl.err"
rc=$?
cat "$TMP/ctl.out"
[ $rc = 0 ] || { cat "$TMP/ctl.err"; fail "the unconfined control run exited $rc"; }

# gpupd's directories stay hidden whatever the working directory: run from their parent, the
# guest finds neither gpupd's socket nor the state file, and cannot write the state file; run
# from inside one, gpup run refuses.
STATE_SUM="$(cksum <"$TMP/state/partitions.json")"
(cd "$TMP" && host "$GPUP" run --vm a -- /bin/sh -c \
  "test ! -e '$RUN/gpupd.sock' && test ! -e '$TMP/state/partitions.json' && ! (echo x > '$TMP/state/partitions.json') 2>/dev/null") ||
  fail "from $TMP (the parent of gpupd's directories) the guest saw or wrote them"
[ "$(cksum <"$TMP/state/partitions.json")" = "$STATE_SUM" ] || fail "partitions.json changed under a guest"
[ -S "$RUN/gpupd.sock" ] || fail "gpupd.sock is not there for the control check"
for d in "$RUN" "$RUN/vms" "$TMP/state"; do
  out="$(cd "$d" && host "$GPUP" run --vm a -- /bin/true 2>&1)"; rc=$?
  [ $rc = 125 ] && [[ "$out" == *"a guest must not see"* ]] || fail "run from $d: exit $rc, '$out' (expected a refusal)"
done
# A host service's socket under /run answers on the host, not in the guest.
SOCK="/run/gpup-sbx-test-$$.sock"
python3 -c 'import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4); time.sleep(60)' "$SOCK" &
LISTENER=$!
for i in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
CONNECT='import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])'
python3 -c "$CONNECT" "$SOCK" || { kill $LISTENER; fail "the control connection to $SOCK failed"; }
host "$GPUP" run --vm a -- python3 -c "$CONNECT" "$SOCK" 2>/dev/null && { kill $LISTENER; rm -f "$SOCK"; fail "the guest connected to $SOCK"; }
kill $LISTENER; wait $LISTENER 2>/dev/null; rm -f "$SOCK"
echo "ok   gpupd's directories and /run's sockets stay hidden from every working directory"

# Exit status and signals pass through init.
host "$GPUP" run --vm a -- /bin/sh -c 'exit 7'; rc=$?
[ $rc = 7 ] || fail "exit 7 came back as $rc"
host "$GPUP" run --vm a -- /bin/sh -c 'kill -TERM $$'; rc=$?
[ $rc = 143 ] || fail "a guest killed by SIGTERM came back as $rc"
echo "ok   exit status and signal propagated"
echo "sandbox: ok"
