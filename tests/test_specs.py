"""The declarative graph specs: dynamic axes, TensorRT profiles, JSON, and the input checks."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam_trt.model.cellsam import CellSAMConfig
from cellsam_trt.runtime import specs as S


@pytest.fixture(scope="module")
def specs():
    return S.model_specs()


def test_official_geometry(specs):
    enc, dec, cf = specs[S.ENCODER], specs[S.DECODER], specs[S.CELLFINDER]
    assert enc.input_names == ["image"] and enc.output_names == ["image_embeddings"]
    assert enc.inputs[0].dims("opt") == (1, 3, 1024, 1024)
    assert enc.outputs[0].dims("max") == (S.Bounds().max_images, 256, 64, 64)
    assert dec.input_names == ["image_embeddings", "point_coords", "point_labels"]
    assert dec.output_names == ["low_res_masks", "iou_predictions"]
    assert dec.outputs[0].dims("min") == (1, 1, 256, 256)
    assert cf.outputs[0].dims("opt") == (1, 3500, 2) and cf.outputs[1].dims("opt") == (1, 3500, 4)
    tiny = S.specs_for_config(CellSAMConfig.tiny())
    assert tiny[S.CELLFINDER].outputs[0].dims("opt") == (1, 64, 2)


def test_split_decoder_specs_chain(specs):
    """context_decoder takes prompt_context's outputs plus the decoder's prompts, and gives the
    decoder's outputs."""
    ctx, cd, dec = specs[S.PROMPT_CONTEXT], specs[S.CONTEXT_DECODER], specs[S.DECODER]
    assert ctx.inputs == dec.inputs[:1]
    assert cd.inputs[:4] == ctx.outputs and cd.inputs[4:] == dec.inputs[1:] and cd.outputs == dec.outputs
    assert [t.dims("opt") for t in ctx.outputs] == [
        (1, 4096, 256),
        (1, 8, 16, 4096),
        (1, 8, 4096, 16),
        (1, 8, 4096, 16),
    ]
    assert cd.dynamic_axes() == dec.dynamic_axes()
    tiny = S.specs_for_config(CellSAMConfig.tiny())
    assert tiny[S.PROMPT_CONTEXT].outputs[1].dims("opt")[1] == CellSAMConfig.tiny().sam.decoder_heads


def test_dynamic_axes(specs):
    assert specs[S.ENCODER].dynamic_axes() == {"image": {0: "B"}, "image_embeddings": {0: "B"}}
    assert specs[S.DECODER].dynamic_axes() == {
        "point_coords": {0: "N", 1: "P"},
        "point_labels": {0: "N", 1: "P"},
        "low_res_masks": {0: "N"},
        "iou_predictions": {0: "N"},
    }
    assert specs[S.CELLFINDER].dynamic_axes()["pred_boxes"] == {0: "B"}


def test_profile_shapes_are_consistent(specs):
    prof = S.profile_shapes(specs[S.DECODER])
    b = S.Bounds()
    assert prof["image_embeddings"] == ((1, 256, 64, 64),) * 3
    assert prof["point_coords"] == ((1, 1, 2), (b.opt_prompts, 2, 2), (b.max_prompts, b.max_points, 2))
    assert prof["point_labels"] == ((1, 1), (b.opt_prompts, 2), (b.max_prompts, b.max_points))
    enc = S.profile_shapes(specs[S.ENCODER])
    assert enc == {"image": ((1, 3, 1024, 1024), (1, 3, 1024, 1024), (b.max_images, 3, 1024, 1024))}


def test_json_round_trip(specs):
    for spec in specs.values():
        again = S.ModelSpec.from_json(spec.to_json())
        assert again == spec


def test_bad_dim_bounds():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        S.Dim("N", 4, 2, 8)


def _decoder_feeds(n=3, p=2, emb=(1, 256, 64, 64)):
    return {
        "image_embeddings": np.zeros(emb, np.float32),
        "point_coords": np.zeros((n, p, 2), np.float32),
        "point_labels": np.zeros((n, p), np.float32),
    }


def test_check_inputs_accepts_and_resolves(specs):
    assert specs[S.DECODER].check_inputs(_decoder_feeds(5, 3)) == {"N": 5, "P": 3}


@pytest.mark.parametrize(
    "mutate, name, match",
    [
        (lambda f: f.pop("point_labels"), "point_labels", "missing"),
        (lambda f: f.update(extra=np.zeros(1, np.float32)), "extra", "unexpected"),
        (lambda f: f.update(point_labels=np.zeros((3, 2), np.int64)), "point_labels", "dtype int64"),
        (lambda f: f.update(point_coords=np.zeros((3, 2), np.float32)), "point_coords", "rank 2"),
        (
            lambda f: f.update(image_embeddings=np.zeros((1, 256, 32, 32), np.float32)),
            "image_embeddings",
            "axis 2 is 32",
        ),
        (
            lambda f: f.update(image_embeddings=np.zeros((2, 256, 64, 64), np.float32)),
            "image_embeddings",
            "axis 0 is 2",
        ),
        (lambda f: f.update(point_labels=np.zeros((4, 2), np.float32)), "point_labels", "N = 3"),
        (
            lambda f: f.update(
                point_coords=np.zeros((3, 17, 2), np.float32), point_labels=np.zeros((3, 17), np.float32)
            ),
            "point_coords",
            r"outside \[1, 16\]",
        ),
        (
            lambda f: f.update(point_coords=np.zeros((0, 2, 2), np.float32), point_labels=np.zeros((0, 2), np.float32)),
            "point_coords",
            "outside",
        ),
    ],
)
def test_check_inputs_names_the_input(specs, mutate, name, match):
    feeds = _decoder_feeds()
    mutate(feeds)
    with pytest.raises(S.InputSpecError, match=match) as e:
        specs[S.DECODER].check_inputs(feeds)
    assert e.value.input == name and e.value.model == S.DECODER
    assert repr(name) in str(e.value)


def test_batch_bound(specs):
    big = {"image": np.zeros((S.Bounds().max_detector_images + 1, 3, 1024, 1024), np.float32)}
    with pytest.raises(S.InputSpecError, match="axis 0 .B."):
        specs[S.CELLFINDER].check_inputs(big)
