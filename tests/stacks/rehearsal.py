"""A rehearsal of `pulumi up` and `pulumi destroy`: the stack program runs under Pulumi's mocks, and
every `command.local.Command` and `command.remote.Command` it declares is really run, the way the
engine and pulumi-command's provider run it, against the fake Lambda API and fake hosts (fakes.py).

What it reproduces, and where each fact comes from (docs/development.md says the same):

- Working directory: the engine starts the program and its provider plugins in Pulumi.yaml's `main`
  folder (pulumi/pulumi pkg/engine/project.go, getPwdMain), and a local command without `dir` runs in
  the provider's working directory (pulumi-command provider/pkg/provider/local/commandOutputs.go:
  `cmd.Dir = os.Getwd()`): here infra/. `/bin/sh -c` runs it, with the provider's environment plus
  `environment`, PULUMI_COMMAND_STDOUT/STDERR of the previous run (on update and delete), and stdin.
- Remote commands (remote/commandOutputs.go, remote/connection.go): the provider dials the host up to
  `dialErrorLimit` times (default 10), each try up to `perDialTimeout` (default 15 s), and any error
  counts, a host key mismatch included (ssh.FixedHostKey when `hostKey` is set; any key otherwise).
  A session sets `environment` and PULUMI_COMMAND_STDOUT/STDERR, sends stdin, and runs the command in
  the login shell, in the user's home. A dead host's tries are counted on a fake clock, 15 s each (an
  address with nothing behind it times out; the fake host's closed port answers at once).
- Output: stdout and stderr are kept (trailing newline trimmed) and streamed to the console as
  status lines unless `logging` turns that off (local/logging.go); `streamed` holds what was shown.
  A failure's message carries the command and its whole output (commandOutputs.go).
- Lifecycle: a new resource is created; changed `triggers`, or `--replace`, replace it, deleting the
  old one first when `deleteBeforeReplace` is set, after creating the new one otherwise; any other
  changed input updates it (`update` if set, else `create` again); `delete` runs only when set (the
  remote Delete returns at once without one, remote/commandController.go); a resource the program no
  longer declares, and everything on `destroy`, is deleted in the reverse order of creation. There is
  no Read: a resource whose real object vanished stays in the state (pulumi-command implements none).

Not reproduced: previews, parallel steps, and the engine's deleting of a delete-before-replace
resource's dependents before it (their own replacement runs when they are registered again).
Docker resources are recorded, not run (their inputs are checked by the mock tests).
"""

from __future__ import annotations

import asyncio
import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml

from .conftest import SECRET_SIG, SECRETS, RecordingMonitor, stack_config
from .fakes import FakeCloud, FakeHost

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("command:local:Command", "command:remote:Command")
DIAL_ERROR_LIMIT, PER_DIAL_TIMEOUT_S = 10, 15  # pulumi-command's defaults (remote/connection.go)


def main_folder(root: Path = ROOT) -> Path:
    """The working directory Pulumi gives the program and its providers: Pulumi.yaml's `main`."""
    main = yaml.safe_load((root / "Pulumi.yaml").read_text(encoding="utf-8")).get("main")
    return root / main if main else root


def unwrap(value: Any) -> Any:
    """A wire-format value with its secrets' plain values in place."""
    if isinstance(value, dict):
        if SECRET_SIG in value:
            return unwrap(value.get("value"))
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


class CommandError(Exception):
    """A command that failed as pulumi-command reports it: the status, the command, its whole output."""


@dataclass
class Entry:
    type: str
    name: str
    urn: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]


