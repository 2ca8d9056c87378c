// kiln generate: continue a prompt with a checkpoint of any family (KV-cache decoding, infer/generate.h).
//
// Text mode streams the prompt and then the completion to stdout as tokens arrive (only whole UTF-8
// characters until the end); without a tokenizer it prints token ids. --json prints one line instead:
//   {"tokens": [prompt and new ids], "text": prompt text + completion (null without a tokenizer),
//    "finish_reason": "length" | "eot" | "stop" | "context", "weights_dtype", "decode_tokens_per_s",
//    with a draft model "speculative": {draft_tokens, rounds, drafted, accepted, acceptance_rate,
//    mean_accepted_length (accepted proposals per round), tokens_per_round}; with MTP self-drafting the same
//    object with "method": "mtp" (a model with MTP modules drafts with them unless --no-mtp-draft: K chained
//    guesses per round, K = --draft-tokens, by default the number of modules, more refused); both with
//    "accepted_per_position": accepted / proposed of each draft position; with --prompt-lookup (n-gram drafting
//    from the sequence itself, infer/prompt_lookup.h) the same object with "method": "prompt_lookup",
//    with Medusa heads "medusa": {heads, tree_nodes, tree_depth, acceptance: greedy | typical, rounds, accepted,
//    acceptance_rate (accepted / (rounds · tree depth)), mean_accepted_length (tokens per round)}}
// Medusa (infer/medusa.h) runs by default when the checkpoint has heads (medusa.safetensors), without a draft
// model (on the GPU too: the tree through the GPU decoder, the heads on the CPU); --no-medusa turns it off. Greedy acceptance at temperature 0 (output = plain greedy),
// typical acceptance (--typical-threshold, --typical-alpha) when sampling.
// Prefill and decode speeds go to stderr. The sequence (prompt + new tokens) never exceeds the model's
// n_positions: generation stops there and says so on stderr. --stop ends the completion before the first
// occurrence of a string (the stop string itself is not printed; the token that completed it is listed).
// With a tokenizer smaller than the model's vocabulary (a padded vocab_size), only the tokenizer's ids are
// sampled. The end-of-text token is the tokenizer's (or --eot-id); it ends generation and has no text.
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/gpu.h"
#include "infer/generate.h"
#include "infer/medusa.h"
#include "infer/mtp_decode.h"
#include "infer/prompt_lookup.h"
#include "infer/sampler.h"
#include "infer/speculative.h"
#include "infer/text_stream.h"
#include "models/checkpoint.h"
#include "models/family.h"
#include "models/medusa_checkpoint.h"
#include "models/model.h"
#include "tokenizer/bpe.h"
#include "tools/kiln/command.h"
#include "tools/kiln/lookup_options.h"
#include "train/trainer.h"

namespace {

struct GenerateOptions {
  std::string model, random_init, tokenizer, prompt, prompt_ids, stop, device = "cpu", weights_dtype = "f32";
  std::string draft_model, draft_random_init;
  int draft_tokens = 4;
  double draft_min_prob = 0.0;
  bool medusa = false, no_medusa = false;
  std::string medusa_tree;
  float typical_threshold = 0.09f, typical_alpha = 0.3f;
  bool has_prompt = false, has_prompt_ids = false, json = false, no_cuda_graph = false;
  bool mtp_draft = false, no_mtp_draft = false, draft_tokens_given = false, prompt_lookup = false;
  kiln::PromptLookupParams lookup;
  int max_new = 64, threads = 0;
  std::optional<int> eot_id;
  kiln::SamplingParams sampling;
};

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\n"), b = s.find_last_not_of(" \t\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// "1, 2,3" -> {1, 2, 3}; "" -> {}; names the bad item otherwise.
std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  if (trim(s).empty()) return ids;
  for (size_t i = 0;;) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string item = trim(s.substr(i, j - i));
    KILN_CHECK(!item.empty(), "--prompt-ids: item ", ids.size() + 1, " is empty");
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    KILN_CHECK(used == item.size() && v >= std::numeric_limits<int32_t>::min() &&
                   v <= std::numeric_limits<int32_t>::max(),
               "--prompt-ids: item ", ids.size() + 1, " ('", item, "') is not a token id");
    ids.push_back(int32_t(v));
    if (j == s.size()) return ids;
    i = j + 1;
  }
}

