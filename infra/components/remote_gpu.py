"""RemoteGpuHost: a rented Lambda Cloud GPU instance running one catalog backend with vLLM.

The instance is created and deleted through Lambda's HTTP API (`command.local.Command` running
infra/scripts/lambda_instance.py), then reached over SSH (`command.remote.Command`): a first contact
learns the host key, and every later command, the bootstrap with its secrets first, is pinned to it.
vLLM listens on the host's loopback only and requires the API key; the proxy reaches it through an
SSH tunnel (see tunnel.py).

Only the instance has a delete. Terminating it ends everything on it, and a remote delete would
have to reach the host over SSH: after the idle watchdog has terminated the instance, that dial
fails for minutes and blocks both `pulumi destroy` and the relaunch.
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

# The instance script as the commands name it: relative to infra/, Pulumi.yaml's `main` folder, which
# the engine makes the working directory of the program and its providers (pkg/engine/project.go,
# getPwdMain), and in which pulumi-command runs a local command. An absolute path would be stored in
# the state, and a `pulumi destroy` from another checkout (or CI) could not run the delete command.
SCRIPT_IN_MAIN = "scripts/lambda_instance.py"
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


def host_key_script(port: int = 22) -> str:
    """Shell run on the GPU host at first contact: prints the ed25519 key its SSH server presents on
    `port` (`ssh-keyscan` against itself, so it is the key sshd really uses, not a file beside it)."""
    return f"""set -eu
key=$(ssh-keyscan -T 10 -t ed25519 -p {port} 127.0.0.1 2>/dev/null | awk '$2 == "ssh-ed25519" {{print $2, $3; exit}}')
[ -n "$key" ] || {{ echo "the SSH server on port {port} presented no ed25519 host key" >&2; exit 1; }}
printf '%s\\n' "$key"
"""


def tunnel_access_script(port: int = VLLM_PORT) -> str:
    """Shell run on the GPU host (as the SSH user) that makes the tunnel's own key: it may forward
    to 127.0.0.1:`port` and nothing else (no shell, no command, no other port, no agent), and
    replaces the one made before. Prints that private key as JSON: the command's output is a secret
    and its logging is off. The login key never leaves the remote stack."""
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
python3 - "$work/key" <<'DREAMSEED_JSON'
import json, sys
print(json.dumps({{"tunnel_key": open(sys.argv[1], encoding="utf-8").read()}}))
DREAMSEED_JSON
"""


# Docker as the login user if it may use the socket (in the `docker` group), else through sudo -n:
# on Lambda's image the `ubuntu` user is not in the group but has passwordless sudo. Either way the
# bootstrap stops here, naming the cause, rather than at its first docker command.
DOCKER_ACCESS = """if docker info >/dev/null 2>&1; then DOCKER=docker
elif sudo -n docker info >/dev/null 2>&1; then DOCKER="sudo -n docker"
else echo "$(id -un) cannot use Docker: not in the docker group, and sudo -n docker failed" >&2; exit 1
fi
"""
# The label every model server this stack runs carries: a re-run of the bootstrap removes them all
# (a renamed backend's old container too) before it starts the current one.
SERVER_LABEL = "dreamseed.role=model-server"


def bootstrap_script(name: str, backend: Backend, port: int = VLLM_PORT, *, file_system_name: str = "",
                     watchdog: str = "") -> str:
    """Shell run on the GPU host. Secrets arrive on standard input (HF token, the vLLM API key,
    then the Lambda API key for the watchdog), so they never appear in this text, in Pulumi's state
    or in the process list. They reach the container through an env file that lives only while
    `docker run` reads it: vLLM takes its key from VLLM_API_KEY, not from an `--api-key` argument
    that `ps` on the host would show (`docker inspect` shows a container's environment to whoever
    may use Docker on the host). With a persistent filesystem the Hugging Face cache lives on it
    (Lambda mounts it at /lambda/nfs/NAME), so the weights are downloaded once, not by every new
    instance. The watchdog is installed first: whatever fails after it, the instance still ends."""
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
{watchdog}{DOCKER_ACCESS}{cache}$DOCKER pull {shlex.quote(backend.image)}
for old in $($DOCKER ps -aq --filter label={SERVER_LABEL}) $($DOCKER ps -aq --filter "name=^/{container}$"); do
  $DOCKER rm -f "$old" >/dev/null
