"""A small training run through ``crabnet.jobs.cli.run``, started as a subprocess by tests/test_preempt.py.

Usage: ``python tests/preempt_job.py DATA_DIR CHECKPOINT EPOCHS``; trains a small HotCrab on the
dataset ``tiny`` with its training state in ``DATA_DIR/models/tiny.state.pt`` and saves the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SMALL = {"d_model": 32, "n_heads": 2, "d_ff": 64, "head_dims": (32, 16)}


def train(data_dir: Path, checkpoint: Path, epochs: int) -> int:
    """Train (or go on training) and save the checkpoint; the state file is removed at the end."""
    import torch

    from crabnet.data import load_dataset
    from crabnet.training.checkpoint import save_checkpoint
    from crabnet.training.loop import fit
    from crabnet.training.recipe import Recipe, Scaler, build_model
    from crabnet.utils import seed_everything

    torch.set_num_threads(1)
    splits = load_dataset(data_dir, "tiny", fetch=False, verbose=False)
    seed_everything(0)
    model = build_model("onehot", **SMALL)
    scaler = Scaler.fit(splits["train"].target)
    state = data_dir / "models" / "tiny.state.pt"
    recipe = Recipe(epochs=epochs, epochs_step=1, batch_size=16, early_stop=0)
    fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        recipe,
        desc="tiny onehot",
        state_path=state,
        state_key={"dataset": "tiny"},
    )
    save_checkpoint(checkpoint, model, scaler)
    state.unlink()
    return 0


if __name__ == "__main__":
    from crabnet.jobs.cli import run

    data_dir, checkpoint, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    raise SystemExit(run(train, argparse.Namespace(data_dir=data_dir, checkpoint=checkpoint, epochs=epochs)))
