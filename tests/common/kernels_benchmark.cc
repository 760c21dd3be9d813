// MatMul throughput in weight bytes per second (decode is bound by streaming the weights), for
// Mixtral-like shapes, plus a naive scalar loop on one shape to read off the speed-up.
//
//   ./build/bin/kernels_benchmark --benchmark_counters_tabular=true
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "common/dtype.h"
#include "common/kernels.h"

namespace moe::kernels {
namespace {

struct Problem {
  std::vector<uint8_t> weights;
  std::vector<float> x;
  std::vector<float> y;
  WeightMatrix w;
};

Problem MakeProblem(DType dtype, int64_t rows, int64_t cols, int64_t tokens) {
  Problem p;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const size_t n = static_cast<size_t>(rows * cols);
  p.weights.resize(n * DTypeSize(dtype));
  for (size_t i = 0; i < n; ++i) {
    const float v = dist(rng);
    if (dtype == DType::kF32) {
      std::memcpy(&p.weights[i * 4], &v, 4);
    } else {
      const uint16_t bits = dtype == DType::kBF16 ? F32ToBF16(v) : F32ToF16(v);
      std::memcpy(&p.weights[i * 2], &bits, 2);
    }
  }
  p.x.resize(static_cast<size_t>(tokens * cols));
  for (float& v : p.x) v = dist(rng);
  p.y.resize(static_cast<size_t>(tokens * rows));
  p.w = {.data = p.weights.data(), .dtype = dtype, .rows = rows, .cols = cols, .row_stride = cols};
  return p;
}

// Args: dtype, rows, cols, tokens, threads (0 = OpenMP's default).
void BM_MatMul(benchmark::State& state) {
  const auto dtype = static_cast<DType>(state.range(0));
  const int64_t rows = state.range(1), cols = state.range(2), tokens = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  const int default_threads = omp_get_max_threads();
  if (threads > 0) omp_set_num_threads(threads);
  Problem p = MakeProblem(dtype, rows, cols, tokens);
  for (auto _ : state) {
    MatMul(p.w, p.x.data(), tokens, p.y.data());
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  omp_set_num_threads(default_threads);
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(p.weights.size()));
  state.counters["GFLOPS"] = benchmark::Counter(
      static_cast<double>(2 * rows * cols * tokens) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
  state.SetLabel(std::string(DTypeName(dtype)) + (threads > 0 ? " threads=1" : ""));
}

// The loop one would write without SIMD or threads: scalar BF16 widening, f32 accumulation.
void BM_MatMulNaiveBF16(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), tokens = state.range(2);
  Problem p = MakeProblem(DType::kBF16, rows, cols, tokens);
  const auto* w = reinterpret_cast<const uint16_t*>(p.weights.data());
  for (auto _ : state) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t r = 0; r < rows; ++r) {
        float sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += BF16ToF32(w[r * cols + c]) * p.x[t * cols + c];
        p.y[t * rows + r] = sum;
      }
    }
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(p.weights.size()));
  state.SetLabel("BF16 naive threads=1");
}

void MatMulArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dtype", "rows", "cols", "tokens", "threads"});
  for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (int64_t rows : {2048, 5632}) {
      for (int64_t tokens : {1, 8}) {
        b->Args({static_cast<int64_t>(dtype), rows, 2048, tokens, 0});
      }
    }
  }
  // Single-threaded SIMD, to compare with the naive loop below (and steadier on a shared box).
  for (DType dtype : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (int64_t tokens : {1, 8}) b->Args({static_cast<int64_t>(dtype), 2048, 2048, tokens, 1});
  }
}

BENCHMARK(BM_MatMul)->Apply(MatMulArgs)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MatMulNaiveBF16)
    ->ArgNames({"rows", "cols", "tokens"})
    ->Args({2048, 2048, 1})
    ->Args({2048, 2048, 8})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace moe::kernels

BENCHMARK_MAIN();
