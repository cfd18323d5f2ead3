# shellcheck shell=bash
# Checks that the Debian packages a script needs are installed, and installs the missing ones.
#
#   source scripts/deps.sh cmake g++ libeigen3-dev ...      # check (and install) these
#   qlora_deps cmake g++ ...                                # same, once sourced
#   bash scripts/deps.sh cmake g++ ...                      # standalone
#
# A package counts as present when dpkg says it is installed, or when what it provides is found
# anyway (a header, a CMake config, a compiler on PATH), so a machine with the tools installed
# another way is not forced through apt. Missing packages are installed with apt-get when running
# as root (non-interactive, never reads stdin); otherwise this prints the exact install line and
# exits 1 (it exits the shell that sourced it, which is what the calling scripts want).

# What a package provides, for machines where it was not installed by dpkg.
_qlora_dep_found_without_dpkg() {
  local f
  case "$1" in
    cmake) command -v cmake >/dev/null 2>&1 ;;
    g++) command -v g++ >/dev/null 2>&1 ;;
    clang) command -v clang++ >/dev/null 2>&1 || command -v clang++-14 >/dev/null 2>&1 ;;
    libeigen3-dev) for f in /usr/include/eigen3/Eigen/Core /usr/local/include/eigen3/Eigen/Core \
                            /usr/share/eigen3/cmake/Eigen3Config.cmake; do [ -e "$f" ] && return 0; done; return 1 ;;
    catch2) for f in /usr/include/catch2/catch.hpp /usr/local/include/catch2/catch.hpp; do
              [ -e "$f" ] && return 0; done; return 1 ;;
    nlohmann-json3-dev) for f in /usr/include/nlohmann/json.hpp /usr/local/include/nlohmann/json.hpp; do
                          [ -e "$f" ] && return 0; done; return 1 ;;
    libbenchmark-dev) for f in /usr/include/benchmark/benchmark.h /usr/local/include/benchmark/benchmark.h; do
                        [ -e "$f" ] && return 0; done; return 1 ;;
    libclang-rt-*-dev) compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a" >/dev/null ;;
    gnuplot|gnuplot-nox) command -v gnuplot >/dev/null 2>&1 ;;
    fortunes) [ -e /usr/share/games/fortunes/startrek ] ;;
    *) return 1 ;;
  esac
}

_qlora_dep_installed() {
  if command -v dpkg-query >/dev/null 2>&1 &&
     [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; then
    return 0
  fi
  _qlora_dep_found_without_dpkg "$1"
}

qlora_deps() {
  local pkg missing=()
  for pkg in "$@"; do
    _qlora_dep_installed "$pkg" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "deps: all present ($*)"
    return 0
  fi
  echo "deps: missing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: not running as root; install them with:" >&2
    echo "    sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "deps: apt-get not found; this script expects Debian 12. Install: ${missing[*]}" >&2
    exit 1
  fi
  echo "deps: installing with apt-get: ${missing[*]}"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update </dev/null &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" </dev/null; }; then
    echo "deps: apt-get failed to install: ${missing[*]}" >&2
    exit 1
  fi
  for pkg in "${missing[@]}"; do
    if ! _qlora_dep_installed "$pkg"; then
      echo "deps: $pkg still missing after apt-get install" >&2
      exit 1
    fi
  done
  echo "deps: installed ${missing[*]}"
}

# Sourced or run with arguments: check them now.
if [ $# -gt 0 ]; then
  qlora_deps "$@"
fi
