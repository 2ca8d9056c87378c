// Subcommand registry: each tools/kiln/<name>.cpp defines a static Command that adds its CLI11
// subcommand and its action, so adding a subcommand touches no other file.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace kiln::cli {

struct Command {
  // setup adds the subcommand (with its flags and callback) to the root app. Setups run in increasing
  // `order`, so a file can extend a subcommand another file created (order 1: root.get_subcommand(...)).
  Command(std::string name, std::function<void(CLI::App& root)> setup, int order = 0);
};

struct Registration {
  int order;
  std::function<void(CLI::App&)> setup;
};
std::vector<Registration>& registry();

}  // namespace kiln::cli
