"""Fixture cases from peer modules that are not packaged (group "peers"): Pinterest's TransAct and
Twitter's MaskNet, written from their public code (`TransActPeer` in sequence_transformer.py,
`TwitterMaskNet` in masknet.py), and `torch.nn.TransformerEncoder` itself.

Each case writes the usual fixture (fixture.py) with the peer module's parameters and gradients
under the peer's names, metadata `peer` (the `rankstack import --from` name), `layer` and `config`
(the rankstack layer and config that reproduce the module), and
fixtures/peers/state_dicts/<case>.safetensors: `save_file(module.state_dict(), path)` in float32
(integer buffers as they are), the file a user hands to `rankstack import`.

Every module runs in eval mode with autograd on (PyTorch's "slow path", see sequence_transformer.py).
The first two TransAct cases have no padded position and no action at or after the request time:
there rankstack's default config reproduces TransAct. The others cover TransAct's quirks with the
config options that reproduce them: the max-pool over all positions (padding included), the strict
future mask (an action exactly at the request time is kept), raw ids remapped through
`action_vocab` (an unknown id becomes padding), no candidate fusion, no max-pool, every position
in the output. The newest position is always a valid past action (rankstack never masks it).
The nn.TransformerEncoder inputs carry a boolean `src_key_padding_mask` (`input.mask`, stored as
safetensors BOOL): the Rust side reads it through `read_safetensors`'s BOOL support.
"""

import os

import torch
from safetensors.torch import save_file
from torch import nn

from .fixture import init_params, randn, write_fixture
from .masknet import TwitterMaskNet
from .sequence_transformer import TransActPeer

REQUEST = 1_700_000_000_000  # ms


def transact_inputs(gen, b, s, e, num_types):
    """Full newest-first sequences of past actions (no padding, nothing at or after the request)."""
    req = torch.full((b,), REQUEST, dtype=torch.int64) + torch.randint(0, 10_000, (b,), generator=gen)
    types = torch.randint(1, num_types, (b, s), generator=gen)
    ages = torch.cumsum(torch.randint(1, 400, (b, s), generator=gen), 1)
    return {"action_types": types, "item_embeddings": randn(gen, b, s, e), "timestamps": req[:, None] - ages,
            "request_time": req, "candidate": randn(gen, b, e)}


def quirky_transact_inputs(gen, b, s, e, vocab, lengths, at_request=(), future=(), unknown=()):
    """Newest-first sequences of raw action ids from `vocab`, each row `lengths[i]` long then padded
    (raw id 0), with actions exactly at the request time (`at_request`), after it (`future`) and
    with an id outside the vocabulary (`unknown`), given as (row, position) pairs, position > 0."""
    req = torch.full((b,), REQUEST, dtype=torch.int64) + torch.randint(0, 10_000, (b,), generator=gen)
    ids = torch.tensor(vocab)[torch.randint(0, len(vocab), (b, s), generator=gen)]
    ts = req[:, None] - torch.cumsum(torch.randint(1, 400, (b, s), generator=gen), 1)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
        ts[i, n:] = 0
    for i, j in at_request:
        ts[i, j] = req[i]
    for i, j in future:
        ts[i, j] = req[i] + 25
    for i, j in unknown:
        ids[i, j] = max(vocab) - 1 if max(vocab) - 1 not in vocab else max(vocab) + 1
    return {"action_types": ids, "item_embeddings": randn(gen, b, s, e), "timestamps": ts, "request_time": req,
            "candidate": randn(gen, b, e)}


def transact_config(types, a, e, s, k, layers, heads, ff, **options):
    """The rankstack SequenceTransformer config that reproduces TransActPeer with these sizes."""
    return {"max_len": s, "num_action_types": types, "action_dim": a, "item_dim": e, "num_layers": layers,
            "num_heads": heads, "ff_dim": ff, "dropout": 0.0, "num_output_positions": k, "time_window_ms": 1000.0,
            **options}


# (case, batch, action types, action width, item width, S, K, layers, heads, feed-forward)
TRANSACT_CASES = [
    ("transact_b3_s6_k3", 3, 6, 4, 3, 6, 3, 2, 2, 8),
    ("transact_one_layer_b2_s4_k4", 2, 5, 2, 3, 4, 4, 1, 1, 6),
]

