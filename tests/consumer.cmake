# Consumer tests: build a tiny program against qlora the way a user would.
#   consumer_find_package     install this source tree into a temporary prefix, then
#                             find_package(qlora) from tests/consumer/find_package
#   consumer_add_subdirectory add_subdirectory(<qlora source>) from tests/consumer/add_subdirectory,
#                             checking that none of qlora's own tests/examples/benchmarks are built
# Each runs tests/consumer/run.cmake (cmake -P) in its own fresh directory under the build tree.
# Included from tests/CMakeLists.txt.
foreach(_qlora_consumer find_package add_subdirectory)
  add_test(NAME consumer_${_qlora_consumer}
    COMMAND ${CMAKE_COMMAND}
      -DMODE=${_qlora_consumer}
      -DQLORA_SOURCE_DIR=${PROJECT_SOURCE_DIR}
      -DCONSUMER_SOURCE_DIR=${CMAKE_CURRENT_SOURCE_DIR}/consumer/${_qlora_consumer}
      -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/consumer/${_qlora_consumer}
      -DGENERATOR=${CMAKE_GENERATOR}
      -DCXX_COMPILER=${CMAKE_CXX_COMPILER}
      -P ${CMAKE_CURRENT_SOURCE_DIR}/consumer/run.cmake)
  set_tests_properties(consumer_${_qlora_consumer} PROPERTIES LABELS consumer TIMEOUT 300)
endforeach()
