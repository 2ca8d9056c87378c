# End-to-end test of the tokenizer and data-prepare commands as a user runs them (stdlib Python only).
add_test(NAME e2e.tokenizer_cli
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/tokenizer_cli.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/tokenizer_cli)
set_tests_properties(e2e.tokenizer_cli PROPERTIES LABELS e2e TIMEOUT 120)

# The tokenizer and data-prepare code (which read arbitrary bytes and user files) built a second time with
# AddressSanitizer and UBSan, running the same unit tests. ctest -L sanitize runs it.
file(GLOB KILN_TOKENIZER_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tokenizer/*.cpp)
add_executable(kiln_tokenizer_sanitize_tests ${KILN_TOKENIZER_SOURCES}
  ${CMAKE_SOURCE_DIR}/train/doc_index.cpp ${CMAKE_SOURCE_DIR}/train/prepare.cpp ${CMAKE_SOURCE_DIR}/train/shards.cpp
  ${CMAKE_SOURCE_DIR}/core/file_io.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/test_tokenizer.cpp ${CMAKE_CURRENT_SOURCE_DIR}/test_tokenizer_hf.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/test_data_prepare.cpp)
set(KILN_TOKENIZER_SANITIZE_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
target_include_directories(kiln_tokenizer_sanitize_tests PRIVATE ${CMAKE_SOURCE_DIR})
target_compile_options(kiln_tokenizer_sanitize_tests PRIVATE ${KILN_TOKENIZER_SANITIZE_FLAGS} -O1 -g1)
target_link_options(kiln_tokenizer_sanitize_tests PRIVATE ${KILN_TOKENIZER_SANITIZE_FLAGS})
target_link_libraries(kiln_tokenizer_sanitize_tests PRIVATE OpenMP::OpenMP_CXX nlohmann_json::nlohmann_json
                                                            GTest::gtest GTest::gtest_main)
target_compile_definitions(kiln_tokenizer_sanitize_tests PRIVATE KILN_SOURCE_DIR="${CMAKE_SOURCE_DIR}"
                                                                 KILN_BINARY_DIR="${CMAKE_BINARY_DIR}")
add_test(NAME sanitize.tokenizer COMMAND kiln_tokenizer_sanitize_tests)
set_tests_properties(sanitize.tokenizer PROPERTIES LABELS sanitize TIMEOUT 300)
