#!/usr/bin/env python3
"""Create or delete a Lambda Cloud GPU instance through its HTTP API (stdlib only).

Run by the remote70b stack's `command.local.Command`:

    lambda_instance.py create   prints {"id", "ip", "name", "region", "instance_type"} once the
                                instance is active and its SSH server answers (reusing a running
                                instance of the same name, so a retried `pulumi up` never pays for two)
    lambda_instance.py delete   terminates the instance named in $PULUMI_COMMAND_STDOUT

Pulumi runs both in infra/ (the stack's `main` folder), as `python3 scripts/lambda_instance.py`.
Settings come from the environment: LAMBDA_API_KEY, LAMBDA_API_URL, LAMBDA_REGION,
LAMBDA_INSTANCE_TYPE, LAMBDA_INSTANCE_NAME, LAMBDA_SSH_KEY_NAME, and optionally
LAMBDA_FILE_SYSTEM (a persistent filesystem in the region, attached so the model weights outlive
the instance), LAMBDA_WAIT_SECONDS (default 1800), LAMBDA_POLL_SECONDS (default 10),
LAMBDA_SSH_WAIT_SECONDS (default 600) and LAMBDA_SSH_PORT (default 22).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

LIVE = {"booting", "active", "unhealthy"}


class LambdaError(Exception):
    pass


class UnreachableError(LambdaError):
    """The API did not answer at all (no network, wrong URL), as opposed to answering with an error."""


def api(method: str, path: str, body: dict[str, Any] | None = None, *, base_url: str | None = None,
        key: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """One call to Lambda's API; base URL and key default to $LAMBDA_API_URL and $LAMBDA_API_KEY."""
    base = base_url or os.environ.get("LAMBDA_API_URL", "https://cloud.lambda.ai/api/v1")
    request = urllib.request.Request(
        base.rstrip("/") + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key or os.environ['LAMBDA_API_KEY']}", "Content-Type": "application/json",
                 "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read() or b"{}")
            return answer
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error", {})
        except ValueError:
            error = {}
        detail = f"{error.get('code', '')} {error.get('message', '')}"
        raise LambdaError(f"{method} {path}: HTTP {exc.code} {detail}".strip()) from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise UnreachableError(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None


def describe(instance: dict[str, Any]) -> dict[str, Any]:
    return {"id": instance["id"], "ip": instance.get("ip"), "name": instance.get("name"),
            "region": (instance.get("region") or {}).get("name"),
            "instance_type": (instance.get("instance_type") or {}).get("name")}


def check_capacity(instance_type: str, region: str, **connection: Any) -> str:
    """Fail before launching when Lambda does not offer ``instance_type`` or has none free in
    ``region`` now (GET /instance-types lists, per type, the regions with capacity), naming what is
    available instead. Returns a line with the type's description and hourly price."""
    catalog: dict[str, Any] = api("GET", "/instance-types", **connection).get("data", {})
    available = {name: sorted(r["name"] for r in entry.get("regions_with_capacity_available", []))
                 for name, entry in catalog.items()}
    now = "; ".join(f"{name} in {', '.join(regions)}" for name, regions in sorted(available.items()) if regions)
    if instance_type not in catalog:
        raise LambdaError(f"Lambda offers no instance type {instance_type!r} (it offers: {', '.join(sorted(catalog))}). "
                          f"With capacity now: {now or 'none'}. Set dreamseed:instanceType")
    if region not in available[instance_type]:
        raise LambdaError(f"no {instance_type} is free in {region} now. With capacity now: {now or 'none'}. "
                          "Set dreamseed:region (or dreamseed:instanceType) to one of those, or retry later")
    spec = catalog[instance_type].get("instance_type", {})
    price = spec.get("price_cents_per_hour")
    return f"{instance_type} ({spec.get('description', '?')})" + (f", ${price / 100:.2f}/hour" if price else "")


def check_file_system(name: str, region: str, **connection: Any) -> None:
    """Fail before launching when the persistent filesystem is missing from ``region``: a
    filesystem attaches only in its own region, and without it every new instance downloads the
    weights again while billed."""
    file_systems = api("GET", "/file-systems", **connection).get("data", [])
    regions = sorted({(fs.get("region") or {}).get("name", "?") for fs in file_systems if fs.get("name") == name})
    if region not in regions:
        where = f"it exists in {', '.join(regions)}" if regions else "it does not exist"
        raise LambdaError(f"persistent filesystem {name!r} is not in {region}: {where}. Create it in the Lambda "
                          f"console (Storage, region {region}), or set dreamseed:fileSystemName to '' to download "
                          "the weights on every new instance")


def running_instance(wanted: dict[str, str], **connection: Any) -> str | None:
    """The id of a live instance that is what the stack asks for, if there is one. Only one of the
    same name, type and region is reused: one of the same name in another region or of another type
    is the one a replacement is about to terminate."""
    live = [describe(i) for i in api("GET", "/instances", **connection).get("data", []) if i.get("status") in LIVE]
    existing = [i for i in live if all(i[key] == value for key, value in wanted.items())]
    return str(existing[0]["id"]) if existing else None


def preflight(wanted: dict[str, str], file_system: str, **connection: Any) -> str:
    """What `pulumi preview` checks before anything is launched: the instance already runs, or the
    type exists and has capacity in the region, and the persistent filesystem is there."""
    instance_id = running_instance(wanted, **connection)
    if instance_id is not None:
        return f"instance {instance_id} ({wanted['instance_type']} in {wanted['region']}) is running"
    offer = check_capacity(wanted["instance_type"], wanted["region"], **connection)
    if file_system:
        check_file_system(file_system, wanted["region"], **connection)
    return f"{offer} has capacity in {wanted['region']} now"


def ssh_answers(ip: str, port: int, timeout: float = 10) -> bool:
    """Whether an SSH server greets on ip:port (RFC 4253: the server sends "SSH-" first)."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            return connection.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def create() -> dict[str, Any]:
    name = os.environ["LAMBDA_INSTANCE_NAME"]
    wanted = {"name": name, "region": os.environ["LAMBDA_REGION"], "instance_type": os.environ["LAMBDA_INSTANCE_TYPE"]}
    running = running_instance(wanted)
    launched_here = running is None
    if running is not None:
        instance_id = running
        print(f"reusing instance {instance_id} named {name}", file=sys.stderr)
    else:
        offer = check_capacity(wanted["instance_type"], wanted["region"])
        file_system = os.environ.get("LAMBDA_FILE_SYSTEM", "")
        if file_system:
            check_file_system(file_system, wanted["region"])
        print(f"launching {offer} in {wanted['region']}", file=sys.stderr)
        launch: dict[str, Any] = {
            "region_name": os.environ["LAMBDA_REGION"],
            "instance_type_name": os.environ["LAMBDA_INSTANCE_TYPE"],
            "ssh_key_names": [os.environ["LAMBDA_SSH_KEY_NAME"]],
            "quantity": 1,
            "name": name,
        }
        if file_system:
            launch["file_system_names"] = [file_system]
        launched = api("POST", "/instance-operations/launch", launch)
        instance_id = launched["data"]["instance_ids"][0]
        print(f"launched instance {instance_id}", file=sys.stderr)
    deadline = time.monotonic() + float(os.environ.get("LAMBDA_WAIT_SECONDS", "1800"))
    poll = float(os.environ.get("LAMBDA_POLL_SECONDS", "10"))
    ssh_wait = float(os.environ.get("LAMBDA_SSH_WAIT_SECONDS", "600"))
    ssh_port = int(os.environ.get("LAMBDA_SSH_PORT", "22"))
    active_since: float | None = None
    while True:
        instance = api("GET", f"/instances/{instance_id}")["data"]
        if instance.get("status") in {"terminated", "terminating"}:
            raise LambdaError(f"instance {instance_id} is {instance['status']}")
        if instance.get("status") == "active" and instance.get("ip"):
            # The auto-stop is installed over SSH: an instance that never lets us in would run with
            # no watchdog, so it must answer SSH before Pulumi records it.
            if ssh_answers(instance["ip"], ssh_port):
                return describe(instance)
            active_since = time.monotonic() if active_since is None else active_since
            late = time.monotonic() - active_since > ssh_wait
            waiting_for = f"active at {instance['ip']} but its SSH server (port {ssh_port}) did not answer"
        else:
            late = time.monotonic() > deadline
            waiting_for = f"still {instance.get('status')!r} after the wait"
        if late:
            # A failed create is not in Pulumi's state, so `pulumi destroy` would never terminate it:
            # terminate it now rather than leave a billed instance nobody tracks.
            if launched_here:
                api("POST", "/instance-operations/terminate", {"instance_ids": [instance_id]})
            raise LambdaError(f"instance {instance_id} {waiting_for}"
                              + ("; terminated it, so it is not billed: run `pulumi up` again" if launched_here else ""))
        time.sleep(poll)


def delete() -> dict[str, Any]:
    previous = os.environ.get("PULUMI_COMMAND_STDOUT", "").strip()
    if not previous:
        raise LambdaError("no instance recorded (PULUMI_COMMAND_STDOUT is empty)")
    instance_id = json.loads(previous)["id"]
    try:
        api("POST", "/instance-operations/terminate", {"instance_ids": [instance_id]})
    except LambdaError as exc:
        # Already gone (terminated by hand): deleting it again must not block `pulumi destroy`.
        if "HTTP 404" not in str(exc):
            raise
    return {"terminated": instance_id}


def main(argv: list[str]) -> int:
    actions = {"create": create, "delete": delete}
    if len(argv) != 2 or argv[1] not in actions:
        print(f"usage: {argv[0]} create|delete", file=sys.stderr)
        return 2
    try:
        print(json.dumps(actions[argv[1]]()))
    except (LambdaError, KeyError) as exc:
        print(f"lambda_instance {argv[1]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
