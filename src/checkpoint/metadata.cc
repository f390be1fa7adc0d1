// Metadata: the JSON schemas of the tensor index and of the manifest (to and
// from text, with their version checks), and the manifest file's read and write.
#include "checkpoint/metadata.h"

#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cerrno>

#include <cstdint>
#include <limits>

#include "checkpoint/io.h"
#include "smp/config.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {
namespace internal {

namespace {

using Json = nlohmann::ordered_json;

constexpr const char* kIndexFormat = "smp.checkpoint";
constexpr const char* kManifestFormat = "smp.manifest";

/// A schema violation; turned into the error of the record it was found in.
struct SchemaError {
  std::string what;
};

const Json& member(const Json& obj, const char* key) {
  if (!obj.is_object()) throw SchemaError{std::string("expected an object holding '") + key + "'"};
  auto it = obj.find(key);
  if (it == obj.end()) throw SchemaError{std::string("missing key '") + key + "'"};
  return *it;
}

std::int64_t as_int(const Json& v, const char* what) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      throw SchemaError{std::string("'") + what + "' is out of range"};
    }
    return static_cast<std::int64_t>(u);
  }
  if (!v.is_number_integer()) {
    throw SchemaError{std::string("'") + what + "': expected an integer, got " + v.type_name()};
  }
  return v.get<std::int64_t>();
}

std::uint64_t as_uint(const Json& v, const char* what) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer()) throw SchemaError{std::string("'") + what + "' is negative"};
  throw SchemaError{std::string("'") + what + "': expected an integer, got " + v.type_name()};
}

const std::string& as_string(const Json& v, const char* what) {
  if (!v.is_string()) {
    throw SchemaError{std::string("'") + what + "': expected a string, got " + v.type_name()};
  }
  return v.get_ref<const std::string&>();
}

bool as_bool(const Json& v, const char* what) {
  if (!v.is_boolean()) {
    throw SchemaError{std::string("'") + what + "': expected a boolean, got " + v.type_name()};
  }
  return v.get<bool>();
}

const Json& as_array(const Json& v, const char* what) {
  if (!v.is_array()) {
    throw SchemaError{std::string("'") + what + "': expected an array, got " + v.type_name()};
  }
  return v;
}

std::vector<std::int64_t> int_list(const Json& v, const char* what) {
  std::vector<std::int64_t> out;
  for (const auto& x : as_array(v, what)) out.push_back(as_int(x, what));
  return out;
}

/// Parses JSON text; a syntax error becomes a SchemaError with nlohmann's text.
Json parse(const std::string& text) {
  try {
    return Json::parse(text);
  } catch (const Json::exception& e) {
    throw SchemaError{e.what()};
  }
}

std::string dump(const Json& doc) {
  // Invalid UTF-8 is written as U+FFFD instead of failing the save.
  return doc.dump(-1, ' ', false, Json::error_handler_t::replace);
}

}  // namespace

[[noreturn]] void throw_bad_index(const std::string& path, const std::string& why) {
  SMP_THROW(CorruptCheckpointError, "checkpoint file '", path, "' is damaged: its ", kIndexRecord,
            " record is malformed (", why,
            "); restore it from a good copy or write the checkpoint again");
}

std::string index_to_json(const Index& index) {
  Json doc = Json::object();
  doc["format"] = kIndexFormat;
  doc["format_version"] = index.format_version;
  doc["smp_version"] = index.smp_version.empty() ? std::string(SMP_VERSION) : index.smp_version;
  Json info = Json::object();
  for (const auto& kv : index.info) info[kv.first] = kv.second;
  doc["info"] = std::move(info);
  Json tensors = Json::array();
  for (const auto& t : index.tensors) {
    Json e = Json::object();
    e["path"] = t.path;
    e["key"] = t.key;
    e["dtype"] = dtype_name(t.dtype);
    e["shape"] = t.shape;
    e["stride"] = t.stride;
    e["storage_offset"] = t.storage_offset;
    e["offset"] = t.offset;
    e["nbytes"] = t.nbytes;
    e["crc32"] = t.crc32;
    if (t.shard) {
      Json sh = Json::object();
      sh["global_shape"] = t.shard->global_shape;
      sh["split_dim"] = t.shard->split_dim;
      sh["num_shards"] = t.shard->num_shards;
      sh["shard_index"] = t.shard->shard_index;
      e["shard"] = std::move(sh);
    }
    tensors.push_back(std::move(e));
  }
  doc["tensors"] = std::move(tensors);
  return dump(doc);
}

