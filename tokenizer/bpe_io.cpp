// Tokenizer files: GPT-2's encoder.json + vocab.bpe, and Hugging Face's tokenizer.json (byte-level BPE).
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/quote.h"
#include "tokenizer/bpe.h"

namespace kiln {

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;
namespace fs = std::filesystem;

json parse_json_text(const std::string& text, const std::string& path) {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    fail(path, ": malformed JSON (", e.what(), ")");
  }
}

json parse_json_file(const std::string& path) {
  KILN_CHECK(file_exists(path), path, ": no such file");
  return parse_json_text(read_file(path), path);
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
             where, ": a merge must be two tokens separated by one space, got ", quote_name(line));
  return {line.substr(0, sp), line.substr(sp + 1)};
}

std::string spelled(const std::vector<std::string>& tokens, const std::vector<bool>& raw, uint32_t id) {
  return raw[id] ? tokens[id] : bytelevel::to_unicode(tokens[id]);
}

}  // namespace

// tokenizer_config.json (and chat_template.jinja, where newer transformers keep the template) beside a
// tokenizer.json.
static void attach_config(Tokenizer& t, const fs::path& dir) {
  const fs::path cfg = dir / "tokenizer_config.json";
  std::error_code ec;
  if (!fs::exists(cfg, ec)) return;
  TokenizerConfig c = TokenizerConfig::load(cfg.string());
  const fs::path jinja = dir / "chat_template.jinja";
  if (c.chat_templates.empty() && fs::exists(jinja, ec)) {
    c.chat_template = read_file(jinja.string());
    c.chat_templates["default"] = c.chat_template;
  }
  t.set_config(std::move(c), cfg.string());
}

bool Tokenizer::in_dir(const std::string& dir) {
  std::error_code ec;
  const fs::path d(dir);
  return fs::is_directory(d, ec) &&
         (fs::exists(d / "tokenizer.json", ec) || (fs::exists(d / "encoder.json", ec) && fs::exists(d / "vocab.bpe", ec)));
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    fs::path d(path);
    // tokenizer.json first: it says which pre-tokenizer; encoder.json + vocab.bpe are GPT-2's.
    if (fs::exists(d / "tokenizer.json")) {
      Tokenizer t = load_hf_json((d / "tokenizer.json").string());
      attach_config(t, d);
      return t;
    }
    if (fs::exists(d / "encoder.json") && fs::exists(d / "vocab.bpe"))
      return load_gpt2((d / "encoder.json").string(), (d / "vocab.bpe").string());
    fail(path, ": no tokenizer here (expected encoder.json + vocab.bpe, or tokenizer.json)");
  }
  KILN_CHECK(fs::exists(path, ec), path, ": no such tokenizer file or directory");
  Tokenizer t = load_hf_json(path);
  attach_config(t, fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path());
  return t;
}

static Tokenizer gpt2_impl(const std::string& encoder_json, const std::string& vocab_bpe) {
  json enc = parse_json_file(encoder_json);
  KILN_CHECK(enc.is_object() && !enc.empty(), encoder_json, ": expected a JSON object of token -> id");
  Vocab v;
  std::unordered_map<std::string, uint32_t> by_spelling;
  for (auto it = enc.begin(); it != enc.end(); ++it) {
    uint32_t id = json_id(it.value(), encoder_json, "token " + quote_name(it.key()));
    // Ids run 0..n-1 without gaps; refusing a larger one here keeps a tiny file from sizing the table to 2^31.
    KILN_CHECK(id < enc.size(), encoder_json, ": token ", quote_name(it.key()), " has id ", id, ", but the file lists ",
               enc.size(), " tokens (ids run from 0 without gaps)");
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
    KILN_CHECK(ia != by_spelling.end(), where, ": token ", quote_name(a), " is not in ", encoder_json);
    KILN_CHECK(ib != by_spelling.end(), where, ": token ", quote_name(b), " is not in ", encoder_json);
    merges.emplace_back(ia->second, ib->second);
  }
  std::vector<SpecialToken> specials;
  if (auto it = by_spelling.find("<|endoftext|>"); it != by_spelling.end()) specials.push_back({it->first, it->second});
  return Tokenizer::from_parts(std::move(v.tokens), merges, std::move(specials), std::move(v.raw), vocab_bpe);
}

