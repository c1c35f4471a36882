"""Automatic captioners: a WD14 tagger (booru tags, run by onnxruntime) and BLIP (one sentence, transformers).

``prepare_dataset(..., auto_caption=captioner)`` calls a captioner once per picture and caches its answer in
the manifest under the captioner's ``repr``; the ``repr`` of the classes here names the model and every
setting that changes the answer, so changing a threshold re-captions and nothing else does.

Models are found on disk first (``<models>/train_tools/wd14/<repo name>/``, or the WebUI tagger extension's
``<models>/interrogators/``) and downloaded once otherwise; offline, the error says where to put the files.
Heavy imports (onnxruntime, transformers) and model loading wait for the first picture, so a captioner whose
answers are all cached costs nothing.
"""

from __future__ import annotations

import csv
import inspect
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..errors import UserError
from ..progress import ProgressFn

if TYPE_CHECKING:
    import numpy as np

    from ..config import TrainConfig

log = logging.getLogger(__name__)

Captioner = Callable[[Image.Image], str]

DEFAULT_WD14_REPO = "SmilingWolf/wd-v1-4-moat-tagger-v2"
DEFAULT_BLIP_REPO = "Salesforce/blip-image-captioning-base"
WD14_MODEL_FILE = "model.onnx"
WD14_TAGS_FILE = "selected_tags.csv"
# selected_tags.csv categories.
GENERAL, CHARACTER, RATING = 0, 4, 9
# Tags of the WD14 vocabulary that are faces drawn with characters: their underscores are part of the face.
KAOMOJI = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
                     ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})
KINDS = ("none", "wd14", "blip")


