"""Per-class NMS written as ONNX operators after a detector's raw outputs: the ``nms`` form of a detector export.

The steps are those of ``SSDLiteDetector.postprocess``: per class the ``topk`` best scores (TopK),
``NonMaxSuppression`` per class, then the ``max_detections`` best overall (TopK), with fixed output shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import require


def add_nms(
    proto: Any,
    num_anchors: int,
    num_classes: int,
    topk: int,
    nms_thresh: float,
    score_thresh: float,
    max_detections: int,
) -> int:
    """Append per-class NMS to a raw graph (outputs ``boxes``, ``scores``) in place; returns M, the detections kept.

    M is ``max_detections``, or fewer when the candidates (classes x ``topk``) are fewer.
    """
    onnx = require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    k = min(topk, num_anchors)
    m = min(max_detections, num_classes * k)
    graph = proto.graph
    rename = {"boxes": "raw_boxes", "scores": "raw_scores"}
    for node in graph.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
        node.input[:] = [rename.get(i, i) for i in node.input]
    del graph.output[:]

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"nms_{name}"))
        return f"nms_{name}"

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        graph.node.append(helper.make_node(op, inputs, outputs, name=f"nms_{outputs[0]}", **attrs))

    node("Transpose", ["raw_scores"], ["scores_t"], perm=[0, 2, 1])  # (B, C, A)
    node("TopK", ["scores_t", const("k", [k])], ["top_s", "top_i"], axis=-1)  # (B, C, k) per class
    node("Unsqueeze", ["raw_boxes", const("ax1", [1])], ["boxes_u"])  # (B, 1, A, 4)
    node("Shape", ["scores_t"], ["shape_bca"])
    node("Concat", ["shape_bca", const("four", [4])], ["shape_bca4"], axis=0)
    node("Expand", ["boxes_u", "shape_bca4"], ["boxes_e"])  # (B, C, A, 4)
    node("Unsqueeze", ["top_i", const("ax3", [3])], ["top_i_u"])
    node("Shape", ["top_i"], ["shape_bck"])
    node("Concat", ["shape_bck", "nms_four"], ["shape_bck4"], axis=0)
    node("Expand", ["top_i_u", "shape_bck4"], ["top_i_e"])
    node("GatherElements", ["boxes_e", "top_i_e"], ["cand"], axis=2)  # (B, C, k, 4) candidates per class
    node("Reshape", ["cand", const("shape_nk4", [-1, k, 4])], ["cand_r"])  # classes as NMS batches
    node("Reshape", ["top_s", const("shape_n1k", [-1, 1, k])], ["top_s_r"])
    node(
        "NonMaxSuppression",
        [
            "cand_r",
            "top_s_r",
            const("max_per_class", [k]),
            const("iou", [nms_thresh], np.float32),
            const("score", [score_thresh], np.float32),
        ],
        ["selected"],
        center_point_box=0,
    )
    node("Gather", ["selected", const("col0", 0)], ["sel_bc"], axis=1)
    node("Gather", ["selected", const("col2", 2)], ["sel_j"], axis=1)
    node("Mul", ["sel_bc", const("k_scalar", k)], ["sel_off"])
    node("Add", ["sel_off", "sel_j"], ["sel_pos"])  # position in the flat (B * C * k) candidates
    node("Reshape", ["top_s", const("flat", [-1])], ["flat_s"])
    node("Gather", ["flat_s", "sel_pos"], ["sel_s"], axis=0)
    node("Shape", ["flat_s"], ["flat_shape"])
    graph.node.append(
        helper.make_node(
            "ConstantOfShape",
            ["flat_shape"],
            ["minus_one"],
            name="nms_minus_one",
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1.0]),
        )
    )
    node("ScatterElements", ["minus_one", "sel_pos", "sel_s"], ["kept_s"], axis=0)  # -1 where suppressed
    node("Reshape", ["kept_s", const("shape_bck_flat", [-1, num_classes * k])], ["kept_b"])
    node("TopK", ["kept_b", const("m", [m])], ["det_s", "det_i"], axis=1)  # (B, M) best overall
    node("Div", ["det_i", "nms_k_scalar"], ["det_label"])
    node("Reshape", ["cand", const("shape_bck4_flat", [0, num_classes * k, 4])], ["cand_b"])
    node("Unsqueeze", ["det_i", const("ax2", [2])], ["det_i_u"])
    node("Shape", ["det_i"], ["shape_bm"])
    node("Concat", ["shape_bm", "nms_four"], ["shape_bm4"], axis=0)
    node("Expand", ["det_i_u", "shape_bm4"], ["det_i_e"])
    node("GatherElements", ["cand_b", "det_i_e"], ["det_b"], axis=1)
    node("Greater", ["det_s", const("half", -0.5, np.float32)], ["valid"])
    node("Where", ["valid", "det_s", const("zero_f", 0.0, np.float32)], ["scores"])
    node("Where", ["valid", "det_label", const("minus_one_i", -1)], ["labels"])
    node("Unsqueeze", ["valid", "nms_ax2"], ["valid_u"])
    node("Where", ["valid_u", "det_b", "nms_zero_f"], ["boxes"])
    node("Cast", ["valid"], ["valid_i"], to=TensorProto.INT64)
    node("ReduceSum", ["valid_i", "nms_ax1"], ["num_detections"], keepdims=0)
    graph.output.extend(
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", m, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", m]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", m]),
            helper.make_tensor_value_info("num_detections", TensorProto.INT64, ["batch"]),
        ]
    )
    del graph.value_info[:]  # shapes inferred for the old outputs no longer hold
    onnx.checker.check_model(proto)
    return m
