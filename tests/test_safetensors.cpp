// safetensors reader and writer: round trips, the Python peer in both directions, and corrupt files.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/safetensors.h"
#include "io_test_helpers.h"

namespace kiln {
namespace {

using test::formula;
using test::ScratchDir;

// The tensors of the peer's GENERIC list, with values from the formula in each dtype.
struct Generic {
  std::vector<float> alpha, empty, scalar, wide;
  std::vector<uint16_t> beta, gamma, eps;
  std::vector<int32_t> delta;
  std::vector<Tensor> tensors;

  template <class T, class F>
  static std::vector<T> fill(const std::string& name, int64_t n, F f) {
    std::vector<T> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; i++) v[size_t(i)] = f(name, uint32_t(i));
    return v;
  }
  explicit Generic(float nudge = 0.0f) {
    auto f32 = [](const std::string& n, uint32_t i) { return formula(n, i); };
    alpha = fill<float>("alpha", 15, f32);
    alpha[7] += nudge;  // a negative control for the peer check
    beta = fill<uint16_t>("beta.bf16", 28, [](const std::string& n, uint32_t i) { return f32_to_bf16(formula(n, i)); });
    gamma = fill<uint16_t>("gamma", 12, [](const std::string& n, uint32_t i) { return f32_to_f16(formula(n, i)); });
    delta = fill<int32_t>("delta", 4, [](const std::string& n, uint32_t i) {
      return int32_t(test::mix(test::fnv1a(n), i) % 2001) - 1000;
    });
    eps = fill<uint16_t>(
        "eps", 5, [](const std::string& n, uint32_t i) { return uint16_t(test::mix(test::fnv1a(n), i) & 0xffff); });
    scalar = fill<float>("scalar", 1, f32);
    wide = fill<float>("wide", 6, f32);
    tensors = {
        {"alpha", DType::F32, {3, 5}, alpha.data()},    {"beta.bf16", DType::BF16, {7, 4}, beta.data()},
        {"gamma", DType::F16, {2, 2, 3}, gamma.data()}, {"delta", DType::I32, {4}, delta.data()},
        {"eps", DType::U16, {5}, eps.data()},           {"empty", DType::F32, {0}, nullptr},
        {"scalar", DType::F32, {}, scalar.data()},      {"wide", DType::F32, {1, 2, 1, 3}, wide.data()},
    };
  }
};

TEST(SafeTensors, RoundTripKeepsBytesShapesAndMetadata) {
  ScratchDir dir("st_roundtrip");
  Generic g;
  std::string path = dir / "t.safetensors";
  write_safetensors(path, g.tensors, {{"format", "pt"}, {"step", "12"}});
  SafeTensorsReader r(path);
  ASSERT_EQ(r.tensors().size(), g.tensors.size());
  for (const Tensor& want : g.tensors) {
    const Tensor& got = r.get(want.name);
    EXPECT_EQ(got.dtype, want.dtype) << want.name;
    EXPECT_EQ(got.shape, want.shape) << want.name;
    ASSERT_EQ(got.nbytes(), want.nbytes()) << want.name;
    if (want.nbytes()) {
      EXPECT_EQ(std::memcmp(got.data, want.data, want.nbytes()), 0) << want.name;
    }
    EXPECT_EQ(reinterpret_cast<uintptr_t>(got.data) % dtype_size(got.dtype), 0u) << want.name;
  }
  EXPECT_EQ(r.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"step", "12"}}));
  std::string raw = test::slurp(path);
  uint64_t n;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(r.find("absent"), nullptr);
}

TEST(SafeTensors, ReadsFilesThePeerWrote) {
  ScratchDir dir("st_peer_read");
  for (bool pad : {true, false}) {
    std::string path = dir / (pad ? "padded.safetensors" : "unpadded.safetensors");
    ASSERT_EQ(test::run_peer("write " + path + (pad ? " --pad" : "")), 0);
    SafeTensorsReader r(path);
    EXPECT_EQ(r.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "peer"}}));
    const Tensor& a = r.get("alpha");
    ASSERT_EQ(a.shape, (Shape{3, 5}));
    for (uint32_t i = 0; i < 15; i++) EXPECT_EQ(a.f32()[i], formula("alpha", i)) << i;
    const Tensor& b = r.get("beta.bf16");
    ASSERT_EQ(b.dtype, DType::BF16);
    for (uint32_t i = 0; i < 28; i++)
      EXPECT_EQ(bf16_to_f32(b.as<uint16_t>()[i]), test::bf16_reference(formula("beta.bf16", i))) << i;
    const Tensor& c = r.get("gamma");
    ASSERT_EQ(c.dtype, DType::F16);
    ASSERT_EQ(c.shape, (Shape{2, 2, 3}));
    for (uint32_t i = 0; i < 12; i++) EXPECT_EQ(f16_to_f32(c.as<uint16_t>()[i]), formula("gamma", i)) << i;
    const Tensor& d = r.get("delta");
    for (uint32_t i = 0; i < 4; i++)
      EXPECT_EQ(d.as<int32_t>()[i], int32_t(test::mix(test::fnv1a("delta"), i) % 2001) - 1000);
    const Tensor& e = r.get("eps");
    for (uint32_t i = 0; i < 5; i++) EXPECT_EQ(e.as<uint16_t>()[i], test::mix(test::fnv1a("eps"), i) & 0xffff);
    EXPECT_EQ(r.get("empty").numel(), 0);
    EXPECT_EQ(r.get("scalar").shape.ndim, 0);
    EXPECT_EQ(r.get("scalar").f32()[0], formula("scalar", 0));
    EXPECT_EQ(r.get("wide").shape, (Shape{1, 2, 1, 3}));
    // The I64 buffer is listed and validated, but kiln has no I64 tensors: asking for it names it.
    const SafeTensorsEntry* buf = r.find_entry("int64.buffer");
    ASSERT_NE(buf, nullptr);
    EXPECT_EQ(buf->dtype, "I64");
    EXPECT_KILN_ERROR(r.find("int64.buffer"), "int64.buffer");
    std::vector<float> conv(15);
    convert_to_f32(r.find_entry("alpha")->bytes, DType::F32, conv.data(), 15);
    EXPECT_EQ(conv[3], formula("alpha", 3));
  }
}

