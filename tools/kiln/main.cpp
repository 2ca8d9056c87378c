// kiln: train and serve transformer language models. One file per subcommand in this folder.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "kernels/matmul.h"
#include "tools/kiln/command.h"

namespace kiln::cli {

std::vector<Registration>& registry() {
  static std::vector<Registration> r;
  return r;
}

Command::Command(std::string, std::function<void(CLI::App&)> setup, int order) {
  registry().push_back({order, std::move(setup)});
}

}  // namespace kiln::cli

int main(int argc, char** argv) {
  // OpenBLAS fell back to kernels slower than this CPU can run (see kernels/matmul.h): name the right ones and
  // start again, once (the variable is set now), keeping the arguments. If the exec fails, run as we are.
  if (!std::getenv("OPENBLAS_CORETYPE"))
    if (const char* core = kiln::cpu::blas_core_for_this_cpu()) {
      setenv("OPENBLAS_CORETYPE", core, 1);
      execv("/proc/self/exe", argv);
    }
  CLI::App app{"kiln: train and serve transformer language models"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Help for every subcommand");
  auto& reg = kiln::cli::registry();
  std::stable_sort(reg.begin(), reg.end(), [](const auto& a, const auto& b) { return a.order < b.order; });
  for (auto& r : reg) r.setup(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help exits 0; any other parse error is one line and exit code 2.
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "kiln: %s\n", e.what());
    return 2;
  } catch (const kiln::Error& e) {
    std::fprintf(stderr, "kiln: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kiln: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
