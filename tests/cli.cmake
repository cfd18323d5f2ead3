# The qlora command-line tool, run the way a user runs it (included from tests/CMakeLists.txt).
# cli_quantize: qlora_make_toy writes a small Llama folder, `qlora quantize` turns it into NF4 and
# tests/cli/run_quantize.cmake checks the printed report and the files; cli_quantize_errors checks exit
# codes and messages for bad input.
if(TARGET qlora_cli AND TARGET qlora_make_toy)
  foreach(_case quantize quantize_errors)
    add_test(NAME cli_${_case}
      COMMAND ${CMAKE_COMMAND}
        -DQLORA=$<TARGET_FILE:qlora_cli> -DMAKE_TOY=$<TARGET_FILE:qlora_make_toy>
        -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/cli_${_case} -DCASE=${_case}
        -P ${CMAKE_CURRENT_SOURCE_DIR}/cli/run_quantize.cmake)
    set_tests_properties(cli_${_case} PROPERTIES LABELS cli TIMEOUT 120)
  endforeach()
endif()
