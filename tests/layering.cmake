# The layering is enforced by each layer's include tree (CMakeLists.txt). This probe proves the enforcement:
# a models-layer file including train/ must fail to build, with the include reported as not found.
kiln_layer_include_dir(models kiln_probe_inc)
add_library(kiln_layer_probe OBJECT EXCLUDE_FROM_ALL ${CMAKE_CURRENT_SOURCE_DIR}/layering/models_includes_train.cpp)
target_include_directories(kiln_layer_probe PRIVATE ${kiln_probe_inc})
target_link_libraries(kiln_layer_probe PRIVATE nlohmann_json::nlohmann_json)
add_test(NAME layering.back_edge_fails_the_build
         COMMAND ${CMAKE_COMMAND} --build ${CMAKE_BINARY_DIR} --target kiln_layer_probe)
set_tests_properties(layering.back_edge_fails_the_build PROPERTIES LABELS unit
                     PASS_REGULAR_EXPRESSION "train/optimizer.h: No such file or directory")
