"""RemoteGpuHost: a rented Lambda Cloud GPU instance running one catalog backend with vLLM.

The instance is created and deleted through Lambda's HTTP API (`command.local.Command` running
infra/scripts/lambda_instance.py), then bootstrapped over SSH (`command.remote.Command`). vLLM
listens on the host's loopback only and requires the API key; the proxy reaches it through an
SSH tunnel (see tunnel.py). `pulumi destroy` removes the server first, then the instance.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_command as command

from dreamseed.policy import Backend

from .common import container_name
from .vllm import HF_CACHE, vllm_command

# The instance script as the commands name it: relative to the project directory, where Pulumi runs
# them. An absolute path would be stored in the state, and a `pulumi destroy` from another checkout
# (or CI) could not run the delete command, leaving the instance billed.
SCRIPT_IN_PROJECT = "infra/scripts/lambda_instance.py"
WATCHDOG = Path(__file__).resolve().parents[1] / "scripts" / "idle_watchdog.py"
VLLM_PORT = 8000
HEALTH_WAIT_S = 3600  # first start downloads the weights (~40 GB for the AWQ 70B)


@dataclass(frozen=True)
class AutoStop:
    """When the instance terminates itself (infra/scripts/idle_watchdog.py; 0 turns a limit off)."""

    idle_minutes: float = 60
    max_lifetime_hours: float = 24


def watchdog_install(instance_id: str, lambda_api_url: str, auto_stop: AutoStop) -> str:
    """Shell that installs the idle watchdog as a systemd service. The Lambda API key (read from
    standard input into $LAMBDA_API_KEY before this runs) goes to a root-only environment file."""
    settings = {
        "LAMBDA_API_URL": lambda_api_url, "LAMBDA_INSTANCE_ID": instance_id,
        "DREAMSEED_IDLE_SECONDS": f"{auto_stop.idle_minutes * 60:g}",
        "DREAMSEED_MAX_LIFETIME_SECONDS": f"{auto_stop.max_lifetime_hours * 3600:g}",
        "DREAMSEED_METRICS_URL": f"http://127.0.0.1:{VLLM_PORT}/metrics",
    }
    env_lines = "\n".join(f"{key}={value}" for key, value in settings.items())
    return f"""sudo mkdir -p /opt/dreamseed /etc/dreamseed
sudo tee /opt/dreamseed/idle_watchdog.py >/dev/null <<'DREAMSEED_WATCHDOG'
{WATCHDOG.read_text(encoding="utf-8")}DREAMSEED_WATCHDOG
sudo install -m 600 /dev/null /etc/dreamseed/watchdog.env
{{ printf '%s\\n' {shlex.quote(env_lines)}; printf 'LAMBDA_API_KEY=%s\\n' "$LAMBDA_API_KEY"; }} \\
  | sudo tee /etc/dreamseed/watchdog.env >/dev/null
sudo tee /etc/systemd/system/dreamseed-idle-watchdog.service >/dev/null <<'DREAMSEED_UNIT'
[Unit]
Description=DreamSeed: terminate this instance when idle or past its maximum lifetime
After=network-online.target docker.service

[Service]
EnvironmentFile=/etc/dreamseed/watchdog.env
ExecStart=/usr/bin/python3 /opt/dreamseed/idle_watchdog.py
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
DREAMSEED_UNIT
sudo systemctl daemon-reload
sudo systemctl enable dreamseed-idle-watchdog >/dev/null
sudo systemctl restart dreamseed-idle-watchdog
"""


def tunnel_access_script(port: int = VLLM_PORT, host_key: str = "/etc/ssh/ssh_host_ed25519_key.pub") -> str:
    """Shell run on the GPU host (as the SSH user) that makes the tunnel's own key: it may forward
    to 127.0.0.1:`port` and nothing else (no shell, no command, no other port, no agent), and
    replaces the one made before. Prints JSON: that private key and the host's public key, which the
    local stack's tunnel pins. The login key never leaves the remote stack."""
    return f"""set -eu
umask 077
mkdir -p "$HOME/.ssh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ssh-keygen -q -t ed25519 -N '' -C dreamseed-tunnel -f "$work/key"
keys="$HOME/.ssh/authorized_keys"
touch "$keys"
{{ grep -v ' dreamseed-tunnel$' "$keys" || true
  printf 'restrict,port-forwarding,permitopen="127.0.0.1:{port}",command="/bin/false" %s\\n' "$(cat "$work/key.pub")"
}} > "$work/authorized_keys"
cat "$work/authorized_keys" > "$keys"
python3 - "$work/key" {shlex.quote(host_key)} <<'DREAMSEED_JSON'
import json, sys
key, host_key = (open(path, encoding="utf-8").read() for path in sys.argv[1:3])
print(json.dumps({{"tunnel_key": key, "host_key": " ".join(host_key.split()[:2])}}))
DREAMSEED_JSON
"""


