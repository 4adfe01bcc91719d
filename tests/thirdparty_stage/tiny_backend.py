"""A minimal PEP 517 build backend for this one-module distribution (wheel only).

It reads the few fields it needs from pyproject.toml and writes a pure-Python wheel with
the standard library alone.
"""

from __future__ import annotations

import base64
import hashlib
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE = "llmrelay_header_stage.py"


def _project() -> dict:
    with (HERE / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def _dist_info(project: dict) -> tuple[str, dict[str, str]]:
    name = project["name"].replace("-", "_")
    info = f"{name}-{project['version']}.dist-info"
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {project['name']}\n"
        f"Version: {project['version']}\n"
        f"Summary: {project.get('description', '')}\n"
        f"Requires-Python: {project.get('requires-python', '>=3')}\n"
    )
    lines = []
    for group, entries in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines.extend(f"{k} = {v}" for k, v in entries.items())
        lines.append("")
    wheel = "Wheel-Version: 1.0\nGenerator: tiny_backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    return info, {"METADATA": metadata, "WHEEL": wheel, "entry_points.txt": "\n".join(lines)}


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info, files = _dist_info(_project())
    target = Path(metadata_directory) / info
    target.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (target / name).write_text(text)
    return info


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    project = _project()
    info, files = _dist_info(project)
    name = project["name"].replace("-", "_")
    wheel_name = f"{name}-{project['version']}-py3-none-any.whl"
    contents = {MODULE: (HERE / MODULE).read_bytes()}
    contents.update({f"{info}/{k}": v.encode() for k, v in files.items()})
    record = [_record_line(path, data) for path, data in contents.items()] + [f"{info}/RECORD,,"]
    with zipfile.ZipFile(Path(wheel_directory) / wheel_name, "w", zipfile.ZIP_DEFLATED) as whl:
        for path, data in contents.items():
            whl.writestr(path, data)
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel_name
