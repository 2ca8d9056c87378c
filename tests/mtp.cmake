# `kiln generate` with MTP self-drafting (infer/mtp_decode.h; the algorithm's own tests are test_mtp_decode.cpp):
# a model with MTP modules drafts with them by default and --json says so; the flags' bad uses are one-line errors.
set(KILN_MTP_DIR ${CMAKE_BINARY_DIR}/e2e/mtp)
file(WRITE ${KILN_MTP_DIR}/deepseek_mtp.json [=[{"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":2,
 "num_hidden_layers":2,"intermediate_size":36,"vocab_size":53,"max_position_embeddings":64,"rms_norm_eps":1e-6,
 "q_lora_rank":16,"kv_lora_rank":16,"qk_nope_head_dim":16,"qk_rope_head_dim":16,"v_head_dim":16,
 "num_nextn_predict_layers":1,"hidden_act":"silu","tie_word_embeddings":false}]=])
file(WRITE ${KILN_MTP_DIR}/gpt2.json [=[{"n_layer":1,"n_head":2,"n_embd":16,"vocab_size":53,"n_positions":64}]=])
set(KILN_MTP_GEN $<TARGET_FILE:kiln> generate --prompt-ids 1,2,3 --max-new 8 --temperature 0 --eot-id -1 --threads 1)
add_test(NAME cli.mtp_draft_json COMMAND ${KILN_MTP_GEN} --random-init ${KILN_MTP_DIR}/deepseek_mtp.json --json)
set_tests_properties(cli.mtp_draft_json PROPERTIES LABELS e2e TIMEOUT 60
                     PASS_REGULAR_EXPRESSION "\"method\":\"mtp\"")
add_test(NAME cli.mtp_draft_without_modules
         COMMAND ${KILN_MTP_GEN} --random-init ${KILN_MTP_DIR}/gpt2.json --mtp-draft)
set_tests_properties(cli.mtp_draft_without_modules PROPERTIES LABELS e2e TIMEOUT 60
                     PASS_REGULAR_EXPRESSION "--mtp-draft: the model \\(gpt2\\) has no multi-token-prediction modules")
add_test(NAME cli.mtp_draft_tokens
         COMMAND ${KILN_MTP_GEN} --random-init ${KILN_MTP_DIR}/deepseek_mtp.json --draft-tokens 3)
set_tests_properties(cli.mtp_draft_tokens PROPERTIES LABELS e2e TIMEOUT 60
                     PASS_REGULAR_EXPRESSION "--draft-tokens 3: the model has 1 multi-token-prediction module ")
# Two modules: two chained drafts per round by default, each position's acceptance in the JSON.
file(WRITE ${KILN_MTP_DIR}/deepseek_mtp2.json [=[{"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":2,
 "num_hidden_layers":2,"intermediate_size":36,"vocab_size":53,"max_position_embeddings":64,"rms_norm_eps":1e-6,
 "q_lora_rank":16,"kv_lora_rank":16,"qk_nope_head_dim":16,"qk_rope_head_dim":16,"v_head_dim":16,
 "num_nextn_predict_layers":2,"hidden_act":"silu","tie_word_embeddings":false}]=])
add_test(NAME cli.mtp_two_drafts_json
         COMMAND ${KILN_MTP_GEN} --random-init ${KILN_MTP_DIR}/deepseek_mtp2.json --json)
set_tests_properties(cli.mtp_two_drafts_json PROPERTIES LABELS e2e TIMEOUT 60
                     PASS_REGULAR_EXPRESSION "\"accepted_per_position\":\\[[^],]+,[^],]+\\],\"draft_tokens\":2")
