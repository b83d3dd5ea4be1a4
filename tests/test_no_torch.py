"""Reading a capture store and building the pages (the explorer and the report) import no torch.

A reader of results (a laptop without torch, a web server) needs only numpy and zarr: the store reader
lives in ``crabnet.explain.store`` and the pages in ``crabnet.web``. Checked in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_videos import write_store

from crabnet.layout import Layout
from crabnet.training.checkpoint import save_checkpoint
from crabnet.training.recipe import Scaler, build_model

READER = """
import json, sys
from pathlib import Path

from crabnet.explain.store import AttentionStore
from crabnet.web.explorer import write_explorer
from crabnet.web.report import write_report

root = Path(sys.argv[1])
store = AttentionStore(root / "attention" / "synth" / "attention.zarr")
history = store.compound(store.find("Fe2O3"))
write_explorer(store, root / "explorer" / "synth.html", "synth")
report = write_report(root)
print(json.dumps({"torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                  "captures": len(history.prediction), "report": str(report)}))
"""


def test_reading_a_store_and_building_the_pages_imports_no_torch(tmp_path: Path):
    write_store(tmp_path)
    model = build_model("onehot", n_elements=4, d_model=32, n_layers=1, n_heads=2, d_ff=32)  # a checkpoint to list
    save_checkpoint(Layout(tmp_path).checkpoint("synth", "onehot"), model, Scaler(1.0, 2.0), {"dataset": "synth"})
    out = subprocess.run([sys.executable, "-c", READER, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["captures"] > 1 and Path(result["report"]).is_file()  # the work was really done
    assert "synth__onehot" in Path(result["report"]).read_text()  # the checkpoint's metadata was read
    assert (tmp_path / "explorer" / "synth.html").stat().st_size > 1000
    assert result["torch"] == [], f"torch was imported: {result['torch'][:5]}"
