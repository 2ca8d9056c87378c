# End-to-end tests against the PyTorch reference (Debian's python3-torch through /usr/bin/python3).
set(KILN_PY /usr/bin/python3)
add_test(NAME e2e.train_vs_torch
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/train_vs_torch.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/train_vs_torch)
set_tests_properties(e2e.train_vs_torch PROPERTIES LABELS e2e TIMEOUT 300)

add_test(NAME e2e.resume
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/resume.py $<TARGET_FILE:kiln> ${CMAKE_BINARY_DIR}/e2e/resume)
set_tests_properties(e2e.resume PROPERTIES LABELS e2e TIMEOUT 300)

add_test(NAME e2e.loss_scale
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/loss_scale.py $<TARGET_FILE:kiln> ${CMAKE_BINARY_DIR}/e2e/loss_scale)
set_tests_properties(e2e.loss_scale PROPERTIES LABELS e2e TIMEOUT 300)

add_test(NAME e2e.mixed_precision
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/mixed_precision.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/mixed_precision)
set_tests_properties(e2e.mixed_precision PROPERTIES LABELS e2e TIMEOUT 300)

# The Hugging Face Llama family (llama, mistral, qwen2, qwen3): training, sharded loading, bf16 and greedy decoding
# against the independent PyTorch reference tests/peer/torch_llama.py.
add_test(NAME e2e.families_vs_torch
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/families_vs_torch.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/families_vs_torch llama,mistral,qwen2,qwen3)
set_tests_properties(e2e.families_vs_torch PROPERTIES LABELS e2e TIMEOUT 600)
# Qwen3-MoE the same way (tests/peer/torch_moe.py's layer), and that reference's own checks.
add_test(NAME e2e.moe_vs_torch
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/families_vs_torch.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/moe_vs_torch qwen3_moe)
set_tests_properties(e2e.moe_vs_torch PROPERTIES LABELS e2e TIMEOUT 600)
add_test(NAME e2e.torch_moe_reference COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/peer/torch_moe.py)
set_tests_properties(e2e.torch_moe_reference PROPERTIES LABELS e2e TIMEOUT 120)

add_test(NAME e2e.memory_plan COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/memory_plan.py $<TARGET_FILE:kiln>)
set_tests_properties(e2e.memory_plan PROPERTIES LABELS e2e TIMEOUT 120)

add_test(NAME e2e.cli_errors
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/cli_errors.py $<TARGET_FILE:kiln> ${CMAKE_BINARY_DIR}/e2e/cli_errors)
set_tests_properties(e2e.cli_errors PROPERTIES LABELS e2e TIMEOUT 120)

# The GPU trainer and decoder against the CPU trainer: on the SIMT emulator everywhere (kiln-emu), and on the
# real device when the CUDA backend is built (label cuda; skipped when no GPU is present).
add_test(NAME e2e.gpu_emu_train_tracks_cpu
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/gpu_train_tracks_cpu.py $<TARGET_FILE:kiln>
                 $<TARGET_FILE:kiln-emu> ${CMAKE_BINARY_DIR}/e2e/gpu_emu_train)
set_tests_properties(e2e.gpu_emu_train_tracks_cpu PROPERTIES LABELS e2e TIMEOUT 600)
add_test(NAME e2e.gpu_emu_moe_train_tracks_cpu
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/gpu_moe_train_tracks_cpu.py $<TARGET_FILE:kiln>
                 $<TARGET_FILE:kiln-emu> ${CMAKE_BINARY_DIR}/e2e/gpu_emu_moe_train)
set_tests_properties(e2e.gpu_emu_moe_train_tracks_cpu PROPERTIES LABELS e2e TIMEOUT 600)
add_test(NAME e2e.gpu_emu_mla_train_tracks_cpu
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/gpu_mla_train_tracks_cpu.py $<TARGET_FILE:kiln>
                 $<TARGET_FILE:kiln-emu> ${CMAKE_BINARY_DIR}/e2e/gpu_emu_mla_train)
set_tests_properties(e2e.gpu_emu_mla_train_tracks_cpu PROPERTIES LABELS e2e TIMEOUT 600)
# The image models (DiT, ViT) through train / sample / likelihood --device cuda against the CPU.
add_test(NAME e2e.gpu_emu_image_cli
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/gpu_image_cli.py $<TARGET_FILE:kiln>
                 $<TARGET_FILE:kiln-emu> ${CMAKE_BINARY_DIR}/e2e/gpu_emu_image_cli)
