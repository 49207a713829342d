"""The multi-process deployment: a SuperLink, one SuperNode per client (separate processes, here
on loopback), and `flwr run` submitting a Flower app. `write_app` writes that app: a folder with a
`pyproject.toml` whose components are tformer's `client_app` / `server_app` and whose run config
holds the federation (`spec`). `commands` says what to start, in order:

    flower-superlink --insecure --port 9093
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9100 --node-config "partition-id=0 num-partitions=2"
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9101 --node-config "partition-id=1 num-partitions=2"
    FLWR_HOME=DIR/flwr-home flwr run DIR/app local --stream

DIR/app is the Flower app; DIR/flwr-home (FLWR_HOME for `flwr run`) holds a `config.toml` naming
the SuperLink connection `local` (insecure, loopback). Every node needs the recipe's files and data (TFORMER_DATA_DIR) where the spec says.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from tformer.config import ConfigError
from tformer.federated.spec import FederationSpec
from tformer.files import write_text_atomic

APP_MARKER = ".tformer-flower-app"
CONNECTION = "local"


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def pyproject(spec: FederationSpec, fresh: bool) -> str:
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tformer-federation"
version = "1.0.0"
description = "A tformer recipe trained by Flower (written by tformer federate --app)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "tformer"

[tool.flwr.app.components]
serverapp = "tformer.federated.apps:server_app"
clientapp = "tformer.federated.apps:client_app"

[tool.flwr.app.config]
spec = {_toml_string(spec.to_json())}
fresh = {"true" if fresh else "false"}
"""


def flower_config(port: int) -> str:
    return f"""[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = "127.0.0.1:{port}"
insecure = true
"""


def write_app(spec: FederationSpec, folder: str | Path, *, port: int = 9093, fresh: bool = False) -> Path:
    """The Flower app folder for `spec` (and its FLWR_HOME with the loopback connection). Only a
    new, empty or earlier tformer app folder is written into."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / APP_MARKER).is_file():
        raise ConfigError(f"--app {folder} is a folder that tformer did not write; choose a new or empty one")
    for sub in ("app", "flwr-home"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / APP_MARKER, "a Flower app written by tformer federate --app\n")
    write_text_atomic(folder / "app" / "pyproject.toml", pyproject(spec, fresh))
    write_text_atomic(folder / "flwr-home" / "config.toml", flower_config(port))
    return folder


def commands(spec: FederationSpec, folder: str | Path, *, port: int = 9093, first_node_port: int = 9100) -> list[str]:
    """The shell commands that run the deployment on loopback, in the order to start them."""
    folder = Path(folder).resolve()
    lines = [f"flower-superlink --insecure --port {port}"]
    for k in range(spec.clients):
        config = shlex.quote(f"partition-id={k} num-partitions={spec.clients}")
        lines.append(f"flower-supernode --insecure --superlink 127.0.0.1:{port} --port {first_node_port + k} "
                     f"--node-config {config}")
    home, app = shlex.quote(str(folder / "flwr-home")), shlex.quote(str(folder / "app"))
    lines.append(f"FLWR_HOME={home} flwr run {app} {CONNECTION} --stream")
    return lines
