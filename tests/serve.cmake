# kiln serve (tests/serve/): the official `openai` npm client, raw SSE, Dify's checks and concurrency against
# `kiln generate`; hostile requests in a bounded loop; the chat-template interpreter against @huggingface/jinja.
find_program(KILN_NODE node)
if(KILN_NODE)
  add_test(NAME e2e.serve_openai
           COMMAND ${KILN_NODE} ${CMAKE_SOURCE_DIR}/tests/serve/openai_client.mjs $<TARGET_FILE:kiln>
                   ${CMAKE_BINARY_DIR}/e2e/serve_openai)
  set_tests_properties(e2e.serve_openai PROPERTIES LABELS e2e TIMEOUT 300)
endif()
if(KILN_NODE)
  add_test(NAME e2e.serve_robustness
           COMMAND ${KILN_NODE} ${CMAKE_SOURCE_DIR}/tests/serve/robustness.mjs $<TARGET_FILE:kiln>
                   ${CMAKE_BINARY_DIR}/e2e/serve_robustness 10000)
  set_tests_properties(e2e.serve_robustness PROPERTIES LABELS e2e TIMEOUT 300)
endif()
if(KILN_NODE)
  add_test(NAME e2e.serve_jinja_vs_hf
           COMMAND ${KILN_NODE} ${CMAKE_SOURCE_DIR}/tests/serve/jinja_vs_hf.mjs $<TARGET_FILE:kiln>
                   ${CMAKE_BINARY_DIR}/e2e/serve_jinja)
  set_tests_properties(e2e.serve_jinja_vs_hf PROPERTIES LABELS e2e TIMEOUT 120)
endif()
if(KILN_NODE)
  add_test(NAME e2e.serve_speculative
           COMMAND ${KILN_NODE} ${CMAKE_SOURCE_DIR}/tests/serve/speculative.mjs $<TARGET_FILE:kiln>
                   ${CMAKE_BINARY_DIR}/e2e/serve_speculative $<TARGET_FILE:kiln-emu>)
  set_tests_properties(e2e.serve_speculative PROPERTIES LABELS e2e TIMEOUT 300)
endif()
