"""Container images, pinned by version (never `latest`), in one place.

vLLM images are not here: each backend names its own in policies/backends.yaml.
"""

POSTGRES_PGVECTOR = "pgvector/pgvector:0.8.1-pg17"
PROMETHEUS = "prom/prometheus:v2.55.1"
GRAFANA = "grafana/grafana:11.3.1"
ALERTMANAGER = "prom/alertmanager:v0.28.1"
# NVIDIA's GPU exporter (DCGM): memory, utilisation, temperature, power of the host's GPUs.
GPU_EXPORTER = "nvcr.io/nvidia/k8s/dcgm-exporter:4.5.3-4.8.2-distroless"
# Hugging Face text-embeddings-inference, CPU build: serves an OpenAI-compatible /v1/embeddings
# without taking GPU memory from the LLMs.
EMBEDDINGS = "ghcr.io/huggingface/text-embeddings-inference:cpu-1.9.4"
# Between the proxy and the Docker socket: allows only the scaler's calls (components/docker_gate.py).
SOCKET_PROXY = "wollomatic/socket-proxy:1.13.1"
# The SSH tunnel to the remote 70B host runs in a small Alpine container.
TUNNEL = "alpine:3.20.3"


def is_pinned(image: str) -> bool:
    """A tag that names a version: present, and not a floating one."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest", "stable", "main", "nightly")