@dataclass
class Engine:
    """One stack's state and its deployments."""

    stack: str
    cloud: FakeCloud
    config: dict[str, str]
    references: dict[str, Engine] = field(default_factory=dict)  # stack name -> its engine
    provider_env: dict[str, str] = field(default_factory=dict)
    state: dict[str, Entry] = field(default_factory=dict)  # by resource name, in the order of creation
    outputs: dict[str, Any] = field(default_factory=dict)
    clock: float = 0.0  # seconds the provider spent dialling dead hosts
    steps: list[tuple[str, str]] = field(default_factory=list)  # (operation, resource name)
    declared: dict[str, dict[str, Any]] = field(default_factory=dict)  # the last up's inputs, by resource name
    streamed: list[str] = field(default_factory=list)  # status lines shown while commands ran

    # --- running commands as the provider does ----------------------------------------------------
    def _show(self, inputs: dict[str, Any], stdout: str, stderr: str) -> None:
        logging = inputs.get("logging") or "stdoutAndStderr"
        if logging in ("stdout", "stdoutAndStderr"):
            self.streamed += stdout.splitlines()
        if logging in ("stderr", "stdoutAndStderr"):
            self.streamed += stderr.splitlines()

    def _run(self, typ: str, inputs: dict[str, Any], command: str, previous: dict[str, Any]) -> dict[str, Any]:
        env = {k: str(v) for k, v in (inputs.get("environment") or {}).items()}
        for key, name in (("stdout", "PULUMI_COMMAND_STDOUT"), ("stderr", "PULUMI_COMMAND_STDERR")):
            if previous.get(key):
                env[name] = previous[key]
        stdin = inputs.get("stdin")
        if typ == "command:local:Command":
            done = subprocess.run(["/bin/sh", "-c", command], cwd=inputs.get("dir") or main_folder(),
                                  env={**self.provider_env, **env}, input=stdin or "", capture_output=True, text=True,
                                  timeout=120)
        else:
            done = self._dial(inputs["connection"]).run(command, env, stdin)
        self._show(inputs, done.stdout, done.stderr)
        if done.returncode != 0:
            raise CommandError(f"exit status {done.returncode}: running {command!r}:\n{done.stdout}{done.stderr}")
        return {"stdout": done.stdout.removesuffix("\n"), "stderr": done.stderr.removesuffix("\n")}

    def _dial(self, connection: dict[str, Any]) -> FakeHost:
        limit = int(connection.get("dialErrorLimit", DIAL_ERROR_LIMIT))
        per_dial = float(connection.get("perDialTimeout", PER_DIAL_TIMEOUT_S))
        ip, wanted_key = connection["host"], connection.get("hostKey")
        error = ""
        for _ in range(limit if limit > 0 else 1000):
            host = self.cloud.hosts.get(ip)
            try:
                with socket.create_connection((ip, self.cloud.ssh_port), timeout=2) as greeting:
                    reachable = greeting.recv(4) == b"SSH-"
            except OSError as exc:
                reachable, error = False, f"dial tcp {ip}:22: {exc.strerror or exc}"
            if not reachable or host is None:
                self.clock += per_dial
                continue
            if wanted_key and wanted_key.split()[:2] != host.host_key.split()[:2]:
                error = "ssh: handshake failed: ssh: host key mismatch"
                continue
            return host
        raise CommandError(f"Dial: failed {limit} times: {error}")

    # --- the engine's steps ---------------------------------------------------------------------------
    def _create(self, typ: str, inputs: dict[str, Any]) -> dict[str, Any]:
        if inputs.get("create") is None:
            return {}
        return self._run(typ, inputs, inputs["create"], {})

    def _delete(self, entry: Entry) -> None:
        self.steps.append(("delete", entry.name))
        if entry.inputs.get("delete") is not None:
            self._run(entry.type, entry.inputs, entry.inputs["delete"], entry.outputs)
        del self.state[entry.name]

    def register(self, typ: str, name: str, urn: str, wire: dict[str, Any], delete_before_replace: bool,
                 replace: set[str]) -> dict[str, Any]:
        """What the engine does with one registered resource; returns its outputs."""
        inputs = unwrap(wire)
        self.declared[name] = inputs
        if typ not in COMMANDS:
            return self._other(typ, inputs)
        old = self.state.get(name)
        if old is not None and (urn in replace or old.inputs.get("triggers") != inputs.get("triggers")):
            self.steps.append(("replace", name))
            if delete_before_replace:
                self._delete(old)
                outputs = self._create(typ, inputs)
            else:
                outputs = self._create(typ, inputs)
                self._delete(old)
        elif old is None:
            self.steps.append(("create", name))
            outputs = self._create(typ, inputs)
        elif old.inputs != inputs:
            self.steps.append(("update", name))
            command = inputs.get("update") or inputs.get("create")
            outputs = self._run(typ, inputs, command, old.outputs) if command else old.outputs
        else:
            self.steps.append(("same", name))
            outputs = old.outputs
        self.state[name] = Entry(typ, name, urn, inputs, outputs)
        return {**wire, **outputs}

    def _other(self, typ: str, inputs: dict[str, Any]) -> dict[str, Any]:
        outputs = dict(inputs)
        if typ == "pulumi:pulumi:StackReference":
            outputs["outputs"] = self.references[inputs["name"].rsplit("/", 1)[-1]].outputs
        elif typ == "docker:index/remoteImage:RemoteImage":
            outputs["imageId"] = f"sha256:{inputs['name']}"
        elif typ == "docker:index/image:Image":
            outputs["repoDigest"] = f"{inputs['imageName'].split(':')[0]}@sha256:{'ab' * 32}"
        return outputs

    # --- pulumi up / destroy ------------------------------------------------------------------------
    def up(self, replace: tuple[str, ...] = ()) -> dict[str, Any]:
        """`pulumi up [--replace URN]...`: run the program, apply each step as it is registered."""
        from infra.config import LocalConfig, RemoteConfig
        from infra.program import build_local, build_remote

        engine = self
        self.declared = {}

        class Mocks(pulumi.runtime.Mocks):
            monitor: RecordingMonitor

            def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
                # A StackReference is read, not registered: the monitor has not seen it.
                parent, _, dbr, _, _ = self.monitor.requests.get((args.typ, args.name), ("", (), False, False, ""))
                urn = self.monitor.make_urn(parent, args.typ, args.name)
                return f"{args.name}-id", engine.register(args.typ, args.name, urn, args.inputs, dbr, set(replace))

            def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
                return {}

        mocks = Mocks()
        mocks.monitor = RecordingMonitor(mocks)  # type: ignore[arg-type]
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda *_: None)  # a failed step fails the program; its futures need not say so again
        asyncio.set_event_loop(loop)
        pulumi.runtime.set_mocks(mocks, project="dreamseed", stack=self.stack, preview=False, monitor=mocks.monitor)
        pulumi.runtime.set_all_config(self.config, [f"dreamseed:{k}" for k in SECRETS])
        resolved: dict[str, Any] = {}

        @pulumi.runtime.test
        def program() -> pulumi.Output[Any]:
            outputs = build_local(LocalConfig.load()) if self.stack == "local" else build_remote(RemoteConfig.load())

            async def settle(key: str, value: Any) -> None:
                resolved[key] = await pulumi.Output.from_input(value).future()

            return pulumi.Output.from_input(asyncio.gather(*(settle(k, v) for k, v in outputs.items())))

        try:
            program()
        finally:
            loop.close()
        for entry in reversed(list(self.state.values())):
            if entry.name not in self.declared:
                self._delete(entry)
        self.outputs = resolved
        return resolved

    def destroy(self) -> None:
        for entry in reversed(list(self.state.values())):
            self._delete(entry)
        self.outputs = {}

    def entry(self, name: str) -> Entry:
        return self.state[name]