TEST(SafeTensors, PeerReadsOurFiles) {
  ScratchDir dir("st_peer_check");
  std::string path = dir / "ours.safetensors";
  write_safetensors(path, Generic().tensors, {{"format", "pt"}, {"note", "peer"}});
  EXPECT_EQ(test::run_peer("check " + path), 0);
  // Negative control: one value off by a little must make the peer disagree.
  std::string bad = dir / "bad.safetensors";
  Generic nudged(1.0f / 1024);
  write_safetensors(bad, nudged.tensors, {{"format", "pt"}, {"note", "peer"}});
  EXPECT_NE(test::run_peer("check " + bad), 0);
}

TEST(SafeTensors, ConvertedWriteRoundsToNearestEven) {
  ScratchDir dir("st_convert");
  std::vector<float> v(4096);
  for (uint32_t i = 0; i < v.size(); i++) v[i] = formula("x", i);
  v[0] = 1.0f + 1.0f / 256;  // an exact tie between 1 and 1 + 1/128: rounds to the even 1.0
  v[1] = 1.0f + 3.0f / 256;  // a tie that rounds up to the even 1 + 2/128
  for (DType dt : {DType::BF16, DType::F16, DType::F32}) {
    std::string path = dir / "c.safetensors";
    write_safetensors_converted(path, {Tensor{"x", DType::F32, {64, 64}, v.data()}}, dt);
    SafeTensorsReader r(path);
    const Tensor& t = r.get("x");
    ASSERT_EQ(t.dtype, dt);
    std::vector<float> back(v.size());
    convert_to_f32(t.data, t.dtype, back.data(), back.size());
    for (size_t i = 0; i < v.size(); i++)
      ASSERT_EQ(back[i], dt == DType::BF16 ? test::bf16_reference(v[i]) : v[i]) << dtype_name(dt) << " " << i;
    if (dt == DType::BF16) {
      EXPECT_EQ(back[0], 1.0f);
      EXPECT_EQ(back[1], 1.0f + 2.0f / 128);
    }
  }
  EXPECT_KILN_ERROR(
      write_safetensors_converted(dir / "i.safetensors", {Tensor{"x", DType::F32, {1}, v.data()}}, DType::I32),
      "i.safetensors");
}

TEST(SafeTensors, WriterRejectsBadTensorLists) {
  ScratchDir dir("st_writer_bad");
  float x = 1;
  std::string path = dir / "w.safetensors";
  EXPECT_KILN_ERROR(write_safetensors(path, {{"a", DType::F32, {1}, &x}, {"a", DType::F32, {1}, &x}}), "\"a\"");
  EXPECT_KILN_ERROR(write_safetensors(path, {{"__metadata__", DType::F32, {1}, &x}}), "__metadata__");
  EXPECT_KILN_ERROR(write_safetensors(path, {{"n", DType::F32, {2}, nullptr}}), "\"n\"");
  EXPECT_KILN_ERROR(write_safetensors(dir / "no/such/dir/w.safetensors", {{"a", DType::F32, {1}, &x}}),
                    "w.safetensors");
  EXPECT_FALSE(file_exists(path));
}

// --- Corrupt files: every one must give kiln::Error naming the file (and the tensor where there is one).

struct Corrupt : ::testing::Test {
  ScratchDir dir{"st_corrupt"};
  std::string write(const std::string& name, const std::string& bytes) {
    std::string p = dir / name;
    test::write_bytes(p, bytes);
    return p;
  }
  void expect_error(const std::string& name, const std::string& header, const std::string& data,
                    const std::string& also = "") {
    std::string p = write(name, test::safetensors_bytes(header, data));
    EXPECT_KILN_ERROR(SafeTensorsReader r(p), name);
    if (!also.empty()) EXPECT_KILN_ERROR(SafeTensorsReader r(p), also);
  }
};

