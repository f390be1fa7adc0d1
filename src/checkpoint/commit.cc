// Commit: the protocol of a collective smp.save (SaveSession: save id,
// rendezvous, manifest as the commit point, one rename per part, cleanup),
// save() on top of it, and the rendering of save stats.
#include "smp/checkpoint/save.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>
#include <typeinfo>

#include "checkpoint/commit.h"
#include "checkpoint/io.h"
#include "checkpoint/lock.h"
#include "runtime_store.h"
#include "smp/checkpoint/naming.h"
#include "smp/config.h"
#include "smp/core/error.h"
#include "smp/core/logging.h"
#include "smp/runtime.h"

namespace smp {
namespace ckpt {

namespace internal {

const char* const kCallRule =
    "smp.save(partial=True) must be called by every rank with rdp_rank()==0 (not "
    "dp_rank()==0); with shard_optimizer_state every rank must call it";

/// "rank 3 (pp_rank 0, tp_rank 1, rdp_rank 1, dp_rank 3)"
std::string describe_rank(int r) {
  const Topology& t = topology();
  return detail::str("rank ", r, " (pp_rank ", t.pp_rank(r), ", tp_rank ", t.tp_rank(r),
                     ", rdp_rank ", t.rdp_rank(r), ", dp_rank ", t.dp_rank(r), ")");
}

std::string describe_ranks(const std::vector<int>& ranks) {
  std::string out;
  for (std::size_t i = 0; i < ranks.size(); ++i) out += (i ? ", " : "") + describe_rank(ranks[i]);
  return out;
}

std::string list_strings(const std::vector<std::string>& v) {
  if (v.empty()) return "none";
  std::string out;
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", '" : "'") + v[i] + "'";
  return out;
}

}  // namespace internal

using internal::base_name;
using internal::describe_rank;
using internal::describe_ranks;
using internal::kCallRule;

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return internal::seconds_since(t0); }

std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string hex(std::uint64_t v, int digits = 16) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%0*llx", digits, static_cast<unsigned long long>(v));
  return buf;
}

std::string new_save_id() { return hex(internal::random_u64()); }

std::string list_ints(const std::vector<int>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

std::string store_get(c10d::Store& store, const std::string& key) {
  const auto v = store.get(key);
  return std::string(v.begin(), v.end());
}

void store_set(c10d::Store& store, const std::string& key, const std::string& value) {
  store.set(key, std::vector<std::uint8_t>(value.begin(), value.end()));
}

bool store_has(c10d::Store& store, const std::string& key) { return store.check({key}); }

/// Save sequence numbers per (file, participants): every participant of the
/// same saves in the same order computes the same keys without talking.
std::mutex g_seq_mutex;
std::map<std::string, long> g_seq;

/// Parses "<stem>_<d>_<d>[_<d>][.pt]" (exactly); true when `name` has that shape.
bool is_part_name(const std::string& name, const std::string& stem) {
  if (name.size() <= stem.size() + 1 || name.compare(0, stem.size(), stem) != 0 ||
      name[stem.size()] != '_') {
    return false;
  }
  std::string rest = name.substr(stem.size());
  if (rest.size() > 3 && rest.compare(rest.size() - 3, 3, ".pt") == 0) {
    rest.resize(rest.size() - 3);
  }
  int groups = 0;
  std::size_t i = 0;
  while (i < rest.size()) {
    if (rest[i] != '_') return false;
    std::size_t j = i + 1;
    while (j < rest.size() && rest[j] >= '0' && rest[j] <= '9') ++j;
    if (j == i + 1) return false;
    ++groups;
    i = j;
  }
  return groups == 2 || groups == 3;
}

}  // namespace

double default_checkpoint_timeout_s() {
  const char* env = std::getenv("SMP_CHECKPOINT_TIMEOUT");
  if (env == nullptr || *env == '\0') return 60.0;
  char* end = nullptr;
  const double v = std::strtod(env, &end);
  SMP_CHECK(end != env && *end == '\0' && v > 0, ConfigError, "SMP_CHECKPOINT_TIMEOUT is '", env,
            "'; set it to a positive number of seconds (default 60)");
  return v;
}

