"""The base model's bytes, checked before anything loads them.

A hub id is downloaded at `model.revision` into the hub's standard cache through the hub's own client
(huggingface_hub's snapshot_download; the modelscope SDK's), then EVERY file is checked against the hub's own
record of it:

- Hugging Face: LFS files (the weights) against the sha256 in their LFS metadata; small git files against their git
  blob id (sha1 of `blob <size>\\0` + bytes). huggingface_hub checks neither: a mirror or proxy that serves other
  bytes is caught here, or nowhere.
- ModelScope: every file against the `Sha256` of the SDK's file listing (the SDK checks it too while downloading;
  its refusal is reported the same way).

A file that fails is deleted from the cache, so the next run downloads it again, and the run stops (exit 3, naming
the file); nothing was loaded. The checked hashes are kept beside the cache (`<cache>/swiftci-verified/…`): a later
run of a pinned commit (or any run with HF_HUB_OFFLINE=1, e.g. an air-gapped runner after `swiftci fetch`) checks
the cached files against them and never calls the hub. `model.sha256` pins (hub ids and local folders alike) are
checked last: a pinned file whose bytes differ fails before anything loads (exit 2: the config and the model
disagree).

The hub endpoints come from the environment at call time: HF_ENDPOINT (Hugging Face mirrors) and
MODELSCOPE_ENDPOINT (the modelscope SDK's own setting; its older MODELSCOPE_DOMAIN works too).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from swiftci import reports
from swiftci.data import sha256_file
from swiftci.errors import StageError, UsageError

if TYPE_CHECKING:
    from swiftci.config import Config

COMMIT = re.compile(r"^[0-9a-f]{40}$")
VERIFIED = "swiftci-verified"  # folder in each hub's cache: the hashes a download was checked against


@dataclass
class ModelFiles:
    """A base model whose every file was checked: where it lies and each file's sha256."""

    id: str
    source: str  # local | huggingface | modelscope
    path: Path
    files: dict[str, str]  # relative path -> sha256
    revision: str | None = None  # the hub commit (Hugging Face) or revision (ModelScope) the files are from
    hub_calls: bool = True  # False when the files came from the cache without asking the hub
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """For run.json: where the model came from and each file's sha256."""
        out = {"source": self.source, "files": dict(sorted(self.files.items()))}
        if self.source != "local":
            out["revision_resolved"] = self.revision
        return out


def prepare(cfg: Config) -> ModelFiles:
    """The base model, downloaded if needed and checked file by file (memoized on the config)."""
    if cfg._model_files is not None and cfg._model_files.id == cfg.model.id:
        return cfg._model_files
    local = cfg.model_local_path
    if local is not None:
        files = ModelFiles(cfg.model.id, "local", local, hash_folder(local), hub_calls=False)
    elif cfg.model.source == "modelscope":
        files = _modelscope(cfg.model.id, cfg.model.revision)
    else:
        files = _huggingface(cfg.model.id, cfg.model.revision)
    check_pins(cfg, files)
    cfg._model_files = files
    return files