TEST_F(Corrupt, TruncatedAtEveryKindOfCutPoint) {
  Generic g;
  std::string good = dir / "good.safetensors";
  write_safetensors(good, g.tensors);
  std::string raw = test::slurp(good);
  uint64_t n;
  std::memcpy(&n, raw.data(), 8);
  for (size_t cut : {size_t(0), size_t(3), size_t(7), size_t(8), size_t(9), size_t(8 + n / 2), size_t(8 + n - 1),
                     size_t(8 + n), size_t(8 + n + 1), raw.size() / 2 + 4 * n / 5, raw.size() - 1}) {
    if (cut >= raw.size()) continue;
    std::string p = write("cut" + std::to_string(cut) + ".safetensors", raw.substr(0, cut));
    EXPECT_KILN_ERROR(SafeTensorsReader r(p), "cut" + std::to_string(cut) + ".safetensors");
  }
  // Bytes after the last tensor are not an error.
  std::string p = write("trailing.safetensors", raw + "garbage after the data");
  SafeTensorsReader r(p);
  EXPECT_EQ(std::memcmp(r.get("alpha").data, g.alpha.data(), 60), 0);
}

TEST_F(Corrupt, HeaderLengthBeyondTheFile) {
  std::string bytes = test::safetensors_bytes("{}", "");
  bytes[0] = char(0x40);  // header length 64 in a 10-byte file
  EXPECT_KILN_ERROR(SafeTensorsReader r(write("long.safetensors", bytes)), "long.safetensors");
  bytes[0] = 2;
  bytes[7] = char(0xff);  // 2^63-ish: must not overflow the bounds check
  EXPECT_KILN_ERROR(SafeTensorsReader r(write("huge.safetensors", bytes)), "huge.safetensors");
  EXPECT_KILN_ERROR(SafeTensorsReader r(write("tiny.safetensors", "abc")), "tiny.safetensors");
  EXPECT_KILN_ERROR(SafeTensorsReader r(dir / "missing.safetensors"), "missing.safetensors");
}

TEST_F(Corrupt, MalformedHeaderJson) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  std::string four(4, '\0');
  expect_error("open.safetensors", R"({"a":{"dtype":"F32")", four, "malformed");
  expect_error("notobj.safetensors", "[1, 2]", "", "{");
  expect_error("array.safetensors", R"({"a":[1,2]})", four, "\"a\"");
  expect_error("nul.safetensors", ok.substr(0, 10) + std::string(1, '\0') + ok.substr(11), four);
  expect_error("dupe.safetensors",
               R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
               R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
               four, "duplicate");
  expect_error("deep.safetensors", std::string(40, '[') + std::string(40, ']'), "");
  expect_error("deep2.safetensors", R"({"a":)" + std::string(100, '[') + std::string(100, ']') + "}", "", "deep");
  expect_error("nodtype.safetensors", R"({"a":{"shape":[1],"data_offsets":[0,4]}})", four, "dtype");
  expect_error("noshape.safetensors", R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", four, "shape");
  expect_error("nooffsets.safetensors", R"({"a":{"dtype":"F32","shape":[1]}})", four, "data_offsets");
  expect_error("threeoffsets.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", four,
               "\"a\"");
  expect_error("floatoffset.safetensors", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}})", four, "\"a\"");
  expect_error("metadata.safetensors", R"({"__metadata__":{"k":3}})", "", "__metadata__");
  expect_error("metadata2.safetensors", R"({"__metadata__":"x"})", "", "__metadata__");
}

TEST_F(Corrupt, BadDTypeShapeAndOffsets) {
  std::string eight(8, '\0');
  expect_error("dtype.safetensors", R"({"w":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", eight, "F31");
  expect_error("negdim.safetensors", R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight, "negative");
  expect_error("fracdim.safetensors", R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,8]}})", eight, "\"w\"");
  expect_error("range.safetensors", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}})", eight, "beyond");
  expect_error("reversed.safetensors", R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", eight, "reversed");
  expect_error("negoff.safetensors", R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[-4,0]}})", eight, "\"w\"");
  expect_error("size.safetensors", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight, "\"w\"");
  expect_error("overflow.safetensors", R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
               eight, "\"w\"");
  expect_error(
      "overlap.safetensors",
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
      eight, "overlap");
  // Names from the file are quoted with control characters escaped: the message stays one line.
  std::string q = write("newline.safetensors",
                        test::safetensors_bytes(R"({"a\nb":{"dtype":"X","shape":[],"data_offsets":[0,0]}})", ""));
  try {
    SafeTensorsReader r(q);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("\"a\\x0ab\""), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
  }
  // A header with gaps between tensors is odd but readable; a five-dimensional tensor is listed, not loaded.
  std::string p =
      write("gap.safetensors",
            test::safetensors_bytes(R"({"w":{"dtype":"U16","shape":[1,1,1,1,1],"data_offsets":[4,6]}})", eight));
  SafeTensorsReader r(p);
  EXPECT_EQ(r.entries().size(), 1u);
  EXPECT_TRUE(r.tensors().empty());
  EXPECT_KILN_ERROR(r.find("w"), "gap.safetensors");
}

}  // namespace
}  // namespace kiln
