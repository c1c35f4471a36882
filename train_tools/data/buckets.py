"""Aspect-ratio buckets: the size each picture is trained at, and how a picture is fitted to it.

Pictures are not all squashed to one square: each gets the largest size of its own aspect ratio within the
pixel budget (``resolution``²), in steps of ``bucket_step``, and batches hold pictures of one size
(``sampler.BucketBatchSampler``). The bucket list goes into the file's ``ss_bucket_info``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from .items import DatasetItem
    from .prepare_options import PrepareOptions


def choose_bucket(width: int, height: int, options: PrepareOptions) -> tuple[int, int]:
    """The (w, h) a picture of ``width`` x ``height`` is trained at.

    The largest size within the pixel budget (``resolution``²) whose sides are multiples of ``bucket_step``
    within [min_bucket_reso, max_bucket_reso] and that the picture fills after an aspect-preserving resize
    with a crop of less than one step. With ``bucket_no_upscale`` the picture is never enlarged, and a small
    one (fewer pixels than the budget, or a side under min_bucket_reso) gets its own smaller bucket, sides down
    to one step. Pictures of extreme aspect ratio that fit no bucket get the nearest-ratio bucket and lose
    more to the crop.
    """
    step = options.bucket_step
    if not options.enable_bucket:
        side = max(step, options.resolution // step * step)
        return side, side
    budget = options.resolution**2
    res_side = max(step, options.resolution // step * step)
    lo = max(step, min(-(-options.min_bucket_reso // step) * step, res_side))
    hi = max(lo, options.max_bucket_reso // step * step)
    cap_w, cap_h = (width, height) if options.bucket_no_upscale else (hi, hi)
    small = options.bucket_no_upscale and (width * height < budget or min(width, height) < lo)
    ranges = [lo, step] if small and lo > step else [lo]
    for low in ranges:
        fits = _fitting_buckets(width, height, step, budget, low, hi, cap_w, cap_h)
        if fits:
            return max(fits, key=lambda b: (b[0] * b[1], -_ratio_error(b, width, height), b[0]))
    for low in ranges:
        near = _nearest_ratio_bucket(width, height, step, budget, low, hi, cap_w, cap_h)
        if near:
            return near
    return step, step


def _fitting_buckets(
    w: int, h: int, step: int, budget: int, lo: int, hi: int, cap_w: int, cap_h: int
) -> list[tuple[int, int]]:
    """Buckets the picture fills after resizing one side exactly and cropping the other by under a step."""
    out = []
    for bw in range(lo, min(hi, cap_w) + 1, step):
        bh = bw * h // w // step * step
        if lo <= bh <= min(hi, cap_h) and bw * bh <= budget:
            out.append((bw, bh))
    for bh in range(lo, min(hi, cap_h) + 1, step):
        bw = bh * w // h // step * step
        if lo <= bw <= min(hi, cap_w) and bw * bh <= budget:
            out.append((bw, bh))
    return out


def _nearest_ratio_bucket(
    w: int, h: int, step: int, budget: int, lo: int, hi: int, cap_w: int, cap_h: int
) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    best_key: tuple[float, int] | None = None
    for bw in range(lo, min(hi, cap_w) + 1, step):
        for bh in range(lo, min(hi, cap_h) + 1, step):
            if bw * bh > budget:
                continue
            key = (round(_ratio_error((bw, bh), w, h), 9), -bw * bh)
            if best_key is None or key < best_key:
                best, best_key = (bw, bh), key
    return best


def _ratio_error(bucket: tuple[int, int], w: int, h: int) -> float:
    return abs(math.log(bucket[0] / bucket[1]) - math.log(w / h))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio so the bucket is covered, then crop the centre to exactly the bucket.

    One resampling step (``resize`` with a source box) keeps it sharp and exact.
    """
    w, h = image.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    box_w, box_h = bw / scale, bh / scale
    left, top = (w - box_w) / 2, (h - box_h) / 2
    return image.resize(
        (bw, bh), Image.Resampling.LANCZOS, box=(left, top, left + box_w, top + box_h), reducing_gap=3.0
    )


def bucket_info(items: Sequence[DatasetItem]) -> dict[str, Any]:
    """The buckets and how many items each holds, plus the mean aspect-ratio error (kohya's ``ss_bucket_info``).

    The error is |bucket ratio - original ratio| averaged over items whose original size is known.
    """
    counts = Counter(tuple(item.size) for item in items)
    buckets = {str(i): {"resolution": [w, h], "count": counts[(w, h)]} for i, (w, h) in enumerate(sorted(counts))}
    errors = [
        abs(item.size[0] / item.size[1] - item.source_size[0] / item.source_size[1])
        for item in items
        if item.source_size
    ]
    return {"buckets": buckets, "mean_img_ar_error": float(sum(errors) / len(errors)) if errors else 0.0}
