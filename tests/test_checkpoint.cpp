// GPT-2 checkpoints: save/load round trips, the Python peer reading ours and writing the original
// openai-community layout, and files that must be refused with the file and tensor named.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include "core/file_io.h"
#include "core/safetensors.h"
#include "io_test_helpers.h"
#include "tests/gpt2_compat.h"
#include "test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using test::ScratchDir;

GPT2Config tiny_config() {
  GPT2Config c;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 8;
  c.vocab_size = 11;
  c.n_positions = 5;
  return c;
}

std::string dims(const GPT2Config& c) {
  return str(" --layers ", c.n_layer, " --heads ", c.n_head, " --embd ", c.n_embd, " --vocab ", c.vocab_size,
             " --positions ", c.n_positions);
}

const float kNaN = std::numeric_limits<float>::quiet_NaN();

// A parameter block holding the peer's formula (padding NaN, which no reader may look at).
std::vector<float> formula_params(const ParamTable& t) {
  std::vector<float> p(t.total, kNaN);
  for (const auto& s : t.specs)
    for (int64_t i = 0; i < s.numel(); i++) p[s.offset + size_t(i)] = test::formula(s.name, uint32_t(i));
  return p;
}

// Every parameter equals want(spec, i), and the padding is zero.
template <class F>
::testing::AssertionResult block_matches(const ParamTable& t, const std::vector<float>& got, F want) {
  size_t next = 0;
  for (const auto& s : t.specs) {
    for (size_t i = next; i < s.offset; i++)
      if (got[i] != 0.0f) return ::testing::AssertionFailure() << "padding at " << i << " is " << got[i];
    for (int64_t i = 0; i < s.numel(); i++) {
      float w = want(s, size_t(i)), g = got[s.offset + size_t(i)];
      if (!(g == w)) return ::testing::AssertionFailure() << s.name << "[" << i << "] is " << g << ", expected " << w;
    }
    next = s.offset + size_t(s.numel());
  }
  for (size_t i = next; i < t.total; i++)
    if (got[i] != 0.0f) return ::testing::AssertionFailure() << "tail padding at " << i;
  return ::testing::AssertionSuccess();
}

