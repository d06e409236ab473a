// Micro-benchmarks of the wire codec (src/protocol): encode and decode cost per message type,
// and the command-buffer path (writing a Dispatch record in the guest, walking and parsing it on
// the host).
//
//   BM_Encode/<Op>/<request|reply|notify>   encode_raw of the fixed part (no tail) and the
//                                           gather into one contiguous message, as send() does
//   BM_Decode/<Op>/<...>                    decode() of that message in the direction it travels
//   BM_SubmitDecode/bytes                   decode of a SubmitCommand carrying a command buffer
//   BM_CommandWrite/args, BM_CommandParse/args   one Dispatch record with N buffer/value arguments
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.h"
#include "gpup/ddi.h"
#include "protocol/codec.h"

namespace {

using namespace gpup::proto;

struct Variant {
  const OpInfo* info;
  bool reply;
  Direction dir;
  const char* what;
};

std::vector<uint8_t> gather(const Encoded& e) {
  std::vector<uint8_t> out;
  out.reserve(e.size());
  for (auto p : e.parts()) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Encoded encode_variant(const Variant& v, const std::vector<uint8_t>& fixed) {
  auto enc = encode_raw(v.info->op, v.reply ? kFlagReply : 0, v.info->kind == Kind::SYNC ? 7 : 0, 0, fixed,
                        false, {});
  if (!enc) std::abort();
  return *enc;
}

void register_codec_benchmarks() {
  size_t n = 0;
  const OpInfo* ops = all_ops(&n);
  for (size_t i = 0; i < n; ++i) {
    const OpInfo* info = &ops[i];
    std::vector<Variant> variants;
    if (info->kind == Kind::NOTIFY) {
      variants.push_back({info, false, Direction::kHostToGuest, "notify"});
    } else {
      variants.push_back({info, false, Direction::kGuestToHost, "request"});
      if (info->kind == Kind::SYNC) variants.push_back({info, true, Direction::kHostToGuest, "reply"});
    }
    for (const Variant& v : variants) {
      const std::string suffix = std::string(info->name) + "/" + v.what;
      benchmark::RegisterBenchmark(("BM_Encode/" + suffix).c_str(), [v](benchmark::State& state) {
        std::vector<uint8_t> fixed(v.reply ? v.info->reply_size : v.info->request_size, 0);
        uint64_t txn = 1;
        for (auto _ : state) {
          auto enc = encode_raw(v.info->op, v.reply ? kFlagReply : 0, v.info->kind == Kind::SYNC ? txn++ : 0, 0,
                                fixed, false, {});
          auto bytes = gather(*enc);
          benchmark::DoNotOptimize(bytes.data());
        }
      });
      benchmark::RegisterBenchmark(("BM_Decode/" + suffix).c_str(), [v](benchmark::State& state) {
        std::vector<uint8_t> fixed(v.reply ? v.info->reply_size : v.info->request_size, 0);
        const auto bytes = gather(encode_variant(v, fixed));
        for (auto _ : state) {
          auto m = decode(bytes, v.dir);
          if (!m) {
            state.SkipWithError(m.error().message.c_str());
            break;
          }
          benchmark::DoNotOptimize(m->fixed.data());
        }
      });
    }
  }
}

// A Dispatch with `nargs` arguments: half buffers, half 4-byte values (what clSetKernelArg gives).
void write_dispatch(CommandWriter& w, int nargs) {
  static const uint32_t value = 42;
  std::vector<CommandWriter::Arg> args(static_cast<size_t>(nargs));
  for (int i = 0; i < nargs; ++i) {
    auto& a = args[static_cast<size_t>(i)];
    if (i % 2 == 0) {
      a.kind = GPUPDDI_ARG_BUFFER;
      a.va = 0x100000000ull + static_cast<uint64_t>(i) * 0x10000;
      a.range = 4096;
    } else {
      a.kind = GPUPDDI_ARG_VALUE;
      a.size = sizeof value;
      a.value = &value;
    }
  }
  const uint64_t off[3] = {0, 0, 0}, global[3] = {1024, 1, 1}, local[3] = {64, 1, 1};
  if (!w.dispatch(1, "saxpy", 1, off, global, local, args)) std::abort();
}

void BM_CommandWrite(benchmark::State& state) {
  CommandWriter w;
  for (auto _ : state) {
    w.clear();
    write_dispatch(w, static_cast<int>(state.range(0)));
    w.signal(3, 1);
    benchmark::DoNotOptimize(w.bytes().data());
  }
}
BENCHMARK(BM_CommandWrite)->ArgName("args")->Arg(0)->Arg(4)->Arg(16);

void BM_CommandParse(benchmark::State& state) {
  CommandWriter w;
  write_dispatch(w, static_cast<int>(state.range(0)));
  w.signal(3, 1);
  const std::vector<uint8_t> buf(w.bytes().begin(), w.bytes().end());
  for (auto _ : state) {
    CommandReader r(buf);
    CommandView v;
    for (;;) {
      auto more = r.next(v);
      if (!more) std::abort();
      if (!*more) break;
      if (v.op == CommandOp::Dispatch) {
        auto d = parse_dispatch(v);
        if (!d) std::abort();
        benchmark::DoNotOptimize(d->args.data());
      }
    }
  }
}
BENCHMARK(BM_CommandParse)->ArgName("args")->Arg(0)->Arg(4)->Arg(16);

// SubmitCommand as the host receives it: header check plus a walk over every record.
void BM_SubmitDecode(benchmark::State& state) {
  CommandWriter w;
  while (w.size() + 256 < static_cast<size_t>(state.range(0))) write_dispatch(w, 4);
  w.signal(3, 1);
  SubmitCommandRequest req{};
  auto enc = encode_request(req, 0, w.bytes());
  if (!enc) std::abort();
  const auto bytes = gather(*enc);
  for (auto _ : state) {
    auto m = decode(bytes, Direction::kGuestToHost);
    if (!m) std::abort();
    CommandReader r(m->tail);
    CommandView v;
    size_t records = 0;
    for (;;) {
      auto more = r.next(v);
      if (!more) std::abort();
      if (!*more) break;
      if (v.op == CommandOp::Dispatch && !parse_dispatch(v)) std::abort();
      ++records;
    }
    benchmark::DoNotOptimize(records);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes.size()));
}
BENCHMARK(BM_SubmitDecode)->ArgName("bytes")->Arg(1024)->Arg(64 * 1024);

}  // namespace

int main(int argc, char** argv) {
  register_codec_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
