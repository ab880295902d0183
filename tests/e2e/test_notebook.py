"""`examples/notebook.ipynb` executed headless (nbclient, a real IPython kernel) against a live cluster.

The notebook connects with `cornserve.client`, deploys an MLLMTask on a tiny checkpoint, streams an
answer, shows the task graph and tears the session down; every cell must run without an error.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from cornserve.cli.launcher import LocalCluster

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"
CELL_TIMEOUT_S = 600


def _text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(str(output["data"].get("text/markdown", output["data"].get("text/plain", ""))))
    return "".join(parts)


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_notebook_deploys_invokes_graphs_and_tears_down(
    mllm_cluster: LocalCluster, checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORNSERVE_URL", mllm_cluster.url)
    monkeypatch.setenv("CORNSERVE_STATE_DIR", str(mllm_cluster.state_dir))
    monkeypatch.setenv("CORNSERVE_NOTEBOOK_MODEL", str(checkpoints["qwen"]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the cell when one fails
    outputs = [_text(cell) for cell in notebook.cells if cell.cell_type == "code"]
    text = "\n".join(outputs)
    assert f"model: {checkpoints['qwen']}" in text
    assert f"connected to {mllm_cluster.url}" in text
    deployed = next(line for line in text.splitlines() if line.startswith("deployed: "))
    keys = deployed.removeprefix("deployed: ").split(", ")
    assert len(keys) == 2, deployed  # encoder fission: the encoder and the LLM
    assert " characters" in text
    assert "flowchart LR" in text and "EncoderTask[image]" in text and "-.->|stream| out" in text
    assert "still deployed: none" in text
