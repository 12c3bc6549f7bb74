"""The dq service stack in one place: every server's command, flags, port and environment.

Three things follow this module: the local stack of real processes (``python -m infra.services up``,
started by ``tests/test_ops.py``), ``infra/compose.yaml`` and ``infra/k8s/`` (checked against it by
``tests/test_infra_consistency.py``). Change a flag here, and the test tells you which container file
still uses the old one.

Secrets come from an env file that is never committed (``infra/dq.env``; ``infra/dq.env.example``
documents every name) and are handed to each tool under the variable that tool reads:

=======================  ====================================================================
``DQ_POSTGRES_USER``     owner of the ``prefect``, ``mlflow`` and ``mlflow_auth`` databases
``DQ_POSTGRES_PASSWORD`` its password (scram-sha-256; in the connection URLs)
``DQ_PREFECT_AUTH``      ``user:password``: ``PREFECT_SERVER_API_AUTH_STRING`` on the server,
                         ``PREFECT_API_AUTH_STRING`` on workers and clients
``DQ_MLFLOW_USER``       MLflow basic-auth admin (``MLFLOW_AUTH_ADMIN_USERNAME``), and the user
                         flows log as (``MLFLOW_TRACKING_USERNAME``)
``DQ_MLFLOW_PASSWORD``   its password (``MLFLOW_AUTH_ADMIN_PASSWORD`` / ``MLFLOW_TRACKING_PASSWORD``)
``DQ_MLFLOW_SECRET_KEY`` ``MLFLOW_FLASK_SERVER_SECRET_KEY`` (signs the basic-auth app's forms)
``DQ_S3_BUCKET``         bucket of the MLflow artifacts (``s3://<bucket>/mlflow``) and dq stores
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (S3-compatible stores)
=======================  ====================================================================

Ports (optional, :data:`PORT_SETTINGS`: ``DQ_PREFECT_PORT``, ``DQ_MLFLOW_PORT``, ``DQ_DASK_PORT``, ...)
move the local stack's services off their defaults (:data:`PORTS`); ``env`` prints client settings
that follow them. Before anything starts, every port the stack needs must be free on the bind
address (:func:`check_ports_free`), and a service counts as ready only when the process the stack
started is alive and is itself the one listening on its port: another server on that port (a
Prefect server left running) fails the start instead of passing for ours.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = "deployments/prefect.yaml"
POSTGRES_INIT_SQL = REPO / "infra" / "postgres-init.sql"
WORK_POOL = "dq-process"
DQ_IMAGE = "dq:0.1.0"
DQ_GPU_IMAGE = "dq:0.1.0-gpu"  # the same Dockerfile with --build-arg DQ_EXTRAS=server,gpu
POSTGRES_IMAGE = "postgres:15"  # the server version Debian 12 ships, which the local stack runs
DATABASES = ("prefect", "mlflow", "mlflow_auth")
PORTS: dict[str, int] = {
    "postgres": 5432, "s3": 9000, "prefect-server": 4200, "prefect-worker": 8080,
    "mlflow-server": 5000, "dask-scheduler": 8786, "dask-dashboard": 8787,
}
# The env file's variable that moves each port of the local stack (the container files keep the defaults).
PORT_SETTINGS: dict[str, str] = {
    "postgres": "DQ_POSTGRES_PORT", "s3": "DQ_S3_PORT", "prefect-server": "DQ_PREFECT_PORT",
    "prefect-worker": "DQ_PREFECT_WORKER_PORT", "mlflow-server": "DQ_MLFLOW_PORT", "dask-scheduler": "DQ_DASK_PORT",
    "dask-dashboard": "DQ_DASK_DASHBOARD_PORT",
}
SERVICE_PORTS = {"dask-scheduler": ("dask-scheduler", "dask-dashboard")}  # services with more than their own port
ALL_INTERFACES = "0.0.0.0"
LOCAL_ONLY = {"s3"}  # moto stands in for a real bucket on laptops and in tests; containers use the real one
SECRET_SERVICES = {"postgres", "prefect-server", "mlflow-server", "prefect-worker"}  # need the env file
SETTINGS = (
    "DQ_POSTGRES_USER", "DQ_POSTGRES_PASSWORD", "DQ_PREFECT_AUTH", "DQ_MLFLOW_USER", "DQ_MLFLOW_PASSWORD",
    "DQ_MLFLOW_SECRET_KEY", "DQ_S3_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
)
# Telemetry stays off on every server and worker: no connection leaves the machine's own network.
QUIET = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@dataclass(frozen=True)
class Service:
    """One long-running process: what to run, with which environment, and how to tell it is up."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int | None = None
    health_path: str | None = None  # answers 200 without credentials once the service is ready
    after: str | None = None  # the service it connects to on start (compose: depends_on)


