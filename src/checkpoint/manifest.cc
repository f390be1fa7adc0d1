#include "smp/checkpoint/manifest.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "checkpoint/zip.h"
#include "core/json.h"
#include "smp/config.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {

namespace {
constexpr const char* kManifestFormat = "smp.manifest";

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

std::string Manifest::to_json() const {
  json::Value doc = json::Value::object();
  doc.set("format", kManifestFormat);
  doc.set("format_version", format_version);
  doc.set("smp_version", smp_version.empty() ? std::string(SMP_VERSION) : smp_version);
  doc.set("save_id", save_id);
  doc.set("partial", true);
  doc.set("v3", v3);
  doc.set("suffix", suffix);
  doc.set("world_size", world_size);
  doc.set("pp_size", pp_size);
  doc.set("tp_size", tp_size);
  doc.set("rdp_size", rdp_size);
  json::Value list = json::Value::array();
  for (const auto& f : files) {
    json::Value e = json::Value::object();
    e.set("name", f.name);
    e.set("pp_rank", f.pp_rank);
    e.set("tp_rank", f.tp_rank);
    e.set("rdp_rank", f.rdp_rank ? json::Value(*f.rdp_rank) : json::Value());
    e.set("world_rank", f.world_rank);
    e.set("bytes", json::Value::from_uint64(f.bytes));
    e.set("smp_index", f.smp_index);
    list.push_back(std::move(e));
  }
  doc.set("files", std::move(list));
  return doc.dump();
}

Manifest Manifest::from_json(const std::string& text, const std::string& path) {
  Manifest m;
  try {
    const json::Value doc = json::parse(text);
    SMP_CHECK(doc.at("format").as_string() == kManifestFormat, CorruptCheckpointError,
              "checkpoint manifest '", path, "' is not an smp manifest (format '",
              doc.at("format").as_string(), "'); remove it or restore it from a good copy");
    m.format_version = static_cast<int>(doc.at("format_version").as_int());
    SMP_CHECK(m.format_version <= kManifestVersion, CheckpointError, "checkpoint manifest '",
              path, "' has format_version ", m.format_version, ", newer than this smp (",
              SMP_VERSION, ") reads (", kManifestVersion, "); upgrade smp to read it");
    m.smp_version = doc.at("smp_version").as_string();
    m.save_id = doc.at("save_id").as_string();
    m.v3 = doc.at("v3").as_bool();
    m.suffix = doc.at("suffix").as_string();
    m.world_size = static_cast<int>(doc.at("world_size").as_int());
    m.pp_size = static_cast<int>(doc.at("pp_size").as_int());
    m.tp_size = static_cast<int>(doc.at("tp_size").as_int());
    m.rdp_size = static_cast<int>(doc.at("rdp_size").as_int());
    for (const auto& e : doc.at("files").as_array()) {
      ManifestFile f;
      f.name = e.at("name").as_string();
      f.pp_rank = static_cast<int>(e.at("pp_rank").as_int());
      f.tp_rank = static_cast<int>(e.at("tp_rank").as_int());
      if (!e.at("rdp_rank").is_null()) f.rdp_rank = static_cast<int>(e.at("rdp_rank").as_int());
      f.world_rank = static_cast<int>(e.at("world_rank").as_int());
      f.bytes = e.at("bytes").as_uint();
      f.smp_index = e.at("smp_index").as_bool();
      m.files.push_back(std::move(f));
    }
  } catch (const json::JsonError& e) {
    SMP_THROW(CorruptCheckpointError, "checkpoint manifest '", path, "' is damaged (", e.what(),
              "); restore it from a good copy or save the checkpoint again");
  }
  return m;
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
