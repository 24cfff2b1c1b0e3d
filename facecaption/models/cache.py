"""The model cache: where real weights live, how they get there, and how they are checked.

Layout under `{models_dir}`:

    insightface/{pack}/*.onnx        detector packs (`facecaption models pull detector`)
    attributes/{name}.onnx + .json   ONNX attribute classifiers with their sidecar
    attributes/{name}/               transformers attribute classifiers (pulled from the Hub)
    llm/{name}/                      transformers chat models (pulled from the Hub)
    manifest.json                    what was pulled from where, with every file's sha256

`facecaption models pull detector` downloads an insightface model pack (a zip of ONNX files)
into `{models_dir}/insightface/{pack}/`, streaming it to a temporary file while hashing it.
The archive's sha256 is checked against a pin (the `--sha256` option, or the registry below
when it has one) before anything is extracted; with no pin the hash is recorded on first
download and every later pull must match it (trust on first use, said out loud). Extraction
goes to a temporary folder renamed into place, so a killed pull leaves no half pack.
Pulls from the Hugging Face Hub are `facecaption.models.hub`. `manifest.json` records, per
entry, where it came from (url and archive sha256, or Hub repo and resolved commit) and each
file's sha256; `verify` refuses an installed entry whose files changed since.

Nothing here runs at import, and nothing downloads unless `pull` is called.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from facecaption.core.errors import PermanentError
from facecaption.core.store import sha256_file
from facecaption.models.errors import ModelNotFoundError

_CHUNK = 1 << 20
RELEASES = "https://github.com/deepinsight/insightface/releases/download/v0.7"


@dataclass(frozen=True)
class ModelPack:
    name: str
    url: str
    detector_file: str  # the RetinaFace/SCRFD model inside the pack
    sha256: str | None = None  # the archive's, when pinned


# insightface's public packs. Their archive checksums are not published upstream; pin the one
# you downloaded with `--sha256` (or here) to make pulls reproducible.
PACKS = {
    pack.name: pack
    for pack in (
        ModelPack("buffalo_l", f"{RELEASES}/buffalo_l.zip", "det_10g.onnx"),
        ModelPack("buffalo_m", f"{RELEASES}/buffalo_m.zip", "det_2.5g.onnx"),
        ModelPack("buffalo_s", f"{RELEASES}/buffalo_s.zip", "det_500m.onnx"),
        ModelPack("antelopev2", f"{RELEASES}/antelopev2.zip", "scrfd_10g_bnkps.onnx"),
    )
}


class ModelChecksumError(PermanentError, ValueError):
    """A download's sha256 differs from its pin or from the one recorded before."""


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def manifest(self) -> dict[str, dict]:
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text())

    def record(self, key: str, entry: dict) -> None:
        """Set one manifest entry; the file is replaced whole (never half written)."""
        entries = {**self.manifest(), key: entry}
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.manifest_path.with_name(f".manifest-{os.getpid()}.json")
        partial.write_text(json.dumps(entries, indent=2, sort_keys=True))
        partial.replace(self.manifest_path)

    def llm_dir(self, name: str) -> Path:
        """Where chat model `name` lives: `{root}/llm/{name}/` (Hugging Face format)."""
        return self.root / "llm" / name

    def attribute_folder(self, name: str) -> Path:
        """Where transformers attribute model `name` lives: `{root}/attributes/{name}/`."""
        return self.root / "attributes" / name

    def verify(self, key: str, folder: Path) -> None:
        """Refuse (ModelChecksumError) an installed entry whose files differ from what its
        pull recorded; entries never pulled (a folder copied in by hand) pass as they are."""
        from facecaption.models.hub import pull_command
        from facecaption.models.identity import model_file_sha256

        entry = self.manifest().get(key)
        if entry is None or entry.get("source") != "huggingface":
            return
        for relative, recorded in sorted(entry["files"].items()):
            path = folder / relative
            actual = model_file_sha256(path) if path.is_file() else "missing"
            if actual != recorded:
                raise ModelChecksumError(
                    f"{path} changed since it was pulled from {entry['repo']}@{entry['commit']}"
                    f" (sha256 {actual}, recorded {recorded}): pull it again with"
                    f" `{pull_command(key, entry['repo'], entry['commit'])} --replace`"
                )

    def pack_dir(self, pack: str) -> Path:
        return self.root / "insightface" / pack

    def attribute_model(self, name: str) -> Path:
        """Where attribute model `name` lives: `{root}/attributes/{name}.onnx` + `.json`."""
        return self.root / "attributes" / f"{name}.onnx"

    def detector_file(self, pack_name: str) -> Path:
        """The detector ONNX of an installed pack, or a ModelNotFoundError saying what to do."""
        pack = PACKS.get(pack_name)
        folder = self.pack_dir(pack_name)
        candidates = [folder / pack.detector_file] if pack else sorted(folder.glob("*.onnx"))
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise ModelNotFoundError(
                f"no detector of model pack {pack_name!r} in {folder}: run"
                f" `facecaption models pull detector --pack {pack_name}` on a machine with"
                " internet access, or set FACECAPTION_DETECT__MODEL_PATH to an .onnx file, or"
                " use the packaged offline RetinaFace with FACECAPTION_DETECT__BACKEND=retinaface"
            )
        return found

    def pull(self, pack_name: str, url: str | None = None, sha256: str | None = None) -> Path:
        """Download, verify and install a detector pack; return its folder. Idempotent."""
        pack = PACKS.get(pack_name)
        url = url or (pack.url if pack else None)
        if url is None:
            raise ValueError(f"unknown pack {pack_name!r}: give --url (known: {', '.join(PACKS)})")
        pin = sha256 or (pack.sha256 if pack else None)
        with self.scratch() as scratch:
            archive, digest = self._verified_download(pack_name, url, pin, scratch)
            staged = scratch / "staged"
            with zipfile.ZipFile(archive) as bundle:
                _extract_flat(bundle, staged)
            target = self.pack_dir(pack_name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
        self._record(pack_name, url, digest, bool(pin), target.iterdir())
        return target

    def pull_attribute_model(
        self, name: str, url: str, sidecar_url: str, sha256: str | None = None
    ) -> Path:
        """Download an attribute .onnx and its sidecar .json, verify, install under `name`."""
        from facecaption.attribute.backends.onnx import AttributeModelSpec

        key = f"attributes/{name}"
        with self.scratch() as scratch:
            model, digest = self._verified_download(key, url, sha256, scratch)
            sidecar = scratch / "model.json"
            _download(sidecar_url, sidecar)
            AttributeModelSpec.load(sidecar)  # refuse a sidecar we could not use
            target = self.attribute_model(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            # the sidecar first: an .onnx in place always has its sidecar
            sidecar.replace(target.with_suffix(".json"))
            model.replace(target)
        self._record(key, url, digest, bool(sha256), [target, target.with_suffix(".json")])
        return target

    def scratch(self) -> tempfile.TemporaryDirectory:
        """A temporary folder inside the cache (`with cache.scratch() as folder:`), removed
        on exit: downloads land there and are renamed into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        return _ScratchDir(self.root)

    def _verified_download(
        self, key: str, url: str, pin: str | None, scratch: Path
    ) -> tuple[Path, str]:
        """Download to scratch; check against the pin, else against what was recorded."""
        expected = (pin or self.manifest().get(key, {}).get("archive_sha256") or "").lower()
        path = scratch / "download"
        digest = _download(url, path)
        if expected and digest != expected:
            raise ModelChecksumError(
                f"{url}: sha256 {digest}, expected {expected}; nothing was installed"
            )
        return path, digest

    def _record(self, key: str, url: str, digest: str, pinned: bool, files) -> None:  # noqa: ANN001
        self.record(
            key,
            {
                "url": url,
                "archive_sha256": digest,
                "pinned": pinned,
                "files": {path.name: sha256_file(path) for path in sorted(files)},
            },
        )


class _ScratchDir(tempfile.TemporaryDirectory):
    """A temporary folder inside the cache (same filesystem: installs are renames)."""

    def __init__(self, root: Path) -> None:
        super().__init__(dir=root, prefix=".pull-")

    def __enter__(self) -> Path:  # type: ignore[override]
        return Path(self.name)


def _download(url: str, path: Path) -> str:
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "facecaption-models"})
    with urllib.request.urlopen(request, timeout=60) as response, open(path, "wb") as out:
        while chunk := response.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _extract_flat(bundle: zipfile.ZipFile, folder: Path) -> None:
    """Extract the .onnx members into one folder (packs sometimes nest a folder level);
    member names never choose where files go."""
    folder.mkdir(parents=True)
    for member in bundle.infolist():
        name = Path(member.filename).name
        if member.is_dir() or not name.endswith(".onnx"):
            continue
        with bundle.open(member) as source, open(folder / name, "wb") as target:
            shutil.copyfileobj(source, target, _CHUNK)
