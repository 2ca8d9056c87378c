#include "train/sft.h"

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/bpe.h"
#include "train/doc_index.h"
#include "train/prepare.h"
#include "train/shards.h"

namespace kiln {

namespace {
constexpr size_t kMaskHeaderBytes = 16;
}

void write_loss_mask(const std::string& path, const std::vector<uint8_t>& mask) {
  for (size_t i = 0; i < mask.size(); i++)
    KILN_CHECK(mask[i] <= 1, path, ": loss mask byte ", int(mask[i]), " at ", i, " is not 0 or 1");
  uint8_t header[kMaskHeaderBytes];
  const uint32_t magic = kLossMaskMagic, version = kLossMaskVersion;
  const int64_t count = int64_t(mask.size());
  std::memcpy(header, &magic, 4);
  std::memcpy(header + 4, &version, 4);
  std::memcpy(header + 8, &count, 8);
  write_file_atomic(path, [&](int fd) {
    write_all(fd, header, kMaskHeaderBytes, path);
    if (!mask.empty()) write_all(fd, mask.data(), mask.size(), path);
  });
}

LossMask::LossMask(const std::string& path, int64_t shard_tokens) : file_(path) {
  KILN_CHECK(file_.size() >= kMaskHeaderBytes, path, ": too short for a loss mask (", file_.size(), " bytes)");
  uint32_t magic, version;
  std::memcpy(&magic, file_.data(), 4);
  std::memcpy(&version, file_.data() + 4, 4);
  std::memcpy(&count_, file_.data() + 8, 8);
  KILN_CHECK(magic == kLossMaskMagic, path, ": not a loss mask (bad magic)");
  KILN_CHECK(version == kLossMaskVersion, path, ": unsupported loss mask version ", version);
  KILN_CHECK(count_ >= 0 && uint64_t(count_) == file_.size() - kMaskHeaderBytes, path, ": header says ", count_,
             " tokens but the file has ", file_.size(), " bytes (truncated or corrupt)");
  KILN_CHECK(count_ == shard_tokens, path, ": masks ", count_, " tokens but its shard has ", shard_tokens);
  body_ = file_.data() + kMaskHeaderBytes;
  for (int64_t i = 0; i < count_; i++)
    KILN_CHECK(body_[i] <= 1, path, ": byte ", int(body_[i]), " at token ", i, " is not 0 or 1 (corrupt)");
}

SftExample render_sft_example(const nlohmann::json& j, const Tokenizer& tok, const std::string& where) {
  KILN_CHECK(tok.eot_id().has_value(), "the tokenizer has no end-of-text token (<|endoftext|>)");
  KILN_CHECK(j.is_object(), where, ": expected a JSON object");
  auto get_string = [&](const nlohmann::json& obj, const char* key, const std::string& what) -> std::string {
    KILN_CHECK(obj.contains(key), where, ": ", what, "no \"", key, "\" field");
    KILN_CHECK(obj[key].is_string(), where, ": ", what, "\"", key, "\" is not a string");
    return obj[key].get<std::string>();
  };
  struct Turn {
    std::string role, content;
  };
  std::vector<Turn> turns;
  if (j.contains("messages")) {
    KILN_CHECK(j["messages"].is_array(), where, ": \"messages\" is not an array");
    for (size_t i = 0; i < j["messages"].size(); i++) {
      const auto& m = j["messages"][i];
      const std::string what = str("message ", i, ": ");
      KILN_CHECK(m.is_object(), where, ": ", what, "not an object");
      Turn t{get_string(m, "role", what), get_string(m, "content", what)};
      KILN_CHECK(t.role == "system" || t.role == "user" || t.role == "assistant", where, ": ", what, "role \"",
                 t.role, "\" is not system, user or assistant");
      KILN_CHECK(t.role != "assistant" || !t.content.empty(), where, ": ", what, "empty assistant content");
      turns.push_back(std::move(t));
    }
  } else {
    KILN_CHECK(j.contains("prompt") || j.contains("response"), where,
               ": expected \"prompt\" and \"response\", or \"messages\"");
    turns.push_back({"user", get_string(j, "prompt", "")});
    turns.push_back({"assistant", get_string(j, "response", "")});
    KILN_CHECK(!turns.back().content.empty(), where, ": empty response");
  }
  size_t last = turns.size();
  for (size_t i = 0; i < turns.size(); i++)
    if (turns[i].role == "assistant") last = i;
  KILN_CHECK(last < turns.size(), where, ": the conversation has no assistant turn");

  // Untrained text accumulates and is tokenized as one string; each assistant content on its own.
  SftExample ex;
  std::string context;
  auto emit = [&](std::string_view text, uint8_t trained) {
    tok.encode_append(text, ex.tokens, /*allow_special=*/false);
    ex.mask.resize(ex.tokens.size(), trained);
  };
  for (size_t i = 0; i <= last; i++) {
    context += "<|" + turns[i].role + "|>\n";
    if (turns[i].role != "assistant") {
      context += turns[i].content + "\n";
      continue;
    }
    emit(context, 0);
    context.clear();
    emit(turns[i].content, 1);
    ex.tokens.push_back(*tok.eot_id());
    ex.mask.push_back(1);
  }
  return ex;
}

namespace {

// Shards of a fixed size with their document index and loss mask; a document may spill into the next.
class MaskedShardWriter {
 public:
  MaskedShardWriter(std::string out, std::string split, int64_t cap, SftPrepareStats& stats)
      : out_(std::move(out)), split_(std::move(split)), cap_(cap), stats_(stats) {}
  void add(const SftExample& ex) {
    for (size_t pos = 0; pos < ex.tokens.size();) {
      if (int64_t(tokens_.size()) == cap_) flush();
      if (pos == 0) starts_.push_back(int64_t(tokens_.size()));
      const size_t take = std::min(ex.tokens.size() - pos, size_t(cap_ - int64_t(tokens_.size())));
      tokens_.insert(tokens_.end(), ex.tokens.begin() + long(pos), ex.tokens.begin() + long(pos + take));
      mask_.insert(mask_.end(), ex.mask.begin() + long(pos), ex.mask.begin() + long(pos + take));
      pos += take;
    }
    total_ += int64_t(ex.tokens.size());
  }
  void finish() {
    if (!tokens_.empty()) flush();
  }
  int64_t tokens() const { return total_; }

