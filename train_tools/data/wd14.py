"""The WD14 tagger: booru tags from a SmilingWolf WD14 model (wd-v1-4-*-tagger-v2, wd-*-tagger-v3), run by
onnxruntime.

The model files are found on disk first (``<models>/train_tools/wd14/<repo name>/``, or the WebUI tagger
extension's ``<models>/interrogators/``) and downloaded once otherwise; offline, the error says where to put
them. onnxruntime is imported and the model loaded at the first picture. The tagger's ``repr`` names the model
and every setting that changes its answer (the manifest caches captions under it).
"""

from __future__ import annotations

import csv
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..errors import UserError
from ..progress import ProgressFn
from .hub_download import hf_download, may_download
from .pictures import on_white

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_WD14_REPO = "SmilingWolf/wd-v1-4-moat-tagger-v2"
WD14_MODEL_FILE = "model.onnx"
WD14_TAGS_FILE = "selected_tags.csv"
# selected_tags.csv categories.
GENERAL, CHARACTER, RATING = 0, 4, 9
# Tags of the WD14 vocabulary that are faces drawn with characters: their underscores are part of the face.
KAOMOJI = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)


@dataclass(frozen=True)
class TagInfo:
    name: str
    category: int


def read_tags_csv(path: Path) -> list[TagInfo]:
    """The tag vocabulary of a WD14 model, in model output order (columns tag_id, name, category, count)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(
            f"The tagger's tag list {path} could not be read ({exc}); download selected_tags.csv again."
        ) from None
    try:
        return [TagInfo(row["name"], int(row["category"])) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a WD14 tag list: it needs the columns tag_id, name, category, count.") from None


def tag_key(tag: str) -> str:
    """How tags are compared for exclusion: case and underscore-versus-space do not matter."""
    return " ".join(tag.replace("_", " ").lower().split())


def display_tag(name: str, underscores_to_spaces: bool) -> str:
    if underscores_to_spaces and name not in KAOMOJI:
        return name.replace("_", " ")
    return name


def parse_tag_list(text: str | Sequence[str] | None) -> list[str]:
    """A comma-separated string (or a list) of tags as a clean list."""
    parts = text.split(",") if isinstance(text, str) else list(text or [])
    return [" ".join(str(p).split()) for p in parts if str(p).strip()]


class WD14Tagger:
    """A SmilingWolf WD14 tagger (wd-v1-4-*-tagger-v2, wd-*-tagger-v3) run by onnxruntime.

    The model takes NHWC float32 BGR pixels in 0-255 of a square picture (white padding), with the side read
    from the model's input shape, and returns one sigmoid score per row of selected_tags.csv.
    """

    def __init__(
        self,
        model_path: Path,
        tags_csv: Path,
        *,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        include_rating: bool = False,
        underscores_to_spaces: bool = True,
        exclude: Sequence[str] | str = (),
        providers: Sequence[str] | None = None,
        batch_size: int = 8,
    ) -> None:
        self.model_path = Path(model_path)
        self.tags_csv = Path(tags_csv)
        for path in (self.model_path, self.tags_csv):
            if not path.is_file():
                raise UserError(
                    f"The tagger file {path} is missing; put the model's {WD14_MODEL_FILE} and "
                    f"{WD14_TAGS_FILE} in one folder."
                )
        self.tags = read_tags_csv(self.tags_csv)
        self.general_threshold = float(general_threshold)
        self.character_threshold = float(character_threshold)
        self.include_rating = bool(include_rating)
        self.underscores_to_spaces = bool(underscores_to_spaces)
        self.exclude = parse_tag_list(exclude)
        self._excluded = {tag_key(t) for t in self.exclude}
        self.providers = list(providers) if providers else None
        self.batch_size = max(1, int(batch_size))
        self._session: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # The manifest caches captions under this text: it must be stable across runs and name what matters.
        size = self.model_path.stat().st_size if self.model_path.is_file() else 0
        return (
            f"WD14Tagger({self.model_path.parent.name}/{self.model_path.name}:{size}, "
            f"general={self.general_threshold:g}, character={self.character_threshold:g}, "
            f"rating={self.include_rating}, spaces={self.underscores_to_spaces}, "
            f"exclude={sorted(self._excluded)})"
        )

    # ------------------------------------------------------------------ the model
    @property
    def session(self) -> Any:
        """The onnxruntime session, made on first use (one per tagger, shared by threads)."""
        with self._lock:
            if self._session is None:
                self._session = self._load()
            return self._session

    def _load(self) -> Any:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(
                "The WD14 tagger needs onnxruntime: run 'pip install onnxruntime' (or "
                "onnxruntime-gpu) in Train Tools' Python environment."
            ) from None
        providers = self.providers or preferred_providers(ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(self.model_path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad files
            raise UserError(
                f"The tagger model {self.model_path} could not be loaded ({exc}); download it again."
            ) from None
        outputs = session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags):
            raise UserError(
                f"The tagger model gives {outputs[-1]} scores but {self.tags_csv.name} lists "
                f"{len(self.tags)} tags: the two files belong to different models."
            )
        log.info("Loaded the tagger %s (%s)", self.model_path, ", ".join(session.get_providers()))
        return session

    @property
    def input_size(self) -> int:
        """The side of the square picture the model takes, from its input shape [batch, side, side, 3]."""
        shape = self.session.get_inputs()[0].shape
        side = shape[1] if len(shape) == 4 else None
        if not isinstance(side, int) or side <= 0:
            raise UserError(
                f"The tagger model {self.model_path.name} does not declare its input size; use a "
                "WD14 model (input [batch, side, side, 3])."
            )
        return side

    def _fixed_batch(self) -> int | None:
        first = self.session.get_inputs()[0].shape[0]
        return first if isinstance(first, int) and first > 0 else None

    # ------------------------------------------------------------------ pictures in, tags out
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """``image`` as the model's input row: flattened on white, padded to a white square, resized, BGR."""
        import numpy as np

        side = self.input_size
        rgb = on_white(image)
        w, h = rgb.size
        square = max(w, h)
        canvas = Image.new("RGB", (square, square), (255, 255, 255))
        canvas.paste(rgb, ((square - w) // 2, (square - h) // 2))
        if square != side:
            canvas = canvas.resize((side, side), Image.Resampling.BICUBIC)
        array = np.asarray(canvas, dtype=np.float32)
        return np.ascontiguousarray(array[:, :, ::-1])

    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One row of tag scores per picture."""
        import numpy as np

        session = self.session
        name = session.get_inputs()[0].name
        fixed = self._fixed_batch()
        chunk = fixed or self.batch_size
        rows: list[np.ndarray] = []
        for start in range(0, len(images), chunk):
            batch = [self.preprocess(im) for im in images[start : start + chunk]]
            n = len(batch)
            if fixed and n < fixed:
                batch += [batch[-1]] * (fixed - n)  # a model with a fixed batch size needs it full
            out = session.run(None, {name: np.stack(batch)})[0]
            rows.append(np.asarray(out, dtype=np.float32).reshape(len(batch), -1)[:n])
        if not rows:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        return np.concatenate(rows)

    def select(self, scores: Sequence[float]) -> list[tuple[str, float]]:
        """The tags a score row keeps, as (tag, score): the best rating first when asked for, then the
        character and general tags over their thresholds, most confident first; excluded tags left out."""
        chosen: list[tuple[str, float]] = []
        best_rating: tuple[str, float] | None = None
        for info, score in zip(self.tags, scores, strict=False):
            score = float(score)
            if info.category == RATING:
                if best_rating is None or score > best_rating[1]:
                    best_rating = (info.name, score)
                continue
            threshold = self.character_threshold if info.category == CHARACTER else self.general_threshold
            if score >= threshold:
                chosen.append((info.name, score))
        chosen.sort(key=lambda ts: (-ts[1], ts[0]))
        if self.include_rating and best_rating is not None:
            chosen.insert(0, best_rating)
        out = [(display_tag(name, self.underscores_to_spaces), score) for name, score in chosen]
        return [(tag, score) for tag, score in out if tag_key(tag) not in self._excluded]

    def tag_many(self, images: Sequence[Image.Image]) -> list[str]:
        """Captions of several pictures, run in batches (faster than one call per picture on a GPU)."""
        return [", ".join(tag for tag, _ in self.select(row)) for row in self.scores(list(images))]

    def __call__(self, image: Image.Image) -> str:
        return self.tag_many([image])[0]


def preferred_providers(available: Sequence[str]) -> list[str]:
    """CUDA (or DirectML / CoreML) when onnxruntime has it, always with the CPU as the fallback."""
    order = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
    return [p for p in order if p in available][:1] + ["CPUExecutionProvider"]


def find_wd14(models_dir: Path, repo: str = DEFAULT_WD14_REPO) -> tuple[Path, Path] | None:
    """(model.onnx, selected_tags.csv) of ``repo`` already on disk, or None.

    Looked for in ``<models>/train_tools/wd14/<repo name>/``, then where the WebUI tagger extension keeps
    them: ``<models>/interrogators/<repo name>/`` or its Hugging Face cache
    ``<models>/interrogators/models--<owner>--<name>/snapshots/<revision>/``.
    """
    models_dir = Path(models_dir)
    name = repo.rstrip("/").split("/")[-1]
    folders = [wd14_folder(models_dir, repo), models_dir / "interrogators" / name]
    snapshots = models_dir / "interrogators" / f"models--{repo.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir():
        folders += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in folders:
        model, tags = folder / WD14_MODEL_FILE, folder / WD14_TAGS_FILE
        if model.is_file() and tags.is_file():
            return model, tags
    return None


def wd14_folder(models_dir: Path, repo: str = DEFAULT_WD14_REPO) -> Path:
    """Where Train Tools keeps (and downloads) a WD14 model."""
    return Path(models_dir) / "train_tools" / "wd14" / repo.rstrip("/").split("/")[-1]


def ensure_wd14(
    models_dir: Path,
    repo: str = DEFAULT_WD14_REPO,
    *,
    allow_download: bool | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Path, Path]:
    """The model files of ``repo``: found on disk, or downloaded once into ``wd14_folder``."""
    found = find_wd14(models_dir, repo)
    if found is not None:
        return found
    folder = wd14_folder(models_dir, repo)
    if not may_download(allow_download):
        raise UserError(
            f"The WD14 tagger is not downloaded and downloads are off: put {WD14_MODEL_FILE} and "
            f"{WD14_TAGS_FILE} of https://huggingface.co/{repo} in {folder}."
        )
    log.info("Downloading the WD14 tagger %s into %s", repo, folder)
    paths = [hf_download(repo, filename, folder, progress) for filename in (WD14_TAGS_FILE, WD14_MODEL_FILE)]
    return paths[1], paths[0]
