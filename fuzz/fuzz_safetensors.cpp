// safetensors header + tensor table (core/safetensors.h): the input is a whole file. An accepted file must hand
// out entries inside the data section whose sizes match dtype x shape; every byte is read so that a pointer
// past the data shows up under ASan.
#include <cstring>
#include <vector>

#include "core/safetensors.h"
#include "fuzz/fuzz_util.h"

using namespace kiln;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string name = "fuzz.safetensors";
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  fuzz::accepts(
      [&] {
        SafeTensorsReader r = SafeTensorsReader::from_bytes(bytes, name);
        uint64_t n = 0;
        std::memcpy(&n, data, 8);
        const size_t data_size = size - 8 - size_t(n);
        volatile uint64_t sum = 0;
        size_t prev_end = 0;
        for (const auto& e : r.entries()) {
          FUZZ_CHECK(e.begin <= e.end && e.end <= data_size, e.name);
          FUZZ_CHECK(e.begin == e.end || e.begin >= prev_end, "entries out of data order or overlapping: ", e.name);
          if (e.begin != e.end) prev_end = e.end;
          for (size_t i = 0; i < e.end - e.begin; i++) sum = sum + e.bytes[i];
          if (e.tensor_index >= 0) {
            const Tensor& t = r.tensors().at(size_t(e.tensor_index));
            FUZZ_CHECK(t.nbytes() == e.end - e.begin, e.name);
            FUZZ_CHECK(uint64_t(t.numel()) == uint64_t(e.numel()), e.name);
            for (size_t i = 0; i < t.nbytes(); i++) sum = sum + static_cast<const uint8_t*>(t.data)[i];
          }
          // find/get either hand out the tensor or refuse a dtype / rank kiln lacks, naming the file.
          fuzz::accepts([&] { FUZZ_CHECK(r.get(e.name).name == e.name, e.name); }, name);
          FUZZ_CHECK(r.find_entry(e.name) != nullptr, e.name);
        }
        fuzz::accepts([&] { r.get("no such tensor \n"); }, name);
        for (const auto& [k, v] : r.metadata()) sum = sum + k.size() + v.size();
      },
      name);
  return 0;
}
