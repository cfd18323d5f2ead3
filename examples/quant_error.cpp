// qlora_quant_error: how much each quantization format loses on LLM-like weights.
//
// Quantizes a 4096x4096 fp32 matrix of N(0, 0.02) values (fixed seed, so every run prints the same
// table with this standard library) with every format and blocksize, dequantizes it back to fp32
// and prints Markdown tables of the error, plus a smaller table on a heavy-tailed (Student-t, 3
// degrees of freedom) matrix of the same standard deviation, where the per-block absmax is set by
// outliers and the other values of the block lose resolution.
//
// Bits per weight count everything a checkpoint stores besides the codes: the fp32 absmax per block
// without double quant; with it, one 8-bit code per block, one fp32 absmax2 per 256 blocks and the
// fp32 offset; for row-wise int8, one fp32 scale per row.
//
// Usage: qlora_quant_error [--threads N] [--seed S]   (threads default: QLORA_NUM_THREADS, else all)
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/parallel.hpp"
#include "qlora/quant/blockwise4bit.hpp"
#include "qlora/quant/blockwise8bit.hpp"
#include "qlora/quant/rowwise_int8.hpp"

namespace {

namespace quant = qlora::quant;

constexpr std::int64_t kRows = 4096, kCols = 4096;

struct Row {
  std::string format;
  std::string blocksize;
  bool dq = false;
  double bits_per_weight = 0, rmse = 0, max_abs = 0, rel_rmse = 0;
};

double stddev(const std::vector<float>& x) {
  double sum = 0, sq = 0;
  for (float v : x) sum += v;
  const double mean = sum / double(x.size());
  for (float v : x) sq += (v - mean) * (v - mean);
  return std::sqrt(sq / double(x.size()));
}

// Fills rmse, max_abs and rel_rmse of `row` from the original and the round-tripped values.
void measure(const std::vector<float>& x, const std::vector<float>& y, double sd, Row& row) {
  double sq = 0, mx = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double d = double(x[i]) - double(y[i]);
    sq += d * d;
    mx = std::max(mx, std::fabs(d));
  }
  row.rmse = std::sqrt(sq / double(x.size()));
  row.max_abs = mx;
  row.rel_rmse = row.rmse / sd;
}

Row run_4bit(const std::vector<float>& x, double sd, quant::Quant4Type type, int bs, bool dq) {
  const auto q = quant::quantize_4bit(x.data(), {kRows, kCols}, {type, bs, dq});
  std::size_t stored_bytes = q.packed.size();
  if (dq)
    stored_bytes += q.nested.codes.size() + q.nested.absmax.size() * sizeof(float) + sizeof(float);
  else
    stored_bytes += q.absmax.size() * sizeof(float);
  std::vector<float> y(x.size());
  quant::dequantize(q, y.data());
  Row r{quant::quant4_name(type), std::to_string(bs), dq, 8.0 * double(stored_bytes) / double(x.size())};
  measure(x, y, sd, r);
  return r;
}

Row run_8bit(const std::vector<float>& x, double sd, int bs) {
  const auto q = quant::quantize_blockwise8(x.data(), x.size(), bs);
  std::vector<float> y(x.size());
  quant::dequantize(q, y.data());
  const std::size_t stored_bytes = q.codes.size() + q.absmax.size() * sizeof(float);
  Row r{"blockwise8", std::to_string(bs), false, 8.0 * double(stored_bytes) / double(x.size())};
  measure(x, y, sd, r);
  return r;
}

Row run_rowwise(const std::vector<float>& x, double sd) {
  const auto q = quant::quantize_rowwise_int8(x.data(), kRows, kCols);
  std::vector<float> y(x.size());
  quant::dequantize(q, y.data());
  const std::size_t stored_bytes = q.q.size() + q.scb.size() * sizeof(float);
  Row r{"rowwise_int8", "row (" + std::to_string(kCols) + ")", false,
        8.0 * double(stored_bytes) / double(x.size())};
  measure(x, y, sd, r);
  return r;
}

