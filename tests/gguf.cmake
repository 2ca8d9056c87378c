# GGUF export: the writer, reader and export also build apart from kiln_lib (just the sources they need), so the
# unit tests link on their own.
set(KILN_GGUF_SOURCES ${CMAKE_SOURCE_DIR}/core/gguf.cpp ${CMAKE_SOURCE_DIR}/core/file_io.cpp
                      ${CMAKE_SOURCE_DIR}/models/gguf_export.cpp ${CMAKE_SOURCE_DIR}/models/param_table.cpp
                      ${CMAKE_SOURCE_DIR}/models/model_config.cpp)
add_library(kiln_gguf STATIC ${KILN_GGUF_SOURCES})
target_include_directories(kiln_gguf PUBLIC ${CMAKE_SOURCE_DIR} ${CMAKE_CURRENT_SOURCE_DIR})

add_executable(kiln_gguf_tests ${CMAKE_CURRENT_SOURCE_DIR}/test_gguf.cpp)
target_link_libraries(kiln_gguf_tests PRIVATE kiln_gguf GTest::gtest GTest::gtest_main)
target_compile_definitions(kiln_gguf_tests PRIVATE KILN_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
gtest_discover_tests(kiln_gguf_tests TEST_PREFIX gguf. DISCOVERY_TIMEOUT 60 PROPERTIES LABELS unit)

# llama.cpp (node-llama-cpp, scripts/setup.sh) against `kiln export`, `kiln generate` and `kiln tokenizer encode`
# on tiny checkpoints of every family the script writes; skipped (77) when the npm package is not installed.
add_test(NAME e2e.gguf_llama_cpp
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/e2e/gguf_llama_cpp.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/gguf_llama_cpp)
set_tests_properties(e2e.gguf_llama_cpp PROPERTIES LABELS e2e TIMEOUT 300 SKIP_RETURN_CODE 77)

# Bad input to `kiln export`: one-line errors, non-zero exits, no file left behind.
add_test(NAME e2e.export_errors
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/e2e/export_errors.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/export_errors)
set_tests_properties(e2e.export_errors PROPERTIES LABELS e2e TIMEOUT 120)

# deepseek_v3 exported as llama.cpp's deepseek2 (absorbed latent attention) against llama.cpp and PyTorch.
add_test(NAME e2e.gguf_deepseek_llama_cpp
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/e2e/gguf_deepseek_llama_cpp.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/gguf_deepseek_llama_cpp)
set_tests_properties(e2e.gguf_deepseek_llama_cpp PROPERTIES LABELS e2e TIMEOUT 300 SKIP_RETURN_CODE 77)
