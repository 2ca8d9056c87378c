// GGUF reader (core/gguf.h GgufFile::from_bytes): the input is a whole file. An accepted file must hand out
// tensors inside the data section that do not overlap; every metadata value is read through each typed
// accessor (a mismatch must be a one-line kiln::Error) and small float tensors are decoded.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/gguf.h"
#include "core/quote.h"
#include "fuzz/fuzz_util.h"

using namespace kiln;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string name = "fuzz.gguf";
  fuzz::accepts(
      [&] {
        GgufFile f = GgufFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size), name);
        FUZZ_CHECK(f.tensors.empty() || f.data_offset <= size, "data offset ", f.data_offset);
        volatile uint64_t sum = 0;
        for (const auto& m : f.metadata) {
          FUZZ_CHECK(f.find(m.key) == &m.value, "metadata key found twice: ", m.key);
          const GgufValue& v = m.value;
          const std::string what = quote_name(m.key);  // the accessors' messages name what the caller says
          fuzz::accepts([&] { sum = sum + v.as_uint(what); }, "");
          fuzz::accepts([&] { sum = sum + uint64_t(v.as_int(what)); }, "");
          fuzz::accepts([&] { sum = sum + uint64_t(v.as_float(what) != 0); }, "");
          fuzz::accepts([&] { sum = sum + v.as_bool(what); }, "");
          fuzz::accepts([&] { sum = sum + v.as_string(what).size(); }, "");
          for (const auto& s : v.strings) sum = sum + s.size();
        }
        std::vector<std::pair<uint64_t, uint64_t>> ranges;
        for (const auto& t : f.tensors) {
          FUZZ_CHECK(f.data_offset + t.offset <= size && t.nbytes <= size - f.data_offset - t.offset, "tensor ", t.name,
                     " outside the file");
          // Reads every byte the reader hands out, and checks it is the right place of the file.
          FUZZ_CHECK(std::memcmp(t.data, data + f.data_offset + t.offset, t.nbytes) == 0, "tensor ", t.name, " data");
          FUZZ_CHECK(t.nbytes == gguf_type_bytes(t.type, t.numel()), "tensor ", t.name, " size");
          ranges.push_back({t.offset, t.offset + t.nbytes});
          FUZZ_CHECK(&f.get_tensor(t.name) == &t, "tensor found twice: ", t.name);
          const bool floats = t.type == GgufType::F32 || t.type == GgufType::F16 || t.type == GgufType::BF16 ||
                              t.type == GgufType::Q8_0;
          if (floats && t.numel() <= (1u << 16)) {
            for (float x : f.tensor_floats(t.name)) sum = sum + (x == x);
          }
        }
        std::sort(ranges.begin(), ranges.end());
        for (size_t i = 1; i < ranges.size(); i++)
          FUZZ_CHECK(ranges[i].first >= ranges[i - 1].second, "tensors overlap");
      },
      name);
  return 0;
}
