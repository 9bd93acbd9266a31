"""PyTorch backend: the reference implementation, and the CUDA path where TensorRT is absent.

All prompts of an image go through the mask decoder in one batched call (chunked to bound
memory), with the image side broadcast rather than repeated per prompt.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.cellsam import CellSAM


class TorchBackend:
    """Runs a loaded ``CellSAM`` on ``device`` in float32.

    decode_chunk: prompts per mask-decoder call (peak memory grows ~40 MB per prompt).
    """

    name = "torch"

    def __init__(self, model: CellSAM, device: str | torch.device = "cpu", decode_chunk: int = 64) -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.decode_chunk = decode_chunk
        self.adv_mode = model.adv_mode
        self.has_detector = model.finder is not None

    def _tensor(self, x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x)).to(self.device, dtype)

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.model.mask_sam.image_encoder(self._tensor(image)).cpu().numpy()

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.model.finder is None:
            raise RuntimeError("this checkpoint has no CellFinder (plain SAM): give box or point prompts")
        logits, boxes = self.model.finder(self._tensor(image))
        return logits.cpu().numpy(), boxes.cpu().numpy()

    @torch.no_grad()
    def decode(self, embedding, boxes=None, points=None, point_labels=None):
        n = (boxes if boxes is not None else points).shape[0]
        emb = self._tensor(embedding)
        sam = self.model.mask_sam
        logits, ious = [], []
        for s in range(0, n, self.decode_chunk):
            e = slice(s, min(n, s + self.decode_chunk))
            lr, iou = sam.decode(
                emb,
                boxes=None if boxes is None else self._tensor(boxes[e]),
                points=None if points is None else self._tensor(points[e]),
                labels=None if point_labels is None else self._tensor(point_labels[e], torch.int64),
            )
            logits.append(lr[:, 0].cpu().numpy())
            ious.append(iou[:, 0].cpu().numpy())
        if not logits:
            return np.zeros((0, 256, 256), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(logits), np.concatenate(ious)
