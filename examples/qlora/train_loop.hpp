#pragma once
// The training loop of `qlora finetune` (LoRA / QLoRA) and `qlora pretrain` (all weights): batches
// from a text::Corpus, AdamW with warmup + cosine decay, gradient accumulation, held-out losses,
// a live progress line, a loss curve (CSV, and a PNG when gnuplot is installed) and checkpoints from
// which an interrupted run resumes where it stopped.
//
// A run's folder (--out):
//   loss.csv, loss.png      the curve: one row per optimizer step, held-out losses on eval steps
//   checkpoint/             the latest checkpoint (replaced atomically each time):
//     weights/              what is trained (a PEFT adapter, or a whole model folder), written by
//                           the command's save callback
//     optimizer.safetensors AdamW's moments and step count
//     trainer_state.json    step, options, LoRA dropout counters, the curve so far
// plus whatever the command writes at the end (the adapter files, the model folder).
//
// Resuming restores the weights (the command loads checkpoint/weights), the optimizer, the dropout
// counters and the curve; the batches are a pure function of (seed, step), so the resumed run
// continues with the batches, masks and updates of the uninterrupted one.
#include <unistd.h>

#include <csignal>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli.hpp"
#include "model.hpp"
#include "qlora/io/atomic_dir.hpp"
#include "qlora/io/atomic_file.hpp"
#include "qlora/io/hf_model.hpp"
#include "qlora/optim/adamw.hpp"
#include "qlora/text/corpus.hpp"

namespace cli {

// Ctrl-C (SIGINT) or SIGTERM during training: the step in progress finishes, a checkpoint is
// written and the command exits; a second signal kills the process as usual.
inline volatile std::sig_atomic_t g_interrupted = 0;
extern "C" inline void on_interrupt(int sig) {
  g_interrupted = 1;
  std::signal(sig, SIG_DFL);
}

struct TrainOptions {
  std::int64_t steps = 200;            // optimizer steps
  std::int64_t batch = 8;              // sequences per micro-batch
  std::int64_t accum = 1;              // micro-batches per optimizer step
  std::int64_t seq = 128;              // tokens per sequence
  std::int64_t eval_every = 50;        // steps between held-out evaluations (0: only before/after)
  std::int64_t eval_windows = 32;      // held-out windows of `seq` tokens per evaluation
  std::int64_t checkpoint_every = 50;  // steps between checkpoints (0: none)
  std::int64_t log_every = 10;         // steps between printed lines (the live line redraws every step)
  std::int64_t stop_after = 0;         // > 0: stop after this step with a checkpoint, as if interrupted
  std::uint64_t seed = 0;
  std::string out;  // the run's folder
};

inline nlohmann::json to_json(const TrainOptions& o) {
  return {{"steps", o.steps}, {"batch", o.batch}, {"accum", o.accum},
          {"seq", o.seq},     {"seed", o.seed},   {"eval_windows", o.eval_windows}};
}

// A held-out text: its name in the output ("held-out", "old corpus") and its windows (n, seq).
struct EvalSet {
  std::string name;
  std::vector<std::int64_t> windows;
};

// The mean next-token loss over the windows (each window has seq - 1 predictions), in chunks of
// 8 windows.
inline double eval_loss(Model& m, const std::vector<std::int64_t>& windows, std::int64_t T) {
  const std::int64_t n = std::int64_t(windows.size()) / T;
  QLORA_CHECK(n > 0, "held-out text: fewer than ", T, " tokens, no window to evaluate");
  double sum = 0;
  for (std::int64_t b = 0; b < n; b += 8) {
    const std::int64_t k = std::min<std::int64_t>(8, n - b);
    const std::int64_t* ids = windows.data() + b * T;
    sum += double(m.loss(ids, ids, k, T)) * double(k);
  }
  return sum / double(n);
}

struct CurveRow {
  std::int64_t step = 0;
  double loss = 0, lr = 0, tokens_per_s = 0;
  std::vector<double> eval;  // per EvalSet, NaN where not evaluated
};

inline std::string fmt_duration(double s) {
  char buf[32];
  if (s < 60)
    std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 3600)
    std::snprintf(buf, sizeof buf, "%dm%02ds", int(s / 60), int(s) % 60);
  else
    std::snprintf(buf, sizeof buf, "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  return buf;
}

class TrainLoop {
 public:
  // save_weights(dir): writes what is trained into dir (a folder that exists and is empty).
  using SaveWeights = std::function<void(const std::string& dir)>;

