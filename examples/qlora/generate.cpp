// qlora generate --model DIR [--adapter DIR] [--quant ...] --prompt TEXT [--max-new-tokens N]
//                [--temperature T] [--top-k K] [--top-p P] [--seed S]
//
// Prints the prompt, then the continuation token by token as it is chosen (model/sampling.hpp:
// greedy at temperature 0, else seeded sampling as transformers' generate). Stops after
// --max-new-tokens or at the tokenizer's EOS (not printed). Each step recomputes the whole sequence
// (no KV cache), so this is for checking a model, not for speed.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "cli.hpp"
#include "commands.hpp"
#include "model_args.hpp"
#include "qlora/model/sampling.hpp"

const char* generate_usage =
    "usage: qlora generate --model DIR [--adapter DIR] [--quant none|nf4|fp4|int8|bf16] --prompt TEXT\n"
    "                      [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
    "  --model           Hugging Face model folder (config.json + safetensors; tokenizer.json, or\n"
    "                    raw bytes when it has none)\n"
    "  --adapter         PEFT LoRA adapter folder to apply\n"
    "  --quant           base format of the linear layers, quantized on load (default: as stored,\n"
    "                    none, or a bitsandbytes folder's own nf4 / fp4 / int8)\n"
    "  --prompt          the text to continue (BOS first when the tokenizer has one)\n"
    "  --max-new-tokens  default 200\n"
    "  --temperature     0 (default): greedy; > 0: sample from softmax(logits / T)\n"
    "  --top-k           keep the K most likely tokens (default 0: all)\n"
    "  --top-p           keep the most likely tokens up to probability mass P (default 1: all)\n"
    "  --seed            of the sampling generator (default 0); the same seed gives the same text\n";

namespace {
// How many bytes at the start of s are complete UTF-8 characters (or bytes that can never start
// or continue one): a trailing partial character waits for the next token's bytes.
std::size_t complete_utf8_prefix(const std::string& s) {
  const std::size_t n = s.size();
  for (std::size_t back = 1; back <= 3 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back for the lead
    const std::size_t len = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 1;
    return len > back ? n - back : n;
  }
  return n;
}
}  // namespace

int cmd_generate(int argc, char** argv) {
  const cli::Args a(
      argc, argv, 2,
      {"model", "adapter", "quant", "prompt", "max-new-tokens", "temperature", "top-k", "top-p", "seed"},
      {"help"});
  if (a.has("help")) {
    std::printf("%s", generate_usage);
    return 0;
  }
  if (!a.positional.empty()) {
    std::fprintf(stderr, "%s", generate_usage);
    qlora::throw_error("generate takes no positional arguments, got '", a.positional[0], "'");
  }
  QLORA_CHECK(a.has("model"), "--model DIR is required (qlora generate --help)");
  QLORA_CHECK(a.has("prompt"), "--prompt TEXT is required (qlora generate --help)");
  qlora::GenerateOptions opt;
  opt.max_new_tokens = a.get_int("max-new-tokens", 200);
  QLORA_CHECK(opt.max_new_tokens >= 0, "--max-new-tokens must be >= 0, got ", opt.max_new_tokens);
  opt.sampling.temperature = float(cli::get_float(a, "temperature", 0));
  opt.sampling.top_k = a.get_int("top-k", 0);
  opt.sampling.top_p = float(cli::get_float(a, "top-p", 1));
  opt.sampling.seed = cli::get_u64(a, "seed", 0);
  // bad options fail before minutes of loading, with the option's own name
  QLORA_CHECK(opt.sampling.temperature >= 0, "--temperature must be >= 0 (0 = greedy), got ",
              a.get("temperature", ""));
  QLORA_CHECK(opt.sampling.top_k >= 0, "--top-k must be >= 0 (0 = off), got ", opt.sampling.top_k);
  QLORA_CHECK(opt.sampling.top_p > 0 && opt.sampling.top_p <= 1, "--top-p must be in (0, 1] (1 = off), got ",
              a.get("top-p", ""));
  qlora::check_sampling(opt.sampling);
  const std::string dir = a.get("model", ""), adapter = a.get("adapter", ""),
                    quant = a.get("quant", cli::default_quant(dir, "none"));
  const std::string prompt = a.get("prompt", "");

  const std::unique_ptr<cli::Model> loaded = cli::load_model(quant, dir, adapter);
  cli::Model& model = *loaded;
  const cli::AnyTokenizer tok = cli::AnyTokenizer::open(dir, model.config().vocab_size);
  std::vector<std::int64_t> ids;
  if (auto bos = tok.bos_id()) ids.push_back(*bos);
  const std::vector<std::int64_t> body = tok.encode(prompt);
  ids.insert(ids.end(), body.begin(), body.end());
  QLORA_CHECK(!ids.empty(), "--prompt is empty and the tokenizer (", tok.name(),
              ") has no BOS token to start from");
  opt.stop_token = tok.eos_id();
  std::fprintf(stderr, "model %s (%s%s%s), tokenizer %s, prompt %zu tokens; ", dir.c_str(), quant.c_str(),
               adapter.empty() ? "" : ", adapter ", adapter.c_str(), tok.name(), ids.size());
  if (opt.sampling.temperature == 0)
    std::fprintf(stderr, "greedy\n");
  else
    std::fprintf(stderr, "temperature %g, top-k %d, top-p %g, seed %llu\n", double(opt.sampling.temperature),
                 opt.sampling.top_k, double(opt.sampling.top_p),
                 static_cast<unsigned long long>(opt.sampling.seed));

  std::fwrite(prompt.data(), 1, prompt.size(), stdout);
  std::fflush(stdout);
  std::string pending;  // bytes of an unfinished UTF-8 character
  bool stopped = false;
  const auto start = std::chrono::steady_clock::now();
  const auto out = qlora::generate_with(model, ids, opt, [&](std::int64_t id) {
    if (opt.stop_token && id == *opt.stop_token) {
      stopped = true;
      return;
    }
    pending += tok.decode({id});
    const std::size_t n = complete_utf8_prefix(pending);
    std::fwrite(pending.data(), 1, n, stdout);
    std::fflush(stdout);
    pending.erase(0, n);
  });
  std::fwrite(pending.data(), 1, pending.size(), stdout);
  std::printf("\n");
  std::fflush(stdout);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%zu new tokens in %.2f s (%.1f tokens/s)%s\n", out.size(), secs,
               secs > 0 ? double(out.size()) / secs : 0.0, stopped ? ", stopped at EOS" : "");
  return 0;
}
