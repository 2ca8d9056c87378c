// Packed and padded batching (train/packing.h) and supervised data with loss masks (train/sft.h).
// Expected values come from the tests' own corpus description (document lengths, the tokens they wrote,
// the template rendered by hand over a byte-level vocabulary) and from separate unpacked GPT2 forwards.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "tests/gpt2_compat.h"
#include "tokenizer/bpe.h"
#include "train/doc_index.h"
#include "train/packing.h"
#include "train/sft.h"
#include "train/shards.h"
#include "train/trainer.h"

namespace kiln {
namespace {

std::string fresh_dir(const std::string& name) {
  std::string d = ::testing::TempDir() + "kiln_packing_" + name + "_" + std::to_string(::getpid());
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// A corpus of documents with the given lengths, written into shards of shard_tokens tokens (documents
// spill across shards), with .idx files. token(g) gives the token at stream position g.
struct Corpus {
  std::string pattern;
  std::vector<int64_t> starts;  // stream offset of each document, then the total
  std::vector<uint32_t> stream;
  int64_t doc_of(int64_t g) const {
    return int64_t(std::upper_bound(starts.begin(), starts.end(), g) - starts.begin()) - 1;
  }
};

Corpus write_corpus(const std::string& dir, const std::vector<int64_t>& lengths, int64_t shard_tokens,
                    const std::function<uint32_t(int64_t)>& token) {
  Corpus c;
  c.starts.push_back(0);
  for (int64_t l : lengths) c.starts.push_back(c.starts.back() + l);
  const int64_t total = c.starts.back();
  for (int64_t g = 0; g < total; g++) c.stream.push_back(token(g));
  for (int64_t s0 = 0, k = 0; s0 < total; s0 += shard_tokens, k++) {
    const int64_t s1 = std::min(total, s0 + shard_tokens);
    char name[32];
    std::snprintf(name, sizeof name, "/d_%03ld.bin", long(k));
    std::vector<uint32_t> toks(c.stream.begin() + s0, c.stream.begin() + s1);
    std::vector<int64_t> idx;
    for (size_t d = 0; d + 1 < c.starts.size(); d++)
      if (c.starts[d] >= s0 && c.starts[d] < s1) idx.push_back(c.starts[d] - s0);
    write_shard(dir + name, toks);
    write_doc_index(dir + name + ".idx", idx);
  }
  c.pattern = dir + "/d_*.bin";
  return c;
}

std::vector<int64_t> random_lengths(int n, int64_t lo, int64_t hi, uint64_t seed) {
  Rng r(seed);
  std::vector<int64_t> v;
  for (int i = 0; i < n; i++) v.push_back(lo + int64_t(r.below(uint64_t(hi - lo + 1))));
  return v;
}

// Checks one batch against the corpus (tokens are stream positions); marks the tokens it holds.
void check_packed_batch(const Batch& b, const Corpus& c, int64_t budget, int64_t whole_max, int64_t piece,
                        std::vector<int>& seen) {
  ASSERT_LE(b.n_tokens, budget);
  ASSERT_GE(b.cu_seqlens.size(), 2u);
  ASSERT_EQ(b.cu_seqlens.front(), 0);
  ASSERT_EQ(b.cu_seqlens.back(), b.n_tokens);
  ASSERT_EQ(b.B, 1);
  ASSERT_EQ(b.T, b.n_tokens);
  for (size_t s = 0; s + 1 < b.cu_seqlens.size(); s++) {
    const int64_t a = b.cu_seqlens[s], e = b.cu_seqlens[s + 1];
    ASSERT_LT(a, e);
    const int64_t g0 = b.tokens[size_t(a)], d = c.doc_of(g0);
    const int64_t doc_len = c.starts[size_t(d) + 1] - c.starts[size_t(d)], off = g0 - c.starts[size_t(d)];
    if (doc_len <= whole_max) {
      ASSERT_EQ(off, 0) << "a short document must be whole";
      ASSERT_EQ(e - a, doc_len);
    } else {
      ASSERT_EQ(off % piece, 0);
      ASSERT_EQ(e - a, std::min(piece, doc_len - off));
    }
    for (int64_t i = a; i < e; i++) {
      const int64_t g = g0 + (i - a);
      ASSERT_EQ(b.tokens[size_t(i)], g);
      ASSERT_EQ(b.pos[size_t(i)], i - a) << "positions restart at each sequence";
      const int32_t want = g + 1 < c.starts[size_t(d) + 1] ? int32_t(g + 1) : -1;
      ASSERT_EQ(b.targets[size_t(i)], want);
      seen[size_t(g)]++;
    }
  }
}

TEST(Packing, EveryTokenOnceEpochAfterEpoch) {
  const std::string dir = fresh_dir("cover");
  // Lengths 1..300 with B·T = 256 and n_positions 512: whole documents up to 256, longer ones cut in 64s.
  std::vector<int64_t> lengths = random_lengths(150, 1, 300, 11);
  lengths.push_back(256);
  lengths.push_back(257);
  const Corpus c = write_corpus(dir, lengths, 1000, [](int64_t g) { return uint32_t(g); });
  ASSERT_LT(c.starts.back(), 65536);
  auto docs = std::make_shared<const DocumentSet>(c.pattern, 0);
  ASSERT_EQ(docs->num_documents(), int64_t(lengths.size()));
  PackedSource src(docs, 4, 64, 512, /*shuffled=*/true, 7);
  std::vector<int64_t> first_tokens[2];
  for (int epoch = 0; epoch < 2; epoch++) {
    std::vector<int> seen(size_t(c.starts.back()), 0);
    Batch b;
    int batches = 0;
    do {
      src.next(b);
      ASSERT_EQ(src.state().epoch, epoch);
      check_packed_batch(b, c, 256, 256, 64, seen);
      for (size_t s = 0; s + 1 < b.cu_seqlens.size(); s++) first_tokens[epoch].push_back(b.tokens[b.cu_seqlens[s]]);
      batches++;
    } while (src.state().position < docs->num_documents());
    for (size_t g = 0; g < seen.size(); g++) ASSERT_EQ(seen[g], 1) << "token " << g << " in epoch " << epoch;
    // Greedy packing: each batch but the last is full up to less than the next sequence's length.
    EXPECT_LE(batches, int(c.starts.back() / 128) + 2);
  }
  EXPECT_NE(first_tokens[0], first_tokens[1]) << "each epoch draws its own order";
}

TEST(Packing, SequentialOrderAndPaddedRowsHoldTheSameSequences) {
  const std::string dir = fresh_dir("padded");
  std::vector<int64_t> lengths = random_lengths(80, 1, 100, 12);  // some longer than T = 32: cut in pieces
  const Corpus c = write_corpus(dir, lengths, 700, [](int64_t g) { return uint32_t(g); });
  auto docs = std::make_shared<const DocumentSet>(c.pattern, 0);
  // T == n_positions: both sources cut documents longer than 32 into pieces of 32.
  PackedSource packed(docs, 3, 32, 32, /*shuffled=*/false, 1);
  PaddedSource padded(docs, 3, 32, 32, /*shuffled=*/false, 1);
  std::vector<std::pair<int64_t, int64_t>> seq_packed, seq_padded;  // (first token, length)
  std::vector<int> seen(size_t(c.starts.back()), 0);
  Batch b;
  do {
    packed.next(b);
    check_packed_batch(b, c, 96, 32, 32, seen);
    for (size_t s = 0; s + 1 < b.cu_seqlens.size(); s++)
      seq_packed.push_back({b.tokens[b.cu_seqlens[s]], b.cu_seqlens[s + 1] - b.cu_seqlens[s]});
  } while (packed.state().position < docs->num_documents());
  // Sequential: the sequences come in stream order.
  for (size_t i = 1; i < seq_packed.size(); i++)
    ASSERT_EQ(seq_packed[i].first, seq_packed[i - 1].first + seq_packed[i - 1].second);
  do {
    padded.next(b);
    ASSERT_TRUE(b.cu_seqlens.empty());
    ASSERT_EQ(b.T, 32);
    ASSERT_EQ(b.n_tokens, int64_t(b.B) * 32);
    ASSERT_TRUE(b.B == 3 || padded.state().position == docs->num_documents());
    for (int r = 0; r < b.B; r++) {
      const size_t o = size_t(r) * 32;
      int64_t len = 0;
      while (len < 32 && (len == 0 || b.tokens[o + size_t(len)] == b.tokens[o + size_t(len) - 1] + 1)) len++;
      // The row's real tokens are a run of consecutive stream positions; the rest is padding.
      seq_padded.push_back({b.tokens[o], len});
      for (int t = 0; t < 32; t++) ASSERT_EQ(b.pos[o + size_t(t)], t);
      for (int64_t t = len; t < 32; t++) ASSERT_EQ(b.targets[o + size_t(t)], -1) << "padding has no target";
    }
  } while (padded.state().position < docs->num_documents());
  // (A padding token 0 never continues a run: it would have to follow stream position -1.)
  EXPECT_EQ(seq_packed, seq_padded);
}

GPT2Config tiny_config(int n_positions) {
  GPT2Config cfg;
  cfg.n_layer = 2;
  cfg.n_head = 2;
  cfg.n_embd = 32;
  cfg.vocab_size = 64;
  cfg.n_positions = n_positions;
  return cfg;
}

Corpus random_corpus(const std::string& dir, const std::vector<int64_t>& lengths, int64_t shard_tokens, int vocab) {
  Rng r(99);
  return write_corpus(dir, lengths, shard_tokens, [&](int64_t) { return uint32_t(r.below(uint64_t(vocab))); });
}

TEST(Packing, PackedLossIsTheSumOfPerDocumentLosses) {
  const std::string dir = fresh_dir("loss");
  const GPT2Config cfg = tiny_config(64);
  const Corpus c = random_corpus(dir, random_lengths(40, 1, 64, 13), 500, cfg.vocab_size);
  auto docs = std::make_shared<const DocumentSet>(c.pattern, cfg.vocab_size);
  GPT2 model(cfg, /*with_grads=*/false);
  model.init_random(21);
  model.plan(4, 32);
  // Sequential order: the documents come in stream order, so the corpus alone says what each holds.
  PackedSource src(docs, 4, 32, cfg.n_positions, /*shuffled=*/false, 3);
  Batch b;
  int64_t doc = 0;
  for (int k = 0; k < 3; k++) {
    src.next(b);
    ASSERT_GT(b.cu_seqlens.size(), 2u) << "several documents per batch";
    const double packed = model.forward(b.tokens.data(), b.pos.data(), b.targets.data(), b.attention(cfg.attention(1, 1)), 0.0f);
    double separate = 0;
    for (size_t s = 0; s + 1 < b.cu_seqlens.size(); s++, doc++) {
      const int64_t g0 = c.starts[size_t(doc)], n = c.starts[size_t(doc) + 1] - g0;
      ASSERT_EQ(b.cu_seqlens[s + 1] - b.cu_seqlens[s], n) << "document " << doc;
      // One document per call: B = 1, T = its length, its own targets (none after its last token).
      std::vector<int32_t> tok(static_cast<size_t>(n)), pos(tok.size()), tgt(tok.size());
      for (int64_t i = 0; i < n; i++) {
        tok[size_t(i)] = int32_t(c.stream[size_t(g0 + i)]);
        pos[size_t(i)] = int32_t(i);
        tgt[size_t(i)] = i + 1 < n ? int32_t(c.stream[size_t(g0 + i + 1)]) : -1;
      }
      separate += model.forward(tok.data(), pos.data(), tgt.data(), model.attention_params(1, int(n)), 0.0f);
    }
    EXPECT_NEAR(packed, separate, 1e-5 * std::fabs(separate)) << "batch " << k;
  }
}

TEST(Packing, NoAttentionAcrossDocuments) {
  const std::string dir = fresh_dir("leak");
  const GPT2Config cfg = tiny_config(64);
  const Corpus c = random_corpus(dir, random_lengths(30, 5, 40, 14), 400, cfg.vocab_size);
  auto docs = std::make_shared<const DocumentSet>(c.pattern, cfg.vocab_size);
  GPT2 model(cfg, /*with_grads=*/false);
  model.init_random(22);
  model.plan(4, 32);
  PackedSource src(docs, 4, 32, cfg.n_positions, /*shuffled=*/false, 0);
  Batch b;
  src.next(b);
  const size_t nseq = b.cu_seqlens.size() - 1, V = size_t(cfg.vocab_size);
  ASSERT_GE(nseq, 3u);
  model.forward(b.tokens.data(), b.pos.data(), b.targets.data(), b.attention(cfg.attention(1, 1)), 0.0f);
  const std::vector<float> before(model.logits(), model.logits() + size_t(b.n_tokens) * V);
  for (size_t victim : {size_t(0), nseq / 2, nseq - 1}) {
    Batch p = b;
    for (int32_t i = p.cu_seqlens[victim]; i < p.cu_seqlens[victim + 1]; i++)
      p.tokens[size_t(i)] = (p.tokens[size_t(i)] + 17) % cfg.vocab_size;
    model.forward(p.tokens.data(), p.pos.data(), p.targets.data(), p.attention(cfg.attention(1, 1)), 0.0f);
    const float* after = model.logits();
    for (size_t s = 0; s < nseq; s++) {
      const size_t a = size_t(b.cu_seqlens[s]) * V, e = size_t(b.cu_seqlens[s + 1]) * V;
      const bool same = std::memcmp(before.data() + a, after + a, (e - a) * sizeof(float)) == 0;
      if (s == victim)
        EXPECT_FALSE(same) << "perturbed sequence " << s << " should change";
      else
        EXPECT_TRUE(same) << "sequence " << s << " changed when sequence " << victim << " was perturbed";
    }
  }
}

// Mean loss per target over one epoch (sequential order) of a source.
double epoch_mean_loss(GPT2& model, DocumentBatchSource& src, int64_t* n_targets) {
  double sum = 0;
  *n_targets = 0;
  Batch b;
  do {
    src.next(b);
    sum += model.forward(b.tokens.data(), b.pos.data(), b.targets.data(), b.attention(model.attention_params(1, 1)), 0.0f);
    *n_targets += b.count_targets();
  } while (src.state().position < src.documents().num_documents());
  return sum / double(*n_targets);
}

TEST(Packing, PackedAndPaddedGiveTheSameMeanLoss) {
  const std::string dir = fresh_dir("same");
  const GPT2Config cfg = tiny_config(32);
  // Lengths up to 80 with T = n_positions = 32: long documents are cut the same way by both sources.
  const Corpus c = random_corpus(dir, random_lengths(50, 1, 80, 15), 600, cfg.vocab_size);
  auto docs = std::make_shared<const DocumentSet>(c.pattern, cfg.vocab_size);
  GPT2 model(cfg, /*with_grads=*/false);
  model.init_random(23);
  model.plan(4, 32);
  PackedSource packed(docs, 4, 32, cfg.n_positions, false, 0);
  PaddedSource padded(docs, 4, 32, cfg.n_positions, false, 0);
  int64_t n_packed = 0, n_padded = 0;
  const double lp = epoch_mean_loss(model, packed, &n_packed);
  const double ld = epoch_mean_loss(model, padded, &n_padded);
  // Targets: every token but each document's last one.
  EXPECT_EQ(n_packed, c.starts.back() - int64_t(c.starts.size() - 1));
  EXPECT_EQ(n_padded, n_packed);
  EXPECT_NEAR(lp, ld, 1e-5 * ld);
}

TEST(Packing, ResumeMidEpochGivesIdenticalBatches) {
  const std::string dir = fresh_dir("resume");
  const Corpus c = write_corpus(dir, random_lengths(60, 1, 150, 16), 500, [](int64_t g) { return uint32_t(g); });
  auto docs = std::make_shared<const DocumentSet>(c.pattern, 0);
  for (bool use_packed : {true, false}) {
    auto make = [&]() -> std::unique_ptr<DocumentBatchSource> {
      if (use_packed) return std::make_unique<PackedSource>(docs, 2, 32, 32, true, 5);
      return std::make_unique<PaddedSource>(docs, 2, 32, 32, true, 5);
    };
    auto a = make();
    Batch b;
    bool mid_document = false;
    for (int k = 0; k < 200; k++) {
      a->next(b);
      const LoaderState st = a->state();
      if (k < 3 || st.shard == 0) continue;  // stop inside a cut document
      mid_document = true;
      auto r = make();
      r->set_state(st);
      Batch x, y;
      for (int j = 0; j < 250; j++) {  // runs into the next epoch
        a->next(x);
        r->next(y);
        ASSERT_EQ(x.tokens, y.tokens) << "batch " << j << " after resuming";
        ASSERT_EQ(x.targets, y.targets);
        ASSERT_EQ(x.pos, y.pos);
        ASSERT_EQ(x.cu_seqlens, y.cu_seqlens);
      }
      EXPECT_EQ(a->state().epoch, r->state().epoch);
      EXPECT_GE(a->state().epoch, 1);
      break;
    }
    EXPECT_TRUE(mid_document) << "the resumed state should sit inside a cut document";
    LoaderState bad;
    bad.position = docs->num_documents() + 1;
    EXPECT_THROW(a->set_state(bad), Error);
  }
}

TEST(Packing, BadShardSetsGiveOneLineErrors) {
  const std::string dir = fresh_dir("errors");
  const Corpus c = write_corpus(dir, {10, 20, 30}, 25, [](int64_t g) { return uint32_t(g % 50); });
  std::filesystem::remove(dir + "/d_001.bin.idx");
  try {
    DocumentSet d(c.pattern, 0);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("d_001.bin.idx"), std::string::npos) << e.what();
  }
  write_doc_index(dir + "/d_001.bin.idx", {});
  write_loss_mask(dir + "/d_000.bin.mask", std::vector<uint8_t>(25, 1));
  try {
    DocumentSet d(c.pattern, 0);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("d_001.bin.mask"), std::string::npos) << e.what();
  }
  write_loss_mask(dir + "/d_001.bin.mask", std::vector<uint8_t>(24, 1));  // the shard has 25 tokens
  try {
    DocumentSet d(c.pattern, 0);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("d_001.bin.mask"), std::string::npos) << e.what();
  }
  write_loss_mask(dir + "/d_001.bin.mask", std::vector<uint8_t>(25, 1));
  write_loss_mask(dir + "/d_002.bin.mask", std::vector<uint8_t>(10, 1));
  DocumentSet ok(c.pattern, 0);
  // Supervised shards must not train with plain rows (which would ignore the masks).
  TrainOptions opt;
  opt.batch = 1;
  opt.seq = 4;
  EXPECT_THROW(make_batch_source(opt, c.pattern, tiny_config(32).model(), false), Error);
  opt.packing = true;
  EXPECT_NO_THROW(make_batch_source(opt, c.pattern, tiny_config(32).model(), false));
  opt.packing = false;
  opt.batching = "sideways";
  EXPECT_THROW(make_batch_source(opt, c.pattern, tiny_config(32).model(), false), Error);
}

