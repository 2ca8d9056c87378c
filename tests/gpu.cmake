# GPU backend tests (tests/gpu/). The same sources build twice: kiln_gpu_tests_emu runs every CUDA kernel on
# the SIMT emulator (label unit: runs in CI without a GPU); kiln_gpu_tests runs them on the real device
# (label cuda: `ctest -L cuda` on a GPU machine; each test skips when no GPU is present).
file(GLOB KILN_GPU_TEST_SOURCES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/gpu/test_*.cpp)
file(GLOB KILN_GPU_TEST_KERNELS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/gpu/*.cu)

set(KILN_GPU_TEST_EMU_KERNELS "")
foreach(cu ${KILN_GPU_TEST_KERNELS})
  get_filename_component(name ${cu} NAME_WE)
  set(wrapper ${CMAKE_BINARY_DIR}/emu/tests_${name}_emu.cpp)
  file(CONFIGURE OUTPUT ${wrapper} CONTENT "// Generated: tests/gpu/${name}.cu for the SIMT emulator.\n#include \"tests/gpu/${name}.cu\"\n")
  list(APPEND KILN_GPU_TEST_EMU_KERNELS ${wrapper})
endforeach()

add_executable(kiln_gpu_tests_emu ${KILN_GPU_TEST_SOURCES} ${KILN_GPU_TEST_EMU_KERNELS})
target_link_libraries(kiln_gpu_tests_emu PRIVATE GTest::gtest GTest::gtest_main kiln_lib kiln_gpu_emu)
target_compile_definitions(kiln_gpu_tests_emu PRIVATE KILN_TEST_EMULATED=1 KILN_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
gtest_discover_tests(kiln_gpu_tests_emu DISCOVERY_TIMEOUT 60 TEST_PREFIX "emu." PROPERTIES LABELS unit)

if(KILN_CUDA)
  add_executable(kiln_gpu_tests ${KILN_GPU_TEST_SOURCES} ${KILN_GPU_TEST_KERNELS})
  target_link_libraries(kiln_gpu_tests PRIVATE GTest::gtest GTest::gtest_main kiln_lib kiln_cuda)
  target_compile_definitions(kiln_gpu_tests PRIVATE KILN_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
  # Discovery would run the binary at build time; list the tests when ctest runs instead.
  gtest_discover_tests(kiln_gpu_tests DISCOVERY_MODE PRE_TEST TEST_PREFIX "cuda." PROPERTIES LABELS cuda)
endif()

# The CPU stand-in for compute-sanitizer memcheck: the emulated kernels and the GPU tests built again with
# AddressSanitizer and UBSan. Emulated device allocations have their exact size and shared memory is exactly
# the launch's bytes, so a kernel touching one element past a buffer or its shared tile is reported.
set(KILN_GPU_SANITIZE_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
# The sanitized emulator kernels are compiled once, as objects that both sanitized test binaries link (here and
# tests/ops.cmake): they are the largest part of the sanitizer builds.
add_library(kiln_gpu_emu_asan OBJECT ${KILN_EMU_SOURCES})
set_target_properties(kiln_gpu_emu_asan PROPERTIES UNITY_BUILD OFF)  # kernels, as kiln_gpu_emu
target_include_directories(kiln_gpu_emu_asan PRIVATE ${CMAKE_SOURCE_DIR})
target_compile_options(kiln_gpu_emu_asan PRIVATE ${KILN_GPU_SANITIZE_FLAGS} -O1 -g1)
target_link_libraries(kiln_gpu_emu_asan PRIVATE kiln_lib)
add_executable(kiln_gpu_tests_emu_asan ${KILN_GPU_TEST_SOURCES} ${KILN_GPU_TEST_EMU_KERNELS}
               $<TARGET_OBJECTS:kiln_gpu_emu_asan>)
target_include_directories(kiln_gpu_tests_emu_asan PRIVATE ${CMAKE_SOURCE_DIR})
target_compile_options(kiln_gpu_tests_emu_asan PRIVATE ${KILN_GPU_SANITIZE_FLAGS} -O1 -g1)
target_link_options(kiln_gpu_tests_emu_asan PRIVATE ${KILN_GPU_SANITIZE_FLAGS})
target_link_libraries(kiln_gpu_tests_emu_asan PRIVATE kiln_lib GTest::gtest GTest::gtest_main)
target_compile_definitions(kiln_gpu_tests_emu_asan PRIVATE KILN_TEST_EMULATED=1 KILN_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
# Whole-model repeats (recompute policies, AdamW tracking, greedy decoding, the largest attention shapes) run
# only in the plain emulator build: under ASan they cost minutes of CI and reach no kernel that the op table's odd
# shapes (ops_emu_asan.*) and the remaining tests here do not already run sanitized.
gtest_discover_tests(kiln_gpu_tests_emu_asan DISCOVERY_TIMEOUT 60 TEST_PREFIX "emu_asan."
  TEST_FILTER "-*Recomput*:*AdamWStepsTrackTheCpu:*StepsAllocateNothingAfterThePlan:GpuDecoder.GreedyTokensMatchTheCpu:GpuDecoder.Follows*:GpuMedusa.*:GpuMTP.*:AttentionGpu.BackwardBatchedHd128:AttentionGpu.BackwardPackedSequences"
  PROPERTIES LABELS sanitize
             ENVIRONMENT "ASAN_OPTIONS=detect_leaks=0:abort_on_error=0;UBSAN_OPTIONS=print_stacktrace=1")