Index index_from_json(const std::string& text, const std::string& path) {
  Index index;
  try {
    const Json doc = parse(text);
    const std::string& format = as_string(member(doc, "format"), "format");
    if (format != kIndexFormat) {
      throw SchemaError{"format is '" + format + "', expected '" + kIndexFormat + "'"};
    }
    index.format_version = static_cast<int>(as_int(member(doc, "format_version"), "format_version"));
    SMP_CHECK(index.format_version <= kFormatVersion, CheckpointError, "checkpoint file '", path,
              "' has index format_version ", index.format_version, ", newer than this smp (",
              SMP_VERSION, ") reads (", kFormatVersion, "); upgrade smp to read it");
    if (doc.contains("smp_version")) {
      index.smp_version = as_string(doc["smp_version"], "smp_version");
    }
    if (doc.contains("info")) {
      const Json& info = doc["info"];
      if (!info.is_object()) throw SchemaError{"'info': expected an object"};
      for (const auto& kv : info.items()) index.info[kv.key()] = as_string(kv.value(), "info");
    }
    for (const auto& t : as_array(member(doc, "tensors"), "tensors")) {
      TensorEntry e;
      for (const auto& c : as_array(member(t, "path"), "path")) e.path.push_back(as_string(c, "path"));
      e.key = as_string(member(t, "key"), "key");
      e.dtype = dtype_from_name(as_string(member(t, "dtype"), "dtype"));
      e.shape = int_list(member(t, "shape"), "shape");
      e.stride = int_list(member(t, "stride"), "stride");
      if (e.shape.size() != e.stride.size()) throw SchemaError{"shape and stride differ in length"};
      e.storage_offset = as_int(member(t, "storage_offset"), "storage_offset");
      e.offset = as_uint(member(t, "offset"), "offset");
      e.nbytes = as_uint(member(t, "nbytes"), "nbytes");
      e.crc32 = static_cast<std::uint32_t>(as_uint(member(t, "crc32"), "crc32"));
      if (t.contains("shard")) {
        const Json& sh = t["shard"];
        ShardSpec s;
        s.global_shape = int_list(member(sh, "global_shape"), "global_shape");
        s.split_dim = static_cast<int>(as_int(member(sh, "split_dim"), "split_dim"));
        s.num_shards = static_cast<int>(as_int(member(sh, "num_shards"), "num_shards"));
        s.shard_index = static_cast<int>(as_int(member(sh, "shard_index"), "shard_index"));
        e.shard = std::move(s);
      }
      index.tensors.push_back(std::move(e));
    }
  } catch (const SchemaError& e) {
    throw_bad_index(path, e.what);
  }
  return index;
}

void check_part_identity(const Index& index, const std::string& path, int pp, int tp, int rdp,
                         const std::string& context) {
  auto check = [&](const char* key, int expected) {
    if (expected < 0) return;
    auto it = index.info.find(key);
    if (it == index.info.end()) return;
    const std::string want = std::to_string(expected);
    SMP_CHECK(it->second == want, CorruptCheckpointError, "checkpoint file '", path,
              "' is the part of ", key, " ", it->second, " (its index says so) but ", context,
              " expects ", key, " ", want,
              ": the part files were renamed, swapped or copied under wrong names, or the "
              "manifest is damaged. Restore the files under their saved names or save the "
              "checkpoint again");
  };
  check("pp_rank", pp);
  check("tp_rank", tp);
  check("rdp_rank", rdp);
}

}  // namespace internal

// ---- the index (declared in smp/checkpoint/format.h) ----------------------

