// Checkpoint engine: Python objects <-> smp::ckpt::Value, smp.save / smp.load
// with the commit protocol, and the save session the torch.save fallback uses.
// Blocking calls (file I/O, rendezvous) release the GIL.

#include <torch/extension.h>

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <climits>
#include <optional>

#include "bindings.h"
#include "checkpoint/io.h"
#include "checkpoint/lock.h"
#include "smp/checkpoint/format.h"
#include "smp/checkpoint/save.h"
#include "smp/core/error.h"

namespace py = pybind11;

namespace smp::python {
namespace {

using ckpt::Value;

/// Thrown while converting an object smp's format does not hold; `path` is
/// the key path of the first such leaf ("/state/0/momentum").
struct Unsupported {
  std::string path;
  std::string type;
};

std::string key_text(const py::handle& key) { return py::str(key).cast<std::string>(); }

Value to_value(const py::handle& obj, const std::string& path) {
  PyObject* o = obj.ptr();
  PyTypeObject* t = Py_TYPE(o);
  if (o == Py_None) return Value();
  if (t == &PyBool_Type) return Value(o == Py_True);
  if (t == &PyLong_Type) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0) throw Unsupported{path, "int outside int64"};
    return Value(static_cast<std::int64_t>(v));
  }
  if (t == &PyFloat_Type) return Value(PyFloat_AS_DOUBLE(o));
  if (t == &PyUnicode_Type) return Value(obj.cast<std::string>());
  if (t == &PyBytes_Type) return Value::bytes(std::string(PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o)));
  if (t == &PyList_Type || t == &PyTuple_Type) {
    Value::Items items;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    items.reserve(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      items.push_back(to_value(PySequence_Fast_GET_ITEM(o, i), path + "/" + std::to_string(i)));
    }
    return t == &PyList_Type ? Value::list(std::move(items)) : Value::tuple(std::move(items));
  }
  static PyObject* ordered_dict_type =
      py::object(py::module_::import("collections").attr("OrderedDict")).release().ptr();
  const bool ordered = reinterpret_cast<PyObject*>(t) == ordered_dict_type;
  if (t == &PyDict_Type || ordered) {
    Value::Pairs pairs;
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(o, &pos, &k, &v)) {
      const std::string sub = path + "/" + key_text(k);
      PyTypeObject* kt = Py_TYPE(k);
      if (kt != &PyUnicode_Type && kt != &PyLong_Type && kt != &PyBool_Type &&
          kt != &PyFloat_Type && kt != &PyTuple_Type && k != Py_None) {
        throw Unsupported{sub, std::string("dict key of type ") + kt->tp_name};
      }
      pairs.emplace_back(to_value(k, sub), to_value(v, sub));
    }
    Value d = ordered ? Value::ordered_dict(std::move(pairs)) : Value::dict(std::move(pairs));
    if (ordered) {
      py::object attrs = py::getattr(obj, "__dict__", py::none());
      if (!attrs.is_none() && py::len(attrs) > 0) d.set_attributes(to_value(attrs, path));
    }
    return d;
  }
  if (THPVariable_CheckExact(o)) {
    const at::Tensor& tensor = THPVariable_Unpack(o);
    if (tensor.layout() != at::kStrided || tensor.is_quantized() || tensor.is_meta() ||
        tensor.is_nested()) {
      throw Unsupported{path, "tensor with layout or device smp files do not hold"};
    }
    try {
      (void)ckpt::dtype_name(tensor.scalar_type());
    } catch (const smp::Error&) {
      throw Unsupported{path, std::string("tensor of dtype ") + c10::toString(tensor.scalar_type())};
    }
    return Value(tensor);
  }
  throw Unsupported{path.empty() ? "<root>" : path, t->tp_name};
}

