"""Triton Python-backend model: a CPU engine of cunet-optimize run by ONNX Runtime.

`cunet-optimize serve` copies this file as <model>/1/model.py into the repository it serves.
It runs inside the Triton server's own environment (serving/server_env.py: numpy < 2,
onnxruntime), never imports cunet_optimize, and opens the build's model.ort.onnx with the
session settings of its session.json, as engines/onnxrt.py's OnnxRuntimeRunner does, so served
outputs are the in-process outputs. The config's parameters name the build folder.

The dynamic batcher hands `execute` every request it gathered; they run as one batch.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        build_dir = config["parameters"]["build_dir"]["string_value"]
        with open(os.path.join(build_dir, "session.json")) as f:
            record = json.load(f)
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[record.get("load_optimization", "disable")]
        options.intra_op_num_threads = int(record.get("intra_op_threads", 0))
        options.inter_op_num_threads = int(record.get("inter_op_threads", 0))
        options.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if record.get("execution_mode") == "parallel"
                                  else ort.ExecutionMode.ORT_SEQUENTIAL)
        for key, value in record.get("session_config", {}).items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(os.path.join(build_dir, record["model"]), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [len(i) for i in images]
        outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(images)})
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + size]))
                       for name, out in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.session = None
