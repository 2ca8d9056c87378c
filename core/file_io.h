// Files: read-only memory maps, whole-file reads, and atomic writes (temporary file in the same
// directory, fsync, rename, fsync of the directory) so a crash never leaves a half-written file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace kiln {

class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);  // throws kiln::Error naming the path
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept { *this = std::move(o); }
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

std::string read_file(const std::string& path);

// Calls write(fd) to fill a temporary file, then fsyncs and renames it over `path`.
// On any failure the temporary is removed and the old file (if any) is untouched.
void write_file_atomic(const std::string& path, const std::function<void(int fd)>& write);
void write_file_atomic(const std::string& path, std::string_view contents);
// Writes all bytes to fd or throws (naming `path`).
void write_all(int fd, const void* data, size_t n, const std::string& path);

// Makes a directory (and parents); throws naming the path if it cannot be created or is not writable.
void make_dirs(const std::string& path);
bool file_exists(const std::string& path);
// Sorted list of files matching a glob pattern (or the path itself if it has no wildcard).
std::vector<std::string> expand_glob(const std::string& pattern);

}  // namespace kiln
