// PNG files through libpng's simplified API: 8-bit grayscale or RGB images in and out.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

struct Image8 {
  int width = 0, height = 0, channels = 0;  // channels: 1 (gray) or 3 (RGB); alpha is composited onto black
  std::vector<uint8_t> pixels;              // [height][width][channels]
};

// Reads a PNG as gray (when the file has no colour) or RGB; throws kiln::Error naming the file.
Image8 read_png(const std::string& path);
// Writes atomically; throws naming the file.
void write_png(const std::string& path, const Image8& img);

}  // namespace kiln
