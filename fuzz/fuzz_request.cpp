// kiln serve's request parser (serve/request.h) and stop-string stream (serve/stop_text.h). The first byte
// picks the parser, the rest is the request body; a body is accepted or refused with an ApiError of status 400
// and a one-line message, nothing else. For the stop stream the input is split at 0xFF bytes into stop strings
// and token pieces: the text released must be the concatenation up to the first occurrence of any stop string
// (computed here by a plain search), whatever the split.
#include <algorithm>

#include "fuzz/fuzz_util.h"
#include "serve/request.h"
#include "serve/stop_text.h"

using namespace kiln;

namespace {

template <class F>
void parse(F&& f) {
  try {
    f();
  } catch (const serve::ApiError& e) {
    const std::string m = e.what();
    FUZZ_CHECK(e.status == 400, "status ", e.status);
    FUZZ_CHECK(!m.empty() && m.find('\n') == std::string::npos, "message: ", m);
  }
}

void stop_stream(std::string_view in) {
  std::vector<std::string> parts;
  size_t a = 0;
  for (size_t i = 0; i <= in.size(); i++)
    if (i == in.size() || uint8_t(in[i]) == 0xFF) {
      parts.emplace_back(in.substr(a, i - a));
      a = i + 1;
    }
  const size_t n_stops = parts.empty() ? 0 : std::min<size_t>(parts.size() / 2, uint8_t(parts[0].empty() ? 0 : parts[0][0]) % 4);
  std::vector<std::string> stops(parts.begin() + 1, parts.begin() + 1 + long(std::min(n_stops, parts.size() - 1)));
  serve::StopText s(stops);
  std::string all, out;
  for (size_t i = 1 + stops.size(); i < parts.size(); i++) {
    all += parts[i];
    out += s.push(parts[i]);
  }
  out += s.finish();
  size_t first = std::string::npos;
  for (const auto& st : stops)
    if (!st.empty()) first = std::min(first, all.find(st));
  const std::string want = first == std::string::npos ? all : all.substr(0, first);
  FUZZ_CHECK(out == want, "released ", out.size(), " bytes, expected ", want.size());
  FUZZ_CHECK(s.stopped() == (first != std::string::npos), "stopped() disagrees");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view body(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 5) {
    case 0: parse([&] { serve::parse_gen_request(body, false); }); break;
    case 1: parse([&] { serve::parse_gen_request(body, true); }); break;
    case 2: parse([&] { serve::parse_tokenize_request(body); }); break;
    case 3: parse([&] { serve::parse_detokenize_request(body); }); break;
    default: stop_stream(body); break;
  }
  return 0;
}