namespace {

// Hugging Face's regexes for Llama 3 and Qwen2 (Split pre-tokenizers), exactly as their files spell them.
const char* const kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// GPT-2's ByteLevel (regex on), or Split(Llama 3 / Qwen2 regex, Isolated) then ByteLevel (regex off).
PreTokenizer parse_pre_tokenizer(const json& pre, const std::string& path) {
  auto unsupported = [&](const std::string& field, const json& v, const char* why) {
    fail(path, ": ", field, " ", v.dump(), " is not supported (", why, ")");
  };
  const char* kinds = "kiln implements ByteLevel, and Split with Llama 3's or Qwen2's regex then ByteLevel";
  if (!pre.is_object()) unsupported("pre_tokenizer", pre, kinds);
  auto byte_level = [&](const json& b, const std::string& field, bool use_regex) {
    if (!b.is_object() || b.value("type", "") != "ByteLevel") unsupported(field, b, kinds);
    KILN_CHECK(!b.value("add_prefix_space", false), path, ": ", field, ".add_prefix_space=true is not supported");
    KILN_CHECK(b.value("use_regex", true) == use_regex, path, ": ", field, ".use_regex=", !use_regex,
               " is not supported", use_regex ? "" : " after a Split");
  };
  const std::string type = pre.value("type", "");
  if (type == "ByteLevel") {
    byte_level(pre, "pre_tokenizer", true);
    return PreTokenizer::kGpt2;
  }
  if (type != "Sequence") unsupported("pre_tokenizer", pre, kinds);
  KILN_CHECK(pre.contains("pretokenizers") && pre["pretokenizers"].is_array(), path,
             ": pre_tokenizer.pretokenizers must be an array");
  const json& seq = pre["pretokenizers"];
  if (seq.size() == 1) {
    byte_level(seq[0], "pre_tokenizer.pretokenizers[0]", true);
    return PreTokenizer::kGpt2;
  }
  if (seq.size() != 2) unsupported("pre_tokenizer", pre, kinds);
  const json& split = seq[0];
  const std::string f = "pre_tokenizer.pretokenizers[0]";
  if (!split.is_object() || split.value("type", "") != "Split") unsupported(f, split, kinds);
  KILN_CHECK(split.contains("pattern") && split["pattern"].is_object() && split["pattern"].contains("Regex") &&
                 split["pattern"]["Regex"].is_string(),
             path, ": ", f, ".pattern must be {\"Regex\": string}");
  const std::string p = split["pattern"]["Regex"].get<std::string>();
  PreTokenizer kind;
  if (p == kLlama3Pattern)
    kind = PreTokenizer::kLlama3;
  else if (p == kQwen2Pattern)
    kind = PreTokenizer::kQwen2;
  else
    unsupported(f + ".pattern.Regex", split["pattern"]["Regex"], "kiln implements Llama 3's and Qwen2's patterns");
  KILN_CHECK(split.value("behavior", "") == "Isolated", path, ": ", f, ".behavior ", quote_name(split.value("behavior", "null")),
             " is not supported (Isolated is)");
  KILN_CHECK(!split.value("invert", false), path, ": ", f, ".invert=true is not supported");
  byte_level(seq[1], "pre_tokenizer.pretokenizers[1]", false);
  return kind;
}

}  // namespace

// Friend of Tokenizer: fills in what tokenizer.json's post_processor adds.
struct HfJsonLoader {
  static void set_nfc(Tokenizer& t, bool nfc) { t.nfc_ = nfc; }
  static void post_processor(const json& pp, const std::string& path, const std::string& field, Tokenizer& t) {
    KILN_CHECK(pp.is_object() && pp.contains("type") && pp["type"].is_string(), path, ": ", field,
               " must be an object with a \"type\"");
    const std::string type = pp["type"].get<std::string>();
    if (type == "ByteLevel") return;  // offsets only
    if (type == "Sequence") {
      KILN_CHECK(pp.contains("processors") && pp["processors"].is_array(), path, ": ", field,
                 ".processors must be an array");
      for (size_t i = 0; i < pp["processors"].size(); i++)
        post_processor(pp["processors"][i], path, str(field, ".processors[", i, "]"), t);
      return;
    }
    KILN_CHECK(type == "TemplateProcessing", path, ": ", field, ".type ", quote_name(type),
               " is not supported (ByteLevel and TemplateProcessing are)");
    KILN_CHECK(pp.contains("single") && pp["single"].is_array(), path, ": ", field, ".single must be an array");
    const json specials = pp.value("special_tokens", json::object());
    KILN_CHECK(specials.is_object(), path, ": ", field, ".special_tokens must be an object");
    bool seen_a = false;
    std::vector<uint32_t> prefix, suffix;
    for (size_t i = 0; i < pp["single"].size(); i++) {
      const json& item = pp["single"][i];
      const std::string where = str(field, ".single[", i, "]");
      if (item.is_object() && item.contains("Sequence")) {
        KILN_CHECK(!seen_a && item["Sequence"].value("id", "") == "A", path, ": ", where,
                   " must be the one {\"Sequence\": {\"id\": \"A\"}}");
        seen_a = true;
        continue;
      }
      KILN_CHECK(item.is_object() && item.contains("SpecialToken") && item["SpecialToken"].contains("id") &&
                     item["SpecialToken"]["id"].is_string(),
                 path, ": ", where, " must be a Sequence or a SpecialToken with an \"id\"");
      const std::string name = item["SpecialToken"]["id"].get<std::string>();
      KILN_CHECK(specials.contains(name) && specials[name].contains("ids") && specials[name]["ids"].is_array(), path,
                 ": ", where, " names ", quote_name(name), ", which ", field, ".special_tokens does not give ids for");
      for (const json& id : specials[name]["ids"]) {
        uint32_t v = json_id(id, path, str(field, ".special_tokens[", quote_name(name), "].ids"));
        KILN_CHECK(v < uint32_t(t.vocab_size()), path, ": ", field, ".special_tokens[", quote_name(name), "] has id ", v,
                   " outside the vocabulary");
        (seen_a ? suffix : prefix).push_back(v);
      }
    }
    KILN_CHECK(seen_a, path, ": ", field, ".single has no {\"Sequence\": {\"id\": \"A\"}}");
    t.post_prefix_.insert(t.post_prefix_.end(), prefix.begin(), prefix.end());
    t.post_suffix_.insert(t.post_suffix_.end(), suffix.begin(), suffix.end());
  }
  static void attach(const json& pp, const std::string& path, Tokenizer& t) {
    post_processor(pp, path, "post_processor", t);
    // Written back as loaded, except a lone ByteLevel, which saving writes anyway.
    if (pp.value("type", "") != "ByteLevel") t.post_processor_json_ = pp.dump();
    t.prefix_ = t.post_prefix_;
    t.suffix_ = t.post_suffix_;
    if (!t.post_prefix_.empty()) t.bos_ = t.post_prefix_[0];
  }
};

