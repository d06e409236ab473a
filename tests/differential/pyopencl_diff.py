#!/usr/bin/env python3
"""PyOpenCL differential workload: pyopencl.array arithmetic, an ElementwiseKernel and a
ReductionKernel on the first OpenCL device, printing deterministic results (integers, and floats
whose values are exactly representable so any summation order gives the same bits).

Checks every result against numpy and exits 1 on a mismatch, 77 if pyopencl is not importable
(ctest SKIP_RETURN_CODE). Runs are independent: the PyOpenCL kernel cache is disabled and
XDG_CACHE_HOME points at a fresh temporary directory.
"""
import os
import sys
import tempfile

_cache = tempfile.TemporaryDirectory(prefix="gpup-pyopencl-")
os.environ["XDG_CACHE_HOME"] = _cache.name
os.environ["PYOPENCL_NO_CACHE"] = "1"
os.environ.setdefault("PYOPENCL_COMPILER_OUTPUT", "0")
os.environ.pop("PYOPENCL_CTX", None)

try:
    import numpy as np
    import pyopencl as cl
    import pyopencl.array as cl_array
    from pyopencl.elementwise import ElementwiseKernel
    from pyopencl.reduction import ReductionKernel
except ImportError as e:  # pragma: no cover
    print(f"pyopencl not available: {e}", file=sys.stderr)
    sys.exit(77)

failures = 0


def result(name, value):
    print(f"RESULT {name} {value}")


def check(name, ok):
    global failures
    if not ok:
        failures += 1
        print(f"RESULT {name} FAIL")
        print(f"FAIL {name}", file=sys.stderr)


def digest(a):
    """A checksum of an array's bytes that does not depend on Python's hash seed."""
    import zlib
    return f"{zlib.crc32(np.ascontiguousarray(a).tobytes()):08x}"


def main():
    platforms = cl.get_platforms()
    result("platforms>=1", int(len(platforms) >= 1))
    dev = platforms[0].get_devices()[0]
    ctx = cl.Context([dev])
    q = cl.CommandQueue(ctx)
    rng = np.random.default_rng(1234)

    # --- pyopencl.array arithmetic -----------------------------------------------------------
    n = 100_000
    a_h = rng.integers(-1000, 1000, n).astype(np.int32)
    b_h = rng.integers(1, 50, n).astype(np.int32)
    a = cl_array.to_device(q, a_h)
    b = cl_array.to_device(q, b_h)
    c = (a * 3 + b - 7).get()
    check("int_arith", np.array_equal(c, a_h * 3 + b_h - 7))
    result("int_arith", digest(c))
    m = cl_array.maximum(a, b * 10).get()
    check("int_maximum", np.array_equal(m, np.maximum(a_h, b_h * 10)))
    result("int_maximum", digest(m))
    ab = abs(a).get()
    check("int_abs", np.array_equal(ab, np.abs(a_h)))
    result("int_abs", digest(ab))

    f_h = rng.integers(-64, 64, n).astype(np.float32) * np.float32(0.25)
    g_h = rng.integers(1, 16, n).astype(np.float32)
    f = cl_array.to_device(q, f_h)
    g = cl_array.to_device(q, g_h)
    h = (f * g + 1.5).get()
    check("float_arith", np.array_equal(h, f_h * g_h + np.float32(1.5)))
    result("float_arith", digest(h))
    s = cl_array.sum(f).get()
    check("float_sum", float(s) == float(f_h.astype(np.float64).sum()))
    result("float_sum", f"{float(s):.4f}")
    isum = cl_array.sum(a).get()
    check("int_sum", int(isum) == int(a_h.astype(np.int64).sum()))
    result("int_sum", int(isum))
    mx, mn = cl_array.max(a).get(), cl_array.min(a).get()
    check("minmax", int(mx) == int(a_h.max()) and int(mn) == int(a_h.min()))
    result("max", int(mx))
    result("min", int(mn))
    dot = cl_array.dot(f, g).get()
    check("dot", float(dot) == float((f_h.astype(np.float64) * g_h).sum()))
    result("dot", f"{float(dot):.4f}")
    z = cl_array.zeros(q, 1000, np.int32)
    z.fill(42)
    zh = z.get()
    check("fill", bool((zh == 42).all()))
    r = cl_array.arange(q, 0, 1000, 1, dtype=np.int32)
    rh = r.get()
    check("arange", np.array_equal(rh, np.arange(1000, dtype=np.int32)))
    result("arange_sum", int(rh.sum()))
    sl = a[1000:2000].get()
    check("slice", np.array_equal(sl, a_h[1000:2000]))
    result("slice", digest(sl))
    wh = cl_array.if_positive(a, a, -a).get()  # abs via if_positive
    check("if_positive", np.array_equal(wh, np.where(a_h > 0, a_h, -a_h)))
    result("if_positive", digest(wh))

    # --- ElementwiseKernel ------------------------------------------------------------------
    axpy = ElementwiseKernel(ctx, "int k, __global const int *x, __global const int *y, __global int *z",
                             "z[i] = k * x[i] + y[i]", "axpy")
    out = cl_array.empty_like(a)
    axpy(5, a, b, out)
    oh = out.get()
    check("elementwise_axpy", np.array_equal(oh, 5 * a_h + b_h))
    result("elementwise_axpy", digest(oh))
    clamp = ElementwiseKernel(ctx, "__global float *v, float lo, float hi", "v[i] = clamp(v[i], lo, hi)", "clampk")
    fc = f.copy()
    clamp(fc, np.float32(-2.0), np.float32(3.0))
    fch = fc.get()
    check("elementwise_clamp", np.array_equal(fch, np.clip(f_h, -2.0, 3.0)))
    result("elementwise_clamp", digest(fch))

    # --- ReductionKernel --------------------------------------------------------------------
    sumsq = ReductionKernel(ctx, np.int64, neutral="0", reduce_expr="a+b", map_expr="(long)x[i]*(long)x[i]",
                            arguments="__global const int *x")
    ss = int(sumsq(a).get())
    check("reduction_sumsq", ss == int((a_h.astype(np.int64) ** 2).sum()))
    result("reduction_sumsq", ss)
    count_neg = ReductionKernel(ctx, np.int32, neutral="0", reduce_expr="a+b", map_expr="x[i] < 0 ? 1 : 0",
                                arguments="__global const int *x")
    cn = int(count_neg(a).get())
    check("reduction_count_neg", cn == int((a_h < 0).sum()))
    result("reduction_count_neg", cn)
    maxabs = ReductionKernel(ctx, np.int32, neutral="0", reduce_expr="max(a,b)", map_expr="(int)abs(x[i] - y[i])",
                             arguments="__global const int *x, __global const int *y")
    ma = int(maxabs(a, b).get())
    check("reduction_maxabs", ma == int(np.abs(a_h - b_h).max()))
    result("reduction_maxabs", ma)

    q.finish()
    result("failures", failures)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
