"""Regenerates every reference fixture: python -m rankstack_ref.generate OUT_DIR

Run through `cargo xtask fixtures` (which also refreshes fixtures/MANIFEST.json) rather than by hand.
"""

import sys

import torch

from . import (cases_dcnv2, cases_feature_encoders, cases_masknet, cases_peers, cases_ranker,
               cases_sequence_transformer, cases_torchrec, cases_trajectory)

GROUPS = {
    "dcnv2": cases_dcnv2.generate,
    "masknet": cases_masknet.generate,
    "feature_encoders": cases_feature_encoders.generate,
    "sequence_transformer": cases_sequence_transformer.generate,
    "transformer_encoder": cases_sequence_transformer.generate_encoder,
    "ranker": cases_ranker.generate,
    "torchrec": cases_torchrec.generate,
    "peers": cases_peers.generate,
    "trajectory": cases_trajectory.generate,
}


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: python -m rankstack_ref.generate OUT_DIR")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name, gen in GROUPS.items():
        gen(argv[1])
        print(f"generated {name}")


if __name__ == "__main__":
    main(sys.argv)