py::object to_python(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNone: return py::none();
    case Value::Kind::kBool: return py::bool_(v.as_bool());
    case Value::Kind::kInt: return py::int_(v.as_int());
    case Value::Kind::kFloat: return py::float_(v.as_float());
    case Value::Kind::kString: return py::str(v.as_string());
    case Value::Kind::kBytes: return py::bytes(v.as_bytes());
    case Value::Kind::kList: {
      py::list out(v.items().size());
      for (std::size_t i = 0; i < v.items().size(); ++i) out[i] = to_python(v.items()[i]);
      return out;
    }
    case Value::Kind::kTuple: {
      py::tuple out(v.items().size());
      for (std::size_t i = 0; i < v.items().size(); ++i) out[i] = to_python(v.items()[i]);
      return out;
    }
    case Value::Kind::kDict: {
      static py::object ordered_dict = py::module_::import("collections").attr("OrderedDict");
      py::object out = v.ordered() ? ordered_dict() : py::dict();
      for (const auto& kv : v.pairs()) out[to_python(kv.first)] = to_python(kv.second);
      if (v.ordered() && !v.attributes().is_none()) {
        for (const auto& kv : v.attributes().pairs()) {
          py::setattr(out, to_python(kv.first), to_python(kv.second));
        }
      }
      return out;
    }
    case Value::Kind::kTensor:
      return py::reinterpret_steal<py::object>(THPVariable_Wrap(v.tensor()));
  }
  return py::none();
}

py::dict save_stats(const ckpt::SaveStats& s) {
  py::dict d;
  d["file"] = s.file;
  d["skipped"] = s.skipped;
  d["save_id"] = s.save_id;
  d["bytes"] = s.bytes;
  d["seconds"] = s.seconds;
  d["gbps"] = s.gbps();
  d["serialize_seconds"] = s.serialize_seconds;
  d["write_seconds"] = s.write_seconds;
  d["fsync_seconds"] = s.fsync_seconds;
  d["rendezvous_seconds"] = s.rendezvous_seconds;
  d["commit_seconds"] = s.commit_seconds;
  d["profile"] = s.profile;
  return d;
}

py::dict load_stats(const ckpt::LoadStats& s) {
  py::dict d;
  d["file"] = s.file;
  d["smp_index"] = s.smp_index;
  d["save_id"] = s.save_id;
  d["bytes"] = s.bytes;
  d["seconds"] = s.seconds;
  d["gbps"] = s.gbps();
  d["open_seconds"] = s.open_seconds;
  d["read_seconds"] = s.read_seconds;
  d["deserialize_seconds"] = s.deserialize_seconds;
  d["profile"] = s.profile;
  return d;
}

ckpt::SaveOptions save_options(bool partial, bool v3, const std::string& suffix,
                               std::optional<double> timeout_s, bool fsync, int threads,
                               std::optional<bool> o_direct = std::nullopt) {
  ckpt::SaveOptions o;
  o.partial = partial;
  o.v3 = v3;
  o.suffix = suffix;
  if (timeout_s) {
    SMP_CHECK(*timeout_s > 0, ConfigError, "smp.save timeout must be a positive number of "
              "seconds, got ", *timeout_s, "; pass None for SMP_CHECKPOINT_TIMEOUT (default 600)");
    o.timeout_s = *timeout_s;
  }
  o.write.fsync = fsync;
  o.write.threads = threads;
  o.write.o_direct = o_direct;
  return o;
}

py::dict async_stats(ckpt::AsyncSave& h) {
  ckpt::SaveStats st;
  {
    py::gil_scoped_release release;
    st = h.wait();
  }
  py::dict d = save_stats(st);
  d["snapshot_seconds"] = h.snapshot_seconds();
  d["snapshot_bytes"] = h.snapshot_bytes();
  return d;
}

}  // namespace

Value object_to_value(const py::handle& obj) {
  try {
    return to_value(obj, "");
  } catch (const Unsupported& u) {
    SMP_THROW(ConfigError, "smp checkpoint files do not hold ", u.type, " (at key '", u.path,
              "'); convert it to tensors, containers or primitives");
  }
}

py::object value_to_object(const Value& v) { return to_python(v); }

