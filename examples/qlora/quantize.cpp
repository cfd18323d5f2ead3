// qlora quantize IN OUT [--type nf4|fp4|int8] [--blocksize N] [--double-quant|--no-double-quant]
//                        [--include REGEX] [--exclude REGEX]
#include <cstdio>
#include <string>

#include "cli.hpp"
#include "commands.hpp"
#include "qlora/io/quantize_model.hpp"

namespace {
std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}
}  // namespace

const char* quantize_usage =
    "usage: qlora quantize IN OUT [--type nf4|fp4|int8] [--blocksize N] [--no-double-quant]\n"
    "                      [--include REGEX] [--exclude REGEX]\n"
    "  IN, OUT       a .safetensors file, or a Hugging Face model folder (config.json + weights)\n"
    "  --type        nf4 (default), fp4, or int8 (row-wise absmax, LLM.int8 weights)\n"
    "  --blocksize   4-bit block size: 32, 64 (default), 128, ..., 4096\n"
    "  --double-quant / --no-double-quant   8-bit quantized absmax (default on, 4-bit only)\n"
    "  --include     regex: quantize the 2-D floating tensors whose name matches it\n"
    "                (default: names ending in .weight, except embeddings, lm_head and norms)\n"
    "  --exclude     regex: never quantize tensors whose name matches it\n";

int cmd_quantize(int argc, char** argv) {
  const cli::Args a(argc, argv, 2, {"type", "blocksize", "include", "exclude"},
                    {"double-quant", "no-double-quant", "help"});
  if (a.has("help")) {
    std::printf("%s", quantize_usage);
    return 0;
  }
  if (a.positional.size() != 2) {
    std::fprintf(stderr, "%s", quantize_usage);
    qlora::throw_error("quantize takes IN and OUT, got ", a.positional.size(), " positional argument(s)");
  }
  qlora::checkpoint::QuantizeOptions opt;
  opt.format = qlora::checkpoint::parse_format(a.get("type", "nf4"));
  opt.blocksize = a.get_int("blocksize", 64);
  QLORA_CHECK(!(a.has("double-quant") && a.has("no-double-quant")),
              "--double-quant and --no-double-quant contradict each other");
  opt.double_quant = !a.has("no-double-quant");
  opt.include = a.get("include", "");
  opt.exclude = a.get("exclude", "");
  const std::string& in = a.positional[0];
  const std::string& out = a.positional[1];

  std::printf("quantizing %s -> %s (%s", in.c_str(), out.c_str(), qlora::checkpoint::format_name(opt.format));
  if (opt.format != qlora::checkpoint::Format::Int8)
    std::printf(", blocksize %d, double quant %s", opt.blocksize, opt.double_quant ? "on" : "off");
  std::printf(")\n");
  cli::ProgressLine progress("quantize");
  const auto rep = qlora::checkpoint::quantize_model(
      in, out, opt, [&](std::size_t d, std::size_t t, const std::string& n) { progress.update(d, t, n); });

  std::printf("%-56s %-6s %-14s %12s %12s %10s %10s\n", "tensor", "dtype", "shape", "before", "after", "rmse",
              "max err");
  std::size_t nq = 0;
  for (const auto& t : rep.tensors) {
    if (t.quantized) {
      ++nq;
      std::printf("%-56s %-6s %-14s %12s %12s %10.3g %10.3g\n", t.name.c_str(), qlora::dtype_name(t.dtype),
                  shape_str(t.shape).c_str(), cli::human_bytes(double(t.bytes_before)).c_str(),
                  cli::human_bytes(double(t.bytes_after)).c_str(), t.rmse, t.max_abs_err);
    } else {
      std::printf("%-56s %-6s %-14s %12s %12s %10s %10s\n", t.name.c_str(), qlora::dtype_name(t.dtype),
                  shape_str(t.shape).c_str(), cli::human_bytes(double(t.bytes_before)).c_str(), "(kept)", "-",
                  "-");
    }
  }
  std::printf("total: %zu tensors, %zu quantized; %s -> %s (%.2fx smaller)\n", rep.tensors.size(), nq,
              cli::human_bytes(double(rep.bytes_before)).c_str(),
              cli::human_bytes(double(rep.bytes_after)).c_str(),
              rep.bytes_after ? double(rep.bytes_before) / double(rep.bytes_after) : 0.0);
  if (!rep.skipped_linear.empty())
    std::printf("left unquantized by --include/--exclude (listed in llm_int8_skip_modules): %zu weights\n",
                rep.skipped_linear.size());
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
