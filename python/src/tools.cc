// Offline checkpoint tools (smp-checkpoint, python/smp/checkpoint/tools.py):
// the engine's Reader (index, tensors, record CRCs), manifests and the
// streaming writer, bound for Python. Blocking calls release the GIL.

#include <torch/extension.h>

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "checkpoint/metadata.h"
#include "smp/checkpoint/format.h"
#include "smp/checkpoint/manifest.h"
#include "smp/checkpoint/save.h"
#include "smp/checkpoint/value.h"
#include "smp/core/error.h"

namespace py = pybind11;

namespace smp::python {

void bind_tools(py::module_& m) {
  m.def(
      "ckpt_read_manifest",
      [](const std::string& path) -> py::object {
        std::optional<ckpt::Manifest> man;
        {
          py::gil_scoped_release release;
          man = ckpt::read_manifest(path);
        }
        if (!man) return py::none();
        return py::str(man->to_json());
      },
      py::arg("path"),
      "The manifest at `path` as JSON text (parsed and checked by the engine), or None when "
      "there is no such file.");

  py::class_<ckpt::Reader>(m, "CheckpointFile",
                           "One checkpoint file opened by the engine's Reader (ZIP directory "
                           "and index; no tensor data read).")
      .def(py::init([](const std::string& path) {
             py::gil_scoped_release release;
             return std::make_unique<ckpt::Reader>(path);
           }),
           py::arg("path"))
      .def_property_readonly("path", &ckpt::Reader::path)
      .def_property_readonly("has_index", &ckpt::Reader::has_index,
                             "True for files written by smp (False: plain torch.save)")
      .def(
          "index_json",
          [](const ckpt::Reader& r) {
            std::string text;
            {
              py::gil_scoped_release release;
              text = ckpt::internal::index_to_json(r.index());
            }
            return text;
          },
          "The index (smp's record, or one derived from data.pkl for torch.save files) as "
          "JSON text, in the schema of docs/file_format.md.")
      .def(
          "read_tensor",
          [](const ckpt::Reader& r, std::size_t i, bool verify) {
            const auto& tensors = r.index().tensors;
            SMP_CHECK(i < tensors.size(), ConfigError, "CheckpointFile.read_tensor: '", r.path(),
                      "' has ", tensors.size(), " tensors, no tensor ", i);
            ckpt::ReadOptions o;
            o.verify_checksums = verify;
            py::gil_scoped_release release;
            return r.read_tensor(tensors[i], o);
          },
          py::arg("i"), py::arg("verify") = true,
          "Tensor i of the index (CPU, its saved shape), its record's CRC-32 verified.")
      .def(
          "verify_records",
          [](const ckpt::Reader& r, const py::object& progress) {
            std::function<void(std::uint64_t, std::uint64_t)> cb;
            if (!progress.is_none()) {
              cb = [&progress](std::uint64_t done, std::uint64_t total) {
                py::gil_scoped_acquire acquire;
                progress(done, total);
              };
            }
            py::gil_scoped_release release;
            return r.verify_records(cb);
          },
          py::arg("progress") = py::none(),
          "CRC-32 of every record through a bounded buffer: a list of messages, one per damaged "
          "record (empty: all good). progress(done_bytes, total_bytes) is called as it goes.");

  m.def(
      "ckpt_write_streaming",
      [](const py::object& obj, const std::string& path, const py::function& produce,
         const std::map<std::string, std::string>& info, const py::object& shards, bool fsync,
         int threads) {
        ckpt::Value v = object_to_value(obj);
        ckpt::SaveOptions so;
        annotate_shards(v, shards, so);  // shard specs on the leaves, names in the info
        ckpt::WriteOptions o = so.write;
        for (const auto& kv : info) o.info[kv.first] = kv.second;
        o.fsync = fsync;
        o.threads = threads;
        ckpt::TensorProducer producer = [&produce](const at::Tensor& placeholder) {
          py::gil_scoped_acquire acquire;
          py::object out = produce(py::reinterpret_steal<py::object>(THPVariable_Wrap(placeholder)));
          SMP_CHECK(THPVariable_Check(out.ptr()), ConfigError,
                    "ckpt_write_streaming: the producer must return a tensor, got ",
                    py::str(py::type::of(out)).cast<std::string>());
          return THPVariable_Unpack(out.ptr());
        };
        ckpt::WriteStats st;
        {
          py::gil_scoped_release release;
          st = ckpt::write_file_streaming(path, v, producer, o);
        }
        py::dict d;
        d["bytes"] = st.bytes;
        d["tensor_bytes"] = st.tensor_bytes;
        d["tensors"] = st.tensors;
        d["records"] = st.records;
        d["seconds"] = st.seconds;
        d["write_seconds"] = st.write_seconds;
        d["sync_seconds"] = st.sync_seconds;
        return d;
      },
      py::arg("obj"), py::arg("path"), py::arg("produce"), py::arg("info") = std::map<std::string, std::string>{},
      py::arg("shards") = py::none(), py::arg("fsync") = true, py::arg("threads") = 4,
      R"doc(Writes `obj` to `path` atomically in smp's format, each tensor leaf a placeholder
whose bytes produce(placeholder) returns when its record is written: one record
in memory at a time (smp::ckpt::write_file_streaming). `shards`: shard records
as smp.save makes them ([(key path, full name, global_shape, split_dim,
num_shards, shard_index)]), recorded in the index.)doc");

  m.def(
      "ckpt_write_manifest",
      [](const std::string& path, const std::string& text) {
        const ckpt::Manifest man = ckpt::Manifest::from_json(text, path);
        py::gil_scoped_release release;
        ckpt::write_manifest(path, man);
      },
      py::arg("path"), py::arg("text"),
      "Checks the manifest JSON `text` and writes it to `path` atomically (the commit point "
      "of a checkpoint written offline).");
}

}  // namespace smp::python
