# The op table (tests/ops/): every op's cases declared once, run on each backend. Like tests/gpu.cmake, the
# same sources build twice: kiln_ops_tests_emu runs the CPU kernels, the reference's own gradient checks and
# the CUDA kernels on the SIMT emulator (label unit); kiln_ops_tests runs the CUDA kernels on the real device
# (label cuda; each test skips when no GPU is present).
set(KILN_OPS_TEST_SOURCES ${CMAKE_SOURCE_DIR}/tests/ops/op_table.cpp ${CMAKE_SOURCE_DIR}/tests/ops/op_runner.cpp
                          ${CMAKE_SOURCE_DIR}/tests/ops/op_table_images.cpp
                          ${CMAKE_SOURCE_DIR}/tests/ops/op_table_moe.cpp)

add_executable(kiln_ops_tests_emu ${KILN_OPS_TEST_SOURCES})
# gtest first: its string instantiations must not pull kiln_lib members (and the GPU backend) in after the
# backend archive.
target_link_libraries(kiln_ops_tests_emu PRIVATE GTest::gtest kiln_lib kiln_gpu_emu)
target_compile_definitions(kiln_ops_tests_emu PRIVATE KILN_TEST_EMULATED=1)
# One ctest entry per suite, not per op: each process first builds the whole table with its random inputs
# (0.6 s, 1.1 s under ASan), which was most of the time of 146 one-op processes per binary. A failure's output
# names the op, backend and case.
foreach(suite OpsForward OpsGradient)
  add_test(NAME ops_emu.${suite} COMMAND kiln_ops_tests_emu --gtest_filter=${suite}.*)
  set_tests_properties(ops_emu.${suite} PROPERTIES LABELS unit)
endforeach()

if(KILN_CUDA)
  add_executable(kiln_ops_tests ${KILN_OPS_TEST_SOURCES})
  target_link_libraries(kiln_ops_tests PRIVATE GTest::gtest kiln_lib kiln_cuda)
  gtest_discover_tests(kiln_ops_tests DISCOVERY_MODE PRE_TEST TEST_PREFIX "ops_cuda." PROPERTIES LABELS cuda)
endif()

# The table once more with AddressSanitizer and UBSan over the emulated kernels (label sanitize, as
# kiln_gpu_tests_emu_asan in tests/gpu.cmake): the odd shapes and misaligned pointers must stay inside
# their buffers and shared tiles. (KILN_GPU_SANITIZE_FLAGS: tests/gpu.cmake, included before this file.)
add_executable(kiln_ops_tests_emu_asan ${KILN_OPS_TEST_SOURCES} $<TARGET_OBJECTS:kiln_gpu_emu_asan>)
target_include_directories(kiln_ops_tests_emu_asan PRIVATE ${CMAKE_SOURCE_DIR})
target_compile_options(kiln_ops_tests_emu_asan PRIVATE ${KILN_GPU_SANITIZE_FLAGS} -O1 -g1)
target_link_options(kiln_ops_tests_emu_asan PRIVATE ${KILN_GPU_SANITIZE_FLAGS})
target_link_libraries(kiln_ops_tests_emu_asan PRIVATE kiln_lib GTest::gtest)
target_compile_definitions(kiln_ops_tests_emu_asan PRIVATE KILN_TEST_EMULATED=1)
foreach(suite OpsForward OpsGradient)  # one entry per suite, as ops_emu.*
  add_test(NAME ops_emu_asan.${suite} COMMAND kiln_ops_tests_emu_asan --gtest_filter=${suite}.*)
  set_tests_properties(ops_emu_asan.${suite} PROPERTIES LABELS sanitize
    ENVIRONMENT "ASAN_OPTIONS=detect_leaks=0:abort_on_error=0;UBSAN_OPTIONS=print_stacktrace=1")
endforeach()
# The op table's files each define their own small helpers (make, fmt, dot, ...): compiled one by one.
set_target_properties(kiln_ops_tests_emu kiln_ops_tests_emu_asan PROPERTIES UNITY_BUILD OFF)
if(KILN_CUDA)
  set_target_properties(kiln_ops_tests PROPERTIES UNITY_BUILD OFF)
endif()