def hash_folder(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def git_blob_id(path: Path) -> str:
    """The id git (and the Hugging Face Hub) gives a small file: sha1 of `blob <size>\\0` + its bytes."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- pins -------------------------------------------------------------------------------------------------------


def pins(cfg: Config) -> dict[str, str]:
    """`model.sha256`: the map itself, or read from its manifest (`sha256sum` lines, or the map in JSON)."""
    pinned = cfg.model.sha256
    if pinned is None or isinstance(pinned, dict):
        return dict(pinned or {})
    path = cfg.resolve(pinned)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *]?(.+)", line.strip())
        if line.strip() and not m:
            raise UsageError(f"{path}:{n}: model.sha256: expected `<sha256>  <file>` (sha256sum's output), "
                             f"got {line.strip()!r}")
        if m:
            out[m.group(2).removeprefix("./")] = m.group(1)
    return out


def check_pins(cfg: Config, files: ModelFiles) -> None:
    problems = []
    for name, want in sorted(pins(cfg).items()):
        got = files.files.get(name)
        if got is None:
            problems.append(f"model.sha256: {name} is pinned but {files.id} has no such file "
                            f"(its files: {', '.join(sorted(files.files))})")
        elif got != want:
            problems.append(f"model.sha256: {name} of {files.id} changed: pinned {want}, found {got}")
    if problems:
        raise UsageError("\n".join(problems), kind="PinMismatch",
                         hint="the model's bytes are not the ones the config pins: pin the model.revision they came "
                              "from, or update the pins after reviewing the new files")


# --- Hugging Face -----------------------------------------------------------------------------------------------


def hf_cache() -> Path:
    """huggingface_hub's cache, from the environment at call time (its own constants are read once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _huggingface(repo_id: str, revision: str | None) -> ModelFiles:
    cache = hf_cache()
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    commit = revision if revision and COMMIT.match(revision) else None
    if commit is None and offline():
        ref = repo_dir / "refs" / (revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else None
    if commit is not None and (offline() or _manifest_path(cache, "huggingface", repo_id, commit).is_file()):
        return _from_cache(cache, "huggingface", repo_id, commit, repo_dir / "snapshots" / commit)
    if offline():
        raise StageError(f"model {repo_id}@{revision or 'main'} is not in the cache ({cache}) and HF_HUB_OFFLINE is "
                         "set; run `swiftci fetch` where the hub is reachable first", kind="NotFetched",
                         hint="run `swiftci fetch -c swiftci.yaml` with network access first (same HF_HOME), then "
                              "copy that cache to the runner")
    from huggingface_hub import HfApi, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
        path = Path(snapshot_download(repo_id, revision=info.sha, cache_dir=str(cache), endpoint=endpoint))
    except Exception as e:  # noqa: BLE001 - the client raises its own, httpx's and OS errors for the same failure
        raise StageError(f"cannot download model {repo_id}@{revision or 'main'} from {endpoint or 'the hub'}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    files = {}
    for sibling in info.siblings or []:
        file = path / sibling.rfilename
        if not file.is_file():
            raise StageError(f"{repo_id}: {sibling.rfilename} is listed by the hub but was not downloaded")
        got = sha256_file(file)
        if sibling.lfs is not None:
            ok, want, what = got == sibling.lfs.sha256, sibling.lfs.sha256, "LFS sha256"
        else:
            blob = git_blob_id(file)
            ok, want, what, got = blob == sibling.blob_id, sibling.blob_id, "git blob id", blob
        if not ok:
            _evict(file)
            raise _mismatch(repo_id, sibling.rfilename, what, want, got)
        files[sibling.rfilename] = sha256_file(file)
    _write_manifest(cache, "huggingface", repo_id, info.sha, files)
    if (revision or "main") != info.sha:  # the cache's own ref, as hf_hub_download keeps it: offline runs resolve it
        reports.write_text(repo_dir / "refs" / (revision or "main"), info.sha)
    return ModelFiles(repo_id, "huggingface", path, files, revision=info.sha)


# --- ModelScope -------------------------------------------------------------------------------------------------


def modelscope_cache() -> Path:
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope" / "hub")


def _modelscope(repo_id: str, revision: str | None) -> ModelFiles:
    cache = modelscope_cache()
    revision = revision or "master"
    manifest = _manifest_path(cache, "modelscope", repo_id, revision)
    if offline() or (manifest.is_file() and not _is_branch(revision)):
        snapshot = _read_manifest(manifest).get("path") if manifest.is_file() else None
        if snapshot is None:
            raise StageError(f"model {repo_id}@{revision} (ModelScope) is not in the cache ({cache}) and "
                             "HF_HUB_OFFLINE is set; run `swiftci fetch` where the hub is reachable first",
                             kind="NotFetched",
                             hint="run `swiftci fetch -c swiftci.yaml` with network access first (same "
                                  "MODELSCOPE_CACHE), then copy that cache to the runner")
        return _from_cache(cache, "modelscope", repo_id, revision, Path(snapshot))
    from modelscope.hub.snapshot_download import snapshot_download
    from modelscope_hub import HubApi

    try:
        listing = {f.path: f.sha256 for f in HubApi().list_repo_files(repo_id, "model", revision=revision)
                   if f.path and not f.is_dir}
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache)))
    except Exception as e:  # noqa: BLE001 - the SDK raises its own classes for network, hash and missing repos
        text = str(e)
        if "Hash mismatch" in text:  # the SDK's own check refused a file; it left nothing of it in the snapshot
            bad = re.findall(r"^\s*-\s*([^:\n]+): .*Hash mismatch", text, re.M) or ["?"]
            raise StageError(f"model {repo_id}@{revision} (ModelScope): {', '.join(bad)}: the downloaded bytes do "
                             f"not match the hub listing's Sha256 ({text.splitlines()[-1].strip()}); the file was "
                             "not loaded", kind="HashMismatch",
                             hint="download again; if it persists, the mirror or a proxy serves other bytes") from None
        raise StageError(f"cannot download model {repo_id}@{revision} from ModelScope "
                         f"({os.environ.get('MODELSCOPE_ENDPOINT') or 'modelscope.cn'}): {type(e).__name__}: "
                         f"{text.splitlines()[0] if text else ''}") from None
    files = {}
    for name, want in sorted(listing.items()):
        file = path / name
        if not file.is_file():
            raise StageError(f"{repo_id}: {name} is listed by ModelScope but was not downloaded")
        got = sha256_file(file)
        if want and got != want:
            _evict(file)
            raise _mismatch(repo_id, name, "Sha256", want, got)
        files[name] = got
    _write_manifest(cache, "modelscope", repo_id, revision, files, path)
    return ModelFiles(repo_id, "modelscope", path, files, revision=revision)