@dataclass(frozen=True)
class Topology:
    """Where the services listen and how they reach each other.

    ``settings`` holds the env file's values; for the container files it holds ``${NAME}``
    placeholders instead, so that what this module builds is literally what they must contain.
    """

    settings: Mapping[str, str]
    bind: str = "127.0.0.1"
    hosts: Mapping[str, str] = field(default_factory=dict)  # service → host name others use (default: bind)
    ports: Mapping[str, int] = field(default_factory=lambda: dict(PORTS))
    mlflow_auth_config: str = "mlflow-auth.ini"  # where the MLflow server finds the file auth_config() writes
    ui_host: str | None = None  # host a browser uses for the Prefect UI's API calls (default: the server's host)
    dask_threads: int = 1

    def host(self, service: str) -> str:
        return self.hosts.get(service, self.bind)

    def address(self, service: str) -> str:
        return f"{self.host(service)}:{self.ports[service]}"

    def postgres_url(self, driver: str, database: str) -> str:
        s = self.settings
        return f"postgresql+{driver}://{s['DQ_POSTGRES_USER']}:{s['DQ_POSTGRES_PASSWORD']}@{self.address('postgres')}/{database}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.address('prefect-server')}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.address('mlflow-server')}"

    @property
    def dask_address(self) -> str:
        return f"tcp://{self.address('dask-scheduler')}"


def container_topology(placeholder: str) -> Topology:
    """The topology of infra/compose.yaml (``placeholder="${%s}"``) and infra/k8s/ (``"$(%s)"``).

    Every process listens on all interfaces of its container and reaches the others by service
    name; settings stay references that compose or Kubernetes fill from the env file / Secret.
    """
    return Topology(
        settings={name: placeholder % name for name in SETTINGS}, bind=ALL_INTERFACES,
        hosts={name: name for name in PORTS}, mlflow_auth_config="/etc/dq/mlflow-auth.ini", ui_host="localhost",
    )


def s3_env(t: Topology) -> dict[str, str]:
    """The standard AWS variables: read by s3fs (dq stores) and boto3 (MLflow artifacts)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
    return {name: t.settings[name] for name in names if t.settings[name]}  # no endpoint: AWS itself


def client_env(t: Topology) -> dict[str, str]:
    """What a dq client (``dq run``, a worker, a flow run) needs to report to the stack."""
    s = t.settings
    return QUIET | s3_env(t) | {
        "PREFECT_API_URL": t.prefect_api_url,
        "PREFECT_API_AUTH_STRING": s["DQ_PREFECT_AUTH"],
        "MLFLOW_TRACKING_URI": t.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": s["DQ_MLFLOW_USER"],
        "MLFLOW_TRACKING_PASSWORD": s["DQ_MLFLOW_PASSWORD"],
    }


def s3_server(t: Topology) -> Service:
    """moto's S3 server: the local stand-in for S3 (tests and laptops; production uses a real bucket)."""
    port = t.ports["s3"]
    return Service("s3", ["moto_server", "-H", t.bind, "-p", str(port)], dict(QUIET), port, "/moto-api/")


