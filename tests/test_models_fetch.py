"""Official models by name: the download protocol against a loopback server that imitates
users.deepcell.org, archive installation (md5, unsafe members, atomic), name resolution in the
front door and the command line (``fetch``, ``run`` with no model). No test touches the network
or the real home folder."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from cellsam_trt import cli, weights
from cellsam_trt.weights import FetchError, ModelNotFound, Release

TOKEN = "token-0123456789"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_archive(members: dict[str, bytes], extra: list[tarfile.TarInfo] = (), gzip: bool = True) -> bytes:
    """A .tar.gz (or plain .tar) with the files ``members`` (name -> content) and the special
    ``extra`` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gzip else "w", **({"compresslevel": 1} if gzip else {})) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def release_for(archive: bytes, version: str = "9.9") -> Release:
    return Release(version, f"models/cellsam-models_v{version}.tar.gz", _md5(archive))


GOOD = {"cellsam_v9.9/cellsam_general.pt": b"general weights", "cellsam_v9.9/cellsam_extra.pt": b"extra weights"}


class _State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.assets: dict[str, bytes] = {}  # asset key -> archive bytes
        self.truncate = False  # send half the bytes under the full Content-Length
        self.corrupt = False  # flip one byte of the archive
        self.requests: list[tuple[str, str, dict, dict]] = []