# (case, batch, TransAct action_vocab, action width, item width, S, latest_n_emb, layers, heads, feed-forward,
#  TransAct flags, rankstack options, input quirks)
TRANSACT_VARIANT_CASES = [
    ("transact_pool_all_strict_mask_vocab_b4_s6", 4, [0, 7, 3, 11, 5], 4, 3, 6, 2, 2, 2, 8, {},
     {"max_pool": "all_positions", "future_mask": "after", "action_vocab": [7, 3, 11, 5]},
     {"lengths": [6, 4, 3, 5], "at_request": [(1, 2), (3, 1)], "future": [(2, 1)], "unknown": [(3, 3)]}),
    ("transact_no_candidate_no_pool_all_positions_b3_s4", 3, [0, 1, 2, 3, 4], 2, 4, 4, 0, 1, 2, 6,
     {"concat_candidate_emb": False, "concat_max_pool": False},
     {"fusion": "none", "max_pool": "none", "all_output_positions": True, "future_mask": "after"},
     {"lengths": [4, 2, 3], "at_request": [(0, 1)]}),
]


def twitter_block(output_size, **kw):
    return {"output_size": output_size, **kw}


def rankstack_block(output_dim, **kw):
    return {"output_dim": output_dim, "hidden_bias": True, "activation": "identity", **kw}


# (case, batch, m, Twitter config, rankstack layer, rankstack config)
TWITTER_CASES = [
    ("twitter_parallel_b4_m6", 4, 6,
     {"use_parallel": True, "mask_blocks": [twitter_block(4, reduction_factor=2.0)] * 2},
     "ParallelMaskNet", {"num_blocks": 2, "block": rankstack_block(4, projection_ratio=2.0), "top_mlp": None}),
    # int(1.5 * 5) = 7 where rankstack rounds to 8: the config states the width.
    ("twitter_parallel_truncated_rf_input_ln_b3_m5", 3, 5,
     {"use_parallel": True, "mask_blocks": [twitter_block(3, reduction_factor=1.5, input_layer_norm=True)] * 3},
     "ParallelMaskNet",
     {"num_blocks": 3, "block": rankstack_block(3, aggregation_dim=7, input_layer_norm=True), "top_mlp": None}),
    # Blocks that differ, and rf 1.25 on m = 10 truncated to 12 (rounded: 13).
    ("twitter_parallel_per_block_truncate_b3_m10", 3, 10,
     {"use_parallel": True, "mask_blocks": [twitter_block(4, reduction_factor=1.25),
                                            twitter_block(3, aggregation_size=6, input_layer_norm=True)]},
     "ParallelMaskNet", {"blocks": [rankstack_block(4, projection_ratio=1.25, aggregation_rounding="truncate"),
                                    rankstack_block(3, aggregation_dim=6, input_layer_norm=True)], "top_mlp": None}),
    ("twitter_serial_b3_m6", 3, 6,
     {"use_parallel": False, "mask_blocks": [twitter_block(5, aggregation_size=4),
                                             twitter_block(3, reduction_factor=1.0, input_layer_norm=True)]},
     "SerialMaskNet", {"blocks": [rankstack_block(5, aggregation_dim=4),
                                  rankstack_block(3, aggregation_dim=6, input_layer_norm=True)]}),
]

# (case, batch, S, d_model, nhead, dim_feedforward, num_layers, norm_first, padded positions (row, position),
#  options: activation, bias, final_norm)
TORCH_TRANSFORMER_CASES = [
    ("torch_transformer_post_norm_b3_s5_d8", 3, 5, 8, 2, 16, 2, False, [(0, 4), (1, 2), (1, 3), (1, 4)], {}),
    ("torch_transformer_pre_norm_b2_s4_d6", 2, 4, 6, 3, 10, 1, True, [(1, 0), (1, 3)], {}),
    ("torch_transformer_gelu_no_bias_final_norm_b2_s5_d8", 2, 5, 8, 2, 12, 2, False, [(0, 3), (0, 4)],
     {"activation": "gelu", "bias": False, "final_norm": True}),
]


