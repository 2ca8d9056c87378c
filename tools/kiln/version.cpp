// kiln version: prints the version and build facts.
#include <cstdio>

#include "kernels/matmul.h"
#include "tools/kiln/command.h"

namespace {
kiln::cli::Command version_cmd("version", [](CLI::App& root) {
  auto* sub = root.add_subcommand("version", "Print kiln's version and the OpenBLAS kernels in use");
  sub->callback([] { std::printf("kiln 0.1.0\nblas core: %s\n", kiln::cpu::blas_core()); });
});
}  // namespace
