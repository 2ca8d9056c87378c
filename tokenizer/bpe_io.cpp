// Tokenizer files: GPT-2's encoder.json + vocab.bpe, and Hugging Face's tokenizer.json (byte-level BPE).
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "tokenizer/bpe.h"

namespace kiln {

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;
namespace fs = std::filesystem;

json parse_json_file(const std::string& path) {
  KILN_CHECK(file_exists(path), path, ": no such file");
  std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    fail(path, ": malformed JSON (", e.what(), ")");
  }
}

// Spelled vocabulary (file strings -> id) into raw tokens; tokens outside the byte alphabet stay verbatim.
struct Vocab {
  std::vector<std::string> tokens;
  std::vector<bool> raw;
  std::vector<bool> seen;
  void put(uint32_t id, const std::string& spelled) {
    if (id >= tokens.size()) {
      tokens.resize(id + 1);
      raw.resize(id + 1, false);
      seen.resize(id + 1, false);
    }
    auto bytes = bytelevel::from_unicode(spelled);
    tokens[id] = bytes ? *bytes : spelled;
    raw[id] = !bytes;
    seen[id] = true;
  }
  void check_complete(const std::string& source) const {
    for (size_t i = 0; i < seen.size(); i++) KILN_CHECK(seen[i], source, ": no token has id ", i);
  }
};

uint32_t json_id(const json& v, const std::string& source, const std::string& what) {
  KILN_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0), source, ": ", what,
             " must be a non-negative integer id");
  uint64_t id = v.get<uint64_t>();
  KILN_CHECK(id < (uint64_t(1) << 31), source, ": ", what, " has id ", id, ", too large");
  return uint32_t(id);
}

// "a b" -> (a, b): the two spelled halves, split at the single space (byte-level tokens contain none).
std::pair<std::string, std::string> split_merge(const std::string& line, const std::string& where) {
  size_t sp = line.find(' ');
  KILN_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < line.size() && line.find(' ', sp + 1) == std::string::npos,
             where, ": a merge must be two tokens separated by one space, got '", line, "'");
  return {line.substr(0, sp), line.substr(sp + 1)};
}

std::string spelled(const std::vector<std::string>& tokens, const std::vector<bool>& raw, uint32_t id) {
  return raw[id] ? tokens[id] : bytelevel::to_unicode(tokens[id]);
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    fs::path d(path);
    if (fs::exists(d / "encoder.json") && fs::exists(d / "vocab.bpe"))
      return load_gpt2((d / "encoder.json").string(), (d / "vocab.bpe").string());
    if (fs::exists(d / "tokenizer.json")) return load_hf_json((d / "tokenizer.json").string());
    fail(path, ": no tokenizer here (expected encoder.json + vocab.bpe, or tokenizer.json)");
  }
  KILN_CHECK(fs::exists(path, ec), path, ": no such tokenizer file or directory");
  return load_hf_json(path);
}

static Tokenizer gpt2_impl(const std::string& encoder_json, const std::string& vocab_bpe) {
  json enc = parse_json_file(encoder_json);
  KILN_CHECK(enc.is_object() && !enc.empty(), encoder_json, ": expected a JSON object of token -> id");
  Vocab v;
  std::unordered_map<std::string, uint32_t> by_spelling;
  for (auto it = enc.begin(); it != enc.end(); ++it) {
    uint32_t id = json_id(it.value(), encoder_json, "token '" + it.key() + "'");
    KILN_CHECK(id >= v.seen.size() || !v.seen[id], encoder_json, ": id ", id, " is used twice");
    v.put(id, it.key());
    by_spelling.emplace(it.key(), id);
  }
  v.check_complete(encoder_json);

  KILN_CHECK(file_exists(vocab_bpe), vocab_bpe, ": no such file");
  std::string text = read_file(vocab_bpe);
  std::vector<std::pair<uint32_t, uint32_t>> merges;
  size_t pos = 0;
  for (size_t line_no = 1; pos < text.size(); line_no++) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    std::string where = str(vocab_bpe, ":", line_no);
    auto [a, b] = split_merge(line, where);
    auto ia = by_spelling.find(a), ib = by_spelling.find(b);
    KILN_CHECK(ia != by_spelling.end(), where, ": token '", a, "' is not in ", encoder_json);
    KILN_CHECK(ib != by_spelling.end(), where, ": token '", b, "' is not in ", encoder_json);
    merges.emplace_back(ia->second, ib->second);
  }
  std::vector<SpecialToken> specials;
  if (auto it = by_spelling.find("<|endoftext|>"); it != by_spelling.end()) specials.push_back({it->first, it->second});
  return Tokenizer::from_parts(std::move(v.tokens), merges, std::move(specials), std::move(v.raw), vocab_bpe);
}

