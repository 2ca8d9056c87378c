# bf16 GEMM engine benchmark (not a test): kiln's AVX512-BF16 kernel, oneDNN's matmul (when Debian's
# libdnnl-dev is installed; scripts/setup.sh installs it) and OpenBLAS sbgemm (when the library exports
# it), each against fp32 sgemm at the GPT-2 training shapes. oneDNN is only a peer here: the library
# itself does not link it.
add_executable(lowp_gemm_bench ${CMAKE_SOURCE_DIR}/bench/lowp_gemm_bench.cpp)
target_link_libraries(lowp_gemm_bench PRIVATE kiln_lib ${CMAKE_DL_LIBS})
set_target_properties(lowp_gemm_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
find_path(KILN_DNNL_INCLUDE oneapi/dnnl/dnnl.hpp)
find_library(KILN_DNNL_LIB dnnl)
if(KILN_DNNL_INCLUDE AND KILN_DNNL_LIB)
  target_compile_definitions(lowp_gemm_bench PRIVATE KILN_HAVE_DNNL)
  target_include_directories(lowp_gemm_bench PRIVATE ${KILN_DNNL_INCLUDE})
  target_link_libraries(lowp_gemm_bench PRIVATE ${KILN_DNNL_LIB})
endif()