void write_out(const std::string& s) {
  if (s.empty()) return;
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

void run_generate(const GenerateOptions& o) {
  using namespace kiln;
  set_threads(o.threads);
  KILN_CHECK(o.model.empty() != o.random_init.empty(), "give exactly one of --model (a checkpoint) and --random-init");
  KILN_CHECK(o.has_prompt != o.has_prompt_ids, "give exactly one of --prompt and --prompt-ids");
  o.sampling.validate();
  KILN_CHECK(o.max_new >= 0, "--max-new must be >= 0, got ", o.max_new);
  const DeviceSpec device = parse_device(o.device);
  if (device.cuda) gpu::init(device.index);

  // Model: a checkpoint, or random weights for benchmarking.
  const ModelConfig cfg = o.model.empty() ? load_model_config(o.random_init) : load_model_config_for(o.model);
  ModelOptions mo;
  mo.with_grads = false;
  std::unique_ptr<Model> model = make_model(cfg, mo);  // the host copy of the weights the decoder reads
  if (o.model.empty())
    model->init_random(1);
  else
    load_model_weights(o.model, cfg, model->table(), model->host_params());
  const int V = cfg.vocab_size;

  // Tokenizer: --tokenizer, else the model directory when it has tokenizer files.
  std::string tok_dir = o.tokenizer;
  if (tok_dir.empty() && !o.model.empty()) {
    // The checkpoint directory (or the directory of a .safetensors file).
    std::error_code ec;
    const std::string d = std::filesystem::is_directory(o.model, ec)
                              ? o.model
                              : std::filesystem::path(o.model).parent_path().string();
    if (kiln::Tokenizer::in_dir(d.empty() ? "." : d)) tok_dir = d.empty() ? "." : d;
  }
  std::unique_ptr<Tokenizer> tok;
  if (!tok_dir.empty()) {
    tok = std::make_unique<Tokenizer>(Tokenizer::load(tok_dir));
    KILN_CHECK(tok->vocab_size() <= V, tok_dir, ": the tokenizer has ", tok->vocab_size(),
               " tokens but the model's vocab_size is ", V);
  }

  std::optional<int32_t> eot;
  if (o.eot_id) {
    if (*o.eot_id >= 0) eot = *o.eot_id;
  } else if (tok && tok->eot_id()) {
    eot = int32_t(*tok->eot_id());
  }

  std::vector<int32_t> prompt;
  if (o.has_prompt) {
    KILN_CHECK(tok, "--prompt needs a tokenizer: pass --tokenizer DIR (", o.model.empty() ? "no model directory" : o.model,
               " has no encoder.json + vocab.bpe or tokenizer.json), or give --prompt-ids");
    // bos when the tokenizer asks for it (tokenizer_config.json's add_bos_token, or a TemplateProcessing).
    for (uint32_t id : tok->prefix_ids()) prompt.push_back(int32_t(id));
    for (uint32_t id : tok->encode(o.prompt)) prompt.push_back(int32_t(id));
  } else {
    prompt = parse_ids(o.prompt_ids);
  }
  if (prompt.empty()) {
    KILN_CHECK(eot, "the prompt is empty (and there is no end-of-text token to start from)");
    prompt.push_back(*eot);
    std::fprintf(stderr, "kiln generate: empty prompt, starting from the end-of-text token %d\n", int(*eot));
  }
  for (size_t i = 0; i < prompt.size(); i++)
    KILN_CHECK(prompt[i] >= 0 && prompt[i] < V, "prompt token ", i, " has id ", prompt[i],
               ", outside the model's vocabulary [0, ", V, ")");
  KILN_CHECK(int(prompt.size()) <= cfg.max_positions, "the prompt has ", prompt.size(),
             " tokens, more than the model's context of ", cfg.max_positions, " positions");

  DecoderOptions dopt;
  dopt.cuda = device.cuda;
  dopt.cuda_graph = !o.no_cuda_graph;
  const std::optional<WeightFormat> wf = parse_weight_format(o.weights_dtype);
  KILN_CHECK(wf, "--weights-dtype: '", o.weights_dtype, "' is not one of f32, bf16, f16, q8_0");
  dopt.weights = *wf;
  std::unique_ptr<IncrementalDecoder> dec = make_decoder(cfg, model->host_params(), dopt);
  // Speculative decoding: the draft model, on the same device with the same weight format.
  KILN_CHECK(o.draft_model.empty() || o.draft_random_init.empty(),
             "give at most one of --draft-model and --draft-random-init");
  KILN_CHECK(o.draft_tokens >= 1, "--draft-tokens must be >= 1, got ", o.draft_tokens);
  KILN_CHECK(o.draft_min_prob >= 0 && o.draft_min_prob < 1, "--draft-min-prob must be in [0, 1), got ",
             o.draft_min_prob);
  const bool speculative = !o.draft_model.empty() || !o.draft_random_init.empty();
  KILN_CHECK(!(o.prompt_lookup && speculative), "give at most one of --prompt-lookup and --draft-model");
  if (o.prompt_lookup) o.lookup.validate();
  std::unique_ptr<Model> draft_model;
  std::unique_ptr<IncrementalDecoder> draft;
  if (speculative) {
    const ModelConfig dcfg = o.draft_model.empty() ? load_model_config(o.draft_random_init)
                                                   : load_model_config_for(o.draft_model);
    draft_model = make_model(dcfg, mo);
    if (o.draft_model.empty())
      draft_model->init_random(2);
    else
      load_model_weights(o.draft_model, dcfg, draft_model->table(), draft_model->host_params());
    const int sample_vocab = tok ? tok->vocab_size() : V;
    KILN_CHECK(dcfg.vocab_size >= sample_vocab, "--draft-model: its vocab_size ", dcfg.vocab_size,
               " is smaller than the ", sample_vocab, " ids the target samples from");
    draft = make_decoder(dcfg, draft_model->host_params(), dopt);
  }
  // Medusa: the checkpoint's heads (medusa.safetensors), used when asked or, by default, when they exist (not
  // beside a draft model). With --device cuda the tree runs on the GPU and the heads on the CPU.
  KILN_CHECK(!(o.medusa && o.no_medusa), "give at most one of --medusa and --no-medusa");
  std::optional<MedusaWeights> medusa_w;
  if (!o.model.empty() && !o.no_medusa) medusa_w = load_medusa_heads(o.model, cfg);
  KILN_CHECK(!o.medusa || medusa_w, "--medusa: ", o.model.empty() ? "--random-init has" : o.model + " has",
             " no Medusa heads (medusa.safetensors; kiln train --medusa-heads K --init BASE makes them)");
  KILN_CHECK(!o.medusa || !speculative, "give at most one of --medusa and --draft-model");
  KILN_CHECK(!o.medusa || !o.prompt_lookup, "give at most one of --medusa and --prompt-lookup");
  const bool use_medusa = medusa_w && !speculative && !o.prompt_lookup;
  MedusaParams mparams;
  if (!o.medusa_tree.empty()) mparams.tree = MedusaTree::parse(o.medusa_tree);
  mparams.typical = !o.sampling.greedy();
  mparams.typical_threshold = o.typical_threshold;
  mparams.typical_alpha = o.typical_alpha;
  // MTP self-drafting: --mtp-draft, or by default when the model has the modules and no draft model is given.
  KILN_CHECK(!(o.mtp_draft && o.no_mtp_draft), "give at most one of --mtp-draft and --no-mtp-draft");
  KILN_CHECK(!(o.mtp_draft && speculative), "give at most one of --mtp-draft and --draft-model");
  KILN_CHECK(!(o.mtp_draft && o.prompt_lookup), "give at most one of --mtp-draft and --prompt-lookup");
  KILN_CHECK(!(o.mtp_draft && use_medusa), "give at most one of --mtp-draft and --medusa (or pass --no-medusa)");
  const int mtp_depth = dec->self_draft_depth();
  KILN_CHECK(!o.mtp_draft || mtp_depth > 0, "--mtp-draft: the model (", cfg.family,
             ") has no multi-token-prediction modules (num_nextn_predict_layers)");
  const bool mtp = !speculative && !o.prompt_lookup && !use_medusa && !o.no_mtp_draft && mtp_depth > 0;
  // MTP: one draft per module by default; more than the modules is refused (module k was trained for depth k).
  const int draft_tokens = mtp && !o.draft_tokens_given ? mtp_depth : o.draft_tokens;
  KILN_CHECK(!mtp || draft_tokens <= mtp_depth, "--draft-tokens ", draft_tokens, ": the model has ", mtp_depth,
             " multi-token-prediction module", mtp_depth == 1 ? "" : "s",
             " (num_nextn_predict_layers), so MTP self-drafting proposes at most ", mtp_depth, " per round");
  if (device.cuda) {
    const gpu::DeviceInfo info = gpu::init(device.index);
    std::fprintf(stderr, "kiln generate: device %s%s\n", info.name.c_str(), info.emulated ? " [SIMT emulator]" : "");
  }
  Sampler sampler(o.sampling);
  GenerateLimits lim;
  lim.max_new = o.max_new;
  lim.eot = eot;
  if (tok) lim.sample_vocab = tok->vocab_size();  // ids past the tokenizer's (padding) have no text

  std::vector<int32_t> all = prompt;
  TextStream stream(o.stop);
  std::string prompt_text;
  if (tok) {
    std::vector<uint32_t> ids(prompt.begin(), prompt.end());
    prompt_text = tok->decode(ids);
  }
  if (!o.json) {
    if (tok) {
      write_out(prompt_text);
    } else {
      std::string s;
      for (int32_t t : prompt) s += std::to_string(t) + " ";
      write_out(s);
    }
  }
  auto on_token = [&](int32_t t) {
    all.push_back(t);
    if (eot && t == *eot) return true;  // not part of the text
    if (tok) {
      std::string out = stream.push(tok->decode_token(uint32_t(t)));
      if (!o.json) write_out(out);
      return !stream.stopped();
    }
    if (!o.json) write_out(std::to_string(t) + " ");
    return true;
  };
  GenerateStats st;
  SpeculativeStats sst;
  MedusaStats mst;
  FinishReason why;
  if (use_medusa) {
    nn::MedusaHeads heads{medusa_w->shape, medusa_w->params.data(), nullptr};
    heads.set_weight_format(*wf);  // the heads read the same format as the base
    why = generate_medusa(*dec, heads, sampler, prompt, lim, mparams, on_token, &mst);
    st = mst.base;
  } else if (speculative) {
    why = generate_speculative(*dec, *draft, sampler, prompt, lim, draft_tokens, on_token, &sst, o.draft_min_prob);
    st = sst.base;
  } else if (mtp) {
    why = generate_self_draft(*dec, sampler, prompt, lim, draft_tokens, on_token, &sst);
    st = sst.base;
  } else if (o.prompt_lookup) {
    why = generate_prompt_lookup(*dec, sampler, prompt, lim, draft_tokens, o.lookup, on_token, &sst);
    st = sst.base;
  } else {
    why = generate(*dec, sampler, prompt, lim, on_token, &st);
  }
  // Tokens/s of the new tokens after the first (the first comes with the prefill).
  const double decode_tps = st.decode_s > 0 ? (st.new_tokens - 1) / st.decode_s : 0.0;
  const std::string rest = stream.finish();

  const bool drafted = speculative || mtp || o.prompt_lookup;
  if (o.json) {
    nlohmann::json j;
    j["tokens"] = all;
    j["text"] = tok ? nlohmann::json(prompt_text + stream.text()) : nlohmann::json(nullptr);
    j["finish_reason"] = finish_reason_name(why);
    j["weights_dtype"] = o.weights_dtype;
    j["decode_tokens_per_s"] = decode_tps;
    if (drafted) {
      j["speculative"] = {{"method", mtp ? "mtp" : o.prompt_lookup ? "prompt_lookup" : "draft_model"},
                          {"draft_tokens", draft_tokens},
                          {"rounds", sst.rounds},
                          {"drafted", sst.drafted},
                          {"accepted", sst.accepted},
                          {"acceptance_rate", sst.acceptance_rate()},
                          {"mean_accepted_length", sst.mean_accepted()},
                          {"tokens_per_round", sst.tokens_per_round()}};
      std::vector<double> per;
      for (size_t i = 0; i < sst.drafted_at.size(); i++)
        per.push_back(sst.drafted_at[i] ? double(sst.accepted_at[i]) / double(sst.drafted_at[i]) : 0.0);
      j["speculative"]["accepted_per_position"] = per;
    }
    if (use_medusa) {
      j["medusa"] = {{"heads", medusa_w->shape.K},
                     {"tree_nodes", mst.tree_nodes},
                     {"tree_depth", mst.depth},
                     {"acceptance", mparams.typical ? "typical" : "greedy"},
                     {"rounds", mst.rounds},
                     {"accepted", mst.accepted},
                     {"acceptance_rate", mst.acceptance_rate()},
                     {"mean_accepted_length", mst.mean_accepted_length()}};
    }
    // Bytes that are not valid UTF-8 (a character cut by the token budget) become U+FFFD in the JSON.
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    write_out(rest + "\n");
  }
  std::fflush(stdout);
  if (why == FinishReason::Context)
    std::fprintf(stderr, "kiln generate: stopped at the model's context limit of %d positions (%d new tokens)\n",
                 cfg.max_positions, st.new_tokens);
  std::fprintf(stderr, "kiln generate: prefill %d tokens in %.3f s (%.1f tokens/s), decode %d tokens in %.3f s "
               "(%.1f tokens/s), finish: %s\n",
               st.prompt_tokens, st.prefill_s, st.prefill_s > 0 ? st.prompt_tokens / st.prefill_s : 0.0,
               st.decode_steps, st.decode_s, st.decode_s > 0 ? st.decode_steps / st.decode_s : 0.0,
               finish_reason_name(why));
  if (use_medusa)
    std::fprintf(stderr, "kiln generate: medusa, %d heads, %d rounds of a %d-node tree: acceptance %.3f, %.2f tokens "
                 "per round, %.1f new tokens/s\n",
                 medusa_w->shape.K, mst.rounds, mst.tree_nodes, mst.acceptance_rate(), mst.mean_accepted_length(),
                 decode_tps);
  if (drafted)
    std::fprintf(stderr, "kiln generate: %s, %d rounds of up to %d drafts: acceptance %.3f, %.2f accepted "
                 "per round, %.1f new tokens/s\n",
                 mtp ? "MTP self-drafting" : o.prompt_lookup ? "prompt lookup" : "speculative", sst.rounds, draft_tokens,
                 sst.acceptance_rate(), sst.mean_accepted(), decode_tps);
}

kiln::cli::Command generate_cmd("generate", [](CLI::App& root) {
  auto o = std::make_shared<GenerateOptions>();
  auto* c = root.add_subcommand("generate", "Continue a prompt with a checkpoint of any family (KV-cache decoding)");
  c->add_option("--model", o->model, "Checkpoint directory (config.json + model.safetensors) or .safetensors file");
  c->add_option("--random-init", o->random_init, "Instead of --model: a config.json for random weights (benchmarks)");
  c->add_option("--tokenizer", o->tokenizer, "Tokenizer directory (default: the model directory if it has one)");
  auto* p = c->add_option("--prompt", o->prompt, "Prompt text (needs a tokenizer)");
  auto* pi = c->add_option("--prompt-ids", o->prompt_ids, "Prompt as comma-separated token ids, e.g. 464,3290");
  p->excludes(pi);
  c->add_option("--max-new", o->max_new, "Most new tokens to generate")->capture_default_str();
  c->add_option("--temperature", o->sampling.temperature, "Softmax temperature (0: greedy)")->capture_default_str();
  c->add_option("--top-k", o->sampling.top_k, "Sample among the K most probable tokens (0: all)")->capture_default_str();
  c->add_option("--top-p", o->sampling.top_p, "Nucleus: the smallest set with this much probability, after top-k")
      ->capture_default_str();
  c->add_option("--seed", o->sampling.seed, "Sampling seed (the same seed reproduces a sample)")->capture_default_str();
  c->add_option("--stop", o->stop, "End the completion before this string (text is not printed past it)");
  c->add_option("--eot-id", o->eot_id, "End-of-text token id (default: the tokenizer's; -1: never stop on one)");
  c->add_flag("--json", o->json, "Print one JSON line {tokens, text, finish_reason} instead of streaming text");
  c->add_option("--threads", o->threads, "CPU threads (0: all cores)")->capture_default_str();
  c->add_option("--device", o->device, "cpu, or cuda / cuda:N: bf16 weights and KV cache on the GPU")
      ->capture_default_str();
  c->add_option("--weights-dtype", o->weights_dtype,
                 "The weight matrices' format for decoding: f32, bf16, f16 or q8_0 (8-bit, a scale per 32); "
                 "--device cuda: f32 and bf16 both mean its bf16 products")
      ->capture_default_str();
  c->add_option("--draft-model", o->draft_model,
                 "Speculative decoding: a small checkpoint with the same tokenizer that proposes tokens for this one");
  c->add_option("--draft-random-init", o->draft_random_init, "Instead of --draft-model: a config.json (benchmarks)");
  auto* dt = c->add_option("--draft-tokens", o->draft_tokens,
                            "Speculative decoding: tokens the draft proposes per round (K; MTP self-drafting: at most, and by "
                            "default, the model's number of MTP modules)")
                ->capture_default_str();
  c->add_option("--draft-min-prob", o->draft_min_prob,
                "Speculative decoding: end a round's drafting before a proposal the draft gives less than this "
                "probability (its raw softmax; 0: always K): each proposal costs a row of the target's pass")
      ->capture_default_str();
  kiln::cli::add_prompt_lookup_options(c, o->prompt_lookup, o->lookup);
  c->add_flag("--mtp-draft", o->mtp_draft,
              "Draft with the model's own multi-token-prediction modules (the default when it has them)");
  c->add_flag("--no-mtp-draft", o->no_mtp_draft, "Plain decoding for a model with MTP modules");
  c->add_flag("--medusa", o->medusa,
              "Decode with the checkpoint's Medusa heads (the default when it has them): a candidate tree checked "
              "in one pass per round");
  c->add_flag("--no-medusa", o->no_medusa, "Ignore the checkpoint's Medusa heads (plain decoding)");
  c->add_option("--medusa-tree", o->medusa_tree,
                "Medusa's static candidate tree: nodes as paths of head ranks, e.g. '0;1;0,0;0,1;0,0,0' (default: "
                "15 nodes to depth 4)");
  c->add_option("--typical-threshold", o->typical_threshold,
                "Medusa with --temperature > 0: typical acceptance's threshold epsilon")
      ->capture_default_str();
  c->add_option("--typical-alpha", o->typical_alpha,
                "Medusa with --temperature > 0: typical acceptance's alpha (accept p > min(eps, alpha*exp(-H)))")
      ->capture_default_str();
  c->add_flag("--no-cuda-graph", o->no_cuda_graph, "With --device cuda: launch the decode step's kernels one by one");
  c->callback([o, p, pi, dt] {
    o->has_prompt = p->count() > 0;
    o->draft_tokens_given = dt->count() > 0;
    o->has_prompt_ids = pi->count() > 0;
    run_generate(*o);
  });
});

}  // namespace
