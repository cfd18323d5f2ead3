// Hugging Face model folders: single file, sharded with an index, and every inconsistency an error.
#include <catch2/catch.hpp>

#include "qlora/io/hf_model.hpp"
#include "test_util.hpp"

using namespace qlora;

namespace {
void write_tensors(const std::string& path, const std::vector<std::string>& names) {
  static const float data[4] = {1, 2, 3, 4};
  safetensors::Writer w;
  for (const auto& n : names) w.add_copy(n, DType::F32, {2, 2}, data, sizeof data);
  w.write(path);
}
void write_text(const std::string& path, const std::string& s) { write_text_atomic(path, s); }
const char* kIndex2 =
    R"({"metadata": {"total_size": 48}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00001-of-00002.safetensors", "c.weight": "model-00002-of-00002.safetensors"}})";
}  // namespace

TEST_CASE("a single-file folder", "[io][hf]") {
  testutil::TempDir d;
  write_text(d / "config.json", R"({"model_type": "llama", "hidden_size": 2})");
  write_tensors(d / "model.safetensors", {"a.weight", "b.weight"});
  write_text(d / "tokenizer.json", "{}");
  const auto m = hf::ModelFolder::open(d.path);
  REQUIRE(m.config()["hidden_size"] == 2);
  REQUIRE(m.names().size() == 2);
  REQUIRE(m.get("b.weight").to_f32()[3] == 4.0f);
  REQUIRE(!m.sharded());
  REQUIRE(m.other_files() == std::vector<std::string>{"tokenizer.json"});
  REQUIRE_THROWS_WITH(m.get("zz"), Catch::Contains("no tensor 'zz'"));
}

TEST_CASE("a sharded folder", "[io][hf]") {
  testutil::TempDir d;
  write_text(d / "config.json", "{}");
  write_tensors(d / "model-00001-of-00002.safetensors", {"a.weight", "b.weight"});
  write_tensors(d / "model-00002-of-00002.safetensors", {"c.weight"});
  write_text(d / "model.safetensors.index.json", kIndex2);
  const auto m = hf::ModelFolder::open(d.path);
  REQUIRE(m.sharded());
  REQUIRE(m.names().size() == 3);
  REQUIRE(m.contains("c.weight"));
  REQUIRE(m.shard_files().size() == 2);
  REQUIRE(m.other_files().empty());
}

TEST_CASE("inconsistent folders are errors", "[io][hf]") {
  {
    testutil::TempDir d;
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d.path), Catch::Contains("no config.json"));
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d / "nope"), Catch::Contains("does not exist"));
    write_text(d / "config.json", "{");
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d.path), Catch::Contains("is not valid JSON"));
    write_text(d / "config.json", "{}");
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d.path), Catch::Contains("neither model.safetensors nor"));
  }
  {  // a shard the index names is missing
    testutil::TempDir d;
    write_text(d / "config.json", "{}");
    write_tensors(d / "model-00001-of-00002.safetensors", {"a.weight", "b.weight"});
    write_text(d / "model.safetensors.index.json", kIndex2);
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d.path),
                        Catch::Contains("'model-00002-of-00002.safetensors', which is missing"));
  }
  {  // a tensor in the wrong shard, one not listed, one listed but absent, one in two shards
    testutil::TempDir d;
    write_text(d / "config.json", "{}");
    write_text(d / "model.safetensors.index.json", kIndex2);
    write_tensors(d / "model-00001-of-00002.safetensors", {"a.weight", "c.weight"});
    write_tensors(d / "model-00002-of-00002.safetensors", {"b.weight"});
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d.path),
                        Catch::Contains("puts 'c.weight' in 'model-00002-of-00002"));
    write_tensors(d / "model-00001-of-00002.safetensors", {"a.weight", "b.weight", "x.weight"});
    write_tensors(d / "model-00002-of-00002.safetensors", {"c.weight"});
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d.path),
                        Catch::Contains("'x.weight' in 'model-00001-of-00002.safetensors' is not listed"));
    write_tensors(d / "model-00001-of-00002.safetensors", {"a.weight"});
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d.path), Catch::Contains("lists tensor 'b.weight'"));
    write_tensors(d / "model-00001-of-00002.safetensors", {"a.weight", "b.weight"});
    write_tensors(d / "model-00002-of-00002.safetensors", {"c.weight", "a.weight"});
    REQUIRE_THROWS_WITH(hf::ModelFolder::open(d.path), Catch::Contains("'a.weight' is in both"));
  }
}