done
envfile=$(mktemp)  # mode 600
trap 'rm -f "$envfile"' EXIT
printf 'HF_TOKEN=%s\\nVLLM_API_KEY=%s\\n' "$HF_TOKEN" "$VLLM_API_KEY" > "$envfile"
$DOCKER run -d --name {container} --label {SERVER_LABEL} --gpus all --ipc=host --restart unless-stopped \\
  -p 127.0.0.1:{port}:{port} -v "$CACHE:{HF_CACHE}" --env-file "$envfile" \\
  {shlex.quote(backend.image)} {args}
rm -f "$envfile"
i=0
until curl -sf -o /dev/null http://127.0.0.1:{port}/health; do
  i=$((i + 1))
  if [ "$i" -gt {tries} ] || [ "$($DOCKER inspect -f '{{{{.State.Running}}}}' {container})" != true ]; then
    echo "vLLM did not become healthy" >&2; $DOCKER logs --tail 50 {container} >&2; exit 1
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
            create=f"python3 {SCRIPT_IN_MAIN} create",
            delete=f"python3 {SCRIPT_IN_MAIN} delete",
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
        on_this_instance = [self.instance_id]  # a new instance re-runs every command below

        # First contact: the instance was launched a moment ago at this address, so the key its SSH
        # server presents now is the one to pin. No secret travels on this connection.
        self.host_key = command.remote.Command(
            f"{resource_name}-host-key",
            connection=command.remote.ConnectionArgs(
                host=self.public_ip, user=args.ssh_user, private_key=args.ssh_private_key,
                dial_error_limit=60,  # a new instance may take minutes to accept SSH (15 s per try)
            ),
            create=host_key_script(),
            triggers=on_this_instance,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.instance]),
        )
        # Every later connection, the one carrying the secrets first, accepts only that key: an
        # address Lambda gave to someone else after a termination gets nothing.
        pinned = command.remote.ConnectionArgs(
            host=self.public_ip, user=args.ssh_user, private_key=args.ssh_private_key,
            host_key=self.host_key.stdout, dial_error_limit=4,
        )
        self.server = command.remote.Command(
            f"{resource_name}-vllm",
            connection=pinned,
            create=self.instance_id.apply(lambda instance_id: bootstrap_script(
                args.name, backend, file_system_name=args.file_system_name,
                watchdog=watchdog_install(instance_id, args.lambda_api_url, auto_stop))),
            stdin=pulumi.Output.concat(pulumi.Output.secret(args.hf_token), "\n",
                                        pulumi.Output.secret(args.vllm_api_key), "\n",
                                        pulumi.Output.secret(args.lambda_api_key), "\n"),
            # A new image, model, vLLM argument or auto-stop limit re-runs the bootstrap.
            triggers=[backend.image, *vllm_command(backend, VLLM_PORT), *on_this_instance,
                      f"{auto_stop.idle_minutes:g}", f"{auto_stop.max_lifetime_hours:g}"],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.host_key]),
        )
        # The tunnel's restricted key. It is printed, so the output is a secret and nothing is logged
        # (pulumi-command streams a command's output as status lines unless logging is off).
        self.tunnel_access = command.remote.Command(
            f"{resource_name}-tunnel-access",
            connection=pinned,
            create=tunnel_access_script(VLLM_PORT),
            triggers=on_this_instance,
            logging=command.remote.Logging.NONE,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.host_key], additional_secret_outputs=["stdout"]),
        )
        access = self.tunnel_access.stdout.apply(json.loads)
        self.tunnel_private_key: pulumi.Output[str] = access.apply(lambda a: str(a["tunnel_key"]))
        self.ssh_host_key: pulumi.Output[str] = self.host_key.stdout
        self.port = VLLM_PORT
        self.register_outputs({"instance_id": self.instance_id, "public_ip": self.public_ip})
