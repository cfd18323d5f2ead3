// safetensors read/write: round trips of every dtype, a file from the Python reference writer,
// a corpus of broken files that must each be rejected with a specific message, atomic writes.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "qlora/core/half.hpp"
#include "qlora/io/atomic_file.hpp"
#include "qlora/io/safetensors.hpp"

using namespace qlora;
namespace st = qlora::safetensors;

namespace {

const std::string kDataDir = std::string(QLORA_TEST_DATA_DIR) + "/safetensors";

// A fresh empty directory under $TMPDIR, removed (with its files) at scope exit.
struct TempDir {
  std::string path;
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/qlora_st_XXXXXX";
    REQUIRE(::mkdtemp(&tmpl[0]) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    for (const auto& f : list()) ::unlink((path + "/" + f).c_str());
    ::rmdir(path.c_str());
  }
  std::vector<std::string> list() const {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(path.c_str())) {
      while (dirent* e = ::readdir(d))
        if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") out.push_back(e->d_name);
      ::closedir(d);
    }
    return out;
  }
};

std::vector<std::uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), {});
}

template <class T>
std::vector<T> view_as(const st::TensorView& v) {
  return v.copy_as<T>();
}

// Raw bytes of a header + data, with the real header length (no padding).
std::vector<std::uint8_t> make_file(const std::string& header, const std::vector<std::uint8_t>& data) {
  std::vector<std::uint8_t> out(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out[i] = std::uint8_t(std::uint64_t(header.size()) >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + std::ptrdiff_t(header.size()));
  return out;
}

}  // namespace

