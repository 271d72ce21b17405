"""TransAct sequence encoder on top of torch.nn.TransformerEncoder itself.

Fixtures run with autograd enabled (they backpropagate), so nn.TransformerEncoderLayer takes its
"slow path" in both train and eval mode: masked positions still get outputs (the no-grad inference
fast path would zero them). The Rust crate implements this path.

  type_j   = index of the raw id in action_vocab, plus 1 (0 when not listed)   (only with action_vocab)
  tokens_j = [action_emb(type_j) || item_j || candidate]        (concat; append: extra token; none: no candidate)
  mask_j   = type_j == 0 or t_j >= request (future_mask "after": t_j > request)
             or (window given and request - t_j < window), mask_0 = False
  H        = TransformerEncoder(tokens (+ pos_emb), src_key_padding_mask=mask)   (activation, bias, final norm)
  out      = [pool_proj(max over unmasked H) || H_0 || ... || H_{K-1}]
             (max_pool "all_positions": max over every position; "none": no pooled block;
              all_output_positions: K = max_len)
"""

import torch
from torch import nn

DEFAULTS = {
    "max_len": 100,
    "num_action_types": 16,
    "action_dim": 32,
    "item_dim": 32,
    "fusion": "concat",
    "num_layers": 2,
    "num_heads": 2,
    "ff_dim": 32,
    "dropout": 0.1,
    "norm_first": False,
    "layer_norm_eps": 1e-5,
    "positional": "none",
    "num_output_positions": 10,
    "time_window_ms": 3600000.0,
    "seed": 0,
    "max_pool": "unmasked",
    "future_mask": "at_or_after",
    "all_output_positions": False,
    "action_vocab": None,
    "activation": "relu",
    "bias": True,
    "final_norm": False,
    "time_window_sampling": "per_example",
}


def model_dim(c):
    return c["action_dim"] + (2 if c["fusion"] == "concat" else 1) * c["item_dim"]


def output_dim(c):
    """(K + 1) * d, or K * d without a max-pool; K = max_len with all_output_positions."""
    k = c["max_len"] if c["all_output_positions"] else c["num_output_positions"]
    return (k + (0 if c["max_pool"] == "none" else 1)) * model_dim(c)


def remap(types, vocab):
    """Raw id vocab[i] -> i + 1, every other id -> 0 (padding)."""
    out = torch.zeros_like(types)
    for i, raw in enumerate(vocab):
        out[types == raw] = i + 1
    return out


class SequenceTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = {**DEFAULTS, **config}
        self.c = c
        d = model_dim(c)
        tokens = c["max_len"] + (1 if c["fusion"] == "append" else 0)
        self.action_emb = nn.Embedding(c["num_action_types"], c["action_dim"], padding_idx=0)
        if c["positional"] == "learned":
            self.pos_emb = nn.Embedding(tokens, d)
        if c["fusion"] == "append":
            self.candidate_token = nn.Parameter(torch.zeros(c["action_dim"]))
        layer = nn.TransformerEncoderLayer(d, c["num_heads"], dim_feedforward=c["ff_dim"], dropout=c["dropout"],
                                           activation=c["activation"], layer_norm_eps=c["layer_norm_eps"],
                                           batch_first=True, norm_first=c["norm_first"], bias=c["bias"])
        norm = nn.LayerNorm(d, eps=c["layer_norm_eps"], bias=c["bias"]) if c["final_norm"] else None
        self.encoder = nn.TransformerEncoder(layer, c["num_layers"], norm=norm, enable_nested_tensor=False)
        if c["max_pool"] != "none":
            self.pool_proj = nn.Linear(d, d)

    def forward(self, inputs):
        c = self.c
        s = c["max_len"]
        types, items, ts = inputs["action_types"], inputs["item_embeddings"], inputs["timestamps"]
        req, cand = inputs["request_time"], inputs["candidate"]
        b, s_in = types.shape
        if s_in >= s:
            types, items, ts = types[:, :s], items[:, :s], ts[:, :s]
        else:
            pad = s - s_in
            types = torch.cat([types, torch.zeros(b, pad, dtype=types.dtype)], 1)
            ts = torch.cat([ts, torch.zeros(b, pad, dtype=ts.dtype)], 1)
            items = torch.cat([items, torch.zeros(b, pad, items.shape[2], dtype=items.dtype)], 1)
        if c["action_vocab"] is not None:
            types = remap(types, c["action_vocab"])
        future = ts > req[:, None] if c["future_mask"] == "after" else ts >= req[:, None]
        mask = (types == 0) | future
        if "window_ms" in inputs:
            mask = mask | ((req[:, None] - ts) < inputs["window_ms"][:, None])
        mask[:, 0] = False
        # Padding (type 0) gets a zero action embedding whatever row 0 holds (a state dict may carry
        # a non-zero padding row), as in the Rust crate; padded positions matter to the max-pool
        # over all positions and to all_output_positions.
        a = self.action_emb(types) * (types != 0)[:, :, None].to(self.action_emb.weight.dtype)
        if c["fusion"] == "concat":
            x = torch.cat([a, items, cand[:, None, :].expand(b, s, cand.shape[1])], 2)
        elif c["fusion"] == "none":
            x = torch.cat([a, items], 2)
        else:
            tok = torch.cat([self.candidate_token.expand(b, 1, -1), cand[:, None, :]], 2)
            x = torch.cat([torch.cat([a, items], 2), tok], 1)
            mask = torch.cat([mask, torch.zeros(b, 1, dtype=torch.bool)], 1)
        if c["positional"] == "learned":
            x = x + self.pos_emb.weight[None]
        h = self.encoder(x, src_key_padding_mask=mask)
        parts = []
        if c["max_pool"] == "unmasked":
            parts.append(self.pool_proj(h.masked_fill(mask[:, :, None], float("-inf")).amax(1)))
        elif c["max_pool"] == "all_positions":
            parts.append(self.pool_proj(h.max(1).values))  # gradient to the first maximal position
        k = s if c["all_output_positions"] else c["num_output_positions"]
        if k > 0:
            parts.append(h[:, :k].reshape(b, -1))
        return torch.cat(parts, 1)