std::string describe(const SaveStats& s) {
  if (s.skipped) return "smp.save skipped (replica: rdp_rank > 0 of a partial save)";
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "smp.save '%s' (save id %s): %.3f GB in %.3f s (%.2f GB/s); serialize %.3f s, "
                "write %.3f s, fsync %.3f s, rendezvous %.3f s, commit %.3f s",
                s.file.c_str(), s.save_id.c_str(), s.bytes / 1e9, s.seconds, s.gbps(),
                s.serialize_seconds, s.write_seconds, s.fsync_seconds, s.rendezvous_seconds,
                s.commit_seconds);
  return buf;
}


// ---- saving ----------------------------------------------------------------

struct SaveSession::Impl {
  std::string f;
  SaveOptions options;
  bool skipped = false;
  bool finished = false;
  bool aborted = false;
  double timeout_s = 60;
  std::vector<int> participants;
  int me = 0;
  int lowest = 0;
  c10::intrusive_ptr<c10d::Store> store;
  std::string base;  // store key prefix of this save
  std::vector<std::string> keys_set;
  std::string save_id;
  std::string path;
  std::string tmp;
  PartName part;
  double rendezvous_seconds = 0;
  /// Held by the lowest participant (the caller of a full save) from before the
  /// save id is drawn until the save completes: saves to one name serialise.
  internal::SaveLock lock;

  bool is_lowest() const { return me == lowest; }

  void set(const std::string& key, const std::string& value) {
    store_set(*store, base + key, value);
    keys_set.push_back(base + key);
  }

  /// Waits until `key` exists for every participant in `ranks` ("<key>/<rank>"),
  /// or `single` exists; returns the ranks still missing at the deadline.
  /// Throws the published message when "abort" appears.
  std::vector<int> wait_all(const std::string& key, const std::vector<int>& ranks,
                            double seconds) {
    const auto t0 = Clock::now();
    const auto deadline = t0 + std::chrono::duration<double>(seconds);
    std::vector<int> missing = ranks;
    auto sleep = std::chrono::milliseconds(1);
    while (true) {
      std::vector<int> still;
      for (int r : missing) {
        if (!store_has(*store, base + key + "/" + std::to_string(r))) still.push_back(r);
      }
      missing.swap(still);
      if (missing.empty() || Clock::now() >= deadline) break;
      check_abort();
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::milliseconds(50));
    }
    rendezvous_seconds += since(t0);
    return missing;
  }

  /// Waits for one key; false at the deadline.
  bool wait_one(const std::string& key, double seconds) {
    const auto t0 = Clock::now();
    const auto deadline = t0 + std::chrono::duration<double>(seconds);
    auto sleep = std::chrono::milliseconds(1);
    bool ok = false;
    while (true) {
      if (store_has(*store, base + key)) {
        ok = true;
        break;
      }
      check_abort();
      if (Clock::now() >= deadline) break;
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::milliseconds(50));
    }
    rendezvous_seconds += since(t0);
    return ok;
  }

  void check_abort() {
    if (store_has(*store, base + "abort")) {
      const std::string why = store_get(*store, base + "abort");
      remove_tmp();
      aborted = true;
      SMP_THROW(CheckpointError, "smp.save of '", f, "' failed on rank ", me, ": ", why);
    }
  }

  void remove_tmp() {
    if (tmp.empty()) return;
    // A manifest naming this save on disk has committed it (the lowest may have
    // died after writing it, taking the store down): readers roll forward from
    // this temporary, so it must stay.
    if (options.partial) {
      try {
        if (auto m = read_manifest(manifest_file_name(f)); m && m->save_id == save_id) return;
      } catch (const std::exception&) {
      }
    }
    ::unlink(tmp.c_str());
  }

  /// Removes "<path>.tmp-*" left by earlier interrupted saves of this part.
  /// Called under the lock after this save's rename: no other save of this name
  /// is writing (its lowest participant would hold the lock), so every other
  /// temporary belongs to a save that died.
  void remove_leftovers() const {
    const std::string pre = path + ".tmp-";
    for (const auto& p : files_with_prefix(path, 1024)) {
      if (p.compare(0, pre.size(), pre) == 0 && p != tmp) ::unlink(p.c_str());
    }
  }

  /// Who never called save, and who called but did not finish a stage.
  std::string missing_text(const std::vector<int>& missing, const char* stage,
                           double waited) const {
    std::vector<int> never, late;
    for (int r : missing) {
      (store_has(*store, base + "begin/" + std::to_string(r)) ? late : never).push_back(r);
    }
    std::string text = detail::str("smp.save(partial=True) of '", f, "' timed out after ",
                                   waited, " s waiting for ", missing.size(), " of ",
                                   participants.size(), " participants ", stage, ". ");
    if (!never.empty()) {
      text += "Ranks that never called smp.save: " + describe_ranks(never) + ". ";
    }
    if (!late.empty()) {
      text += "Ranks that called smp.save but did not finish writing: " + describe_ranks(late) +
              ". ";
    }
    text += detail::str("Expected participants (world ranks): ", list_ints(participants), " (",
                        options.v3 ? "WORLD, because v3 / shard_optimizer_state" : "MP_GROUP",
                        "). Likely cause: ", kCallRule,
                        ". The previous checkpoint under this name is unchanged; raise "
                        "SMP_CHECKPOINT_TIMEOUT if a participant is only slow");
    return text;
  }

  void abort_all(const std::string& why) {
    if (aborted || store == nullptr) return;
    aborted = true;
    try {
      store_set(*store, base + "abort", why);
    } catch (const std::exception&) {
    }
    remove_tmp();
  }
};

