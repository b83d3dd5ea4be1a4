"""crabnet: explainable deep learning on chemical compositions.

The package behind the eight workflow scripts at the repository root. Where each part lives: the
README's "Where things live" map and docs/layout.md.
"""

__version__ = "0.2.0"


def __getattr__(name: str):
    # ``from crabnet import load_model`` without importing torch for light users of the package
    if name == "load_model":
        from crabnet.predict import load_model

        return load_model
    raise AttributeError(f"module 'crabnet' has no attribute {name!r}")
