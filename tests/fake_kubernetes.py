"""A fake Kubernetes API server for the calls the proxy's kubernetes actuator makes, answering as the
real one does (the answers below follow the Kubernetes API reference and API conventions,
https://kubernetes.io/docs/reference/using-api/api-concepts/ and
https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md):

- every failure is a `Status` object (kind Status, apiVersion v1, status Failure, message, reason, code);
- no or a wrong bearer token: 401 Unauthorized; RBAC says no: 403 Forbidden, with the message the
  authorizer writes (`deployments.apps "NAME" is forbidden: User "system:serviceaccount:NS:SA"
  cannot VERB resource "deployments/scale" in API group "apps" in the namespace "NS"`), before the
  object's existence is looked at; an allowed call on a missing Deployment: 404 NotFound;
- GET .../deployments/NAME/scale: an autoscaling/v1 `Scale` with metadata.resourceVersion;
- PATCH with `application/merge-patch+json`: a resourceVersion in the patch that is not the
  object's current one gives 409 Conflict ("the object has been modified; please apply your
  changes to the latest version and try again"); other patch types than the three the API server
  accepts give 415.

`role` is the RBAC Role's rules as (verb, resource, resourceName) triples; `calls` records what was
asked, to check the Role the stack generates against what the actuator really sends.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([a-z0-9-]+)/deployments/([a-z0-9-]+)/scale$")
PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml")


@dataclass
class FakeKubernetes:
    token: str
    namespace: str = "dreamseed"
    service_account: str = "dreamseed-proxy"
    deployments: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {replicas, version}
    role: set[tuple[str, str, str]] = field(default_factory=set)
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (verb, resource, name)
    interfere: int = 0  # PATCHes that find the object changed by someone else first

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def replicas(self, name: str) -> int:
        with self._lock:
            return self.deployments[name]["replicas"]

    def _scale(self, name: str) -> dict[str, Any]:
        deployment = self.deployments[name]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": self.namespace, "uid": f"uid-{name}",
                             "resourceVersion": str(deployment["version"]),
                             "creationTimestamp": "2026-12-07T00:00:00Z"},
                "spec": {"replicas": deployment["replicas"]},
                "status": {"replicas": deployment["replicas"], "selector": f"app.kubernetes.io/name={name}"}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str, name: str = "") -> None:
                details = {"name": name, "group": "apps", "kind": "deployments"} if name else {}
                self._send(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": message, "reason": reason, "details": details, "code": code})

            def _route(self, verb: str) -> tuple[str, str] | None:
                if self.headers.get("authorization") != f"Bearer {fake.token}":
                    self._status(401, "Unauthorized", "Unauthorized")
                    return None
                match = SCALE_PATH.match(self.path.split("?")[0])
                if match is None:
                    self._status(404, "NotFound", "the server could not find the requested resource")
                    return None
                namespace, name = match[1], match[2]
                fake.calls.append((verb, "deployments/scale", name))
                if namespace != fake.namespace or (verb, "deployments/scale", name) not in fake.role:
                    self._status(403, "Forbidden", (
                        f'deployments.apps "{name}" is forbidden: User "system:serviceaccount:{fake.namespace}:'
                        f'{fake.service_account}" cannot {verb} resource "deployments/scale" in API group "apps" '
                        f'in the namespace "{namespace}"'), name)
                    return None
                if name not in fake.deployments:
                    self._status(404, "NotFound", f'deployments.apps "{name}" not found', name)
                    return None
                return namespace, name

            def do_GET(self) -> None:
                found = self._route("get")
                if found is not None:
                    with fake._lock:
                        self._send(200, fake._scale(found[1]))

            def do_PATCH(self) -> None:
                found = self._route("patch")
                if found is None:
                    return
                name = found[1]
                kind = (self.headers.get("content-type") or "").split(";")[0].strip()
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if kind not in PATCH_TYPES:
                    self._status(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                 "accepted media types include: " + ", ".join(PATCH_TYPES))
                    return
                patch = json.loads(body or b"{}")
                with fake._lock:
                    deployment = fake.deployments[name]
                    if fake.interfere > 0:  # someone else's write lands first
                        fake.interfere -= 1
                        deployment["version"] += 1
                    wanted = (patch.get("metadata") or {}).get("resourceVersion")
                    if wanted is not None and wanted != str(deployment["version"]):
                        self._status(409, "Conflict", f'Operation cannot be fulfilled on deployments.apps "{name}": '
                                     "the object has been modified; please apply your changes to the latest "
                                     "version and try again", name)
                        return
                    replicas = (patch.get("spec") or {}).get("replicas")
                    if isinstance(replicas, int):
                        deployment["replicas"] = replicas
                        deployment["version"] += 1
                    self._send(200, fake._scale(name))

        return Handler