void print_table(const std::vector<Row>& rows) {
  std::printf("| format | blocksize | dq | bits/weight | RMSE | max abs error | RMSE / std |\n");
  std::printf("|---|---:|:---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows)
    std::printf("| %s | %s | %s | %.4f | %.3e | %.3e | %.4f |\n", r.format.c_str(), r.blocksize.c_str(),
                r.dq ? "yes" : "no", r.bits_per_weight, r.rmse, r.max_abs, r.rel_rmse);
}

int parse_int(const std::string& flag, const char* value) {
  if (!value) qlora::throw_error(flag, " needs a value");
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value, &end, 10);
  QLORA_CHECK(*value && *end == '\0' && errno == 0 && v >= 0 && v <= 1 << 20, flag,
              " must be a non-negative integer, got \"", value, "\"");
  return int(v);
}

const char* kUsage =
    "usage: qlora_quant_error [--threads N] [--seed S]\n"
    "  Prints Markdown tables of the quantization error (RMSE, max abs error, RMSE / std, bits per\n"
    "  weight) of NF4, FP4, 8-bit blockwise and row-wise int8 on a 4096x4096 N(0, 0.02) matrix and\n"
    "  on a Student-t (3 dof) matrix of the same std.\n"
    "  --threads N  threads for the quantizers (default: QLORA_NUM_THREADS, else every core)\n"
    "  --seed S     random seed (default 0)\n";

}  // namespace

int main(int argc, char** argv) {
  try {
    unsigned seed = 0;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        std::fputs(kUsage, stdout);
        return 0;
      } else if (a == "--threads") {
        const int n = parse_int(a, i + 1 < argc ? argv[++i] : nullptr);
        QLORA_CHECK(n >= 1, "--threads must be at least 1, got ", n);
        qlora::set_num_threads(n);
      } else if (a == "--seed") {
        seed = unsigned(parse_int(a, i + 1 < argc ? argv[++i] : nullptr));
      } else {
        qlora::throw_error("unknown argument \"", a, "\" (see --help)");
      }
    }

    const std::size_t n = std::size_t(kRows * kCols);
    std::vector<float> x(n);
    std::mt19937_64 rng(seed);
    {
      std::normal_distribution<float> dist(0.0f, 0.02f);
      for (float& v : x) v = dist(rng);
    }
    const double sd = stddev(x);
    std::printf("## Gaussian N(0, 0.02), %lldx%lld, seed %u (sample std %.6f), threads: %d\n\n",
                static_cast<long long>(kRows), static_cast<long long>(kCols), seed, sd, qlora::num_threads());
    std::vector<Row> rows;
    for (auto type : {quant::Quant4Type::NF4, quant::Quant4Type::FP4})
      for (int bs : {32, 64, 128, 256, 1024, 4096})
        for (bool dq : {false, true}) rows.push_back(run_4bit(x, sd, type, bs, dq));
    rows.push_back(run_8bit(x, sd, 256));
    rows.push_back(run_8bit(x, sd, 4096));
    rows.push_back(run_rowwise(x, sd));
    print_table(rows);

    // Student-t with 3 degrees of freedom has variance 3; scale it to the Gaussian's std of 0.02.
    {
      std::student_t_distribution<float> dist(3.0f);
      const float scale = 0.02f / std::sqrt(3.0f);
      for (float& v : x) v = dist(rng) * scale;
    }
    const double sd_t = stddev(x);
    float peak = 0.0f;
    for (float v : x) peak = std::max(peak, std::fabs(v));
    std::printf("\n## Student-t (3 dof) scaled to std 0.02, %lldx%lld (sample std %.6f, max |x| %.4f)\n\n",
                static_cast<long long>(kRows), static_cast<long long>(kCols), sd_t, double(peak));
    rows.clear();
    for (auto type : {quant::Quant4Type::NF4, quant::Quant4Type::FP4})
      for (bool dq : {false, true}) rows.push_back(run_4bit(x, sd_t, type, 64, dq));
    rows.push_back(run_8bit(x, sd_t, 256));
    rows.push_back(run_rowwise(x, sd_t));
    print_table(rows);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