TEST_CASE("safetensors: round trip of every dtype, metadata, 0-d and empty tensors", "[safetensors]") {
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, -0.0f, std::numeric_limits<float>::infinity()};
  std::vector<fp16> f16(5);
  std::vector<bf16> b16(5);
  const float halves[5] = {1.0f, -0.5f, 65504.0f, 0.099975586f, -3.0f};
  for (int i = 0; i < 5; ++i) {
    f16[i] = to_fp16(halves[i]);
    b16[i] = to_bf16(halves[i]);
  }
  const std::vector<std::uint8_t> u8 = {0, 1, 127, 128, 255};
  const std::vector<std::int8_t> i8 = {-128, -1, 0, 1, 127};
  const std::vector<std::int32_t> i32 = {std::numeric_limits<std::int32_t>::min(), -1, 0, 7,
                                         std::numeric_limits<std::int32_t>::max(), 42};
  const std::vector<std::int64_t> i64 = {std::numeric_limits<std::int64_t>::min(), -5,
                                         std::numeric_limits<std::int64_t>::max()};
  const float scalar = 7.5f;

  st::Writer w;
  w.add("f32", DType::F32, {2, 3}, f32.data(), f32.size() * 4);
  w.add("f16", DType::F16, {5}, f16.data(), 10);
  w.add("bf16", DType::BF16, {5, 1}, b16.data(), 10);
  w.add("u8", DType::U8, {5}, u8.data(), 5);
  w.add("i8", DType::I8, {5}, i8.data(), 5);
  w.add("i32", DType::I32, {3, 2}, i32.data(), i32.size() * 4);
  w.add("i64", DType::I64, {3}, i64.data(), i64.size() * 8);
  w.add_copy("scalar", DType::F32, {}, &scalar, 4);
  w.add("empty", DType::F32, {0}, nullptr, 0);
  w.add("empty2d", DType::BF16, {4, 0}, nullptr, 0);
  w.set_metadata("format", "pt");
  w.set_metadata("ünïcode", "välue ✓");

  TempDir dir;
  const std::string path = dir.path + "/all.safetensors";
  w.write(path);
  REQUIRE(read_bytes(path) == w.to_bytes());

  const st::File f = st::File::open(path);
  CHECK(f.path() == path);
  CHECK(f.data_offset() % 8 == 0);  // the writer pads the header to 8-byte alignment
  const std::vector<std::string> order = {"f32", "f16", "bf16",   "u8",    "i8",
                                          "i32", "i64", "scalar", "empty", "empty2d"};
  CHECK(f.names() == order);  // offsets follow the order tensors were added
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"ünïcode", "välue ✓"}});

  auto v = f.get("f32");
  CHECK(v.dtype == DType::F32);
  CHECK(v.shape == std::vector<std::int64_t>{2, 3});
  CHECK(v.numel() == 6);
  CHECK(v.nbytes == 24);
  CHECK(v.to_f32() == f32);
  CHECK(std::signbit(v.to_f32()[4]));

  auto vh = f.get("f16");
  CHECK(vh.dtype == DType::F16);
  const auto h = view_as<fp16>(vh);
  for (int i = 0; i < 5; ++i) CHECK(h[i].bits == f16[i].bits);
  const auto hf = vh.to_f32();
  for (int i = 0; i < 5; ++i) CHECK(hf[i] == to_float(f16[i]));

  auto vb = f.get("bf16");
  CHECK(vb.dtype == DType::BF16);
  CHECK(vb.shape == std::vector<std::int64_t>{5, 1});
  const auto b = view_as<bf16>(vb);
  for (int i = 0; i < 5; ++i) CHECK(b[i].bits == b16[i].bits);
  const auto bf = vb.to_f32();
  for (int i = 0; i < 5; ++i) CHECK(bf[i] == to_float(b16[i]));

  CHECK(view_as<std::uint8_t>(f.get("u8")) == u8);
  CHECK(view_as<std::int8_t>(f.get("i8")) == i8);
  CHECK(view_as<std::int32_t>(f.get("i32")) == i32);
  CHECK(view_as<std::int64_t>(f.get("i64")) == i64);
  CHECK(f.get("i64").dtype == DType::I64);

  auto vs = f.get("scalar");
  CHECK(vs.shape.empty());
  CHECK(vs.numel() == 1);
  CHECK(vs.to_f32() == std::vector<float>{7.5f});

  for (const char* name : {"empty", "empty2d"}) {
    auto ve = f.get(name);
    CHECK(ve.numel() == 0);
    CHECK(ve.nbytes == 0);
    CHECK(ve.to_f32().empty());
  }

  // Integer data is not silently converted, and element sizes must match.
  REQUIRE_THROWS_WITH(f.get("i32").to_f32(), Catch::Contains("to_f32() of a I32 tensor"));
  REQUIRE_THROWS_WITH(f.get("f32").copy_as<std::uint16_t>(), Catch::Contains("sizeof(T) = 2, expected 4"));
  REQUIRE_THROWS_WITH(f.get("nope"), Catch::Contains("safetensors '" + path + "': no tensor 'nope'"));
  CHECK(f.contains("bf16"));
  CHECK_FALSE(f.contains("nope"));

  // The same bytes parse identically from memory; a moved File keeps its views valid.
  st::File m = st::File::from_memory(w.to_bytes(), "mem");
  st::File moved = std::move(m);
  CHECK(moved.path() == "mem");
  CHECK(moved.get("i64").copy_as<std::int64_t>() == i64);
  st::File reassigned = st::File::open(path);
  reassigned = std::move(moved);
  CHECK(reassigned.get("f32").to_f32() == f32);
}

TEST_CASE("safetensors: an empty file '{}' is valid", "[safetensors]") {
  st::Writer w;
  const auto bytes = w.to_bytes();
  REQUIRE(bytes.size() == 16);  // 8 + "{}" padded to 8
  const auto f = st::File::from_memory(bytes);
  CHECK(f.names().empty());
  CHECK(f.metadata().empty());
  CHECK(st::File::from_memory(make_file("{}", {})).names().empty());
}

