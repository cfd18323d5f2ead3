#pragma once
// Small helpers shared by the qlora subcommands: argument parsing, sizes, a progress line.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"

namespace cli {

// Flags of the form --name VALUE or --flag (boolean), plus positional arguments.
struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> values;

  // bool_flags: names that take no value.
  Args(int argc, char** argv, int first, const std::vector<std::string>& value_flags,
       const std::vector<std::string>& bool_flags) {
    auto known = [](const std::vector<std::string>& v, const std::string& s) {
      for (const auto& x : v)
        if (x == s) return true;
      return false;
    };
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a.size() > 2 && a.compare(0, 2, "--") == 0) {
        std::string name = a.substr(2), value;
        const auto eq = name.find('=');
        if (eq != std::string::npos) {
          value = name.substr(eq + 1);
          name = name.substr(0, eq);
          QLORA_CHECK(known(value_flags, name), "unknown option --", name);
        } else if (known(bool_flags, name)) {
          value = "1";
        } else {
          QLORA_CHECK(known(value_flags, name), "unknown option --", name);
          QLORA_CHECK(i + 1 < argc, "option --", name, " needs a value");
          value = argv[++i];
        }
        values[name] = value;
      } else {
        positional.push_back(a);
      }
    }
  }
  bool has(const std::string& k) const { return values.count(k) != 0; }
  std::string get(const std::string& k, const std::string& def) const {
    auto it = values.find(k);
    return it == values.end() ? def : it->second;
  }
  int get_int(const std::string& k, int def) const {
    if (!has(k)) return def;
    const std::string& v = values.at(k);
    std::size_t used = 0;
    int r = 0;
    try {
      r = std::stoi(v, &used);
    } catch (...) {
      used = 0;
    }
    QLORA_CHECK(used == v.size() && !v.empty(), "--", k, " expects an integer, got '", v, "'");
    return r;
  }
};

inline std::string human_bytes(double b) {
  const char* unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", b, unit[u]);
  return buf;
}

// A one-line progress display on stderr, redrawn in place when stderr is a terminal; silent
// otherwise (logs get the per-item lines the command prints anyway).
class ProgressLine {
 public:
  explicit ProgressLine(std::string what) : what_(std::move(what)), tty_(::isatty(2)), start_(clock::now()) {}
  void update(std::size_t done, std::size_t total, const std::string& item) {
    if (!tty_) return;
    const double secs = std::chrono::duration<double>(clock::now() - start_).count();
    const double eta = done ? secs / double(done) * double(total - done) : 0.0;
    std::fprintf(stderr, "\r\033[K%s [%zu/%zu] %3.0f%%  %.0fs elapsed, ETA %.0fs  %.60s", what_.c_str(), done,
                 total, total ? 100.0 * double(done) / double(total) : 100.0, secs, eta, item.c_str());
    if (done == total) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

 private:
  using clock = std::chrono::steady_clock;
  std::string what_;
  bool tty_;
  clock::time_point start_;
};

}  // namespace cli
