"""The tunnel to the 70B host against a real OpenSSH server: the key the remote stack makes can
forward to vLLM's port and nothing else, and the tunnel accepts only the pinned host key.

The remote side is the stack's own `host_key_script` (the first contact) and `tunnel_access_script`
run against a temporary home; the client side is the tunnel container's own `SSH_SCRIPT`. Only sshd's
configuration file is the test's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.components.remote_gpu import host_key_script, tunnel_access_script
from infra.components.tunnel import SSH_SCRIPT
from support import free_port, reply

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(not Path(SSHD).exists() or os.geteuid() != 0,
                                reason="needs sshd (tests/install-system-tools.sh installs openssh-server) and root "
                                       "(an sshd serving other users runs as root; CI runs as root)")


class Named(BaseHTTPRequestHandler):
    name = ""

    def do_GET(self) -> None:
        reply(self, 200, self.name.encode())

    def log_message(self, *args: object) -> None:
        pass


def serve(name: str) -> tuple[ThreadingHTTPServer, int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (Named,), {"name": name}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def remote_host(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A host with vLLM's stand-in on one loopback port, another service on a second, and sshd."""
    vllm, vllm_port = serve("vllm")
    other, other_port = serve("something else")
    home = tmp_path / "home"
    home.mkdir()
    host_key = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {home}/.ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {tmp_path}/sshd.pid
""")
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    wait_for_port(port)
    # The stack's scripts, as the SSH user would run them on the instance: the first contact reads the
    # key sshd presents, then the tunnel's key is made.
    learned = subprocess.run(["bash", "-c", host_key_script(port)], capture_output=True, text=True, timeout=60)
    assert learned.returncode == 0, learned.stderr
    made = subprocess.run(["bash", "-c", tunnel_access_script(vllm_port)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)})
    assert made.returncode == 0, made.stderr
    access = {**json.loads(made.stdout), "host_key": learned.stdout.strip()}
    yield {"port": port, "vllm_port": vllm_port, "other_port": other_port, "access": access, "home": home,
           "host_key": host_key}
    sshd.terminate()
    sshd.wait(timeout=10)
    vllm.shutdown()
    other.shutdown()


def start_tunnel(host: dict[str, object], remote_port: object, host_key_line: str) -> tuple[subprocess.Popen[str], int]:
    local_port = free_port()
    access = host["access"]
    assert isinstance(access, dict)
    env = {**os.environ, "SSH_PRIVATE_KEY": access["tunnel_key"], "SSH_HOST_KEY": host_key_line,
           "SSH_HOST": "127.0.0.1", "SSH_USER": "root", "SSH_PORT": str(host["port"]),
           "LOCAL_BIND": "127.0.0.1", "LOCAL_PORT": str(local_port), "REMOTE_PORT": str(remote_port)}
    return subprocess.Popen(["sh", "-c", SSH_SCRIPT], env=env, stderr=subprocess.PIPE, text=True), local_port


def stop_tunnel(tunnel: subprocess.Popen[str]) -> str:
    """End the tunnel (SIGTERM, then SIGKILL if it lingers on a loaded machine); its stderr."""
    tunnel.terminate()
    try:
        return tunnel.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        tunnel.kill()
        return tunnel.communicate()[1]


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        return str(response.read().decode())


def test_the_tunnel_key_forwards_to_vllms_port_and_nothing_else(remote_host: dict[str, object]) -> None:
    access = remote_host["access"]
    assert isinstance(access, dict)
    assert access["host_key"] == " ".join(Path(f"{remote_host['host_key']}.pub").read_text().split()[:2])
    line = (Path(str(remote_host["home"])) / ".ssh" / "authorized_keys").read_text().strip()
    assert line.startswith(f'restrict,port-forwarding,permitopen="127.0.0.1:{remote_host["vllm_port"]}",'
                           'command="/bin/false" ssh-ed25519 ')

    tunnel, local_port = start_tunnel(remote_host, remote_host["vllm_port"], access["host_key"])
    try:
        wait_for_port(local_port)
        assert fetch(local_port) == "vllm"  # through SSH to the host's loopback
    finally:
        stop_tunnel(tunnel)

    # Another port on the same host: sshd refuses to open it.
    sideways, sideways_port = start_tunnel(remote_host, remote_host["other_port"], access["host_key"])
    try:
        wait_for_port(sideways_port)
        with pytest.raises(Exception):  # noqa: B017 (the connection is closed without an answer)
            fetch(sideways_port)
    finally:
        errors = stop_tunnel(sideways)
    assert "administratively prohibited" in errors

    # A command (a shell) is not run: the key's forced command is /bin/false.
    key = Path(str(remote_host["home"])) / "tunnel_key"
    key.write_text(access["tunnel_key"])
    key.chmod(0o600)
    shell = subprocess.run(["ssh", "-i", str(key), "-p", str(remote_host["port"]), "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "root@127.0.0.1", "echo", "reached-a-shell"], capture_output=True, text=True, timeout=30)
    assert "reached-a-shell" not in shell.stdout and shell.returncode != 0


def test_a_host_with_another_key_is_refused(remote_host: dict[str, object], tmp_path: Path) -> None:
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    other_key = " ".join(Path(f"{impostor}.pub").read_text().split()[:2])
    tunnel, _ = start_tunnel(remote_host, remote_host["vllm_port"], other_key)
    _, errors = tunnel.communicate(timeout=30)
    assert tunnel.returncode != 0 and "Host key verification failed" in errors
