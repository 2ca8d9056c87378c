# End-to-end test of packed / padded batching and supervised fine-tuning data against the PyTorch reference
# (Debian's python3-torch through /usr/bin/python3).
add_test(NAME e2e.packing_vs_padding
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/e2e/packing_vs_padding.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/packing_vs_padding)
set_tests_properties(e2e.packing_vs_padding PROPERTIES LABELS e2e TIMEOUT 300)
