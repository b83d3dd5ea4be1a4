"""crabnet: explainable deep learning on chemical compositions.

The package behind the eight workflow scripts at the repository root:

- ``crabnet.elements``     element symbols and element feature tables (CBFV)
- ``crabnet.data``         dataset fetching, formula parsing, element-derived matrices (EDM)
- ``crabnet.training.model``        the CrabNet transformer with optional per-head attention capture
- ``crabnet.training.optim``        Lamb, Lookahead and the CrabNet SWA rule
- ``crabnet.training``     recipe, loop, state, evaluate, checkpoint: the recipes, training loop, checkpoints
- ``crabnet.predict``      ``load_model(path).predict(formulas)`` and ``python -m crabnet.predict``
- ``crabnet.explain.capture``      streaming attention captures to Zarr and reading them back
- ``crabnet.explain.video``        attention and prediction-progress videos (step 2)
- ``crabnet.web.explorer``  the offline attention explorer page (step 2)
- ``crabnet.web.report``  ``data/index.html``, the report of every output (``crabnet/web/``: their HTML, CSS, JS)
- ``crabnet.oxidation``    oxidation-state guesses (step 3)
- ``crabnet.embeddings``   Q/K/V element embeddings (step 4)
- ``crabnet.correlation``  element correlation matrices (step 5)
- ``crabnet.maps.vectors``    local and global EDM vectors, cached (steps 6, 7)
- ``crabnet.maps.projection``   UMAP parameters, cached projection, kNN metrics (steps 6, 7)
- ``crabnet.maps.figures``   colourings and layer × colouring figures (steps 6, 7)
- ``crabnet.maps.steps``     the chain of steps 6 and 7: model -> vectors -> UMAP -> metrics -> figures
- ``crabnet.layout``       every path under --data-dir, dataset discovery, the benchmark set list
- ``crabnet.stats``        dataset statistics (step 8)
- ``crabnet.reference``    published reference tables shipped with the package
- ``crabnet.jobs.cli``, ``crabnet.plotting``, ``crabnet.utils``  shared command-line flags, figure and file helpers
"""

__version__ = "0.2.0"


def __getattr__(name: str):
    # ``from crabnet import load_model`` without importing torch for light users of the package
    if name == "load_model":
        from crabnet.predict import load_model

        return load_model
    raise AttributeError(f"module 'crabnet' has no attribute {name!r}")
