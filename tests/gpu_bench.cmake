# GPU kernel benchmarks (not tests), built only with the CUDA backend: cuda_attention_bench prints TFLOP/s of
# kiln's FlashAttention forward/backward as JSON lines; bench/attention_vs_torch_cuda.sh sets them beside
# PyTorch's SDPA (flash and cuDNN backends) measured in the same run.
if(KILN_CUDA)
  add_executable(cuda_attention_bench ${CMAKE_SOURCE_DIR}/bench/cuda_attention_bench.cpp)
  target_link_libraries(cuda_attention_bench PRIVATE kiln_lib kiln_cuda)
  set_target_properties(cuda_attention_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR})
endif()
