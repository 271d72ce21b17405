"""The real Triton Python client against `rankstack serve` (run by tests/serve.rs).

Usage: serve_tritonclient.py HOST:PORT MODEL REQUEST.json

REQUEST.json is an infer request body (JSON tensors; null = a missing dense value). The script
checks liveness, readiness, the metadata and the config with `tritonclient.http`, sends the
request's inputs as numpy arrays (NaN = missing) in binary tensors, asking for binary outputs (the
client's default) and for JSON outputs, checks that JSON inputs holding NaN get the documented
400, and prints one JSON line: {"inputs": [metadata inputs], "binary": [[bits of task t, row r]],
"json": [...], "json_nan_refused": true}, each probability as its float32 bit pattern so that the
caller can compare bits.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

NP_TYPES = {"FP32": np.float32, "INT64": np.int64}


def flat(data):
    """Row-major values of a (possibly nested) JSON list."""
    if isinstance(data, list):
        return [v for item in data for v in flat(item)]
    return [data]


def main():
    url, model, request_path = sys.argv[1:4]
    with open(request_path) as f:
        request = json.load(f)
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), "model not ready"
    metadata = client.get_model_metadata(model)
    declared = {i["name"]: i for i in metadata["inputs"]}
    outputs = [o["name"] for o in metadata["outputs"]]
    config = client.get_model_config(model)
    assert config["max_batch_size"] > 0, config

    def tensors(binary):
        inputs = []
        for tensor in request["inputs"]:
            spec = declared[tensor["name"]]
            assert spec["datatype"] == tensor["datatype"], (spec, tensor)
            data = [np.nan if v is None else v for v in flat(tensor["data"])]
            array = np.array(data, dtype=NP_TYPES[tensor["datatype"]]).reshape(tensor["shape"])
            inp = httpclient.InferInput(tensor["name"], list(array.shape), tensor["datatype"])
            inp.set_data_from_numpy(array, binary_data=binary)
            inputs.append(inp)
        return inputs

    # Missing dense values are NaN in numpy: binary inputs carry them (JSON cannot).
    results = {"inputs": metadata["inputs"]}
    for mode, binary_outputs in (("binary", True), ("json", False)):
        requested = [httpclient.InferRequestedOutput(name, binary_data=binary_outputs) for name in outputs]
        result = client.infer(model, tensors(True), outputs=requested, request_id=mode)
        assert result.get_response()["id"] == mode
        results[mode] = [result.as_numpy(name).astype(np.float32).view(np.uint32).tolist() for name in outputs]
    # No outputs named: the client asks for every output as binary data.
    default = client.infer(model, tensors(True))
    assert default.as_numpy(outputs[0]).view(np.uint32).tolist() == results["binary"][0]
    # JSON inputs holding NaN: the documented 400, raised by the client as its exception.
    has_nan = any(v is None for t in request["inputs"] for v in flat(t["data"]))
    if has_nan:
        try:
            client.infer(model, tensors(False))
            raise AssertionError("NaN in JSON was accepted")
        except InferenceServerException as e:
            assert e.status() == "400" and "send null for a missing dense value" in e.message(), e
        results["json_nan_refused"] = True
    print(json.dumps(results))


if __name__ == "__main__":
    main()