// A byte-level vocabulary: ids 0..255 are the bytes in order, 256 is end-of-text, so the expected token
// ids of a text are its bytes.
std::string byte_tokenizer_dir() {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; b++) tokens.emplace_back(1, char(b));
  tokens.push_back("<|endoftext|>");
  const std::string dir = fresh_dir("bytetok");
  Tokenizer::from_parts(tokens, {}, {{"<|endoftext|>", 256}}).save(dir);
  return dir;
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

// The template rendered by hand: (text, trained) pieces; "\x01EOT" stands for the end-of-text token.
void render_expected(const std::vector<std::pair<std::string, int>>& pieces, std::vector<uint32_t>& tokens,
                     std::vector<uint8_t>& mask) {
  for (const auto& [text, trained] : pieces) {
    if (text == "\x01EOT") {
      tokens.push_back(256);
      mask.push_back(uint8_t(trained));
      continue;
    }
    for (unsigned char ch : text) {
      tokens.push_back(ch);
      mask.push_back(uint8_t(trained));
    }
  }
}

TEST(Sft, PromptTokensCarryNoLossResponseTokensDo) {
  const std::string tok = byte_tokenizer_dir(), dir = fresh_dir("sft");
  write_file(dir + "/chat.jsonl",
             "{\"prompt\": \"Hi there\", \"response\": \"Hello!\"}\n"
             "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": "
             "\"2+2?\"}, {\"role\": \"assistant\", \"content\": \"4\"}, {\"role\": \"user\", \"content\": \"and "
             "3+3?\"}, {\"role\": \"assistant\", \"content\": \"6\"}, {\"role\": \"user\", \"content\": \"thanks\"}]}\n"
             "\n"
             "{\"prompt\": \"\", \"response\": \"caf\\u00e9\"}\n");
  const std::string EOT = "\x01EOT";
  std::vector<uint32_t> want_tokens;
  std::vector<uint8_t> want_mask;
  std::vector<int64_t> want_starts{0};
  render_expected({{"<|user|>\nHi there\n<|assistant|>\n", 0}, {"Hello!", 1}, {EOT, 1}}, want_tokens, want_mask);
  want_starts.push_back(int64_t(want_tokens.size()));
  render_expected({{"<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n", 0},
                   {"4", 1},
                   {EOT, 1},
                   {"<|user|>\nand 3+3?\n<|assistant|>\n", 0},
                   {"6", 1},
                   {EOT, 1}},  // the user turn after the last answer is dropped
                  want_tokens, want_mask);
  want_starts.push_back(int64_t(want_tokens.size()));
  render_expected({{"<|user|>\n\n<|assistant|>\n", 0}, {"caf\xc3\xa9", 1}, {EOT, 1}}, want_tokens, want_mask);
  want_starts.push_back(int64_t(want_tokens.size()));

  SftPrepareOptions opt;
  opt.tokenizer = tok;
  opt.inputs = {dir + "/chat.jsonl"};
  opt.out = dir + "/out";
  opt.shard_tokens = 40;  // examples spill across shards
  const SftPrepareStats st = prepare_sft(opt);
  EXPECT_EQ(st.examples, 3);
  EXPECT_EQ(st.train_tokens, int64_t(want_tokens.size()));
  int64_t ones = 0;
  for (uint8_t m : want_mask) ones += m;
  EXPECT_EQ(st.trained_tokens, ones);

  // The files: tokens, masks and document starts over the shards in order.
  std::vector<uint32_t> got_tokens;
  std::vector<uint8_t> got_mask;
  std::vector<int64_t> got_starts;
  for (const auto& path : expand_glob(opt.out + "/train_*.bin")) {
    TokenShard s(path);
    for (int64_t i : read_doc_index(path + ".idx", s.size())) got_starts.push_back(int64_t(got_tokens.size()) + i);
    // The mask's bytes straight from the file: 16-byte header ("KMSK", version 1, count), then one per token.
    const std::string raw = [&] {
      std::ifstream f(path + ".mask", std::ios::binary);
      return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }();
    ASSERT_EQ(raw.substr(0, 4), "KMSK");
    uint32_t version;
    int64_t count;
    std::memcpy(&version, raw.data() + 4, 4);
    std::memcpy(&count, raw.data() + 8, 8);
    EXPECT_EQ(version, 1u);
    ASSERT_EQ(count, s.size());
    ASSERT_EQ(raw.size(), size_t(16 + count));
    for (int64_t i = 0; i < s.size(); i++) {
      got_tokens.push_back(s[i]);
      got_mask.push_back(uint8_t(raw[size_t(16 + i)]));
    }
  }
  EXPECT_EQ(got_tokens, want_tokens);
  EXPECT_EQ(got_mask, want_mask);
  want_starts.pop_back();
  EXPECT_EQ(got_starts, want_starts);

  // Packed and padded batches: a target exists exactly where the predicted token is a response token.
  auto docs = std::make_shared<const DocumentSet>(opt.out + "/train_*.bin", 257);
  ASSERT_TRUE(docs->has_mask());
  ASSERT_EQ(docs->num_documents(), 3);
  PackedSource packed(docs, 2, 128, 128, false, 0);
  Batch b;
  packed.next(b);
  ASSERT_EQ(b.n_tokens, int64_t(want_tokens.size())) << "all three examples fit one batch";
  for (int64_t i = 0; i < b.n_tokens; i++) {
    ASSERT_EQ(b.tokens[size_t(i)], int32_t(want_tokens[size_t(i)]));
    const bool last_of_doc = std::find(want_starts.begin(), want_starts.end(), i + 1) != want_starts.end() ||
                             i + 1 == b.n_tokens;
    const int32_t want = !last_of_doc && want_mask[size_t(i + 1)] ? int32_t(want_tokens[size_t(i + 1)]) : -1;
    ASSERT_EQ(b.targets[size_t(i)], want) << "token " << i;
  }
  EXPECT_EQ(b.count_targets(), ones) << "each response token (and end-of-text) is predicted once";
  PaddedSource padded(docs, 3, 128, 128, false, 0);
  padded.next(b);
  EXPECT_EQ(b.count_targets(), ones);
}

