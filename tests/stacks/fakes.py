"""Fakes of what the remote70b stack talks to: Lambda Cloud's API, and the hosts it rents out.

FakeLambda answers the endpoints infra/scripts/lambda_instance.py and the idle watchdog call, with
Lambda's response shapes and error bodies. Each instance it launches is a FakeHost at an address of
its own on the loopback network (127.0.0.N): an SSH greeting on one port, a host key, and a folder
standing in for its disk. Terminating the instance takes the host down (its port closes).

A FakeHost runs commands as Lambda's On-Demand image would (third-party reports, not Lambda's docs:
docs/infrastructure.md says what the stack assumes): the login user `ubuntu`, in its home folder,
with passwordless sudo, and, unless told otherwise, outside the `docker` group, so `docker` without
sudo is refused with Docker's own message, as a root:docker 0660 socket refuses it. Stubs stand in
for the system's tools (bin/ below): `sudo` moves /opt, /etc and /lambda paths under the host's
folder and marks what it runs as root; `docker` keeps containers in a JSON file; `ssh-keyscan` reports
the host's key; `systemctl` and `curl` record and succeed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from support import free_port, reply

LOGIN_USER = "ubuntu"

# Lambda's catalog as GET /instance-types answers it (its type names and GPU memory; illustrative prices and
# capacity), with regions that have capacity and ones that do not. There is no gpu_2x_a100_80gb.
CATALOG = {
    "gpu_1x_a100": ("1x A100 (40 GB SXM4)", 129, ["us-east-1"]),
    "gpu_2x_a100": ("2x A100 (40 GB SXM4)", 258, []),
    "gpu_8x_a100_80gb_sxm4": ("8x A100 (80 GB SXM4)", 1432, ["us-west-2"]),
    "gpu_1x_h100_pcie": ("1x H100 (80 GB PCIe)", 249, ["us-west-1", "us-west-2"]),
    "gpu_2x_h100_sxm5": ("2x H100 (80 GB SXM5)", 598, ["us-east-1", "us-south-1"]),
    "gpu_8x_h100_sxm5": ("8x H100 (80 GB SXM5)", 2392, []),
}


def instance_types() -> dict[str, Any]:
    return {name: {"instance_type": {"name": name, "description": description, "price_cents_per_hour": cents,
                                     "specs": {"gpus": int(description[0])}},
                   "regions_with_capacity_available": [{"name": r, "description": r} for r in regions]}
            for name, (description, cents, regions) in CATALOG.items()}


# --- the rented hosts ---------------------------------------------------------------------------------

SUDO = r"""#!/bin/bash
# Passwordless sudo: runs the command as "root", with /opt, /etc and /lambda under the host's folder.
[ "${1:-}" = -n ] && shift
export FAKE_HOST_ROOT=1
args=("${@//\/opt\//$HOST_DIR/opt/}")
args=("${args[@]//\/etc\//$HOST_DIR/etc/}")
args=("${args[@]//\/lambda\//$HOST_DIR/lambda/}")
exec "${args[@]}"
"""

DOCKER = r'''#!/usr/bin/env python3
"""docker, as far as the bootstrap uses it; refused without root unless the user is in the docker group."""
import json, os, re, sys, uuid
from pathlib import Path

host = Path(os.environ["HOST_DIR"])
settings = json.loads((host / "host.json").read_text())
args = sys.argv[1:]
as_root = os.environ.get("FAKE_HOST_ROOT") == "1"
with (host / "docker.log").open("a") as log:
    log.write(json.dumps({"args": args, "as_root": as_root}) + "\n")
if not as_root and not settings["docker_group"]:
    sys.exit("permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock: "
             "Get \"http://%2Fvar%2Frun%2Fdocker.sock/v1.43/info\": dial unix /var/run/docker.sock: connect: "
             "permission denied")
store = host / "containers.json"
containers = json.loads(store.read_text()) if store.exists() else {}
command, rest = args[0], args[1:]
if command == "info":
    print("Server Version: 28.2.2")
elif command == "pull":
    print(f"{rest[-1]}: pulled")
elif command == "ps":
    wanted = [rest[i + 1] for i, a in enumerate(rest) if a == "--filter"]
    for cid, c in containers.items():
        ok = True
        for f in wanted:
            kind, _, value = f.partition("=")
            if kind == "label":
                ok &= value in c["labels"]
            elif kind == "name":
                ok &= re.search(value, "/" + c["name"]) is not None
        if ok:
            print(cid)
elif command == "rm":
    for ref in [a for a in rest if not a.startswith("-")]:
        gone = [cid for cid, c in containers.items() if ref in (cid, c["name"])]
        if not gone:
            sys.exit(f"Error response from daemon: No such container: {ref}")
        for cid in gone:
            del containers[cid]
elif command == "run":
    name, labels, env, i = None, [], {}, 0
    while rest[i].startswith("-"):
        flag = rest[i]
        if flag == "-d" or "=" in flag:
            i += 1
            continue
        value = rest[i + 1]
        if flag == "--name":
            name = value
        elif flag == "--label":
            labels.append(value)
        elif flag == "--env-file":
            env.update(line.split("=", 1) for line in Path(value).read_text().splitlines() if line)
        elif flag == "-e":
            key = value.split("=", 1)[0]
            env[key] = value.split("=", 1)[1] if "=" in value else os.environ.get(key, "")
        i += 2
    if any(c["name"] == name for c in containers.values()):
        sys.exit(f"docker: Error response from daemon: Conflict. The container name \"/{name}\" is already in use.")
    cid = uuid.uuid4().hex
    containers[cid] = {"name": name, "labels": labels, "env": env, "image": rest[i], "args": rest[i + 1:]}
    print(cid)
elif command == "inspect":
    print("true")
elif command == "logs":
    pass
else:
    sys.exit(f"fake docker: {command} is not faked")
store.write_text(json.dumps(containers))
'''

STUBS = {
    "sudo": SUDO,
    "docker": DOCKER,
    "systemctl": '#!/bin/sh\necho "$@" >> "$HOST_DIR/systemctl.log"\n',
    "curl": "#!/bin/sh\nexit 0\n",  # vLLM's /health answers at once
    "mountpoint": "#!/bin/sh\nexit 0\n",  # the persistent filesystem is mounted
    # What `ssh-keyscan -t ed25519 127.0.0.1` prints on the host: its SSH server's key.
    "ssh-keyscan": '#!/bin/sh\nprintf \'127.0.0.1 %s\\n\' "$(cat "$HOST_DIR/host_key")"\n',
}


@dataclass
class FakeHost:
    """A rented instance: an address, an SSH greeting there while it lives, a host key, a disk."""

    ip: str
    ssh_port: int
    directory: Path
    host_key: str
    docker_group: bool = False
    alive: bool = True
    commands: list[str] = field(default_factory=list)  # every command a session ran here
    stdin_seen: list[str] = field(default_factory=list)
    _listener: socket.socket | None = None

    def __post_init__(self) -> None:
        for folder in ("bin", "etc/systemd/system", "opt", f"home/{LOGIN_USER}", "lambda/nfs/dreamseed-models"):
            (self.directory / folder).mkdir(parents=True, exist_ok=True)
        for name, text in STUBS.items():
            stub = self.directory / "bin" / name
            stub.write_text(text)
            stub.chmod(0o755)
        (self.directory / "host_key").write_text(self.host_key)
        (self.directory / "host.json").write_text(json.dumps({"docker_group": self.docker_group}))
        self._listener = socket.create_server((self.ip, self.ssh_port))
        threading.Thread(target=self._greet, args=(self._listener,), daemon=True).start()

    def _greet(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed: the host is gone
            with connection:
                connection.sendall(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")

    def terminate(self) -> None:
        self.alive = False
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it listening.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    @property
    def home(self) -> Path:
        return self.directory / "home" / LOGIN_USER

    def run(self, command: str, env: dict[str, str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        """An SSH session's command: the login shell (bash) in the user's home, its environment as the
        session set it, stdin as sent."""
        self.commands.append(command)
        self.stdin_seen.append(stdin or "")
        system_path = "/usr/local/bin:/usr/bin:/bin"
        environment = {"PATH": f"{self.directory / 'bin'}:{os.path.dirname(sys.executable)}:{system_path}",
                       "HOME": str(self.home), "USER": LOGIN_USER, "LOGNAME": LOGIN_USER, "SHELL": "/bin/bash",
                       "HOST_DIR": str(self.directory), "LANG": "C.UTF-8", **env}
        return subprocess.run(["bash", "-c", command], cwd=self.home, env=environment, input=stdin or "",
                              capture_output=True, text=True, timeout=120)

    def docker_calls(self) -> list[dict[str, Any]]:
        log = self.directory / "docker.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def containers(self) -> dict[str, dict[str, Any]]:
        store = self.directory / "containers.json"
        return dict(json.loads(store.read_text())) if store.exists() else {}

    def path(self, absolute: str) -> Path:
        """Where an absolute path on the host lies in its folder."""
        return self.directory / absolute.lstrip("/")


# --- Lambda's API ---------------------------------------------------------------------------------------


class FakeLambda(BaseHTTPRequestHandler):
    """Just the endpoints the scripts use, with Lambda's response shapes and error bodies."""

    cloud: FakeCloud

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        reply(self, status, json.dumps(body).encode(), "application/json")

    def _authorised(self) -> bool:
        if self.headers.get("authorization") != f"Bearer {self.cloud.key}":
            self._reply(401, {"error": {"code": "global/invalid-api-key", "message": "API key was invalid"}})
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorised():
            return
        state = self.cloud.state
        instances = state["instances"]
        if self.path == "/api/v1/instances":
            self._reply(200, {"data": list(instances.values())})
            return
        if self.path == "/api/v1/instance-types":
            self._reply(200, {"data": instance_types()})
            return
        if self.path == "/api/v1/file-systems":
            self._reply(200, {"data": state.get("file_systems", [])})
            return
        instance = instances.get(self.path.rsplit("/", 1)[-1])
        if instance is None:
            self._reply(404, {"error": {"code": "global/object-does-not-exist", "message": "not found"}})
            return
        # Booting on the first look, active with an address on the next, like a real launch.
        if instance["status"] == "booting" and not state.get("stuck"):
            instance["polls"] = instance.get("polls", 0) + 1
            if instance["polls"] > 1:
                instance.update(status="active", ip=self.cloud.boot(instance["id"]))
        self._reply(200, {"data": instance})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        state = self.cloud.state
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        state["calls"].append((self.path, body))
        if self.path == "/api/v1/instance-operations/launch":
            regions = CATALOG.get(body["instance_type_name"], ("", 0, []))[2]
            if body["instance_type_name"] not in CATALOG:
                self._reply(404, {"error": {"code": "global/object-does-not-exist",
                                            "message": "Specified instance type does not exist"}})
                return
            if state.get("no_capacity") or body["region_name"] not in regions:
                self._reply(400, {"error": {"code": "instance-operations/launch/insufficient-capacity",
                                            "message": "Not enough capacity to fulfill launch request."}})
                return
            instance_id = f"inst{state['launched'] + 1}"
            state["launched"] += 1
            state["instances"][instance_id] = {
                "id": instance_id, "name": body["name"], "status": "booting", "ip": None,
                "region": {"name": body["region_name"]}, "instance_type": {"name": body["instance_type_name"]}}
            self._reply(200, {"data": {"instance_ids": [instance_id]}})
        elif self.path == "/api/v1/instance-operations/terminate":
            gone = [state["instances"].pop(i) for i in body["instance_ids"] if i in state["instances"]]
            if not gone:
                self._reply(404, {"error": {"code": "global/object-does-not-exist", "message": "not found"}})
                return
            for instance in gone:
                self.cloud.shut_down(instance)
            self._reply(200, {"data": {"terminated_instances": gone}})

    def log_message(self, *args: Any) -> None:
        pass


