// Load: resolves which file smp.load reads on this rank (manifest, save id,
// roll-forward of parts not renamed yet, layout check) and reads it, and the
// rendering of load stats.
#include "smp/checkpoint/save.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include "checkpoint/commit.h"
#include "checkpoint/io.h"
#include "checkpoint/metadata.h"
#include "smp/checkpoint/naming.h"
#include "smp/core/error.h"
#include "smp/core/logging.h"
#include "smp/runtime.h"

namespace smp {
namespace ckpt {

using internal::describe_rank;
using internal::join_dir;
using internal::kCallRule;
using internal::list_strings;
using internal::parent_dir;
using internal::check_part_identity;

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return internal::seconds_since(t0); }

}  // namespace

std::string describe(const LoadStats& s) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "smp.load '%s'%s: %.3f GB in %.3f s (%.2f GB/s); open/verify %.3f s, read %.3f s, "
                "deserialize %.3f s",
                s.file.c_str(), s.smp_index ? "" : " (torch.save file)", s.bytes / 1e9,
                s.seconds, s.gbps(), s.open_seconds, s.read_seconds, s.deserialize_seconds);
  return buf;
}

// ---- loading ---------------------------------------------------------------

namespace {

struct Resolved {
  std::string path;
  std::optional<Reader> reader;
  std::string save_id;
  std::uint64_t bytes = 0;  // the file's size, taken when it was opened
};

// Size of `p`, or of `alt` when `p` is gone (a temporary renamed to `alt`
// since it was opened: the same file).
std::uint64_t size_of(const std::string& p, const std::string& alt) {
  struct stat st {};
  if (::stat(p.c_str(), &st) == 0 || ::stat(alt.c_str(), &st) == 0) {
    return static_cast<std::uint64_t>(st.st_size);
  }
  return internal::File::open_read(p).size();  // throws, naming the file
}

[[noreturn]] void throw_missing_part(const std::string& f, const std::string& expected,
                                     const std::string& context) {
  SMP_THROW(CheckpointError, "checkpoint '", f, "' has no part for ",
            is_initialized() ? describe_rank(rank()) : std::string("this rank"), ": expected '",
            expected, "'", context, "; files found with that prefix: ",
            list_strings(files_with_prefix(f)),
            ". Check the path and that the checkpoint was saved by every rank that had to "
            "(", kCallRule, ")");
}

// The manifest of `f` (or of its alternate ".pt" name); its path in *path.
std::optional<Manifest> find_manifest(const std::string& f, std::string* path) {
  for (const std::string& base : {f, alternate_pt_name(f)}) {
    *path = manifest_file_name(base);
    std::optional<Manifest> m = read_manifest(*path);
    if (m) return m;
  }
  return std::nullopt;
}

// Completeness: every part the manifest lists exists (or its rolled-forward
// temporary does). Every rank checks every name (stat only), so every rank
// raises the same error, naming the first missing file, and none trains on
// half a checkpoint.
void check_complete(const Manifest& m, const std::string& manifest_path) {
  const std::string dir = parent_dir(manifest_path);
  std::vector<std::string> missing;
  for (const ManifestFile& e : m.files) {
    const std::string p = join_dir(dir, e.name);
    if (!file_exists(p) && !file_exists(temporary_file_name(p, m.save_id))) missing.push_back(p);
  }
  SMP_CHECK(missing.empty(), CheckpointError, "incomplete checkpoint: ", missing.size(), " of ",
            m.files.size(), " parts listed in the manifest '", manifest_path, "' (save id ",
            m.save_id, ") are missing: ", list_strings(missing),
            ". Every rank refuses to load it (no rank may train on part of a checkpoint); "
            "restore the missing files or load an earlier checkpoint");
}

// The one layout check: can this job's part be read from `m` as is?
bool layout_differs(const Manifest& m) {
  return m.by_name || m.pp_size != pp_size() || m.tp_size != tp_size() ||
         (m.v3 && m.rdp_size != rdp_size());
}

// This rank's part of the checkpoint that the manifest `m` commits.
Resolved resolve_committed(const std::string& f, const Manifest& m,
                           const std::string& manifest_path, int pp, int tp, int rdp) {
  Resolved out;
  SMP_CHECK(!m.by_name, CheckpointError, "checkpoint '", f, "' was rewritten offline by "
            "smp-checkpoint reshard (manifest '", manifest_path, "'): its parts hold tensors by "
            "name, not each rank's state; smp::ckpt::load reads a job's own parts only. Load "
            "it from Python with smp.load(f, partial=True), which reads it by name");
  SMP_CHECK(!layout_differs(m),
            CheckpointError, "checkpoint '", f, "' was saved with pipeline_parallel_degree ",
            m.pp_size, ", tensor_parallel_degree ", m.tp_size,
            m.v3 ? detail::str(" and rdp_size ", m.rdp_size, " (sharded optimizer state)")
                 : std::string(),
            " (manifest '", manifest_path, "') but this job has ", pp_size(), ", ", tp_size(),
            m.v3 ? detail::str(" and rdp_size ", rdp_size()) : std::string(),
            "; smp::ckpt::load reads a partial checkpoint only on the layout it was saved "
            "with. Load it from Python with smp.load(f, partial=True), which reshards it "
            "(docs/api.md, \"Resharding\"), or with the saved degrees");
  const ManifestFile* entry = m.find(pp, tp, rdp);
  SMP_CHECK(entry != nullptr, CorruptCheckpointError, "checkpoint manifest '", manifest_path,
            "' lists no part for pp_rank ", pp, ", tp_rank ", tp, ", rdp_rank ", rdp,
            " although its layout matches this job; restore it from a good copy or save again");
  const std::string dir = parent_dir(manifest_path);
  check_complete(m, manifest_path);
  const std::string path = join_dir(dir, entry->name);
  const std::string rolled = temporary_file_name(path, m.save_id);
  out.save_id = m.save_id;
  // Part identity: the ranks the part's own index records must be this rank's
  // (which the manifest entry, found by them, names too).
  auto use = [&](const std::string& p, Reader reader) -> Resolved {
    if (reader.has_index()) {
      check_part_identity(reader.index(), p, pp, tp, entry->rdp_rank ? rdp : -1,
                          detail::str("the manifest '", manifest_path, "' (entry '",
                                      entry->name, "') and this rank (",
                                      describe_rank(rank()), ")"));
    }
    out.path = p;
    out.bytes = size_of(p, path);
    out.reader.emplace(std::move(reader));
    return std::move(out);
  };
  if (!file_exists(path)) {
    if (file_exists(rolled)) return use(rolled, Reader(rolled));
    throw_missing_part(f, path, detail::str(" (listed in manifest '", manifest_path,
                                            "', save id ", m.save_id, ")"));
  }
  Reader reader(path);
  std::string file_id;
  if (reader.has_index()) {
    auto it = reader.index().info.find("save_id");
    if (it != reader.index().info.end()) file_id = it->second;
  }
  const bool matches = entry->smp_index
                           ? file_id == m.save_id
                           : (!reader.has_index() && [&] {
                               return internal::File::open_read(path).size() == entry->bytes;
                             }());
  if (!matches) {
    if (file_exists(rolled)) {  // committed, rename not done yet: roll forward
      return use(rolled, Reader(rolled));
    }
    SMP_THROW(CheckpointError, "mixed checkpoint: '", path, "' belongs to save id '",
              file_id.empty() ? std::string("<none: not written by this save>") : file_id,
              "' but the manifest '", manifest_path, "' names save id '", m.save_id,
              "' for it; the files come from different saves (copied together, or written "
              "by a save that did not complete). Restore the checkpoint from one save or "
              "save it again");
  }
  return use(path, std::move(reader));
}

Resolved resolve(const std::string& f, bool partial) {
  Resolved out;
  if (!partial) {
    out.path = f;
    out.reader.emplace(f);
    return out;
  }
  SMP_CHECK(is_initialized(), StateError, "smp.load('", f, "', partial=True) needs smp.init() "
            "first (this rank's part is named after its pp/tp ranks)");
  const int pp = pp_rank(), tp = tp_rank(), rdp = rdp_rank();

  // A save to this name may commit while we look (a new manifest, parts
  // renamed from their temporaries): we read only what a manifest commits and
  // start again when it changed under us, so a reader racing a save gets the
  // old checkpoint or the new one, never a mix or a vanished temporary.
  for (int attempt = 1;; ++attempt) {
    std::string manifest_path;
    const std::optional<Manifest> manifest = find_manifest(f, &manifest_path);
    if (!manifest) break;
    try {
      return resolve_committed(f, *manifest, manifest_path, pp, tp, rdp);
    } catch (const CheckpointError&) {
      std::string again_path;
      std::optional<Manifest> again;
      try {
        again = find_manifest(f, &again_path);
      } catch (const std::exception&) {
      }
      const bool moved = again && again->save_id != manifest->save_id;
      // Once more in any case: a part renamed between two looks at it.
      if (attempt >= 20 || !(moved || attempt == 1)) throw;
      SMP_LOG(kDebug, "smp.load('", f, "'): the checkpoint changed while resolving it (save id ",
              manifest->save_id, " -> ", again ? again->save_id : std::string("none"),
              "); trying again");
      std::this_thread::sleep_for(std::chrono::milliseconds(attempt));
    }
  }

  for (const auto& c : partial_candidates(f, pp, tp, rdp)) {
    if (!file_exists(c)) continue;
    Reader reader(c);
    if (reader.has_index()) {
      check_part_identity(reader.index(), c, pp, tp, rdp,
                          detail::str("its name and this rank (", describe_rank(rank()), ")"));
    }
    if (reader.has_index() && reader.index().info.count("save_id") != 0) {
      SMP_THROW(CheckpointError, "incomplete checkpoint (no manifest; a save was interrupted): '",
                c, "' was written by smp.save (save id ", reader.index().info.at("save_id"),
                ") but its manifest '", manifest_file_name(f),
                "' does not exist, so the save never committed. Load an earlier checkpoint or "
                "save again");
    }
    out.path = c;
    out.reader.emplace(std::move(reader));
    return out;
  }
  const auto found = files_with_prefix(f);
  const bool tmp = std::any_of(found.begin(), found.end(), [](const std::string& p) {
    return p.find(".tmp-") != std::string::npos;
  });
  if (tmp) {
    SMP_THROW(CheckpointError, "incomplete checkpoint (no manifest; a save was interrupted): ",
              "only temporary parts of '", f, "' exist (", list_strings(found),
              "); load an earlier checkpoint or save again");
  }
  throw_missing_part(f, partial_candidates(f, pp, tp, rdp).back(),
                     detail::str(" (tried ", list_strings(partial_candidates(f, pp, tp, rdp)),
                                 ")"));
}

}  // namespace

