# End-to-end test of `kiln generate` and `kiln eval` against the PyTorch reference (Debian's python3-torch).
add_test(NAME e2e.generate_vs_torch
         COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/e2e/generate_vs_torch.py $<TARGET_FILE:kiln>
                 ${CMAKE_BINARY_DIR}/e2e/generate_vs_torch)
set_tests_properties(e2e.generate_vs_torch PROPERTIES LABELS e2e TIMEOUT 300)

# `kiln generate --prompt-lookup` (n-gram drafting; the algorithm's own tests are in test_speculative.cpp): --json
# names the method and reports the acceptance of each draft position.
file(WRITE ${CMAKE_BINARY_DIR}/e2e/lookup/gpt2.json [=[{"n_layer":1,"n_head":2,"n_embd":16,"vocab_size":53,"n_positions":64}]=])
add_test(NAME cli.prompt_lookup_json
         COMMAND $<TARGET_FILE:kiln> generate --random-init ${CMAKE_BINARY_DIR}/e2e/lookup/gpt2.json
                 --prompt-ids 1,2,3,1,2 --max-new 16 --temperature 0 --eot-id -1 --threads 1 --prompt-lookup
                 --draft-tokens 3 --json)
set_tests_properties(cli.prompt_lookup_json PROPERTIES LABELS e2e TIMEOUT 60
                     PASS_REGULAR_EXPRESSION "\"accepted_per_position\":\\[[^],]+,[^],]+,[^],]+\\],\"draft_tokens\":3,.*\"method\":\"prompt_lookup\"")
