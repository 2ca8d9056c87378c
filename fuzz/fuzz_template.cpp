// The chat-template interpreter (serve/jinja.h): the input is a template's source. It parses or throws
// jinja::Error (one line); a parsed template renders over a fixed conversation or throws jinja::Error (Raised
// for raise_exception), within its bounds (output, iterations, macro depth): never a crash, hang or other
// exception. A second render of the same template gives the same text (rendering has no hidden state).
#include "fuzz/fuzz_util.h"
#include "serve/jinja.h"

using namespace kiln::serve;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 4096) return 0;  // templates are small; longer inputs only slow the search
  const std::string_view src(reinterpret_cast<const char*>(data), size);
  static const nlohmann::ordered_json ctx = nlohmann::ordered_json::parse(R"({
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>\u00e9"},
                 {"role": "assistant", "content": "<think>x</think>Hello"}, {"role": "user", "content": ""}],
    "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": [1, 2.5, null, true]}}}]})");
  std::unique_ptr<jinja::Template> t;
  try {
    t = std::make_unique<jinja::Template>(src);
  } catch (const jinja::Error& e) {
    FUZZ_CHECK(std::string(e.what()).find('\n') == std::string::npos, "multi-line parse error");
    return 0;
  }
  std::string a, b;
  bool ok_a = true, ok_b = true;
  try { a = t->render(ctx); } catch (const jinja::Error&) { ok_a = false; }
  try { b = t->render(ctx); } catch (const jinja::Error&) { ok_b = false; }
  FUZZ_CHECK(ok_a == ok_b && a == b, "two renders differ");
  return 0;
}