class _Handler(BaseHTTPRequestHandler):
    state: _State

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes, length: int | None = None, kind: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # the getData endpoint
        form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        self.state.requests.append(("POST", self.path, dict(self.headers), form))
        if self.headers.get("X-Api-Key") != TOKEN:
            return self._reply(403, json.dumps({"detail": "Authentication credentials were not provided."}).encode())
        key = form.get("s3_key", [""])[0]
        if key not in self.state.assets:
            return self._reply(404, json.dumps({"error": "Key not found"}).encode())
        url = f"http://127.0.0.1:{self.server.server_address[1]}/bucket/{key}?X-Amz-Signature=secret"
        self._reply(200, json.dumps({"url": url, "size": f"{len(self.state.assets[key]) / 1e3:.1f} KB"}).encode())

    def do_GET(self):  # the signed download URL
        self.state.requests.append(("GET", self.path, dict(self.headers), {}))
        key = urlsplit(self.path).path.removeprefix("/bucket/")
        data = self.state.assets.get(key)
        if data is None:
            return self._reply(404, b"no such object", kind="text/plain")
        if self.state.corrupt:
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        if self.state.truncate:
            return self._reply(200, data[: len(data) // 2], length=len(data), kind="application/gzip")
        self._reply(200, data, kind="application/gzip")


@pytest.fixture(scope="module")
def server():
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/api/getData/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def site(server):
    state, endpoint = server
    state.reset()
    return state, endpoint


def _left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ------------------------------------------------------------------------------ protocol


def test_fetch_downloads_verifies_and_installs(site, tmp_path):
    state, endpoint = site
    archive = make_archive(GOOD)
    rel = release_for(archive)
    state.assets[rel.asset_key] = archive
    root = tmp_path / "models"
    path = weights.fetch_model("cellsam_extra", token=TOKEN, endpoint=endpoint, progress=False, root=root, rel=rel)
    assert path == root / "cellsam_v9.9" / "cellsam_extra.pt" and path.read_bytes() == b"extra weights"
    assert (root / "cellsam_v9.9" / "cellsam_general.pt").read_bytes() == b"general weights"
    assert _left(root) == ["cellsam-models_v9.9.tar.gz", "cellsam_v9.9"]  # the archive kept, as the official
    post, get = state.requests
    assert post[0] == "POST" and post[2]["X-Api-Key"] == TOKEN and post[3] == {"s3_key": [rel.asset_key]}
    assert get[0] == "GET" and get[1].startswith(f"/bucket/{rel.asset_key}")
    # installed: no network, no token needed
    assert weights.fetch_model("cellsam_general", root=root, rel=rel, progress=False).read_bytes() == b"general weights"
    assert len(state.requests) == 2
    # an archive already downloaded (md5 matching) is installed without the server
    (root / "cellsam_v9.9" / "cellsam_general.pt").unlink()
    (root / "cellsam_v9.9" / "cellsam_extra.pt").unlink()
    (root / "cellsam_v9.9").rmdir()
    assert weights.fetch_model("cellsam_general", root=root, rel=rel, progress=False).is_file()
    assert len(state.requests) == 2


def test_a_refused_token_is_one_line_and_writes_nothing(site, tmp_path):
    state, endpoint = site
    archive = make_archive(GOOD)
    rel = release_for(archive)
    state.assets[rel.asset_key] = archive
    with pytest.raises(FetchError) as e:
        weights.fetch_model(token="tok-OLD-42", endpoint=endpoint, progress=False, root=tmp_path / "m", rel=rel)
    msg = str(e.value)
    assert "403: Authentication credentials were not provided." in msg and "\n" not in msg
    assert "invalid or expired" in msg and "https://users.deepcell.org" in msg
    assert "tok-OLD-42" not in msg  # the token itself is never printed (the official message prints it)
    assert len(state.requests) == 1  # nothing downloaded
    assert _left(tmp_path / "m") == []


def test_an_unknown_asset_is_a_404(site, tmp_path):
    _, endpoint = site
    rel = release_for(b"never published")
    with pytest.raises(FetchError, match=r"does not have models/cellsam-models_v9.9.tar.gz \(404: Key not found\)"):
        weights.fetch_model(token=TOKEN, endpoint=endpoint, progress=False, root=tmp_path / "m", rel=rel)
    assert _left(tmp_path / "m") == []


def test_no_token_says_both_ways(tmp_path):
    with pytest.raises(FetchError) as e:
        weights.fetch_model(root=tmp_path / "m", rel=release_for(b"x"), progress=False)
    assert "access token" in str(e.value) and "--archive" in str(e.value)


@pytest.mark.parametrize("fault, message", [("corrupt", "is corrupt: md5"), ("truncate", "truncated")])
def test_a_bad_download_is_removed(site, tmp_path, fault, message):
    state, endpoint = site
    archive = make_archive(GOOD)
    rel = release_for(archive)
    state.assets[rel.asset_key] = archive
    setattr(state, fault, True)
    root = tmp_path / "m"
    with pytest.raises(FetchError, match=message) as e:
        weights.fetch_model(token=TOKEN, endpoint=endpoint, progress=False, root=root, rel=rel)
    assert "secret" not in str(e.value)  # the signed URL is not repeated
    assert _left(root) == []  # no archive, no temporary file, no folder


def test_an_unreachable_server_is_one_line(tmp_path):
    with pytest.raises(FetchError, match="cannot reach the model server"):
        weights.fetch_model(
            token=TOKEN, endpoint="http://127.0.0.1:9/api/", progress=False, root=tmp_path, rel=release_for(b"x")
        )


# ------------------------------------------------------------------------------ archives


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "members, extra, message",
    [
        ({**GOOD, "cellsam_v9.9/../../escaped.pt": b"x"}, [], "outside the target folder"),
        ({**GOOD, "/tmp/absolute.pt": b"x"}, [], "outside the target folder"),
        (GOOD, [_link("cellsam_v9.9/link.pt", tarfile.SYMTYPE, "/etc/passwd")], "is a link"),
        (GOOD, [_link("cellsam_v9.9/inner.pt", tarfile.SYMTYPE, "cellsam_general.pt")], "is a link"),
        (GOOD, [_link("cellsam_v9.9/hard.pt", tarfile.LNKTYPE, "cellsam_v9.9/cellsam_general.pt")], "is a link"),
        ({"other_v1/cellsam_general.pt": b"x"}, [], r"holds no cellsam_v9.9/ folder \(top level: other_v1\)"),
        ({"cellsam_v9.9/notes.txt": b"x"}, [], "holds none of cellsam_general.pt"),
    ],
)
def test_unsafe_or_wrong_archives_are_refused_and_leave_nothing(tmp_path, members, extra, message):
    archive = make_archive(members, extra)
    path = tmp_path / "in" / "a.tar.gz"
    path.parent.mkdir()
    path.write_bytes(archive)
    root = tmp_path / "deep" / "models"
    with pytest.raises(FetchError, match=message):
        weights.install_archive(path, root=root, rel=release_for(archive))
    assert _left(root) == []  # no half-extracted folder, no temporary folder
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.tar.gz"]


def test_an_archive_by_hand(tmp_path):
    archive = make_archive(GOOD)
    path = tmp_path / "cellsam-models_v9.9.tar.gz"
    path.write_bytes(archive)
    root = tmp_path / "models"
    with pytest.raises(FetchError, match="md5 .* is not that of cellsam-models_v9.9.tar.gz"):
        weights.install_archive(path, root=root, rel=release_for(archive + b"\0"))
    folder = weights.install_archive(path, root=root, rel=release_for(archive))
    assert folder == root / "cellsam_v9.9" and _left(folder) == ["cellsam_extra.pt", "cellsam_general.pt"]
    with pytest.raises(FetchError, match="exists already.*--force"):
        weights.install_archive(path, root=root, rel=release_for(archive))
    (folder / "cellsam_extra.pt").write_bytes(b"changed")
    weights.install_archive(path, root=root, rel=release_for(archive), force=True)
    assert (folder / "cellsam_extra.pt").read_bytes() == b"extra weights" and _left(root) == ["cellsam_v9.9"]
    truncated = tmp_path / "half.tar.gz"
    truncated.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(FetchError, match="not a readable tar archive"):
        weights.install_archive(truncated, root=tmp_path / "r2", rel=release_for(archive[: len(archive) // 2]))
    assert _left(tmp_path / "r2") == []


def test_names_versions_and_the_missing_message(tmp_path):
    assert weights.model_path("cellsam_extra", "1.2", tmp_path) == tmp_path / "cellsam_v1.2" / "cellsam_extra.pt"
    assert weights.default_root(tmp_path) == tmp_path / ".deepcell" / "models"
    assert weights.release().md5 == "f41e6899c49fc8ce12f77a8d25594604"
    assert weights.release().asset_key == "models/cellsam-models_v1.2.tar.gz"
    with pytest.raises(ModelNotFound, match="version 1.1 is not known; known versions: 1.2"):
        weights.model_path("cellsam_general", "1.1")
    with pytest.raises(ModelNotFound, match="no model named 'cellsam_base'"):
        weights.model_path("cellsam_base")
    assert weights.is_model_name("cellsam_general") and not weights.is_model_name(Path("cellsam_general"))
    with pytest.raises(ModelNotFound) as e:
        weights.find_model("cellsam_general", None, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "cellsam_v1.2" / "cellsam_general.pt") in msg
    assert "DEEPCELL_ACCESS_TOKEN=<token> cellsam-trt fetch cellsam_general" in msg
    assert "cellsam-trt fetch --archive cellsam-models_v1.2.tar.gz" in msg


# ------------------------------------------------------------------------------ front door and CLI


@pytest.fixture(scope="module")
def tiny_archive(tiny_model):
    """The official archive layout (cellsam_v1.2/<name>.pt) holding the tiny synthetic checkpoint."""
    import torch

    from cellsam_trt.model.checkpoint import to_official_layout

    buf = io.BytesIO()
    torch.save(to_official_layout(tiny_model.state_dict(), tiny_model.cfg.cellfinder.dec_layers), buf)
    # a plain tar (gzip of 60 MB costs ~5 s; the small archives above cover gzip)
    return make_archive({"cellsam_v1.2/cellsam_general.pt": buf.getvalue()}, gzip=False)


def test_fetch_and_run_by_name_from_the_command_line(site, tiny_archive, tmp_path, monkeypatch, capsys):
    """``cellsam-trt fetch`` (token and endpoint from the environment) fills ~/.deepcell/models;
    ``run`` with no model flag then uses cellsam_general from there."""
    state, endpoint = site
    rel = release_for(tiny_archive, "1.2")
    state.assets[rel.asset_key] = tiny_archive
    monkeypatch.setitem(weights.RELEASES, "1.2", rel)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CELLSAM_TRT_MODELS_URL", endpoint)
    monkeypatch.delenv("DEEPCELL_ACCESS_TOKEN", raising=False)
    img, boxes = cli.synthetic_cells(1, 96, 112, 4)
    np.save(tmp_path / "img.npy", img)
    (tmp_path / "boxes.json").write_text(json.dumps({"boxes": boxes.tolist()}))
    run = ["run", str(tmp_path / "img.npy"), "--out", str(tmp_path / "o"), "--quiet", "--format", "npy"]
    run += ["--boxes", str(tmp_path / "boxes.json"), "--iou-threshold=-100", "--backend", "torch", "--device", "cpu"]

    assert cli.main(run) == 2  # nothing installed, no token
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no model given and the default model cellsam_general" in err
    assert "DEEPCELL_ACCESS_TOKEN=<token> cellsam-trt fetch" in err and "fetch --archive" in err
    assert "--synthetic-seed" in err and "--model" in err
    assert cli.main(["fetch", "--quiet"]) == 2
    assert "access token" in capsys.readouterr().err

    monkeypatch.setenv("DEEPCELL_ACCESS_TOKEN", TOKEN)
    assert cli.main(["fetch", "--quiet"]) == 0
    installed = tmp_path / "home" / ".deepcell" / "models" / "cellsam_v1.2" / "cellsam_general.pt"
    assert capsys.readouterr().out.strip() == str(installed) and installed.is_file()
    assert cli.main(["fetch", "cellsam_extra", "--quiet"]) == 2  # the archive holds general only
    assert "holds no cellsam_extra.pt" in capsys.readouterr().err

    assert cli.main(run) == 0
    summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert summary["model"] == str(installed) and summary["backend"] == "torch"
    assert np.load(tmp_path / "o" / "img_labels.npy").max() > 0
    named = cli.build_parser().parse_args([*run, "--model", "cellsam_general", "--model-version", "1.2"])
    assert cli.engine_spec(named).model == str(installed)
    local = cli.build_parser().parse_args([*run, "--model", str(tmp_path / "cellsam_general")])
    assert cli.engine_spec(local).model == str(tmp_path / "cellsam_general")  # a path stays a path
    assert cli.main([*run, "--model", "cellsam_extra", "--overwrite"]) == 2
    assert "model cellsam_extra (v1.2) is not installed" in capsys.readouterr().err
    assert cli.main([*run, "--model", "cellsam_general", "--model-version", "0.9"]) == 2
    assert "version 0.9 is not known" in capsys.readouterr().err


def test_front_door_and_models_by_name(tiny_archive, tmp_path):
    from cellsam_trt.api import CellSAM, LoadError
    from cellsam_trt.models import get_local_model, get_model
    from cellsam_trt.pipeline import SegmentSettings

    root = tmp_path / "models"
    with pytest.raises(LoadError, match="model cellsam_general \\(v1.2\\) is not installed"):
        CellSAM.load("cellsam_general", backend="torch", device="cpu", models_root=root)
    with pytest.raises(ModelNotFound, match="cellsam-trt fetch --archive"):
        get_model(root=root, backend="torch", device="cpu")
    path = tmp_path / "cellsam-models_v1.2.tar.gz"
    path.write_bytes(tiny_archive)
    weights.install_archive(path, root=root, rel=release_for(tiny_archive, "1.2"))
    img, boxes = cli.synthetic_cells(2, 80, 96, 3)
    installed = str(root / "cellsam_v1.2" / "cellsam_general.pt")
    keep_all = SegmentSettings(iou_threshold=-100)  # the random tiny model predicts low IoUs
    with CellSAM.load("cellsam_general", "torch", "cpu", version="1.2", models_root=root, settings=keep_all) as m:
        assert m.description["model_name"] == "cellsam_general v1.2" and m.description["model"] == installed
        assert m.segment(img, boxes=boxes).labels.max() > 0
    with get_model("cellsam_general", "1.2", root=root, backend="torch", device="cpu") as m:
        assert isinstance(m, CellSAM) and m.description["model"] == installed and m.description["adv_mode"]
    with get_local_model(installed, backend="torch", device="cpu") as m:
        assert isinstance(m, CellSAM) and m.description["model"] == installed
    with pytest.raises(LoadError, match="cellsam_general: no such model file"):
        get_local_model("cellsam_general")  # a path, never a name


def test_strict_from_the_command_line(tiny_model, tmp_path, capsys):
    """Unexpected keys: reported in one line each and kept in the run summary; --strict refuses."""
    import torch

    from cellsam_trt.model.checkpoint import to_official_layout

    state = to_official_layout(tiny_model.state_dict(), tiny_model.cfg.cellfinder.dec_layers)
    state["model.extra_head.weight"] = torch.zeros(2)
    ck = tmp_path / "extra.pt"
    torch.save(state, ck)
    img, boxes = cli.synthetic_cells(3, 64, 72, 2)
    np.save(tmp_path / "img.npy", img)
    run = ["run", str(tmp_path / "img.npy"), "--out", str(tmp_path / "o"), "--quiet", "--checkpoint", str(ck)]
    run += ["--backend", "torch", "--device", "cpu", "--format", "npy"]
    assert cli.main(run) == 0
    err = capsys.readouterr().err
    assert f"cellsam-trt: warning: {ck}: 1 unexpected keys ignored: model.extra_head.weight" in err
    summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert any("model.extra_head.weight" in w for w in summary["load_warnings"])
    assert cli.main([*run, "--strict", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cellsam-trt: {ck}: checkpoint does not match the CellSAM layout (strict)")
    assert "model.extra_head.weight" in err[-1]
