"""Pulls from the Hugging Face Hub into the model cache: chat models for captions (`facecaption
models pull llm REPO`) and transformers attribute classifiers (`facecaption models pull
attributes --hf REPO`).

A pull resolves the revision (a branch, tag or commit; default `main`) to its commit, downloads
that commit's files with `huggingface_hub` into a scratch folder inside the cache (the client
reads HF_ENDPOINT and HF_TOKEN as usual), checks every file against the hashes the Hub lists
for that commit (sha256 for LFS files, the git blob sha1 for the others: the client itself only
checks sizes), checks that the folder is a model its stage can load, and renames it into place
(`{models_dir}/llm/{name}/` or `{models_dir}/attributes/{name}/`; the name defaults to the
repo's). The cache manifest records repo, revision, commit and each file's sha256.

Changed bytes are refused. A later pull of the same commit must bring the bytes recorded the
first time; putting another repo or commit under a name that holds one needs `replace` (the
outputs made with the old one then become stale: their fingerprints name the model); and
loading an installed model checks its files against the manifest (`ModelCache.verify`).

Weights are read from safetensors only: the other weight formats a repo may carry (.bin, .pt,
ONNX, GGUF, ...) are not downloaded.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from facecaption.core.errors import PermanentError
from facecaption.models.cache import ModelCache, ModelChecksumError

HUB_KINDS = ("llm", "attributes")
SKIPPED_FILES = [
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf",
    "*.tflite", "*.ot", "*.mlmodel", "onnx/*", "openvino/*", "coreml/*", "original/*",
    ".gitattributes",
]  # fmt: skip
_CHUNK = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubPullError(PermanentError, RuntimeError):
    """The Hub refused the pull (no such repo or revision, gated), or it holds no model the
    stage can load. Nothing was installed."""


class HubUnreachableError(RuntimeError):
    """The Hub did not answer; trying again later may work. Nothing was installed."""


class ModelCacheConflict(PermanentError, ValueError):
    """The name already holds another repo or commit, and replacing it was not asked for."""


@dataclass(frozen=True)
class HubModel:
    key: str  # the manifest entry: "llm/{name}" or "attributes/{name}"
    folder: Path
    repo: str
    commit: str
    files: dict[str, str]  # relative path -> sha256


def pull_command(key: str, repo: str, revision: str | None = None) -> str:
    """The command that (re)installs manifest entry `key` from `repo`."""
    kind, name = key.split("/", 1)
    command = f"facecaption models pull {kind} {'' if kind == 'llm' else '--hf '}{repo}"
    if name != repo.rsplit("/", 1)[-1]:
        command += f" --name {name}"
    return command + (f" --revision {revision}" if revision else "")


def pull_hub_model(
    cache: ModelCache,
    kind: str,
    repo: str,
    *,
    revision: str | None = None,
    name: str | None = None,
    replace: bool = False,
    endpoint: str | None = None,
) -> HubModel:
    """Download, verify and install one Hub model; see the module docstring."""
    if kind not in HUB_KINDS:
        raise ValueError(f"kind must be one of {HUB_KINDS}, not {kind!r}")
    name = name or repo.rstrip("/").rsplit("/", 1)[-1]
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a usable model name (letters, digits, . _ -)")
    key = f"{kind}/{name}"
    target = cache.llm_dir(name) if kind == "llm" else cache.attribute_folder(name)
    from huggingface_hub import HfApi, snapshot_download

    with _hub_errors(repo, revision, endpoint):
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    commit = info.sha
    recorded = cache.manifest().get(key)
    if not replace:
        _refuse_replacing(key, target, recorded, repo, commit)
    listed = {
        sibling.rfilename: ("sha256", sibling.lfs.sha256)
        if sibling.lfs
        else ("sha1", sibling.blob_id)
        for sibling in info.siblings or []
    }
    with cache.scratch() as scratch:
        staged = scratch / "model"
        with _hub_errors(repo, revision, endpoint):
            snapshot_download(
                repo,
                revision=commit,
                local_dir=staged,
                ignore_patterns=SKIPPED_FILES,
                endpoint=endpoint,
            )
        shutil.rmtree(staged / ".cache", ignore_errors=True)  # the client's own bookkeeping
        files = _checked_files(staged, listed, f"{repo}@{commit}")
        same_commit = recorded and (recorded.get("repo"), recorded.get("commit")) == (repo, commit)
        if same_commit and recorded.get("files") != files and not replace:
            raise ModelChecksumError(
                f"{repo}@{commit} now serves other bytes than when {key} was pulled from it;"
                " nothing was installed"
            )
        _check_loadable(kind, staged, f"{repo}@{commit}")
        if target.exists():
            target.rename(scratch / "replaced")  # removed with the scratch folder
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(target)
    cache.record(
        key,
        {
            "source": "huggingface",
            "repo": repo,
            "revision": revision or "main",
            "commit": commit,
            "files": files,
        },
    )
    return HubModel(key, target, repo, commit, files)


def _refuse_replacing(
    key: str, target: Path, recorded: dict | None, repo: str, commit: str
) -> None:
    if recorded is None:
        if target.exists():
            raise ModelCacheConflict(
                f"{target} exists but was not pulled by facecaption: pass --replace to"
                " overwrite it, or --name to install under another name"
            )
        return
    was = f"{recorded.get('repo', recorded.get('url'))}@{recorded.get('commit', '?')}"
    if (recorded.get("repo"), recorded.get("commit")) != (repo, commit):
        raise ModelCacheConflict(
            f"{key} holds {was}; this pull would put {repo}@{commit} there. Pass --replace to"
            " install it (outputs made with the old model become stale), or --name to keep both"
        )


def _checked_files(folder: Path, listed: dict[str, tuple[str, str]], where: str) -> dict[str, str]:
    """Every downloaded file's sha256, after checking it against the Hub's listing."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        sha256, git_sha1 = hashlib.sha256(), hashlib.sha1()
        git_sha1.update(b"blob %d\0" % path.stat().st_size)
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                sha256.update(chunk)
                git_sha1.update(chunk)
        actual = {"sha256": sha256.hexdigest(), "sha1": git_sha1.hexdigest()}
        if relative not in listed:
            raise ModelChecksumError(f"{where}: the Hub does not list {relative}")
        algorithm, expected = listed[relative]
        if actual[algorithm] != expected:
            raise ModelChecksumError(
                f"{where}: {relative} arrived with {algorithm} {actual[algorithm]}, the Hub lists"
                f" {expected}; nothing was installed"
            )
        files[relative] = actual["sha256"]
    return files


