// Corrupt inputs for the loaders, run under AddressSanitizer and UBSan: random truncations, byte flips in
// headers, and generated garbage JSON. Every input must either load or throw kiln::Error naming the file;
// any other exception, out-of-bounds read, overflow or leak fails the run. Deterministic seeds keep
// failures reproducible.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "core/safetensors.h"
#include "io_test_helpers.h"
#include "tests/gpt2_compat.h"
#include "train/shards.h"

namespace kiln {
namespace {

using test::ScratchDir;

// Runs f; true if it succeeded, false if it threw kiln::Error naming `needle` (on one line). Anything else fails the
// test.
template <class F>
bool loads_or_refuses(F f, const std::string& needle, const std::string& what) {
  try {
    f();
    return true;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << what << ": " << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << what << ": message is not one line";
    return false;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": non-kiln exception: " << e.what();
    return false;
  }
}

// Checks that every entry lies inside the file (`raw` is what was written) and reads every byte the reader
// hands out, so that a pointer past the data shows up under ASan or as a failed check.
uint64_t touch_all(const SafeTensorsReader& r, const std::string& raw) {
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  uint64_t sum = 0;
  for (const auto& e : r.entries()) {
    EXPECT_LE(e.begin, e.end) << e.name;
    EXPECT_LE(8 + n + e.end, raw.size()) << e.name;
    for (size_t i = 0; i < e.end - e.begin; i++) sum += e.bytes[i];
    if (e.tensor_index >= 0) EXPECT_EQ(r.tensors()[size_t(e.tensor_index)].nbytes(), e.end - e.begin) << e.name;
  }
  for (const auto& t : r.tensors())
    for (size_t i = 0; i < t.nbytes(); i++) sum += static_cast<const uint8_t*>(t.data)[i];
  return sum;
}

// A small valid file: every kiln dtype, an empty tensor, a scalar, metadata.
std::string sample_safetensors(const std::string& path) {
  std::vector<float> a(12, 1.5f), s(1, 2.0f);
  std::vector<uint16_t> b(6, 0x3f80), h(5, 0x3c00), u(3, 7);
  std::vector<int32_t> i(4, -9);
  write_safetensors(path,
                    {{"a.weight", DType::F32, {3, 4}, a.data()},
                     {"b", DType::BF16, {2, 3}, b.data()},
                     {"h", DType::F16, {5}, h.data()},
                     {"i", DType::I32, {2, 1, 2}, i.data()},
                     {"u", DType::U16, {3}, u.data()},
                     {"empty", DType::F32, {0, 3}, nullptr},
                     {"s", DType::F32, {}, s.data()}},
                    {{"format", "pt"}});
  return test::slurp(path);
}

uint64_t header_length(const std::string& raw) {
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  return n;
}

TEST(SanitizeSafeTensors, EveryTruncationIsRefused) {
  ScratchDir dir("san_trunc");
  std::string raw = sample_safetensors(dir / "good.safetensors");
  std::string path = dir / "cut.safetensors";
  for (size_t cut = 0; cut < raw.size(); cut++) {
    test::write_bytes(path, raw.substr(0, cut));
    EXPECT_FALSE(loads_or_refuses([&] { SafeTensorsReader r(path); }, path, "cut " + std::to_string(cut)))
        << "a file cut at " << cut << " of " << raw.size() << " bytes loaded";
  }
}

TEST(SanitizeSafeTensors, RandomHeaderByteFlips) {
  ScratchDir dir("san_flip");
  std::string raw = sample_safetensors(dir / "good.safetensors");
  const size_t header_end = 8 + header_length(raw);
  std::string path = dir / "flip.safetensors";
  std::mt19937_64 rng(20240520);
  const char interesting[] = {'{', '}', '[', ']', '"', ',', ':', '-', '0', '9', 'e', '.', ' ', '\0', '\x7f', '\xff'};
  int loaded = 0;
  for (int iter = 0; iter < 3000; iter++) {
    std::string bytes = raw;
    int flips = 1 + int(rng() % 4);
    for (int k = 0; k < flips; k++) {
      size_t pos = rng() % header_end;
      if (rng() % 2)
        bytes[pos] = interesting[rng() % sizeof(interesting)];
      else
        bytes[pos] = char(bytes[pos] ^ char(1 << (rng() % 8)));
    }
    test::write_bytes(path, bytes);
    loaded += loads_or_refuses(
        [&] {
          SafeTensorsReader r(path);
          touch_all(r, bytes);
        },
        path, "iteration " + std::to_string(iter));
  }
  // Some flips only touch a name or a padding space and still give a valid file.
  EXPECT_GT(loaded, 0);
}

// Header text built from pieces of the format with hostile values mixed in.
std::string random_header(std::mt19937_64& rng) {
  const char* dtypes[] = {"F32", "BF16", "F16", "I32", "U16", "I64", "F64", "U8", "BOOL", "F8_E4M3", "C64", "X", ""};
  const char* numbers[] = {"0",
                           "1",
                           "3",
                           "4",
                           "8",
                           "12",
                           "-1",
                           "-8",
                           "1.5",
                           "1e3",
                           "4294967296",
                           "9223372036854775807",
                           "18446744073709551615",
                           "18446744073709551616",
                           "99999999999999999999999",
                           "null",
                           "\"4\""};
  auto num = [&] { return std::string(numbers[rng() % std::size(numbers)]); };
  std::string h = "{";
  int n = int(rng() % 4);
  for (int t = 0; t < n; t++) {
    if (t) h += ",";
    if (rng() % 8 == 0) {
      h += R"("__metadata__":{"k":)" + std::string(rng() % 2 ? "\"v\"" : num()) + "}";
      continue;
    }
    h += "\"t" + std::to_string(rng() % 3) + "\":{";
    std::vector<std::string> fields;
    if (rng() % 10) fields.push_back(std::string("\"dtype\":\"") + dtypes[rng() % std::size(dtypes)] + "\"");
    if (rng() % 10) {
      std::string s = "\"shape\":[";
      int r = int(rng() % 6);
      for (int d = 0; d < r; d++) s += (d ? "," : "") + (rng() % 3 ? std::to_string(rng() % 5) : num());
      fields.push_back(s + "]");
    }
    if (rng() % 10) {
      std::string o = "\"data_offsets\":[";
      int k = rng() % 6 ? 2 : int(rng() % 4);
      for (int d = 0; d < k; d++) o += (d ? "," : "") + (rng() % 3 ? std::to_string(rng() % 64) : num());
      fields.push_back(o + "]");
    }
    if (rng() % 12 == 0) fields.push_back(R"("extra":{"x":[1,[2,[3]]]})");
    std::shuffle(fields.begin(), fields.end(), rng);
    for (size_t f = 0; f < fields.size(); f++) h += (f ? "," : "") + fields[f];
    h += "}";
  }
  h += "}";
  if (rng() % 10 == 0) h.resize(rng() % (h.size() + 1));  // cut mid-token
  if (rng() % 10 == 0) h += std::string(rng() % 9, ' ');
  return h;
}

TEST(SanitizeSafeTensors, GeneratedGarbageHeaders) {
  ScratchDir dir("san_garbage");
  std::string path = dir / "g.safetensors";
  std::mt19937_64 rng(7);
  int loaded = 0;
  for (int iter = 0; iter < 3000; iter++) {
    std::string header = random_header(rng);
    std::string data(rng() % 80, char(rng() % 256));
    std::string bytes = test::safetensors_bytes(header, data);
    if (rng() % 16 == 0) bytes[rng() % 8] = char(rng() % 256);  // a wrong header length
    if (iter % 50 == 0) {                                       // pure noise
      bytes.resize(rng() % 64);
      for (auto& c : bytes) c = char(rng() % 256);
    }
    test::write_bytes(path, bytes);
    loaded += loads_or_refuses(
        [&] {
          SafeTensorsReader r(path);
          touch_all(r, bytes);
        },
        path, "header " + header);
  }
  EXPECT_GT(loaded, 0);
}

GPT2Config tiny() {
  GPT2Config c;
  c.n_layer = 1;
  c.n_head = 2;
  c.n_embd = 4;
  c.vocab_size = 7;
  c.n_positions = 3;
  return c;
}

TEST(SanitizeGpt2Loader, CorruptWeightsAndConfigs) {
  ScratchDir dir("san_gpt2");
  GPT2Config cfg = tiny();
  ParamTable table = gpt2_table(cfg);
  std::vector<float> params(table.total, 0.25f);
  std::string ckpt = dir / "ckpt";
  save_gpt2_checkpoint(ckpt, cfg, table, params.data(), DType::BF16);
  const std::string weights = test::slurp(ckpt + "/model.safetensors");
  const std::string config = test::slurp(ckpt + "/config.json");
  const size_t header_end = 8 + header_length(weights);
  std::string bad = dir / "bad";
  std::filesystem::create_directories(bad);
  std::mt19937_64 rng(11);
  std::vector<float> block(table.total);
  for (int iter = 0; iter < 1500; iter++) {
    std::string w = weights, c = config;
    if (iter % 3 == 0) {
      w.resize(rng() % w.size());
    } else {
      for (int k = 0; k < 1 + int(rng() % 3); k++) w[rng() % header_end] ^= char(1 << (rng() % 8));
    }
    for (int k = 0; k < int(rng() % 3); k++) c[rng() % c.size()] = char(rng() % 256);
    if (rng() % 8 == 0) c.resize(rng() % c.size());
    test::write_bytes(bad + "/model.safetensors", w);
    test::write_bytes(bad + "/config.json", c);
    std::string what = "iteration " + std::to_string(iter);
    GPT2Config got;
    if (loads_or_refuses([&] { got = load_gpt2_config_for(bad); }, "config.json", what) && got.num_params() < 100000) {
      ParamTable t = gpt2_table(got);
      std::vector<float> b(t.total);
      loads_or_refuses([&] { load_gpt2_weights(bad, got, t, b.data()); }, "model.safetensors", what);
    }
    loads_or_refuses([&] { load_gpt2_weights(bad, cfg, table, block.data()); }, "model.safetensors", what);
  }
}

TEST(SanitizeTokenShards, TruncationsAndHeaderFlips) {
  ScratchDir dir("san_shards");
  std::vector<uint32_t> tokens = {5, 0, 6, 65535, 1, 2, 3};
  write_shard(dir / "good.bin", tokens);
  const std::string raw = test::slurp(dir / "good.bin");
  std::string path = dir / "s.bin";
  std::mt19937_64 rng(3);
  for (int iter = 0; iter < 1500; iter++) {
    std::string b = raw;
    if (iter % 2 == 0) {
      b.resize(rng() % (b.size() + 1));
    } else {
      for (int k = 0; k < 1 + int(rng() % 3); k++) b[rng() % 12] = char(rng() % 256);  // magic, version, count
    }
    test::write_bytes(path, b);
    loads_or_refuses(
        [&] {
          TokenShard s(path);
          uint64_t sum = 0;
          for (int64_t i = 0; i < s.size(); i++) sum += s[i];
          s.check_vocab(65536);
          s.check_vocab(7);
        },
        path, "iteration " + std::to_string(iter));
  }
}

}  // namespace
}  // namespace kiln
