import json
from pathlib import Path
from typing import Any

import pytest

from hull.errors import BundleError
from hull.oci import bundle


def make(tmp_path: Path, spec: Any, rootfs: bool = True) -> Path:
    if rootfs:
        (tmp_path / "rootfs").mkdir()
    (tmp_path / "config.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return tmp_path


def good() -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": True},
            "process": {"args": ["sh"], "env": ["A=1"], "cwd": "/", "user": {"uid": 0}}}


def test_good_bundle(tmp_path: Path) -> None:
    b = bundle.load(make(tmp_path, good()))
    assert b.rootfs == tmp_path / "rootfs" and b.readonly_rootfs and not b.terminal


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("process"), "process is missing"),
    (lambda s: s.update(ociVersion="2.0.0"), "unsupported ociVersion 2.0.0"),
    (lambda s: s.pop("ociVersion"), "ociVersion is missing"),
    (lambda s: s["process"].update(args=[]), "args must be a non-empty list"),
    (lambda s: s["process"].update(env=["NOEQUALS"]), "env must be a list of KEY=VALUE"),
    (lambda s: s["process"].update(cwd="relative"), "cwd must be an absolute path"),
    (lambda s: s["process"]["user"].update(uid=-1), "user.uid must be an integer"),
    (lambda s: s.pop("root"), "root.path is missing"),
    (lambda s: s.update(annotations={"a": 1}), "annotations must map strings"),
])
def test_bad_specs(tmp_path: Path, mutate: Any, message: str) -> None:
    spec = good()
    mutate(spec)
    with pytest.raises(BundleError, match=message):
        bundle.load(make(tmp_path, spec))


def test_not_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not valid JSON"):
        bundle.load(make(tmp_path, "{nope"))


def test_missing_rootfs(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"rootfs .* is not a directory"):
        bundle.load(make(tmp_path, good(), rootfs=False))


def test_missing_bundle_and_config(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not a directory"):
        bundle.load(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"has no config\.json"):
        bundle.load(tmp_path)
