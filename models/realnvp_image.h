// The RealNVP flow as an image model (models/image_model.h, task density): the factory's row for model_type
// "realnvp" calls this.
#pragma once
#include <memory>
#include <string>

#include "models/image_model.h"

namespace kiln {

std::unique_ptr<ImageModel> make_realnvp_image(const std::string& config_json, const std::string& where,
                                               const ImageModelOptions& opt);

}  // namespace kiln
