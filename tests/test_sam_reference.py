"""Our SAM modules against segment_anything itself, where it imports.

segment_anything imports torchvision, which has no CPU build on PyPI for the CPU torch of
our CI; there this test skips (the golden parity tests are the proof). On a machine with the
CUDA torch + torchvision pair it runs on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def segment_anything():
    try:
        import segment_anything as sa
    except Exception as e:  # ImportError, or torchvision failing to load its operators
        pytest.skip(f"segment_anything does not import here: {type(e).__name__}: {e}")
    return sa


@pytest.mark.slow
def test_same_outputs_as_segment_anything(segment_anything, full_models):
    ours = full_models["adv"].mask_sam
    ref = segment_anything.sam_model_registry["vit_b"]()
    ref.load_state_dict(ours.state_dict())
    ref.eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 1, (1, 3, 1024, 1024)).astype(np.float32))
    boxes = torch.tensor([[100.0, 120.0, 180.0, 200.0], [500.0, 40.0, 560.0, 90.0]])
    with torch.no_grad():
        emb_ref = ref.image_encoder(x)
        emb = ours.image_encoder(x)
        assert (emb - emb_ref).abs().max() <= 1e-4
        lr, iou = ours.decode(emb_ref, boxes=boxes)
        for i in range(len(boxes)):
            sparse, dense = ref.prompt_encoder(points=None, boxes=boxes[i : i + 1, None], masks=None)
            lr_ref, iou_ref = ref.mask_decoder(emb_ref, ref.prompt_encoder.get_dense_pe(), sparse, dense, False)
            assert (lr[i] - lr_ref[0]).abs().max() <= 1e-4
            assert (iou[i] - iou_ref[0]).abs().max() <= 1e-5