SaveSession::SaveSession(const std::string& f, const SaveOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  SMP_CHECK(!f.empty(), CheckpointError, "smp.save: the checkpoint path is empty; give a file name");
  im.f = f;
  im.options = options;
  im.timeout_s = options.timeout_s > 0 ? options.timeout_s : default_checkpoint_timeout_s();
  if (!options.partial) {
    im.lock.acquire(internal::lock_file_name(f), im.timeout_s,
                    detail::str("smp.save('", f, "', partial=False)"));
    im.save_id = new_save_id();
    im.path = f;
    im.tmp = temporary_file_name(f, im.save_id);
    im.me = is_initialized() ? rank() : 0;
    im.lowest = im.me;
    im.participants = {im.me};
    return;
  }
  SMP_CHECK(is_initialized(), StateError,
            "smp.save(partial=True) of '", f, "' needs smp.init() first (the file names carry "
            "the pp/tp ranks); call smp.init() or save with partial=False");
  im.me = rank();
  if (!options.v3 && rdp_rank() != 0) {
    im.skipped = true;
    SMP_LOG(kInfo, "smp.save('", f, "', partial=True) on rdp_rank ", rdp_rank(),
            ": skipped, the ranks with rdp_rank 0 write the replicated files");
    return;
  }
  im.participants = options.v3 ? group_members(CommGroup::kWorld)
                               : group_members(CommGroup::kMpGroup);
  std::sort(im.participants.begin(), im.participants.end());
  im.lowest = im.participants.front();
  im.part = PartName{pp_rank(), tp_rank(),
                     options.v3 ? std::optional<int>(rdp_rank()) : std::nullopt};
  im.path = partial_file_name(f, im.part, options.suffix);
  im.store = detail::store();

  const std::string key = f + "|" + list_ints(im.participants) + "|" + (options.v3 ? "v3" : "v2");
  long seq;
  {
    std::lock_guard<std::mutex> lock(g_seq_mutex);
    seq = ++g_seq[key];
  }
  im.base = detail::str(detail::store_key_prefix(), "ckpt/", hex(fnv1a(key)), "/", seq, "/");
  im.set("begin/" + std::to_string(im.me), "1");
  if (im.is_lowest()) {
    try {
      im.lock.acquire(internal::lock_file_name(f), im.timeout_s,
                      detail::str("smp.save('", f, "', partial=True)"));
    } catch (const std::exception& e) {
      im.abort_all(e.what());  // the other participants raise the same message
      im.finished = true;
      throw;
    }
    im.save_id = new_save_id();
    im.set("id", im.save_id);
  } else {
    if (!im.wait_one("id", im.timeout_s)) {
      const std::string why = im.missing_text({im.lowest}, "to start the save (the lowest "
                                              "participant publishes the save id)",
                                              im.timeout_s);
      SMP_THROW(CheckpointError, why);
    }
    im.save_id = store_get(*im.store, im.base + "id");
  }
  im.tmp = temporary_file_name(im.path, im.save_id);
}

