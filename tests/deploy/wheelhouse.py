"""Wheels of the project's runtime dependencies (and pip), repacked from this interpreter's installed
distributions, so deploy.sh can be tested on hosts without a package index and without downloading.

A wheel is a zip of the files a distribution installed under site-packages plus its .dist-info; files
installed elsewhere (console scripts in bin/) are left out: pip regenerates them from entry_points.txt.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import re
import zipfile
from pathlib import Path

from packaging.requirements import Requirement


def _closure(roots: list[str]) -> list[md.Distribution]:
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        dist = md.distribution(name)
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def repack(dist: md.Distribution, outdir: Path) -> Path:
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)]
    info_dir = next(str(f).split("/")[0] for f in files if str(f).split("/")[0].endswith(".dist-info"))
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    wheel = outdir / f"{name}-{dist.version}-{tags[0] if tags else 'py3-none-any'}.whl"
    record: list[str] = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            arcname = str(f)
            if arcname.startswith(info_dir) and arcname.split("/")[-1] in (
                    "RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            data = Path(str(f.locate())).read_bytes()
            zf.writestr(arcname, data)
            record.append(_record_line(arcname, data))
        record.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    return wheel


def build_wheelhouse(outdir: Path) -> list[Path]:
    """Wheels of raftpbx's runtime dependencies and of pip (not of raftpbx itself)."""
    outdir.mkdir(parents=True, exist_ok=True)
    deps = [d for d in _closure(["raftpbx", "pip"]) if d.metadata["Name"].lower() != "raftpbx"]
    return [repack(d, outdir) for d in deps]
