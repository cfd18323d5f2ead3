// qlora finetune: LoRA / QLoRA fine-tuning of a Llama-architecture Hugging Face folder on a text
// file, saving a PEFT adapter. qlora pretrain: all weights of an fp32 model trained on text (how
// the embedded demo model was made). The loop itself is train_loop.hpp.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "commands.hpp"
#include "model.hpp"
#include "model_args.hpp"
#include "qlora/io/peft_adapter.hpp"
#include "qlora/text/corpus.hpp"
#include "train_loop.hpp"

const char* finetune_usage =
    "usage: qlora finetune --model DIR --data FILE[,FILE...] [options]\n"
    "  --model DIR          a Llama-architecture Hugging Face folder (config.json + safetensors)\n"
    "  --data FILES         training text, comma-separated files (fortune files are cut at '%' lines,\n"
    "                       other text at blank lines); --val-fraction of the documents is held out\n"
    "  --eval-data FILES    more held-out text, reported beside the held-out loss (e.g. the old corpus)\n"
    "  --target LIST        modules with LoRA: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj\n"
    "                       or all-linear (default q_proj,v_proj)\n"
    "  --r 8 --alpha 16 --dropout 0.05    LoRA rank, alpha (scale alpha/r), dropout on the LoRA input\n"
    "  --quant nf4          base weights: nf4 (QLoRA, default), fp4, int8, bf16 or none (fp32)\n"
    "  --lr 2e-4 --warmup 10 --weight-decay 0 --max-grad-norm 1   AdamW, warmup then cosine decay\n"
    "  --steps 200 --batch 8 --accum 1 --seq 128   optimizer steps; sequences per micro-batch;\n"
    "                       micro-batches per step; tokens per sequence\n"
    "  --eval-every 50 --eval-windows 32 --val-fraction 0.1 --checkpoint-every 50 --log-every 10\n"
    "  --seed 0             batches, LoRA init and dropout masks\n"
    "  --out DIR            the adapter (adapter_config.json + adapter_model.safetensors), loss.csv,\n"
    "                       loss.png; checkpoint/ while training (default: adapter)\n"
    "  --resume DIR         continue the interrupted run whose --out was DIR\n"
    "  --stop-after N       stop after step N with a checkpoint, as an interrupted run would\n"
    "  --device cpu         cpu, or cuda (LoRA on the GPU, with checkpoints and --resume; no\n"
    "                       --gradient-checkpointing or --profile there yet)\n"
    "  --gradient-checkpointing   keep only each layer's input, recompute the layer in backward\n"
    "                       (far less memory, about one more forward per step)\n"
    "  --profile            print where a step's time goes (base matmul, LoRA, attention, ...)\n";

const char* pretrain_usage =
    "usage: qlora pretrain --model INIT_DIR --data FILE[,FILE...] --out DIR [options]\n"
    "  trains every weight of an fp32 Llama-architecture folder (e.g. from qlora_make_toy) on text\n"
    "  and writes the result as a Hugging Face folder. Options as finetune (no LoRA options), plus\n"
    "  --dtype f32|bf16 (default bf16) for the saved weights; defaults --lr 1e-3 --warmup 50;\n"
    "  --gradient-checkpointing as finetune.\n";

