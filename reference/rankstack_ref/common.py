"""Building blocks shared by the reference layers (mirrors rankstack-nn)."""

import torch
from torch import nn

ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": nn.functional.gelu,
    "identity": lambda x: x,
}


class Mlp(nn.Module):
    """(dropout . act . norm . linear)^n, parameters layers.{i}.weight/bias and norms.{i}.weight/bias.

    config: {"dims": [...], "activation": str, "activate_last": bool, "normalization": "none"|"layer_norm"|"batch_norm",
    "dropout": float}
    """

    def __init__(self, input_dim, config):
        super().__init__()
        dims = config["dims"]
        self.act = ACTIVATIONS[config.get("activation", "relu")]
        self.activate_last = config.get("activate_last", True)
        self.layers = nn.ModuleList()
        ins = [input_dim] + dims[:-1]
        for i, o in zip(ins, dims):
            self.layers.append(nn.Linear(i, o))
        n_act = len(dims) if self.activate_last else len(dims) - 1
        if config.get("normalization", "none") == "layer_norm":
            self.norms = nn.ModuleList([nn.LayerNorm(d) for d in dims[:n_act]])
        elif config.get("normalization", "none") == "batch_norm":
            # Running statistics are buffers norms.{i}.running_mean / running_var / num_batches_tracked,
            # the names rankstack_nn::Mlp::buffers uses.
            self.norms = nn.ModuleList([nn.BatchNorm1d(d) for d in dims[:n_act]])
        else:
            self.norms = None
        self.dropout = nn.Dropout(config.get("dropout", 0.0))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers) or self.activate_last:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.dropout(self.act(x))
        return x
