# `qlora eval` and `qlora generate` run against the tiny Llama checkpoints of tests/data/llama
# (included from tests/CMakeLists.txt). tests/cli/run_model.cmake holds the cases:
#   cli_eval             the printed loss equals transformers' (info.json), with and without the
#                        adapter; --logits writes [2, 24, 256] F32; --text runs
#   cli_eval_errors      missing --model, a missing folder, ids outside the vocabulary, bad --quant ...
#   cli_generate         greedy prints the prompt and a continuation; a seed repeats its text
#   cli_generate_errors  bad --top-p / --temperature, no tokenizer for a small vocabulary
if(TARGET qlora_cli AND TARGET qlora_make_toy)
  foreach(_case eval eval_errors generate generate_errors)
    add_test(NAME cli_${_case}
      COMMAND ${CMAKE_COMMAND}
        -DQLORA=$<TARGET_FILE:qlora_cli> -DMAKE_TOY=$<TARGET_FILE:qlora_make_toy>
        -DDATA=${CMAKE_CURRENT_SOURCE_DIR}/data/llama
        -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/cli_${_case} -DCASE=${_case}
        -P ${CMAKE_CURRENT_SOURCE_DIR}/cli/run_model.cmake)
    set_tests_properties(cli_${_case} PROPERTIES LABELS cli TIMEOUT 300)
  endforeach()
endif()
