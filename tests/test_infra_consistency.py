"""The container files say what infra/services.py says: the ops test runs the same stack.

No container runtime here, so the compose file, the Kubernetes manifests and the Dockerfile are
parsed and compared with the commands, environments, images and ports that infra/services.py
builds for containers (``container_topology``); the local stack of tests/test_ops.py is built by
the same functions with loopback addresses.
"""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest
import yaml

from infra import services

INFRA = services.REPO / "infra"
COMPOSE = yaml.safe_load((INFRA / "compose.yaml").read_text())
COMPOSE_TOPOLOGY = services.container_topology("${%s}")
K8S_TOPOLOGY = services.container_topology("$(%s)")
SERVER_NAMES = ("prefect-server", "mlflow-server", "dask-scheduler")


def _expected(t: services.Topology) -> dict[str, services.Service]:
    """Every container service; moto's S3 server is the local stand-in for a real bucket."""
    found = {s.name: s for s in services.servers(t) if s.name not in services.LOCAL_ONLY}
    found["dask-cuda-worker"] = services.dask_worker(t, gpu=True, name="dask-cuda-worker")
    return found


def _k8s_containers() -> dict[str, dict]:
    documents = [doc for path in sorted((INFRA / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    return {
        container["name"]: container
        for doc in documents if doc["kind"] == "Deployment"
        for container in doc["spec"]["template"]["spec"]["containers"]
    }


def test_compose_runs_each_service_with_the_command_environment_and_image_of_services_py():
    compose = COMPOSE["services"]
    expected = _expected(COMPOSE_TOPOLOGY)
    assert set(compose) == set(expected) | {"postgres", "deploy"}
    for name, service in expected.items():
        assert compose[name]["command"] == service.argv, name
        assert compose[name]["environment"] == service.env, name
        image = services.DQ_GPU_IMAGE if name == "dask-cuda-worker" else services.DQ_IMAGE
        assert compose[name]["image"] == image, name
        if service.after:  # what the local stack starts first, compose waits for
            assert service.after in compose[name]["depends_on"], name
        if service.health_path:
            probe = " ".join(compose[name]["healthcheck"]["test"])
            assert f"http://localhost:{service.port}{service.health_path}" in probe, name
    # The UIs and the scheduler are published on the host's loopback only.
    for name in SERVER_NAMES:
        assert f"127.0.0.1:{services.PORTS[name]}:{services.PORTS[name]}" in compose[name]["ports"], name
    assert all(port.startswith("127.0.0.1:") for service in compose.values() for port in service.get("ports", []))


def test_compose_postgres_deploy_job_and_mlflow_auth_file():
    compose = COMPOSE["services"]
    postgres = compose["postgres"]
    assert postgres["image"] == services.POSTGRES_IMAGE
    assert postgres["environment"]["POSTGRES_USER"] == "${DQ_POSTGRES_USER}"
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "${DQ_POSTGRES_PASSWORD}"
    assert f"./{services.POSTGRES_INIT_SQL.name}:/docker-entrypoint-initdb.d/dq.sql:ro" in postgres["volumes"]
    created = re.findall(r"^CREATE DATABASE (\w+);", services.POSTGRES_INIT_SQL.read_text(), re.M)
    assert tuple(created) == services.DATABASES
    assert f"pg_isready -h localhost -p {services.PORTS['postgres']}" in " ".join(postgres["healthcheck"]["test"])

    deploy = compose["deploy"]
    assert deploy["command"] == ["sh", "-c", " && ".join(shlex.join(c) for c in services.deploy_commands())]
    assert deploy["environment"] == services.client_env(COMPOSE_TOPOLOGY)

    assert COMPOSE["configs"]["mlflow-auth"]["content"] == services.auth_config(COMPOSE_TOPOLOGY)
    (mount,) = compose["mlflow-server"]["configs"]
    assert mount == {"source": "mlflow-auth", "target": COMPOSE_TOPOLOGY.mlflow_auth_config}


def test_kubernetes_worker_and_dask_cluster_follow_services_py():
    containers = _k8s_containers()
    expected = {name: s for name, s in _expected(K8S_TOPOLOGY).items() if name in containers}
    assert set(expected) == {"prefect-worker", "dask-scheduler", "dask-worker", "dask-cuda-worker"}
    for name, service in expected.items():
        container = containers[name]
        assert container["command"] == service.argv, name
        assert {e["name"]: e["value"] for e in container.get("env", [])} == service.env, name
        assert container["image"] == (services.DQ_GPU_IMAGE if "cuda" in name else services.DQ_IMAGE), name
        if service.port:
            assert service.port in {p["containerPort"] for p in container["ports"]}, name
        if re.search(r"\$\(", str(service.env)):  # secrets come from the env file's Secret
            assert {"secretRef": {"name": "dq-env"}} in container["envFrom"], name
    k8s_services = {
        doc["metadata"]["name"]: {p["port"] for p in doc["spec"]["ports"]}
        for path in (INFRA / "k8s").glob("*.yaml") for doc in yaml.safe_load_all(path.read_text()) if doc["kind"] == "Service"
    }
    assert k8s_services == {
        "dask-scheduler": {services.PORTS["dask-scheduler"], services.PORTS["dask-dashboard"]},
        "prefect-server": {services.PORTS["prefect-server"]}, "mlflow-server": {services.PORTS["mlflow-server"]},
    }


def test_dockerfile_builds_the_images_the_files_name():
    dockerfile = (services.REPO / "Dockerfile").read_text()
    pyproject = tomllib.loads((services.REPO / "pyproject.toml").read_text())
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M).group(1)
    assert pyproject["project"]["requires-python"] == f">={python}"
    extras = re.search(r"^ARG DQ_EXTRAS=(\S+)", dockerfile, re.M).group(1)
    assert set(extras.split(",")) <= set(pyproject["project"]["optional-dependencies"])
    assert f"docker build -t {services.DQ_IMAGE} ." in dockerfile
    assert f"docker build -t {services.DQ_GPU_IMAGE} --build-arg DQ_EXTRAS={extras},gpu ." in dockerfile
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for p in line.split()}
    assert exposed == {port for name, port in services.PORTS.items() if name not in {"postgres", "s3"}}


def test_auth_is_on_and_secrets_stay_out_of_git():
    t = COMPOSE_TOPOLOGY
    assert services.prefect_server(t).env["PREFECT_SERVER_API_AUTH_STRING"] == "${DQ_PREFECT_AUTH}"
    assert services.client_env(t)["PREFECT_API_AUTH_STRING"] == "${DQ_PREFECT_AUTH}"
    assert "--app-name basic-auth" in shlex.join(services.mlflow_server(t).argv)
    # The example names every setting and holds no real secret; used unedited, it is refused.
    example_file = INFRA / "dq.env.example"
    example = dict(re.findall(r"^(\w+)=(.*)$", example_file.read_text(), re.M))
    assert set(example) == set(services.SETTINGS)
    secrets = [name for name in services.SETTINGS if "PASSWORD" in name or "SECRET" in name or name == "DQ_PREFECT_AUTH"]
    assert all(example[name].endswith("change-me") for name in secrets)
    with pytest.raises(ValueError, match="DQ_MLFLOW_PASSWORD needs at least 12 characters"):
        services.read_env_file(example_file)
    assert "infra/dq.env" in (services.REPO / ".gitignore").read_text().split()
    # Servers bind to loopback unless a topology says otherwise.
    assert services.Topology(example).bind == "127.0.0.1"


def test_env_file_errors_name_the_file_line_and_setting(tmp_path):
    env_file = tmp_path / "dq.env"
    env_file.write_text("DQ_POSTGRES_USER=dq\nnot a setting\n")
    with pytest.raises(ValueError, match=r"dq.env:2: expected NAME=value"):
        services.read_env_file(env_file)
    env_file.write_text("DQ_POSTGRES_USER=dq\n")
    with pytest.raises(ValueError, match=r"dq.env: missing DQ_POSTGRES_PASSWORD, DQ_PREFECT_AUTH"):
        services.read_env_file(env_file)


def test_every_port_has_a_setting_the_example_documents_with_its_default():
    example = (INFRA / "dq.env.example").read_text()
    assert set(services.PORT_SETTINGS) == set(services.PORTS)
    for name, variable in services.PORT_SETTINGS.items():
        assert f"# {variable}={services.PORTS[name]}\n" in example, variable
    # moved ports reach the client settings; containers keep the defaults
    moved = services.Topology(dict.fromkeys(services.SETTINGS, ""), ports=services.local_ports({"DQ_PREFECT_PORT": "14200"}))
    assert services.client_env(moved)["PREFECT_API_URL"] == "http://127.0.0.1:14200/api"
    assert services.dask_worker(moved).argv[-4:] == ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    assert "--host" not in services.dask_worker(COMPOSE_TOPOLOGY).argv
