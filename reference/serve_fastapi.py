"""The PyTorch baseline of `cargo xtask serve-bench`: what a PyTorch user would deploy — the same
checkpoint in the reference model (`rankstack_ref.ranker`) behind a minimal FastAPI endpoint on
uvicorn, taking the same Open Inference Protocol JSON bodies as `rankstack serve`.

    python reference/serve_fastapi.py CHECKPOINT_DIR PORT [--threads 2]

One uvicorn worker; `POST /v2/models/{name}/infer` parses the JSON, builds the reference model's
inputs (user-level inputs sent with first dimension 1 are expanded to the candidates), scores under
`torch.no_grad()` (eval mode: `nn.TransformerEncoder` may take PyTorch's fast path, as a default
deployment would), and answers `p_<task>` outputs. Each request is scored alone, in arrival order
(an `async` endpoint that computes inline: no batching, no thread oversubscription). It is a
benchmark baseline, not a server: no input checks beyond what PyTorch raises.
"""

import argparse
import json
import os
import sys

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rankstack_ref import ranker  # noqa: E402


def build_app(ckpt):
    model = ranker.load(ckpt)
    model.eval()
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    features = config["features"]
    tasks = [t["name"] for t in config["tasks"]]
    app = FastAPI()

    def tensor(t, dtype):
        return torch.tensor(t["data"], dtype=dtype).reshape(t["shape"])

    def inputs_of(body):
        t = {i["name"]: i for i in body["inputs"]}
        dense_names = [d["name"] for d in features.get("dense", [])]
        b = max(i["shape"][0] for i in body["inputs"])
        x = {}
        if dense_names:
            x["dense"] = torch.stack([tensor(t[n], torch.float32).reshape(b) for n in dense_names], dim=1)
        for f in features.get("sparse", []):
            rows = tensor(t[f["name"]], torch.int64).reshape(b, -1)
            ids, offsets = [], []
            for row in rows.tolist():
                offsets.append(len(ids))
                ids.extend(v for v in row if v != -1)
            x[f"sparse.{f['name']}.ids"] = torch.tensor(ids, dtype=torch.int64)
            x[f"sparse.{f['name']}.offsets"] = torch.tensor(offsets, dtype=torch.int64)
        for f in features.get("embedding", []):
            x[f"embedding.{f['name']}"] = tensor(t[f["name"]], torch.float32)
        if config.get("sequence") is not None:
            def user(name, key, dtype):
                v = tensor(t[name], dtype)
                x[key] = v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v

            user("seq_action_types", "seq.action_types", torch.int64)
            user("seq_timestamps", "seq.timestamps", torch.int64)
            user("request_time", "seq.request_time", torch.int64)
            if "seq_item_ids" in t:
                user("seq_item_ids", "seq.item_ids", torch.int64)
                x["seq.candidate_id"] = tensor(t["candidate_item_id"], torch.int64)
            else:
                user("seq_item_embeddings", "seq.item_embeddings", torch.float32)
                x["seq.candidate"] = tensor(t["candidate_item_embedding"], torch.float32)
        return x, b

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        body = json.loads(await request.body())
        x, b = inputs_of(body)
        with torch.no_grad():
            p = torch.sigmoid(model(x))
        outputs = [
            {"name": f"p_{task}", "datatype": "FP32", "shape": [b], "data": p[:, k].tolist()}
            for k, task in enumerate(tasks)
        ]
        return JSONResponse({"model_name": name, "outputs": outputs})

    return app


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("port", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    app = build_app(args.checkpoint)
    print(f"listening on http://127.0.0.1:{args.port}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
