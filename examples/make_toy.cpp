// qlora_make_toy: writes a tiny random Llama checkpoint in the Hugging Face folder layout, so loaders,
// quantizers and trainers can be tested end to end without downloading a model.
//
// The folder holds config.json (LlamaConfig fields) and the weights under the names and shapes
// transformers' LlamaForCausalLM uses (nn.Linear weights are [out_features, in_features]), either as
// one model.safetensors or, with --shards N, as model-0000k-of-0000N.safetensors plus
// model.safetensors.index.json, the layout of large checkpoints.
//
// Weights are N(0, 0.02) (transformers' initializer_range), norm weights are 1.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/io/atomic_file.hpp"
#include "qlora/io/safetensors.hpp"

namespace {

const char* kUsage =
    "usage: qlora_make_toy OUT_DIR [options]\n"
    "  Writes a small random Llama model in the Hugging Face layout: OUT_DIR/config.json and\n"
    "  OUT_DIR/model.safetensors (or shards + model.safetensors.index.json).\n"
    "options:\n"
    "  --hidden N        hidden_size (default 64)\n"
    "  --layers N        num_hidden_layers (default 2)\n"
    "  --vocab N         vocab_size (default 256)\n"
    "  --intermediate N  intermediate_size (default 172)\n"
    "  --heads N         num_attention_heads (default 4; must divide --hidden)\n"
    "  --kv-heads N      num_key_value_heads (default 2; must divide --heads)\n"
    "  --dtype T         f32 | bf16 | f16 (default f32)\n"
    "  --seed S          random seed (default 0)\n"
    "  --shards N        write N safetensors shards and an index (default 1: one model.safetensors)\n"
    "  -h, --help        show this message\n";

struct Options {
  std::string out_dir;
  std::int64_t hidden = 64, layers = 2, vocab = 256, intermediate = 172, heads = 4, kv_heads = 2;
  std::string dtype = "f32";
  std::uint64_t seed = 0;
  std::int64_t shards = 1;
};

std::int64_t parse_int(const std::string& flag, const char* value, std::int64_t min) {
  if (!value) qlora::throw_error(flag, " needs a value (see --help)");
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(value, &end, 10);
  QLORA_CHECK(*value && *end == '\0' && errno == 0, flag, " must be an integer, got \"", value, "\"");
  QLORA_CHECK(v >= min && v <= (1LL << 31), flag, " must be in [", min, ", 2^31], got ", v);
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--hidden") {
      o.hidden = parse_int(a, value(), 1);
    } else if (a == "--layers") {
      o.layers = parse_int(a, value(), 0);
    } else if (a == "--vocab") {
      o.vocab = parse_int(a, value(), 3);  // bos 1 and eos 2 must be valid ids
    } else if (a == "--intermediate") {
      o.intermediate = parse_int(a, value(), 1);
    } else if (a == "--heads") {
      o.heads = parse_int(a, value(), 1);
    } else if (a == "--kv-heads") {
      o.kv_heads = parse_int(a, value(), 1);
    } else if (a == "--dtype") {
      const char* v = value();
      if (!v) qlora::throw_error("--dtype needs a value: f32, bf16 or f16");
      o.dtype = v;
      QLORA_CHECK(o.dtype == "f32" || o.dtype == "bf16" || o.dtype == "f16",
                  "--dtype must be f32, bf16 or f16, got \"", o.dtype, "\"");
    } else if (a == "--seed") {
      o.seed = std::uint64_t(parse_int(a, value(), 0));
    } else if (a == "--shards") {
      o.shards = parse_int(a, value(), 1);
    } else if (!a.empty() && a[0] == '-') {
      qlora::throw_error("unknown option \"", a, "\" (see --help)");
    } else {
      QLORA_CHECK(o.out_dir.empty(), "more than one OUT_DIR given: \"", o.out_dir, "\" and \"", a, "\"");
      o.out_dir = a;
    }
  }
  QLORA_CHECK(!o.out_dir.empty(), "missing OUT_DIR (see --help)");
  QLORA_CHECK(o.hidden % o.heads == 0, "--hidden ", o.hidden, " must be a multiple of --heads ", o.heads);
  QLORA_CHECK(o.heads % o.kv_heads == 0, "--heads ", o.heads, " must be a multiple of --kv-heads ",
              o.kv_heads);
  return o;
}

