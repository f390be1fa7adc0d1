#include "smp/checkpoint/manifest.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "checkpoint/zip.h"
#include "smp/config.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {

namespace {
std::string parent_dir(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}
}  // namespace

const ManifestFile* Manifest::find(int pp_rank, int tp_rank, int rdp_rank) const {
  for (const auto& f : files) {
    if (f.pp_rank != pp_rank || f.tp_rank != tp_rank) continue;
    if (f.rdp_rank && *f.rdp_rank != rdp_rank) continue;
    return &f;
  }
  return nullptr;
}

void write_manifest(const std::string& path, const Manifest& manifest) {
  const std::string text = manifest.to_json();
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  ::unlink(tmp.c_str());
  internal::File file = internal::File::create(tmp);
  try {
    file.pwrite_all(text.data(), text.size(), 0);
    file.sync();
    file.close();
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      internal::throw_syscall(path, "rename", errno, "check the directory's permissions");
    }
    internal::sync_directory(parent_dir(path));
  } catch (...) {
    file = internal::File();
    ::unlink(tmp.c_str());
    throw;
  }
}

std::optional<Manifest> read_manifest(const std::string& path) {
  if (::access(path.c_str(), F_OK) != 0 && errno == ENOENT) return std::nullopt;
  internal::File file = internal::File::open_read(path);
  std::string text(static_cast<std::size_t>(file.size()), '\0');
  if (!text.empty()) file.pread_exact(text.data(), text.size(), 0);
  return Manifest::from_json(text, path);
}

}  // namespace ckpt
}  // namespace smp
