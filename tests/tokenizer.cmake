# End-to-end test of the tokenizer and data-prepare commands as a user runs them (stdlib Python only).
add_test(NAME e2e.tokenizer_cli
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/tokenizer_cli.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/tokenizer_cli)
set_tests_properties(e2e.tokenizer_cli PROPERTIES LABELS e2e TIMEOUT 120)