set_tests_properties(e2e.gpu_emu_image_cli PROPERTIES LABELS e2e TIMEOUT 600)
if(KILN_CUDA)
  add_test(NAME cuda.image_cli
           COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/gpu_image_cli.py $<TARGET_FILE:kiln>
                   $<TARGET_FILE:kiln> ${CMAKE_BINARY_DIR}/e2e/cuda_image_cli)
  set_tests_properties(cuda.image_cli PROPERTIES LABELS cuda TIMEOUT 600 SKIP_RETURN_CODE 77)
  add_test(NAME cuda.train_tracks_cpu
           COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/gpu_train_tracks_cpu.py $<TARGET_FILE:kiln>
                   $<TARGET_FILE:kiln> ${CMAKE_BINARY_DIR}/e2e/cuda_train)
  set_tests_properties(cuda.train_tracks_cpu PROPERTIES LABELS cuda TIMEOUT 600 SKIP_RETURN_CODE 77)
  add_test(NAME cuda.moe_train_tracks_cpu
           COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/gpu_moe_train_tracks_cpu.py $<TARGET_FILE:kiln>
                   $<TARGET_FILE:kiln> ${CMAKE_BINARY_DIR}/e2e/cuda_moe_train)
  set_tests_properties(cuda.moe_train_tracks_cpu PROPERTIES LABELS cuda TIMEOUT 600 SKIP_RETURN_CODE 77)
  add_test(NAME cuda.mla_train_tracks_cpu
           COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/gpu_mla_train_tracks_cpu.py $<TARGET_FILE:kiln>
                   $<TARGET_FILE:kiln> ${CMAKE_BINARY_DIR}/e2e/cuda_mla_train)
  set_tests_properties(cuda.mla_train_tracks_cpu PROPERTIES LABELS cuda TIMEOUT 600 SKIP_RETURN_CODE 77)
endif()

# DeepSeek-V3 (latent attention, multi-token prediction): training and greedy decoding against the independent
# PyTorch reference tests/peer/torch_deepseek.py.
add_test(NAME e2e.deepseek_vs_torch
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/deepseek_vs_torch.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/deepseek_vs_torch)
set_tests_properties(e2e.deepseek_vs_torch PROPERTIES LABELS e2e TIMEOUT 600)
# Medusa heads (Medusa-1 on a frozen base) against the PyTorch reference tests/peer/torch_medusa.py, then greedy
# decoding with them equal to plain greedy.
add_test(NAME e2e.medusa_vs_torch
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/medusa_vs_torch.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/medusa_vs_torch)
set_tests_properties(e2e.medusa_vs_torch PROPERTIES LABELS e2e TIMEOUT 300)
# Medusa-2 (the base and the heads trained jointly on one weighted loss) against PyTorch autograd: the first
# batch's loss terms and every gradient tensor, then eight AdamW steps' losses (tests/e2e/medusa2_vs_torch.py).
add_test(NAME e2e.medusa2_vs_torch
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/medusa2_vs_torch.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/medusa2_vs_torch)
set_tests_properties(e2e.medusa2_vs_torch PROPERTIES LABELS e2e TIMEOUT 300)
# Data-parallel training over MPI (dist/, train/data_parallel.h): 2 and 3 ranks against one process at ZeRO
# stages 0-3, resume across rank counts and stages, a killed rank, one-line errors (about 90 runs of a tiny
# model: minutes on a loaded machine). Needs OpenMPI (scripts/setup.sh installs it).
if(KILN_MPIRUN)
  add_test(NAME e2e.dist_train
           COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/dist_train.py $<TARGET_FILE:kiln> ${KILN_MPIRUN}
                   ${CMAKE_BINARY_DIR}/e2e/dist_train)
  set_tests_properties(e2e.dist_train PROPERTIES LABELS e2e TIMEOUT 900)
endif()
if(KILN_MPIRUN)
  add_test(NAME e2e.dist_memory
           COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/dist_memory.py $<TARGET_FILE:kiln> ${KILN_MPIRUN}
                   ${CMAKE_BINARY_DIR}/e2e/dist_memory)
  set_tests_properties(e2e.dist_memory PROPERTIES LABELS e2e TIMEOUT 300)
endif()
if(KILN_MPIRUN)
  add_test(NAME e2e.dist_hosts
           COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/dist_hosts.py $<TARGET_FILE:kiln> ${KILN_MPIRUN}
                   ${CMAKE_BINARY_DIR}/e2e/dist_hosts)
  set_tests_properties(e2e.dist_hosts PROPERTIES LABELS e2e TIMEOUT 300 SKIP_RETURN_CODE 77 RUN_SERIAL TRUE)
endif()

# Likelihoods and normalizing flows through the CLI (train --objective nll, sample, likelihood) on a tiny image set.
add_test(NAME e2e.flows_cli
         COMMAND ${KILN_PY} ${CMAKE_SOURCE_DIR}/tests/e2e/flows_cli.py $<TARGET_FILE:kiln> ${CMAKE_BINARY_DIR}/e2e/flows_cli)
set_tests_properties(e2e.flows_cli PROPERTIES LABELS e2e TIMEOUT 600)
