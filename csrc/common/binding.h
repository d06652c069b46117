// What both Python modules (lrtrain.update._cpu, lrtrain.update._cuda) bind alike: the UpdateArgs class,
// the names of its fields and of a layer's inputs (checked against lrtrain/update/dispatch.py at load), the
// constants the kernels were compiled with and the torch version the module was built against (checked
// against lrtrain/update/constants.py and the running torch: lrtrain/update/backends.py refuses a mismatch).
#pragma once

#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "../batched/update.h"

#ifndef LRTRAIN_TORCH_VERSION
#error "LRTRAIN_TORCH_VERSION (the torch version this module is built against) must be defined by setup.py"
#endif

namespace lrtrain {

// ([U, S, V, R_U, R_V] per layer, padded to a width ≥ its rank; rank (L) int; status (L) int).
using GroupResult = std::tuple<std::vector<std::vector<Tensor>>, Tensor, Tensor>;

inline std::vector<LayerInputs> group_inputs(const std::vector<std::vector<Tensor>>& inputs) {
  TORCH_CHECK(!inputs.empty(), "update_group: no layers");
  std::vector<LayerInputs> layers;
  layers.reserve(inputs.size());
  for (const auto& t : inputs) layers.push_back(layer_inputs(t));
  return layers;
}

inline void bind_common(py::module_& m) {
  py::class_<UpdateArgs>(m, "UpdateArgs", "One param group's update settings (lrtrain.update.dispatch.UpdateArgs)")
      .def(py::init<>())
      .def_readwrite("max_rank", &UpdateArgs::max_rank)
      .def_readwrite("augment", &UpdateArgs::augment)
      .def_readwrite("lr", &UpdateArgs::lr)
      .def_readwrite("tau", &UpdateArgs::tau)
      .def_readwrite("min_rank", &UpdateArgs::min_rank)
      .def_readwrite("spare", &UpdateArgs::spare)
      .def_readwrite("max_sweeps", &UpdateArgs::max_sweeps);
  m.attr("UPDATE_ARGS") = py::make_tuple("max_rank", "augment", "lr", "tau", "min_rank", "spare", "max_sweeps");
  m.attr("LAYER_INPUTS") = py::make_tuple("U", "S_decayed", "V", "G_K", "G_L", "D_K", "D_L", "D_S");
  m.attr("TORCH_VERSION") = LRTRAIN_TORCH_VERSION;
  m.def("constants", []() {
    py::dict d;
#define LRTRAIN_REPORT(name) d[#name] = name;
    LRTRAIN_CONSTANTS(LRTRAIN_REPORT)
#undef LRTRAIN_REPORT
    return d;
  }, "The constants this module was compiled with (lrtrain/update/constants.py at build time)");
}

}  // namespace lrtrain
