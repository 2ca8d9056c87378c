# End-to-end test of `kiln generate` and `kiln eval` against the PyTorch reference (Debian's python3-torch).
add_test(NAME e2e.generate_vs_torch
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/e2e/generate_vs_torch.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/generate_vs_torch)
set_tests_properties(e2e.generate_vs_torch PROPERTIES LABELS e2e TIMEOUT 300)
