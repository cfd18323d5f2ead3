// qlora merge --model DIR --adapter DIR --out DIR [--quant Q] [--dtype f32|bf16|f16]
//                                                 [--requantize nf4|fp4|int8 --requantized-out DIR]
// A PEFT adapter folded into the weights: every adapted projection becomes W0 + (alpha/r)·B·A,
// stored dense. With --quant nf4 (the base a QLoRA adapter was trained on), W0 is the dequantized
// 4-bit weight, so the merged folder computes what the QLoRA model computed. --requantize then
// quantizes the merged folder again (as `qlora quantize` would) and prints the error that adds.
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>

#include "cli.hpp"
#include "commands.hpp"
#include "model_args.hpp"
#include "qlora/io/quantize_model.hpp"

const char* merge_usage =
    "usage: qlora merge --model DIR --adapter DIR --out DIR [options]\n"
    "  --quant none        the base the adapter was trained on: none (fp32), nf4, fp4, int8, bf16;\n"
    "                      default none, or a bitsandbytes folder's own format; a quantized base is\n"
    "                      dequantized before B·A is added\n"
    "  --dtype f32         dtype of the merged weights: f32 (default), bf16 or f16\n"
    "  --requantize nf4    also write the merged model quantized (nf4, fp4 or int8, blocksize 64 with\n"
    "                      double quantization for 4-bit) to --requantized-out, with its error report\n";

int cmd_merge(int argc, char** argv) {
  const cli::Args a(argc, argv, 2,
                    {"model", "adapter", "out", "quant", "dtype", "requantize", "requantized-out"}, {"help"});
  if (a.has("help")) {
    std::printf("%s", merge_usage);
    return 0;
  }
  for (const char* k : {"model", "adapter", "out"})
    QLORA_CHECK(a.has(k), "--", k, " DIR is needed (see qlora merge --help)");
  QLORA_CHECK(a.has("requantize") == a.has("requantized-out"),
              "--requantize and --requantized-out go together (the format and the folder to write)");
  const std::string dtype = a.get("dtype", "f32");
  QLORA_CHECK(dtype == "f32" || dtype == "bf16" || dtype == "f16", "--dtype must be f32, bf16 or f16, got '",
              dtype, "'");
  const std::string model = a.get("model", ""), adapter = a.get("adapter", ""), out = a.get("out", "");
  const std::string quant = a.get("quant", cli::default_quant(model, "none"));
  {
    cli::ModelSpec spec;
    spec.dir = model;
    spec.adapter = adapter;
    const std::unique_ptr<cli::Model> m = cli::open_model(quant, spec);
    const std::size_t n = cli::param_count(m->params());
    std::printf("merging %s (%zu LoRA parameters) into %s (base %s) -> %s (%s)\n", adapter.c_str(), n,
                model.c_str(), quant.c_str(), out.c_str(), dtype.c_str());
    m->save(out, dtype == "f32"    ? qlora::DType::F32
                 : dtype == "bf16" ? qlora::DType::BF16
                                   : qlora::DType::F16);
  }  // the model is freed before requantizing reads the merged folder
  std::printf("wrote %s\n", out.c_str());
  if (a.has("requantize")) {
    qlora::checkpoint::QuantizeOptions opt;
    opt.format = qlora::checkpoint::parse_format(a.get("requantize", ""));
    const std::string rq = a.get("requantized-out", "");
    const auto rep = qlora::checkpoint::quantize_model(out, rq, opt);
    double sse = 0, n = 0, worst = 0;
    std::string worst_name;
    for (const auto& t : rep.tensors) {
      if (!t.quantized) continue;
      std::size_t k = 1;
      for (auto d : t.shape) k *= std::size_t(d);
      sse += t.rmse * t.rmse * double(k);
      n += double(k);
      if (t.rmse > worst) {
        worst = t.rmse;
        worst_name = t.name;
      }
    }
    std::printf(
        "requantized to %s -> %s: %s -> %s; error the requantization adds: RMSE %.4g over %.0f weights "
        "(worst tensor %s, RMSE %.4g)\n",
        a.get("requantize", "").c_str(), rq.c_str(), cli::human_bytes(double(rep.bytes_before)).c_str(),
        cli::human_bytes(double(rep.bytes_after)).c_str(), n ? std::sqrt(sse / n) : 0.0, n,
        worst_name.c_str(), worst);
  }
  return 0;
}
