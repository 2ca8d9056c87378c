// kiln export: a checkpoint of any family as a GGUF file that llama.cpp loads (models/gguf_export.h).
//   kiln export --model DIR --format gguf --out FILE.gguf [--dtype f32|f16|q8_0] [--tokenizer DIR]
// The tokenizer (tokenizer.json, or encoder.json + vocab.bpe) goes into the file, so it is required: the
// model directory's, or --tokenizer. Everything is read and checked before the file is written (atomically),
// so a failure leaves no file behind.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/gguf.h"
#include "models/checkpoint.h"
#include "models/family.h"
#include "models/gguf_export.h"
#include "models/gguf_vocab.h"
#include "tokenizer/bpe.h"
#include "tools/kiln/command.h"

namespace {

namespace fs = std::filesystem;

struct ExportOptions {
  std::string model, out, format, dtype = "f32", tokenizer;
};

// The directory holding the checkpoint (the model path itself, or a .safetensors file's directory).
std::string model_dir(const std::string& model) {
  std::error_code ec;
  if (fs::is_directory(model, ec)) return model;
  const std::string d = fs::path(model).parent_path().string();
  return d.empty() ? "." : d;
}

void run_export(const ExportOptions& o) {
  using namespace kiln;
  const GgufType type = o.dtype == "f16" ? GgufType::F16 : o.dtype == "q8_0" ? GgufType::Q8_0 : GgufType::F32;
  const ModelConfig cfg = load_model_config_for(o.model);
  try {  // an unsupported family or feature fails before the weights are read, naming the checkpoint
    check_gguf_export(cfg);
  } catch (const Error& e) {
    fail(o.model, ": ", e.what());
  }

  // The tokenizer first: it is small, and a missing one should not wait for the weights.
  const std::string tok_dir = o.tokenizer.empty() ? model_dir(o.model) : o.tokenizer;
  KILN_CHECK(!o.tokenizer.empty() || Tokenizer::in_dir(tok_dir), tok_dir,
             ": no tokenizer.json (or encoder.json + vocab.bpe) to put in the GGUF file; pass --tokenizer DIR");
  const Tokenizer tok = Tokenizer::load(tok_dir);
  const GgufTokenizer gtok = gguf_tokenizer(tok, cfg.vocab_size, tok_dir);

  const ParamTable table = model_param_table(cfg);
  std::vector<float> params(table.total, 0.0f);
  load_model_weights(o.model, cfg, table, params.data());
  export_gguf(o.out, cfg, table, params.data(), gtok, type);

  std::error_code ec;
  const auto bytes = fs::file_size(o.out, ec);
  std::fprintf(stderr, "kiln export: %s (%s, %s matrices, %d layers, %d tokens) -> %s (%.1f MB)\n", o.model.c_str(),
               cfg.family.c_str(), o.dtype.c_str(), cfg.n_layer, cfg.vocab_size, o.out.c_str(),
               ec ? 0.0 : double(bytes) / 1e6);
}

kiln::cli::Command export_cmd("export", [](CLI::App& root) {
  auto o = std::make_shared<ExportOptions>();
  auto* c = root.add_subcommand("export", "Write a checkpoint of any family as a GGUF file for llama.cpp");
  c->add_option("--model", o->model, "Checkpoint directory (config.json + model.safetensors + tokenizer files)")
      ->required();
  c->add_option("--format", o->format, "Output format")->required()->check(CLI::IsMember({"gguf"}));
  c->add_option("--out", o->out, "Output file (written atomically)")->required();
  c->add_option("--dtype", o->dtype, "Matrices as f32, f16 or q8_0 (norms and biases stay f32)")
      ->check(CLI::IsMember({"f32", "f16", "q8_0"}))
      ->capture_default_str();
  c->add_option("--tokenizer", o->tokenizer, "Tokenizer directory (default: the model directory)");
  c->callback([o] { run_export(*o); });
});

}  // namespace
