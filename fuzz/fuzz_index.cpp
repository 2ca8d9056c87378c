// model.safetensors.index.json (models/checkpoint.h parse_safetensors_index): the input is the file's text.
// Every shard it accepts must be a plain file name beside the index, each named once.
#include <set>

#include "fuzz/fuzz_util.h"
#include "models/checkpoint.h"

using namespace kiln;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string name = "model.safetensors.index.json";
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::accepts(
      [&] {
        std::set<std::string> seen;
        auto shards = parse_safetensors_index(text, name);
        FUZZ_CHECK(!shards.empty(), "no shards");
        for (const auto& s : shards) {
          FUZZ_CHECK(!s.file.empty() && s.file.find('/') == std::string::npos && s.file.find('\0') == std::string::npos &&
                         s.file != "." && s.file != "..",
                     s.file);
          FUZZ_CHECK(seen.insert(s.file).second, "shard listed twice: ", s.file);
        }
      },
      name);
  return 0;
}
