#!/usr/bin/env python3
"""Checks and summarises gpup benchmark output.

  results.py check-gbench FILE                 Google Benchmark JSON: parses, has benchmarks, none failed
  results.py check-cl FILE [--platform WORD]   cl_bench latency output: every test, well-formed
  results.py check-throughput FILE...          cl_bench --throughput output: one THROUGHPUT line each
  results.py summarize DIR --out JSON [--md MD] everything run_bench.sh left in DIR -> JSON + tables

Nothing here compares a figure with a target except `summarize`, which only reports whether each
target is met; no check fails because of a number.
"""
import argparse
import glob
import json
import math
import os
import re
import sys

CL_TESTS = ["write4", "read4", "empty_kernel", "queued_kernels", "write_64m", "read_64m",
            "create_release", "build_warm", "sgemm"]
BANDWIDTH = {"write_64m", "read_64m"}
LABELS = {
    "write4": "4-byte blocking write",
    "read4": "4-byte blocking read",
    "empty_kernel": "empty kernel + clFinish",
    "queued_kernels": "1000 queued tiny kernels, one clFinish (per kernel)",
    "write_64m": "64 MiB write",
    "read_64m": "64 MiB read",
    "create_release": "clCreateBuffer (4 KiB) + release",
    "build_warm": "clBuildProgram, warm cache",
    "sgemm": "SGEMM end to end",
}


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def load_gbench(path):
    with open(path) as f:
        text = f.read()
    # Under `gpup run` other output may precede the JSON document.
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON")
    return json.loads(text[start:])


def parse_lines(path, tag):
    out = []
    with open(path) as f:
        for line in f:
            if line.startswith(tag + " "):
                out.append(json.loads(line[len(tag) + 1:]))
    return out


def check_gbench(path):
    doc = load_gbench(path)
    benches = doc.get("benchmarks")
    if not benches:
        fail(f"{path}: no benchmarks")
    for b in benches:
        if b.get("error_occurred"):
            fail(f"{path}: {b.get('name')} failed: {b.get('error_message')}")
        for key in ("name", "iterations", "real_time", "time_unit"):
            if key not in b:
                fail(f"{path}: {b.get('name')} lacks {key}")
        if not (isinstance(b["real_time"], (int, float)) and math.isfinite(b["real_time"])):
            fail(f"{path}: {b['name']}: real_time is not a number")
    print(f"{path}: {len(benches)} benchmarks")


def check_cl(path, platform=None):
    plat = parse_lines(path, "PLATFORM")
    if len(plat) != 1:
        fail(f"{path}: expected one PLATFORM line, got {len(plat)}")
    if platform and platform.lower() not in plat[0]["platform"].lower():
        fail(f"{path}: platform {plat[0]['platform']!r} is not {platform!r}")
    results = {r["test"]: r for r in parse_lines(path, "RESULT")}
    missing = [t for t in CL_TESTS if t not in results]
    if missing:
        fail(f"{path}: missing tests {missing}")
    for t, r in results.items():
        s = r.get("samples")
        if not isinstance(s, list) or len(s) != r.get("n") or not s:
            fail(f"{path}: {t}: samples do not match n")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in s):
            fail(f"{path}: {t}: a sample is not a non-negative number")
        for key in ("median", "p99", "unit", "bytes"):
            if key not in r:
                fail(f"{path}: {t}: no {key}")
    print(f"{path}: {len(results)} tests on {plat[0]['platform']}")


def check_throughput(paths):
    for p in paths:
        lines = parse_lines(p, "THROUGHPUT")
        if len(lines) != 1:
            fail(f"{p}: expected one THROUGHPUT line, got {len(lines)}")
        t = lines[0]
        if not (t["ops"] >= 0 and t["seconds"] > 0 and t["ops_per_s"] >= 0):
            fail(f"{p}: malformed {t}")
    print(f"{len(paths)} throughput outputs")


def quantile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    i = max(0, math.ceil(q * len(v)) - 1)
    return v[min(i, len(v) - 1)]