  TrainLoop(TrainOptions o, std::vector<EvalSet> evals) : o_(std::move(o)), evals_(std::move(evals)) {
    QLORA_CHECK(o_.steps > 0, "--steps must be positive, got ", o_.steps);
    QLORA_CHECK(o_.batch > 0, "--batch must be positive, got ", o_.batch);
    QLORA_CHECK(o_.accum > 0, "--accum must be positive, got ", o_.accum);
    QLORA_CHECK(o_.seq > 1, "--seq must be at least 2, got ", o_.seq);
    QLORA_CHECK(!o_.out.empty(), "--out is needed");
  }

  const std::vector<CurveRow>& curve() const { return curve_; }
  std::int64_t start_step() const { return start_; }
  // run() returned early because of stop_after: the run is not finished.
  bool stopped() const { return stopped_; }

  // Reads <out>/checkpoint: the step to continue from, the curve and the dropout counters; the
  // caller restores the weights from checkpoint_weights() and the optimizer from
  // checkpoint_optimizer(). Options that decide the batches must equal the saved ones.
  std::vector<std::uint64_t> resume(const std::string& dir) {
    const std::string ck = qlora::hf::join(dir, "checkpoint");
    const std::string state_path = qlora::hf::join(ck, "trainer_state.json");
    QLORA_CHECK(qlora::hf::file_exists(state_path), "--resume '", dir, "': no checkpoint there (", state_path,
                " is missing)");
    nlohmann::json st;
    try {
      st = nlohmann::json::parse(qlora::text::read_text_file(state_path));
    } catch (const nlohmann::json::exception& e) {
      qlora::throw_error("--resume: '", state_path, "' is not valid JSON: ", e.what());
    }
    const nlohmann::json want = to_json(o_);
    for (const char* k : {"batch", "accum", "seq", "seed", "eval_windows"})
      QLORA_CHECK(st["options"][k] == want[k], "--resume: the checkpoint was trained with ", k, " = ",
                  st["options"][k].dump(), ", this run has ", want[k].dump());
    start_ = st["step"].get<std::int64_t>();
    QLORA_CHECK(start_ <= o_.steps, "--resume: the checkpoint is at step ", start_, ", past --steps ",
                o_.steps);
    for (const auto& r : st["curve"]) {
      CurveRow row;
      row.step = r[0];
      row.loss = r[1];
      row.lr = r[2];
      row.tokens_per_s = r[3];
      for (std::size_t i = 4; i < r.size(); ++i)
        row.eval.push_back(r[i].is_null() ? NAN : r[i].get<double>());
      curve_.push_back(row);
    }
    return st["dropout_calls"].get<std::vector<std::uint64_t>>();
  }
  // An error unless dir holds a checkpoint (said before anything is loaded from it).
  static void check_resumable(const std::string& dir) {
    const std::string state = qlora::hf::join(qlora::hf::join(dir, "checkpoint"), "trainer_state.json");
    QLORA_CHECK(qlora::hf::file_exists(state), "--resume '", dir, "': no checkpoint there (", state,
                " is missing)");
  }
  static std::string checkpoint_weights(const std::string& dir) {
    return qlora::hf::join(qlora::hf::join(dir, "checkpoint"), "weights");
  }
  static std::string checkpoint_optimizer(const std::string& dir) {
    return qlora::hf::join(qlora::hf::join(dir, "checkpoint"), "optimizer.safetensors");
  }

