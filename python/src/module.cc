// The extension smp._C: a thin adapter over libsmp. The Python package `smp`
// (python/smp) builds the public API on top of it; import torch before it.

#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "smp._C: bindings of the smp engine (libsmp). Use the `smp` package instead.";
  smp::python::bind_errors(m);
  smp::python::bind_config_topology(m);
  smp::python::bind_runtime(m);
  smp::python::bind_comm(m);
  smp::python::bind_nn(m);
  smp::python::bind_checkpoint(m);
  smp::python::bind_reshard(m);
  smp::python::bind_tools(m);
  smp::python::bind_model(m);
  smp::python::bind_pipeline(m);
}
