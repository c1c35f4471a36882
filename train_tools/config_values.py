"""Values as people type them, turned into settings: ``key=value`` pairs from the command line, strings and
numbers from JSON or the tab coerced to each field's type, and the sentences that say what is wrong with one.
``config.py`` holds the settings themselves."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import field
from typing import Any, TypeVar, get_type_hints

from .errors import UserError
from .names import MAX_COMPONENT_BYTES, check_name

# What picking a network type in the tab sets (the command line sets only what it is told). LoRA: the tab's own
# defaults (the original Train Tools'). The others: values within the ranges LyCORIS' guidelines give (LoCon dim
# and conv dim up to 64, LoHa dim up to 32 since its rank is squared, LoKr a factor of 4 to 16, alpha 1 to half
# the dim), DoRA at LoCon's dims (it trains a LoRA pair plus a magnitude).
NETWORK_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"network_dim": 128, "network_alpha": 64.0, "conv_dim": 0, "conv_alpha": 1.0, "lokr_factor": -1},
    "locon": {"network_dim": 32, "network_alpha": 16.0, "conv_dim": 16, "conv_alpha": 8.0, "lokr_factor": -1},
    "loha": {"network_dim": 16, "network_alpha": 8.0, "conv_dim": 8, "conv_alpha": 4.0, "lokr_factor": -1},
    "lokr": {"network_dim": 16, "network_alpha": 8.0, "conv_dim": 0, "conv_alpha": 1.0, "lokr_factor": 8},
    "dora": {"network_dim": 32, "network_alpha": 16.0, "conv_dim": 0, "conv_alpha": 1.0, "lokr_factor": -1},
}


def coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn ``value`` (possibly a string from the command line or JSON) into ``typ``, or raise a UserError."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(str(value).strip())
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            result = float(str(value).strip()) if isinstance(value, str) else float(value)
            if not math.isfinite(result):
                raise ValueError(value)
            return result
        if typ is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[typ]
        raise UserError(f"Setting '{key}' must be {kind}; got {value!r}.") from None
    raise UserError(f"Setting '{key}' has an unsupported type.")


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Parse ``key=value`` strings from the command line."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"'{pair}' is not key=value; write for example --set epochs=10.")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def unknown_key_message(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown setting '{key}'.{hint} Run 'python -m train_tools train --help' to list the settings."


def is_hex_colour(value: str) -> bool:
    digits = value[1:] if value.startswith("#") else ""
    return len(digits) in (3, 6) and all(c in "0123456789abcdefABCDEF" for c in digits)


def setting_field(
    default: Any,
    label: str,
    help: str,
    *,
    ss: str | None = None,
    choices: tuple[str, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    advanced: bool = False,
) -> Any:
    """A settings field: its default plus what the UI, the CLI and the file metadata need to know of it.

    ``ss`` names the key the value is written under in the LoRA file's metadata (the kohya ``ss_*`` names
    that WebUIs and model sites read).
    """
    meta = {"label": label, "help": help, "ss": ss, "choices": choices, "min": min, "max": max, "advanced": advanced}
    return field(default=default, metadata=meta)


def check_fields(config: Any) -> None:
    """Coerce every field of a settings dataclass to its type, in place, and check its choices and range."""
    types = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = coerce(f.name, types[f.name], getattr(config, f.name))
        setattr(config, f.name, value)
        meta = f.metadata
        if meta["choices"] is not None and value not in meta["choices"]:
            raise UserError(f"Setting '{f.name}' must be one of {', '.join(meta['choices'])}; got '{value}'.")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if meta["min"] is not None and value < meta["min"]:
                raise UserError(f"Setting '{f.name}' must be at least {meta['min']:g}; got {value:g}.")
            if meta["max"] is not None and value > meta["max"]:
                raise UserError(f"Setting '{f.name}' must be at most {meta['max']:g}; got {value:g}.")


def ss_strings(config: Any) -> dict[str, str]:
    """The settings as the LoRA file's ``ss_*`` metadata strings (kohya's names and spellings): ``str(value)``
    of every field that names a key, the resolution as kohya's ``(w, h)``, unset learning rates as the rate."""
    out = {f.metadata["ss"]: str(getattr(config, f.name)) for f in dataclasses.fields(config) if f.metadata["ss"]}
    out["ss_resolution"] = f"({config.resolution}, {config.resolution})"
    for name in ("unet_lr", "text_encoder_lr"):
        if not getattr(config, name):
            out[f"ss_{name}"] = str(config.learning_rate)
    return out


