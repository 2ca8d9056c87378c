#include "serve/metrics.h"

#include <cstdio>

namespace kiln::serve {

void Histogram::observe(double v) {
  std::lock_guard<std::mutex> lk(m_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) i++;
  counts_[i]++;
  sum_ += v;
  n_++;
}

std::string Histogram::render(const std::string& name, const std::string& help) const {
  std::lock_guard<std::mutex> lk(m_);
  std::string s = "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  uint64_t cum = 0;
  char buf[160];
  for (size_t i = 0; i < bounds_.size(); i++) {
    cum += counts_[i];
    std::snprintf(buf, sizeof buf, "%s_bucket{le=\"%g\"} %llu\n", name.c_str(), bounds_[i], (unsigned long long)cum);
    s += buf;
  }
  cum += counts_.back();
  std::snprintf(buf, sizeof buf, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", name.c_str(),
                (unsigned long long)cum, name.c_str(), sum_, name.c_str(), (unsigned long long)n_);
  return s + buf;
}

void Metrics::count_request(const std::string& route, int status) {
  std::lock_guard<std::mutex> lk(m_);
  requests_[{route, status}]++;
}

std::string Metrics::render() const {
  std::string s;
  auto gauge = [&](const char* name, const char* type, const char* help, int64_t v) {
    s += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " +
         std::to_string(v) + "\n";
  };
  {
    std::lock_guard<std::mutex> lk(m_);
    s += "# HELP kiln_requests_total HTTP requests by route and status\n# TYPE kiln_requests_total counter\n";
    for (const auto& [k, n] : requests_)
      s += "kiln_requests_total{route=\"" + k.first + "\",status=\"" + std::to_string(k.second) + "\"} " +
           std::to_string(n) + "\n";
  }
  gauge("kiln_prompt_tokens_total", "counter", "Prompt tokens of admitted sequences", prompt_tokens);
  gauge("kiln_generation_tokens_total", "counter", "Tokens generated", generation_tokens);
  gauge("kiln_prefix_cache_hit_tokens_total", "counter", "Prompt tokens taken from the prefix cache",
        prefix_cached_tokens);
  gauge("kiln_queue_length", "gauge", "Requests waiting for a slot or KV blocks", queued);
  gauge("kiln_running_sequences", "gauge", "Sequences in the running batch", running);
  gauge("kiln_kv_cache_used_blocks", "gauge", "KV-cache blocks held by running sequences", kv_used_blocks);
  gauge("kiln_kv_cache_cached_blocks", "gauge", "Idle KV-cache blocks kept for prefix reuse", kv_cached_blocks);
  gauge("kiln_kv_cache_total_blocks", "gauge", "KV-cache blocks in the pool", kv_total_blocks);
  gauge("kiln_scheduler_steps_total", "counter", "Batched forward passes", steps);
  gauge("kiln_spec_rounds_total", "counter", "Speculative rounds (a sequence's proposals checked by the target)",
        spec_rounds);
  gauge("kiln_spec_draft_tokens_total", "counter", "Tokens proposed by the draft", spec_drafted);
  gauge("kiln_spec_accepted_tokens_total", "counter", "Proposed tokens the target accepted", spec_accepted);
  s += ttft.render("kiln_time_to_first_token_seconds", "Time from a request's arrival to its first token");
  s += itl.render("kiln_inter_token_latency_seconds", "Time between consecutive tokens of a sequence");
  return s;
}

}  // namespace kiln::serve