def median(values):
    v = sorted(values)
    n = len(v)
    if n == 0:
        return float("nan")
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def gbench_summary(path):
    doc = load_gbench(path)
    out = []
    for b in doc.get("benchmarks", []):
        if b.get("run_type") == "aggregate":
            continue
        e = {"name": b["name"], "real_time": b["real_time"], "time_unit": b["time_unit"],
             "iterations": b["iterations"]}
        for k in ("p50_us", "p99_us", "items_per_second", "bytes_per_second", "label", "error_message"):
            if k in b:
                e[k] = b[k]
        out.append(e)
    return {"context": {k: doc.get("context", {}).get(k) for k in ("date", "num_cpus", "mhz_per_cpu",
                                                                     "library_build_type")},
            "benchmarks": out}


def fmt_time(us):
    if us >= 10000:
        return f"{us / 1000:.1f} ms"
    if us >= 100:
        return f"{us:.0f} µs"
    return f"{us:.2f} µs"


def summarize(d, out_path, md_path):
    meta = {}
    meta_path = os.path.join(d, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    result = {"schema": "gpup-bench/1", "meta": meta, "micro": {}, "opencl": {}, "targets": [],
              "multi_partition": {}}

    for name in ("channel", "protocol", "kmt_fake", "kmt_worker"):
        p = os.path.join(d, f"{name}.json")
        if os.path.exists(p):
            try:
                result["micro"][name] = gbench_summary(p)
            except (ValueError, json.JSONDecodeError) as e:
                result["micro"][name] = {"error": str(e)}

    # A/B rounds: cl_native_<r>.out, cl_guest_<r>.out
    pooled = {"native": {}, "gpup": {}}
    per_round = {"native": {}, "gpup": {}}
    nbytes = {}
    rounds = 0
    for mode, tag in (("native", "native"), ("gpup", "guest")):
        for p in sorted(glob.glob(os.path.join(d, f"cl_{tag}_*.out"))):
            rounds = max(rounds, int(re.search(r"_(\d+)\.out$", p).group(1)))
            for r in parse_lines(p, "RESULT"):
                pooled[mode].setdefault(r["test"], []).extend(r["samples"])
                per_round[mode].setdefault(r["test"], []).append(r["median"])
                nbytes[r["test"]] = r["bytes"]
    for t in CL_TESTS:
        if t not in pooled["native"] or t not in pooled["gpup"]:
            continue
        e = {"label": LABELS[t], "unit": "us", "bytes": nbytes[t]}
        for mode in ("native", "gpup"):
            s = pooled[mode][t]
            e[mode] = {"median": median(s), "p99": quantile(s, 0.99), "n": len(s),
                       "round_medians": per_round[mode][t]}
            if t in BANDWIDTH:
                e[mode]["gb_per_s"] = nbytes[t] / (e[mode]["median"] * 1e-6) / 1e9
        e["ratio"] = e["gpup"]["median"] / e["native"]["median"]
        if t in BANDWIDTH:
            e["bandwidth_ratio"] = e["gpup"]["gb_per_s"] / e["native"]["gb_per_s"]
        # Spread of the ratio over rounds (same-round pairs).
        pairs = list(zip(per_round["native"][t], per_round["gpup"][t]))
        if pairs:
            rr = [g / n for n, g in pairs if n > 0]
            e["round_ratio_min"], e["round_ratio_max"] = min(rr), max(rr)
        result["opencl"][t] = e

    def target(name, test, ok, measured, goal):
        result["targets"].append({"target": name, "test": test, "goal": goal, "measured": measured,
                                  "met": bool(ok)})

    oc = result["opencl"]
    for t in ("write4", "read4", "empty_kernel"):
        if t in oc:
            target(LABELS[t], t, oc[t]["ratio"] <= 1.5, f"{oc[t]['ratio']:.2f}×", "≤ 1.5× native")
    if "queued_kernels" in oc:
        r = oc["queued_kernels"]["ratio"]
        target(LABELS["queued_kernels"], "queued_kernels", r <= 1.3, f"{r:.2f}×", "≤ 1.3× native")
    for t in ("write_64m", "read_64m"):
        if t in oc:
            r = oc[t]["bandwidth_ratio"]
            target(LABELS[t] + " bandwidth", t, r >= 0.8, f"{r:.2f}× native bandwidth", "≥ 0.8× native")
    if "build_warm" in oc:
        dms = (oc["build_warm"]["gpup"]["median"] - oc["build_warm"]["native"]["median"]) / 1000
        target(LABELS["build_warm"], "build_warm", dms <= 10, f"native {dms:+.1f} ms", "≤ native + 10 ms")
    if "sgemm" in oc:
        r = oc["sgemm"]["ratio"]
        target(LABELS["sgemm"], "sgemm", r <= 1.05, f"{r:.3f}×", "≤ 1.05× native")
    ch = result["micro"].get("channel", {}).get("benchmarks", [])
    rt = [b for b in ch if b["name"].startswith("BM_NullRoundTrip/spin_us:20")]
    if rt and "p50_us" in rt[0]:
        p50 = rt[0]["p50_us"]
        target("null channel round trip, both sides awake (median)", "BM_NullRoundTrip/spin_us:20", p50 <= 5,
               f"{p50:.2f} µs", "≤ 5 µs")

    # Multi-partition: mp_<workload>_<mode>_<N>_<i>.out
    mp = {}
    for p in sorted(glob.glob(os.path.join(d, "mp_*.out"))):
        m = re.search(r"mp_([a-z0-9]+)_(native|gpup)_(\d+)_(\d+)\.out$", p)
        if not m:
            continue
        lines = parse_lines(p, "THROUGHPUT")
        wl, mode, n, i = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
        mp.setdefault(wl, {}).setdefault(mode, {}).setdefault(n, {})[i] = lines[0]["ops_per_s"] if lines else None
    for wl, modes in mp.items():
        for mode, by_n in modes.items():
            for n, parts in sorted(by_n.items()):
                rates = [parts.get(i) for i in range(1, n + 1)]
                ok = [r for r in rates if r is not None]
                agg = sum(ok)
                entry = {"processes": n, "completed": len(ok), "aggregate_ops_per_s": agg,
                         "per_process_ops_per_s": rates,
                         "shares": [(r / agg if (r is not None and agg > 0) else None) for r in rates]}
                result["multi_partition"].setdefault(wl, {}).setdefault(mode, []).append(entry)

    for wl, modes in result["multi_partition"].items():
        native_agg = {e["processes"]: e["aggregate_ops_per_s"] for e in modes.get("native", [])}
        for e in modes.get("gpup", []):
            if native_agg.get(e["processes"]):
                e["vs_native_aggregate"] = e["aggregate_ops_per_s"] / native_agg[e["processes"]]

    with open(out_path, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")

    md = []
    md.append(f"A/B rounds: {rounds}; samples pooled over rounds; ratio = gpup median / native median "
              f"(bandwidth: gpup GB/s / native GB/s, and the p99 columns show the bandwidth of the slowest 1 % "
              f"of transfers); range = min–max of the per-round ratios.\n")
    md.append("| test | native median | native p99 | gpup median | gpup p99 | gpup/native | range over rounds |")
    md.append("|---|---|---|---|---|---|---|")
    for t in CL_TESTS:
        if t not in oc:
            continue
        e = oc[t]
        if t in BANDWIDTH:
            # p99 of the time is the slowest 1 %: shown as the bandwidth of that transfer.
            def bw(mode, key):
                return f"{e['bytes'] / (e[mode][key] * 1e-6) / 1e9:.2f} GB/s"
            md.append(f"| {e['label']} | {bw('native', 'median')} | {bw('native', 'p99')} | {bw('gpup', 'median')} "
                      f"| {bw('gpup', 'p99')} | {e['bandwidth_ratio']:.2f}× bandwidth "
                      f"| {1 / e['round_ratio_max']:.2f}–{1 / e['round_ratio_min']:.2f} |")
        else:
            md.append(f"| {e['label']} | {fmt_time(e['native']['median'])} | {fmt_time(e['native']['p99'])} | "
                      f"{fmt_time(e['gpup']['median'])} | {fmt_time(e['gpup']['p99'])} | {e['ratio']:.2f}× | "
                      f"{e['round_ratio_min']:.2f}–{e['round_ratio_max']:.2f} |")
    md.append("\n| target | goal | measured | met |")
    md.append("|---|---|---|---|")
    for t in result["targets"]:
        md.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    md.append("\nMicro-benchmarks (real time per iteration; p50/p99 where measured):\n")
    md.append("| benchmark | host | time | p50 | p99 | rate |")
    md.append("|---|---|---|---|---|---|")
    for group in ("channel", "kmt_fake", "kmt_worker"):
        for b in result["micro"].get(group, {}).get("benchmarks", []):
            rate = ""
            if "bytes_per_second" in b:
                rate = f"{b['bytes_per_second'] / 1e9:.2f} GB/s"
            elif "items_per_second" in b:
                rate = f"{b['items_per_second'] / 1e6:.2f} M msg/s"
            p50 = f"{b['p50_us']:.2f} µs" if "p50_us" in b else ""
            p99 = f"{b['p99_us']:.2f} µs" if "p99_us" in b else ""
            err = f" (skipped: {b['error_message']})" if "error_message" in b else ""
            md.append(f"| {b['name']}{err} | {group} | {b['real_time']:.3g} {b['time_unit']} | {p50} | {p99} | {rate} |")
    prot = result["micro"].get("protocol", {}).get("benchmarks", [])
    if prot:
        md.append("\nCodec (ns per message; request unless noted):\n")
        md.append("| message | encode | decode |")
        md.append("|---|---|---|")
        enc = {b["name"][len("BM_Encode/"):]: b for b in prot if b["name"].startswith("BM_Encode/")}
        dec = {b["name"][len("BM_Decode/"):]: b for b in prot if b["name"].startswith("BM_Decode/")}
        for k in enc:
            if k in dec:
                md.append(f"| {k} | {enc[k]['real_time']:.0f} | {dec[k]['real_time']:.0f} |")
        for b in prot:
            if not b["name"].startswith(("BM_Encode/", "BM_Decode/")):
                rate = f" ({b['bytes_per_second'] / 1e9:.2f} GB/s)" if "bytes_per_second" in b else ""
                md.append(f"| {b['name']} | {b['real_time']:.0f} ns{rate} | |")
    if result["multi_partition"]:
        md.append("\nMulti-partition (each process in its own partition; native = the same number of "
                  "native processes):\n")
        md.append("| workload | mode | N | aggregate ops/s | gpup/native aggregate | per process ops/s | shares |")
        md.append("|---|---|---|---|---|---|---|")
        for wl, modes in result["multi_partition"].items():
            for mode in ("native", "gpup"):
                for e in modes.get(mode, []):
                    per = ", ".join("–" if r is None else f"{r:.1f}" for r in e["per_process_ops_per_s"])
                    sh = ", ".join("–" if s is None else f"{100 * s:.0f}%" for s in e["shares"])
                    rel = ""
                    if "vs_native_aggregate" in e:
                        rel = f"{e['vs_native_aggregate']:.2f}×"
                    md.append(f"| {wl} | {mode} | {e['processes']} | {e['aggregate_ops_per_s']:.1f} | {rel} | {per} "
                              f"| {sh} |")
    text = "\n".join(md) + "\n"
    if md_path:
        with open(md_path, "w") as f:
            f.write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("check-gbench"); a.add_argument("file")
    a = sub.add_parser("check-cl"); a.add_argument("file"); a.add_argument("--platform")
    a = sub.add_parser("check-throughput"); a.add_argument("files", nargs="+")
    a = sub.add_parser("summarize"); a.add_argument("dir"); a.add_argument("--out", required=True)
    a.add_argument("--md")
    args = ap.parse_args()
    if args.cmd == "check-gbench":
        check_gbench(args.file)
    elif args.cmd == "check-cl":
        check_cl(args.file, args.platform)
    elif args.cmd == "check-throughput":
        check_throughput(args.files)
    else:
        summarize(args.dir, args.out, args.md)


if __name__ == "__main__":
    main()
