"""Crafts a broken copy of an exported model for the tests, then re-records its
files' sizes and SHA-256 in model.json (a consistent directory, as a user could have).

  craft_model.py DIR poison-encoder FRAMES   the audio encoder fails (ONNX Runtime's
      Reshape error) on any batch holding a clip longer than FRAMES fbank frames
  craft_model.py DIR misshape-decoder        the decoder's `logits` lose a vocabulary
      entry and `next_token` holds two tokens per row
"""

import hashlib
import json
import os
import sys

import numpy as np
import onnx
from onnx import helper as h
from onnx import numpy_helper as nh


def rename(graph, name):
    """Every use of tensor `name` becomes `name`_as_exported: a new node can then
    produce `name` from it."""
    for node in graph.node:
        node.output[:] = [o + "_as_exported" if o == name else o for o in node.output]
        node.input[:] = [i + "_as_exported" if i == name else i for i in node.input]
    return name + "_as_exported"


def poison_encoder(path, frames):
    model = onnx.load(path)
    g = model.graph
    before = rename(g, "audio_embeds")
    g.initializer.extend(
        [
            nh.from_array(np.ones(6, np.float32), "poison_six"),
            nh.from_array(np.array([4], np.int64), "poison_bad_shape"),
            nh.from_array(np.array([6], np.int64), "poison_good_shape"),
            nh.from_array(np.array(frames, np.float32), "poison_limit"),
            nh.from_array(np.array(0.0, np.float32), "poison_zero"),
        ]
    )
    # Reshape 6 values to [4] (an error) when the longest clip is past the limit;
    # the result, times zero, is added to the output so nothing prunes it.
    g.node.extend(
        [
            h.make_node("Cast", ["fbank_lengths"], ["poison_len"], to=onnx.TensorProto.FLOAT),
            h.make_node("ReduceMax", ["poison_len"], ["poison_max"], keepdims=0),
            h.make_node("Greater", ["poison_max", "poison_limit"], ["poison_hit"]),
            h.make_node(
                "Where", ["poison_hit", "poison_bad_shape", "poison_good_shape"], ["poison_shape"]
            ),
            h.make_node("Reshape", ["poison_six", "poison_shape"], ["poison_r"]),
            h.make_node("ReduceSum", ["poison_r"], ["poison_sum"], keepdims=0),
            h.make_node("Mul", ["poison_sum", "poison_zero"], ["poison_nothing"]),
            h.make_node("Add", [before, "poison_nothing"], ["audio_embeds"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, path)


def misshape_decoder(path):
    model = onnx.load(path)
    g = model.graph
    outputs = {o.name for o in g.output}
    logits = rename(g, "logits")
    g.initializer.extend(
        [
            nh.from_array(np.array(v, np.int64), k)
            for k, v in [("cut_starts", [0]), ("cut_ends", [-1]), ("cut_axes", [-1])]
        ]
    )
    g.node.append(h.make_node("Slice", [logits, "cut_starts", "cut_ends", "cut_axes"], ["logits"]))
    if "next_token" in outputs:
        token = rename(g, "next_token")
        g.node.append(h.make_node("Concat", [token, token], ["next_token"], axis=0))
    for o in g.output:
        if o.name in ("logits", "next_token"):
            for i, dim in enumerate(o.type.tensor_type.shape.dim):
                dim.Clear()
                dim.dim_param = f"{o.name}_{i}"
    onnx.checker.check_model(model)
    onnx.save(model, path)


def rehash(directory):
    path = os.path.join(directory, "model.json")
    with open(path) as f:
        manifest = json.load(f)

    def fix(node):
        if isinstance(node, dict):
            if {"path", "bytes", "sha256"} <= node.keys():
                file = os.path.join(directory, node["path"])
                node["bytes"] = os.path.getsize(file)
                with open(file, "rb") as f:
                    node["sha256"] = hashlib.sha256(f.read()).hexdigest()
            for value in node.values():
                fix(value)

    fix(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)


def main():
    directory, what = sys.argv[1], sys.argv[2]
    if what == "poison-encoder":
        poison_encoder(os.path.join(directory, "audio_encoder.onnx"), int(sys.argv[3]))
    elif what == "misshape-decoder":
        misshape_decoder(os.path.join(directory, "decoder.onnx"))
    else:
        sys.exit(f"unknown craft {what!r}")
    rehash(directory)


if __name__ == "__main__":
    main()
