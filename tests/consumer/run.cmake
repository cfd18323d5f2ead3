# cmake -DMODE=find_package|add_subdirectory -DQLORA_SOURCE_DIR=... -DCONSUMER_SOURCE_DIR=...
#       -DWORK_DIR=... [-DGENERATOR=...] [-DCXX_COMPILER=...] -P run.cmake
# Builds and runs one consumer project (see tests/consumer.cmake). WORK_DIR is wiped first.
cmake_minimum_required(VERSION 3.18)
foreach(v MODE QLORA_SOURCE_DIR CONSUMER_SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "run.cmake: -D${v}=... is required")
  endif()
endforeach()

set(_gen_args)
if(GENERATOR)
  list(APPEND _gen_args -G "${GENERATOR}")
endif()
if(CXX_COMPILER)
  list(APPEND _gen_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()

# step(NAME cmd...): run a command, fail with its output when it fails.
function(step name)
  list(JOIN ARGN " " _cmd)
  message(STATUS "[${MODE}] ${name}: ${_cmd}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[${MODE}] ${name} failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

if(MODE STREQUAL "find_package")
  set(prefix "${WORK_DIR}/prefix")
  step("configure qlora" ${CMAKE_COMMAND} -S "${QLORA_SOURCE_DIR}" -B "${WORK_DIR}/qlora-build" ${_gen_args}
       -DQLORA_BUILD_TESTS=OFF -DQLORA_BUILD_EXAMPLES=OFF -DQLORA_BUILD_BENCHMARKS=OFF -DQLORA_CUDA=OFF
       "-DCMAKE_INSTALL_PREFIX=${prefix}")
  step("build qlora" ${CMAKE_COMMAND} --build "${WORK_DIR}/qlora-build")
  step("install qlora" ${CMAKE_COMMAND} --install "${WORK_DIR}/qlora-build")
  step("configure consumer" ${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/build" ${_gen_args}
       -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${prefix}"
       # only the prefix we just installed may satisfy find_package(qlora)
       -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
  file(STRINGS "${WORK_DIR}/build/CMakeCache.txt" _dir REGEX "^qlora_DIR:")
  string(REGEX REPLACE "^qlora_DIR:[A-Z]*=" "" _dir "${_dir}")
  string(FIND "${_dir}" "${prefix}/" _at)
  if(NOT _at EQUAL 0)
    message(FATAL_ERROR "[${MODE}] find_package(qlora) used '${_dir}', not the fresh install in ${prefix}")
  endif()
elseif(MODE STREQUAL "add_subdirectory")
  step("configure consumer" ${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/build" ${_gen_args}
       -DCMAKE_BUILD_TYPE=Release "-DQLORA_SOURCE_DIR=${QLORA_SOURCE_DIR}" -DQLORA_CUDA=OFF)
  # Nothing of qlora's own test suite may have been generated in the consumer's build.
  if(EXISTS "${WORK_DIR}/build/qlora/tests" OR EXISTS "${WORK_DIR}/build/qlora/examples"
     OR EXISTS "${WORK_DIR}/build/qlora/bench")
    message(FATAL_ERROR "[${MODE}] add_subdirectory(qlora) generated its tests/examples/bench directories")
  endif()
else()
  message(FATAL_ERROR "run.cmake: unknown MODE '${MODE}'")
endif()

step("build consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/build")
set(_exe "${WORK_DIR}/build/consumer")
if(NOT EXISTS "${_exe}")
  message(FATAL_ERROR "[${MODE}] ${_exe} was not built")
endif()
step("run consumer" "${_exe}")
message(STATUS "[${MODE}] ${step_output}")