class TransActPeer(nn.Module):
    """Pinterest's TransAct module as its public code computes it (transformer_user_action,
    transact.py), written from that code, with its parameter names: `action_emb_module`,
    `transformer_encoder`, `out_linear`, and the buffer `action_type_lookup` (raw action id -> row of
    the action table; unknown ids -> 0, padding). Its quirks, kept here:
      - the max-pool runs over all S positions, padded and masked ones included;
      - the future mask is strict: `t > request_time` (an action at the request time is kept);
      - action ids are remapped through `action_vocab`;
      - the training window is one random integer number of milliseconds per batch.
    With no padded position and no action at or after the request time, the default rankstack
    config computes the same function (`cases_peers.py`).
    """

    def __init__(self, action_vocab, action_emb_dim, item_emb_dim, seq_len, time_window_ms=3_600_000,
                 latest_n_emb=10, nhead=2, num_encoder_layers=2, dim_feedforward=32, dropout=0.0,
                 concat_candidate_emb=True, concat_max_pool=True):
        super().__init__()
        self.seq_len = seq_len
        self.time_window_ms = time_window_ms
        self.latest_n_emb = latest_n_emb
        self.concat_candidate_emb = concat_candidate_emb
        self.concat_max_pool = concat_max_pool
        lookup = torch.zeros(max(action_vocab) + 1, dtype=torch.int64)
        for idx, action in enumerate(action_vocab):
            lookup[action] = idx
        self.register_buffer("action_type_lookup", lookup)
        self.action_emb_module = nn.Embedding(len(action_vocab), action_emb_dim, padding_idx=0)
        d = action_emb_dim + item_emb_dim + (item_emb_dim if concat_candidate_emb else 0)
        layer = nn.TransformerEncoderLayer(d_model=d, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                                           activation="relu", batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers=num_encoder_layers,
                                                         enable_nested_tensor=False)
        if concat_max_pool:
            self.out_linear = nn.Linear(d, d)

    def forward(self, action_type_seq, item_embedding_seq, action_time_seq, request_time, item_embedding):
        action_type_seq = self.action_type_lookup[action_type_seq[:, : self.seq_len]]
        item_embedding_seq = item_embedding_seq[:, : self.seq_len]
        action_time_seq = action_time_seq[:, : self.seq_len]
        action_emb = self.action_emb_module(action_type_seq)
        key_padding_mask = action_type_seq <= 0
        request = request_time.unsqueeze(-1).expand(-1, action_type_seq.shape[1])
        if self.training:
            window = int(torch.randint(0, self.time_window_ms + 1, ()).item())
            key_padding_mask = key_padding_mask | ((request - action_time_seq) < window)
        else:
            key_padding_mask = key_padding_mask | ((request - action_time_seq) < 0)
        x = torch.cat((action_emb, item_embedding_seq), dim=2)
        if self.concat_candidate_emb:
            x = torch.cat((x, item_embedding.unsqueeze(1).expand(-1, x.shape[1], -1)), dim=2)
        out = self.transformer_encoder(src=x, src_key_padding_mask=key_padding_mask)
        parts = []
        if self.concat_max_pool:
            parts.append(self.out_linear(out.max(dim=1)[0]))
        if self.latest_n_emb > 0:
            out = out[:, : self.latest_n_emb]
        parts.append(out.flatten(1))
        return torch.cat(parts, dim=1)