# ====================================================================== WD14

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
        raise UserError(f"The tagger's tag list {path} could not be read ({exc}); download selected_tags.csv "
                        "again.") from None
    try:
        return [TagInfo(row["name"], int(row["category"])) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a WD14 tag list: it needs the columns tag_id, name, category, count."
                        ) from None


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

    def __init__(self, model_path: Path, tags_csv: Path, *, general_threshold: float = 0.35,
                 character_threshold: float = 0.85, include_rating: bool = False,
                 underscores_to_spaces: bool = True, exclude: Sequence[str] | str = (),
                 providers: Sequence[str] | None = None, batch_size: int = 8) -> None:
        self.model_path = Path(model_path)
        self.tags_csv = Path(tags_csv)
        for path in (self.model_path, self.tags_csv):
            if not path.is_file():
                raise UserError(f"The tagger file {path} is missing; put the model's {WD14_MODEL_FILE} and "
                                f"{WD14_TAGS_FILE} in one folder.")
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
        return (f"WD14Tagger({self.model_path.parent.name}/{self.model_path.name}:{size}, "
                f"general={self.general_threshold:g}, character={self.character_threshold:g}, "
                f"rating={self.include_rating}, spaces={self.underscores_to_spaces}, "
                f"exclude={sorted(self._excluded)})")

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
            raise UserError("The WD14 tagger needs onnxruntime: run 'pip install onnxruntime' (or "
                            "onnxruntime-gpu) in Train Tools' Python environment.") from None
        providers = self.providers or preferred_providers(ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(self.model_path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad files
            raise UserError(f"The tagger model {self.model_path} could not be loaded ({exc}); download it "
                            "again.") from None
        outputs = session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags):
            raise UserError(f"The tagger model gives {outputs[-1]} scores but {self.tags_csv.name} lists "
                            f"{len(self.tags)} tags: the two files belong to different models.")
        log.info("Loaded the tagger %s (%s)", self.model_path, ", ".join(session.get_providers()))
        return session

    @property
    def input_size(self) -> int:
        """The side of the square picture the model takes, from its input shape [batch, side, side, 3]."""
        shape = self.session.get_inputs()[0].shape
        side = shape[1] if len(shape) == 4 else None
        if not isinstance(side, int) or side <= 0:
            raise UserError(f"The tagger model {self.model_path.name} does not declare its input size; use a "
                            "WD14 model (input [batch, side, side, 3]).")
        return side

    def _fixed_batch(self) -> int | None:
        first = self.session.get_inputs()[0].shape[0]
        return first if isinstance(first, int) and first > 0 else None

    # ------------------------------------------------------------------ pictures in, tags out
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """``image`` as the model's input row: flattened on white, padded to a white square, resized, BGR."""
        import numpy as np

        side = self.input_size
        rgb = _on_white(image)
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
            batch = [self.preprocess(im) for im in images[start:start + chunk]]
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
        for info, score in zip(self.tags, scores):
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


def _on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency flattened onto white (what the tagger was trained on)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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


def ensure_wd14(models_dir: Path, repo: str = DEFAULT_WD14_REPO, *, allow_download: bool | None = None,
                progress: ProgressFn | None = None) -> tuple[Path, Path]:
    """The model files of ``repo``: found on disk, or downloaded once into ``wd14_folder``."""
    found = find_wd14(models_dir, repo)
    if found is not None:
        return found
    folder = wd14_folder(models_dir, repo)
    if not _may_download(allow_download):
        raise UserError(f"The WD14 tagger is not downloaded and downloads are off: put {WD14_MODEL_FILE} and "
                        f"{WD14_TAGS_FILE} of https://huggingface.co/{repo} in {folder}.")
    log.info("Downloading the WD14 tagger %s into %s", repo, folder)
    paths = [_hf_download(repo, filename, folder, progress) for filename in (WD14_TAGS_FILE, WD14_MODEL_FILE)]
    return paths[1], paths[0]


# ====================================================================== BLIP

class BlipCaptioner:
    """A BLIP captioning model (``BlipForConditionalGeneration``) writing one short sentence per picture."""

    def __init__(self, model_dir_or_repo: str | Path = DEFAULT_BLIP_REPO, *, device: str | None = None,
                 models_dir: Path | None = None, allow_download: bool | None = None,
                 progress: ProgressFn | None = None, max_new_tokens: int = 40, prompt: str = "") -> None:
        self.source = str(model_dir_or_repo)
        self.folder = resolve_blip(model_dir_or_repo, models_dir=models_dir, allow_download=allow_download,
                                   progress=progress)
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BlipCaptioner({self.folder.name}, max_new_tokens={self.max_new_tokens}, prompt={self.prompt!r})"

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                import torch
                from transformers import BlipForConditionalGeneration, BlipProcessor

                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
                try:
                    processor = BlipProcessor.from_pretrained(str(self.folder))
                    model = BlipForConditionalGeneration.from_pretrained(str(self.folder), torch_dtype=dtype)
                except (OSError, ValueError) as exc:
                    raise UserError(f"The BLIP model in {self.folder} could not be loaded ({exc}); download it "
                                    "again.") from None
                self._model, self._processor = model.to(device).eval(), processor
                self.device = str(device)
                log.info("Loaded the BLIP captioner %s on %s", self.folder, device)
            return self._model, self._processor

    def caption_many(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        model, processor = self._load()
        rgb = [_on_white(im) for im in images]
        kwargs: dict[str, Any] = {"images": rgb, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(rgb)
        inputs = processor(**kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [" ".join(processor.decode(row, skip_special_tokens=True).split()) for row in ids]

    def __call__(self, image: Image.Image) -> str:
        return self.caption_many([image])[0]


def blip_folder(models_dir: Path, repo: str = DEFAULT_BLIP_REPO) -> Path:
    """Where Train Tools keeps (and downloads) a BLIP model."""
    return Path(models_dir) / "train_tools" / "blip" / repo.rstrip("/").split("/")[-1]


def resolve_blip(model_dir_or_repo: str | Path, *, models_dir: Path | None = None,
                 allow_download: bool | None = None, progress: ProgressFn | None = None) -> Path:
    """A local folder holding the BLIP model: the folder given, the copy under ``models_dir``, or a download."""
    given = Path(str(model_dir_or_repo)).expanduser()
    if (given / "config.json").is_file():
        return given
    repo = str(model_dir_or_repo)
    if given.is_absolute() or given.exists() or repo.count("/") != 1:
        raise UserError(f"'{repo}' is neither a BLIP model folder (with config.json) nor a Hugging Face model "
                        "name like Salesforce/blip-image-captioning-base.")
    base = Path(models_dir) if models_dir is not None else Path.home() / ".cache" / "train_tools" / "models"
    folder = blip_folder(base, repo)
    if (folder / "config.json").is_file():
        return folder
    if not _may_download(allow_download):
        raise UserError(f"The BLIP model {repo} is not downloaded and downloads are off: put the files of "
                        f"https://huggingface.co/{repo} (config.json, the weights, the processor files) in "
                        f"{folder}.")
    log.info("Downloading the BLIP model %s into %s", repo, folder)
    for filename in _blip_files(repo):
        _hf_download(repo, filename, folder, progress)
    return folder


def _blip_files(repo: str) -> list[str]:
    """The files a BLIP repository needs: configs, tokenizer and one copy of the weights (safetensors if any)."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(repo)
    except Exception as exc:  # noqa: BLE001 - network and hub errors have many types; all mean "not now"
        raise UserError(f"The BLIP model {repo} could not be listed ({type(exc).__name__}: {exc}); check the "
                        "internet connection and the name.") from None
    wanted = [f for f in files if "/" not in f and f.endswith((".json", ".txt"))]
    weights = "model.safetensors" if "model.safetensors" in files else "pytorch_model.bin"
    if weights not in files:
        raise UserError(f"{repo} holds no model weights (model.safetensors or pytorch_model.bin).")
    return [*wanted, weights]


# ====================================================================== downloads

def _may_download(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return allow_download
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def _progress_tqdm(progress: ProgressFn) -> type:
    """A tqdm class that reports (bytes done, bytes total) to ``progress`` as a download goes."""
    from tqdm.auto import tqdm

    class _Reporting(tqdm):  # type: ignore[misc, valid-type]
        # Counted here, not read from tqdm's ``n``: a bar made with disable=True (the hub's quiet mode) keeps
        # no count.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._bytes_done = int(kwargs.get("initial") or 0)
            self._bytes_total = int(kwargs.get("total") or 0)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            self._bytes_done += int(n or 0)
            progress(self._bytes_done, max(self._bytes_total, int(self.total or 0), self._bytes_done))
            return shown

    return _Reporting


def _hf_download(repo: str, filename: str, folder: Path, progress: ProgressFn | None) -> Path:
    """One file of a Hugging Face repository into ``folder`` (plain files, no cache links)."""
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = {"local_dir": str(folder)}
    if progress is not None and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = _progress_tqdm(progress)
    try:
        return Path(hf_hub_download(repo, filename, **kwargs))
    except Exception as exc:  # noqa: BLE001 - network and hub errors have many types; all mean "not now"
        raise UserError(f"Downloading {filename} of {repo} failed ({type(exc).__name__}: {exc}); check the "
                        f"internet connection, or put the file in {folder} yourself.") from None


# ====================================================================== choosing one

def make_captioner(kind: str, *, models_dir: Path, host: Any = None, **options: Any) -> Captioner | None:
    """The captioner of ``kind`` ("none", "wd14", "blip", or one the host offers such as "deepbooru").

    A host (``train_tools.hosts.base.Host``) whose ``captioner(kind)`` returns a callable supplies it instead: the
    WebUI's own BLIP and DeepBooru interrogators are already downloaded and share the GPU politely.
    Options: for wd14 ``repo``, ``general_threshold``, ``character_threshold``, ``include_rating``,
    ``exclude``, ``underscores_to_spaces``, ``providers``, ``device`` ("cpu" keeps it off the GPU); for blip
    ``model`` (a folder or repository),
    ``device``, ``max_new_tokens``, ``prompt``; for both ``allow_download`` and ``progress`` (bytes, total).
    """
    kind = (kind or "none").strip().lower()
    if kind == "none":
        return None
    provided = getattr(host, "captioner", None)
    hosted = provided(kind) if callable(provided) else None
    if hosted is not None:
        return hosted
    download = {"allow_download": options.pop("allow_download", None), "progress": options.pop("progress", None)}
    if kind == "wd14":
        device = str(options.pop("device", "") or "")
        if device.startswith("cpu") and not options.get("providers"):
            options["providers"] = ["CPUExecutionProvider"]
        model, tags = ensure_wd14(models_dir, options.pop("repo", DEFAULT_WD14_REPO), **download)
        return WD14Tagger(model, tags, **options)
    if kind == "blip":
        return BlipCaptioner(options.pop("model", DEFAULT_BLIP_REPO), models_dir=models_dir, **download, **options)
    if kind == "deepbooru":
        raise UserError("The DeepBooru captioner is the WebUI's own: it works in the Train Tools tab inside the "
                        "WebUI. Here, choose wd14 (booru tags like DeepBooru's) or blip.")
    raise UserError(f"Automatic captioner must be one of {', '.join(KINDS)}; got '{kind}'.")


def captioner_from_config(config: TrainConfig, *, models_dir: Path, host: Any = None,
                          progress: ProgressFn | None = None, **options: Any) -> Captioner | None:
    """``make_captioner`` with the settings of a training config (the ``captioner`` and ``tagger_*`` fields)."""
    if config.captioner == "wd14":
        options = {"general_threshold": config.tagger_general_threshold,
                   "character_threshold": config.tagger_character_threshold,
                   "include_rating": config.tagger_include_rating, "exclude": config.tagger_exclude, **options}
    return make_captioner(config.captioner, models_dir=models_dir, host=host, progress=progress, **options)
