// The server's counters in Prometheus' text format (GET /metrics). Updated from the HTTP threads and the
// scheduler; every field is atomic or behind the histogram's lock.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace kiln::serve {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  // name_bucket{le=...}, name_sum, name_count lines.
  std::string render(const std::string& name, const std::string& help) const;

 private:
  std::vector<double> bounds_;
  mutable std::mutex m_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t n_ = 0;
};

struct Metrics {
  std::atomic<int64_t> prompt_tokens{0}, generation_tokens{0}, prefix_cached_tokens{0};
  std::atomic<int64_t> queued{0}, running{0}, kv_used_blocks{0}, kv_cached_blocks{0}, kv_total_blocks{0};
  std::atomic<int64_t> steps{0};
  std::atomic<int64_t> spec_rounds{0}, spec_drafted{0}, spec_accepted{0};  // speculative decoding
  Histogram ttft{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};
  Histogram itl{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}};
  void count_request(const std::string& route, int status);
  std::string render() const;

 private:
  mutable std::mutex m_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;  // (route, status) -> count
};

}  // namespace kiln::serve