def bootstrap_script(name: str, backend: Backend, port: int = VLLM_PORT, *, file_system_name: str = "",
                     watchdog: str = "") -> str:
    """Shell run on the GPU host. Secrets arrive on standard input (HF token, the vLLM API key,
    then the Lambda API key for the watchdog), so they never appear in this text, in Pulumi's state
    or in the process list; vLLM reads its key from its environment (VLLM_API_KEY), not from an
    `--api-key` argument, which `ps` and `docker inspect` would show. With a persistent filesystem
    the Hugging Face cache lives on it (Lambda mounts it at /lambda/nfs/NAME), so the weights are
    downloaded once, not by every new instance."""
    assert backend.image is not None
    container = container_name(name)
    args = " ".join(shlex.quote(a) for a in vllm_command(backend, port))
    tries = HEALTH_WAIT_S // 10
    if file_system_name:
        mount = f"/lambda/nfs/{file_system_name}"
        cache = f"""CACHE={shlex.quote(mount + "/huggingface")}
if ! mountpoint -q {shlex.quote(mount)}; then
  echo "persistent filesystem {file_system_name} is not mounted at {mount}" >&2; exit 1
fi
mkdir -p "$CACHE"
"""
    else:
        cache = 'CACHE="$HOME/.cache/huggingface"\nmkdir -p "$CACHE"\n'
    return f"""set -eu
IFS= read -r HF_TOKEN
IFS= read -r VLLM_API_KEY
IFS= read -r LAMBDA_API_KEY
export HF_TOKEN VLLM_API_KEY
{watchdog}{cache}docker pull {shlex.quote(backend.image)}
docker rm -f {container} >/dev/null 2>&1 || true
docker run -d --name {container} --gpus all --ipc=host --restart unless-stopped \\
  -p 127.0.0.1:{port}:{port} -v "$CACHE:{HF_CACHE}" -e HF_TOKEN -e VLLM_API_KEY \\
  {shlex.quote(backend.image)} {args}
i=0
until curl -sf -o /dev/null http://127.0.0.1:{port}/health; do
  i=$((i + 1))
  if [ "$i" -gt {tries} ] || [ "$(docker inspect -f '{{{{.State.Running}}}}' {container})" != true ]; then
    echo "vLLM did not become healthy" >&2; docker logs --tail 50 {container} >&2; exit 1
  fi
  sleep 10
done
echo "{container} is healthy on 127.0.0.1:{port}"
"""


@dataclass
class RemoteGpuHostArgs:
    name: str
    backend: Backend
    lambda_api_url: str
    lambda_api_key: pulumi.Input[str]
    region: str
    instance_type: str
    instance_name: str
    ssh_key_name: str
    ssh_user: str
    ssh_private_key: pulumi.Input[str]
    hf_token: pulumi.Input[str]
    vllm_api_key: pulumi.Input[str]
    file_system_name: str = ""
    idle_minutes: float = 60
    max_lifetime_hours: float = 24


class RemoteGpuHost(pulumi.ComponentResource):
    instance_id: pulumi.Output[str]
    public_ip: pulumi.Output[str]

    def __init__(self, resource_name: str, args: RemoteGpuHostArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:RemoteGpuHost", resource_name, None, opts)
        self.instance = command.local.Command(
            f"{resource_name}-instance",
            create=f"python3 {SCRIPT_IN_PROJECT} create",
            delete=f"python3 {SCRIPT_IN_PROJECT} delete",
            environment={
                "LAMBDA_API_URL": args.lambda_api_url,
                "LAMBDA_API_KEY": args.lambda_api_key,
                "LAMBDA_REGION": args.region,
                "LAMBDA_INSTANCE_TYPE": args.instance_type,
                "LAMBDA_INSTANCE_NAME": args.instance_name,
                "LAMBDA_SSH_KEY_NAME": args.ssh_key_name,
                "LAMBDA_FILE_SYSTEM": args.file_system_name,
            },
            # Another region, type, name or filesystem replaces the instance: the old one is terminated
            # first (create-before-delete would keep both running, and billed, until the end of the update).
            triggers=[args.region, args.instance_type, args.instance_name, args.file_system_name],
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )
        described = self.instance.stdout.apply(json.loads)
        self.instance_id = described.apply(lambda d: str(d["id"]))
        self.public_ip = described.apply(lambda d: str(d["ip"]))
        backend = args.backend
        auto_stop = AutoStop(args.idle_minutes, args.max_lifetime_hours)
        ssh = command.remote.ConnectionArgs(
            host=self.public_ip,
            user=args.ssh_user,
            private_key=args.ssh_private_key,
            dial_error_limit=60,  # a new instance may take minutes to accept SSH (15 s per try)
        )
        self.server = command.remote.Command(
            f"{resource_name}-vllm",
            connection=ssh,
            create=self.instance_id.apply(lambda instance_id: bootstrap_script(
                args.name, backend, file_system_name=args.file_system_name,
                watchdog=watchdog_install(instance_id, args.lambda_api_url, auto_stop))),
            delete=f"docker rm -f dreamseed-{args.name} || true",
            stdin=pulumi.Output.concat(pulumi.Output.secret(args.hf_token), "\n",
                                        pulumi.Output.secret(args.vllm_api_key), "\n",
                                        pulumi.Output.secret(args.lambda_api_key), "\n"),
            # A new image, model, vLLM argument or auto-stop limit re-runs the bootstrap.
            triggers=[backend.image, *vllm_command(backend, VLLM_PORT), self.instance_id,
                      f"{auto_stop.idle_minutes:g}", f"{auto_stop.max_lifetime_hours:g}"],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.instance], delete_before_replace=True),
        )
        # The tunnel's restricted key and the host key to pin, over the same SSH connection.
        self.tunnel_access = command.remote.Command(
            f"{resource_name}-tunnel-access",
            connection=ssh,
            create=tunnel_access_script(VLLM_PORT),
            triggers=[self.instance_id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.instance], additional_secret_outputs=["stdout"]),
        )
        access = self.tunnel_access.stdout.apply(json.loads)
        # stdout is a secret, so the key stays one; the host key is public and is pinned in plain sight.
        self.tunnel_private_key: pulumi.Output[str] = access.apply(lambda a: str(a["tunnel_key"]))
        self.ssh_host_key: pulumi.Output[str] = pulumi.Output.unsecret(access.apply(lambda a: str(a["host_key"])))
        self.port = VLLM_PORT
        self.register_outputs({"instance_id": self.instance_id, "public_ip": self.public_ip})
