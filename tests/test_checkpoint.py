"""Checkpoint layout, synthetic weights and loading (both modes, nested, errors, weights_only)."""

from __future__ import annotations

import pickle
import re
import warnings
import zlib

import numpy as np
import pytest
import torch

from cellsam_trt.model.cellsam import CellSAMConfig
from cellsam_trt.model.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    check_checkpoint,
    load_checkpoint,
    load_state_dict,
    to_official_layout,
)
from cellsam_trt.model.synthetic import (
    canonical_name,
    official_layout,
    synthetic_checkpoint,
    synthetic_state_dict,
    synthetic_tensor,
)

TINY = CellSAMConfig.tiny()


def read_layout(reference):
    out = {}
    for line in (reference / "checkpoint_layout.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        out[key] = (tuple(int(v) for v in re.findall(r"\d+", shape)), dtype)
    return out


def test_official_layout_matches_the_reference(reference):
    ref = read_layout(reference)
    ours = official_layout()
    assert set(ours) == set(ref)
    assert {k: v for k, v in ours.items()} == {k: s for k, (s, _) in ref.items()}
    assert {d for _, d in ref.values()} == {"float32"}
    assert sum(int(np.prod(s)) for s in ours.values()) == 290_259_676


def test_synthetic_values_follow_the_rule():
    key = "model.mask_decoder.transformer.layers.0.mlp.lin1.weight"
    rng = np.random.default_rng([7, zlib.crc32(key.encode())])
    expected = (rng.standard_normal((2048, 256)) / np.sqrt(256)).astype(np.float32)
    np.testing.assert_array_equal(synthetic_tensor(key, (2048, 256), 7), expected)
    ln = synthetic_tensor("model.image_encoder.blocks.0.norm1.weight", (768,), 0)
    assert abs(ln.mean() - 1.0) < 0.02 and 0.05 < ln.std() < 0.15
    bias = synthetic_tensor("cellfinder.decode_head.transformer.class_embed.3.bias", (2,), 0)
    np.testing.assert_array_equal(
        bias, synthetic_tensor("cellfinder.decode_head.transformer.class_embed.0.bias", (2,), 0)
    )
    assert np.all(bias < -2.5)
    ref = synthetic_tensor("cellfinder.decode_head.transformer.position.weight", (3500, 2), 0)
    assert ref.min() >= 0 and ref.max() < 1
    assert canonical_name("x.transformer.bbox_embed.5.layers.2.bias") == "x.transformer.bbox_embed.0.layers.2.bias"


def test_synthetic_seeds_differ_and_repeat():
    a = synthetic_state_dict(1, TINY)
    b = synthetic_state_dict(1, TINY)
    c = synthetic_state_dict(2, TINY)
    k = "model.image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])
    assert all(v.dtype == torch.float32 for v in a.values())


def test_synthetic_checkpoint_is_cached_atomically(tmp_path):
    p = synthetic_checkpoint(3, cache_dir=tmp_path, cfg=TINY)
    mtime = p.stat().st_mtime_ns
    assert synthetic_checkpoint(3, cache_dir=tmp_path, cfg=TINY) == p
    assert p.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.tmp"))
    ck = load_checkpoint(p, cfg=TINY)
    assert ck.adv_mode and ck.kind == "cellsam"


def test_nocp_checkpoint_reports_non_adv_mode(tmp_path):
    p = synthetic_checkpoint(0, cache_dir=tmp_path, cfg=TINY, with_model_cp=False)
    ck = load_checkpoint(p, cfg=TINY)
    assert not ck.adv_mode and ck.model.model_cp is None
    assert ck.model.mask_sam is ck.model.model
    assert "non-adv" in ck.mode_description


def test_nested_state_dict_and_head_aliases(tmp_path):
    sd = synthetic_state_dict(0, TINY)
    assert "cellfinder.decode_head.transformer.class_embed.1.weight" in sd
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": sd, "epoch": torch.tensor(3)}, path)
    ck = load_checkpoint(path, cfg=TINY)
    head = ck.model.finder.transformer.class_embed.weight
    assert torch.equal(
        head, sd[f"cellfinder.decode_head.transformer.class_embed.{TINY.cellfinder.dec_layers - 1}.weight"]
    )


@pytest.fixture(scope="module")
def tiny_state(tiny_model):
    """The tiny synthetic checkpoint's state dict, official layout (from the session's model:
    making it afresh takes ~10 s); tests take shallow copies."""
    return to_official_layout(tiny_model.state_dict(), TINY.cellfinder.dec_layers)


def _saved(tmp_path, sd, name="ck.pt"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_unexpected_keys_are_reported_and_the_model_loads(tmp_path, tiny_state):
    """The official loader ignores them silently; here they are listed, and --strict refuses."""
    sd = dict(tiny_state)
    sd["model.extra.weight"] = torch.zeros(3)
    sd["cellfinder.decode_head.aux_head.bias"] = torch.zeros(2)
    path = _saved(tmp_path, sd)
    with pytest.warns(CheckpointWarning, match="2 unexpected keys ignored") as w:
        ck = load_checkpoint(path, cfg=TINY)
    assert str(path) in str(w[0].message) and "model.extra.weight" in str(w[0].message)
    assert ck.unexpected == ("cellfinder.decode_head.aux_head.bias", "model.extra.weight")
    assert ck.unused_missing == () and ck.adv_mode
    key = "model_cp.mask_decoder.iou_token.weight"
    assert torch.equal(ck.model.model_cp.mask_decoder.iou_token.weight, sd[key])
    with pytest.raises(CheckpointError, match=r"\(strict\); unexpected keys: cellfinder.decode_head.aux_head.bias"):
        load_checkpoint(path, cfg=TINY, strict=True)


@pytest.mark.parametrize(
    "key",
    [
        "model_cp.image_encoder.blocks.0.attn.qkv.weight",
        "model_cp.prompt_encoder.point_embeddings.2.weight",
        "cellfinder.decode_head.transformer.position.weight",
    ],
)
def test_missing_keys_of_parts_that_run_are_refused_with_the_list(tmp_path, tiny_state, key):
    sd = dict(tiny_state)
    del sd[key]
    del sd["model_cp.mask_decoder.mask_tokens.weight"]
    path = _saved(tmp_path, sd)
    for strict in (False, True):
        with pytest.raises(CheckpointError, match="missing from parts that run") as e:
            load_checkpoint(path, cfg=TINY, strict=strict)
        msg = str(e.value)
        assert str(path) in msg and key in msg and "model_cp.mask_decoder.mask_tokens.weight" in msg
        with pytest.raises(CheckpointError, match=key):
            check_checkpoint(path, cfg=TINY, strict=strict)


def test_missing_keys_of_parts_that_never_run_are_reported(tmp_path, tiny_state):
    """In adv mode the ``model.`` copy makes nothing (``model_cp.`` does); the prompt encoder's
    mask-prompt branch never runs. Their absence is reported and the model loads."""
    sd = dict(tiny_state)
    unused = ["model.mask_decoder.iou_token.weight", "model_cp.prompt_encoder.mask_downscaling.0.weight"]
    for k in unused:
        del sd[k]
    path = _saved(tmp_path, sd)
    with pytest.warns(CheckpointWarning, match="2 keys of parts that never run are absent"):
        ck = load_checkpoint(path, cfg=TINY)
    assert ck.unused_missing == tuple(sorted(unused)) and ck.unexpected == ()
    assert check_checkpoint(path, cfg=TINY).unused_missing == ck.unused_missing
    with pytest.raises(CheckpointError, match="strict.*model.mask_decoder.iou_token.weight"):
        load_checkpoint(path, cfg=TINY, strict=True)
    # without model_cp the model. copy makes the masks: the same key is now needed
    nocp = {k: v for k, v in sd.items() if not k.startswith("model_cp.")}
    with pytest.raises(CheckpointError, match="missing from parts that run.*model.mask_decoder.iou_token.weight"):
        load_state_dict(nocp, cfg=TINY)


def test_a_matching_checkpoint_gives_no_report(tmp_path, tiny_state):
    path = _saved(tmp_path, tiny_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check_checkpoint(path, strict=True)  # architecture read off the shapes
        ck = load_checkpoint(path, strict=True)
    assert report.cfg == TINY and report.kind == "cellsam" and report.adv_mode
    assert (report.unexpected, report.unused_missing, ck.unexpected, ck.unused_missing) == ((), (), (), ())


def test_wrong_shape_is_reported(tmp_path):
    sd = synthetic_state_dict(0, TINY)
    sd["model.mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    with pytest.raises(CheckpointError, match="wrong shape.*iou_token"):
        load_state_dict(sd, cfg=TINY)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_only_refuses_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model.x": _Payload()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(p)):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")


def test_plain_sam_checkpoint_loads_for_prompts(tmp_path):
    sd = synthetic_state_dict(0, TINY)
    sam = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sam, path)
    ck = load_checkpoint(path, cfg=TINY)
    assert ck.kind == "sam" and ck.model.finder is None and not ck.adv_mode
    assert torch.equal(ck.model.model.mask_decoder.iou_token.weight, sam["mask_decoder.iou_token.weight"])
