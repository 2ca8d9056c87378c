#include <string>

#include "core/error.h"
#include "core/gpu.h"

namespace kiln {

DeviceSpec parse_device(const std::string& text, const char* flag) {
  DeviceSpec d;
  if (text == "cpu") return d;
  if (text == "cuda") {
    d.cuda = true;
    return d;
  }
  if (text.rfind("cuda:", 0) == 0 && text.size() > 5 && text.size() <= 8 &&
      text.find_first_not_of("0123456789", 5) == std::string::npos) {
    d.cuda = true;
    d.index = std::stoi(text.substr(5));
    return d;
  }
  fail(flag, ": unknown device '", text, "' (expected cpu, cuda or cuda:N)");
}

}  // namespace kiln
