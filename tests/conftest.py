"""Shared fixtures: the reference data, the synthetic checkpoint and loaded models.

The reference data lives beside the checkout (``../shared/reference``); tests that need it
skip with that reason where it is absent. The synthetic checkpoint is generated once and
cached (``$CELLSAM_TRT_CACHE`` or ``~/.cache/cellsam-trt``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# torch's OpenMP threads spin while waiting and crawl on a loaded 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("CELLSAM_TRT_REFERENCE", ROOT.parent / "shared" / "reference"))
CACHE = Path(os.environ.get("CELLSAM_TRT_CACHE", Path.home() / ".cache" / "cellsam-trt"))

BOX_CASES = [
    "YeaZ_boxes",
    "YeastNet_boxes",
    "ep_micro_boxes",
    "synthetic_512_boxes",
    "tissuenet_boxes",
    "YeaZ_boxes20_nocp",
    "tissuenet_boxes20_nocp",
]
AUTO_CASES = ["YeaZ_auto", "YeastNet_auto", "ep_micro_auto", "synthetic_512_auto", "tissuenet_auto"]

# achieved figures, printed at the end of the run (and kept for the issue notes)
ACHIEVED: dict[str, dict] = {}


def record(case: str, **figures) -> None:
    ACHIEVED.setdefault(case, {}).update(
        {k: (float(v) if isinstance(v, (np.floating, float, int, np.integer)) else v) for k, v in figures.items()}
    )


def pytest_terminal_summary(terminalreporter):
    if ACHIEVED:
        terminalreporter.section("achieved parity figures")
        for case, figs in sorted(ACHIEVED.items()):
            terminalreporter.write_line(
                f"{case}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figs.items())
            )


def pytest_collection_modifyitems(config, items):
    """In test_ort_golden, every ONNX Runtime item before every OpenVINO one (stable), so that
    one engine's full-size backends are alive at a time (``test_ort_golden._backend``)."""
    pos = [i for i, it in enumerate(items) if it.nodeid.startswith("tests/test_ort_golden.py::")]
    mine = [items[i] for i in pos]

    def engine(item) -> str:
        cs = getattr(item, "callspec", None)
        return cs.params.get("engine", "ort") if cs is not None else "ort"

    for i, it in zip(pos, sorted(mine, key=lambda it: engine(it) != "ort")):
        items[i] = it


@pytest.fixture(scope="session")
def reference() -> Path:
    if not (REFERENCE / "golden").is_dir():
        pytest.skip(f"reference data not found at {REFERENCE} (../shared/reference beside the checkout)")
    return REFERENCE


def load_golden(reference: Path, case: str) -> dict:
    with np.load(reference / "golden" / f"{case}.npz") as d:
        out = {k: d[k] for k in d.files}
    out["meta"] = json.loads(str(out.pop("meta_json")))
    return out


def case_boxes(reference: Path, case: str) -> list:
    image = case.split("_boxes")[0]
    suffix = "20" if "boxes20" in case else ""
    return json.loads((reference / "inputs" / f"{image}_boxes{suffix}.json").read_text())["boxes"]


@pytest.fixture(scope="session")
def synthetic_path() -> Path:
    from cellsam_trt.model.synthetic import synthetic_checkpoint

    return synthetic_checkpoint(seed=0, cache_dir=CACHE)


@pytest.fixture(scope="session")
def full_models(synthetic_path):
    """{"adv": CellSAM with model_cp, "nocp": the same weights without model_cp}."""
    import torch

    from cellsam_trt.model.checkpoint import load_checkpoint, load_state_dict

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    adv = load_checkpoint(synthetic_path).model
    nocp, _ = load_state_dict({k: v for k, v in adv.state_dict().items() if not k.startswith("model_cp.")})
    return {"adv": adv, "nocp": nocp}


# --------------------------------------------------------------------------- ONNX exports


@pytest.fixture(scope="session")
def tiny_model():
    """A small CellSAM (CellSAMConfig.tiny(), synthetic seed 0) with every code path."""
    from cellsam_trt.model.cellsam import CellSAMConfig
    from cellsam_trt.model.checkpoint import load_state_dict
    from cellsam_trt.model.synthetic import synthetic_state_dict

    cfg = CellSAMConfig.tiny()
    model, _ = load_state_dict(synthetic_state_dict(0, cfg), cfg=cfg)
    return model


@pytest.fixture(scope="session")
def tiny_export(tiny_model, tmp_path_factory):
    """Export directory of the tiny model (FP32 + INT8), from a checkpoint file, validated at
    batch 1 and 2 and at 1 and 37 prompts by the exporter itself."""
    import torch

    from cellsam_trt.export.onnx_export import export_model
    from cellsam_trt.model.checkpoint import sha256_file, to_official_layout

    root = tmp_path_factory.mktemp("tiny_export")
    ckpt = root / "tiny.pt"
    torch.save(to_official_layout(tiny_model.state_dict(), tiny_model.cfg.cellfinder.dec_layers), ckpt)
    out = root / "onnx"
    export_model(
        tiny_model,
        out,
        checkpoint_sha256=sha256_file(ckpt),
        checkpoint_path=str(ckpt),
        image_batches=(1, 2),
        decoder_prompts=(1, 37),
        int8=True,
    )
    return out


def _export_key(checkpoint: Path, variant: str) -> str:
    """Cache key of a full-size export: the checkpoint file's identity and the exporter's code."""
    import hashlib

    st = checkpoint.stat()
    h = hashlib.sha256(f"{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}|{variant}".encode())
    pkg = ROOT / "cellsam_trt"
    for f in sorted(list((pkg / "export").glob("*.py")) + list((pkg / "model").glob("*.py"))):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _prune_exports(root: Path, keep: int = 3) -> None:
    """Drop all but the ``keep`` newest cached exports of each variant (~1 GB each)."""
    import shutil

    for prefix in ("adv-", "nocp-"):
        dirs = sorted(root.glob(prefix + "*"), key=lambda d: d.stat().st_mtime, reverse=True)
        for d in dirs[keep:]:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def full_exports(synthetic_path, full_models):
    """{"adv": export dir of the synthetic checkpoint (all graphs + INT8, via the CLI),
    "nocp": export dir of the same weights without model_cp (encoder + decoder)}.

    Exported once and cached under CACHE/onnx/<key> (key: checkpoint identity + exporter code).
    """
    from cellsam_trt.cli import main
    from cellsam_trt.export.onnx_export import export_model
    from cellsam_trt.runtime import specs as S
    from cellsam_trt.runtime.manifest import MANIFEST

    _prune_exports(CACHE / "onnx")
    out = {}
    adv = CACHE / "onnx" / f"adv-{_export_key(synthetic_path, 'adv-int8')}"
    if not (adv / MANIFEST).is_file():
        rc = main(
            [
                "export",
                "--checkpoint",
                str(synthetic_path),
                "--out",
                str(adv),
                "--int8",
                "--validate-batches",
                "1",
                "--validate-prompts",
                "1,37",
            ]
        )
        assert rc == 0
    out["adv"] = adv
    nocp = CACHE / "onnx" / f"nocp-{_export_key(synthetic_path, 'nocp')}"
    if not (nocp / MANIFEST).is_file():
        export_model(
            full_models["nocp"], nocp, parts=(S.ENCODER, S.DECODER), image_batches=(1,), decoder_prompts=(1, 37)
        )
    out["nocp"] = nocp
    return out