def checked_values(cls: Any, data: Any) -> dict[str, Any]:
    """The values of a settings dict coerced to ``cls``'s field types; unknown keys and bad values raise a
    UserError naming the key."""
    if not isinstance(data, dict):
        raise UserError("Settings must be a JSON object of key: value pairs.")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise UserError(unknown_key_message(key, known))
    types = get_type_hints(cls)
    return {key: coerce(key, types[key], value) for key, value in data.items()}


# The arguments each optimizer takes besides the learning rate (their constructors'), by the tab's names: a
# setting's `optimizer_args` may set these and no others, so that a typo is refused before a run starts.
OPTIMIZER_ARG_NAMES: dict[str, tuple[str, ...]] = {
    "AdamW": ("weight_decay", "betas", "eps", "amsgrad"),
    "SGDNesterov": ("momentum", "weight_decay", "dampening"),
    "Lion": ("weight_decay", "betas"),
    "Prodigy": (
        "weight_decay",
        "betas",
        "beta3",
        "eps",
        "d_coef",
        "d0",
        "growth_rate",
        "decouple",
        "use_bias_correction",
        "safeguard_warmup",
    ),
    "AdaFactor": (
        "eps",
        "clip_threshold",
        "decay_rate",
        "beta1",
        "weight_decay",
        "scale_parameter",
        "relative_step",
        "warmup_init",
    ),
    "AdamW8bit": ("weight_decay", "betas", "eps"),
    "Lion8bit": ("weight_decay", "betas"),
}


def optimizer_arguments(text: str, optimizer: str) -> dict[str, Any]:
    """``key=value`` pairs, apart by spaces, as kohya's ``--optimizer_args`` takes them: numbers, ``True`` /
    ``False``, ``None``, and comma lists (``betas=0.9,0.99``) as tuples. Refused with a sentence: a pair
    without ``=``, a value that is none of these, a name ``optimizer`` does not take."""
    allowed = OPTIMIZER_ARG_NAMES.get(optimizer, ())
    found: dict[str, Any] = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise UserError(
                f"Setting 'optimizer_args': write each argument as name=value, like weight_decay=0.1; got '{pair}'."
            )
        if key not in allowed:
            raise UserError(
                f"Setting 'optimizer_args': {optimizer} takes no argument '{key}'; it takes "
                f"{', '.join(allowed) or 'none'}."
            )
        parts = [_argument_value(key, part) for part in value.split(",")]
        found[key] = tuple(parts) if "," in value else parts[0]
    return found


def _argument_value(key: str, text: str) -> Any:
    named = {"True": True, "true": True, "False": False, "false": False, "None": None}
    if text in named:
        return named[text]
    try:
        number = float(text)
    except ValueError:
        raise UserError(f"Setting 'optimizer_args': '{key}' must be a number, True or False; got '{text}'.") from None
    if not math.isfinite(number):
        raise UserError(f"Setting 'optimizer_args': '{key}' must be a finite number; got '{text}'.")
    return int(number) if text.lstrip("+-").isdigit() else number


BLOCKS_PER_SIDE = 12  # kohya's NUM_OF_BLOCKS: input and output blocks of a UNet (networks/blocks.py)
BLOCK_COUNT = 2 * BLOCKS_PER_SIDE + 1  # the numbers of a block_dims list: the input blocks, the middle, the output


def block_weights(down: str, mid: str, up: str) -> dict[str, list[float]] | None:
    """The settings' weight lists, parsed (None when none is set: every block at the UNet's learning rate).
    Refused with a sentence: a list of another length than 12 (one number for mid), a number below 0."""
    if not (down.strip() or mid.strip() or up.strip()):
        return None
    return {
        "down": _numbers(down, "down_lr_weight", BLOCKS_PER_SIDE),
        "mid": _numbers(mid, "mid_lr_weight", 1),
        "up": _numbers(up, "up_lr_weight", BLOCKS_PER_SIDE),
    }


def block_values(text: str, name: str) -> list[float] | None:
    """A per-block list of kohya's ``block_dims`` / ``block_alphas`` form: 25 numbers (IN00-IN11, MID,
    OUT00-OUT11), None when empty."""
    return _numbers(text, name, BLOCK_COUNT) if text.strip() else None