def prefect_server(t: Topology) -> Service:
    port = t.ports["prefect-server"]
    env = QUIET | {
        "PREFECT_API_DATABASE_CONNECTION_URL": t.postgres_url("asyncpg", "prefect"),
        "PREFECT_SERVER_API_AUTH_STRING": t.settings["DQ_PREFECT_AUTH"],
        "PREFECT_UI_API_URL": f"http://{t.ui_host or t.host('prefect-server')}:{port}/api",
    }
    return Service("prefect-server", ["prefect", "server", "start", "--host", t.bind, "--port", str(port)], env, port, "/api/health")


def auth_config(t: Topology) -> str:
    """MLflow's basic-auth settings file: users and permissions live in Postgres too."""
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {t.postgres_url('psycopg2', 'mlflow_auth')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def mlflow_server(t: Topology) -> Service:
    port = t.ports["mlflow-server"]
    s = t.settings
    allowed_hosts = ",".join(dict.fromkeys(f"{h}:{port}" for h in (t.host("mlflow-server"), "localhost", "127.0.0.1")))
    argv = [
        "mlflow", "server", "--host", t.bind, "--port", str(port),
        # One worker and no job runner: ~500 MB instead of ~3 GB with the defaults.
        "--workers", "1", "--app-name", "basic-auth", "--allowed-hosts", allowed_hosts,
        "--backend-store-uri", t.postgres_url("psycopg2", "mlflow"),
        # Clients upload through the server (mlflow-artifacts:/): only the server holds S3 credentials.
        "--serve-artifacts", "--artifacts-destination", f"s3://{s['DQ_S3_BUCKET']}/mlflow",
    ]
    env = QUIET | s3_env(t) | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": s["DQ_MLFLOW_SECRET_KEY"],
        "MLFLOW_AUTH_CONFIG_PATH": t.mlflow_auth_config,
        "MLFLOW_AUTH_ADMIN_USERNAME": s["DQ_MLFLOW_USER"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": s["DQ_MLFLOW_PASSWORD"],
    }
    return Service("mlflow-server", argv, env, port, "/health")


def prefect_worker(t: Topology) -> Service:
    """A process worker: each flow run is a subprocess with this environment (servers, S3)."""
    port = t.ports["prefect-worker"]
    env = client_env(t) | {"PREFECT_WORKER_WEBSERVER_HOST": t.bind, "PREFECT_WORKER_WEBSERVER_PORT": str(port)}
    argv = ["prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process", "--with-healthcheck"]
    return Service("prefect-worker", argv, env, port, "/health", after="prefect-server")


def dask_scheduler(t: Topology) -> Service:
    port = t.ports["dask-scheduler"]
    dashboard = f"{t.bind}:{t.ports['dask-dashboard']}"
    argv = ["dask", "scheduler", "--host", t.bind, "--port", str(port), "--dashboard-address", dashboard]
    return Service("dask-scheduler", argv, dict(QUIET), port)


def dask_worker(t: Topology, gpu: bool = False, name: str = "dask-worker") -> Service:
    """A CPU worker, or with ``gpu`` one ``dask cuda worker`` (one process per visible GPU).

    On a host bind address the worker, its nanny and its dashboard listen there (dask's defaults
    are every interface); in a container they keep dask's choice, the address others reach.
    """
    command = ["dask", "cuda", "worker"] if gpu else ["dask", "worker"]
    listen = [] if t.bind == ALL_INTERFACES else ["--host", t.bind, "--dashboard-address", f"{t.bind}:0"]
    argv = [*command, t.dask_address, "--nthreads", str(t.dask_threads), *listen]
    return Service(name, argv, dict(QUIET) | s3_env(t), after="dask-scheduler")


def deploy_commands() -> list[list[str]]:
    """Create the process work pool and register every deployment of ``deployments/prefect.yaml``."""
    return [
        ["prefect", "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
        ["prefect", "--no-prompt", "deploy", "--prefect-file", PREFECT_FILE, "--all"],
    ]


def servers(t: Topology) -> list[Service]:
    """Every service after Postgres, in start order."""
    return [s3_server(t), prefect_server(t), mlflow_server(t), dask_scheduler(t), dask_worker(t), prefect_worker(t)]


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    """``NAME=value`` lines (``#`` comments, optional quotes); every name in ``SETTINGS`` must be set."""
    values: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: expected NAME=value")
        values[name.strip()] = value.strip().strip("'\"")
    missing = [name for name in SETTINGS if name not in values]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    for name in PORT_SETTINGS.values():
        if values.get(name) and not (values[name].isdigit() and 0 < int(values[name]) < 65536):
            raise ValueError(f"{path}: {name}={values[name]!r} is not a port number (1-65535)")
    if len(values["DQ_MLFLOW_PASSWORD"]) < 12:  # the MLflow server refuses to start otherwise
        raise ValueError(f"{path}: DQ_MLFLOW_PASSWORD needs at least 12 characters")
    return values


def local_ports(settings: Mapping[str, str]) -> dict[str, int]:
    """The local stack's ports: :data:`PORTS`, each moved by its :data:`PORT_SETTINGS` variable when set."""
    return {name: int(settings.get(PORT_SETTINGS[name]) or default) for name, default in PORTS.items()}


class PortInUseError(RuntimeError):
    """A port the stack needs is taken: the message names it and the variable that moves it."""


def check_port_free(host: str, port: int, name: str, where: str) -> None:
    """Fail when ``port`` cannot be bound on ``host``; the message says ``where`` to move it.

    Binding is the test a server makes itself (with ``SO_REUSEADDR``, as servers set it, so a
    closed port's TIME_WAIT does not count); a listener on any address of that port refuses it.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise PortInUseError(f"port {port} ({name}) is in use on {host}: stop what listens there, or {where}") from None


def check_ports_free(t: Topology, services: Sequence[str]) -> None:
    """Fail before anything starts when a port of ``services`` cannot be bound on ``t.bind``."""
    for service in services:
        for name in SERVICE_PORTS.get(service, (service,) if service in PORTS else ()):
            check_port_free(t.bind, t.ports[name], name, f"set {PORT_SETTINGS[name]} in the env file to another port")


def _executable(argv: Sequence[str]) -> list[str]:
    """The venv's console script when this interpreter has one (tests, ``.venv``), else PATH's."""
    local = Path(sys.executable).parent / argv[0]
    return [str(local) if local.exists() else argv[0], *argv[1:]]


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs process ``pid`` and its descendants listen on."""
    import psutil

    found = set()
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # exited meanwhile
            pass
    return found


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_ready(name: str, pid: int, host: str, port: int | None, health_url: str | None, log: Path | str,
               timeout: float = 180) -> None:
    """Wait until process ``pid`` (the one we started) listens on ``host:port`` itself (any port
    when None) and ``health_url`` answers 200; fail at once if it exits, after ``timeout`` s if not."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            raise RuntimeError(f"{name} exited before it was ready; see {log}")
        ours = listening(pid)
        bound = (host, port) in ours if port else bool(ours)
        if bound and (health_url is None or _healthy(health_url)):
            return
        if time.monotonic() > deadline:
            where = f"listening on {host}:{port}" if port else "listening"
            raise TimeoutError(f"{name} not {where}{' and healthy' if bound else ''} after {timeout:.0f} s; see {log}")
        time.sleep(0.5)


class LocalStack:
    """The stack as real processes on this machine: Postgres in a folder of ours, then ``servers()``.

    Use as a context manager; leaving it stops every process it started and the Postgres cluster.
    Logs go to ``<state_dir>/logs``. As root, Postgres runs as the ``postgres`` user (``initdb``
    and ``pg_ctl`` refuse root) in a folder that user owns: ``<state_dir>/postgres`` with
    ``keep_data`` (reused on the next start), else a private temporary folder removed on exit.
    """

    def __init__(
        self, topology: Topology, state_dir: str | os.PathLike, services: Sequence[str] | None = None, keep_data: bool = False,
    ):
        self.t = topology
        self.state = Path(state_dir).resolve()
        self.logs = self.state / "logs"
        self.wanted = services
        self.keep_data = keep_data
        self.processes: list[tuple[Service, subprocess.Popen]] = []
        self.pg_dir: Path | None = None

    def __enter__(self) -> LocalStack:
        check_ports_free(self.t, ["postgres", *(s.name for s in servers(self.t))] if self.wanted is None else self.wanted)
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            if self.wants("postgres"):
                self._start_postgres()
            auth_file = self.state / "mlflow-auth.ini"
            auth_file.write_text(auth_config(self.t))
            auth_file.chmod(0o600)
            self.t = replace(self.t, mlflow_auth_config=str(auth_file))
            wanted = [service for service in servers(self.t) if self.wants(service.name)]
            # Two waves: the servers side by side, then what connects to them on start.
            for wave in ([s for s in wanted if not s.after], [s for s in wanted if s.after]):
                started = [(service, self._spawn(service)) for service in wave]
                for service, process in started:
                    self._wait_ready(service, process)
            if self.wants("s3"):
                self._create_bucket()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        if self.pg_dir is not None:
            # A cluster about to be deleted needs no shutdown checkpoint.
            mode = "fast" if self.keep_data else "immediate"
            self._as_postgres([self._pg_bin("pg_ctl"), "-D", str(self.pg_dir / "data"), "-m", mode, "stop"], check=False)
            if not self.keep_data:
                shutil.rmtree(self.pg_dir, ignore_errors=True)
            self.pg_dir = None

    def wants(self, name: str) -> bool:
        return self.wanted is None or name in self.wanted

    def _spawn(self, service: Service) -> subprocess.Popen:
        """Start ``service`` in its own process group (stopped as a whole on exit)."""
        with open(self.logs / f"{service.name}.log", "ab") as out:
            process = subprocess.Popen(
                _executable(service.argv), env=os.environ | service.env, cwd=REPO,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.processes.append((service, process))
        return process

    def _wait_ready(self, service: Service, process: subprocess.Popen, timeout: float = 180) -> None:
        health = f"http://{self.t.bind}:{service.port}{service.health_path}" if service.health_path else None
        wait_ready(service.name, process.pid, self.t.bind, service.port, health, self.logs / f"{service.name}.log", timeout)

    def run(self, argv: Sequence[str], timeout: float = 300) -> str:
        """A one-shot command (``deploy_commands()``) with the client environment; its output."""
        done = subprocess.run(
            _executable(argv), env=os.environ | client_env(self.t), cwd=REPO,
            capture_output=True, text=True, timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    @staticmethod
    def _pg_bin(name: str) -> str:
        found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
        return str(found[-1]) if found else name

    def _as_postgres(self, argv: list[str], check: bool = True, env: Mapping[str, str] | None = None) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*as_user, *argv], capture_output=True, text=True, env=os.environ | dict(env or {}))
        if check and done.returncode:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {done.stderr.strip()}")

    def _start_postgres(self) -> None:
        s = self.t.settings
        if self.keep_data:
            self.pg_dir = self.state / "postgres"
            self.pg_dir.mkdir(mode=0o700, exist_ok=True)
        else:  # a private folder the postgres user can reach (pytest's temporary folders are root-only)
            self.pg_dir = Path(tempfile.mkdtemp(prefix="dq-postgres-"))
        if os.geteuid() == 0:
            shutil.chown(self.pg_dir, "postgres", "postgres")
        data = self.pg_dir / "data"
        fresh = not (data / "PG_VERSION").exists()
        if fresh:
            password_file = self.pg_dir / "password"
            password_file.write_text(s["DQ_POSTGRES_PASSWORD"] + "\n")
            password_file.chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(password_file, "postgres", "postgres")
            try:
                self._as_postgres([
                    self._pg_bin("initdb"), "-D", str(data), "-U", s["DQ_POSTGRES_USER"], "--auth=scram-sha-256",
                    f"--pwfile={password_file}",
                ])
            finally:
                password_file.unlink()
        options = f"-p {self.t.ports['postgres']} -k {self.pg_dir} -c listen_addresses={self.t.bind}"
        self._as_postgres([self._pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.pg_dir / "log"), "-w", "start"])
        if fresh:
            self._as_postgres(
                [self._pg_bin("psql"), "-h", self.t.bind, "-p", str(self.t.ports["postgres"]), "-U", s["DQ_POSTGRES_USER"],
                 "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-f", str(POSTGRES_INIT_SQL)],
                env={"PGPASSWORD": s["DQ_POSTGRES_PASSWORD"]},
            )

    def _create_bucket(self) -> None:
        import boto3

        env = s3_env(self.t)
        boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
        ).create_bucket(Bucket=self.t.settings["DQ_S3_BUCKET"])


def main(argv: Sequence[str] | None = None) -> None:
    names = ["postgres", *(s.name for s in servers(Topology(dict.fromkeys(SETTINGS, ""))))]
    parser = argparse.ArgumentParser(prog="python -m infra.services", description="Run the dq stack on this machine (loopback; ports from the env file).")
    parser.add_argument("command", choices=["up", "env"],
                        help="up: start the services and deploy, stop everything on Ctrl-C; env: print a client's exports")
    parser.add_argument("--env-file", default=str(REPO / "infra" / "dq.env"), help="secrets and settings (see infra/dq.env.example)")
    parser.add_argument("--state-dir", default=str(REPO / "ops-state"), help="logs and generated config files")
    parser.add_argument("--services", nargs="+", choices=names,
                        help="start only these (default: all; s3 only when AWS_ENDPOINT_URL points at its port)")
    parser.add_argument("--no-deploy", action="store_true", help="skip creating the work pool and the deployments")
    args = parser.parse_args(argv)
    if Path(args.env_file).exists():
        try:
            settings = read_env_file(args.env_file)
        except ValueError as exc:
            parser.error(str(exc))
    elif args.command == "env" or set(args.services or names) & SECRET_SERVICES:
        parser.error(f"{args.env_file} not found: cp infra/dq.env.example infra/dq.env and set its secrets")
    else:  # a dask cluster alone needs no secrets
        settings = dict.fromkeys(SETTINGS, "")
    topology = Topology(settings, ports=local_ports(settings))
    local_s3 = settings["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{topology.ports['s3']}"
    args.services = args.services or [name for name in names if name != "s3" or local_s3]
    if args.command == "env":
        print("".join(f"export {name}={shlex.quote(value)}\n" for name, value in client_env(topology).items()), end="")
        return
    # Postgres keeps its data in <state-dir>/postgres between runs; moto's S3 lives in memory only.
    try:
        with LocalStack(topology, args.state_dir, args.services, keep_data=True) as stack:
            if not args.no_deploy and stack.wants("prefect-server"):
                for command in deploy_commands():
                    stack.run(command)
            t = stack.t
            started = {"prefect-server": f"Prefect UI {t.prefect_api_url.removesuffix('/api')}", "mlflow-server": f"MLflow UI {t.mlflow_url}",
                       "dask-scheduler": f"dask {t.dask_address} (dashboard http://{t.address('dask-dashboard')})"}
            print("  ".join([text for name, text in started.items() if stack.wants(name)] + [f"logs {stack.logs}"]))
            print("Clients: eval \"$(python -m infra.services env)\"; Ctrl-C stops everything.", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop everything on `kill` too
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    except PortInUseError as exc:  # nothing was started: a setting to change, one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (RuntimeError, TimeoutError) as exc:  # what started is stopped again; the log names the cause
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
