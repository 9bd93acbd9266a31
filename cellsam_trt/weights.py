"""The official CellSAM weights: names, the shared cache, download and offline install.

The official package (``cellSAM.get_model``) keeps its weights in
``~/.deepcell/models/cellsam_v<version>/<name>.pt``, extracted from the archive
``cellsam-models_v<version>.tar.gz`` that users.deepcell.org hands out to holders of an
access token. This module reads and fills the same folder, so both packages share one copy:

* ``model_path(name, version, root)``: where a named model lives (``root`` defaults to
  ``~/.deepcell/models``); ``find_model`` also checks that it is there (``ModelNotFound``,
  whose one-line message says both ways to get it);
* ``fetch_model(name, version, token, endpoint)``: the download protocol (POST the asset key
  with the token, GET the URL it answers), md5 verified before the archive is used;
* ``install_archive(path, version)``: an archive copied by hand (offline machines).

Written files are never half there: the download goes to a temporary name in the target
folder and is renamed once its md5 matches; the archive is extracted into a temporary folder
beside the target and the version folder renamed into place. Members that would land outside
the target (absolute paths, ``..``) and links of any kind are refused. Nothing here reads the
environment: the token, the endpoint and the cache root are arguments (the command line reads
``DEEPCELL_ACCESS_TOKEN`` and ``CELLSAM_TRT_MODELS_URL``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DEFAULT_ENDPOINT = "https://users.deepcell.org/api/getData/"
TOKEN_SITE = "https://users.deepcell.org"
MODEL_NAMES = ("cellsam_general", "cellsam_extra")
LATEST = "1.2"


@dataclass(frozen=True)
class Release:
    """One published weights archive: version, asset key on the server, md5 of the archive
    (hex), and the model names it holds (``<folder>/<name>.pt``)."""

    version: str
    asset_key: str
    md5: str
    models: tuple[str, ...] = MODEL_NAMES

    @property
    def archive_name(self) -> str:
        return self.asset_key.rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        return f"cellsam_v{self.version}"


# the official registry (cellSAM/_auth.py ``_model_versions`` at 35bc6e0); 1.0 / 1.1 were never
# published as models
RELEASES = {"1.2": Release("1.2", "models/cellsam-models_v1.2.tar.gz", "f41e6899c49fc8ce12f77a8d25594604")}


class ModelNotFound(LookupError):
    """A named model that is not installed, or a name / version that does not exist; the
    message is one line (for a missing model: both ways to get it)."""


class FetchError(RuntimeError):
    """A download or an archive that failed (server answer, network, md5, unsafe member); the
    message is one line, and nothing half-written is left behind."""


def default_root(home: str | os.PathLike | None = None) -> Path:
    """The official cache of weights: ``<home>/.deepcell/models`` (home: the user's)."""
    return Path(home if home is not None else Path.home()) / ".deepcell" / "models"


def is_model_name(model) -> bool:
    """Whether ``model`` is a model name (a str equal to one of ``MODEL_NAMES``); a Path never is."""
    return isinstance(model, str) and model in MODEL_NAMES


def release(version: str | None = None) -> Release:
    """The release of ``version`` (None: the latest), or ModelNotFound listing the known ones."""
    version = LATEST if version is None else str(version)
    if version not in RELEASES:
        raise ModelNotFound(f"model version {version} is not known; known versions: {', '.join(RELEASES)}")
    return RELEASES[version]


def _release(version: str | None, rel: Release | None) -> Release:
    return rel if rel is not None else release(version)


def model_path(
    name: str = "cellsam_general",
    version: str | None = None,
    root: str | os.PathLike | None = None,
    *,
    rel: Release | None = None,
) -> Path:
    """``<root>/cellsam_v<version>/<name>.pt`` (whether or not it exists); unknown names and
    versions raise ModelNotFound."""
    r = _release(version, rel)
    if name not in r.models:
        raise ModelNotFound(f"no model named {name!r} in version {r.version}; names: {', '.join(r.models)}")
    return Path(root if root is not None else default_root()) / r.folder / f"{name}.pt"


def missing_message(
    name: str = "cellsam_general",
    version: str | None = None,
    root: str | os.PathLike | None = None,
    *,
    rel: Release | None = None,
) -> str:
    """One line: the model is not installed, and the two ways to install it."""
    r = _release(version, rel)
    path = model_path(name, r.version, root, rel=r)
    return (
        f"model {name} (v{r.version}) is not installed ({path} not found); get it with a DeepCell access "
        f"token ({TOKEN_SITE}): `DEEPCELL_ACCESS_TOKEN=<token> cellsam-trt fetch {name} --version {r.version}`, "
        f"or on a machine without internet access copy {r.archive_name} (md5 {r.md5}) there by hand and run "
        f"`cellsam-trt fetch --archive {r.archive_name} --version {r.version}`"
    )


def find_model(
    name: str = "cellsam_general",
    version: str | None = None,
    root: str | os.PathLike | None = None,
    *,
    rel: Release | None = None,
) -> Path:
    """The installed checkpoint of a named model, or ModelNotFound with ``missing_message``."""
    path = model_path(name, version, root, rel=rel)
    if not path.is_file():
        raise ModelNotFound(missing_message(name, version, root, rel=rel))
    return path


def md5_file(path: str | os.PathLike) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ download


def _parse_size(text) -> int | None:
    """The server's size string ("1.2 GB", "512 KB", "30 B") in bytes, or None."""
    units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    try:
        value, unit = str(text).split()
        return int(float(value) * units[unit.upper()])
    except (ValueError, KeyError):
        return None


def _answer_text(answer, body: bytes) -> str:
    if isinstance(answer, dict):
        return str(answer.get("error") or answer.get("detail") or answer)
    return body[:200].decode("utf-8", "replace").strip() or "empty answer"


def request_download(
    asset_key: str, token: str, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 60.0
) -> tuple[str, int | None]:
    """POST ``s3_key=<asset_key>`` with header ``X-Api-Key: <token>`` -> (download URL, size in
    bytes from the answer's "size" string, or None). FetchError for 404 (unknown asset), 401 /
    403 (token refused), any other status, an unreachable server or an answer without a URL."""
    req = urllib.request.Request(
        endpoint,
        data=urllib.parse.urlencode({"s3_key": asset_key}).encode(),
        headers={"X-Api-Key": token, "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise FetchError(f"{endpoint}: cannot reach the model server: {getattr(e, 'reason', e)}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status == 404:
        raise FetchError(
            f"{endpoint}: the server does not have {asset_key} (404: {_answer_text(answer, body)}); "
            "check the version, or the endpoint of a mirror"
        )
    if status in (401, 403):
        raise FetchError(
            f"{endpoint}: the access token was refused ({status}: {_answer_text(answer, body)}); it is invalid "
            f"or expired: create a new one at {TOKEN_SITE}"
        )
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("url"), str):
        raise FetchError(f"{endpoint}: unexpected answer (HTTP {status}): {_answer_text(answer, body)}")
    return answer["url"], _parse_size(answer.get("size"))


def download(
    url: str,
    dest: str | os.PathLike,
    md5: str,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """GET ``url`` into ``dest``: written to a temporary name beside it, the length checked
    against Content-Length, the md5 against ``md5`` (hex), then renamed. On any failure the
    temporary file is removed and FetchError says why. size: expected bytes for the progress
    bar where the server sends no Content-Length; progress: a tqdm bar on stderr."""
    from tqdm import tqdm

    dest = Path(dest)
    host = urllib.parse.urlsplit(url).netloc or url  # a signed URL is not repeated in messages
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        h, got = hashlib.md5(usedforsecurity=False), 0
        req = urllib.request.Request(url, headers={"User-Agent": "cellsam-trt"})
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(req, timeout=timeout) as r:
            length = r.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(
                total=expected or size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                file=sys.stderr,
                disable=not progress,
            ) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and got != expected:
            raise FetchError(f"{host}: download of {dest.name} truncated: {got} of {expected} bytes")
        if h.hexdigest() != md5:
            raise FetchError(
                f"{host}: download of {dest.name} is corrupt: md5 {h.hexdigest()}, expected {md5} (removed; try again)"
            )
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise FetchError(f"{host}: download of {dest.name} failed: HTTP {e.code} {e.reason}") from None
    except http.client.IncompleteRead as e:
        raise FetchError(
            f"{host}: download of {dest.name} truncated: the connection closed {e.expected} bytes early"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise FetchError(f"{host}: download of {dest.name} failed: {getattr(e, 'reason', e)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def fetch_model(
    name: str = "cellsam_general",
    version: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: bool = True,
    *,
    root: str | os.PathLike | None = None,
    rel: Release | None = None,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """The checkpoint of a named model, downloaded and installed under ``root`` when absent.

    An installed model is returned without any network access; an archive already in
    ``root`` whose md5 matches is installed without downloading (as the official package
    does); otherwise the archive is requested from ``endpoint`` (default users.deepcell.org)
    with ``token``, downloaded (md5 verified), kept in ``root`` and extracted
    (``install_archive``). force: download and replace even if installed. rel: the release
    (default: the registry's for ``version``).
    """
    r = _release(version, rel)
    dest = model_path(name, r.version, root, rel=r)
    if dest.is_file() and not force:
        return dest
    folder = dest.parent
    if folder.exists() and not force:
        raise FetchError(f"{folder} exists but holds no {name}.pt; remove the folder or use --force to replace it")
    base = folder.parent
    base.mkdir(parents=True, exist_ok=True)
    archive = base / r.archive_name
    if force or not (archive.is_file() and md5_file(archive) == r.md5):
        if not token:
            raise FetchError(
                f"downloading {r.archive_name} needs a DeepCell access token (create one at {TOKEN_SITE}; the "
                "command line reads DEEPCELL_ACCESS_TOKEN); on a machine without internet access install an archive "
                "copied by hand: `cellsam-trt fetch --archive FILE`"
            )
        url, size = request_download(r.asset_key, token, endpoint or DEFAULT_ENDPOINT, timeout)
        download(url, archive, r.md5, size, progress, timeout)
    try:
        install_archive(archive, r.version, root=base, rel=r, force=force, check_md5=False)
    except FetchError:
        if force or not dest.is_file():  # else another process installed it meanwhile
            raise
    if not dest.is_file():
        raise ModelNotFound(f"{archive}: installed, but it holds no {name}.pt")
    return dest


# ------------------------------------------------------------------------------ archives


def _check_member(m: tarfile.TarInfo, archive: Path) -> None:
    if m.issym() or m.islnk():
        raise FetchError(f"{archive}: member {m.name!r} is a link; archives with links are refused")
    if not (m.isreg() or m.isdir()):
        raise FetchError(f"{archive}: member {m.name!r} is not a regular file or folder; refused")
    p = PurePosixPath(m.name)
    if p.is_absolute() or ".." in p.parts:
        raise FetchError(f"{archive}: member {m.name!r} would be written outside the target folder; refused")


def _extract(archive: Path, dest: Path) -> None:
    """Every member of ``archive`` (a tar, optionally gzip / bz2 / xz) under ``dest``, each
    checked first (``_check_member``) and extracted with tarfile's "data" filter."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                _check_member(m, archive)
                tar.extract(m, dest, **safe)
    except tarfile.FilterError as e:
        raise FetchError(f"{archive}: member refused: {e}") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise FetchError(f"{archive}: not a readable tar archive: {e}") from None
    except OSError as e:
        raise FetchError(f"{archive}: cannot extract into {dest.parent}: {e}") from None


def install_archive(
    path: str | os.PathLike,
    version: str | None = None,
    *,
    root: str | os.PathLike | None = None,
    rel: Release | None = None,
    force: bool = False,
    check_md5: bool = True,
) -> Path:
    """Install a weights archive (the official ``cellsam-models_v<version>.tar.gz``, e.g. copied
    by hand onto an offline machine) into ``root``: md5 checked against the release, extracted
    into a temporary folder beside the target, its ``cellsam_v<version>/`` folder renamed into
    place. -> the installed folder. An existing folder is replaced only with ``force``."""
    r = _release(version, rel)
    path = Path(path)
    if not path.is_file():
        raise FetchError(f"{path}: no such archive file")
    if check_md5 and (got := md5_file(path)) != r.md5:
        raise FetchError(
            f"{path}: md5 {got} is not that of {r.archive_name} (version {r.version}: {r.md5}); "
            "the file is damaged or another archive"
        )
    base = Path(root if root is not None else default_root())
    target = base / r.folder
    if target.exists() and not force:
        raise FetchError(f"{target} exists already; remove it or use --force to replace it")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{r.folder}.", suffix=".extract"))
    try:
        _extract(path, tmp / "x")
        src = tmp / "x" / r.folder
        if not src.is_dir():
            top = sorted(p.name for p in (tmp / "x").iterdir()) if (tmp / "x").is_dir() else []
            raise FetchError(f"{path}: holds no {r.folder}/ folder (top level: {', '.join(top) or 'nothing'})")
        if not any((src / f"{n}.pt").is_file() for n in r.models):
            raise FetchError(f"{path}: {r.folder}/ holds none of {', '.join(n + '.pt' for n in r.models)}")
        try:
            if target.exists():  # force
                os.replace(target, tmp / "replaced")
            os.replace(src, target)
        except OSError as e:  # e.g. another process installed it meanwhile
            raise FetchError(f"{target}: cannot install: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