class FakeCloud:
    """The fake Lambda API on a real socket, and the hosts its instances run on."""

    by_url: ClassVar[dict[str, FakeCloud]] = {}  # the running ones, by their API's URL

    def __init__(self, directory: Path, key: str = "test-key") -> None:
        self.directory = directory
        self.key = key
        self.state: dict[str, Any] = {"instances": {}, "calls": [], "launched": 0}
        self.ssh_port = free_port()  # every host greets on this port, each at its own address
        self.hosts: dict[str, FakeHost] = {}
        self.docker_group = False  # whether the login user of the hosts launched next is in the docker group
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (FakeLambda,), {"cloud": self}))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/api/v1"
        FakeCloud.by_url[self.url] = self

    def boot(self, instance_id: str) -> str:
        """The instance's address once it is active: a host that greets there, unless `silent_ssh`."""
        ip = f"127.0.0.{10 + int(instance_id.removeprefix('inst'))}"
        if not self.state.get("silent_ssh"):
            self.hosts[ip] = FakeHost(ip, self.ssh_port, self.directory / ip, host_key=host_key_of(ip, instance_id),
                                      docker_group=self.docker_group)
        return ip

    def shut_down(self, instance: dict[str, Any]) -> None:
        host = self.hosts.get(instance.get("ip") or "")
        if host is not None:
            host.terminate()

    def reuse_address(self, ip: str) -> FakeHost:
        """Someone else's instance at an address that was ours: another host key, the same greeting."""
        self.hosts[ip] = FakeHost(ip, self.ssh_port, self.directory / f"{ip}-stranger",
                                  host_key=host_key_of(ip, "stranger"))
        return self.hosts[ip]

    def script_env(self) -> dict[str, str]:
        """What the instance script needs to find the fake hosts' SSH port, and to give up quickly."""
        return {"LAMBDA_SSH_PORT": str(self.ssh_port), "LAMBDA_SSH_WAIT_SECONDS": "1", "LAMBDA_POLL_SECONDS": "0.01"}

    def stop(self) -> None:
        FakeCloud.by_url.pop(self.url, None)
        self._server.shutdown()
        for host in self.hosts.values():
            host.terminate()


def host_key_of(ip: str, seed: str) -> str:
    """A host key line, distinct per host (the fake never does SSH's key exchange)."""
    import base64
    import hashlib

    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + hashlib.sha256(f"{ip}/{seed}".encode()).digest()
    return f"ssh-ed25519 {base64.b64encode(blob).decode()}"
