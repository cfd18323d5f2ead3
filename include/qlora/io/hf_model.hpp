#pragma once
// Hugging Face model folders: config.json plus weights in model.safetensors or in shards listed by
// model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor: shard file}}).
//
// ModelFolder opens every shard memory-mapped and answers get(name) from the right one, so callers
// see one flat set of tensors whatever the sharding. A folder is consistent or it is an error:
// every shard the index names exists, every tensor sits in the shard the index says, and no tensor
// appears twice.
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/io/safetensors.hpp"

namespace qlora {
namespace hf {

inline bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

inline bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

inline std::string join(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

// Names of the regular files directly inside dir, sorted.
inline std::vector<std::string> list_files(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) throw_error("cannot list folder '", dir, "'");
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != ".." && file_exists(join(dir, name))) out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw_error("cannot open '", path, "'");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    throw_error("'", path, "' is not valid JSON: ", e.what());
  }
}

constexpr const char* kSingleWeights = "model.safetensors";
constexpr const char* kIndex = "model.safetensors.index.json";

class ModelFolder {
 public:
  static ModelFolder open(const std::string& dir) {
    QLORA_CHECK(is_directory(dir), "model folder '", dir, "' does not exist or is not a folder");
    ModelFolder m;
    m.dir_ = dir;
    const std::string cfg = join(dir, "config.json");
    QLORA_CHECK(file_exists(cfg), "model folder '", dir, "': no config.json");
    m.config_ = read_json(cfg);
    QLORA_CHECK(m.config_.is_object(), "'", cfg, "': expected a JSON object, got ", m.config_.type_name());

    const std::string index = join(dir, kIndex), single = join(dir, kSingleWeights);
    if (file_exists(index)) {
      const nlohmann::json idx = read_json(index);
      QLORA_CHECK(idx.is_object() && idx.contains("weight_map") && idx["weight_map"].is_object(), "'", index,
                  "': expected an object with a \"weight_map\" object");
      std::map<std::string, std::size_t> shard_index;
      for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) {
        QLORA_CHECK(it.value().is_string(), "'", index, "': weight_map[\"", it.key(), "\"] is ",
                    it.value().type_name(), ", expected a file name");
        const std::string shard = it.value().get<std::string>();
        QLORA_CHECK(shard.find('/') == std::string::npos, "'", index, "': shard name '", shard,
                    "' must be a plain file name");
        if (!shard_index.count(shard)) {
          QLORA_CHECK(file_exists(join(dir, shard)), "'", index, "' lists shard '", shard,
                      "', which is missing");
          shard_index[shard] = m.shards_.size();
          m.shard_names_.push_back(shard);
          m.shards_.push_back(safetensors::File::open(join(dir, shard)));
        }
        m.expected_[it.key()] = shard;
      }
      QLORA_CHECK(!m.shards_.empty(), "'", index, "': weight_map is empty");
    } else if (file_exists(single)) {
      m.shard_names_.push_back(kSingleWeights);
      m.shards_.push_back(safetensors::File::open(single));
    } else {
      throw_error("model folder '", dir, "': neither ", kSingleWeights, " nor ", kIndex);
    }

    for (std::size_t s = 0; s < m.shards_.size(); ++s)
      for (const std::string& name : m.shards_[s].names()) {
        QLORA_CHECK(!m.where_.count(name), "model folder '", dir, "': tensor '", name, "' is in both '",
                    m.shard_names_[m.where_[name]], "' and '", m.shard_names_[s], "'");
        if (!m.expected_.empty()) {
          auto e = m.expected_.find(name);
          QLORA_CHECK(e != m.expected_.end(), "model folder '", dir, "': tensor '", name, "' in '",
                      m.shard_names_[s], "' is not listed in ", kIndex);
          QLORA_CHECK(e->second == m.shard_names_[s], "model folder '", dir, "': ", kIndex, " puts '", name,
                      "' in '", e->second, "', but it is in '", m.shard_names_[s], "'");
        }
        m.where_[name] = s;
        m.names_.push_back(name);
      }
    for (const auto& e : m.expected_)
      QLORA_CHECK(m.where_.count(e.first), "model folder '", dir, "': ", kIndex, " lists tensor '", e.first,
                  "' in '", e.second, "', which does not hold it");
    return m;
  }

  const std::string& dir() const { return dir_; }
  const nlohmann::json& config() const { return config_; }
  // Every tensor, shard by shard, in file order.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  safetensors::TensorView get(const std::string& name) const {
    auto it = where_.find(name);
    QLORA_CHECK(it != where_.end(), "model folder '", dir_, "': no tensor '", name, "'");
    return shards_[it->second].get(name);
  }
  const std::vector<std::string>& shard_files() const { return shard_names_; }
  bool sharded() const { return !expected_.empty(); }

  // Files that are neither config.json nor weights (tokenizer, generation config, README, ...).
  std::vector<std::string> other_files() const {
    std::set<std::string> skip(shard_names_.begin(), shard_names_.end());
    skip.insert("config.json");
    skip.insert(kIndex);
    skip.insert(kSingleWeights);
    std::vector<std::string> out;
    for (const std::string& f : list_files(dir_))
      if (!skip.count(f) && f.find(".tmp.") == std::string::npos) out.push_back(f);
    return out;
  }

 private:
  std::string dir_;
  nlohmann::json config_;
  std::vector<safetensors::File> shards_;
  std::vector<std::string> shard_names_;
  std::map<std::string, std::size_t> where_;
  std::map<std::string, std::string> expected_;  // from the index, when sharded
  std::vector<std::string> names_;
};

}  // namespace hf
}  // namespace qlora