static Tokenizer hf_json_impl(const std::string& path) {
  json j = parse_json_file(path);
  KILN_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), path,
             ": not a tokenizer.json (no \"model\" object)");
  const json& m = j["model"];
  std::string type = m.value("type", "BPE");
  KILN_CHECK(type == "BPE", path, ": model.type is ", type, "; kiln reads byte-level BPE models only");
  KILN_CHECK(!j.contains("normalizer") || j["normalizer"].is_null(), path, ": normalizer ", j["normalizer"].dump(),
             " is not supported (byte-level BPE has none)");
  // The pre-tokenizer must be GPT-2's ByteLevel (alone or as the only step of a Sequence).
  const json* pre = j.contains("pre_tokenizer") ? &j["pre_tokenizer"] : nullptr;
  if (pre && pre->is_object() && pre->value("type", "") == "Sequence" && pre->contains("pretokenizers") &&
      (*pre)["pretokenizers"].is_array() && (*pre)["pretokenizers"].size() == 1)
    pre = &(*pre)["pretokenizers"][0];
  KILN_CHECK(pre && pre->is_object() && pre->value("type", "") == "ByteLevel", path, ": pre_tokenizer ",
             pre ? pre->dump() : std::string("null"), " is not supported (kiln implements GPT-2's ByteLevel)");
  KILN_CHECK(!pre->value("add_prefix_space", false), path, ": pre_tokenizer.add_prefix_space=true is not supported");
  KILN_CHECK(pre->value("use_regex", true), path, ": pre_tokenizer.use_regex=false is not supported");
  auto empty_or_null = [&](const char* key) {
    return !m.contains(key) || m[key].is_null() || (m[key].is_string() && m[key].get<std::string>().empty());
  };
  KILN_CHECK(empty_or_null("continuing_subword_prefix") && empty_or_null("end_of_word_suffix"), path,
             ": model.continuing_subword_prefix / end_of_word_suffix are not supported");
  KILN_CHECK(!m.contains("dropout") || m["dropout"].is_null() || m["dropout"] == 0, path,
             ": model.dropout is not supported");
  KILN_CHECK(!m.value("byte_fallback", false), path, ": model.byte_fallback is not supported");
  KILN_CHECK(m.contains("vocab") && m["vocab"].is_object(), path, ": model.vocab must be an object of token -> id");
  KILN_CHECK(m.contains("merges") && m["merges"].is_array(), path, ": model.merges must be an array");

  Vocab v;
  std::unordered_map<std::string, uint32_t> by_spelling;
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    uint32_t id = json_id(it.value(), path, "model.vocab['" + it.key() + "']");
    KILN_CHECK(id >= v.seen.size() || !v.seen[id], path, ": model.vocab uses id ", id, " twice");
    v.put(id, it.key());
    by_spelling.emplace(it.key(), id);
  }
  std::vector<SpecialToken> specials;
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    KILN_CHECK(j["added_tokens"].is_array(), path, ": added_tokens must be an array");
    for (size_t i = 0; i < j["added_tokens"].size(); i++) {
      const json& a = j["added_tokens"][i];
      std::string where = str("added_tokens[", i, "]");
      KILN_CHECK(a.is_object() && a.contains("id") && a.contains("content") && a["content"].is_string(), path, ": ",
                 where, " needs \"id\" and \"content\"");
      uint32_t id = json_id(a["id"], path, where);
      std::string content = a["content"].get<std::string>();
      if (id >= v.seen.size() || !v.seen[id]) v.put(id, content);
      specials.push_back({content, id});
    }
  }
  v.check_complete(path);

  std::vector<std::pair<uint32_t, uint32_t>> merges;
  merges.reserve(m["merges"].size());
  for (size_t i = 0; i < m["merges"].size(); i++) {
    const json& e = m["merges"][i];
    std::string where = str(path, ": model.merges[", i, "]");
    std::pair<std::string, std::string> ab;
    if (e.is_string()) {
      ab = split_merge(e.get<std::string>(), where);
    } else {
      KILN_CHECK(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string(), where,
                 ": a merge must be \"a b\" or [\"a\", \"b\"]");
      ab = {e[0].get<std::string>(), e[1].get<std::string>()};
    }
    auto ia = by_spelling.find(ab.first), ib = by_spelling.find(ab.second);
    KILN_CHECK(ia != by_spelling.end(), where, ": token '", ab.first, "' is not in model.vocab");
    KILN_CHECK(ib != by_spelling.end(), where, ": token '", ab.second, "' is not in model.vocab");
    merges.emplace_back(ia->second, ib->second);
  }
  return Tokenizer::from_parts(std::move(v.tokens), merges, std::move(specials), std::move(v.raw), path,
                               m.value("ignore_merges", false));
}

