#include "train/prepare.h"

#include <omp.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenize.h"
#include "train/doc_index.h"
#include "train/shards.h"

namespace kiln {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Fills shards of a fixed size and writes each one (with its document index) when full.
class ShardWriter {
 public:
  ShardWriter(std::string out, std::string split, int64_t shard_tokens, PrepareStats& stats)
      : out_(std::move(out)), split_(std::move(split)), cap_(shard_tokens), stats_(stats) {}

  // A document starts here; its tokens then come in one or more append() calls.
  void begin_document() {
    if (int64_t(buf_.size()) == cap_) flush();
    starts_.push_back(int64_t(buf_.size()));
  }
  void append(const uint32_t* tokens, size_t n) {
    size_t pos = 0;
    while (pos < n) {
      if (int64_t(buf_.size()) == cap_) flush();
      size_t take = std::min(n - pos, size_t(cap_ - int64_t(buf_.size())));
      buf_.insert(buf_.end(), tokens + pos, tokens + pos + take);
      pos += take;
    }
    tokens_ += int64_t(n);
  }
  void finish() {
    if (!buf_.empty()) flush();
  }
  int shards() const { return index_; }
  int64_t tokens() const { return tokens_; }

 private:
  void flush() {
    char name[64];
    std::snprintf(name, sizeof(name), "%s_%06d.bin", split_.c_str(), index_++);
    std::string path = (std::filesystem::path(out_) / name).string();
    write_shard(path, buf_);
    write_doc_index(path + ".idx", starts_);
    stats_.shards.push_back(path);
    buf_.clear();
    starts_.clear();
  }
  std::string out_, split_;
  int64_t cap_;
  PrepareStats& stats_;
  std::vector<uint32_t> buf_;
  std::vector<int64_t> starts_;
  int index_ = 0;
  int64_t tokens_ = 0;
};

struct Doc {
  std::string_view mapped;  // into a mapped file, or empty and the text is `owned`
  std::string owned;
  // Not stored: a moved std::string may move its (short) buffer.
  std::string_view text() const { return mapped.empty() ? std::string_view(owned) : mapped; }
};

bool is_jsonl(const std::string& path) {
  auto ext = std::filesystem::path(path).extension().string();
  return ext == ".jsonl" || ext == ".JSONL";
}

}  // namespace

bool is_val_document(uint64_t seed, uint64_t index, double val_fraction) {
  if (val_fraction <= 0) return false;
  double u = double(splitmix64(splitmix64(seed) ^ index) >> 11) * (1.0 / 9007199254740992.0);
  return u < val_fraction;
}

std::vector<std::string> check_and_expand_inputs(const std::vector<std::string>& patterns, const std::string& out,
                                                 double val_fraction, int64_t shard_tokens) {
  KILN_CHECK(val_fraction >= 0 && val_fraction <= 1, "--val-fraction must be in [0, 1], got ", val_fraction);
  KILN_CHECK(shard_tokens > 0 && shard_tokens <= INT32_MAX, "--shard-tokens must be in [1, 2^31), got ",
             shard_tokens);
  KILN_CHECK(!patterns.empty(), "no input files given");
  KILN_CHECK(!out.empty(), "no output directory given");
  std::vector<std::string> files;
  for (const auto& pattern : patterns)
    for (auto& f : expand_glob(pattern)) files.push_back(f);
  for (const auto& f : files)
    KILN_CHECK(file_exists(f) && !std::filesystem::is_directory(f), f, ": no such input file");
  KILN_CHECK(!files.empty(), "no input files match");
  return files;
}