TEST_CASE("safetensors: an empty tensor whose partial element count passes INT64_MAX", "[safetensors]") {
  // Accepted by the Rust reader (only the full product must fit); numel() must not overflow.
  const auto f = st::File::from_memory(
      make_file(R"({"e":{"dtype":"U8","shape":[4294967296,2147483648,0],"data_offsets":[0,0]}})", {}));
  CHECK(f.get("e").numel() == 0);
  CHECK(f.get("e").copy_as<std::uint8_t>().empty());
}

TEST_CASE("safetensors: file written by Python's safetensors.numpy", "[safetensors]") {
  const auto f = st::File::open(kDataDir + "/python_written.safetensors");
  // Python orders data by dtype alignment then name; names() follows data offsets.
  CHECK(f.names() ==
        std::vector<std::string>{"i64", "f64", "empty", "f32", "scalar", "i32", "f16", "i8", "u8"});
  CHECK(f.metadata() ==
        std::map<std::string, std::string>{{"format", "np"}, {"note", "written by safetensors.numpy"}});

  auto f32 = f.get("f32");
  CHECK(f32.shape == std::vector<std::int64_t>{3, 4});
  const auto x = f32.to_f32();
  REQUIRE(x.size() == 12);
  for (int i = 0; i < 12; ++i) CHECK(x[i] == float(i) * 0.5f - 1.0f);

  const auto h = f.get("f16").to_f32();
  CHECK(h == std::vector<float>{1.5f, -2.25f, 65504.0f, std::ldexp(1.0f, -24), 0.0f, -0.0f});
  CHECK(std::signbit(h[5]));

  auto f64 = f.get("f64");
  CHECK(f64.shape == std::vector<std::int64_t>{2, 1});
  CHECK(f64.copy_as<double>() == std::vector<double>{1.0 / 3.0, -1e300});
  CHECK(f64.to_f32()[0] == float(1.0 / 3.0));

  CHECK(f.get("i64").copy_as<std::int64_t>() ==
        std::vector<std::int64_t>{std::numeric_limits<std::int64_t>::min(),
                                  std::numeric_limits<std::int64_t>::max(), 0, -1});
  CHECK(f.get("i32").copy_as<std::int32_t>() ==
        std::vector<std::int32_t>{-7, 8, std::numeric_limits<std::int32_t>::max(),
                                  std::numeric_limits<std::int32_t>::min()});
  CHECK(f.get("i8").copy_as<std::int8_t>() == std::vector<std::int8_t>{-128, 127, 0, -1, 5});
  CHECK(f.get("u8").copy_as<std::uint8_t>() == std::vector<std::uint8_t>{250, 251, 252, 253, 254, 255});
  CHECK(f.get("scalar").shape.empty());
  CHECK(f.get("scalar").to_f32() == std::vector<float>{3.25f});
  CHECK(f.get("empty").shape == std::vector<std::int64_t>{0});
  CHECK(f.get("empty").nbytes == 0);
}

