#pragma once
// Atomic file replacement: write to a temporary file in the target's directory, fsync it, then
// rename() it over the target. A reader (or a crash) sees either the old file or the complete new
// one, never a half-written file. The temporary lives in the same directory because rename() is
// only atomic within one filesystem.
//
// The temporary is created with open(O_CREAT | O_EXCL, 0666) rather than mkstemp so that the
// process umask applies, as it would to a file written in place (mkstemp always gives 0600).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "qlora/core/error.hpp"

namespace qlora {

class AtomicFile {
 public:
  // Creates "<path>.tmp.<random>" beside the target; the target itself is untouched until commit().
  explicit AtomicFile(std::string path) : path_(std::move(path)) {
    static std::atomic<std::uint64_t> counter{0};
    for (int attempt = 0; attempt < 100; ++attempt) {
      // Unique within the process by the counter, across processes by the pid; O_EXCL makes a
      // collision with a stale file harmless (we just try the next name).
      std::uint64_t x = counter.fetch_add(1) ^ (std::uint64_t(::getpid()) << 32) ^
                        std::uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
      x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;  // splitmix64 finaliser
      x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
      x ^= x >> 31;
      static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz0123456789";
      std::string suffix;
      for (int i = 0; i < 8; ++i, x /= 36) suffix += alphabet[x % 36];
      tmp_ = path_ + ".tmp." + suffix;
      fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ >= 0) return;
      if (errno != EEXIST) break;
    }
    const int err = errno;
    throw_error("cannot create a temporary file for '", path_, "' ('", tmp_, "'): ", std::strerror(err));
  }

  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  // Not committed (an exception on the way, or simply no commit()): the target stays as it was.
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }

  void write(const void* data, std::size_t n) {
    QLORA_CHECK(fd_ >= 0, "write to '", path_, "' after commit()");
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      // One write() call may move less than asked (signals, pipes, large sizes): loop.
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        const int err = w < 0 ? errno : ENOSPC;
        throw_error("short write to '", tmp_, "' (for '", path_, "'), ", n,
                    " bytes left: ", std::strerror(err));
      }
      p += w;
      n -= std::size_t(w);
    }
  }

  // Flushes the data to disk, then renames the temporary over the target.
  void commit() {
    QLORA_CHECK(fd_ >= 0 && !committed_, "commit() of '", path_, "' called twice");
    if (::fsync(fd_) != 0) throw_errno("cannot fsync '" + tmp_ + "' (for '" + path_ + "')");
    const int fd = fd_;
    fd_ = -1;
    // close() can report a deferred write error (NFS): it counts as a failed write.
    if (::close(fd) != 0) throw_errno("cannot close '" + tmp_ + "' (for '" + path_ + "')");
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      throw_errno("cannot rename '" + tmp_ + "' to '" + path_ + "'");
    committed_ = true;
    // Make the rename itself durable. Best effort: some filesystems refuse fsync on a directory,
    // and the new file is already in place either way.
    const int dfd = ::open(directory_of(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return tmp_; }

 private:
  [[noreturn]] static void throw_errno(const std::string& what) {
    const int err = errno;
    throw_error(what, ": ", std::strerror(err));
  }
  static std::string directory_of(const std::string& path) {
    const auto slash = path.find_last_of('/');
    if (slash == std::string::npos) return ".";
    if (slash == 0) return "/";
    return path.substr(0, slash);
  }

  std::string path_;
  std::string tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

inline void write_file_atomic(const std::string& path, const void* data, std::size_t n) {
  AtomicFile f(path);
  f.write(data, n);
  f.commit();
}

inline void write_text_atomic(const std::string& path, const std::string& text) {
  write_file_atomic(path, text.data(), text.size());
}

// Copies in chunks, so a large file is never held in memory whole.
inline void copy_file_atomic(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) {
    const int err = errno;
    throw_error("cannot open '", from, "' for copying to '", to, "': ", std::strerror(err));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{in};
  AtomicFile out(to);
  std::vector<char> buf(std::size_t(1) << 20);
  for (;;) {
    const ssize_t r = ::read(in, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      throw_error("cannot read '", from, "' (copying to '", to, "'): ", std::strerror(err));
    }
    if (r == 0) break;
    out.write(buf.data(), std::size_t(r));
  }
  out.commit();
}

}  // namespace qlora