PrepareStats prepare_data(const PrepareOptions& opt) {
  const std::vector<std::string> files =
      check_and_expand_inputs(opt.inputs, opt.out, opt.val_fraction, opt.shard_tokens);
  uint64_t total_bytes = 0;
  for (const auto& f : files) total_bytes += std::filesystem::file_size(f);
  const Tokenizer tok = Tokenizer::load(opt.tokenizer);
  KILN_CHECK(tok.eot_id().has_value(), opt.tokenizer, ": the tokenizer has no end-of-text token (<|endoftext|>)");
  const uint32_t eot = *tok.eot_id();

  make_dirs(opt.out);
  for (const auto& e : std::filesystem::directory_iterator(opt.out)) {
    std::string name = e.path().filename().string();
    KILN_CHECK(!((name.rfind("train_", 0) == 0 || name.rfind("val_", 0) == 0) && e.path().extension() == ".bin"),
               opt.out, ": already holds shards (", name, "); choose an empty output directory");
  }

  PrepareStats stats;
  ShardWriter train(opt.out, "train", opt.shard_tokens, stats), val(opt.out, "val", opt.shard_tokens, stats);
  uint64_t bytes_done = 0;

  // Documents are encoded in batches, in parallel, and appended in input order.
  std::vector<Doc> batch;
  size_t batch_bytes = 0;
  auto run_batch = [&] {
    std::vector<std::vector<uint32_t>> ids(batch.size());
    if (batch.size() == 1) {
      ids[0] = tok.encode(batch[0].text(), /*allow_special=*/false);  // threads inside one large document
    } else {
#pragma omp parallel for schedule(dynamic, 1)
      for (size_t i = 0; i < batch.size(); i++) {
        std::vector<uint32_t> local;  // not ids[i] directly: neighbouring headers would be falsely shared
        local.reserve(batch[i].text().size() / 3 + 1);
        tok.encode_append(batch[i].text(), local, /*allow_special=*/false);
        ids[i] = std::move(local);
      }
    }
    for (size_t i = 0; i < batch.size(); i++) {
      ids[i].push_back(eot);
      bool is_val = is_val_document(opt.seed, uint64_t(stats.documents), opt.val_fraction);
      ShardWriter& w = is_val ? val : train;
      w.begin_document();
      w.append(ids[i].data(), ids[i].size());
      (is_val ? stats.val_documents : stats.train_documents)++;
      stats.documents++;
    }
    batch.clear();
    batch_bytes = 0;
  };
  auto add = [&](Doc d) {
    batch_bytes += d.text().size();
    batch.push_back(std::move(d));
    if (batch_bytes >= (size_t(8) << 20) || batch.size() >= 4096) run_batch();
  };

  for (const auto& path : files) {
    MappedFile file(path);
    std::string_view all(reinterpret_cast<const char*>(file.data()), file.size());
    int64_t docs_here = 0;
    const size_t kStreamBytes = size_t(std::max<int64_t>(1, opt.stream_bytes));
    if (!is_jsonl(path) && !opt.doc_separator.empty()) {
      // Documents separated by lines equal to the separator; each one a view into the mapping.
      size_t start = 0, pos = 0;
      auto emit = [&](size_t end) {
        std::string_view d = all.substr(start, end - start);
        if (d.find_first_not_of(" \t\r\n") != std::string_view::npos) {
          add(Doc{d, {}});
          docs_here++;
        }
      };
      while (pos < all.size()) {
        size_t nl = all.find('\n', pos);
        size_t end = nl == std::string_view::npos ? all.size() : nl;
        std::string_view line = all.substr(pos, end - pos);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        const size_t next = nl == std::string_view::npos ? all.size() : nl + 1;
        if (line == opt.doc_separator) {
          emit(pos);
          start = next;
        }
        pos = next;
      }
      emit(all.size());
    } else if (!is_jsonl(path) && all.size() > kStreamBytes) {
      // A large document is encoded (with threads) and written piece by piece, cut at safe split points
      // of the pre-tokenizer, so memory stays bounded and the tokens equal those of the whole.
      run_batch();
      bool is_val = is_val_document(opt.seed, uint64_t(stats.documents), opt.val_fraction);
      ShardWriter& w = is_val ? val : train;
      w.begin_document();
      for (size_t pos = 0; pos < all.size();) {
        size_t cut =
            all.size() - pos > 2 * kStreamBytes ? pretok::next_safe_split(all, pos + kStreamBytes) : all.size();
        std::vector<uint32_t> ids = tok.encode(all.substr(pos, cut - pos), /*allow_special=*/false);
        w.append(ids.data(), ids.size());
        pos = cut;
        if (opt.progress) opt.progress(bytes_done + pos, total_bytes);
      }
      w.append(&eot, 1);
      (is_val ? stats.val_documents : stats.train_documents)++;
      stats.documents++;
      docs_here++;
    } else if (!is_jsonl(path)) {
      if (!all.empty()) {
        if (batch_bytes + all.size() >= (size_t(8) << 20)) run_batch();  // a large file alone: threads inside
        add(Doc{all, {}});
        docs_here++;
      }
    } else {
      size_t pos = 0;
      for (int64_t line_no = 1; pos < all.size(); line_no++) {
        size_t nl = all.find('\n', pos);
        if (nl == std::string_view::npos) nl = all.size();
        std::string_view line = all.substr(pos, nl - pos);
        pos = nl + 1;
        if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          fail(path, ":", line_no, ": malformed JSON (", e.what(), ")");
        }
        KILN_CHECK(j.is_object() && j.contains("text"), path, ":", line_no, ": no \"text\" field");
        KILN_CHECK(j["text"].is_string(), path, ":", line_no, ": \"text\" is not a string");
        Doc d;
        d.owned = j["text"].get<std::string>();
        if (d.owned.empty()) continue;
        add(std::move(d));
        docs_here++;
        if (opt.progress && docs_here % 4096 == 0) opt.progress(bytes_done + pos, total_bytes);
      }
    }
    KILN_CHECK(docs_here > 0, "no text found in ", path);
    run_batch();  // the batch may point into this file's mapping
    bytes_done += file.size();
    if (opt.progress) opt.progress(bytes_done, total_bytes);
  }
  train.finish();
  val.finish();
  stats.train_tokens = train.tokens();
  stats.val_tokens = val.tokens();
  stats.train_shards = train.shards();
  stats.val_shards = val.shards();
  return stats;
}

}  // namespace kiln
