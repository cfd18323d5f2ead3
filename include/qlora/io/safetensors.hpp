#pragma once
// safetensors: read (memory-mapped, zero-copy) and write (atomic, streamed).
//
// Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data buffer.
// The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the data buffer) plus an optional "__metadata__" object of string -> string.
//
// Conventions
// - Reading validates everything the format promises before any tensor is handed out, so a
//   TensorView is always in bounds: tensors tile the data buffer exactly (no gaps, overlaps or
//   trailing bytes), each byte range matches numel * dtype_size, and no size computation overflows.
//   Every violation is a qlora::Error starting with "safetensors '<path>': ".
// - Tensor data sits at 8 + N + begin, and N need not be a multiple of 8, so data may be unaligned:
//   it is only ever read through memcpy, never through a cast pointer.
// - Writing pads the header with spaces so the data starts 8-byte aligned (as the Python and Rust
//   writers do) and streams each tensor from the caller's memory into an AtomicFile.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/io/atomic_file.hpp"

namespace qlora {
namespace safetensors {

// The format's limit on the header length (the Rust reference implementation refuses larger).
inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

namespace detail {

inline std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

// numel * dtype_size without overflow; false when the product does not fit in 64 bits.
inline bool byte_size(const std::vector<std::int64_t>& shape, DType dtype, std::uint64_t& out) {
  std::uint64_t n = 1;
  for (std::int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, std::uint64_t(d), &n)) return false;
  return !__builtin_mul_overflow(n, std::uint64_t(dtype_size(dtype)), &out);
}

// Byte offset of the first invalid UTF-8 sequence, or npos. Strict: no overlongs, no surrogates,
// nothing above U+10FFFF (what Rust's str::from_utf8 accepts, which is what Python's reader uses).
inline std::size_t invalid_utf8_at(const std::uint8_t* s, std::size_t n) {
  std::size_t i = 0;
  while (i < n) {
    const std::uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    std::uint8_t lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // > U+10FFFF
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xbf) return i;
    i += len;
  }
  return std::string::npos;
}

inline const char* json_type(const nlohmann::json& j) { return j.type_name(); }

}  // namespace detail

// A tensor inside a File: points into the file's bytes, valid while the File lives.
class TensorView {
 public:
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  const std::uint8_t* data = nullptr;  // possibly unaligned: read through memcpy only
  std::size_t nbytes = 0;

  std::int64_t numel() const {
    // Unsigned: a partial product may pass INT64_MAX when a later dimension is 0 ([2^32, 2^31, 0]
    // is a valid empty tensor); File checked that no partial product overflows 64 bits, and the
    // final one is at most the data size.
    std::uint64_t n = 1;
    for (std::int64_t d : shape) n *= std::uint64_t(d);
    return std::int64_t(n);
  }

  // F32, F16, BF16 and F64 widened or narrowed to float.
  std::vector<float> to_f32() const {
    const std::size_t n = std::size_t(numel());
    std::vector<float> out(n);
    switch (dtype) {
      case DType::F32:
        if (n) std::memcpy(out.data(), data, n * 4);
        break;
      case DType::F16: {
        std::vector<fp16> tmp(n);  // aligned copy: convert() may use vector loads on its input
        if (n) std::memcpy(tmp.data(), data, n * 2);
        convert(tmp.data(), out.data(), n);
        break;
      }
      case DType::BF16: {
        std::vector<bf16> tmp(n);
        if (n) std::memcpy(tmp.data(), data, n * 2);
        convert(tmp.data(), out.data(), n);
        break;
      }
      case DType::F64:
        for (std::size_t i = 0; i < n; ++i) {
          double d;
          std::memcpy(&d, data + 8 * i, 8);
          out[i] = float(d);
        }
        break;
      default:
        throw_error("safetensors: to_f32() of a ", dtype_name(dtype), " tensor ", detail::shape_str(shape),
                    ", expected F32, F16, BF16 or F64");
    }
    return out;
  }

  // The raw elements copied into T, which must have the dtype's size (e.g. bf16 for BF16).
  template <class T>
  std::vector<T> copy_as() const {
    static_assert(std::is_trivially_copyable<T>::value, "copy_as<T> needs a trivially copyable T");
    QLORA_CHECK(sizeof(T) == dtype_size(dtype), "safetensors: copy_as<T> of a ", dtype_name(dtype),
                " tensor with sizeof(T) = ", sizeof(T), ", expected ", dtype_size(dtype));
    std::vector<T> out(static_cast<std::size_t>(numel()));
    if (nbytes) std::memcpy(out.data(), data, nbytes);
    return out;
  }
};