TEST_CASE("safetensors: every broken file is rejected with a message naming the problem", "[safetensors]") {
  // File (without .safetensors) -> a fragment its error message must contain. make_broken.py writes them.
  const std::map<std::string, std::string> expected = {
      {"empty_file", "file is 0 bytes, expected at least 8"},
      {"truncated_header_length", "file is 3 bytes, expected at least 8"},
      {"header_length_past_file", "header length 1000 is larger than the 2 bytes after the length field"},
      {"header_length_over_100mb", "header length 200000000 exceeds the format's limit of 100000000"},
      {"header_length_u64_max", "header length 18446744073709551615 exceeds the format's limit"},
      {"header_empty", "header is empty"},
      {"not_json", "header is not valid JSON"},
      {"json_trailing_garbage", "header is not valid JSON"},
      {"json_array", "header must start with '{', found byte 0x5b"},
      {"invalid_utf8", "header is not valid UTF-8: byte 0xff at header offset 3"},
      {"overlong_utf8", "header is not valid UTF-8: byte 0xc0 at header offset 3"},
      {"control_char_in_string", "header is not valid JSON"},
      {"entry_not_object", "tensor 'w' must be an object, found number"},
      {"missing_dtype", "tensor 'w' is missing key 'dtype'"},
      {"extra_key", "tensor 'w' has unexpected key 'foo'"},
      {"dtype_not_string", "tensor 'w' dtype must be a string, found number"},
      {"unknown_dtype", "tensor 'w' has unknown dtype 'F8'"},
      {"shape_not_array", "tensor 'w' shape must be an array, found number"},
      {"negative_shape", "tensor 'w' shape[1] is -2, expected a non-negative integer"},
      {"float_shape", "tensor 'w' shape[0] is 2.0, expected a non-negative integer"},
      {"shape_past_int64", "shape[0] is 9223372036854775808, larger than the int64 maximum"},
      {"shape_overflow", "F32 [4611686018427387904, 4611686018427387904] has a byte size that overflows"},
      {"byte_size_overflow", "F32 [4611686018427387904] has a byte size that overflows"},
      {"offsets_three_values", "data_offsets must be an array of 2 integers, found [0,8,16]"},
      {"offsets_negative", "data_offsets[0] is -8, expected a non-negative integer"},
      {"offsets_begin_after_end", "data_offsets [8, 0] have begin > end"},
      {"offsets_out_of_bounds", "data_offsets [0, 16] are out of bounds of the data buffer of 8 bytes"},
      {"offsets_overlap",
       "tensor 'b' data_offsets [8, 24] overlap the previous tensor 'a', which ends at 16"},
      {"gap_between_tensors", "gap of 4 bytes before tensor 'b'"},
      {"first_not_at_zero",
       "gap of 8 bytes before tensor 'a' (data_offsets [8, 24]), expected it to begin at 0"},
      {"trailing_bytes",
       "4 trailing bytes after the last tensor: data buffer is 20 bytes, tensors end at 16"},
      {"data_without_tensors", "4 trailing bytes after the last tensor"},
      {"size_mismatch", "tensor 'w' has data_offsets [0, 12] (12 bytes), expected 16 bytes for F32 [2, 2]"},
      {"duplicate_name", "duplicate key 'w'"},
      {"duplicate_key_in_entry", "duplicate key 'dtype'"},
      {"metadata_not_object", "__metadata__ must be an object of strings, found array"},
      {"metadata_value_not_string", "__metadata__ value for key 'k' must be a string, found number"},
  };

  const std::string dir = kDataDir + "/broken";
  std::set<std::string> seen;
  DIR* d = ::opendir(dir.c_str());
  REQUIRE(d != nullptr);
  while (dirent* e = ::readdir(d)) {
    const std::string file = e->d_name;
    const std::string ext = ".safetensors";
    if (file.size() <= ext.size() || file.compare(file.size() - ext.size(), ext.size(), ext) != 0) continue;
    const std::string stem = file.substr(0, file.size() - ext.size());
    seen.insert(stem);
    INFO("file " << file);
    auto it = expected.find(stem);
    REQUIRE(it != expected.end());  // every broken file needs an expected message in the table
    const std::string path = dir + "/" + file;
    REQUIRE_THROWS_AS(st::File::open(path), Error);
    REQUIRE_THROWS_WITH(st::File::open(path),
                        Catch::StartsWith("safetensors '" + path + "': ") && Catch::Contains(it->second));
    // The in-memory parser gives the same verdict.
    REQUIRE_THROWS_WITH(st::File::from_memory(read_bytes(path), "m"), Catch::Contains(it->second));
  }
  ::closedir(d);
  for (const auto& kv : expected) {
    INFO("table entry " << kv.first);
    CHECK(seen.count(kv.first) == 1);  // every table entry has its file
  }
  CHECK(seen.size() >= 15);
}

TEST_CASE("safetensors: open() of a missing path or a directory", "[safetensors]") {
  REQUIRE_THROWS_WITH(st::File::open(kDataDir + "/no_such.safetensors"),
                      Catch::Contains("no_such.safetensors': cannot open: No such file or directory"));
  REQUIRE_THROWS_WITH(st::File::open(kDataDir), Catch::Contains("not a regular file"));
}

