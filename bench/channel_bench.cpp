// Micro-benchmarks of the channel (src/channel): what one message costs on gpup's VMBus.
//
// Both ends live in this process (two threads over a socketpair, the same handshake a worker
// and a guest run), so the figures are the channel's own: no decoding, no validation, no KMD.
//
//   BM_NullRoundTrip/spin_us   a 24-byte request echoed back (a SYNC call with a null handler).
//                              spin_us 20 is the default (both sides stay awake between
//                              messages); 0 makes every message a doorbell wake-up.
//   BM_AsyncThroughput/bytes   one-way messages (SubmitCommand-like), a batch then one ack.
//   BM_RingBandwidth/bytes     large one-way messages up to the 128 KiB limit: bytes per second
//                              through the rings (the stream transport's bulk path is the same
//                              path with ReadAllocation/WriteAllocation messages).
#include <sys/socket.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>

#include "bench_util.h"
#include "channel/channel.h"

namespace {

using gpup::UniqueFd;
using gpup::channel::Channel;
using gpup::channel::ChannelOptions;

constexpr uint8_t kEcho = 'E';   // answer with the same bytes
constexpr uint8_t kCount = 'C';  // no answer
constexpr uint8_t kAck = 'A';    // answer with one byte (everything before it was received)

struct Pair {
  std::unique_ptr<Channel> guest;
  std::unique_ptr<Channel> host;
  std::thread server;

  explicit Pair(const ChannelOptions& options) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
    auto fut = std::async(std::launch::async,
                          [&] { return gpup::channel::accept_on_socket(UniqueFd(sv[0]), options); });
    auto g = gpup::channel::connect_on_socket(UniqueFd(sv[1]), options);
    auto h = fut.get();
    if (!g || !h) {
      std::fprintf(stderr, "channel setup failed: %s / %s\n", g ? "ok" : g.error().describe().c_str(),
                   h ? "ok" : h.error().describe().c_str());
      std::abort();
    }
    guest = std::move(*g);
    host = std::move(*h);
    server = std::thread([this] { serve(); });
  }
  ~Pair() {
    guest->shutdown();
    host->shutdown();
    server.join();
  }

  void serve() {
    std::vector<uint8_t> msg;
    const uint8_t ack = kAck;
    while (host->receive(msg) == GPUP_STATUS_SUCCESS) {
      if (msg.empty()) continue;
      if (msg[0] == kEcho) {
        if (host->send(std::span<const uint8_t>(msg)) != GPUP_STATUS_SUCCESS) return;
      } else if (msg[0] == kAck) {
        if (host->send(std::span<const uint8_t>(&ack, 1)) != GPUP_STATUS_SUCCESS) return;
      }
    }
  }

  void ack() {
    const uint8_t a = kAck;
    std::vector<uint8_t> reply;
    if (guest->send(std::span<const uint8_t>(&a, 1)) != GPUP_STATUS_SUCCESS ||
        guest->receive(reply) != GPUP_STATUS_SUCCESS)
      std::abort();
  }
};

void BM_NullRoundTrip(benchmark::State& state) {
  ChannelOptions options;
  options.spin_us = static_cast<int>(state.range(0));
  Pair pair(options);
  std::vector<uint8_t> request(24, 0), reply;
  request[0] = kEcho;
  gpup::bench::Latencies lat;
  for (auto _ : state) {
    const uint64_t t0 = gpup::bench::now_ns();
    if (pair.guest->send(std::span<const uint8_t>(request)) != GPUP_STATUS_SUCCESS ||
        pair.guest->receive(reply) != GPUP_STATUS_SUCCESS) {
      state.SkipWithError("channel failed");
      break;
    }
    lat.add(gpup::bench::now_ns() - t0);
  }
  lat.report(state);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_NullRoundTrip)->ArgName("spin_us")->Arg(20)->Arg(0)->UseRealTime();

void BM_AsyncThroughput(benchmark::State& state) {
  constexpr int kBatch = 256;
  Pair pair(ChannelOptions{});
  std::vector<uint8_t> msg(static_cast<size_t>(state.range(0)), 0);
  msg[0] = kCount;
  for (auto _ : state) {
    for (int i = 0; i < kBatch; ++i)
      if (pair.guest->send(std::span<const uint8_t>(msg)) != GPUP_STATUS_SUCCESS) std::abort();
    pair.ack();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  state.SetBytesProcessed(state.iterations() * kBatch * static_cast<int64_t>(msg.size()));
}
BENCHMARK(BM_AsyncThroughput)->ArgName("bytes")->Arg(64)->Arg(512)->UseRealTime();

void BM_RingBandwidth(benchmark::State& state) {
  constexpr int kBatch = 64;
  ChannelOptions options;
  options.ring_bytes = static_cast<size_t>(state.range(1)) << 10;
  Pair pair(options);
  std::vector<uint8_t> msg(static_cast<size_t>(state.range(0)), 0x5a);
  msg[0] = kCount;
  for (auto _ : state) {
    for (int i = 0; i < kBatch; ++i)
      if (pair.guest->send(std::span<const uint8_t>(msg)) != GPUP_STATUS_SUCCESS) std::abort();
    pair.ack();
  }
  state.SetBytesProcessed(state.iterations() * kBatch * static_cast<int64_t>(msg.size()));
}
BENCHMARK(BM_RingBandwidth)
    ->ArgNames({"bytes", "ring_kib"})
    ->Args({4096, 512})
    ->Args({65536, 512})
    ->Args({131072, 512})
    ->Args({131072, 4096})
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