// A parsed safetensors file, backed by a read-only mapping (open) or an owned buffer (from_memory).
class File {
 public:
  static File open(const std::string& path) {
    File f;
    f.path_ = path;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) f.fail_errno("cannot open");
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      f.fail("cannot stat: ", std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      f.fail("not a regular file");
    }
    const std::size_t size = std::size_t(st.st_size);
    if (size >= 8) {  // mmap of 0 bytes fails; shorter files are rejected by parse() anyway
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        f.fail("cannot mmap ", size, " bytes: ", std::strerror(err));
      }
      f.map_ = p;
      f.map_size_ = size;
      f.base_ = static_cast<const std::uint8_t*>(p);
    }
    ::close(fd);  // the mapping keeps the file alive
    f.size_ = size;
    f.parse();
    return f;
  }

  static File from_memory(std::vector<std::uint8_t> bytes, std::string name = "<memory>") {
    File f;
    f.path_ = std::move(name);
    f.owned_ = std::move(bytes);
    f.base_ = f.owned_.data();
    f.size_ = f.owned_.size();
    f.parse();
    return f;
  }

  File(File&& o) noexcept { swap(o); }
  File& operator=(File&& o) noexcept {
    File tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (map_) ::munmap(map_, map_size_);
  }

  // Tensor names in the order of their data offsets.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }

  TensorView get(const std::string& name) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) fail("no tensor '", name, "'");
    const Entry& e = it->second;
    TensorView v;
    v.dtype = e.dtype;
    v.shape = e.shape;
    v.data = base_ + data_offset_ + e.begin;
    v.nbytes = std::size_t(e.end - e.begin);
    return v;
  }

  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  // Where the data buffer starts in the file: 8 + header length.
  std::size_t data_offset() const { return data_offset_; }

 private:
  struct Entry {
    DType dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t begin, end;
  };

  File() = default;

  void swap(File& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(owned_, o.owned_);
    std::swap(map_, o.map_);
    std::swap(map_size_, o.map_size_);
    std::swap(base_, o.base_);
    std::swap(size_, o.size_);
    std::swap(data_offset_, o.data_offset_);
    std::swap(names_, o.names_);
    std::swap(entries_, o.entries_);
    std::swap(metadata_, o.metadata_);
  }

  template <class... Args>
  [[noreturn]] void fail(const Args&... args) const {
    throw_error("safetensors '", path_, "': ", args...);
  }
  [[noreturn]] void fail_errno(const char* what) const {
    const int err = errno;
    fail(what, ": ", std::strerror(err));
  }

  void parse() {
    using nlohmann::json;
    if (size_ < 8) fail("file is ", size_, " bytes, expected at least 8 (the header length field)");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | base_[i];  // little-endian, whatever the host
    if (n > kMaxHeaderSize)
      fail("header length ", n, " exceeds the format's limit of ", kMaxHeaderSize, " bytes");
    if (n > size_ - 8)
      fail("header length ", n, " is larger than the ", size_ - 8, " bytes after the length field");
    const std::uint8_t* h = base_ + 8;
    data_offset_ = 8 + std::size_t(n);
    const std::uint64_t data_len = size_ - data_offset_;

    if (n == 0 || h[0] != '{') {
      if (n == 0) fail("header is empty, expected a JSON object starting with '{'");
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", h[0]);
      fail("header must start with '{', found byte ", hex);
    }
    const std::size_t bad = detail::invalid_utf8_at(h, std::size_t(n));
    if (bad != std::string::npos) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", h[bad]);
      fail("header is not valid UTF-8: byte ", hex, " at header offset ", bad);
    }

    // nlohmann keeps the last of duplicate keys silently; a duplicate tensor name would hide a
    // tensor, so the callback tracks the keys of every open object and rejects repeats.
    std::vector<std::set<std::string>> open_objects;
    auto on_event = [&](int /*depth*/, json::parse_event_t ev, json& parsed) {
      if (ev == json::parse_event_t::object_start) {
        open_objects.emplace_back();
      } else if (ev == json::parse_event_t::object_end) {
        if (!open_objects.empty()) open_objects.pop_back();
      } else if (ev == json::parse_event_t::key && !open_objects.empty()) {
        const std::string& k = parsed.get_ref<const std::string&>();
        if (!open_objects.back().insert(k).second)
          fail("duplicate key '", k, "' in the header (at nesting depth ", open_objects.size(), ")");
      }
      return true;
    };
    json root;
    try {
      root = json::parse(h, h + n, on_event, /*allow_exceptions=*/true, /*ignore_comments=*/false);
    } catch (const json::exception& e) {
      fail("header is not valid JSON: ", e.what());
    }
    if (!root.is_object()) fail("header must be a JSON object, found ", detail::json_type(root));

    std::vector<std::pair<std::string, const Entry*>> order;
    for (auto it = root.begin(); it != root.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ must be an object of strings, found ", detail::json_type(v));
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            fail("__metadata__ value for key '", m.key(), "' must be a string, found ",
                 detail::json_type(m.value()));
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      Entry e = parse_entry(name, v, data_len);
      auto ins = entries_.emplace(name, std::move(e));
      order.emplace_back(name, &ins.first->second);
    }

    // Tensors must tile the data buffer exactly. Ties (empty tensors at one offset) keep name order.
    std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
      return a.second->begin != b.second->begin ? a.second->begin < b.second->begin
                                                : a.second->end < b.second->end;
    });
    std::uint64_t at = 0;
    const std::string* prev = nullptr;
    for (const auto& [name, e] : order) {
      if (e->begin > at)
        fail("gap of ", e->begin - at, " bytes before tensor '", name, "' (data_offsets [", e->begin, ", ",
             e->end, "]), expected it to begin at ", at);
      if (e->begin < at)
        fail("tensor '", name, "' data_offsets [", e->begin, ", ", e->end, "] overlap the previous tensor '",
             *prev, "', which ends at ", at);
      at = e->end;
      prev = &name;
      names_.push_back(name);
    }
    if (at != data_len)
      fail(data_len - at, " trailing bytes after the last tensor: data buffer is ", data_len,
           " bytes, tensors end at ", at);
  }

  Entry parse_entry(const std::string& name, const nlohmann::json& v, std::uint64_t data_len) const {
    if (!v.is_object()) fail("tensor '", name, "' must be an object, found ", detail::json_type(v));
    static const char* const keys[] = {"dtype", "shape", "data_offsets"};
    for (auto it = v.begin(); it != v.end(); ++it)
      if (std::none_of(std::begin(keys), std::end(keys), [&](const char* k) { return it.key() == k; }))
        fail("tensor '", name, "' has unexpected key '", it.key(),
             "', expected only dtype, shape, data_offsets");
    for (const char* k : keys)
      if (!v.contains(k)) fail("tensor '", name, "' is missing key '", k, "'");

    Entry e;
    const auto& jd = v["dtype"];
    if (!jd.is_string()) fail("tensor '", name, "' dtype must be a string, found ", detail::json_type(jd));
    if (!dtype_from_name(jd.get<std::string>(), e.dtype))
      fail("tensor '", name, "' has unknown dtype '", jd.get<std::string>(),
           "', expected one of F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL");

    const auto& js = v["shape"];
    if (!js.is_array()) fail("tensor '", name, "' shape must be an array, found ", detail::json_type(js));
    for (std::size_t i = 0; i < js.size(); ++i) {
      const auto& d = js[i];
      // nlohmann stores non-negative integers as unsigned and negative ones as signed.
      if (d.is_number_unsigned()) {
        const std::uint64_t u = d.get<std::uint64_t>();
        if (u > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
          fail("tensor '", name, "' shape[", i, "] is ", u, ", larger than the int64 maximum");
        e.shape.push_back(std::int64_t(u));
      } else if (d.is_number_integer()) {
        fail("tensor '", name, "' shape[", i, "] is ", d.get<std::int64_t>(),
             ", expected a non-negative integer");
      } else {
        fail("tensor '", name, "' shape[", i, "] is ", d.dump(), ", expected a non-negative integer");
      }
    }
    std::uint64_t expected = 0;
    if (!detail::byte_size(e.shape, e.dtype, expected))
      fail("tensor '", name, "' ", dtype_name(e.dtype), " ", detail::shape_str(e.shape),
           " has a byte size that overflows 64 bits");

    const auto& jo = v["data_offsets"];
    if (!jo.is_array() || jo.size() != 2)
      fail("tensor '", name, "' data_offsets must be an array of 2 integers, found ", jo.dump());
    for (std::size_t i = 0; i < 2; ++i)
      if (!jo[i].is_number_unsigned())
        fail("tensor '", name, "' data_offsets[", i, "] is ", jo[i].dump(),
             ", expected a non-negative integer");
    e.begin = jo[0].get<std::uint64_t>();
    e.end = jo[1].get<std::uint64_t>();
    if (e.begin > e.end)
      fail("tensor '", name, "' data_offsets [", e.begin, ", ", e.end, "] have begin > end");
    if (e.end > data_len)
      fail("tensor '", name, "' data_offsets [", e.begin, ", ", e.end,
           "] are out of bounds of the data buffer of ", data_len, " bytes");
    if (e.end - e.begin != expected)
      fail("tensor '", name, "' has data_offsets [", e.begin, ", ", e.end, "] (", e.end - e.begin,
           " bytes), expected ", expected, " bytes for ", dtype_name(e.dtype), " ",
           detail::shape_str(e.shape));
    return e;
  }

  std::string path_;
  std::vector<std::uint8_t> owned_;  // from_memory
  void* map_ = nullptr;              // open
  std::size_t map_size_ = 0;
  const std::uint8_t* base_ = nullptr;
  std::size_t size_ = 0;
  std::size_t data_offset_ = 0;
  std::vector<std::string> names_;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors, then writes them in the order added. add() only references the caller's
// memory (which must stay alive until write()); add_copy() keeps its own copy.
class Writer {
 public:
  void add(const std::string& name, DType dtype, std::vector<std::int64_t> shape, const void* data,
           std::size_t nbytes) {
    add_impl(name, dtype, std::move(shape), data, nbytes, false);
  }
  void add_copy(const std::string& name, DType dtype, std::vector<std::int64_t> shape, const void* data,
                std::size_t nbytes) {
    add_impl(name, dtype, std::move(shape), data, nbytes, true);
  }
  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

  void write(const std::string& path) const {
    AtomicFile f(path);
    emit([&](const void* p, std::size_t n) { f.write(p, n); });
    f.commit();
  }

  // The whole file in memory (tests, fuzzing, small files).
  std::vector<std::uint8_t> to_bytes() const {
    std::vector<std::uint8_t> out;
    emit([&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::uint8_t*>(p);
      out.insert(out.end(), b, b + n);
    });
    return out;
  }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<std::int64_t> shape;
    const std::uint8_t* data;  // caller's memory, or nullptr when `copy` holds the bytes
    std::size_t nbytes;
    std::vector<std::uint8_t> copy;
    const std::uint8_t* bytes() const { return data ? data : copy.data(); }
  };

  void add_impl(const std::string& name, DType dtype, std::vector<std::int64_t> shape, const void* data,
                std::size_t nbytes, bool copy) {
    QLORA_CHECK(name != "__metadata__", "safetensors writer: '__metadata__' is reserved, not a tensor name");
    QLORA_CHECK(!names_.count(name), "safetensors writer: duplicate tensor name '", name, "'");
    for (std::size_t i = 0; i < shape.size(); ++i)
      QLORA_CHECK(shape[i] >= 0, "safetensors writer: tensor '", name, "' shape[", i, "] is ", shape[i],
                  ", expected a non-negative integer");
    std::uint64_t expected = 0;
    QLORA_CHECK(detail::byte_size(shape, dtype, expected), "safetensors writer: tensor '", name, "' ",
                dtype_name(dtype), " ", detail::shape_str(shape), " has a byte size that overflows 64 bits");
    QLORA_CHECK(nbytes == expected, "safetensors writer: tensor '", name, "' has ", nbytes,
                " bytes, expected ", expected, " for ", dtype_name(dtype), " ", detail::shape_str(shape));
    QLORA_CHECK(data || nbytes == 0, "safetensors writer: tensor '", name, "' has null data and ", nbytes,
                " bytes");
    Entry e{name, dtype, std::move(shape), static_cast<const std::uint8_t*>(data), nbytes, {}};
    if (copy) {
      if (nbytes) e.copy.assign(e.data, e.data + nbytes);
      e.data = nullptr;
    }
    names_.insert(name);
    entries_.push_back(std::move(e));
  }

  // The header, padded with spaces so that 8 + its length is a multiple of 8.
  std::string header() const {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::uint64_t at = 0;
    for (const Entry& e : entries_) {
      h[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {at, at + e.nbytes}}};
      at += e.nbytes;
    }
    std::string s;
    try {
      s = h.dump();
    } catch (const nlohmann::json::exception& e) {  // a name or metadata string that is not UTF-8
      throw_error("safetensors writer: cannot encode the header: ", e.what());
    }
    s.append((8 - s.size() % 8) % 8, ' ');
    return s;
  }

  template <class Sink>
  void emit(Sink&& sink) const {
    const std::string h = header();
    std::uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = std::uint8_t(std::uint64_t(h.size()) >> (8 * i));
    sink(len, 8);
    sink(h.data(), h.size());
    for (const Entry& e : entries_)
      if (e.nbytes) sink(e.bytes(), e.nbytes);
  }

  std::vector<Entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace safetensors
}  // namespace qlora