TEST_CASE("safetensors: unaligned data reads correct values", "[safetensors]") {
  // Header of 61 bytes: data starts at offset 69, so no float is 4-byte aligned in the file.
  const std::vector<float> a = {1.0f, -2.5f, 3.0e-38f, 1e30f, -0.0f};
  const std::vector<float> hvals = {0.5f, -65504.0f, 3.0f};
  std::vector<std::uint8_t> data(20 + 6 + 6);
  std::memcpy(data.data(), a.data(), 20);
  for (int i = 0; i < 3; ++i) {
    const std::uint16_t hb = to_fp16(hvals[i]).bits, bb = to_bf16(hvals[i]).bits;
    std::memcpy(&data[20 + 2 * i], &hb, 2);
    std::memcpy(&data[26 + 2 * i], &bb, 2);
  }
  std::string header = R"({"a":{"dtype":"F32","shape":[5],"data_offsets":[0,20]},)"
                       R"("h":{"dtype":"F16","shape":[3],"data_offsets":[20,26]},)"
                       R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[26,32]}})";
  header += " ";  // a padding space is allowed, and keeps the length odd
  REQUIRE(header.size() % 2 == 1);
  const auto bytes = make_file(header, data);

  TempDir dir;
  const std::string path = dir.path + "/unaligned.safetensors";
  write_file_atomic(path, bytes.data(), bytes.size());
  const auto f = st::File::open(path);
  REQUIRE(f.data_offset() % 4 != 0);
  CHECK(f.get("a").to_f32() == a);
  CHECK(std::signbit(f.get("a").to_f32()[4]));
  CHECK(f.get("h").to_f32() == hvals);  // exact in fp16
  CHECK(f.get("b").to_f32() == std::vector<float>{0.5f, to_float(to_bf16(-65504.0f)), 3.0f});
  CHECK(f.names() == std::vector<std::string>{"a", "h", "b"});
}

TEST_CASE("safetensors: to_f32 of F16 and BF16 covers specials", "[safetensors]") {
  const std::vector<std::uint16_t> h = {0x3c00, 0xc000, 0x7c00, 0xfc00, 0x0001,
                                        0x8000, 0x7bff, 0x3555, 0x0400};
  const std::vector<std::uint16_t> b = {0x3f80, 0xc000, 0x7f80, 0xff80, 0x0001,
                                        0x8000, 0x7f7f, 0x3eab, 0x4049};
  st::Writer w;
  w.add("h", DType::F16, {9}, h.data(), 18);
  w.add("b", DType::BF16, {3, 3}, b.data(), 18);
  const auto f = st::File::from_memory(w.to_bytes());
  const auto hf = f.get("h").to_f32();  // 9 elements: exercises both the SIMD body and the tail
  const auto bf = f.get("b").to_f32();
  for (std::size_t i = 0; i < h.size(); ++i) {
    CHECK(float_bits(hf[i]) == float_bits(to_float(fp16{h[i]})));
    CHECK(float_bits(bf[i]) == std::uint32_t(b[i]) << 16);
  }
  CHECK(hf[0] == 1.0f);
  CHECK(hf[2] == std::numeric_limits<float>::infinity());
  CHECK(hf[4] == std::ldexp(1.0f, -24));
  CHECK(hf[6] == 65504.0f);
  CHECK(bf[1] == -2.0f);
  CHECK(bf[3] == -std::numeric_limits<float>::infinity());
}

