# Kernel benchmarks (not tests): gemm_bench prints sgemm GFLOP/s for the GPT-2 training shapes beside a
# large square sgemm measured in the same run, and the other CPU kernels against their ref:: versions.
add_executable(gemm_bench ${CMAKE_SOURCE_DIR}/bench/gemm_bench.cpp)
target_link_libraries(gemm_bench PRIVATE kiln_lib)
set_target_properties(gemm_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})

# Latent-attention decoding (absorbed and plain) beside GQA of the same width: KV bytes/token, tokens/s at 1k.
add_executable(mla_decode_bench ${CMAKE_SOURCE_DIR}/bench/mla_decode_bench.cpp)
target_link_libraries(mla_decode_bench PRIVATE kiln_lib ${KILN_GPU_BACKEND})
set_target_properties(mla_decode_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
# Batch-1 decoding per weight format beside the machine's streaming read bandwidth, measured in the same run.
add_executable(decode_bandwidth_bench ${CMAKE_SOURCE_DIR}/bench/decode_bandwidth_bench.cpp)
target_link_libraries(decode_bandwidth_bench PRIVATE kiln_lib kiln_gpu_emu)
target_compile_definitions(decode_bandwidth_bench PRIVATE KILN_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
set_target_properties(decode_bandwidth_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})

# The MoE layer (nn::MoE, forward + backward) beside the PyTorch reference's same layer (bench/moe_bench.cpp).
add_executable(moe_bench ${CMAKE_SOURCE_DIR}/bench/moe_bench.cpp)
# nn's objects carry the GPU backend's calls too (the unity build puts them in one object): the emulated backend
# resolves them, as for the tests.
target_link_libraries(moe_bench PRIVATE kiln_lib kiln_gpu_emu)
set_target_properties(moe_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
# The decoding batch's products (vecmat_batch / matvec_batch) beside OpenBLAS sgemm at 1-64 rows.
add_executable(batch_gemv_bench ${CMAKE_SOURCE_DIR}/bench/batch_gemv_bench.cpp)
target_link_libraries(batch_gemv_bench PRIVATE kiln_lib)
set_target_properties(batch_gemv_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
# A verification pass (K+1 positions, a Medusa tree) beside the 1-token decoding step of the same decoder.
add_executable(verify_pass_bench ${CMAKE_SOURCE_DIR}/bench/verify_pass_bench.cpp)
target_link_libraries(verify_pass_bench PRIVATE kiln_lib kiln_gpu_emu)
set_target_properties(verify_pass_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
