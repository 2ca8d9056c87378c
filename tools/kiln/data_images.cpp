// kiln data prepare-images: Fashion-MNIST idx files and PNG folders -> image shards (train/images.h).
// Extends the `data` subcommand that tools/kiln/data.cpp creates (order 1 runs after it).
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "tools/kiln/command.h"
#include "train/images.h"

namespace {

kiln::cli::Command data_images_cmd(
    "data prepare-images",
    [](CLI::App& root) {
      CLI::App* data = root.get_subcommand("data");
      auto opt = std::make_shared<kiln::ImagePrepareOptions>();
      auto* c = data->add_subcommand(
          "prepare-images",
          "Images and labels (idx files, gzipped or not, e.g. /usr/share/datasets/fashion-mnist; or PNG folders "
          "DIR/<class>/*.png) into train/val/test_NNNNNN.safetensors shards: images F32 [N, C, H, W] scaled to "
          "[-1, 1], labels I32 [N]; images.json describes the set (format: train/images.h)");
      c->add_option("--idx", opt->idx, "IMAGES:LABELS idx file pair for the train pool (repeatable)");
      c->add_option("--png-dir", opt->png_dirs, "Folder of class folders of PNG files for the train pool (repeatable)");
      c->add_option("--test-idx", opt->test_idx, "IMAGES:LABELS idx file pair for the test split (repeatable)");
      c->add_option("--test-png-dir", opt->test_png_dirs, "PNG class folders for the test split (repeatable)");
      c->add_option("--out", opt->out, "Output directory (must not hold shards yet)")->required();
      c->add_option("--classes", opt->classes,
                    "Number of classes; labels must be below it (0: from the inputs)")
          ->capture_default_str();
      c->add_option("--val-fraction", opt->val_fraction, "Fraction of the train pool held out as val")
          ->capture_default_str();
      c->add_option("--shard-images", opt->shard_images, "Images per shard")->capture_default_str();
      c->add_option("--seed", opt->seed, "Seed of the per-image held-out choice")->capture_default_str();
      c->callback([opt] {
        const auto t0 = std::chrono::steady_clock::now();
        const kiln::ImagePrepareStats st = kiln::prepare_images(*opt);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        nlohmann::json j = {{"out", opt->out},     {"train", st.train},       {"val", st.val},
                            {"test", st.test},     {"classes", st.classes},   {"channels", st.channels},
                            {"height", st.height}, {"width", st.width},       {"shards", st.shards},
                            {"seconds", secs}};
        std::printf("%s\n", j.dump().c_str());
      });
    },
    /*order=*/1);

}  // namespace
