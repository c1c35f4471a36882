"""How fast the dataset is prepared and tagged on this machine: ``python -m train_tools.bench.dataset``.

Generates N pictures of assorted sizes in a temporary folder, then times ``prepare_dataset`` (first run, and an
incremental rerun where nothing changed) and the WD14 tagger: a tiny stand-in model of the real input and output
shapes (so the numbers measure the picture handling around the model), and the real model too when one is in
the models folder. Needs ``onnx`` for the stand-in model (``pip install onnx``); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..data import wd14
from ..data.items import load_items, open_prepared
from ..data.prepare_folder import prepare_dataset
from ..data.prepare_options import PrepareOptions

SIZES = [(512, 512), (768, 512), (512, 768), (1024, 1024), (1920, 1080), (640, 480), (300, 400), (2048, 1536)]


def make_pictures(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` pictures of assorted sizes and formats with some shapes on them (so PNG has work to do)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            box = (x0, y0, min(w, x0 + rng.randrange(20, w // 2)), min(h, y0 + rng.randrange(20, h // 2)))
            draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        path = folder / (f"pic{i:03d}.jpg" if i % 2 else f"pic{i:03d}.png")
        image.save(path, quality=92) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


def build_stand_in_tagger(folder: Path, side: int = 448, n_tags: int = 10861) -> tuple[Path, Path] | None:
    """A WD14-shaped ONNX model (input [N, side, side, 3], output [N, n_tags] scores) and its tag list."""
    try:
        import numpy as np
        from onnx import TensorProto, helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 2, (3, n_tags)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["m", "c255"], ["mn"]),
        helper.make_node("MatMul", ["mn", "w"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
    ]
    inits = [
        helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor("w", TensorProto.FLOAT, [3, n_tags], weights.flatten().tolist()),
    ]
    graph = helper.make_graph(
        nodes,
        "stand_in",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", side, side, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", n_tags])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    (folder / wd14.WD14_MODEL_FILE).write_bytes(model.SerializeToString())
    rows = ["tag_id,name,category,count"]
    rows += [f"{i},{'rating' if i < 4 else 'tag'}_{i},{9 if i < 4 else 0},1" for i in range(n_tags)]
    (folder / wd14.WD14_TAGS_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / wd14.WD14_MODEL_FILE, folder / wd14.WD14_TAGS_FILE


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_tagger(tagger: wd14.WD14Tagger, pictures: Sequence[Image.Image]) -> tuple[float, float]:
    """(images/s one at a time, images/s in batches), after one warm-up call that loads the model."""
    tagger(pictures[0])
    single = timed(lambda: [tagger(p) for p in pictures])
    batched = timed(lambda: tagger.tag_many(pictures))
    return len(pictures) / single, len(pictures) / batched


def run(n: int, models_dir: Path | None, repo: str) -> list[tuple[str, str]]:
    """The table's rows: (what was timed, how fast)."""
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="train_tools_bench_") as tmp:
        root = Path(tmp)
        make_pictures(root / "orig", n)
        options = PrepareOptions()
        first = timed(lambda: prepare_dataset(root / "orig", root / "prep", options))
        rows.append(("prepare_dataset, first run", f"{n / first:8.1f} images/s ({first:.2f} s)"))
        again = timed(lambda: prepare_dataset(root / "orig", root / "prep", options))
        rows.append(("prepare_dataset, rerun (nothing changed)", f"{n / again:8.1f} images/s ({again:.2f} s)"))
        prepared = [open_prepared(item) for item in load_items(root / "prep")]
        files = build_stand_in_tagger(root / "tagger")
        if files is None:
            rows.append(("WD14 stand-in tagger", "skipped (pip install onnx)"))
        else:
            single, batched = bench_tagger(wd14.WD14Tagger(*files), prepared)
            rows.append(("WD14 stand-in tagger, 448 px, 1 at a time", f"{single:8.1f} images/s"))
            rows.append(("WD14 stand-in tagger, 448 px, batches of 8", f"{batched:8.1f} images/s"))
        found = wd14.find_wd14(models_dir, repo) if models_dir is not None else None
        if found is not None:
            single, batched = bench_tagger(wd14.WD14Tagger(*found), prepared)
            rows.append((f"WD14 {repo}, 1 at a time", f"{single:8.1f} images/s"))
            rows.append((f"WD14 {repo}, batches of 8", f"{batched:8.1f} images/s"))
        else:
            rows.append((f"WD14 {repo}", "not found in the models folder (skipped)"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train_tools.bench.dataset", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("-n", "--images", type=int, default=48, help="pictures to generate (default 48)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="folder with train_tools/wd14/<model>/ or interrogators/ (a real tagger is timed when found there)",
    )
    parser.add_argument("--repo", default=wd14.DEFAULT_WD14_REPO, help="which WD14 model to look for")
    args = parser.parse_args(argv)
    write = sys.stdout.write
    n = max(1, args.images)
    header = (
        f"Train Tools dataset benchmark: {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {n} pictures\n"
    )
    write(header)
    rows = run(n, args.models_dir, args.repo)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        write(f"  {name:<{width}}  {value}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
