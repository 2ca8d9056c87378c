# The weight, config and shard loaders built a second time with AddressSanitizer and UBSan, and fed
# corrupt inputs (tests/sanitize/*.cpp). It compiles the loader sources itself rather than linking
# kiln_lib, which is built without sanitizers. ctest -L sanitize runs it.
set(KILN_LOADER_SOURCES
  ${CMAKE_SOURCE_DIR}/core/file_io.cpp
  ${CMAKE_SOURCE_DIR}/core/safetensors.cpp
  ${CMAKE_SOURCE_DIR}/models/config.cpp
  ${CMAKE_SOURCE_DIR}/models/param_table.cpp
  ${CMAKE_SOURCE_DIR}/models/model_config.cpp
  ${CMAKE_SOURCE_DIR}/models/family.cpp
  ${CMAKE_SOURCE_DIR}/models/checkpoint.cpp
  ${CMAKE_SOURCE_DIR}/train/shards.cpp)
# Every family's file (the family table names them all), as the fuzz build takes them.
file(GLOB KILN_LOADER_FAMILY_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/models/families/*.cpp)
list(APPEND KILN_LOADER_SOURCES ${KILN_LOADER_FAMILY_SOURCES})
file(GLOB KILN_SANITIZE_TEST_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/sanitize/*.cpp)
set(KILN_SANITIZE_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)

add_executable(kiln_loader_sanitize_tests ${KILN_LOADER_SOURCES} ${KILN_SANITIZE_TEST_SOURCES})
target_include_directories(kiln_loader_sanitize_tests PRIVATE ${CMAKE_SOURCE_DIR} ${CMAKE_CURRENT_SOURCE_DIR})
# -O1 -g1 after the build type's -O3: sanitizer reports with file and line (-g1: line tables only, a quarter
# less compile time than -g) at a speed that keeps the run short.
target_compile_options(kiln_loader_sanitize_tests PRIVATE ${KILN_SANITIZE_FLAGS} -O1 -g1)
target_link_options(kiln_loader_sanitize_tests PRIVATE ${KILN_SANITIZE_FLAGS})
target_link_libraries(kiln_loader_sanitize_tests PRIVATE nlohmann_json::nlohmann_json GTest::gtest GTest::gtest_main)
target_compile_definitions(kiln_loader_sanitize_tests PRIVATE KILN_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
gtest_discover_tests(kiln_loader_sanitize_tests DISCOVERY_TIMEOUT 60
  PROPERTIES LABELS sanitize
             ENVIRONMENT "ASAN_OPTIONS=detect_leaks=1:abort_on_error=0;UBSAN_OPTIONS=print_stacktrace=1")