TEST_CASE("safetensors: writer rejects bad input", "[safetensors]") {
  st::Writer w;
  const float x[4] = {};
  REQUIRE_THROWS_WITH(w.add("w", DType::F32, {2, 2}, x, 12),
                      Catch::Contains("has 12 bytes, expected 16 for F32 [2, 2]"));
  REQUIRE_THROWS_WITH(w.add("w", DType::F32, {-1}, x, 0), Catch::Contains("shape[0] is -1"));
  REQUIRE_THROWS_WITH(w.add("w", DType::F32, {std::int64_t(1) << 62, 8}, x, 0), Catch::Contains("overflows"));
  REQUIRE_THROWS_WITH(w.add("__metadata__", DType::F32, {4}, x, 16), Catch::Contains("reserved"));
  REQUIRE_THROWS_WITH(w.add("w", DType::F32, {4}, nullptr, 16), Catch::Contains("null data"));
  w.add("w", DType::F32, {4}, x, 16);
  REQUIRE_THROWS_WITH(w.add_copy("w", DType::F32, {4}, x, 16), Catch::Contains("duplicate tensor name 'w'"));
  // Names that are not UTF-8 cannot be encoded in the JSON header.
  w.add("bad\xff", DType::U8, {0}, nullptr, 0);
  REQUIRE_THROWS_WITH(w.to_bytes(), Catch::Contains("cannot encode the header"));
}

TEST_CASE("safetensors: writes are atomic", "[safetensors][atomic]") {
  const float x[2] = {1.0f, 2.0f};
  st::Writer w;
  w.add("x", DType::F32, {2}, x, 8);

  SECTION("a failed write leaves nothing behind") {
    TempDir dir;
    const std::string path = dir.path + "/missing_dir/out.safetensors";
    REQUIRE_THROWS_WITH(w.write(path), Catch::Contains("cannot create a temporary file for '" + path + "'") &&
                                           Catch::Contains("No such file or directory"));
    CHECK(dir.list().empty());
  }

  SECTION("an exception between open and commit removes the temporary, target untouched") {
    TempDir dir;
    const std::string path = dir.path + "/t.bin";
    write_text_atomic(path, "old");
    try {
      AtomicFile f(path);
      f.write("new content", 11);
      CHECK(dir.list().size() == 2);  // target + temporary beside it
      throw std::runtime_error("interrupted");
    } catch (const std::runtime_error&) {
    }
    CHECK(dir.list() == std::vector<std::string>{"t.bin"});
    const auto b = read_bytes(path);
    CHECK(std::string(b.begin(), b.end()) == "old");
  }

  SECTION("overwriting replaces the whole file") {
    TempDir dir;
    const std::string path = dir.path + "/model.safetensors";
    st::Writer big;
    std::vector<float> many(10000, 3.0f);
    big.add("many", DType::F32, {10000}, many.data(), many.size() * 4);
    big.write(path);
    const auto big_size = read_bytes(path).size();
    w.write(path);
    const auto bytes = read_bytes(path);
    CHECK(bytes.size() < big_size);
    CHECK(bytes == w.to_bytes());
    CHECK(dir.list() == std::vector<std::string>{"model.safetensors"});
    const auto f = st::File::open(path);
    CHECK(f.names() == std::vector<std::string>{"x"});
    CHECK(f.get("x").to_f32() == std::vector<float>{1.0f, 2.0f});
  }

  SECTION("copy_file_atomic and text files") {
    TempDir dir;
    const std::string a = dir.path + "/a.safetensors", b = dir.path + "/b.safetensors";
    w.write(a);
    write_text_atomic(b, "to be replaced by a longer file, or a shorter one");
    copy_file_atomic(a, b);
    CHECK(read_bytes(b) == read_bytes(a));
    REQUIRE_THROWS_WITH(copy_file_atomic(dir.path + "/nope", b),
                        Catch::Contains("cannot open '" + dir.path + "/nope'"));
    CHECK(read_bytes(b) == read_bytes(a));
    AtomicFile f(dir.path + "/c");
    f.commit();
    REQUIRE_THROWS_WITH(f.commit(), Catch::Contains("called twice"));
    REQUIRE_THROWS_WITH(f.write("x", 1), Catch::Contains("after commit()"));
    CHECK(read_bytes(dir.path + "/c").empty());
  }
}
