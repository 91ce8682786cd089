"""The Cache page: ``cache info`` metadata, ``cache verify`` against the manifest, a gallery of crops.

The cache is verified once, on a background thread started with the server
(``verify`` reads every shard, minutes for an ImageNet cache); until it passes,
the page shows progress or the problems and no crop is served. Gallery images
are addressed by manifest image id and read through ``ConfinedPaths``, so a
request cannot name a file, and a symlink planted in the data root is refused.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from common.cache_format import CacheReader, verify_cache
from common.crops import check_boxes_inside
from common.images import ImageError
from common.manifest import ConfinedPaths, load_manifest
from common.models import Preprocess
from common.render import check_frame, decode, manifest_frames, render_crops
from stage2_student_distill.app.serve.pictures import chw_to_pil, png_data_uri
from stage1_teacher_cache.info import cache_info, human_bytes
from stage1_teacher_cache.label_agreement import crop_top1, disagreeing_crops

# One colour per crop (matplotlib's tab10): the box on the image and the border of its crop match.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
OVERVIEW_PX = 320  # longer side of the image with its boxes drawn
MAX_GALLERY = 48


@dataclass(frozen=True)
class StudentView:
    """The size and resampling the crops are shown at, and whose they are."""

    size: int
    interpolation: str
    whose: str


class CacheView:
    def __init__(self, cache: str, manifest: str, student: Preprocess | None = None, student_name: str = ""):
        self.cache, self.manifest_path = cache, manifest
        self._student, self._student_name = student, student_name
        self._done = threading.Event()
        self.problems: list[str] = []
        self.info: dict[str, Any] | None = None
        self.reader: CacheReader | None = None
        self.manifest, self._paths = None, None
        threading.Thread(target=self._verify, name="cache-verify", daemon=True).start()

    def _verify(self) -> None:
        try:
            manifest = load_manifest(self.manifest_path)
            problems = verify_cache(self.cache, manifest_hash=manifest.content_hash)
            if not problems:
                self.info = cache_info(self.cache)
                self.reader = CacheReader(self.cache, manifest_hash=manifest.content_hash, verify_checksums=True)
                # per image: crops whose ensemble top-1 is not the label (the "disagrees" filter)
                self.disagreeing = disagreeing_crops(self.reader, manifest.labels)
                self.manifest, self._paths = manifest, ConfinedPaths(manifest)
            self.problems = problems
        except (ValueError, OSError) as e:  # a manifest that cannot be read, a cache that vanished
            self.problems = [str(e)]
        except Exception as e:  # never leave the page "verifying" forever
            self.problems = [f"{self.cache}: could not be verified ({type(e).__name__}: {e})"]
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def verifying(self) -> bool:
        return not self._done.is_set()

    @property
    def ok(self) -> bool:
        return self._done.is_set() and not self.problems

    @property
    def class_names(self) -> list[str]:
        names = self.info.get("class_names") if self.info else None
        return list(names or self.manifest.class_names or [f"class {i}" for i in range(self.reader.num_classes)])

    def student_view(self) -> StudentView:
        if self._student is not None:
            return StudentView(self._student.input_size, self._student.interpolation, self._student_name)
        first = self.info["teachers"][0]
        p = first["preprocess"]
        return StudentView(int(p["input_size"]), str(p["interpolation"]),
                           f"teacher {first['name']} (no --checkpoint/--hub given)")

    def summary(self) -> dict[str, Any]:
        """The metadata table: teachers and their accuracy, crop policy, k, bytes per crop, completeness."""
        i = self.info
        return {
            "info": i,
            "on_disk": human_bytes(i["bytes_on_disk"]),
            "bytes_per_crop": f"{i['bytes_per_crop']:.1f}" if i["bytes_per_crop"] else "n/a",
        }

    def sample(self, class_name: str | None, n: int, seed: int, disagree: bool = False) -> tuple[list[int], str | None]:
        """Up to ``n`` image ids (sorted), drawn with ``seed``; only images labelled ``class_name`` if given;
        with ``disagree`` only images with a crop whose ensemble top-1 is not the label."""
        m = self.manifest
        ids = m.image_ids
        if class_name:
            if class_name not in m.class_names:
                return [], f"unknown class {class_name!r}; choose one of the listed classes"
            ids = ids[m.labels == m.class_names.index(class_name)]
        if disagree:
            ids = ids[self.disagreeing[ids] > 0]
        chosen = np.random.default_rng(seed).choice(ids, size=min(n, len(ids)), replace=False) if len(ids) else ids
        return sorted(int(i) for i in chosen), None

    def card(self, image_id: int, disagree: bool = False) -> dict[str, Any]:
        """One gallery entry: the image with every crop's box, each crop as the student sees it, its top-k;
        with ``disagree`` only the crops whose ensemble top-1 is not the label."""
        m, names, view = self.manifest, self.class_names, self.student_view()
        label = int(m.labels[image_id])
        card: dict[str, Any] = {"id": image_id, "path": m.paths[image_id],
                                "label": names[label] if label >= 0 else "unlabelled"}
        try:
            path = self._paths(image_id)
            image = decode(path)
            check_frame(path, (image.shape[2], image.shape[1]), manifest_frames(m, [image_id])[0])
            rows = self.reader.images([image_id])
            boxes, flips = rows["boxes"][0], rows["flip"][0]
            check_boxes_inside(boxes[None], [image.shape[2]], [image.shape[1]], flips=flips[None],
                               where=lambda _, j: f"crop {j}", error=lambda msg: ImageError(path, msg),
                               remedy="the cache's boxes do not fit this manifest's images; rebuild the cache")
        except (ImageError, ValueError, OSError) as e:
            card["error"] = str(e)
            return card
        top1 = crop_top1(rows["topk_index"][0], rows["topk_prob"][0])
        shown = [c for c in range(len(boxes)) if not disagree or (label >= 0 and top1[c] != label)]
        card["overview"] = png_data_uri(_draw_boxes(chw_to_pil(image), boxes, shown))
        crops = render_crops(image, boxes[shown], flips[shown], view.size, view.interpolation)
        card["crops"] = [
            {"n": c + 1, "colour": COLOURS[c % len(COLOURS)], "flip": bool(flips[c]), "box": [int(v) for v in boxes[c]],
             "uri": png_data_uri(chw_to_pil(crop)), "disagrees": bool(label >= 0 and top1[c] != label),
             "top": [(names[int(j)], float(p)) for j, p in zip(rows["topk_index"][0][c], rows["topk_prob"][0][c])]}
            for c, crop in zip(shown, crops)
        ]
        return card


def _draw_boxes(image: Image.Image, boxes, which) -> Image.Image:
    """The image scaled to OVERVIEW_PX on its longer side with the boxes ``which`` outlined and numbered."""
    scale = OVERVIEW_PX / max(image.size)
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(shown)
    for c in which:
        x, y, w, h = boxes[c]
        colour = COLOURS[c % len(COLOURS)]
        x0, y0 = x * scale, y * scale
        x1, y1 = (x + w) * scale - 1, (y + h) * scale - 1
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        draw.rectangle((x0, y0, x0 + 12, y0 + 12), fill=colour)
        draw.text((x0 + 3, y0), str(c + 1), fill="white")
    return shown
