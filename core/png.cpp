#include "core/png.h"

#include <png.h>

#include <cstring>

#include "core/error.h"
#include "core/file_io.h"

namespace kiln {

Image8 read_png(const std::string& path) {
  png_image im;
  std::memset(&im, 0, sizeof im);
  im.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&im, path.c_str()))
    fail("png ", path, ": ", im.message[0] ? im.message : "cannot read");
  Image8 out;
  out.channels = (im.format & PNG_FORMAT_FLAG_COLOR) ? 3 : 1;
  im.format = out.channels == 3 ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
  out.width = int(im.width);
  out.height = int(im.height);
  out.pixels.resize(PNG_IMAGE_SIZE(im));
  // background null: alpha is composited onto black (there is no natural choice; our data sets have none).
  png_color black = {0, 0, 0};
  if (!png_image_finish_read(&im, &black, out.pixels.data(), 0, nullptr)) {
    std::string msg = im.message;
    png_image_free(&im);
    fail("png ", path, ": ", msg);
  }
  return out;
}

void write_png(const std::string& path, const Image8& img) {
  KILN_CHECK(img.channels == 1 || img.channels == 3, "png ", path, ": channels must be 1 or 3, got ", img.channels);
  KILN_CHECK(img.pixels.size() == size_t(img.width) * img.height * img.channels, "png ", path,
             ": pixel buffer size does not match ", img.width, "x", img.height, "x", img.channels);
  png_image im;
  std::memset(&im, 0, sizeof im);
  im.version = PNG_IMAGE_VERSION;
  im.width = png_uint_32(img.width);
  im.height = png_uint_32(img.height);
  im.format = img.channels == 3 ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
  png_alloc_size_t bytes = 0;
  // Encode to memory first (size query, then the data), then one atomic file write.
  if (!png_image_write_to_memory(&im, nullptr, &bytes, 0, img.pixels.data(), 0, nullptr))
    fail("png ", path, ": ", im.message);
  std::string buf(bytes, '\0');
  if (!png_image_write_to_memory(&im, buf.data(), &bytes, 0, img.pixels.data(), 0, nullptr))
    fail("png ", path, ": ", im.message);
  buf.resize(bytes);
  write_file_atomic(path, buf);
}

}  // namespace kiln