struct Tensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;  // in the output dtype
};

class Builder {
 public:
  Builder(const Options& o) : rng_(o.seed) {
    if (o.dtype == "f32") dtype_ = qlora::DType::F32;
    if (o.dtype == "bf16") dtype_ = qlora::DType::BF16;
    if (o.dtype == "f16") dtype_ = qlora::DType::F16;
  }

  // value < 0: N(0, 0.02) random; otherwise every element = value.
  void add(std::string name, std::vector<std::int64_t> shape, float value = -1.0f) {
    std::size_t n = 1;
    for (auto d : shape) n *= std::size_t(d);
    std::vector<float> f(n, value);
    if (value < 0) {
      std::normal_distribution<float> dist(0.0f, 0.02f);
      for (float& v : f) v = dist(rng_);
    }
    Tensor t{std::move(name), std::move(shape), std::vector<std::uint8_t>(n * qlora::dtype_size(dtype_))};
    if (dtype_ == qlora::DType::F32)
      qlora::convert(f.data(), reinterpret_cast<float*>(t.bytes.data()), n);
    else if (dtype_ == qlora::DType::BF16)
      qlora::convert(f.data(), reinterpret_cast<qlora::bf16*>(t.bytes.data()), n);
    else
      qlora::convert(f.data(), reinterpret_cast<qlora::fp16*>(t.bytes.data()), n);
    tensors_.push_back(std::move(t));
  }

  qlora::DType dtype() const { return dtype_; }
  const std::vector<Tensor>& tensors() const { return tensors_; }

 private:
  std::mt19937_64 rng_;
  qlora::DType dtype_ = qlora::DType::F32;
  std::vector<Tensor> tensors_;
};