namespace {
// The normalizers kiln applies: none, or NFC (alone or as the one member of a Sequence, as Qwen2 writes it).
bool parse_normalizer(const json& n, const std::string& path) {
  if (n.is_null()) return false;
  const json* one = &n;
  if (n.is_object() && n.value("type", "") == "Sequence" && n.contains("normalizers") && n["normalizers"].is_array()) {
    if (n["normalizers"].empty()) return false;
    if (n["normalizers"].size() == 1) one = &n["normalizers"][0];
  }
  KILN_CHECK(one->is_object() && one->value("type", "") == "NFC", path, ": normalizer ", n.dump(),
             " is not supported (kiln applies none or NFC)");
  return true;
}

Tokenizer hf_json_impl(const std::string& text, const std::string& path) {
  json j = parse_json_text(text, path);
  KILN_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), path,
             ": not a tokenizer.json (no \"model\" object)");
  const json& m = j["model"];
  std::string type = m.value("type", "BPE");
  KILN_CHECK(type == "BPE", path, ": model.type is ", quote_name(type), "; kiln reads byte-level BPE models only");
  const bool nfc = parse_normalizer(j.contains("normalizer") ? j["normalizer"] : json(), path);
  const PreTokenizer pre = parse_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : json(), path);
  KILN_CHECK(!j.contains("decoder") || j["decoder"].is_null() || j["decoder"].value("type", "") == "ByteLevel", path,
             ": decoder ", j["decoder"].dump(), " is not supported (kiln decodes ByteLevel)");
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

  KILN_CHECK(!j.contains("added_tokens") || j["added_tokens"].is_null() || j["added_tokens"].is_array(), path,
             ": added_tokens must be an array");
  // Ids run 0..n-1 without gaps over model.vocab and added_tokens together: refusing a larger one before the
  // tables are sized keeps a tiny file from asking for 2^31 tokens.
  const size_t n_listed = m["vocab"].size() + (j.contains("added_tokens") ? j["added_tokens"].size() : 0);
  auto check_range = [&](uint32_t id, const std::string& what) {
    KILN_CHECK(id < n_listed, path, ": ", what, " has id ", id, ", but the file lists ", n_listed,
               " tokens (ids run from 0 without gaps)");
  };
  Vocab v;
  std::unordered_map<std::string, uint32_t> by_spelling;
  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    uint32_t id = json_id(it.value(), path, "model.vocab[" + quote_name(it.key()) + "]");
    check_range(id, "model.vocab[" + quote_name(it.key()) + "]");
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
      check_range(id, where);
      auto flag = [&](const char* key, bool dflt) {
        if (!a.contains(key) || a[key].is_null()) return dflt;
        KILN_CHECK(a[key].is_boolean(), path, ": ", where, ".", key, " must be true or false");
        return a[key].get<bool>();
      };
      SpecialToken t{a["content"].get<std::string>(), id};
      t.special = flag("special", true);
      t.lstrip = flag("lstrip", false);
      t.rstrip = flag("rstrip", false);
      t.normalized = flag("normalized", !t.special);  // Hugging Face's default
      KILN_CHECK(!flag("single_word", false), path, ": ", where, ".single_word=true is not supported");
      if (id >= v.seen.size() || !v.seen[id]) v.put(id, t.content);
      specials.push_back(std::move(t));
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
    KILN_CHECK(ia != by_spelling.end(), where, ": token ", quote_name(ab.first), " is not in model.vocab");
    KILN_CHECK(ib != by_spelling.end(), where, ": token ", quote_name(ab.second), " is not in model.vocab");
    merges.emplace_back(ia->second, ib->second);
  }
  Tokenizer t = Tokenizer::from_parts(std::move(v.tokens), merges, std::move(specials), std::move(v.raw), path,
                                      m.value("ignore_merges", false), pre);
  HfJsonLoader::set_nfc(t, nfc);
  if (j.contains("post_processor") && !j["post_processor"].is_null())
    HfJsonLoader::attach(j["post_processor"], path, t);
  return t;
}

}  // namespace

