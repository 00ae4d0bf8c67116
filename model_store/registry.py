"""A registry folder: several bundle versions side by side and an atomically switched current one.

Layout:
    ROOT/versions/<bundle_version>/   a complete, verified bundle (model_store.bundle), never modified
    ROOT/current                      a relative symlink to versions/<bundle_version>

`activate` writes a fresh symlink under a temporary name and `os.replace`s it over `current`, a single
rename(2), which is atomic on POSIX: a reader resolving `current` sees either the old version or the
new one, never a missing or half-written pointer. Versions are copied in under a temporary hidden name,
verified, then renamed into place, so `versions/` only ever holds complete bundles. The symlink is
relative, so the whole registry folder can be moved or mounted elsewhere (e.g. a container volume).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from model_store.bundle import MANIFEST, BundleError, _digest, read_manifest, verify_bundle

VERSIONS_DIR = "versions"
CURRENT = "current"


def _check_version_name(version: str) -> str:
    version = str(version)
    if (not version or version in {".", "..", CURRENT} or version.startswith(".")
            or "/" in version or "\\" in version or "\0" in version):
        raise BundleError(f"{version!r} is not a usable bundle version name")
    return version


def _content_hash(manifest: dict[str, Any]) -> str:
    return str(manifest.get("content_sha256") or _digest(manifest.get("files", {})))


def _item_count(path: Path, manifest: dict[str, Any]) -> int | None:
    items = manifest.get("stats", {}).get("items")
    if isinstance(items, int):
        return items
    try:
        with (path / "items.jsonl").open(encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


class Registry:
    """Bundle versions under `root`; see the module docstring for the layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---------------------------------------------------------------- paths
    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    @property
    def current_link(self) -> Path:
        return self.root / CURRENT

    def path_of(self, version: str) -> Path:
        """Folder of a published version; BundleError when there is no such version."""
        path = self.versions_dir / _check_version_name(version)
        if not (path / MANIFEST).is_file():
            known = ", ".join(v["version"] for v in self.versions()) or "none"
            raise BundleError(f"registry {self.root} has no version {version!r} (published: {known})")
        return path

    # ---------------------------------------------------------------- publish
    def publish(self, bundle_dir: str | Path, activate: bool = False) -> str:
        """Copy a verified bundle in under its manifest's bundle_version; returns that version.

        Publishing a version that is already present is a no-op when its content hash is identical
        and an error otherwise (versions are immutable).
        """
        if bundle_dir is None:
            raise BundleError("publish needs a bundle folder")
        src = Path(bundle_dir)
        if not src.is_dir():
            raise BundleError(f"cannot publish {src}: no such bundle folder")
        problems = verify_bundle(src)  # raises BundleError itself for a missing or unsupported manifest
        if problems:
            raise BundleError(f"refusing to publish {src}, it failed verification:\n  " + "\n  ".join(problems))
        manifest = read_manifest(src)
        version = _check_version_name(manifest.get("bundle_version", ""))
        dest = self.versions_dir / version
        if dest.exists():
            self._check_same(dest, manifest, src)
        else:
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".publish-{version}.", dir=self.versions_dir))
            try:
                staged = tmp / "bundle"
                shutil.copytree(src, staged, symlinks=False)
                problems = verify_bundle(staged)
                if problems:
                    raise BundleError(f"the copy of {src} failed verification (was it changed while "
                                      "being published?):\n  " + "\n  ".join(problems))
                try:
                    os.rename(staged, dest)  # fails if another publisher got there first
                except OSError:
                    if not dest.exists():
                        raise
                    self._check_same(dest, manifest, src)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if activate:
            self.activate(version)
        return version

    def _check_same(self, dest: Path, manifest: dict[str, Any], src: Path) -> None:
        try:
            existing = read_manifest(dest)
        except BundleError as exc:
            raise BundleError(f"registry entry {dest} exists but is not a readable bundle: {exc}") from exc
        if _content_hash(existing) != _content_hash(manifest):
            raise BundleError(f"version {dest.name} is already published with different content; "
                              f"versions are immutable, rebuild {src} to get a new bundle_version")

    # ---------------------------------------------------------------- listing
    def versions(self) -> list[dict[str, Any]]:
        """Every published version, oldest first: version, created_at, items, current, path."""
        if not self.versions_dir.is_dir():
            return []
        current = self.current_version()
        out = []
        for path in self.versions_dir.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue  # publishes in progress or left over by a crash
            entry: dict[str, Any] = {"version": path.name, "created_at": None, "items": None,
                                     "current": path.name == current, "path": str(path)}
            try:
                manifest = read_manifest(path)
            except BundleError as exc:
                entry["error"] = str(exc)
            else:
                entry["created_at"] = manifest.get("created_at")
                entry["items"] = _item_count(path, manifest)
                entry["has_model"] = bool(manifest.get("has_model"))
            out.append(entry)
        out.sort(key=lambda e: (e["created_at"] or "", e["version"]))
        return out

    # ---------------------------------------------------------------- current pointer
    def current_version(self) -> str | None:
        link = self.current_link
        if not link.is_symlink():
            if link.exists():
                raise BundleError(f"{link} exists but is not a symlink; move it away")
            return None
        return Path(os.readlink(link)).name

    def current(self) -> Path | None:
        """Folder of the current version (inside versions/), or None when none was activated."""
        version = self.current_version()
        if version is None:
            return None
        path = self.versions_dir / version
        if not (path / MANIFEST).is_file():
            raise BundleError(f"{self.current_link} points to {version!r}, which is not a published bundle")
        return path

    def activate(self, version: str) -> None:
        """Point `current` at `version` atomically, after checking the bundle's hashes."""
        path = self.path_of(version)
        problems = verify_bundle(path)
        if problems:
            raise BundleError(f"refusing to activate {version}, it failed verification:\n  "
                              + "\n  ".join(problems))
        link = self.current_link
        if link.exists() and not link.is_symlink():
            raise BundleError(f"{link} exists but is not a symlink; move it away")
        tmp = self.root / f".{CURRENT}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        os.symlink(Path(VERSIONS_DIR) / path.name, tmp, target_is_directory=True)
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ---------------------------------------------------------------- removal
    def remove(self, version: str) -> None:
        """Delete a version; the current one is refused (activate another first)."""
        path = self.path_of(version)
        if self.current_version() == path.name:
            raise BundleError(f"{version} is the current version; activate another before removing it")
        # Rename out of sight first so listings never show a half-deleted bundle.
        trash = self.versions_dir / f".remove-{path.name}.{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash)


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle folder itself, or a registry root's current version."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / CURRENT).is_symlink() or (path / VERSIONS_DIR).is_dir():
        current = Registry(path).current()
        if current is None:
            raise BundleError(f"registry {path} has no current version; run gream registry activate")
        return current
    raise BundleError(f"{path} is neither a bundle (no {MANIFEST}) nor a registry (no {CURRENT})")
