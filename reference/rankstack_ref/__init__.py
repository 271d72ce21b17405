"""Independent PyTorch reference implementations of the rankstack layers.

Each layer is written from its published formula (see the docstrings), with parameter names equal to
the Rust parameter names, so that `module.state_dict()` is a rankstack checkpoint. `generate.py`
writes the fixtures that the Rust tests compare against.
"""
