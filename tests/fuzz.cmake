# A quick pass of each libFuzzer target (fuzz/) over its seed corpus: 2000 executions from a fixed seed, a few
# seconds in all. The fuzzers need the clang build that scripts/fuzz.sh makes (build-fuzz/, or this build when
# it is configured with KILN_FUZZ=ON); without it the tests are skipped (77). ctest -L sanitize runs them.
if(KILN_FUZZ)
  set(KILN_FUZZ_BUILD_DIR_DEFAULT ${CMAKE_BINARY_DIR})
else()
  set(KILN_FUZZ_BUILD_DIR_DEFAULT ${CMAKE_SOURCE_DIR}/build-fuzz)
endif()
set(KILN_FUZZ_BUILD_DIR ${KILN_FUZZ_BUILD_DIR_DEFAULT} CACHE PATH "The build holding fuzz/fuzz_* (scripts/fuzz.sh)")
foreach(t safetensors index config tokenizer gguf request template)
  add_test(NAME fuzz.${t}
           COMMAND bash ${CMAKE_SOURCE_DIR}/scripts/fuzz.sh --no-build --build-dir ${KILN_FUZZ_BUILD_DIR} -runs=2000 ${t})
  set_tests_properties(fuzz.${t} PROPERTIES LABELS sanitize SKIP_RETURN_CODE 77 TIMEOUT 120)
endforeach()
