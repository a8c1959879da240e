"""Detection transforms: shortest-edge sizes, boxes and masks moving together, seeded randomness."""
from __future__ import annotations

import torch

from coco_files import make_coco
from instsearch.datamodules.coco_format import CocoInstances
from instsearch.datamodules.transforms import (Compose, RandomHorizontalFlip, RandomResize, Resize, ToTensor, hflip_sample,
                                               resize_sample, shortest_edge_size)


def test_shortest_edge_size():
    assert shortest_edge_size(480, 640, 600, 1000) == (600, 800)
    assert shortest_edge_size(300, 1200, 600, 1000) == (250, 1000)  # long side capped
    assert shortest_edge_size(640, 480, 800, None) == (1067, 800)


def _box_of_mask(m: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(m, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def test_resize_and_flip_keep_boxes_and_masks_consistent(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    ds = CocoInstances(images_dir, ann, masks=True)
    image, t = ds[0]
    t = {k: v for k, v in t.items()}
    rect = [1, 2, 3]  # the rectangle masks, whose box equals the mask's extent
    for k in rect:
        torch.testing.assert_close(_box_of_mask(t["masks"][k]), t["boxes"][k])
    img2, t2 = resize_sample(image, t, (96, 128))  # exactly 2x
    assert img2.shape == (3, 96, 128) and t2["masks"].shape == (4, 96, 128)
    torch.testing.assert_close(t2["boxes"], t["boxes"] * 2)
    torch.testing.assert_close(t2["area"], t["area"] * 4)
    img3, t3 = hflip_sample(img2, t2)
    torch.testing.assert_close(img3, img2.flip(-1))
    for k in rect:
        torch.testing.assert_close(_box_of_mask(t2["masks"][k]), t2["boxes"][k])
        torch.testing.assert_close(_box_of_mask(t3["masks"][k]), t3["boxes"][k])
    # flipping twice is the identity
    img4, t4 = hflip_sample(img3, t3)
    torch.testing.assert_close(t4["boxes"], t2["boxes"])
    assert torch.equal(t4["masks"], t2["masks"]) and torch.equal(img4, img2)


def test_transforms_work_on_pil_and_tensor_alike(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    pil_ds = CocoInstances(images_dir, ann, masks=True, transforms=Compose([Resize(24, 100), ToTensor()]))
    image, t = pil_ds[0]
    assert image.shape == (3, 24, 32) and t["masks"].shape[-2:] == (24, 32)
    torch.testing.assert_close(t["boxes"][1], torch.tensor([15, 2.5, 25, 12.5]))
    # an image with no instance goes through every transform
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 10, 20, dtype=torch.uint8), "area": torch.zeros(0)}
    timg, tt = Compose([RandomResize([5], 100), RandomHorizontalFlip(1.0), ToTensor()])(
        torch.zeros(3, 10, 20, dtype=torch.uint8), empty)
    assert timg.shape == (3, 5, 10) and tt["masks"].shape == (0, 5, 10) and tt["boxes"].shape == (0, 4)


def test_random_resize_and_flip_are_seeded():
    t = RandomResize([10, 20, 30], None)
    image = torch.zeros(3, 10, 10)
    torch.manual_seed(0)
    a = [t(image, {})[0].shape[-1] for _ in range(20)]
    torch.manual_seed(0)
    b = [t(image, {})[0].shape[-1] for _ in range(20)]
    assert a == b and set(a) == {10, 20, 30}
    flip = RandomHorizontalFlip(0.5)
    image = torch.arange(4.0).reshape(1, 1, 4)
    flipped = sum(bool(flip(image, {})[0][0, 0, 0] == 3) for _ in range(200))
    assert 60 < flipped < 140