namespace {

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::size_t b = 0;
  while (b <= s.size()) {
    std::size_t e = s.find(',', b);
    if (e == std::string::npos) e = s.size();
    if (e > b) out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return out;
}

std::string base_name(const std::string& p) {
  const std::size_t s = p.find_last_of('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

const std::vector<std::string> kLoopFlags = {
    "model",        "data",          "eval-data",    "lr",           "warmup",
    "weight-decay", "max-grad-norm", "steps",        "batch",        "accum",
    "seq",          "eval-every",    "eval-windows", "val-fraction", "checkpoint-every",
    "log-every",    "stop-after",    "seed",         "out",          "resume",
    "device"};

struct Data {
  std::vector<std::int64_t> train;
  std::vector<cli::EvalSet> evals;
};

// Reads --data / --eval-data with the model's tokenizer; prints what it found.
Data read_data(const cli::Args& a, const cli::AnyTokenizer& tok, std::int64_t seq, std::int64_t windows,
               std::uint64_t seed) {
  QLORA_CHECK(a.has("data"), "--data FILE is needed (the text to train on)");
  const double val_fraction = cli::get_float(a, "val-fraction", 0.1);
  Data d;
  std::vector<std::int64_t> val;
  std::size_t docs = 0, vdocs = 0;
  for (const std::string& f : split_list(a.get("data", ""))) {
    const auto s = qlora::text::Corpus::split(
        qlora::text::read_text_file(f), [&](const std::string& t) { return tok.encode(t); }, val_fraction,
        seed);
    d.train.insert(d.train.end(), s.train.begin(), s.train.end());
    val.insert(val.end(), s.val.begin(), s.val.end());
    docs += s.train_docs;
    vdocs += s.val_docs;
  }
  std::fprintf(stderr, "data: %zu documents, %zu tokens for training; %zu documents, %zu tokens held out\n",
               docs, d.train.size(), vdocs, val.size());
  QLORA_CHECK(std::int64_t(d.train.size()) > seq, "--data: ", d.train.size(),
              " training tokens, fewer than one --seq window of ", seq);
  if (std::int64_t(val.size()) >= seq)
    d.evals.push_back({"held-out", qlora::text::Corpus::eval_windows(val, seq, windows)});
  for (const std::string& f : split_list(a.get("eval-data", ""))) {
    const auto s = qlora::text::Corpus::split(
        qlora::text::read_text_file(f), [&](const std::string& t) { return tok.encode(t); }, 0.0, seed);
    QLORA_CHECK(std::int64_t(s.train.size()) >= seq, "--eval-data '", f, "': ", s.train.size(),
                " tokens, fewer than one --seq window of ", seq);
    // the middle of the file, not its first entries, which are often not typical of it
    std::vector<std::int64_t> mid(s.train.begin() + std::ptrdiff_t(s.train.size() / 3), s.train.end());
    if (std::int64_t(mid.size()) < seq * windows) mid = s.train;
    d.evals.push_back({base_name(f), qlora::text::Corpus::eval_windows(mid, seq, windows)});
  }
  return d;
}

cli::TrainOptions loop_options(const cli::Args& a, const char* default_out) {
  cli::TrainOptions o;
  o.steps = a.get_int("steps", 200);
  o.batch = a.get_int("batch", 8);
  o.accum = a.get_int("accum", 1);
  o.seq = a.get_int("seq", 128);
  o.eval_every = a.get_int("eval-every", 50);
  o.eval_windows = a.get_int("eval-windows", 32);
  o.checkpoint_every = a.get_int("checkpoint-every", 50);
  o.log_every = std::max(1, a.get_int("log-every", 10));
  o.seed = cli::get_u64(a, "seed", 0);
  o.stop_after = a.get_int("stop-after", 0);
  o.out = a.get("out", default_out);
  QLORA_CHECK(!a.has("resume") || !a.has("out") || a.get("resume", "") == o.out, "--resume '",
              a.get("resume", ""),
              "' continues the run in that folder, so --out must be the same folder (or left out), got '",
              o.out, "'");
  if (a.has("resume")) o.out = a.get("resume", "");
  return o;
}

qlora::optim::AdamWConfig adam_options(const cli::Args& a, const cli::TrainOptions& o, double lr,
                                       std::int64_t warmup) {
  qlora::optim::AdamWConfig c;
  c.lr = cli::get_float(a, "lr", lr);
  c.weight_decay = cli::get_float(a, "weight-decay", 0.0);
  c.max_grad_norm = cli::get_float(a, "max-grad-norm", 1.0);
  c.grad_accum_steps = o.accum;
  c.schedule.kind = qlora::optim::ScheduleKind::Cosine;
  c.schedule.warmup_steps = std::min<std::int64_t>(a.get_int("warmup", int(warmup)), o.steps);
  c.schedule.total_steps = o.steps;
  c.schedule.min_lr_ratio = 0.1;
  return c;
}

// Whether --device is cuda (finetune only: pretrain trains all weights, which the GPU model does not).
bool check_device(const cli::Args& a, bool cuda_ok) {
  const std::string dev = a.get("device", "cpu");
  QLORA_CHECK(dev == "cpu" || dev == "cuda", "--device must be cpu or cuda, got '", dev, "'");
  QLORA_CHECK(
      dev == "cpu" || cuda_ok,
      "--device cuda: full-parameter training (pretrain) is not implemented on the GPU; use --device cpu");
  return dev == "cuda";
}

void print_losses(const char* when, cli::Model& m, const std::vector<cli::EvalSet>& evals, std::int64_t seq) {
  for (const cli::EvalSet& e : evals)
    std::printf("%s: %s loss %.4f (%lld windows of %lld tokens)\n", when, e.name.c_str(),
                cli::eval_loss(m, e.windows, seq), (long long)(e.windows.size() / std::size_t(seq)),
                (long long)seq);
  std::fflush(stdout);
}

// --profile: the model's phase times over the steps this run made, per step and in percent.
void print_phase_times(const cli::Model& m, const cli::TrainOptions& o, std::int64_t steps) {
  const auto t = m.phase_times();
  const double total = t.total(), per = total / double(std::max<std::int64_t>(steps, 1));
  const double tokens = double(steps) * double(o.batch * o.accum * o.seq);
  auto pct = [&](double x) { return total > 0 ? 100.0 * x / total : 0.0; };
  std::printf(
      "profile: %lld steps, %.3f s/step (forward + loss + backward), %.0f tok/s; base matmul %.1f%%, "
      "LoRA %.1f%%, attention %.1f%%, lm_head %.1f%%, rest %.1f%%\n",
      (long long)steps, per, total > 0 ? tokens / total : 0.0, pct(t.base_matmul), pct(t.lora),
      pct(t.attention), pct(t.lm_head), pct(t.rest));
}

}  // namespace

int cmd_finetune(int argc, char** argv) {
  std::vector<std::string> flags = kLoopFlags;
  for (const char* f : {"target", "r", "alpha", "dropout", "quant"}) flags.push_back(f);
  const cli::Args a(argc, argv, 2, flags, {"help", "gradient-checkpointing", "profile"});
  if (a.has("help")) {
    std::printf("%s", finetune_usage);
    return 0;
  }
  QLORA_CHECK(a.positional.empty(), "finetune takes only options, got '",
              a.positional.empty() ? "" : a.positional[0], "' (see qlora finetune --help)");
  QLORA_CHECK(a.has("model"), "--model DIR is needed (see qlora finetune --help)");
  const bool cuda = check_device(a, true);
  QLORA_CHECK(!cuda || !a.has("gradient-checkpointing"),
              "--device cuda: --gradient-checkpointing is not implemented on the GPU yet");
  QLORA_CHECK(!cuda || !a.has("profile"), "--device cuda: --profile is CPU-only");
  const std::string model_dir = a.get("model", "");
  const cli::TrainOptions o = loop_options(a, "adapter");
  if (a.has("resume")) cli::TrainLoop::check_resumable(o.out);
  const std::string quant = a.get("quant", cli::default_quant(model_dir, "nf4"));
  cli::check_quant(quant);  // a bad --quant is the first error, before the LoRA options'
  qlora::LlamaLoraOptions lo;
  std::string target = a.get("target", "q_proj,v_proj");
  lo.target_modules = split_list(target);
  lo.lora.r = a.get_int("r", 8);
  lo.lora.alpha = float(cli::get_float(a, "alpha", 16));
  lo.lora.dropout = float(cli::get_float(a, "dropout", 0.05));
  lo.lora.seed = o.seed;
  lo.lora.validate();
  lo.keep_frozen_bases = cuda;  // the GPU model uploads the frozen projections from them
  const bool resume = a.has("resume");
  std::fprintf(stderr, "loading %s (base weights %s)%s\n", model_dir.c_str(), quant.c_str(),
               resume ? ", resuming" : "");
  cli::ModelSpec spec;
  spec.dir = model_dir;
  if (resume) spec.adapter = cli::TrainLoop::checkpoint_weights(o.out);  // with the saved run's dropout seed
  spec.lora = lo;  // resuming, only its keep_frozen_bases counts: the adapter decides the rest
  spec.seed = o.seed;
  const std::unique_ptr<cli::Model> loaded = cli::open_model(quant, spec);
  cli::Model& m = *loaded;
  QLORA_CHECK(!m.params().empty(), "--target '", target, "' matches no projection of the model");
  m.set_gradient_checkpointing(a.has("gradient-checkpointing"));
  m.set_profiling(a.has("profile"));
  const cli::AnyTokenizer tok = cli::AnyTokenizer::open(model_dir, m.config().vocab_size);
  Data d = read_data(a, tok, o.seq, o.eval_windows, o.seed);
  cli::TrainLoop run(o, d.evals);
  auto params = m.params();
  const std::size_t trainable = cli::param_count(params);
  qlora::optim::AdamW opt(params, adam_options(a, o, 2e-4, 10));
  // --device cuda restores the counters, the curve and the optimizer into its own loop and device
  // optimizer (finetune_cuda.cu); A, B came with the model from checkpoint/weights for both.
  if (resume && !cuda) {
    m.set_dropout_calls(run.resume(o.out));
    opt.load_state(cli::TrainLoop::checkpoint_optimizer(o.out));
    std::fprintf(stderr, "resumed at step %lld of %lld\n", (long long)run.start_step(), (long long)o.steps);
  }
  // Resuming, the LoRA settings are the checkpoint adapter's (the flags' r, alpha, dropout and
  // target are not used), so that is what is printed.
  int shown_r = lo.lora.r;
  double shown_alpha = lo.lora.alpha, shown_dropout = lo.lora.dropout;
  std::string shown_target = target;
  if (resume) {
    const qlora::peft::LoraConfig c = qlora::peft::read_config(cli::TrainLoop::checkpoint_weights(o.out));
    shown_r = c.r;
    shown_alpha = c.lora_alpha;
    shown_dropout = c.lora_dropout;
    shown_target.clear();
    if (c.target_modules.kind == qlora::peft::ModuleSet::Kind::Regex) shown_target = c.target_modules.regex;
    for (const std::string& n : c.target_modules.names) shown_target += (shown_target.empty() ? "" : ",") + n;
    if (shown_target.empty()) shown_target = "the checkpoint's modules";
  }
  std::fprintf(
      stderr, "LoRA r=%d alpha=%g dropout=%g on %s: %zu trainable parameters in %zu tensors; tokenizer %s\n",
      shown_r, shown_alpha, shown_dropout, shown_target.c_str(), trainable, params.size(), tok.name());
  std::fprintf(stderr, "%lld steps x %lld sequences x %lld tokens (accum %lld)\n", (long long)o.steps,
               (long long)o.batch, (long long)o.seq, (long long)o.accum);
  if (cuda) return m.finetune_cuda({o, adam_options(a, o, 2e-4, 10), &d.train, d.evals, model_dir, resume});
  if (!resume) print_losses("before", m, d.evals, o.seq);
  const auto save = [&](const std::string& dir) { qlora::peft::save_adapter(dir, m.adapter(model_dir)); };
  run.run(m, opt, d.train, save);
  if (run.stopped()) return cli::g_interrupted ? 130 : 0;
  if (a.has("profile")) print_phase_times(m, o, o.steps - run.start_step());
  print_losses("after", m, d.evals, o.seq);
  qlora::peft::save_adapter(o.out, m.adapter(model_dir));
  run.write_curve();  // the adapter folder replaced the run's folder: the curve goes back in
  std::printf("wrote the adapter to %s (loss curve: %s/loss.csv)\n", o.out.c_str(), o.out.c_str());
  return 0;
}

int cmd_pretrain(int argc, char** argv) {
  std::vector<std::string> flags = kLoopFlags;
  flags.push_back("dtype");
  const cli::Args a(argc, argv, 2, flags, {"help", "gradient-checkpointing"});
  if (a.has("help")) {
    std::printf("%s", pretrain_usage);
    return 0;
  }
  QLORA_CHECK(a.has("model"), "--model INIT_DIR is needed (see qlora pretrain --help)");
  QLORA_CHECK(a.has("out") || a.has("resume"), "--out DIR is needed (see qlora pretrain --help)");
  check_device(a, false);
  const std::string dtype = a.get("dtype", "bf16");
  QLORA_CHECK(dtype == "f32" || dtype == "bf16", "--dtype must be f32 or bf16, got '", dtype, "'");
  const std::string model_dir = a.get("model", "");
  const cli::TrainOptions o = loop_options(a, "");
  const bool resume = a.has("resume");
  if (resume) cli::TrainLoop::check_resumable(o.out);
  cli::ModelSpec spec;
  spec.dir = resume ? cli::TrainLoop::checkpoint_weights(o.out) : model_dir;
  const std::unique_ptr<cli::Model> loaded = cli::open_model("none", spec);  // fp32: every weight trains
  cli::Model& m = *loaded;
  m.enable_full_training();
  m.set_gradient_checkpointing(a.has("gradient-checkpointing"));
  const cli::AnyTokenizer tok = cli::AnyTokenizer::open(model_dir, m.config().vocab_size);
  Data d = read_data(a, tok, o.seq, o.eval_windows, o.seed);
  cli::TrainLoop run(o, d.evals);
  auto params = m.params();
  const std::size_t n = cli::param_count(params);
  qlora::optim::AdamW opt(params, adam_options(a, o, 1e-3, 50));
  if (resume) {
    run.resume(o.out);
    opt.load_state(cli::TrainLoop::checkpoint_optimizer(o.out));
    std::fprintf(stderr, "resumed at step %lld of %lld\n", (long long)run.start_step(), (long long)o.steps);
  }
  std::fprintf(stderr, "pretraining %s: %zu parameters; %lld steps x %lld sequences x %lld tokens\n",
               model_dir.c_str(), n, (long long)o.steps, (long long)o.batch, (long long)o.seq);
  if (!resume) print_losses("before", m, d.evals, o.seq);
  run.run(m, opt, d.train, [&](const std::string& dir) { m.save(dir, qlora::DType::F32); });
  if (run.stopped()) return cli::g_interrupted ? 130 : 0;
  print_losses("after", m, d.evals, o.seq);
  m.save(o.out, dtype == "f32" ? qlora::DType::F32 : qlora::DType::BF16);
  run.write_curve();
  std::printf("wrote %s\n", o.out.c_str());
  return 0;
}