bool TensorEntry::contiguous() const {
  std::int64_t expected = 1;
  for (std::size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && stride[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

const TensorEntry* Index::find(const std::vector<std::string>& path) const {
  for (const auto& e : tensors) {
    if (e.path == path) return &e;
  }
  return nullptr;
}

// ---- the manifest (declared in smp/checkpoint/manifest.h) -------------------

std::string Manifest::to_json() const {
  using internal::Json;
  Json doc = Json::object();
  doc["format"] = internal::kManifestFormat;
  doc["format_version"] = format_version;
  doc["smp_version"] = smp_version.empty() ? std::string(SMP_VERSION) : smp_version;
  doc["save_id"] = save_id;
  doc["partial"] = true;
  doc["v3"] = v3;
  doc["suffix"] = suffix;
  doc["world_size"] = world_size;
  doc["pp_size"] = pp_size;
  doc["tp_size"] = tp_size;
  doc["rdp_size"] = rdp_size;
  if (by_name) doc["by_name"] = true;
  Json list = Json::array();
  for (const auto& f : files) {
    Json e = Json::object();
    e["name"] = f.name;
    e["pp_rank"] = f.pp_rank;
    e["tp_rank"] = f.tp_rank;
    e["rdp_rank"] = f.rdp_rank ? Json(*f.rdp_rank) : Json(nullptr);
    e["world_rank"] = f.world_rank;
    e["bytes"] = f.bytes;
    e["smp_index"] = f.smp_index;
    list.push_back(std::move(e));
  }
  doc["files"] = std::move(list);
  // The checksum of the canonical text (the compact dump of every other key, in
  // this order), so that a damaged byte (a part's name or rank) is noticed.
  const std::string canonical = internal::dump(doc);
  doc["crc32"] = internal::crc32_update(0, canonical.data(), canonical.size());
  return internal::dump(doc);
}

Manifest Manifest::from_json(const std::string& text, const std::string& path) {
  using namespace internal;
  Manifest m;
  try {
    Json doc = parse(text);
    const std::string& format = as_string(member(doc, "format"), "format");
    SMP_CHECK(format == kManifestFormat, CorruptCheckpointError, "checkpoint manifest '", path,
              "' is not an smp manifest (format '", format,
              "'); remove it or restore it from a good copy");
    m.format_version = static_cast<int>(as_int(member(doc, "format_version"), "format_version"));
    SMP_CHECK(m.format_version <= kManifestVersion, CheckpointError, "checkpoint manifest '",
              path, "' has format_version ", m.format_version, ", newer than this smp (",
              SMP_VERSION, ") reads (", kManifestVersion, "); upgrade smp to read it");
    if (doc.is_object() && doc.contains("crc32")) {
      // Manifests written before the checksum existed have none and are accepted.
      const auto stored = as_uint(doc["crc32"], "crc32");
      doc.erase("crc32");
      const std::string canonical = dump(doc);
      const std::uint32_t computed = crc32_update(0, canonical.data(), canonical.size());
      SMP_CHECK(stored == computed, CorruptCheckpointError, "checkpoint manifest '", path,
                "' is damaged: its crc32 is ", stored, " but its content gives ", computed,
                " (a changed byte); restore it from a good copy or save the checkpoint again");
    }
    m.smp_version = as_string(member(doc, "smp_version"), "smp_version");
    m.save_id = as_string(member(doc, "save_id"), "save_id");
    m.v3 = as_bool(member(doc, "v3"), "v3");
    m.suffix = as_string(member(doc, "suffix"), "suffix");
    m.world_size = static_cast<int>(as_int(member(doc, "world_size"), "world_size"));
    m.pp_size = static_cast<int>(as_int(member(doc, "pp_size"), "pp_size"));
    m.tp_size = static_cast<int>(as_int(member(doc, "tp_size"), "tp_size"));
    m.rdp_size = static_cast<int>(as_int(member(doc, "rdp_size"), "rdp_size"));
    if (doc.contains("by_name")) m.by_name = as_bool(doc.at("by_name"), "by_name");
    for (const auto& e : as_array(member(doc, "files"), "files")) {
      ManifestFile f;
      f.name = as_string(member(e, "name"), "name");
      f.pp_rank = static_cast<int>(as_int(member(e, "pp_rank"), "pp_rank"));
      f.tp_rank = static_cast<int>(as_int(member(e, "tp_rank"), "tp_rank"));
      const Json& rdp = member(e, "rdp_rank");
      if (!rdp.is_null()) f.rdp_rank = static_cast<int>(as_int(rdp, "rdp_rank"));
      f.world_rank = static_cast<int>(as_int(member(e, "world_rank"), "world_rank"));
      f.bytes = as_uint(member(e, "bytes"), "bytes");
      f.smp_index = as_bool(member(e, "smp_index"), "smp_index");
      m.files.push_back(std::move(f));
    }
  } catch (const SchemaError& e) {
    SMP_THROW(CorruptCheckpointError, "checkpoint manifest '", path, "' is damaged (", e.what,
              "); restore it from a good copy or save the checkpoint again");
  }
  return m;
}

const ManifestFile* Manifest::find(int pp_rank, int tp_rank, int rdp_rank) const {
  for (const auto& f : files) {
    if (f.pp_rank != pp_rank || f.tp_rank != tp_rank) continue;
    if (f.rdp_rank && *f.rdp_rank != rdp_rank) continue;
    return &f;
  }
  return nullptr;
}

void write_manifest(const std::string& path, const Manifest& manifest) {
  internal::atomic_write(path, manifest.to_json(), /*fsync=*/true);
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