def unit_norm_weights(module, gen):
    """LayerNorm scales near 1 (init_params draws them near 0 when the name does not say `norm.`)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + randn(gen, *p.shape, scale=0.1))


def emit(out_dir, case, seed, gen, module, inputs, forward, *, peer, layer, config, peer_config, meta=None):
    module.eval()
    write_fixture(out_dir, "peers", case, layer=layer, config=config, module=module, inputs=inputs, forward=forward,
                  seed=seed, extra_meta={"peer": peer, "peer_config": peer_config, **(meta or {})})
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}
    path = os.path.join(out_dir, "peers", "state_dicts")
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, f"{case}.safetensors"))


def generate(out_dir):
    for i, (case, b, types, a, e, s, k, layers, heads, ff) in enumerate(TRANSACT_CASES):
        seed = 9000 + i
        gen = torch.Generator().manual_seed(seed)
        module = TransActPeer(list(range(types)), a, e, s, latest_n_emb=k, nhead=heads, num_encoder_layers=layers,
                              dim_feedforward=ff)
        init_params(module, gen)
        unit_norm_weights(module, gen)
        with torch.no_grad():
            module.action_emb_module.weight[0] = 0.0  # the padding row (padding_idx=0) stays zero
        emit(out_dir, case, seed, gen, module, transact_inputs(gen, b, s, e, types),
             lambda m, x: m(x["action_types"], x["item_embeddings"], x["timestamps"], x["request_time"], x["candidate"]),
             peer="transact", layer="SequenceTransformer", config=transact_config(types, a, e, s, k, layers, heads, ff),
             peer_config={"action_vocab": list(range(types)), "action_emb_dim": a, "item_emb_dim": e, "seq_len": s,
                          "latest_n_emb": k, "nhead": heads, "num_encoder_layers": layers, "dim_feedforward": ff})
    for i, (case, b, vocab, a, e, s, k, layers, heads, ff, flags, options, quirks) in enumerate(TRANSACT_VARIANT_CASES):
        seed = 9050 + i
        gen = torch.Generator().manual_seed(seed)
        module = TransActPeer(vocab, a, e, s, latest_n_emb=k, nhead=heads, num_encoder_layers=layers,
                              dim_feedforward=ff, **flags)
        init_params(module, gen)
        unit_norm_weights(module, gen)
        with torch.no_grad():
            module.action_emb_module.weight[0] = 0.0
        inputs = quirky_transact_inputs(gen, b, s, e, vocab[1:], **quirks)
        emit(out_dir, case, seed, gen, module, inputs,
             lambda m, x: m(x["action_types"], x["item_embeddings"], x["timestamps"], x["request_time"], x["candidate"]),
             peer="transact", layer="SequenceTransformer",
             config=transact_config(len(vocab), a, e, s, k, layers, heads, ff, **options),
             peer_config={"action_vocab": vocab, "action_emb_dim": a, "item_emb_dim": e, "seq_len": s,
                          "latest_n_emb": k, "nhead": heads, "num_encoder_layers": layers, "dim_feedforward": ff,
                          **flags})
    for i, (case, b, m, twitter, layer, config) in enumerate(TWITTER_CASES):
        seed = 9100 + i
        gen = torch.Generator().manual_seed(seed)
        module = TwitterMaskNet(twitter, m)
        init_params(module, gen)
        unit_norm_weights(module, gen)
        emit(out_dir, case, seed, gen, module, {"x": randn(gen, b, m)}, lambda mod, x: mod(x["x"])["output"],
             peer="twitter-masknet", layer=layer, config=config, peer_config=twitter, meta={"input_dim": m})
    for i, (case, b, s, d, heads, ff, layers, norm_first, padded, options) in enumerate(TORCH_TRANSFORMER_CASES):
        seed = 9200 + i
        gen = torch.Generator().manual_seed(seed)
        bias = options.get("bias", True)
        encoder_layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ff, dropout=0.0, batch_first=True,
                                                   norm_first=norm_first, activation=options.get("activation", "relu"),
                                                   bias=bias)
        norm = nn.LayerNorm(d, bias=bias) if options.get("final_norm") else None
        module = nn.TransformerEncoder(encoder_layer, layers, norm=norm, enable_nested_tensor=False)
        init_params(module, gen)
        unit_norm_weights(module, gen)
        mask = torch.zeros(b, s, dtype=torch.bool)
        for row, pos in padded:
            mask[row, pos] = True
        config = {"d_model": d, "nhead": heads, "dim_feedforward": ff, "num_layers": layers, "dropout": 0.0,
                  "norm_first": norm_first, "layer_norm_eps": 1e-5, **options}
        emit(out_dir, case, seed, gen, module, {"x": randn(gen, b, s, d), "mask": mask},
             lambda mod, x: mod(x["x"], src_key_padding_mask=x["mask"]),
             peer="torch-transformer", layer="TransformerEncoder", config=config, peer_config=config)
