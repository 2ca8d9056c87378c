// GGUF writer and reader against the specification (ggml docs/gguf.md), and export_gguf's conversions.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/dtype.h"
#include "core/error.h"
#include "core/file_io.h"
#include "core/gguf.h"
#include "gguf_tiny_model.h"
#include "io_test_helpers.h"
#include "test_util.h"
#include "models/gguf_export.h"

namespace kiln {
namespace {

using test::ScratchDir;

// Q8_0 as the spec defines it, written independently: d = max|x| / 127, q = x·(1/d) rounded half away from zero.
std::vector<uint8_t> naive_q8_0(const std::vector<float>& x) {
  std::vector<uint8_t> out;
  for (size_t b = 0; b < x.size(); b += 32) {
    float amax = 0;
    for (int j = 0; j < 32; j++) amax = std::max(amax, std::fabs(x[b + j]));
    const float d = amax / 127.0f;
    const float id = d == 0.0f ? 0.0f : 1.0f / d;
    const uint16_t dh = f32_to_f16(d);
    out.push_back(uint8_t(dh & 0xff));
    out.push_back(uint8_t(dh >> 8));
    for (int j = 0; j < 32; j++) {
      const double q = double(x[b + j] * id);
      const double r = q >= 0 ? std::floor(q + 0.5) : -std::floor(-q + 0.5);
      out.push_back(uint8_t(int8_t(int(r))));
    }
  }
  return out;
}

std::string write_read(const GgufWriter& w, const ScratchDir& dir, const std::string& name = "t.gguf") {
  const std::string path = dir / name;
  w.write(path);
  return path;
}

TEST(Gguf, MetadataRoundTripsEveryType) {
  ScratchDir dir("gguf_meta");
  GgufWriter w;
  w.set("t.u8", GgufValue::u8(250));
  w.set("t.i8", GgufValue::i8(-120));
  w.set("t.u16", GgufValue::u16(65000));
  w.set("t.i16", GgufValue::i16(-32000));
  w.set("t.u32", GgufValue::u32(4000000000u));
  w.set("t.i32", GgufValue::i32(-2000000000));
  w.set("t.u64", GgufValue::u64(18000000000000000000ull));
  w.set("t.i64", GgufValue::i64(-9000000000000000000ll));
  w.set("t.f32", GgufValue::f32(3.25f));
  w.set("t.f64", GgufValue::f64(-1e300));
  w.set("t.bool", GgufValue::boolean(true));
  w.set("t.str", GgufValue::str("héllo\n"));
  w.set("t.empty", GgufValue::str(""));
  w.set("t.arr_i32", GgufValue::array(GgufValueType::I32, std::vector<int32_t>{1, -2, 3}));
  w.set("t.arr_f64", GgufValue::array(GgufValueType::F64, std::vector<double>{0.5, 1e-9}));
  w.set("t.arr_u8", GgufValue::array(GgufValueType::U8, std::vector<uint8_t>{}));
  w.set("t.arr_bool", GgufValue::array(GgufValueType::Bool, std::vector<uint8_t>{1, 0, 1}));
  w.set("t.arr_str", GgufValue::str_array({"a b", "", "Ġt"}));
  w.set("t.u32", GgufValue::u32(7));  // replaces, keeps its place
  GgufFile f(write_read(w, dir));
  EXPECT_EQ(f.version, 3u);
  ASSERT_EQ(f.metadata.size(), 19u);  // general.alignment added first
  EXPECT_EQ(f.metadata[0].key, "general.alignment");
  EXPECT_EQ(f.get("general.alignment").as_uint("a"), 32u);
  EXPECT_EQ(f.metadata[5].key, "t.u32");
  EXPECT_EQ(f.get("t.u8").as_uint("x"), 250u);
  EXPECT_EQ(f.get("t.i8").as_int("x"), -120);
  EXPECT_EQ(f.get("t.u16").as_uint("x"), 65000u);
  EXPECT_EQ(f.get("t.i16").as_int("x"), -32000);
  EXPECT_EQ(f.get("t.u32").as_uint("x"), 7u);
  EXPECT_EQ(f.get("t.i32").as_int("x"), -2000000000);
  EXPECT_EQ(f.get("t.u64").as_uint("x"), 18000000000000000000ull);
  EXPECT_EQ(f.get("t.i64").as_int("x"), -9000000000000000000ll);
  EXPECT_EQ(f.get("t.f32").as_float("x"), 3.25);
  EXPECT_EQ(f.get("t.f64").as_float("x"), -1e300);
  EXPECT_TRUE(f.get("t.bool").as_bool("x"));
  EXPECT_EQ(f.get("t.str").as_string("x"), "héllo\n");
  EXPECT_EQ(f.get("t.empty").as_string("x"), "");
  const std::vector<std::pair<const char*, GgufValueType>> types = {
      {"t.u8", GgufValueType::U8},   {"t.i8", GgufValueType::I8},   {"t.u16", GgufValueType::U16},
      {"t.i16", GgufValueType::I16}, {"t.u32", GgufValueType::U32}, {"t.i32", GgufValueType::I32},
      {"t.u64", GgufValueType::U64}, {"t.i64", GgufValueType::I64}, {"t.f32", GgufValueType::F32},
      {"t.f64", GgufValueType::F64}, {"t.bool", GgufValueType::Bool}, {"t.str", GgufValueType::String}};
  for (const auto& [k, t] : types) EXPECT_EQ(f.get(k).type, t) << k;
  const GgufValue& ai = f.get("t.arr_i32");
  EXPECT_EQ(ai.type, GgufValueType::Array);
  EXPECT_EQ(ai.elem, GgufValueType::I32);
  ASSERT_EQ(ai.count, 3u);
  int32_t v[3];
  std::memcpy(v, ai.data.data(), 12);
  EXPECT_EQ(v[1], -2);
  EXPECT_EQ(f.get("t.arr_f64").count, 2u);
  EXPECT_EQ(f.get("t.arr_u8").count, 0u);
  EXPECT_EQ(f.get("t.arr_bool").data, std::string("\1\0\1", 3));
  EXPECT_EQ(f.get("t.arr_str").strings, (std::vector<std::string>{"a b", "", "Ġt"}));
  EXPECT_THROW(f.get("t.str").as_uint("t.str"), Error);
  EXPECT_THROW(f.get("missing"), Error);
  EXPECT_TRUE(f.tensors.empty());
}

TEST(Gguf, TensorTypesRoundTripAndQ8MatchesTheSpec) {
  ScratchDir dir("gguf_tensors");
  const std::vector<float> x = test::randn(4 * 64, 11, 2.0f);
  std::vector<float> q = x;
  // Ties and edge cases: an exact half step rounds away from zero; an all-zero block has d = 0.
  for (int j = 0; j < 32; j++) q[j] = float(j - 16) + (j % 2 ? 0.5f : 0.0f);
  q[0] = 127.0f;  // d = 1
  for (int j = 32; j < 64; j++) q[j] = 0.0f;
  GgufWriter w;
  w.add_tensor("a.f32", {4, 64}, GgufType::F32, [&](float* d) { std::copy(x.begin(), x.end(), d); });
  w.add_tensor("b.f16", {4, 64}, GgufType::F16, [&](float* d) { std::copy(x.begin(), x.end(), d); });
  w.add_tensor("c.q8", {4, 64}, GgufType::Q8_0, [&](float* d) { std::copy(q.begin(), q.end(), d); });
  GgufFile f(write_read(w, dir));
  ASSERT_EQ(f.tensors.size(), 3u);
  const GgufTensorInfo& a = f.get_tensor("a.f32");
  EXPECT_EQ(a.ne, (std::vector<uint64_t>{64, 4}));  // fastest-first
  EXPECT_EQ(a.type, GgufType::F32);
  EXPECT_EQ(f.tensor_floats("a.f32"), x);
  const std::vector<float> h = f.tensor_floats("b.f16");
  for (size_t i = 0; i < x.size(); i++) ASSERT_EQ(h[i], f16_to_f32(f32_to_f16(x[i]))) << i;
  const GgufTensorInfo& c = f.get_tensor("c.q8");
  EXPECT_EQ(c.type, GgufType::Q8_0);
  ASSERT_EQ(c.nbytes, 8u * 34u);
  const std::vector<uint8_t> want = naive_q8_0(q);
  EXPECT_EQ(std::vector<uint8_t>(c.data, c.data + c.nbytes), want);
  // d = 127 / 127 = 1: halves round away from zero, as roundf does.
  EXPECT_EQ(int8_t(c.data[2 + 1]), -15);  // -14.5
  EXPECT_EQ(int8_t(c.data[2 + 3]), -13);  // -12.5
  EXPECT_EQ(int8_t(c.data[2 + 17]), 2);   // 1.5
  const std::vector<float> dq = f.tensor_floats("c.q8");
  for (size_t i = 64; i < q.size(); i++) {
    const float amax = [&] {
      float m = 0;
      for (size_t j = i / 32 * 32; j < i / 32 * 32 + 32; j++) m = std::max(m, std::fabs(q[j]));
      return m;
    }();
    EXPECT_NEAR(dq[i], q[i], amax / 127.0f * 0.5f + amax * 1e-3f) << i;
  }
  for (int j = 32; j < 64; j++) EXPECT_EQ(dq[j], 0.0f);
}

TEST(Gguf, TensorsArePaddedToTheAlignment) {
  ScratchDir dir("gguf_pad");
  for (uint32_t align : {32u, 64u}) {
    GgufWriter w;
    if (align != 32) w.set("general.alignment", GgufValue::u32(align));
    w.set("x", GgufValue::str("abc"));  // makes the header an odd length
    w.add_tensor("t0", {3}, GgufType::F32, [](float* d) { d[0] = d[1] = d[2] = 1.0f; });
    w.add_tensor("t1", {5}, GgufType::F16, [](float* d) { std::fill(d, d + 5, 2.0f); });
    w.add_tensor("t2", {2, 32}, GgufType::Q8_0, [](float* d) { std::fill(d, d + 64, -127.0f); });  // d = 1, exact in f16
    const std::string path = write_read(w, dir, "pad" + std::to_string(align) + ".gguf");
    GgufFile f(path);
    EXPECT_EQ(f.alignment, align);
    EXPECT_EQ(f.data_offset % align, 0u);
    ASSERT_EQ(f.tensors.size(), 3u);
    EXPECT_EQ(f.tensors[0].offset, 0u);
    EXPECT_EQ(f.tensors[1].offset, align);  // 12 bytes padded
    EXPECT_EQ(f.tensors[2].offset, 2 * align);  // 10 bytes padded
    const std::string bytes = test::slurp(path);
    EXPECT_EQ(bytes.size(), f.data_offset + 2 * align + 68);  // no padding after the last tensor
    for (uint64_t i = 12; i < align; i++) EXPECT_EQ(bytes[f.data_offset + i], '\0');
    EXPECT_EQ(f.tensor_floats("t1"), std::vector<float>(5, 2.0f));
    EXPECT_EQ(f.tensor_floats("t2"), std::vector<float>(64, -127.0f));
  }
}

TEST(Gguf, WriterRejectsWhatTheFormatCannotHold) {
  GgufWriter w;
  auto nop = [](float*) {};
  EXPECT_THROW(w.add_tensor("q", {2, 48}, GgufType::Q8_0, nop), Error);  // row not a multiple of 32
  EXPECT_THROW(w.add_tensor(std::string(64, 'n'), {2}, GgufType::F32, nop), Error);
  EXPECT_THROW(w.add_tensor("z", {0, 4}, GgufType::F32, nop), Error);
  EXPECT_THROW(w.add_tensor("b", {2}, GgufType::BF16, nop), Error);
  w.add_tensor("t", {2}, GgufType::F32, nop);
  EXPECT_THROW(w.add_tensor("t", {2}, GgufType::F32, nop), Error);
}

// A small valid file to damage: two metadata values, two tensors.
std::string sample_file(const ScratchDir& dir) {
  GgufWriter w;
  w.set("general.architecture", GgufValue::str("llama"));
  w.set("tokenizer.ggml.tokens", GgufValue::str_array({"a", "b", "c"}));
  w.set("flag", GgufValue::boolean(false));
  w.add_tensor("w", {2, 32}, GgufType::Q8_0, [](float* d) { std::fill(d, d + 64, 0.5f); });
  w.add_tensor("b", {3}, GgufType::F32, [](float* d) { std::fill(d, d + 3, 1.0f); });
  return test::slurp(write_read(w, dir));
}

void expect_error(const std::string& bytes, const std::string& what) {
  try {
    GgufFile::from_bytes(bytes, "bad.gguf");
    ADD_FAILURE() << what << ": parsed without an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("bad.gguf"), std::string::npos) << what << ": " << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << what << ": " << m;
  }
}

TEST(Gguf, EveryTruncationIsAnError) {
  ScratchDir dir("gguf_trunc");
  const std::string full = sample_file(dir);
  EXPECT_NO_THROW(GgufFile::from_bytes(full, "ok.gguf"));
  for (size_t n = 0; n < full.size(); n++) expect_error(full.substr(0, n), "truncated to " + std::to_string(n));
}

TEST(Gguf, CorruptFieldsAreNamedErrors) {
  ScratchDir dir("gguf_corrupt");
  const std::string full = sample_file(dir);
  const GgufFile ok = GgufFile::from_bytes(full, "ok.gguf");
  auto patched = [&](size_t at, const void* v, size_t n) {
    std::string s = full;
    std::memcpy(&s[at], v, n);
    return s;
  };
  auto expect_message = [&](const std::string& bytes, const std::string& needle) {
    try {
      GgufFile::from_bytes(bytes, "bad.gguf");
      ADD_FAILURE() << needle << ": parsed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const uint32_t u32_big = 0xffffffffu, version = 4;
  const uint64_t huge = 1ull << 62;
  expect_message(patched(0, "GGUG", 4), "magic");
  expect_message(patched(4, &version, 4), "version");
  expect_message(patched(8, &huge, 8), "tensor count");
  expect_message(patched(16, &huge, 8), "metadata count");
  // The first key (general.alignment) starts at 24: its length, then its type after the 17-byte name.
  expect_message(patched(24, &huge, 8), "metadata 0 key");
  expect_message(patched(24 + 8 + 17, &u32_big, 4), "unknown value type");
  // general.architecture's string length.
  const size_t arch_at = 24 + 8 + 17 + 4 + 4;
  expect_message(patched(arch_at + 8 + 20 + 4, &huge, 8), "general.architecture");
  // tokenizer.ggml.tokens: element count.
  const size_t tok_at = arch_at + 8 + 20 + 4 + 8 + 5;
  expect_message(patched(tok_at + 8 + 21 + 4 + 4, &huge, 8), "tokenizer.ggml.tokens");
  // flag's bool byte.
  const size_t flag_at = tok_at + 8 + 21 + 4 + 4 + 8 + 3 * 9;
  const uint8_t two = 2;
  expect_message(patched(flag_at + 8 + 4 + 4, &two, 1), "bool");
  // Tensor info "w": dims count, a dimension, the type, the offset.
  const size_t w_at = flag_at + 8 + 4 + 4 + 1;
  const uint32_t five = 5, q4k = 12;
  const uint64_t zero = 0, odd = 8, far = 1 << 20;
  expect_message(patched(w_at + 8 + 1, &five, 4), "5 dimensions");
  expect_message(patched(w_at + 8 + 1 + 4, &zero, 8), "dimension 0");
  expect_message(patched(w_at + 8 + 1 + 4 + 16, &q4k, 4), "unsupported tensor type");
  expect_message(patched(w_at + 8 + 1 + 4 + 16 + 4, &odd, 8), "not a multiple");
  expect_message(patched(w_at + 8 + 1 + 4 + 16 + 4, &far, 8), "runs past the end");
  // Tensor "b" moved onto "w"'s data.
  const size_t b_at = w_at + 8 + 1 + 4 + 16 + 4 + 8;
  expect_message(patched(b_at + 8 + 1 + 4 + 8 + 4, &zero, 8), "overlaps");
  EXPECT_EQ(ok.get_tensor("b").offset, 96u);  // the arithmetic above found the fields
}

TEST(Gguf, RandomDamageNeverCrashes) {
  ScratchDir dir("gguf_fuzz");
  const std::string full = sample_file(dir);
  std::mt19937 rng(5);
  int errors = 0;
  for (int it = 0; it < 3000; it++) {
    std::string s = full;
    const int flips = 1 + int(rng() % 4);
    for (int k = 0; k < flips; k++) s[rng() % s.size()] = char(rng() % 256);
    try {
      GgufFile f = GgufFile::from_bytes(s, "fuzz.gguf");
      for (const auto& t : f.tensors) (void)f.tensor_floats(t.name);
    } catch (const Error&) {
      errors++;
    }
  }
  EXPECT_GT(errors, 0);
}

// --- export_gguf ---

struct Tiny {
  ModelConfig cfg;
  ParamTable table;
  std::vector<float> params;
  GgufTokenizer tok;
  explicit Tiny(const std::string& family)
      : cfg(test::tiny_config(family)), table(test::tiny_table(cfg)), params(test::tiny_params(table, 3)),
        tok(test::tiny_tokenizer(cfg.vocab_size, test::tiny_pre(family))) {}
  const float* at(const std::string& key) const { return params.data() + table.get_key(key).offset; }
};

TEST(GgufExport, Gpt2TransposesConv1DAndTiesTheHead) {
  ScratchDir dir("gguf_gpt2");
  Tiny m("gpt2");
  export_gguf(dir / "m.gguf", m.cfg, m.table, m.params.data(), m.tok, GgufType::F32);
  GgufFile f(dir / "m.gguf");
  EXPECT_EQ(f.get("general.architecture").as_string("a"), "gpt2");
  EXPECT_EQ(f.get("gpt2.attention.head_count").type, GgufValueType::U32);
  EXPECT_FLOAT_EQ(float(f.get("gpt2.attention.layer_norm_epsilon").as_float("e")), 1e-5f);
  EXPECT_EQ(f.find_tensor("output.weight"), nullptr);
  const GgufTensorInfo& qkv = f.get_tensor("blk.1.attn_qkv.weight");
  EXPECT_EQ(qkv.ne, (std::vector<uint64_t>{64, 192}));
  const std::vector<float> got = f.tensor_floats("blk.1.attn_qkv.weight");
  const float* src = m.at("blk.1.attn_qkv.weight");  // Conv1D [in 64, out 192]
  for (int o = 0; o < 192; o += 7)
    for (int i = 0; i < 64; i += 5) ASSERT_EQ(got[o * 64 + i], src[i * 192 + o]);
  EXPECT_EQ(f.get("tokenizer.ggml.tokens").count, 320u);
  EXPECT_EQ(f.get("tokenizer.ggml.pre").as_string("p"), "gpt-2");
  EXPECT_EQ(f.get("tokenizer.ggml.eos_token_id").as_uint("e"), 319u);
}

TEST(GgufExport, LlamaPermutesQKAndWritesRopeFactors) {
  ScratchDir dir("gguf_llama");
  Tiny m("llama");
  export_gguf(dir / "m.gguf", m.cfg, m.table, m.params.data(), m.tok, GgufType::F32);
  GgufFile f(dir / "m.gguf");
  EXPECT_EQ(f.get("general.architecture").as_string("a"), "llama");
  EXPECT_EQ(f.get("llama.attention.head_count_kv").as_uint("h"), 2u);
  EXPECT_EQ(f.get("llama.rope.dimension_count").as_uint("r"), 16u);
  EXPECT_EQ(f.find("llama.attention.key_length"), nullptr);  // head_dim == d_model / n_head
  const int hd = 16, half = 8, C = 64;
  for (const char* name : {"blk.0.attn_q.weight", "blk.0.attn_k.weight"}) {
    const std::vector<float> got = f.tensor_floats(name);
    const float* src = m.at(name);
    const int heads = name[8] == 'q' ? 4 : 2;
    for (int h = 0; h < heads; h++)
      for (int i = 0; i < half; i++)
        for (int j = 0; j < 2; j++)
          ASSERT_EQ(got[(h * hd + 2 * i + j) * C + 3], src[(h * hd + j * half + i) * C + 3]) << name;
  }
  EXPECT_EQ(f.tensor_floats("blk.0.attn_v.weight"),
            std::vector<float>(m.at("blk.0.attn_v.weight"), m.at("blk.0.attn_v.weight") + 32 * 64));
  const std::vector<float> rf = f.tensor_floats("rope_freqs.weight");
  ASSERT_EQ(rf.size(), 8u);
  EXPECT_EQ(rf[0], 1.0f);         // highest frequency unscaled
  EXPECT_EQ(rf[7], 8.0f);         // lowest divided by the factor
  EXPECT_EQ(f.find("llama.rope.scaling.type"), nullptr);
}

TEST(GgufExport, TypesPerTensorAndQ8FallsBackToF16) {
  ScratchDir dir("gguf_types");
  Tiny m("mistral");  // d_model 48: rows of 48 cannot be Q8_0
  export_gguf(dir / "m.gguf", m.cfg, m.table, m.params.data(), m.tok, GgufType::Q8_0);
  GgufFile f(dir / "m.gguf");
  EXPECT_EQ(f.get("general.file_type").as_uint("t"), 7u);
  EXPECT_EQ(f.get_tensor("blk.0.attn_norm.weight").type, GgufType::F32);
  EXPECT_EQ(f.get_tensor("blk.0.attn_q.weight").type, GgufType::F16);   // [48, 48]
  EXPECT_EQ(f.get_tensor("blk.0.ffn_down.weight").type, GgufType::Q8_0);  // rows of d_ff 128
  EXPECT_EQ(f.get_tensor("output.weight").type, GgufType::F16);  // untied head written
  Tiny q("qwen3");
  export_gguf(dir / "q.gguf", q.cfg, q.table, q.params.data(), q.tok, GgufType::F16);
  GgufFile g(dir / "q.gguf");
  EXPECT_EQ(g.get("qwen3.attention.key_length").as_uint("k"), 32u);
  EXPECT_EQ(g.get("qwen3.attention.value_length").as_uint("v"), 32u);
  EXPECT_EQ(g.get_tensor("blk.1.attn_q_norm.weight").type, GgufType::F32);
  EXPECT_EQ(g.get_tensor("blk.1.attn_q.weight").ne, (std::vector<uint64_t>{64, 128}));
  EXPECT_EQ(g.get_tensor("blk.1.attn_q.weight").type, GgufType::F16);
  // qwen2: biases F32, unpermuted.
  Tiny w("qwen2");
  export_gguf(dir / "w.gguf", w.cfg, w.table, w.params.data(), w.tok, GgufType::F32);
  GgufFile h(dir / "w.gguf");
  EXPECT_EQ(h.tensor_floats("blk.0.attn_q.bias"),
            std::vector<float>(w.at("blk.0.attn_q.bias"), w.at("blk.0.attn_q.bias") + 64));
}

TEST(GgufExport, UnsupportedFeaturesWriteNothing) {
  ScratchDir dir("gguf_unsupported");
  auto expect_refused = [&](Tiny m, const std::string& needle) {
    const std::string path = dir / "x.gguf";
    try {
      export_gguf(path, m.cfg, m.table, m.params.data(), m.tok, GgufType::F32);
      ADD_FAILURE() << needle << ": exported";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    }
    EXPECT_FALSE(file_exists(path)) << needle;
  };
  Tiny a("mistral");
  a.cfg.sliding_window = 64;  // < context 128
  expect_refused(a, "sliding window");
  Tiny b("llama");
  b.cfg.qk_norm = true;
  expect_refused(b, "qk_norm");
  Tiny c("qwen2");
  c.cfg.rope_scaling.kind = RopeScaling::Llama3;
  expect_refused(c, "llama3 rope");
  Tiny d("gpt2");
  d.cfg.family = "gptj";
  expect_refused(d, "gptj");
  Tiny e("qwen3");
  e.tok.tokens.pop_back();
  expect_refused(e, "tokenizer has 319 tokens");
  Tiny g("llama");
  g.table = test::tiny_table(test::tiny_config("qwen3"));  // shapes that do not fit the config
  g.params.assign(g.table.total, 0.0f);
  expect_refused(g, "expects");
  Tiny h("llama");
  h.table.specs.pop_back();  // no output_norm
  expect_refused(h, "output_norm.weight");
}

}  // namespace
}  // namespace kiln