 private:
  void flush() {
    char name[64];
    std::snprintf(name, sizeof(name), "%s_%06d.bin", split_.c_str(), index_++);
    const std::string path = (std::filesystem::path(out_) / name).string();
    // Sidecars first: a shard whose .bin exists is complete.
    write_doc_index(path + ".idx", starts_);
    write_loss_mask(path + ".mask", mask_);
    write_shard(path, tokens_);
    stats_.shards.push_back(path);
    tokens_.clear();
    mask_.clear();
    starts_.clear();
  }
  std::string out_, split_;
  int64_t cap_;
  SftPrepareStats& stats_;
  std::vector<uint32_t> tokens_;
  std::vector<uint8_t> mask_;
  std::vector<int64_t> starts_;
  int index_ = 0;
  int64_t total_ = 0;
};

}  // namespace

SftPrepareStats prepare_sft(const SftPrepareOptions& opt) {
  const std::vector<std::string> files =
      check_and_expand_inputs(opt.inputs, opt.out, opt.val_fraction, opt.shard_tokens);
  const Tokenizer tok = Tokenizer::load(opt.tokenizer);
  KILN_CHECK(tok.eot_id().has_value(), opt.tokenizer, ": the tokenizer has no end-of-text token (<|endoftext|>)");

  // Every line is checked before anything is written, so a bad line leaves no partial output.
  std::vector<std::vector<SftExample>> per_file(files.size());
  for (size_t fi = 0; fi < files.size(); fi++) {
    const std::string& path = files[fi];
    MappedFile file(path);
    std::string_view all(reinterpret_cast<const char*>(file.data()), file.size());
    size_t pos = 0;
    for (int64_t line_no = 1; pos < all.size(); line_no++) {
      size_t nl = all.find('\n', pos);
      if (nl == std::string_view::npos) nl = all.size();
      const std::string_view line = all.substr(pos, nl - pos);
      pos = nl + 1;
      if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      const std::string where = str(path, ":", line_no);
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail(where, ": malformed JSON (", e.what(), ")");
      }
      try {
        per_file[fi].push_back(render_sft_example(j, tok, where));
      } catch (const nlohmann::json::exception& e) {
        fail(where, ": ", e.what());
      }
    }
    KILN_CHECK(!per_file[fi].empty(), "no examples found in ", path);
  }

  make_dirs(opt.out);
  for (const auto& e : std::filesystem::directory_iterator(opt.out)) {
    const std::string name = e.path().filename().string();
    KILN_CHECK(!((name.rfind("train_", 0) == 0 || name.rfind("val_", 0) == 0) && e.path().extension() == ".bin"),
               opt.out, ": already holds shards (", name, "); choose an empty output directory");
  }
  SftPrepareStats stats;
  MaskedShardWriter train(opt.out, "train", opt.shard_tokens, stats), val(opt.out, "val", opt.shard_tokens, stats);
  for (const auto& examples : per_file) {
    for (const SftExample& ex : examples) {
      const bool is_val = is_val_document(opt.seed, uint64_t(stats.examples), opt.val_fraction);
      (is_val ? val : train).add(ex);
      (is_val ? stats.val_examples : stats.train_examples)++;
      stats.examples++;
      for (uint8_t m : ex.mask) stats.trained_tokens += m;
    }
  }
  train.finish();
  val.finish();
  stats.train_tokens = train.tokens();
  stats.val_tokens = val.tokens();
  return stats;
}

}  // namespace kiln