// A field of the wrong JSON type surfaces as nlohmann's type_error: report it as kiln::Error naming the file.
Tokenizer Tokenizer::load_gpt2(const std::string& encoder_json, const std::string& vocab_bpe) {
  try {
    return gpt2_impl(encoder_json, vocab_bpe);
  } catch (const json::exception& e) {
    fail(encoder_json, ": ", e.what());
  }
}

Tokenizer Tokenizer::load_hf_json(const std::string& path) {
  try {
    return hf_json_impl(path);
  } catch (const json::exception& e) {
    fail(path, ": ", e.what());
  }
}

// ---- saving ----------------------------------------------------------------------------------------

namespace {
// JSON string literal (nlohmann escapes; it rejects invalid UTF-8, which no spelled token has).
std::string quote(const std::string& s) {
  try {
    return json(s).dump();
  } catch (const json::exception&) {
    fail("cannot save the tokenizer: token '", s, "' is not valid UTF-8");
  }
}

// {"spelling": id, ...} in id order, written by hand: ordered_json's linear lookups are quadratic.
std::string spelled_vocab(const std::vector<std::string>& tokens, const std::vector<bool>& raw, const char* indent) {
  std::unordered_map<std::string, uint32_t> seen;
  std::string out = "{";
  for (uint32_t id = 0; id < tokens.size(); id++) {
    std::string s = spelled(tokens, raw, id);
    KILN_CHECK(seen.emplace(s, id).second, "cannot save the tokenizer: tokens ", seen[s], " and ", id,
               " are both spelled '", s, "'");
    out += id ? ",\n" : "\n";
    out += indent;
    out += quote(s) + ": " + std::to_string(id);
  }
  return out + "}";
}
}  // namespace

std::string Tokenizer::to_encoder_json() const { return spelled_vocab(tokens_, raw_, "") + "\n"; }

std::string Tokenizer::to_vocab_bpe() const {
  std::string s = "#version: 0.2\n";
  for (auto [a, b] : merges_) s += spelled(tokens_, raw_, a) + " " + spelled(tokens_, raw_, b) + "\n";
  return s;
}

std::string Tokenizer::to_hf_json() const {
  // The layout of GPT-2's tokenizer.json on the Hugging Face hub. The small fields go through
  // ordered_json; vocab and merges are appended by hand.
  ojson j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  std::vector<SpecialToken> sp = specials_;
  std::sort(sp.begin(), sp.end(), [](const SpecialToken& a, const SpecialToken& b) { return a.id < b.id; });
  ojson added = ojson::array();
  for (const SpecialToken& s : sp)
    added.push_back(ojson{{"id", s.id},
                          {"content", s.content},
                          {"single_word", false},
                          {"lstrip", false},
                          {"rstrip", false},
                          {"normalized", false},
                          {"special", true}});
  j["added_tokens"] = added;
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] =
      ojson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  j["post_processor"] =
      ojson{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  j["decoder"] = ojson{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  ojson model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = "";
  model["end_of_word_suffix"] = "";
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  model["ignore_merges"] = ignore_merges_;
  j["model"] = model;
  std::string out = j.dump(2);
  // out ends with "...\n  }\n}": reopen the model object.
  size_t close = out.rfind('}', out.rfind('}') - 1);
  std::string head = out.substr(0, close);
  while (!head.empty() && (head.back() == ' ' || head.back() == '\n')) head.pop_back();
  head += ",\n    \"vocab\": " + spelled_vocab(tokens_, raw_, "      ") + ",\n    \"merges\": [";
  for (size_t r = 0; r < merges_.size(); r++) {
    auto [a, b] = merges_[r];
    head += r ? ",\n      " : "\n      ";
    head += quote(spelled(tokens_, raw_, a) + " " + spelled(tokens_, raw_, b));
  }
  return head + "\n    ]\n  }\n}\n";
}

void Tokenizer::save(const std::string& dir) const {
  make_dirs(dir);
  fs::path d(dir);
  write_file_atomic((d / "encoder.json").string(), to_encoder_json());
  write_file_atomic((d / "vocab.bpe").string(), to_vocab_bpe());
  write_file_atomic((d / "tokenizer.json").string(), to_hf_json());
}

}  // namespace kiln
