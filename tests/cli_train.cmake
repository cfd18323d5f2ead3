# `qlora finetune`, `merge` and `pretrain` on the tiny checkpoints of tests/data/llama (included from
# tests/CMakeLists.txt). tests/cli/run_train.cmake holds the cases:
#   cli_train         held-out loss falls; adapter + loss.csv written; an interrupted run resumed gives
#                     the uninterrupted run's adapter bit for bit; a resume with other batches is refused
#   cli_merge         merged folders give the loss of base + adapter (fp32 and NF4 bases); requantize
#   cli_pretrain      all-weight training lowers the held-out loss and writes a loadable folder
#   cli_train_errors  bad options and data, each an error naming it
if(TARGET qlora_cli)
  foreach(_case train merge pretrain train_errors)
    add_test(NAME cli_${_case}
      COMMAND ${CMAKE_COMMAND} -DQLORA=$<TARGET_FILE:qlora_cli> -DDATA=${CMAKE_CURRENT_SOURCE_DIR}/data/llama
        -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/cli_${_case} -DCASE=${_case}
        -P ${CMAKE_CURRENT_SOURCE_DIR}/cli/run_train.cmake)
    set_tests_properties(cli_${_case} PROPERTIES LABELS cli TIMEOUT 300)
  endforeach()
endif()
