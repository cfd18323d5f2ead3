#pragma once
// Writing a whole folder atomically: build it at "<target>.tmp.XXXXXX" beside the target, then
// rename it over the target on commit(); on any failure (no commit) the temporary folder is removed.
// An existing target folder is moved aside first and deleted after the swap, so a crash leaves the
// old folder or the new one, never a mix. Used for model folders and adapters.
#include <dirent.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/io/hf_model.hpp"

namespace qlora {

// Removes a file or a folder with everything in it (no error if it does not exist).
inline void rm_rf(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    if (DIR* d = ::opendir(path.c_str())) {
      while (const dirent* e = ::readdir(d)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..") rm_rf(hf::join(path, n));
      }
      ::closedir(d);
    }
    ::rmdir(path.c_str());
  } else {
    ::unlink(path.c_str());
  }
}

// A folder built at "<target>.tmp.XXXXXX" and renamed over the target on commit; removed otherwise.
class AtomicDir {
 public:
  explicit AtomicDir(std::string target) : target_(std::move(target)) {
    while (!target_.empty() && target_.size() > 1 && target_.back() == '/') target_.pop_back();
    std::string tmpl = target_ + ".tmp.XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!::mkdtemp(buf.data())) throw_error("cannot create a temporary folder beside '", target_, "'");
    tmp_ = buf.data();
    // mkdtemp makes the folder private (0700); give it the mode a plain mkdir would have.
    const mode_t mask = ::umask(0);
    ::umask(mask);
    ::chmod(tmp_.c_str(), 0777 & ~mask);
  }
  ~AtomicDir() {
    if (!committed_) rm_rf(tmp_);
  }
  const std::string& path() const { return tmp_; }
  void commit() {
    std::string old;
    if (hf::is_directory(target_)) {  // move the old folder aside, swap in the new, then delete the old
      old = target_ + ".old." + std::to_string(::getpid());
      rm_rf(old);
      if (::rename(target_.c_str(), old.c_str()) != 0) throw_error("cannot move '", target_, "' aside");
    }
    if (::rename(tmp_.c_str(), target_.c_str()) != 0) {
      if (!old.empty()) ::rename(old.c_str(), target_.c_str());
      throw_error("cannot rename '", tmp_, "' to '", target_, "'");
    }
    committed_ = true;
    if (!old.empty()) rm_rf(old);
  }

 private:
  std::string target_, tmp_;
  bool committed_ = false;
};

}  // namespace qlora