def _numbers(text: str, name: str, count: int) -> list[float]:
    if not text.strip():
        return [1.0] * count
    try:
        values = [float(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        raise UserError(f"Setting '{name}' must be numbers apart by commas, like 1,1,0.5; got '{text}'.") from None
    if len(values) != count:
        many = "one number" if count == 1 else f"{count} numbers (one per block, as kohya writes it)"
        raise UserError(f"Setting '{name}' takes {many}; got {len(values)}.")
    if any(not 0.0 <= v <= 100.0 for v in values):
        raise UserError(f"Setting '{name}': each weight must lie in 0-100; got '{text}'.")
    return values


def check_rules(config: Any) -> None:
    """The rules between settings and on values that a type and range cannot say (``TrainConfig.validate``)."""
    if config.min_bucket_reso > config.max_bucket_reso:
        raise UserError("Setting 'min_bucket_reso' must not be larger than 'max_bucket_reso'.")
    if not is_hex_colour(config.background_color):
        raise UserError(f"Setting 'background_color' must be a colour like #ffffff; got '{config.background_color}'.")
    if config.min_timestep >= config.max_timestep:
        raise UserError("Setting 'min_timestep' must be below 'max_timestep'.")
    optimizer_arguments(config.optimizer_args, config.optimizer)
    blocks = block_weights(config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight)
    if config.loraplus_lr_ratio and config.network_type in ("loha", "lokr"):
        raise UserError(
            "LoRA+ (setting 'loraplus_lr_ratio') speeds up the up matrices of LoRA, LoCon and DoRA; "
            f"{config.network_type} has none: set it to 0 or choose one of those network types."
        )
    if config.optimizer == "Prodigy" and (config.loraplus_lr_ratio or blocks):
        raise UserError(
            "Prodigy takes one learning rate for all weights: set 'loraplus_lr_ratio' to 0 and the block LR "
            "weights empty, or choose another optimizer."
        )
    dims, conv_dims = (
        block_values(config.block_dims, "block_dims"),
        block_values(config.conv_block_dims, "conv_block_dims"),
    )
    for values, name in ((dims, "block_dims"), (conv_dims, "conv_block_dims")):
        if values is not None and any(v != int(v) for v in values):
            raise UserError(f"Setting '{name}' takes whole numbers (a dim per block; 0 = no network there).")
    for alphas, given, name in (
        (config.block_alphas, dims, "block_alphas"),
        (config.conv_block_alphas, conv_dims, "conv_block_alphas"),
    ):
        if alphas.strip() and given is None:
            raise UserError(f"Setting '{name}' needs '{name.replace('alphas', 'dims')}' beside it.")
        block_values(alphas, name)
    if conv_dims is not None and config.conv_rank() is None:
        raise UserError("Setting 'conv_block_dims' needs the convolutions on: set 'conv_dim' or choose LoCon.")
    if config.lokr_factor in (0, 1):
        raise UserError("Setting 'lokr_factor' must be -1 (as square as possible) or at least 2.")
    if config.max_token_length not in (75, 150, 225):
        raise UserError("Setting 'max_token_length' must be 75, 150 or 225.")
    if config.network_weights.strip():  # a file name in the LoRA folder, never a path
        config.network_weights = check_name(
            config.network_weights.strip(), "LoRA to start from (setting 'network_weights')"
        )
    if not config.output_name.strip():
        config.output_name = ""
    else:
        # The one setting that becomes a file name; how long it may be depends on the version's folder
        # (``Version.check_settings``).
        config.output_name = check_name(
            config.output_name, "output name (setting 'output_name')", max_bytes=MAX_COMPONENT_BYTES
        )


_S = TypeVar("_S", bound="SettingsIO")


class SettingsIO:
    """What a settings dataclass (``TrainConfig``) does with its values: build one from a dict (validated),
    copy it with changes, check it, and give it back as a dict, JSON and the file's ``ss_*`` strings."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls: type[_S], data: dict[str, Any]) -> _S:
        """Build and validate settings; unknown keys and bad values raise a UserError naming the key."""
        config = cls(**checked_values(cls, data))
        config.validate()
        return config

    def updated(self: _S, changes: dict[str, Any]) -> _S:
        """A copy with ``changes`` applied and validated (values may be strings, as typed on a command line)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        check_fields(self)
        check_rules(self)

    def ss_metadata(self) -> dict[str, str]:
        """The settings as the LoRA file's ``ss_*`` metadata strings (kohya's names and spellings)."""
        return ss_strings(self)