@dataclass
class Rehearsal:
    """The two stacks against one fake cloud, driven by `pulumi` command lines as an operator types them."""

    remote: Engine
    local: Engine

    def pulumi(self, line: str) -> str:
        """Run one `pulumi ...` line (or several joined by &&); `$(pulumi stack output ...)` is
        substituted and `eval` runs what it gives, as a shell would."""
        out = ""
        for part in line.split("&&"):
            out = self._one(self._substitute(part.strip()))
        return out

    def _substitute(self, line: str) -> str:
        while "$(" in line:
            start = line.index("$(")
            end = line.index(")", start)
            line = line[:start] + self._one(line[start + 2:end]) + line[end + 1:]
        words = shlex.split(line)
        if words[:1] == ["eval"]:
            return " ".join(words[1:])
        return line

    def _one(self, line: str) -> str:
        if " && " in line:
            return self.pulumi(line)
        words = shlex.split(line)
        assert words[0] == "pulumi", line
        stack = words[words.index("--stack") + 1]
        engine = self.remote if stack == "remote70b" else self.local
        if words[1] == "up":
            replace = tuple(words[i + 1] for i, w in enumerate(words) if w == "--replace")
            engine.up(replace)
            return ""
        if words[1] == "destroy":
            engine.destroy()
            return ""
        if words[1:3] == ["stack", "output"]:
            name = [w for w in words[3:] if not w.startswith("--") and w != stack][0]
            return str(engine.outputs[name])
        raise AssertionError(f"the rehearsal does not know {line!r}")


def rehearsal(cloud: FakeCloud, remote_config: dict[str, str] | None = None) -> Rehearsal:
    provider_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **cloud.script_env()}
    remote = Engine("remote70b", cloud, {
        **stack_config("remote70b"), "dreamseed:lambdaApiUrl": cloud.url, "dreamseed:region": "us-east-1",
        "dreamseed:instanceType": "gpu_2x_h100_sxm5", "dreamseed:fileSystemName": "", **(remote_config or {})},
        provider_env=provider_env)
    local = Engine("local", cloud, {**stack_config("local"), "dreamseed:dockerSocketGid": "998"},
                   references={"remote70b": remote}, provider_env=provider_env)
    return Rehearsal(remote, local)
