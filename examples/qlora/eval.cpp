// qlora eval --model DIR [--adapter DIR] [--quant none|nf4|fp4|int8|bf16]
//            (--ids FILE [--logits OUT] | --text FILE [--seq N])
//
// The mean next-token cross-entropy of token sequences, as transformers' model(ids, labels=ids).loss
// over the whole batch: every position but the last of each row predicts the next token, and the
// loss is the mean over all those predictions. Sequences run one at a time (no padding, memory for
// one sequence's activations); "loss: X" is the only line on stdout.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "cli.hpp"
#include "commands.hpp"
#include "model_args.hpp"
#include "qlora/model/cross_entropy.hpp"

const char* eval_usage =
    "usage: qlora eval --model DIR [--adapter DIR] [--quant none|nf4|fp4|int8|bf16]\n"
    "                  (--ids FILE [--logits OUT] | --text FILE [--seq N])\n"
    "  --model    Hugging Face model folder (config.json + safetensors)\n"
    "  --adapter  PEFT LoRA adapter folder to apply\n"
    "  --quant    base format of the linear layers, quantized on load (default: as stored, i.e.\n"
    "             none for a floating checkpoint, a bitsandbytes folder's own nf4 / fp4 / int8)\n"
    "  --ids      safetensors file with tensor 'ids', I64 or I32 [batch, seq]\n"
    "  --logits   write the logits there as tensor 'logits', F32 [batch, seq, vocab]\n"
    "  --text     a text file, tokenized with the model folder's tokenizer (BOS first if it has one)\n"
    "             and cut into windows of --seq tokens (default 256, or\n"
    "             max_position_embeddings when smaller; a last window of 1 token is dropped)\n"
    "Prints 'loss: X' on stdout: the mean next-token cross-entropy over all predicted tokens.\n";

namespace {
std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  QLORA_CHECK(in, "text file '", path, "' cannot be opened");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Sequences {
  std::vector<std::vector<std::int64_t>> rows;
  std::string what;
};

Sequences sequences_of(const cli::Args& a, const cli::Model& model, const std::string& dir) {
  const std::int64_t V = model.config().vocab_size;
  Sequences s;
  if (a.has("ids")) {
    const cli::TokenIds t = cli::read_token_ids(a.get("ids", ""), V);
    for (std::int64_t b = 0; b < t.batch; ++b)
      s.rows.emplace_back(t.ids.begin() + b * t.seq, t.ids.begin() + (b + 1) * t.seq);
    s.what = std::to_string(t.batch) + " sequence(s) of " + std::to_string(t.seq) + " tokens from " +
             a.get("ids", "");
    return s;
  }
  const std::int64_t max_pos = model.config().max_position_embeddings;
  const int seq = a.get_int("seq", int(std::min<std::int64_t>(256, max_pos)));
  QLORA_CHECK(seq >= 2 && seq <= max_pos, "--seq must be in [2, ", max_pos,
              "] (the model's max_position_embeddings), got ", seq);
  const cli::AnyTokenizer tok = cli::AnyTokenizer::open(dir, V);
  // The text's tokens after the tokenizer's bos, if it has one. (Built as one vector: GCC 13's
  // -Warray-bounds misfires on a push_back followed by a range insert.)
  std::vector<std::int64_t> ids = tok.encode(read_text(a.get("text", "")));
  if (auto bos = tok.bos_id()) ids.insert(ids.begin(), *bos);
  for (std::size_t at = 0; at + 1 < ids.size(); at += std::size_t(seq))
    s.rows.emplace_back(ids.begin() + std::ptrdiff_t(at),
                        ids.begin() + std::ptrdiff_t(std::min(ids.size(), at + std::size_t(seq))));
  QLORA_CHECK(!s.rows.empty(), "text file '", a.get("text", ""), "' gives ", ids.size(),
              " token(s), expected at least 2 to predict one");
  s.what = std::to_string(ids.size()) + " tokens (" + tok.name() + ") of " + a.get("text", "") + " in " +
           std::to_string(s.rows.size()) + " window(s) of up to " + std::to_string(seq);
  return s;
}
}  // namespace

int cmd_eval(int argc, char** argv) {
  const cli::Args a(argc, argv, 2, {"model", "adapter", "quant", "ids", "text", "seq", "logits"}, {"help"});
  if (a.has("help")) {
    std::printf("%s", eval_usage);
    return 0;
  }
  if (!a.positional.empty()) {
    std::fprintf(stderr, "%s", eval_usage);
    qlora::throw_error("eval takes no positional arguments, got '", a.positional[0], "'");
  }
  QLORA_CHECK(a.has("model"), "--model DIR is required (qlora eval --help)");
  QLORA_CHECK(a.has("ids") != a.has("text"), "give one of --ids FILE or --text FILE",
              a.has("ids") ? ", not both" : "");
  QLORA_CHECK(!a.has("logits") || a.has("ids"), "--logits needs --ids (--text windows differ in length)");
  QLORA_CHECK(!a.has("seq") || a.has("text"), "--seq applies to --text only");
  const std::string dir = a.get("model", ""), adapter = a.get("adapter", ""),
                    quant = a.get("quant", cli::default_quant(dir, "none"));

  const std::unique_ptr<cli::Model> loaded = cli::load_model(quant, dir, adapter);
  cli::Model& model = *loaded;
  const std::int64_t V = model.config().vocab_size;
  const Sequences s = sequences_of(a, model, dir);
  std::fprintf(stderr, "model %s (%s%s%s), vocab %lld; %s\n", dir.c_str(), quant.c_str(),
               adapter.empty() ? "" : ", adapter ", adapter.c_str(), static_cast<long long>(V),
               s.what.c_str());

  const bool keep = a.has("logits");
  std::vector<float> all;  // (batch, seq, V) with --logits
  if (keep) all.reserve(s.rows.size() * s.rows[0].size() * std::size_t(V));
  double total = 0;  // sum over predicted tokens of -log p
  std::int64_t count = 0;
  cli::ProgressLine progress("eval");
  for (std::size_t b = 0; b < s.rows.size(); ++b) {
    const auto& row = s.rows[b];
    const std::int64_t T = std::int64_t(row.size());
    const std::vector<float> z = model.logits(row.data(), 1, T);  // (T, V)
    // labels = ids: each row's mean times its T - 1 targets gives the batch mean over all targets
    total += double(qlora::causal_lm_loss(z.data(), row.data(), 1, T, V, nullptr)) * double(T - 1);
    count += T - 1;
    if (keep) all.insert(all.end(), z.begin(), z.end());
    if (s.rows.size() > 1) progress.update(b + 1, s.rows.size(), "sequence " + std::to_string(b + 1));
  }
  const double loss = total / double(count);
  std::printf("loss: %.6f\n", loss);
  std::fflush(stdout);
  std::fprintf(stderr, "%lld predicted tokens, perplexity %.4g\n", static_cast<long long>(count),
               std::exp(loss));
  if (keep) {
    const std::string out = a.get("logits", "");
    qlora::safetensors::Writer w;
    w.add("logits", qlora::DType::F32, {std::int64_t(s.rows.size()), std::int64_t(s.rows[0].size()), V},
          all.data(), all.size() * sizeof(float));
    w.write(out);
    std::fprintf(stderr, "wrote logits [%zu, %zu, %lld] to %s\n", s.rows.size(), s.rows[0].size(),
                 static_cast<long long>(V), out.c_str());
  }
  return 0;
}
