#pragma once
// POSIX file helpers for tests. Tests avoid std::filesystem: the CUDA builds of
// libtorch export their own std::filesystem symbols, which can interpose over
// libstdc++'s in test executables and crash.

#include <dirent.h>
#include <ftw.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace smp::test {

/// A fresh directory under $TMPDIR (or /tmp); empty string on failure.
inline std::string make_temp_dir(const std::string& prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/" + prefix + "-XXXXXX";
  return ::mkdtemp(&pattern[0]) != nullptr ? pattern : std::string();
}

/// Removes a file or a directory tree; ignores errors.
inline void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p), 0; }, 16,
      FTW_DEPTH | FTW_PHYS);
}

inline bool path_exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

inline std::uint64_t file_size(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<std::uint64_t>(st.st_size) : 0;
}

inline bool make_dir(const std::string& path) { return ::mkdir(path.c_str(), 0755) == 0; }

/// Names of the entries of a directory (no "." and "..").
inline std::vector<std::string> list_dir(const std::string& path) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(path.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") out.push_back(n);
    }
    ::closedir(d);
  }
  return out;
}

/// Copies a regular file; false on failure.
inline bool copy_file(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  if (!in || !out) return false;
  out << in.rdbuf();
  return static_cast<bool>(out);
}

inline void remove_file(const std::string& path) { ::unlink(path.c_str()); }

/// Runs `body` and returns the message of the E it throws ("" if none; another
/// exception type propagates and fails the test).
template <typename E, typename F>
std::string error_of(F&& body) {
  try {
    body();
  } catch (const E& e) {
    return e.what();
  }
  return "";
}

}  // namespace smp::test