def _check_loadable(kind: str, folder: Path, where: str) -> None:
    """Refuse a download its stage could not load, before it is installed."""
    from facecaption.models.locate import transformers_folder_problem

    if kind == "attributes":
        from facecaption.attribute.backends.transformers_classifier import read_celeba_labels

        read_celeba_labels(folder)  # first: "not a CelebA-40 classifier" says the most
    problem = transformers_folder_problem(folder, kind)
    if problem:
        raise HubPullError(f"{where}: {problem.removeprefix(str(folder)).lstrip('/ ')}")


def transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client errors huggingface_hub lets through (connection refused, timeouts):
    httpx's, and httpx2's where this huggingface_hub speaks through httpx2."""
    import httpx

    errors: tuple[type[Exception], ...] = (httpx.HTTPError,)
    try:
        import httpx2
    except ImportError:
        return errors
    return (*errors, httpx2.HTTPError)


@contextmanager
def _hub_errors(repo: str, revision: str | None, endpoint: str | None) -> Iterator[None]:
    """The client's errors as ours, with what to do in the message."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = endpoint or constants.ENDPOINT
    try:
        yield
    except GatedRepoError:
        raise HubPullError(
            f"{repo} is gated: accept its terms on its page at {hub}/{repo}, then log in"
            " (`hf auth login`) or set HF_TOKEN, and pull again"
        ) from None
    except RepositoryNotFoundError:
        raise HubPullError(
            f"no model repo {repo!r} at {hub} (a private one needs `hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise HubPullError(
            f"{repo} has no revision {revision!r} (give a branch, tag or commit)"
        ) from None
    except (HfHubHTTPError, LocalEntryNotFoundError, *transport_errors(), OSError) as error:
        raise HubUnreachableError(
            f"could not pull {repo} from {hub}: {type(error).__name__}: {error}"
        ) from None