def _is_branch(revision: str) -> bool:
    """ModelScope's moving revisions: its default branch (tags and commits do not move)."""
    return revision in ("master", "main")


# --- the cache of checked hashes ----------------------------------------------------------------------------------


def _manifest_path(cache: Path, source: str, repo_id: str, revision: str) -> Path:
    return cache / VERIFIED / source / repo_id.replace("/", "--") / f"{revision}.json"


def _write_manifest(cache: Path, source: str, repo_id: str, revision: str, files: dict[str, str],
                    path: Path | None = None) -> None:
    data = {"id": repo_id, "source": source, "revision": revision, "files": files}
    if path is not None:
        data["path"] = str(path)
    reports.write_json(_manifest_path(cache, source, repo_id, revision), data)


def _read_manifest(path: Path) -> dict:
    try:
        return reports.read_json(path)
    except (OSError, ValueError):
        return {}


def _from_cache(cache: Path, source: str, repo_id: str, revision: str, snapshot: Path) -> ModelFiles:
    """A model fetched and checked before: its cached files checked against the hashes recorded then."""
    manifest = _read_manifest(_manifest_path(cache, source, repo_id, revision))
    if not manifest.get("files") or not snapshot.is_dir():
        raise StageError(f"model {repo_id}@{revision} is not in the checked cache ({cache}); run `swiftci fetch` "
                         "where the hub is reachable first", kind="NotFetched",
                         hint="run `swiftci fetch -c swiftci.yaml` with network access first (same cache folder)")
    files = {}
    for name, want in sorted(manifest["files"].items()):
        file = snapshot / name
        if not file.is_file():
            raise StageError(f"model {repo_id}@{revision}: {name} is missing from the cache ({snapshot})",
                             kind="NotFetched", hint="run `swiftci fetch` again")
        got = sha256_file(file)
        if got != want:
            _evict(file)
            raise _mismatch(repo_id, name, "sha256 checked at download", want, got)
        files[name] = got
    return ModelFiles(repo_id, source, snapshot, files, revision=revision, hub_calls=False)


def _evict(file: Path) -> None:
    """Delete a bad file from the cache: the blob a snapshot's link points at, and the link."""
    target = file.resolve()
    target.unlink(missing_ok=True)
    if file.is_symlink() or file.exists():
        file.unlink(missing_ok=True)


def _mismatch(repo_id: str, name: str, what: str, want: str, got: str) -> StageError:
    return StageError(f"model {repo_id}: {name} does not match the hub's {what}: expected {want}, got {got}; it was "
                      "deleted from the cache and nothing was loaded", kind="HashMismatch",
                      hint="download again; if it persists, the mirror, a proxy or the cache serves other bytes than "
                           "the hub recorded")
