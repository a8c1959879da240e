"""UDQ's proposal bank: every training proposal, fixed per image, with its pseudo-labels
(Algorithm 1 of the UDQ paper keeps the proposals and their codes ``H`` across rounds)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["ProposalBank", "label_dtype"]


@dataclass
class ProposalBank:
    """Every training proposal, fixed per image, with its pseudo-labels.

    ``boxes`` are in original-image pixels, concatenated image after image (``offsets[i]`` to
    ``offsets[i + 1]`` are image ``image_ids[i]``'s), ``scores`` the RPN's objectness; ``labels``
    ``(G, M)`` are the current round's codes (``uint8`` for ``K ≤ 256``, ``int16`` above), ``None``
    before the first round. ``codes``: the codes of the unrefined features under the search
    codebook at the round's start, kept only when they differ from ``labels`` (refinement).
    """

    image_ids: list[str]
    boxes: Tensor  # (G, 4) float32
    scores: Tensor  # (G,) float32
    offsets: Tensor  # (N + 1,) int64
    labels: Optional[Tensor] = None  # (G, M)
    codes: Optional[Tensor] = None  # (G, M), refinement only

    def __post_init__(self) -> None:
        self._rows = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    def row(self, image_id: str) -> int:
        """The image's position in ``image_ids``."""
        i = self._rows.get(image_id)
        if i is None:
            raise KeyError(f"image {image_id!r} has no stored proposals (not a database image of the round passes)")
        return i

    def span(self, image_id: str) -> tuple[int, int]:
        i = self.row(image_id)
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def boxes_of(self, image_id: str) -> Tensor:
        a, b = self.span(image_id)
        return self.boxes[a:b]

    def scores_of(self, image_id: str) -> Tensor:
        a, b = self.span(image_id)
        return self.scores[a:b]

    def labels_of(self, image_id: str) -> Tensor:
        a, b = self.span(image_id)
        return self.labels[a:b]

    @property
    def search_codes(self) -> Optional[Tensor]:
        """The codes the search codebook gave the features at the round's start."""
        return self.labels if self.codes is None else self.codes

    @classmethod
    def from_images(cls, image_ids: list[str], boxes: list[Tensor], scores: list[Tensor]) -> "ProposalBank":
        counts = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        cat = torch.cat(boxes).float() if boxes else torch.zeros(0, 4)
        cat_scores = torch.cat(scores).float() if scores else torch.zeros(0)
        return cls(list(image_ids), cat.reshape(-1, 4).contiguous(), cat_scores.contiguous(), offsets)

    def to_state(self) -> dict:
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        return {"image_ids": list(self.image_ids), "boxes": self.boxes.clone(), "scores": self.scores.clone(),
                "offsets": self.offsets.clone(), "labels": clone(self.labels), "codes": clone(self.codes)}

    @classmethod
    def from_state(cls, state: dict) -> "ProposalBank":
        return cls(list(state["image_ids"]), state["boxes"], state["scores"], state["offsets"], state["labels"],
                   state.get("codes"))


def label_dtype(nbits: int) -> torch.dtype:
    """The smallest integer type holding codes of ``nbits`` bits."""
    return torch.uint8 if nbits <= 8 else torch.int16