TEST(Checkpoint, SaveThenLoadF32IsExact) {
  ScratchDir dir("ckpt_f32");
  GPT2Config cfg = tiny_config();
  ParamTable table = gpt2_table(cfg);
  std::vector<float> params = test::randn(table.total, 7, 0.5f);
  save_gpt2_checkpoint(dir / "ckpt", cfg, table, params.data(), DType::F32);
  EXPECT_TRUE(file_exists(dir / "ckpt/config.json"));
  for (const auto& e : fs::directory_iterator(dir.path / "ckpt"))  // no temporaries left behind
    EXPECT_TRUE(e.path().filename() == "config.json" || e.path().filename() == "model.safetensors") << e.path();

  GPT2Config back = load_gpt2_config_for(dir / "ckpt");
  EXPECT_EQ(back.n_layer, 2);
  EXPECT_EQ(back.n_head, 2);
  EXPECT_EQ(back.n_embd, 8);
  EXPECT_EQ(back.vocab_size, 11);
  EXPECT_EQ(back.n_positions, 5);
  EXPECT_EQ(back.layer_norm_epsilon, cfg.layer_norm_epsilon);
  std::vector<float> loaded(table.total, kNaN);
  load_gpt2_weights(dir / "ckpt", back, table, loaded.data());
  EXPECT_TRUE(block_matches(table, loaded, [&](const ParamSpec& s, size_t i) { return params[s.offset + i]; }));

  SafeTensorsReader r(dir / "ckpt/model.safetensors");
  EXPECT_EQ(r.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_EQ(r.find("lm_head.weight"), nullptr);
  EXPECT_EQ(r.entries().size(), table.specs.size());
}

TEST(Checkpoint, Bf16OnDiskGivesRoundToNearestEvenValues) {
  ScratchDir dir("ckpt_bf16");
  GPT2Config cfg = tiny_config();
  ParamTable table = gpt2_table(cfg);
  std::vector<float> params = test::randn(table.total, 11, 0.5f);
  float* wte = params.data() + table.specs[0].offset;
  wte[0] = 1.0f + 1.0f / 256;  // ties: to 1.0 and to 1 + 2/128 (the even neighbours)
  wte[1] = -(1.0f + 3.0f / 256);
  save_gpt2_checkpoint(dir / "ckpt", cfg, table, params.data(), DType::BF16);
  EXPECT_EQ(SafeTensorsReader(dir / "ckpt/model.safetensors").get("transformer.wte.weight").dtype, DType::BF16);
  std::vector<float> loaded(table.total, kNaN);
  load_gpt2_weights(dir / "ckpt/model.safetensors", cfg, table, loaded.data());
  EXPECT_TRUE(block_matches(table, loaded,
                            [&](const ParamSpec& s, size_t i) { return test::bf16_reference(params[s.offset + i]); }));
  const float* w = loaded.data() + table.specs[0].offset;
  EXPECT_EQ(w[0], 1.0f);
  EXPECT_EQ(w[1], -(1.0f + 2.0f / 128));
}

TEST(Checkpoint, PeerReadsOurCheckpoint) {
  ScratchDir dir("ckpt_peer_check");
  GPT2Config cfg = tiny_config();
  ParamTable table = gpt2_table(cfg);
  std::vector<float> params = formula_params(table);
  for (const char* dt : {"F32", "BF16"}) {
    std::string d = dir / dt;
    save_gpt2_checkpoint(d, cfg, table, params.data(), std::string(dt) == "F32" ? DType::F32 : DType::BF16);
    EXPECT_EQ(test::run_peer("check-gpt2 " + d + dims(cfg) + " --dtype " + dt), 0) << dt;
  }
  // Negative control: one parameter changed must make the peer disagree.
  params[table.find("transformer.h.1.mlp.c_fc.weight")->offset + 5] += 1.0f / 64;
  save_gpt2_checkpoint(dir / "bad", cfg, table, params.data(), DType::F32);
  EXPECT_NE(test::run_peer("check-gpt2 " + (dir / "bad") + dims(cfg) + " --dtype F32"), 0);
}

TEST(Checkpoint, LoadsTheOriginalOpenaiLayout) {
  // The openai-community/gpt2 model.safetensors: no "transformer." prefix, attention-mask buffers, and
  // (in some conversions) a tied lm_head.weight; its config.json has fields kiln does not use.
  ScratchDir dir("ckpt_peer_write");
  GPT2Config want = tiny_config();
  struct Case {
    const char* dtype;
    const char* flags;
  };
  for (Case c : {Case{"F32", "--buffers --lm-head"}, Case{"F16", "--prefix --pad"}, Case{"BF16", "--buffers --pad"},
                 Case{"F32", "--prefix --lm-head --pad"}}) {
    std::string d = dir / (std::string(c.dtype) + std::to_string(std::strlen(c.flags)));
    ASSERT_EQ(test::run_peer("write-gpt2 " + d + dims(want) + " --dtype " + c.dtype + " " + c.flags), 0);
    GPT2Config cfg = load_gpt2_config_for(d + "/model.safetensors");
    EXPECT_EQ(cfg.n_layer, want.n_layer);
    EXPECT_EQ(cfg.n_embd, want.n_embd);
    EXPECT_EQ(cfg.vocab_size, want.vocab_size);
    ParamTable table = gpt2_table(cfg);
    std::vector<float> loaded(table.total, kNaN);
    load_gpt2_weights(d, cfg, table, loaded.data());
    bool bf16 = std::string(c.dtype) == "BF16";
    EXPECT_TRUE(block_matches(table, loaded,
                              [&](const ParamSpec& s, size_t i) {
                                float v = test::formula(s.name, uint32_t(i));
                                return bf16 ? test::bf16_reference(v) : v;
                              }))
        << c.dtype << " " << c.flags;
  }
}

// --- Weight files that must be refused.

struct BadWeights : ::testing::Test {
  ScratchDir dir{"ckpt_bad"};
  GPT2Config cfg = tiny_config();
  ParamTable table = gpt2_table(cfg);
  std::vector<float> params = formula_params(table);
  std::vector<Tensor> good() {
    std::vector<Tensor> t;
    for (const auto& s : table.specs) t.push_back({s.name, DType::F32, s.shape, params.data() + s.offset});
    return t;
  }
  std::vector<Tensor> without(const std::string& name) {
    auto t = good();
    std::erase_if(t, [&](const Tensor& x) { return x.name == name; });
    return t;
  }
  // Writes `tensors` as `file`; loading must fail naming the file and `needle`, and leave the block alone.
  void expect_refused(const std::string& file, const std::vector<Tensor>& tensors, const std::string& needle) {
    std::string path = dir / file;
    write_safetensors(path, tensors);
    std::vector<float> block(table.total, -3.0f);
    EXPECT_KILN_ERROR(load_gpt2_weights(path, cfg, table, block.data()), file);
    EXPECT_KILN_ERROR(load_gpt2_weights(path, cfg, table, block.data()), needle);
    EXPECT_EQ(std::count(block.begin(), block.end(), -3.0f), std::ptrdiff_t(block.size())) << "block was touched";
  }
};

TEST_F(BadWeights, MissingTensor) {
  expect_refused("missing.safetensors", without("transformer.h.1.mlp.c_fc.bias"), "transformer.h.1.mlp.c_fc.bias");
}

TEST_F(BadWeights, WrongShapePrintsBothShapes) {
  auto t = without("transformer.h.0.attn.c_attn.weight");
  const ParamSpec* s = table.find("transformer.h.0.attn.c_attn.weight");
  t.push_back({s->name, DType::F32, {24, 8}, params.data() + s->offset});  // nn.Linear's [out, in]
  expect_refused("shape.safetensors", t, "[24, 8]");
  expect_refused("shape.safetensors", t, "[8, 24]");
}

TEST_F(BadWeights, UnexpectedTensor) {
  auto t = good();
  t.push_back({"transformer.h.2.ln_1.weight", DType::F32, {8}, params.data()});
  expect_refused("extra.safetensors", t, "transformer.h.2.ln_1.weight");
}

TEST_F(BadWeights, WrongDType) {
  auto t = without("transformer.ln_f.bias");
  std::vector<int32_t> ints(8, 1);
  t.push_back({"transformer.ln_f.bias", DType::I32, {8}, ints.data()});
  expect_refused("dtype.safetensors", t, "I32");
}

TEST_F(BadWeights, SameTensorWithAndWithoutPrefix) {
  auto t = good();
  t.push_back({"wpe.weight", DType::F32, {5, 8}, params.data()});
  expect_refused("twice.safetensors", t, "twice");
}

TEST_F(BadWeights, ConfigDoesNotMatchTheWeights) {
  std::string path = dir / "small.safetensors";
  write_safetensors(path, good());
  GPT2Config wider = cfg;
  wider.n_embd = 16;
  ParamTable wt = gpt2_table(wider);
  std::vector<float> block(wt.total);
  EXPECT_KILN_ERROR(load_gpt2_weights(path, wider, wt, block.data()), "small.safetensors");
  EXPECT_KILN_ERROR(load_gpt2_weights(path, wider, wt, block.data()), "[11, 16]");
}

TEST_F(BadWeights, MissingFiles) {
  EXPECT_KILN_ERROR(load_gpt2_weights(dir / "nowhere", cfg, table, params.data()), "nowhere");
  fs::create_directories(dir.path / "empty");
  EXPECT_KILN_ERROR(load_gpt2_weights(dir / "empty", cfg, table, params.data()), "model.safetensors");
  std::string lone = dir / "lone.safetensors";
  write_safetensors(lone, good());
  EXPECT_KILN_ERROR(load_gpt2_config_for(lone), "config.json");
  EXPECT_KILN_ERROR(load_gpt2_config_for(dir / "empty"), "config.json");
}

// --- Writing where it cannot be written: a clear error, and the checkpoint already there stays whole.

struct UnwritableCheckpoint : ::testing::Test {
  ScratchDir dir{"ckpt_unwritable"};
  GPT2Config cfg = tiny_config();
  ParamTable table = gpt2_table(cfg);
  std::vector<float> old_params = test::randn(table.total, 1);
  std::vector<float> new_params = test::randn(table.total, 2);
  std::string ckpt = dir / "ckpt";
  std::string old_weights, old_config;
  void SetUp() override {
    save_gpt2_checkpoint(ckpt, cfg, table, old_params.data(), DType::F32);
    old_weights = test::slurp(ckpt + "/model.safetensors");
    old_config = test::slurp(ckpt + "/config.json");
  }
  void expect_untouched() {
    EXPECT_EQ(test::slurp(ckpt + "/model.safetensors"), old_weights);
    EXPECT_EQ(test::slurp(ckpt + "/config.json"), old_config);
    auto it = fs::directory_iterator(ckpt);
    EXPECT_EQ(std::distance(fs::begin(it), fs::end(it)), 2) << "a temporary file was left behind";
  }
};

TEST_F(UnwritableCheckpoint, ReadOnlyDirectory) {
  // Root ignores permissions, so the save runs in a child that drops to an ordinary user first.
  fs::permissions(ckpt, fs::perms::owner_read | fs::perms::owner_exec | fs::perms::group_read | fs::perms::group_exec |
                            fs::perms::others_read | fs::perms::others_exec);
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(pipefd[0]);
    if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(3);
    int code = 1;
    std::string msg = "no error";
    try {
      save_gpt2_checkpoint(ckpt, cfg, table, new_params.data(), DType::F32);
    } catch (const Error& e) {
      msg = e.what();
      code = 0;
    } catch (...) {
      code = 2;
    }
    ssize_t w = write(pipefd[1], msg.data(), msg.size());
    (void)w;
    _exit(code);
  }
  close(pipefd[1]);
  std::string msg;
  char buf[256];
  for (ssize_t n; (n = read(pipefd[0], buf, sizeof(buf))) > 0;) msg.append(buf, size_t(n));
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  fs::permissions(ckpt, fs::perms::owner_all, fs::perm_options::add);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "child: " << msg;
  EXPECT_NE(msg.find(ckpt), std::string::npos) << msg;
  EXPECT_NE(msg.find("not writable"), std::string::npos) << msg;
  expect_untouched();
}

TEST_F(UnwritableCheckpoint, WriteFailsPartWay) {
  // A file-size limit makes the weight file fail mid-write, as a full disk would.
  struct rlimit old_limit;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  auto old_handler = signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old_limit;
  small.rlim_cur = 1024;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  bool threw = false;
  std::string msg;
  try {
    save_gpt2_checkpoint(ckpt, cfg, table, new_params.data(), DType::F32);
  } catch (const Error& e) {
    threw = true;
    msg = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old_limit);
  signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(threw);
  EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
  expect_untouched();
}

TEST_F(UnwritableCheckpoint, DirectoryBelowAFile) {
  std::string blocker = dir / "file";
  test::write_bytes(blocker, "x");
  EXPECT_KILN_ERROR(save_gpt2_checkpoint(blocker + "/ckpt", cfg, table, new_params.data(), DType::F32),
                    blocker + "/ckpt");
  EXPECT_KILN_ERROR(save_gpt2_checkpoint(ckpt, cfg, table, new_params.data(), DType::I32), "I32");
  expect_untouched();
}

}  // namespace
}  // namespace kiln
