// Resharding I/O: opens a partial checkpoint's manifest and indexes, plans a
// target rank's tensors with the planner and reads only the planned byte
// ranges (see include/smp/checkpoint/reshard.h).

#include "smp/checkpoint/reshard.h"

#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "checkpoint/metadata.h"
#include "smp/checkpoint/naming.h"
#include "smp/checkpoint/value.h"
#include "smp/core/error.h"

namespace smp {
namespace ckpt {

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string parent_of(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

bool exists(const std::string& path) {
  std::FILE* fp = std::fopen(path.c_str(), "rb");
  if (fp == nullptr) return false;
  std::fclose(fp);
  return true;
}

std::string layout_text(const Manifest& m) {
  return detail::str("pp_size ", m.pp_size, ", tp_size ", m.tp_size, ", rdp_size ", m.rdp_size,
                     m.v3 ? " (sharded optimizer state)" : "");
}

}  // namespace

std::string encode_tensor_names(const std::vector<NamedPath>& names) {
  nlohmann::json tensors = nlohmann::json::array();
  for (const NamedPath& n : names) {
    tensors.push_back({{"path", n.path}, {"name", n.name}});
  }
  return nlohmann::json{{"version", 1}, {"tensors", std::move(tensors)}}.dump();
}

std::vector<NamedPath> decode_tensor_names(const std::string& text, const std::string& file) {
  std::vector<NamedPath> out;
  try {
    const auto j = nlohmann::json::parse(text);
    const int version = j.at("version").get<int>();
    SMP_CHECK(version <= 1, CheckpointError, "'", file, "': index info '", kTensorNamesInfoKey,
              "' has version ", version, ", newer than this smp reads (1); upgrade smp");
    for (const auto& t : j.at("tensors")) {
      out.push_back({t.at("path").get<std::vector<std::string>>(), t.at("name").get<std::string>()});
    }
  } catch (const nlohmann::json::exception& e) {
    SMP_THROW(CorruptCheckpointError, "'", file, "': index info '", kTensorNamesInfoKey,
              "' is malformed (", e.what(), "); restore the file from a good copy");
  }
  return out;
}

struct ReshardSource::Impl {
  Manifest manifest;
  std::string manifest_path;
  SavedCheckpoint saved;
  std::vector<std::string> paths;
  std::vector<std::unique_ptr<Reader>> readers;
  /// entries[p][t]: index entry of saved.parts[p].tensors[t].
  std::vector<std::vector<const TensorEntry*>> entries;
  std::map<std::string, std::vector<std::pair<std::size_t, std::size_t>>> by_name;
};

ReshardSource::ReshardSource(const std::string& f) : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  std::optional<Manifest> manifest;
  for (const std::string& base : {f, alternate_pt_name(f)}) {
    im.manifest_path = manifest_file_name(base);
    manifest = read_manifest(im.manifest_path);
    if (manifest) break;
  }
  SMP_CHECK(manifest.has_value(), CheckpointError, "resharding checkpoint '", f,
            "': no manifest ('", manifest_file_name(f), "' or '",
            manifest_file_name(alternate_pt_name(f)),
            "'); only complete partial checkpoints written by smp.save can be resharded. Check "
            "the path, or load it on the layout it was saved with");
  im.manifest = std::move(*manifest);
  const Manifest& m = im.manifest;
  im.saved.pp_size = m.pp_size;
  im.saved.tp_size = m.tp_size;
  im.saved.rdp_size = m.rdp_size;
  const std::string dir = parent_of(im.manifest_path);
  for (const ManifestFile& mf : m.files) {
    std::string path = dir + "/" + mf.name;
    SMP_CHECK(mf.smp_index, CheckpointError, "resharding checkpoint '", f, "': part '", path,
              "' was written with torch.save semantics (an object smp's format does not hold), so "
              "it has no index to read ranges from; load it on its saving layout (",
              layout_text(m), ") or save plain tensors and containers");
    if (!exists(path)) {
      const std::string rolled = temporary_file_name(path, m.save_id);
      SMP_CHECK(exists(rolled), CheckpointError, "resharding checkpoint '", f, "': part '", path,
                "' (pp_rank ", mf.pp_rank, ", tp_rank ", mf.tp_rank, ") listed in manifest '",
                im.manifest_path, "' does not exist; restore it or save the checkpoint again");
      path = rolled;
    }
    auto reader = std::make_unique<Reader>(path);
    const Index& index = reader->index();
    const auto sid = index.info.find("save_id");
    SMP_CHECK(sid != index.info.end() && sid->second == m.save_id, CheckpointError,
              "mixed checkpoint: '", path, "' belongs to save id '",
              sid == index.info.end() ? std::string("<none>") : sid->second,
              "' but the manifest '", im.manifest_path, "' names save id '", m.save_id,
              "'; restore the checkpoint from one save or save it again");
    internal::check_part_identity(
        index, path, mf.pp_rank, mf.tp_rank, mf.rdp_rank.value_or(-1),
        detail::str("the manifest '", im.manifest_path, "' (entry '", mf.name, "')"));
    const auto names_it = index.info.find(kTensorNamesInfoKey);
    SMP_CHECK(names_it != index.info.end(), CheckpointError, "checkpoint '", f, "': part '",
              path, "' records no tensor names (index info '", kTensorNamesInfoKey,
              "'): it was saved by an smp without shard records, or its state dicts were not "
              "recognised (model.local_state_dict() / optimizer.local_state_dict(); from C++, "
              "call smp::record_shards before smp::ckpt::save). It loads "
              "only on its saving layout (", layout_text(m), ")");
    std::map<std::vector<std::string>, std::string> names;
    for (auto& n : decode_tensor_names(names_it->second, path)) names[n.path] = n.name;

    SavedPart part;
    part.file = path;
    part.pp_rank = mf.pp_rank;
    part.tp_rank = mf.tp_rank;
    part.rdp_rank = mf.rdp_rank.value_or(-1);
    std::vector<const TensorEntry*> entries;
    for (const TensorEntry& e : index.tensors) {
      const auto it = names.find(e.path);
      if (it == names.end()) continue;
      SMP_CHECK(e.contiguous(), CorruptCheckpointError, "'", path, "': tensor '", it->second,
                "' is not stored contiguously; smp writes every tensor contiguous, so the file "
                "was not written by smp.save");
      SavedTensor t;
      t.name = it->second;
      t.dtype = dtype_name(e.dtype);
      t.element_size = c10::elementSize(e.dtype);
      t.shape = e.shape;
      t.spec = e.shard ? *e.shard : ShardSpec::replicated(e.shape);
      t.file_offset = e.offset + static_cast<std::uint64_t>(e.storage_offset) * t.element_size;
      im.by_name[t.name].emplace_back(im.saved.parts.size(), part.tensors.size());
      part.tensors.push_back(std::move(t));
      entries.push_back(&e);
    }
    im.saved.parts.push_back(std::move(part));
    im.paths.push_back(path);
    im.entries.push_back(std::move(entries));
    im.readers.push_back(std::move(reader));  // entries point into its index: keep it alive
  }
}

ReshardSource::~ReshardSource() = default;
ReshardSource::ReshardSource(ReshardSource&&) noexcept = default;
ReshardSource& ReshardSource::operator=(ReshardSource&&) noexcept = default;

const Manifest& ReshardSource::manifest() const { return impl_->manifest; }
const std::string& ReshardSource::manifest_path() const { return impl_->manifest_path; }
const SavedCheckpoint& ReshardSource::saved() const { return impl_->saved; }
const std::string& ReshardSource::part_path(std::size_t part) const {
  return impl_->paths.at(part);
}
const TensorEntry& ReshardSource::entry(std::size_t part, std::size_t tensor) const {
  return *impl_->entries.at(part).at(tensor);
}

std::vector<std::size_t> ReshardSource::parts_holding(const std::string& name) const {
  std::vector<std::size_t> out;
  const auto it = impl_->by_name.find(name);
  if (it == impl_->by_name.end()) return out;
  for (const auto& pt : it->second) out.push_back(pt.first);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

const SavedTensor* ReshardSource::find(const std::string& name) const {
  const auto it = impl_->by_name.find(name);
  if (it == impl_->by_name.end() || it->second.empty()) return nullptr;
  const auto& [p, t] = it->second.front();
  return &impl_->saved.parts[p].tensors[t];
}

namespace {

TargetRank with_saved_dtypes(const ReshardSource& src, TargetRank target) {
  for (TargetTensor& t : target.tensors) {
    if (!t.dtype.empty()) continue;
    if (const SavedTensor* s = src.find(t.name)) {
      t.dtype = s->dtype;
      t.element_size = s->element_size;
    }
  }
  return target;
}

}  // namespace

ReshardStats ReshardSource::load(const TargetRank& target_in, const std::vector<void*>& dst,
                                 const ReshardOptions& options) const {
  SMP_CHECK(dst.size() == target_in.tensors.size(), ConfigError, "ReshardSource::load: ",
            dst.size(), " destination buffers for ", target_in.tensors.size(), " target tensors");
  const auto t0 = Clock::now();
  PlanOptions po;
  po.allow_missing = options.allow_missing;
  const RankPlan plan = plan_load(impl_->saved, with_saved_dtypes(*this, target_in), po);
  return read(plan, dst, options, since(t0));
}

ReshardStats ReshardSource::load_group(const std::vector<TargetRank>& members_in,
                                       std::size_t me, const std::vector<void*>& dst,
                                       const ReshardOptions& options,
                                       std::vector<SharedChunk>* chunks,
                                       std::vector<std::size_t>* chunk_tensor) const {
  SMP_CHECK(me < members_in.size(), ConfigError, "ReshardSource::load_group: member ", me,
            " of a group of ", members_in.size());
  SMP_CHECK(dst.size() == members_in[me].tensors.size(), ConfigError,
            "ReshardSource::load_group: ", dst.size(), " destination buffers for ",
            members_in[me].tensors.size(), " target tensors");
  const auto t0 = Clock::now();
  std::vector<TargetRank> members;
  members.reserve(members_in.size());
  for (const TargetRank& m : members_in) members.push_back(with_saved_dtypes(*this, m));
  PlanOptions po;
  po.allow_missing = options.allow_missing;
  GroupPlan plan = plan_group(impl_->saved, members, po);
  if (chunks != nullptr) *chunks = std::move(plan.chunks);
  if (chunk_tensor != nullptr) *chunk_tensor = std::move(plan.chunk_tensor[me]);
  return read(plan.ranks[me], dst, options, since(t0));
}

ReshardStats ReshardSource::read(const RankPlan& plan, const std::vector<void*>& dst,
                                 const ReshardOptions& options, double plan_seconds) const {
  const Impl& im = *impl_;
  ReshardStats st;
  st.missing = plan.missing;
  st.plan_seconds = plan_seconds;
  const auto t0 = Clock::now();

  struct Work {
    const ReadOp* op;
    char* dst;
  };
  std::vector<Work> work;
  std::set<std::size_t> parts;
  for (std::size_t i = 0; i < plan.tensors.size(); ++i) {
    for (const ReadOp& op : plan.tensors[i].reads) {
      work.push_back({&op, static_cast<char*>(dst[i])});
      parts.insert(op.part);
      st.bytes += op.bytes();
    }
  }
  st.parts_read = parts.size();

  std::atomic<std::size_t> next{0};
  std::atomic<std::uint64_t> read_bytes{0}, reads{0};
  std::mutex error_mu;
  std::exception_ptr error;
  const std::uint64_t buffer_bytes = std::max<std::uint64_t>(options.buffer_bytes, 4096);
  auto worker = [&] {
    std::vector<char> buffer;
    try {
      while (true) {
        const std::size_t w = next.fetch_add(1);
        if (w >= work.size()) return;
        {
          std::lock_guard<std::mutex> lock(error_mu);
          if (error) return;
        }
        const ReadOp& op = *work[w].op;
        char* out = work[w].dst;
        const Reader& reader = *im.readers[op.part];
        const TensorEntry& e = *im.entries[op.part][op.tensor];
        // Batches of consecutive runs whose source span fits the buffer: one
        // pread each, then scattered; a run larger than the buffer goes
        // straight to its destination.
        std::uint64_t batch_begin = 0, batch_end = 0;
        std::vector<std::pair<std::uint64_t, std::uint64_t>> batch;  // (src, dst) per run
        auto flush = [&] {
          if (batch.empty()) return;
          const std::uint64_t span = batch_end - batch_begin;
          if (buffer.size() < span) buffer.resize(span);
          reader.read_tensor_bytes(e, batch_begin, span, buffer.data());
          read_bytes += span;
          ++reads;
          for (const auto& [s, d] : batch) {
            std::memcpy(out + d, buffer.data() + (s - batch_begin), op.run_bytes);
          }
          batch.clear();
        };
        for_each_run(op, [&](std::uint64_t s, std::uint64_t d, std::uint64_t len) {
          if (len >= buffer_bytes) {
            flush();
            reader.read_tensor_bytes(e, s, len, out + d);
            read_bytes += len;
            ++reads;
            return;
          }
          if (!batch.empty() && s + len - batch_begin > buffer_bytes) flush();
          if (batch.empty()) batch_begin = s;
          batch.emplace_back(s, d);
          batch_end = s + len;
        });
        flush();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
    }
  };
  const int threads =
      static_cast<int>(std::min<std::size_t>(std::max(options.threads, 1), work.size()));
  if (threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(static_cast<std::size_t>(threads));
    for (int i = 0; i < threads; ++i) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }
  if (error) std::rethrow_exception(error);
  st.read_bytes = read_bytes.load();
  st.reads = reads.load();
  st.read_seconds = since(t0);
  return st;
}

}  // namespace ckpt
}  // namespace smp
