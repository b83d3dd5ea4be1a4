"""crabnet: explainable deep learning on chemical compositions.

The package behind the eight workflow scripts at the repository root:

- ``crabnet.elements``  element symbols and element feature tables (CBFV)
- ``crabnet.data``      dataset fetching, formula parsing, element-derived matrices (EDM)
- ``crabnet.model``     the CrabNet transformer with optional per-head attention capture
- ``crabnet.optim``     Lamb, Lookahead and the SWA scheme of the CrabNet recipe
- ``crabnet.train``     training loop, prediction, checkpoints
- ``crabnet.capture``   streaming attention captures to Zarr and reading them back
- ``crabnet.cli``       command-line flags shared by the scripts
"""

__version__ = "0.1.0"
