"""Security basics: no unpickling of untrusted files, no credentials in logs or MLflow parameters,
no artifact name that reaches outside the store."""

from __future__ import annotations

import pickle

import pytest

from dq_ops.errors import DQInputError
from dq_ops.store import DQStoreError, Store
from dq_ops.urls import redact_credentials
from tests.cli_helpers import cli_env, dq


class _Payload:
    """Unpickling this creates a file: proof that a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_file(tmp_path, name):
    marker = tmp_path / f"{name}.executed"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    return path, marker


def test_backbone_weights_are_never_unpickled(tmp_path):
    from dq_ops.backbones import read_state_dict

    path, marker = _evil_file(tmp_path, "weights.pt")
    with pytest.raises(DQInputError, match="weights.pt: not a readable weights file"):
        read_state_dict(str(path))  # torch.load(weights_only=True) refuses the payload
    assert not marker.exists()


def test_mae_checkpoints_are_safetensors_only(tmp_path):
    from dq_ops.mae_store import load_mae

    path, marker = _evil_file(tmp_path, "mae.safetensors")
    with pytest.raises(DQInputError, match="mae.safetensors"):
        load_mae(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../datasets/x", "../../etc", "/etc/passwd", "..", "s3://bucket/x", ".staging/../../x", ""])
def test_artifact_names_cannot_leave_the_store(tmp_path, name):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(DQStoreError, match="not an artifact name"):
        store.open("subsets", name)
    with pytest.raises(DQStoreError):
        with store.write("subsets", name, {}):
            pass
    assert not (tmp_path / "datasets").exists() and not (tmp_path / "x").exists()


def test_export_of_an_escaping_subset_name_is_refused(tmp_path):
    done = dq("export", "..", str(tmp_path / "out"), "--format", "npz", "--store", str(tmp_path / "store"),
              env=cli_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "'..' is not an artifact name" in done.last_line


def test_url_passwords_are_redacted():
    text = "sqlite:////a/mlflow.db postgresql+psycopg2://dq:s3cret@db:5432/mlflow https://me:tok@host/x.jsonl s3://b/k"
    assert redact_credentials(text) == (
        "sqlite:////a/mlflow.db postgresql+psycopg2://dq:***@db:5432/mlflow https://me:***@host/x.jsonl s3://b/k"
    )


def test_no_password_in_the_error_line_or_the_log(tmp_path):
    url = "https://reader:hunter2@127.0.0.1:9/data.npz"  # port 9 (discard): the connection is refused
    done = dq("ingest", "--format", "npz", "--url", url, "--store", str(tmp_path / "store"), env=cli_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "reader:***@127.0.0.1:9/data.npz" in done.last_line
    assert "hunter2" not in done.stdout + done.stderr + done.log_path.read_text()


def test_no_password_in_mlflow_params(tmp_path):
    import mlflow

    from dq_ops.config import DQConfig
    from tasks.tracking import Tracker

    config = DQConfig.model_validate({
        "store_url": str(tmp_path / "store"),
        "dataset": {"format": "jsonl", "url": "https://reader:hunter2@data.example/records.jsonl"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    tracker = Tracker(config, run_name="redaction")
    tracker.finish()
    tracker.close()
    params = mlflow.MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id).data.params
    assert params["dataset.url"] == "https://reader:***@data.example/records.jsonl"
    assert not any("hunter2" in value for value in params.values())
