"""notebooks/play.ipynb runs headless (nbclient) against a tiny model trained by the tests, and shows what it
promises."""
import base64

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_play_notebook_runs_and_shows_everything(reference, monkeypatch):
    # the tiny model test_train.py trains (conftest.py), and its log.txt beside it; the first cell reads it
    monkeypatch.setenv("PLAY_CHECKPOINT", str(reference / "model_00008.pt"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(ROOT / "notebooks" / "play.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in code]
    images = [[o for o in c.outputs if "image/png" in o.get("data", {})] for c in code]
    assert "n_layer=2" in text[1] and "n_embd=32" in text[1]  # the tiny model
    samples = text[2]
    assert samples.count("=== temperature") == 3 and samples.count("Hello, I'm a language model,") == 6
    lines = text[3].splitlines()  # one line per token of TEXT: "-" for the first, then a loss each
    assert lines[0].split()[0] == "-" and len(lines) > 10 and all(float(ln.split()[0]) > 0 for ln in lines[1:])
    for i in (4, 5):  # the curves and the attention map are inline images
        assert len(images[i]) == 1 and base64.b64decode(images[i][0]["data"]["image/png"])[:4] == b"\x89PNG"
    probs = [float(ln.split()[0]) for ln in text[6].splitlines()]
    assert len(probs) == 10 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
