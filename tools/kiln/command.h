// Subcommand registry: each tools/kiln/<name>.cpp defines a static Command that adds its CLI11
// subcommand and its action, so adding a subcommand touches no other file.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace kiln::cli {

struct Command {
  // setup adds the subcommand (with its flags and callback) to the root app.
  Command(std::string name, std::function<void(CLI::App& root)> setup);
};

std::vector<std::function<void(CLI::App&)>>& registry();

}  // namespace kiln::cli
