// Small helpers shared by gpup's micro-benchmarks: per-iteration latency samples reported as
// median and p99 counters (Google Benchmark itself only reports means).
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace gpup::bench {

inline uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// Collects one latency per iteration; report() adds p50_us and p99_us counters.
class Latencies {
 public:
  explicit Latencies(size_t reserve = 1 << 16) { ns_.reserve(reserve); }
  void add(uint64_t ns) { ns_.push_back(ns); }
  void report(benchmark::State& state) {
    if (ns_.empty()) return;
    std::sort(ns_.begin(), ns_.end());
    auto at = [&](double q) {
      size_t i = static_cast<size_t>(q * static_cast<double>(ns_.size() - 1) + 0.5);
      return static_cast<double>(ns_[std::min(i, ns_.size() - 1)]) / 1000.0;
    };
    state.counters["p50_us"] = at(0.50);
    state.counters["p99_us"] = at(0.99);
  }

 private:
  std::vector<uint64_t> ns_;
};

}  // namespace gpup::bench