TEST(Sft, BadLinesNameFileAndLine) {
  const std::string tok = byte_tokenizer_dir(), dir = fresh_dir("sft_bad");
  const std::string good = "{\"prompt\": \"a\", \"response\": \"b\"}\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"prompt\": \"a\", ", "malformed JSON"},
      {"{\"prompt\": \"a\"}", "no \"response\" field"},
      {"{\"prompt\": \"a\", \"response\": \"\"}", "empty response"},
      {"{\"prompt\": 3, \"response\": \"b\"}", "\"prompt\" is not a string"},
      {"{\"text\": \"a\"}", "expected \"prompt\" and \"response\", or \"messages\""},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", "no assistant turn"},
      {"{\"messages\": [{\"role\": \"bot\", \"content\": \"hi\"}]}", "role \"bot\""},
      {"{\"messages\": [{\"role\": \"assistant\"}]}", "no \"content\" field"},
      {"{\"messages\": [{\"role\": \"assistant\", \"content\": \"\"}]}", "empty assistant content"},
      {"{\"messages\": {\"role\": \"assistant\"}}", "\"messages\" is not an array"},
      {"[1, 2]", "expected a JSON object"},
  };
  for (size_t k = 0; k < cases.size(); k++) {
    const std::string in = dir + "/bad" + std::to_string(k) + ".jsonl";
    write_file(in, good + cases[k].first + "\n" + good);
    SftPrepareOptions opt;
    opt.tokenizer = tok;
    opt.inputs = {in};
    opt.out = dir + "/out" + std::to_string(k);
    try {
      prepare_sft(opt);
      ADD_FAILURE() << "no error for " << cases[k].first;
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(in + ":2: "), std::string::npos) << m;
      EXPECT_NE(m.find(cases[k].second), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    }
    EXPECT_FALSE(std::filesystem::exists(opt.out + "/train_000000.bin")) << "nothing written on a bad line";
  }
}

TEST(Sft, CorruptMaskFilesAreRejected) {
  const std::string dir = fresh_dir("mask_bad");
  write_loss_mask(dir + "/m", {0, 1, 1});
  EXPECT_EQ(LossMask(dir + "/m", 3)[1], 1);
  EXPECT_THROW(LossMask(dir + "/m", 4), Error);  // count differs from the shard's
  std::string raw = [&] {
    std::ifstream f(dir + "/m", std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }();
  write_file(dir + "/trunc", raw.substr(0, raw.size() - 1));
  EXPECT_THROW(LossMask(dir + "/trunc", 3), Error);
  std::string two = raw;
  two[17] = 2;
  write_file(dir + "/two", two);
  EXPECT_THROW(LossMask(dir + "/two", 3), Error);
  std::string magic = raw;
  magic[0] = 'X';
  write_file(dir + "/magic", magic);
  EXPECT_THROW(LossMask(dir + "/magic", 3), Error);
  EXPECT_THROW(write_loss_mask(dir + "/w", {0, 3}), Error);
}

}  // namespace
}  // namespace kiln