  // Runs steps start_step()+1 .. steps.
  void run(Model& m, qlora::optim::AdamW& opt, const std::vector<std::int64_t>& train,
           const SaveWeights& save) {
    const std::int64_t tokens_per_step = o_.batch * o_.accum * o_.seq;
    const bool tty = ::isatty(2);
    const auto t0 = clock::now();
    g_interrupted = 0;
    std::signal(SIGINT, on_interrupt);
    std::signal(SIGTERM, on_interrupt);
    double recent_tokens = 0, recent_secs = 0;
    for (std::int64_t step = start_ + 1; step <= o_.steps; ++step) {
      const auto ts = clock::now();
      opt.zero_grad();
      double loss = 0;
      for (std::int64_t micro = 0; micro < o_.accum; ++micro) {
        const std::vector<std::int64_t> ids =
            qlora::text::Corpus::batch(train, o_.batch, o_.seq, o_.seed, step, micro);
        const float l =
            m.forward_backward(ids.data(), ids.data(), o_.batch, o_.seq, qlora::GradMode::Accumulate);
        QLORA_CHECK(std::isfinite(l), "training diverged: the loss at step ", step, " is ", l,
                    " (lower --lr, or check the data)");
        loss += double(l) / double(o_.accum);
      }
      const double lr = opt.lr(qlora::optim::ParamGroup::LoraA);
      opt.step();
      const double secs = std::chrono::duration<double>(clock::now() - ts).count();
      recent_tokens = 0.8 * recent_tokens + double(tokens_per_step);
      recent_secs = 0.8 * recent_secs + secs;
      CurveRow row{step, loss, lr, recent_tokens / recent_secs, std::vector<double>(evals_.size(), NAN)};
      const bool eval_now = (o_.eval_every > 0 && step % o_.eval_every == 0) || step == o_.steps;
      if (eval_now)
        for (std::size_t i = 0; i < evals_.size(); ++i) row.eval[i] = eval_loss(m, evals_[i].windows, o_.seq);
      curve_.push_back(row);

      const double elapsed = std::chrono::duration<double>(clock::now() - t0).count();
      const double eta = elapsed / double(step - start_) * double(o_.steps - step);
      char line[256];
      std::snprintf(line, sizeof line, "step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  elapsed %s  ETA %s",
                    (long long)step, (long long)o_.steps, loss, lr, row.tokens_per_s,
                    fmt_duration(elapsed).c_str(), fmt_duration(eta).c_str());
      std::string full = line;
      for (std::size_t i = 0; i < evals_.size(); ++i)
        if (eval_now) {
          char e[96];
          std::snprintf(e, sizeof e, "  %s %.4f", evals_[i].name.c_str(), row.eval[i]);
          full += e;
        }
      if (eval_now || step % o_.log_every == 0 || step == start_ + 1) {
        std::fprintf(stderr, tty ? "\r\033[K%s\n" : "%s\n", full.c_str());
      } else if (tty) {
        std::fprintf(stderr, "\r\033[K%s", full.c_str());
      }
      std::fflush(stderr);
      if ((step == o_.stop_after || g_interrupted) && step < o_.steps) {
        checkpoint(m, opt, step, save);
        stopped_ = true;
        std::fprintf(stderr, "%s after step %lld: checkpoint written; continue with --resume %s\n",
                     g_interrupted ? "interrupted" : "stopped (--stop-after)", (long long)step, o_.out.c_str());
        std::signal(SIGINT, SIG_DFL);
        std::signal(SIGTERM, SIG_DFL);
        return;
      }
      if (o_.checkpoint_every > 0 && step % o_.checkpoint_every == 0 && step < o_.steps)
        checkpoint(m, opt, step, save);
    }
    std::signal(SIGINT, SIG_DFL);
    std::signal(SIGTERM, SIG_DFL);
    write_curve();
  }