SaveSession::~SaveSession() {
  if (impl_ && !impl_->finished && !impl_->skipped) {
    if (impl_->options.partial) {
      impl_->abort_all(detail::str("rank ", impl_->me, " abandoned the save (an error while "
                                   "writing its file)"));
    }
    impl_->remove_tmp();
  }
}

bool SaveSession::skipped() const { return impl_->skipped; }
const std::string& SaveSession::save_id() const { return impl_->save_id; }
const std::string& SaveSession::path() const { return impl_->path; }
const std::string& SaveSession::temporary_path() const { return impl_->tmp; }

WriteOptions SaveSession::write_options() const {
  const Impl& im = *impl_;
  WriteOptions w = im.options.write;
  w.atomic = false;  // temporary_path() is the temporary: commit() renames it, once
  w.info["save_id"] = im.save_id;
  w.info["partial"] = im.options.partial ? "true" : "false";
  if (im.options.partial) {
    w.info["v3"] = im.options.v3 ? "true" : "false";
    w.info["pp_rank"] = std::to_string(im.part.pp_rank);
    w.info["tp_rank"] = std::to_string(im.part.tp_rank);
    if (im.part.rdp_rank) w.info["rdp_rank"] = std::to_string(*im.part.rdp_rank);
    w.info["world_size"] = std::to_string(size());
    w.info["pp_size"] = std::to_string(pp_size());
    w.info["tp_size"] = std::to_string(tp_size());
    w.info["rdp_size"] = std::to_string(rdp_size());
  }
  return w;
}

void SaveSession::abort(const std::string& why) {
  Impl& im = *impl_;
  if (im.skipped || im.finished) return;
  im.finished = true;
  if (im.options.partial && im.store) {
    try {
      store_set(*im.store, im.base + "written/" + std::to_string(im.me), "error " + why);
    } catch (const std::exception&) {
    }
    im.abort_all(why);
  }
  im.remove_tmp();
}