void bind_checkpoint(py::module_& m) {
  m.def(
      "ckpt_save",
      [](const py::object& obj, const std::string& f, bool partial, bool v3,
         const std::string& suffix, std::optional<double> timeout_s, bool fsync,
         int threads, const py::object& shards) -> py::object {
        Value v;
        try {
          v = to_value(obj, "");
        } catch (const Unsupported& u) {
          return py::make_tuple(u.path, u.type);
        }
        auto opts = save_options(partial, v3, suffix, timeout_s, fsync, threads);
        // ---- resharding: shard records (python/src/reshard.cc) ----
        annotate_shards(v, shards, opts);
        // ---- end resharding ----
        ckpt::SaveStats st;
        {
          py::gil_scoped_release release;
          st = ckpt::save(v, f, opts);  // waits for an asynchronous save in flight first
        }
        return save_stats(st);
      },
      py::arg("obj"), py::arg("f"), py::arg("partial") = true, py::arg("v3") = false,
      py::arg("suffix") = "", py::arg("timeout") = py::none(), py::arg("fsync") = true,
      py::arg("threads") = 0, py::arg("shards") = py::none(),
      R"doc(Saves `obj` in smp's format with the commit protocol; returns the stats
dict, or (key path, type) of the first leaf smp's format does not hold (nothing
is written then: the caller falls back to SaveSession + torch.save).)doc");

  py::class_<ckpt::AsyncSave>(m, "AsyncSave",
                              "Handle of an asynchronous smp.save (smp::ckpt::AsyncSave).")
      .def("done", &ckpt::AsyncSave::done,
           "True once the background write and commit ended (success or error).")
      .def("wait", &async_stats,
           "Waits; returns the stats dict (with snapshot_seconds, snapshot_bytes) or raises "
           "the background error (once), which names the file and the rank.")
      .def_property_readonly("snapshot_seconds", &ckpt::AsyncSave::snapshot_seconds)
      .def_property_readonly("snapshot_bytes", &ckpt::AsyncSave::snapshot_bytes);

  m.def(
      "ckpt_async_save",
      [](const py::list& jobs, std::optional<std::function<void()>> then) -> py::object {
        // Each job: (obj, f, partial, v3, suffix, timeout, fsync, shards).
        std::vector<ckpt::AsyncSaveItem> items;
        for (std::size_t i = 0; i < jobs.size(); ++i) {
          py::tuple j = jobs[i].cast<py::tuple>();
          ckpt::AsyncSaveItem item;
          try {
            item.object = to_value(j[0], "");
          } catch (const Unsupported& u) {
            return py::make_tuple(i, u.path, u.type);
          }
          item.f = j[1].cast<std::string>();
          item.options = save_options(j[2].cast<bool>(), j[3].cast<bool>(),
                                      j[4].cast<std::string>(),
                                      j[5].cast<std::optional<double>>(), j[6].cast<bool>(), 0);
          annotate_shards(item.object, j[7], item.options);
          items.push_back(std::move(item));
        }
        ckpt::AsyncSave h;
        {
          py::gil_scoped_release release;
          h = ckpt::async_save_all(std::move(items), then ? *then : std::function<void()>());
        }
        return py::cast(h);
      },
      py::arg("jobs"), py::arg("then") = py::none(),
      R"doc(Snapshots the objects of `jobs` ((obj, f, partial, v3, suffix, timeout,
fsync, shards) each), then writes and commits them one after the other in a
background thread, then calls `then` (with the GIL). Returns an AsyncSave, or
(job index, key path, type) of the first leaf smp's format does not hold
(nothing is saved then).)doc");

  m.def("ckpt_wait_pending", &ckpt::wait_for_pending_saves,
        py::call_guard<py::gil_scoped_release>(),
        "Waits for the asynchronous save in flight; raises its error if it failed and was "
        "not reported yet.");
  m.def("ckpt_save_in_flight", &ckpt::save_in_flight,
        "True while an asynchronous save is in flight.");

  py::class_<ckpt::SaveSession>(m, "SaveSession",
                                "One collective save whose file the caller writes itself.")
      .def(py::init([](const std::string& f, bool partial, bool v3, const std::string& suffix,
                       std::optional<double> timeout_s) {
             const auto opts = save_options(partial, v3, suffix, timeout_s, true, 0);
             py::gil_scoped_release release;
             ckpt::wait_for_pending_saves();  // one save at a time, in the same order everywhere
             return std::make_unique<ckpt::SaveSession>(f, opts);
           }),
           py::arg("f"), py::arg("partial") = true, py::arg("v3") = false, py::arg("suffix") = "",
           py::arg("timeout") = py::none())
      .def_property_readonly("skipped", &ckpt::SaveSession::skipped)
      .def_property_readonly("save_id", &ckpt::SaveSession::save_id)
      .def_property_readonly("path", &ckpt::SaveSession::path)
      .def_property_readonly("temporary_path", &ckpt::SaveSession::temporary_path)
      .def(
          "commit",
          [](ckpt::SaveSession& s, std::uint64_t bytes, double write_seconds,
             double fsync_seconds) {
            ckpt::WriteStats w;
            w.bytes = bytes;
            w.write_seconds = write_seconds;
            w.sync_seconds = fsync_seconds;
            w.seconds = write_seconds + fsync_seconds;
            ckpt::SaveStats st;
            {
              py::gil_scoped_release release;
              st = s.commit(w, /*smp_index=*/false);
            }
            return save_stats(st);
          },
          py::arg("bytes"), py::arg("write_seconds") = 0.0, py::arg("fsync_seconds") = 0.0,
          "Rendezvous, manifest and renames; returns when the checkpoint is complete.")
      .def(
          "abort",
          [](ckpt::SaveSession& s, const std::string& why) {
            py::gil_scoped_release release;
            s.abort(why);
          },
          py::arg("why"), "Publishes this participant's failure; the others fail at once.");

  m.def(
      "ckpt_load",
      [](const std::string& f, bool partial, bool verify, int threads,
         std::optional<std::string> device) {
        ckpt::LoadOptions o;
        o.partial = partial;
        o.read.verify_checksums = verify;
        o.read.threads = threads;
        if (device) o.read.device = c10::Device(*device);
        ckpt::LoadStats st;
        Value v;
        {
          py::gil_scoped_release release;
          v = ckpt::load(f, o, &st);
        }
        return py::make_tuple(to_python(v), load_stats(st));
      },
      py::arg("f"), py::arg("partial") = true, py::arg("verify_checksums") = true,
      py::arg("threads") = 0, py::arg("device") = py::none(),
      "Reads this rank's part (partial) or `f` with the restricted reader: (object, stats). "
      "device (e.g. 'cuda:0'): tensors are created there, each chunk copied from the "
      "pinned staging pool straight into its destination.");

  m.def("ckpt_saved_layout_differs", &ckpt::saved_layout_differs, py::arg("f"),
        py::call_guard<py::gil_scoped_release>(),
        "True when the manifest of partial checkpoint `f` records another layout than this "
        "job's (smp::ckpt::saved_layout_differs): smp.load(partial=True) reshards it.");
  m.def(
      "ckpt_resolve",
      [](const std::string& f, bool partial) {
        ckpt::LoadStats st;
        std::string path;
        {
          py::gil_scoped_release release;
          path = ckpt::resolve_load_path(f, partial, &st);
        }
        return py::make_tuple(path, load_stats(st));
      },
      py::arg("f"), py::arg("partial") = true,
      "The file smp.load(f, partial) reads on this rank, checked against the manifest.");

  m.def(
      "ckpt_atomic_write",
      [](const std::string& path, const std::string& text) {
        py::gil_scoped_release release;
        ckpt::internal::atomic_write(path, text, /*fsync=*/true);
      },
      py::arg("path"), py::arg("text"),
      "Writes `text` to `path` atomically (temporary, fsync, rename, directory fsync).");

  // save_checkpoint's staging folder (src/checkpoint/io.cc, lock.cc).
  m.def(
      "ckpt_replace_directory",
      [](const std::string& staging, const std::string& dir, const std::string& old) {
        py::gil_scoped_release release;
        return ckpt::internal::replace_directory(staging, dir, old);
      },
      py::arg("staging"), py::arg("dir"), py::arg("old"),
      "Puts `staging` under the name `dir` atomically (exchange); returns the folder holding "
      "the previous contents, or ''.");
  py::class_<ckpt::internal::SaveLock>(m, "SaveLock", "The flock of src/checkpoint/lock.cc.")
      .def(py::init<>())
      .def(
          "acquire",
          [](ckpt::internal::SaveLock& l, const std::string& path, double timeout_s,
             const std::string& what) {
            py::gil_scoped_release release;
            l.acquire(path, timeout_s, what);
          },
          py::arg("path"), py::arg("timeout_s"), py::arg("what"))
      .def("release", &ckpt::internal::SaveLock::release)
      .def_property_readonly("held", &ckpt::internal::SaveLock::held);
  m.def("ckpt_lock_is_held", &ckpt::internal::lock_is_held, py::arg("path"),
        "True when a live process holds the flock on `path`.");
}

}  // namespace smp::python
