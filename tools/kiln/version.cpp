// kiln version: prints the version and build facts.
#include <cstdio>

#include "tools/kiln/command.h"

namespace {
kiln::cli::Command version_cmd("version", [](CLI::App& root) {
  auto* sub = root.add_subcommand("version", "Print kiln's version");
  sub->callback([] { std::printf("kiln 0.1.0\n"); });
});
}  // namespace
