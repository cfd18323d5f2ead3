#pragma once
// qlora::Error: the one exception type of the library.
//
// Convention: a message names the thing (tensor, file, option), then the expected and the actual
// value, e.g. "safetensors 'model.safetensors': tensor 'w' has data_offsets [0, 12], expected 16
// bytes for F32 [2, 2]". Callers add context by catching and rethrowing with a prefix
// (see with_context), never by swallowing.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace qlora {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
inline void append(std::ostringstream&) {}
template <class T, class... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

// Builds a message from any streamable pieces: throw_error("tensor '", name, "' has ", n, " rows").
template <class... Args>
[[noreturn]] void throw_error(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  throw Error(os.str());
}

// Runs f(); an Error escaping it gets "context: " put in front of its message.
template <class F>
decltype(auto) with_context(const std::string& context, F&& f) {
  try {
    return std::forward<F>(f)();
  } catch (const Error& e) {
    throw Error(context + ": " + e.what());
  }
}

}  // namespace qlora

// QLORA_CHECK(cond, pieces...): throws qlora::Error with the pieces when cond is false.
// Only adds a statement; it never changes the meaning of the code around it.
#define QLORA_CHECK(cond, ...)                      \
  do {                                              \
    if (!(cond)) ::qlora::throw_error(__VA_ARGS__); \
  } while (0)