SaveStats SaveSession::commit(const WriteStats& written, bool smp_index) {
  Impl& im = *impl_;
  SaveStats st;
  st.skipped = im.skipped;
  if (im.skipped) {
    im.finished = true;
    return st;
  }
  const auto t0 = Clock::now();
  st.file = im.path;
  st.save_id = im.save_id;
  st.bytes = written.bytes;
  st.serialize_seconds = written.pickle_seconds + written.copy_seconds;
  st.write_seconds = written.write_seconds;
  st.fsync_seconds = written.sync_seconds;
  st.profile = written.profile;
  auto lap = [&st](const char* key, Clock::time_point& since_t) {
    const auto now = Clock::now();
    st.profile[key] += std::chrono::duration<double>(now - since_t).count();
    since_t = now;
  };
  auto tp = Clock::now();

  // The one rename of this part: its temporary name -> its final name.
  auto rename_into_place = [&] {
    try {
      auto t_rename = Clock::now();
      internal::move_into_place(im.tmp, im.path, /*fsync=*/false,
                                "the new part was written to '" + im.tmp +
                                    "'; check the directory's permissions");
      lap("commit_rename", t_rename);
      if (im.options.write.fsync) {
        internal::sync_directory(internal::parent_dir(im.path));
        lap("commit_dir_fsync", t_rename);
      }
    } catch (const std::exception&) {
      im.abort_all(detail::str("rank ", im.me, " could not rename '", im.tmp, "' to '", im.path,
                               "'"));
      throw;
    }
  };

  if (!im.options.partial) {
    rename_into_place();
    im.remove_leftovers();
    im.lock.release();
    im.finished = true;
    st.commit_seconds = since(t0);
    st.seconds = written.seconds + st.commit_seconds;
    SMP_LOG(kInfo, describe(st));
    return st;
  }

  im.set("written/" + std::to_string(im.me),
         detail::str("ok ", written.bytes, " ", smp_index ? 1 : 0, " ", base_name(im.path)));
  const std::string manifest_path = manifest_file_name(im.f);
  tp = Clock::now();
  if (im.is_lowest()) {
    const auto missing = im.wait_all("written", im.participants, im.timeout_s);
    lap("commit_wait_written", tp);
    if (!missing.empty()) {
      const std::string why =
          im.missing_text(missing, "to write their files", im.timeout_s);
      im.abort_all(why);
      im.finished = true;
      SMP_THROW(CheckpointError, why);
    }
    Manifest m;
    m.save_id = im.save_id;
    m.v3 = im.options.v3;
    m.suffix = im.options.suffix;
    m.world_size = size();
    m.pp_size = pp_size();
    m.tp_size = tp_size();
    m.rdp_size = rdp_size();
    m.smp_version = SMP_VERSION;
    std::vector<std::string> failures;
    for (int r : im.participants) {
      const std::string v = store_get(*im.store, im.base + "written/" + std::to_string(r));
      if (v.compare(0, 6, "error ") == 0) {
        failures.push_back(detail::str(describe_rank(r), ": ", v.substr(6)));
        continue;
      }
      ManifestFile e;
      unsigned long long bytes = 0;
      int idx = 1;
      char name[4096] = {};
      if (std::sscanf(v.c_str(), "ok %llu %d %4095[^\n]", &bytes, &idx, name) != 3) {
        failures.push_back(detail::str(describe_rank(r), ": malformed report '", v, "'"));
        continue;
      }
      const Topology& t = topology();
      e.name = name;
      e.pp_rank = t.pp_rank(r);
      e.tp_rank = t.tp_rank(r);
      if (im.options.v3) e.rdp_rank = t.rdp_rank(r);
      e.world_rank = r;
      e.bytes = bytes;
      e.smp_index = idx != 0;
      m.files.push_back(std::move(e));
    }
    if (!failures.empty()) {
      std::string why = detail::str("participants failed to write their parts of '", im.f, "': ");
      for (std::size_t i = 0; i < failures.size(); ++i) why += (i ? "; " : "") + failures[i];
      why += "; the previous checkpoint under this name is unchanged";
      im.abort_all(why);
      im.finished = true;
      SMP_THROW(CheckpointError, why);
    }
    // The commit point: from here on the new checkpoint is the valid one.
    try {
      write_manifest(manifest_path, m);
    } catch (const std::exception& e) {
      const std::string why = detail::str(describe_rank(im.me), " could not write the manifest '",
                                          manifest_path, "': ", e.what(),
                                          "; the previous checkpoint under this name is unchanged");
      im.abort_all(why);
      im.finished = true;
      SMP_THROW(CheckpointError, "smp.save of '", im.f, "' failed: ", why);
    }
    im.set("commit", "1");
    lap("commit_manifest", tp);
  } else {
    // The lowest participant reports missing ranks first; wait a little longer.
    const double wait = im.timeout_s + std::min(10.0, im.timeout_s);
    if (!im.wait_one("commit", wait)) {
      const std::string why = detail::str(
          "smp.save(partial=True) of '", im.f, "': the lowest participant ",
          describe_rank(im.lowest), " did not commit within ", wait,
          " s (it may have failed or never reached smp.save). ", kCallRule,
          ". The previous checkpoint under this name is unchanged");
      im.abort_all(why);
      im.finished = true;
      SMP_THROW(CheckpointError, why);
    }
    lap("commit_wait_manifest", tp);
  }

  // Committed: move the new part into place. Readers roll forward from
  // "<name>.tmp-<save id>" for parts not renamed yet.
  rename_into_place();
  tp = Clock::now();
  im.remove_leftovers();
  im.set("renamed/" + std::to_string(im.me), "1");
  lap("commit_cleanup", tp);
  if (im.is_lowest()) {
    const auto missing = im.wait_all("renamed", im.participants, im.timeout_s);
    lap("commit_wait_renamed", tp);
    if (!missing.empty()) {
      SMP_LOG(kWarning, "smp.save of '", im.f, "' is committed (manifest written) but ",
              describe_ranks(missing), " did not confirm the rename within ", im.timeout_s,
              " s; readers use their temporary files");
    }
    // Parts of earlier saves under this name that the new checkpoint does not list.
    Manifest current;
    try {
      if (auto m = read_manifest(manifest_path)) current = *m;
    } catch (const std::exception&) {
    }
    const std::string stem = base_name(im.f);
    const std::string manifest_tmp = base_name(manifest_path) + ".tmp-";
    for (const auto& p : files_with_prefix(im.f, 1u << 20)) {
      const std::string name = base_name(p);
      // Temporaries of interrupted saves (we hold the lock: no other save of
      // this name is alive): parts of other save ids, manifests being written.
      const std::size_t t = name.find(".tmp-");
      if (t != std::string::npos) {
        if (name.compare(0, manifest_tmp.size(), manifest_tmp) == 0 ||
            (is_part_name(name.substr(0, t), stem) && name.substr(t + 5) != im.save_id)) {
          ::unlink(p.c_str());
        }
        continue;
      }
      if (!is_part_name(name, stem)) continue;
      const bool listed = std::any_of(current.files.begin(), current.files.end(),
                                      [&](const ManifestFile& e) { return e.name == name; });
      if (!listed) ::unlink(p.c_str());
    }
    im.set("complete", "1");
    im.lock.release();
    lap("commit_cleanup", tp);
  } else {
    if (!im.wait_one("complete", im.timeout_s + std::min(10.0, im.timeout_s))) {
      SMP_LOG(kWarning, "smp.save of '", im.f, "' is committed but the lowest participant ",
              describe_rank(im.lowest), " did not confirm completion");
    }
  }
  im.finished = true;
  // The last participant to leave removes this save's keys.
  try {
    if (im.store->add(im.base + "left", 1) == static_cast<std::int64_t>(im.participants.size())) {
      for (const char* k : {"id", "commit", "complete", "left", "abort"}) {
        im.store->deleteKey(im.base + k);
      }
      for (int r : im.participants) {
        for (const char* k : {"begin/", "written/", "renamed/"}) {
          im.store->deleteKey(im.base + k + std::to_string(r));
        }
      }
    }
  } catch (const std::exception& e) {
    SMP_LOG(kDebug, "smp.save: removing store keys failed: ", e.what());
  }
  st.commit_seconds = since(t0) - im.rendezvous_seconds;
  st.rendezvous_seconds = im.rendezvous_seconds;
  st.seconds = written.seconds + since(t0);
  SMP_LOG(kInfo, describe(st));
  return st;
}

SaveStats internal::save_now(const Value& object, const std::string& f,
                             const SaveOptions& options) {
  const auto t0 = Clock::now();
  SaveSession session(f, options);
  if (session.skipped()) return session.commit(WriteStats{});
  const double start_wait = since(t0);
  WriteStats written;
  try {
    written = write_file(session.temporary_path(), object, session.write_options());
  } catch (const std::exception& e) {
    const int me = is_initialized() ? rank() : 0;
    session.abort(detail::str("rank ", me, " could not write '", session.temporary_path(),
                              "': ", e.what()));
    // A system call's error (the file, the call, strerror): say which rank, as
    // the other participants' errors do.
    if (typeid(e) == typeid(CheckpointError)) {
      SMP_THROW(CheckpointError, "smp.save of '", f, "' failed on rank ", me, ": ", e.what(),
                "; the previous checkpoint under this name is unchanged");
    }
    throw;
  }
  SaveStats st = session.commit(written);
  st.rendezvous_seconds += start_wait;
  st.seconds += start_wait;
  return st;
}

}  // namespace ckpt
}  // namespace smp