std::string human(std::uint64_t bytes) {
  char buf[32];
  if (bytes >= (1u << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB", double(bytes) / double(1u << 20));
  else if (bytes >= (1u << 10))
    std::snprintf(buf, sizeof buf, "%.2f KiB", double(bytes) / double(1u << 10));
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  return buf;
}

std::string shard_name(std::int64_t k, std::int64_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05lld-of-%05lld.safetensors", static_cast<long long>(k),
                static_cast<long long>(n));
  return buf;
}

void write_shard(const std::string& path, const std::vector<Tensor>& ts, std::size_t b, std::size_t e,
                 qlora::DType dtype) {
  qlora::safetensors::Writer w;
  // transformers refuses safetensors files whose metadata "format" is not a framework it knows.
  w.set_metadata("format", "pt");
  std::uint64_t bytes = 0;
  for (std::size_t i = b; i < e; ++i) {
    w.add(ts[i].name, dtype, ts[i].shape, ts[i].bytes.data(), ts[i].bytes.size());
    bytes += ts[i].bytes.size();
  }
  w.write(path);
  std::printf("wrote %s: %zu tensors, %s\n", path.c_str(), e - b, human(bytes).c_str());
}

void run(const Options& o) {
  namespace fs = std::filesystem;
  const std::int64_t h = o.hidden, head_dim = o.hidden / o.heads, kv = o.kv_heads * head_dim;
  Builder b(o);
  // The order of LlamaForCausalLM.named_parameters().
  b.add("model.embed_tokens.weight", {o.vocab, h});
  for (std::int64_t i = 0; i < o.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    b.add(p + "self_attn.q_proj.weight", {o.heads * head_dim, h});
    b.add(p + "self_attn.k_proj.weight", {kv, h});
    b.add(p + "self_attn.v_proj.weight", {kv, h});
    b.add(p + "self_attn.o_proj.weight", {h, o.heads * head_dim});
    b.add(p + "mlp.gate_proj.weight", {o.intermediate, h});
    b.add(p + "mlp.up_proj.weight", {o.intermediate, h});
    b.add(p + "mlp.down_proj.weight", {h, o.intermediate});
    b.add(p + "input_layernorm.weight", {h}, 1.0f);
    b.add(p + "post_attention_layernorm.weight", {h}, 1.0f);
  }
  b.add("model.norm.weight", {h}, 1.0f);
  b.add("lm_head.weight", {o.vocab, h});

  const auto& ts = b.tensors();
  std::uint64_t total = 0;
  for (const auto& t : ts) total += t.bytes.size();
  const std::int64_t shards = o.shards;
  QLORA_CHECK(std::size_t(shards) <= ts.size(), "--shards ", shards, " is more than the ", ts.size(),
              " tensors of this model");

  // Only now that the arguments are known to be good: a bad flag leaves no empty folder behind.
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  QLORA_CHECK(!ec, "cannot create directory '", o.out_dir, "': ", ec.message());

  // A single-file and a sharded checkpoint in one folder would be ambiguous (transformers takes
  // model.safetensors first); say so rather than delete the user's files.
  const char* other = shards == 1 ? "model.safetensors.index.json" : "model.safetensors";
  if (fs::exists(fs::path(o.out_dir) / other))
    std::fprintf(stderr, "warning: %s/%s from an earlier run is still there; remove it\n", o.out_dir.c_str(),
                 other);

  // Each file is written atomically; config.json goes last, so a folder that has one is complete.
  if (shards == 1) {
    write_shard((fs::path(o.out_dir) / "model.safetensors").string(), ts, 0, ts.size(), b.dtype());
  } else {
    // Contiguous groups of tensors, cut where the running size passes k/N of the total (every shard
    // gets at least one tensor).
    nlohmann::ordered_json index;
    index["metadata"] = {{"total_size", total}};
    index["weight_map"] = nlohmann::ordered_json::object();
    std::size_t begin = 0;
    std::uint64_t running = 0;
    for (std::int64_t k = 1; k <= shards; ++k) {
      std::size_t end = begin + 1;
      running += ts[begin].bytes.size();
      const std::size_t must_leave = std::size_t(shards - k);  // one tensor per later shard
      while (
          end < ts.size() - must_leave &&
          (k == shards || running + ts[end].bytes.size() <= total * std::uint64_t(k) / std::uint64_t(shards)))
        running += ts[end++].bytes.size();
      const std::string file = shard_name(k, shards);
      write_shard((fs::path(o.out_dir) / file).string(), ts, begin, end, b.dtype());
      for (std::size_t i = begin; i < end; ++i) index["weight_map"][ts[i].name] = file;
      begin = end;
    }
    const std::string path = (fs::path(o.out_dir) / "model.safetensors.index.json").string();
    qlora::write_text_atomic(path, index.dump(2) + "\n");
    std::printf("wrote %s\n", path.c_str());
  }

  const char* torch_dtype = o.dtype == "f32" ? "float32" : o.dtype == "bf16" ? "bfloat16" : "float16";
  nlohmann::ordered_json cfg = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", o.hidden},
      {"intermediate_size", o.intermediate},
      {"num_hidden_layers", o.layers},
      {"num_attention_heads", o.heads},
      {"num_key_value_heads", o.kv_heads},
      {"head_dim", head_dim},
      {"vocab_size", o.vocab},
      {"max_position_embeddings", 256},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", false},
      {"initializer_range", 0.02},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"torch_dtype", torch_dtype},
      {"use_cache", true},
  };
  const std::string cfg_path = (fs::path(o.out_dir) / "config.json").string();
  qlora::write_text_atomic(cfg_path, cfg.dump(2) + "\n");
  std::printf("wrote %s\n", cfg_path.c_str());
  std::printf("total: %zu tensors, %s (%llu bytes) of %s in %lld file(s)\n", ts.size(), human(total).c_str(),
              static_cast<unsigned long long>(total), qlora::dtype_name(b.dtype()),
              static_cast<long long>(shards));
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "-h" || std::string(argv[i]) == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 1;
  }
  try {
    run(parse_args(argc, argv));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