// A field of the wrong JSON type surfaces as nlohmann's type_error: report it as kiln::Error naming the file.
Tokenizer Tokenizer::load_gpt2(const std::string& encoder_json, const std::string& vocab_bpe) {
  try {
    return gpt2_impl(encoder_json, vocab_bpe);
  } catch (const json::exception& e) {
    fail(encoder_json, ": ", e.what());
  }
}

Tokenizer Tokenizer::load_hf_json(const std::string& path) {
  KILN_CHECK(file_exists(path), path, ": no such file");
  return parse_hf_json(read_file(path), path);
}

Tokenizer Tokenizer::parse_hf_json(const std::string& text, const std::string& source) {
  try {
    return hf_json_impl(text, source);
  } catch (const json::exception& e) {
    fail(source, ": ", e.what());
  }
}

// ---- saving ----------------------------------------------------------------------------------------

namespace {
// JSON string literal (nlohmann escapes; it rejects invalid UTF-8, which no spelled token has).
std::string quote(const std::string& s) {
  try {
    return json(s).dump();
  } catch (const json::exception&) {
    fail("cannot save the tokenizer: token ", quote_name(s), " is not valid UTF-8");
  }
}

// {"spelling": id, ...} in id order, written by hand: ordered_json's linear lookups are quadratic.
std::string spelled_vocab(const std::vector<std::string>& tokens, const std::vector<bool>& raw, const char* indent) {
  std::unordered_map<std::string, uint32_t> seen;
  std::string out = "{";
  for (uint32_t id = 0; id < tokens.size(); id++) {
    std::string s = spelled(tokens, raw, id);
    KILN_CHECK(seen.emplace(s, id).second, "cannot save the tokenizer: tokens ", seen[s], " and ", id,
               " are both spelled ", quote_name(s));
    out += id ? ",\n" : "\n";
    out += indent;
    out += quote(s) + ": " + std::to_string(id);
  }
  return out + "}";
}
}  // namespace

std::string Tokenizer::spelling(uint32_t id) const {
  KILN_CHECK(id < tokens_.size(), "token id ", id, " outside the vocabulary of ", tokens_.size());
  return spelled(tokens_, raw_, id);
}

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
                          {"lstrip", s.lstrip},
                          {"rstrip", s.rstrip},
                          {"normalized", s.normalized},
                          {"special", s.special}});
  j["added_tokens"] = added;
  j["normalizer"] = nfc_ ? ojson{{"type", "NFC"}} : ojson(nullptr);
  if (pre_ == PreTokenizer::kGpt2) {
    j["pre_tokenizer"] =
        ojson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  } else {
    ojson split{{"type", "Split"},
                {"pattern", {{"Regex", pre_ == PreTokenizer::kLlama3 ? kLlama3Pattern : kQwen2Pattern}}},
                {"behavior", "Isolated"},
                {"invert", false}};
    ojson bl{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}};
    j["pre_tokenizer"] = ojson{{"type", "Sequence"}, {"pretokenizers", ojson::array({split, bl})}};
  }
  if (!post_processor_json_.empty())
    j["post_processor"] = ojson::parse(post_processor_json_);
  else
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
  if (pre_ == PreTokenizer::kGpt2) {
    write_file_atomic((d / "encoder.json").string(), to_encoder_json());
    write_file_atomic((d / "vocab.bpe").string(), to_vocab_bpe());
  }
  write_file_atomic((d / "tokenizer.json").string(), to_hf_json());
  if (config_) write_file_atomic((d / "tokenizer_config.json").string(), config_->text);
}

}  // namespace kiln
