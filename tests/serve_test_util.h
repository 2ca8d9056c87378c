// Shared by the serving engine's tests (test_serve*.cpp): a tokenizer whose id i is the letter 'A' + i (so a
// choice's text gives its tokens back), and jobs of one prompt each submitted at once to an engine, with what
// each choice reported.
#pragma once
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "models/model.h"
#include "serve/engine.h"
#include "tokenizer/bpe.h"

namespace kiln::test {

struct Served {
  std::string text, finish;
  int tokens = 0;  // as the last event counted them (end of text included, which has no text)
};

inline Tokenizer letter_tokenizer() {
  std::vector<std::string> pieces;
  for (int i = 0; i < 256; i++) pieces.push_back(std::string(1, char(('A' + i) % 256)));
  return Tokenizer::from_parts(pieces, {}, {});
}

inline std::vector<int32_t> letter_ids(const std::string& text) {
  std::vector<int32_t> ids;
  for (char c : text) ids.push_back(int32_t(c - 'A'));
  return ids;
}

inline std::vector<Served> serve_jobs(BatchDecoder& dec, const serve::EngineOptions& eo,
                                      const std::vector<std::vector<int32_t>>& prompts, int max_new,
                                      const serve::JobParams& jp, serve::Metrics& metrics) {
  const Tokenizer tok = letter_tokenizer();
  serve::Engine engine(dec, tok, eo, metrics);
  engine.start();
  std::vector<std::shared_ptr<serve::Job>> jobs;
  for (const auto& p : prompts) {
    jobs.push_back(std::make_shared<serve::Job>(std::vector<std::vector<int32_t>>{p}, std::vector<int>{max_new}, jp));
    engine.submit(jobs.back());
  }
  std::vector<Served> out(prompts.size());
  for (size_t i = 0; i < jobs.size(); i++) {
    std::vector<serve::ChoiceEvent> ev;
    while (!jobs[i]->done()) jobs[i]->wait(ev, std::chrono::milliseconds(100));
    EXPECT_EQ(jobs[i]->error(), "");
    for (const auto& e : ev) {
      out[i].text += e.text;
      out[i].tokens = e.tokens;
      if (!e.finish.empty()) out[i].finish = e.finish;
    }
  }
  engine.stop();
  return out;
}

}  // namespace kiln::test
