// The one place where C++ exceptions of the engine become Python exceptions.
//
//   smp::Error             -> smp.SMPError          (RuntimeError)
//   smp::ConfigError       -> smp.ConfigError       (SMPError, ValueError)
//   smp::StateError        -> smp.StateError        (SMPError)
//   smp::CommError         -> smp.CommError         (SMPError)
//   smp::TimeoutError      -> smp.CommTimeoutError  (CommError, TimeoutError)
//   smp::NotSupportedError -> smp.NotSupportedError (SMPError, NotImplementedError)
//   smp::CheckpointError   -> smp.CheckpointError   (SMPError)
//   smp::CorruptCheckpointError -> smp.CorruptCheckpointError (CheckpointError)
//   smp::UnsafeLoadError   -> smp.UnsafeLoadError   (CheckpointError)

#include <cstring>
#include <exception>

#include "bindings.h"
#include "smp/core/error.h"

namespace py = pybind11;

namespace smp::detail {
/// src/runtime.cc: a communication error reached Python (see smp::shutdown).
void note_comm_failure();
}  // namespace smp::detail

namespace smp::python {
namespace {

// Owned for the life of the interpreter (exception classes are never freed).
PyObject* g_error = nullptr;
PyObject* g_config_error = nullptr;
PyObject* g_state_error = nullptr;
PyObject* g_comm_error = nullptr;
PyObject* g_timeout_error = nullptr;
PyObject* g_not_supported_error = nullptr;
PyObject* g_checkpoint_error = nullptr;
PyObject* g_corrupt_checkpoint_error = nullptr;
PyObject* g_unsafe_load_error = nullptr;

PyObject* new_exception(py::module_& m, const char* name, const char* doc,
                        std::initializer_list<PyObject*> bases) {
  py::tuple base_tuple(bases.size());
  std::size_t i = 0;
  for (PyObject* b : bases) base_tuple[i++] = py::reinterpret_borrow<py::object>(b);
  const std::string qualified = std::string("smp.") + name;
  PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base_tuple.ptr(), nullptr);
  if (cls == nullptr) throw py::error_already_set();
  m.add_object(name, py::reinterpret_borrow<py::object>(cls));
  return cls;
}

}  // namespace

void bind_errors(py::module_& m) {
  g_error = new_exception(m, "SMPError",
                          "Base class of every error raised by the smp engine.",
                          {PyExc_RuntimeError});
  g_config_error = new_exception(
      m, "ConfigError",
      "A bad smp config key or value, or a config that does not fit the world size.",
      {g_error, PyExc_ValueError});
  g_state_error = new_exception(
      m, "StateError", "An smp API used in the wrong state (init twice, a query before init).",
      {g_error});
  g_comm_error = new_exception(
      m, "CommError", "A failing communication call; the message names the group and rank.",
      {g_error});
  g_timeout_error = new_exception(
      m, "CommTimeoutError",
      "A blocking communication call that did not complete within its timeout.",
      {g_comm_error, PyExc_TimeoutError});
  g_not_supported_error = new_exception(
      m, "NotSupportedError", "An operation the selected backend does not implement.",
      {g_error, PyExc_NotImplementedError});

  g_checkpoint_error = new_exception(
      m, "CheckpointError",
      "A checkpoint that cannot be written or read: a failing system call, an incomplete, "
      "mixed or missing part, a layout mismatch, a refused pickle global, or a collective "
      "save whose participants did not all arrive.",
      {g_error});
  g_corrupt_checkpoint_error = new_exception(
      m, "CorruptCheckpointError",
      "A damaged checkpoint file: truncated, failing a CRC-32 check, inconsistent structure.",
      {g_checkpoint_error});
  g_unsafe_load_error = new_exception(
      m, "UnsafeLoadError",
      "A checkpoint that safe loading (weights_only=True) refuses: its pickle needs a global "
      "or hook beyond tensors, containers and primitives. Load it with weights_only=False "
      "only if you trust the file.",
      {g_checkpoint_error});

  // Messages are UTF-8, but may quote bytes of a damaged file that are not:
  // those are escaped (\xNN) instead of turning the error into UnicodeDecodeError.
  static auto set_error = [](PyObject* type, const char* what) {
    PyObject* text = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)),
                                          "backslashreplace");
    if (text == nullptr) {
      PyErr_Clear();
      PyErr_SetString(type, "(error message could not be decoded)");
      return;
    }
    PyErr_SetObject(type, text);
    Py_DECREF(text);
  };
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const smp::TimeoutError& e) {
      smp::detail::note_comm_failure();  // smp.shutdown then does not wait on the groups
      set_error(g_timeout_error, e.what());
    } catch (const smp::CommError& e) {
      smp::detail::note_comm_failure();
      set_error(g_comm_error, e.what());
    } catch (const smp::ConfigError& e) {
      set_error(g_config_error, e.what());
    } catch (const smp::StateError& e) {
      set_error(g_state_error, e.what());
    } catch (const smp::UnsafeLoadError& e) {
      set_error(g_unsafe_load_error, e.what());
    } catch (const smp::CorruptCheckpointError& e) {
      set_error(g_corrupt_checkpoint_error, e.what());
    } catch (const smp::CheckpointError& e) {
      set_error(g_checkpoint_error, e.what());
    } catch (const smp::NotSupportedError& e) {
      set_error(g_not_supported_error, e.what());
    } catch (const smp::Error& e) {
      set_error(g_error, e.what());
    }
  });
}

}  // namespace smp::python