bool saved_layout_differs(const std::string& f) {
  if (!is_initialized()) return false;
  std::string path;
  const std::optional<Manifest> m = find_manifest(f, &path);
  return m && layout_differs(*m);
}

std::string resolve_load_path(const std::string& f, bool partial, LoadStats* stats) {
  const auto t0 = Clock::now();
  Resolved r = resolve(f, partial);
  if (stats != nullptr) {
    stats->file = r.path;
    stats->smp_index = r.reader->has_index();
    stats->save_id = r.save_id;
    stats->bytes = r.bytes ? r.bytes : internal::File::open_read(r.path).size();
    stats->open_seconds = since(t0);
  }
  return r.path;
}

Value load(const std::string& f, const LoadOptions& options, LoadStats* stats) {
  wait_for_pending_saves();  // read what this process saved last
  const auto t0 = Clock::now();
  LoadStats st;
  Resolved r = resolve(f, options.partial);
  st.file = r.path;
  st.smp_index = r.reader->has_index();
  st.save_id = r.save_id;
  st.open_seconds = since(t0);
  ReadStats rs;
  Value v = r.reader->read_object(options.read, &rs);
  st.bytes = r.bytes ? r.bytes : internal::File::open_read(r.path).size();
  st.read_seconds = rs.read_seconds;
  st.profile = rs.profile;
  st.deserialize_seconds = rs.unpickle_seconds + rs.build_seconds;
  st.seconds = since(t0);
  SMP_LOG(kInfo, describe(st));
  if (stats != nullptr) *stats = st;
  return v;
}

}  // namespace ckpt
}  // namespace smp