  // Writes <out>/checkpoint (replacing the previous one atomically) and the curve so far.
  void checkpoint(const Model& m, const qlora::optim::AdamW& opt, std::int64_t step,
                  const SaveWeights& save) {
    ensure_out();
    qlora::AtomicDir dir(qlora::hf::join(o_.out, "checkpoint"));
    const std::string w = qlora::hf::join(dir.path(), "weights");
    save(w);
    opt.save_state(qlora::hf::join(dir.path(), "optimizer.safetensors"));
    nlohmann::json st;
    st["step"] = step;
    st["options"] = to_json(o_);
    st["dropout_calls"] = m.dropout_calls();
    st["curve"] = nlohmann::json::array();
    for (const CurveRow& r : curve_) {
      nlohmann::json row = {r.step, r.loss, r.lr, r.tokens_per_s};
      for (double e : r.eval) row.push_back(std::isnan(e) ? nlohmann::json() : nlohmann::json(e));
      st["curve"].push_back(row);
    }
    qlora::write_text_atomic(qlora::hf::join(dir.path(), "trainer_state.json"), st.dump() + "\n");
    dir.commit();
    write_curve();
  }

  // loss.csv, and loss.png through gnuplot when it is on PATH (said once when it is not).
  void write_curve() const {
    ensure_out();
    std::string csv = "step,train_loss,lr,tokens_per_s";
    for (const EvalSet& e : evals_) csv += "," + csv_name(e.name);
    csv += "\n";
    for (const CurveRow& r : curve_) {
      char b[128];
      std::snprintf(b, sizeof b, "%lld,%.6f,%.6g,%.1f", (long long)r.step, r.loss, r.lr, r.tokens_per_s);
      csv += b;
      for (double e : r.eval) {
        csv += ",";
        if (!std::isnan(e)) {
          std::snprintf(b, sizeof b, "%.6f", e);
          csv += b;
        }
      }
      csv += "\n";
    }
    const std::string csv_path = qlora::hf::join(o_.out, "loss.csv");
    qlora::write_text_atomic(csv_path, csv);
    plot(csv_path);
  }

 private:
  using clock = std::chrono::steady_clock;

  static std::string csv_name(std::string s) {
    for (char& c : s)
      if (c == ' ' || c == ',') c = '_';
    return "eval_" + s;
  }
  void ensure_out() const {
    if (!qlora::hf::is_directory(o_.out))
      QLORA_CHECK(::mkdir(o_.out.c_str(), 0777) == 0 || qlora::hf::is_directory(o_.out),
                  "cannot create --out '", o_.out, "'");
  }

  void plot(const std::string& csv) const {
    if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
      if (!said_no_gnuplot_)
        std::fprintf(stderr,
                     "(loss.png not drawn: gnuplot is not installed; apt-get install -y gnuplot-nox)\n");
      said_no_gnuplot_ = true;
      return;
    }
    const std::string png = qlora::hf::join(o_.out, "loss.png");
    const std::string tmp = png + ".tmp.png", script = qlora::hf::join(o_.out, ".loss.gp");
    std::string gp = "set terminal pngcairo size 900,540\nset output '" + tmp +
                     "'\nset datafile separator ','\nset datafile missing ''\nset key top right\n"
                     "set xlabel 'optimizer step'\nset ylabel 'cross-entropy (nats/token)'\nset grid\n"
                     "plot '" +
                     csv + "' using 1:2 with lines lw 1 title 'training batch'";
    for (std::size_t i = 0; i < evals_.size(); ++i)
      gp += ", '' using 1:" + std::to_string(5 + i) + " with linespoints lw 2 title '" + evals_[i].name + "'";
    gp += "\n";
    qlora::write_text_atomic(script, gp);
    const std::string cmd = "gnuplot '" + script + "' 2>/dev/null";
    if (std::system(cmd.c_str()) == 0) std::rename(tmp.c_str(), png.c_str());
    std::remove(tmp.c_str());
    std::remove(script.c_str());
  }

  TrainOptions o_;
  std::vector<EvalSet> evals_;
  std::vector<CurveRow> curve_;
  std::int64_t start_ = 0;
  bool stopped_ = false;
  mutable bool said_no_gnuplot_ = false;
};

}  // namespace cli
