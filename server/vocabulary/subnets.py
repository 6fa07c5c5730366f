"""The subnet table: which MatFormer subnets a deployment offers, checked against a checkpoint.

Owns: parsing Google's official table (`configs/subnets/gemma3n-e4b.csv`) without `eval`, parsing
the custom subnets (`configs/subnets/custom.yaml`), scaling the table's E4B widths to the
checkpoint at hand, every validity rule a subnet must meet, the effective parameter count as
Google's table defines it, the KV layout key (subnets with equal keys write identical KV), and
each subnet's quality score, which tiers' floors and ceilings and the policies compare: the
checkpoint's measured held-out quality when it has one (server/vocabulary/measured_quality.py),
else the table's MMLU, else a stand-in interpolated by parameter count. `SubnetTable` is the one
place that decides.

Deliberately does not know: tensors, devices, latency or memory. It works from the shapes in
`TextConfig` alone, so it is plain Python (no torch) and the policies and tests can use it freely.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from server.vocabulary.measured_quality import MeasuredQuality, MeasuredSubnet
from server.vocabulary.text_config import TextConfig

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_TABLE_CSV = _REPO / "configs" / "subnets" / "gemma3n-e4b.csv"
DEFAULT_CUSTOM_YAML = _REPO / "configs" / "subnets" / "custom.yaml"

# The official table describes the real E4B: 35 layers, FFN 16384, KV producers 18 and 19.
E4B_LAYERS = 35
E4B_FULL_WIDTH = 16384
E4B_KV_PRODUCERS = (18, 19)

_SLUG = re.compile(r"[a-z0-9._-]+")
_NUMBER = r"\d+(?:_\d+)*"  # a Python int literal with optional underscores: 2_048
_FFN_ITEM = re.compile(rf"\s*({_NUMBER})\s*(?:\*\s*({_NUMBER})\s*)?")
_SIZE = re.compile(r"\bE(\d+(?:\.\d+)?)B\b", re.IGNORECASE)
_LEVEL = re.compile(r"\((\w+)-level\)", re.IGNORECASE)
_CSV_COLUMNS = (
    "name",
    "# Layers",
    "# Effective Params (B)",
    "MMLU PT accuracy",
    "FFN Hidden Dims",
    "Layers Skipped",
)
_CUSTOM_KEYS = {
    "name",
    "title",
    "description",
    "keep_layers",
    "skip_layers",
    "widths",
    "overrides",
    "quality",
}


class SubnetError(ValueError):
    """A subnet, or a table of them, that breaks a rule; the message names both."""


@dataclass(frozen=True)
class Subnet:
    name: str  # slug used on the API and CLI
    title: str  # human name; the CSV's name for official rows
    layers: tuple[int, ...]  # kept layers, original indices, ascending
    widths: tuple[int, ...]  # FFN width of each kept layer, in this checkpoint's units
    official: bool
    quality: float | None  # MMLU PT accuracy in percent; None when unknown
    table_params_b: float | None  # the official table's stated effective params (B)
    effective_params: int
    kv_key: str
    kv_layers: tuple[int, ...]  # kept layers that own a KV cache

    def width_of(self, layer: int) -> int | None:
        return self.widths[self.layers.index(layer)] if layer in self.layers else None

    def keeps(self, layer: int) -> bool:
        return layer in self.layers

    def skipped(self, num_layers: int) -> tuple[int, ...]:
        return tuple(i for i in range(num_layers) if i not in self.layers)


@dataclass(frozen=True)
class OfficialRow:
    """One row of the official table, in E4B units (widths of up to 16384, 35 layers)."""

    title: str  # the CSV's name, verbatim
    name: str  # slug derived from the title
    layers: tuple[int, ...]  # kept E4B layers
    widths: tuple[int, ...]
    params_b: float
    quality: float


class SubnetTable:
    """The subnets a deployment offers, in order: "full" first, official rows, custom ones."""

    def __init__(
        self,
        subnets: Sequence[Subnet],
        notes: Sequence[str] = (),
        measured: MeasuredQuality | None = None,
    ) -> None:
        self._by_name: dict[str, Subnet] = {}
        for s in subnets:
            if s.name in self._by_name:
                other = "an official" if self._by_name[s.name].official else "a custom"
                raise SubnetError(
                    f"subnet {s.name!r}: name already used by {other} subnet "
                    "(names must be unique; official and custom subnets cannot share one)"
                )
            self._by_name[s.name] = s
        if "full" not in self._by_name:
            raise SubnetError("subnet 'full': missing; every subnet table has one")
        notes = list(notes)
        # The measurement of each subnet, where the checkpoint has one that matches it.
        self.measured: dict[str, MeasuredSubnet] = {}
        if measured is not None:
            for s in subnets:
                m = measured.for_subnet(s.name, s.layers, s.widths)
                if m is not None:
                    self.measured[s.name] = m
            stale = [s.name for s in subnets if s.name not in self.measured]
            notes.append(
                f"quality: measured held-out perplexity ({measured.path.name}, "
                f"{measured.tokens} tokens; score = 100 / perplexity)"
                + (f"; not measured, interpolated: {', '.join(stale)}" if stale else "")
            )
        self.notes: tuple[str, ...] = tuple(notes)
        # Quality score per subnet (what tiers' floors and ceilings and the policies compare):
        # measured where measured; with a measurement, the rest interpolate between measured
        # subnets (never mixing MMLU into a perplexity scale); else the table's MMLU.
        if measured is not None:
            given = [
                (s.name, self.measured[s.name].score if s.name in self.measured else None)
                for s in subnets
            ]
        else:
            given = [(s.name, s.quality) for s in subnets]
        params = {s.name: s.effective_params for s in subnets}
        self.scores: dict[str, float] = quality_scores([(n, q, params[n]) for n, q in given])
        self.quality_source = "measured" if measured is not None else "table"

    @property
    def full(self) -> Subnet:
        return self._by_name["full"]

    def get(self, name: str) -> Subnet:
        if name not in self._by_name:
            known = ", ".join(self._by_name)
            raise SubnetError(f"subnet {name!r}: unknown; known subnets: {known}")
        return self._by_name[name]

    __getitem__ = get

    def __iter__(self) -> Iterator[Subnet]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)


# ---- facts computed from shapes ---------------------------------------------------------------


def quality_scores(subnets: list[tuple[str, float | None, int]]) -> dict[str, float]:
    """Quality per subnet: the table's score where it has one; otherwise a stand-in from the
    effective parameter count, interpolated between the scored subnets (clamped at the ends)."""
    scored = sorted((p, q) for _, q, p in subnets if q is not None)
    out = {}
    for name, q, p in subnets:
        if q is not None:
            out[name] = q
        elif not scored:
            out[name] = p / 1e9  # no scores at all: bigger is better
        elif p <= scored[0][0]:
            out[name] = scored[0][1]
        elif p >= scored[-1][0]:
            out[name] = scored[-1][1]
        else:
            for (p0, q0), (p1, q1) in itertools.pairwise(scored):
                if p0 <= p <= p1:
                    out[name] = q0 + (q1 - q0) * (p - p0) / max(1, p1 - p0)
                    break
    return out


def effective_params(text: TextConfig, layers: Sequence[int], widths: Sequence[int]) -> int:
    """Parameters of the subnet's MatFormer Lab export, less `embed_tokens` and the PLE table.

    The export keeps consumer layers' dead k/v tensors and drops the skipped layers' rows of
    `per_layer_model_projection`; counting the same way is what reproduces Google's numbers.
    """
    total = 0
    for layer, width in zip(layers, widths, strict=True):
        shapes = text.layer_tensor_shapes(layer, width) | text.dead_kv_tensor_shapes(layer)
        total += sum(math.prod(s) for s in shapes.values())
    excluded = ("embed_tokens.weight", "embed_tokens_per_layer.weight")
    for key, shape in text.global_tensor_shapes().items():
        if key == "per_layer_model_projection.weight":
            total += len(layers) * text.hidden_size_per_layer_input * text.hidden_size
        elif key not in excluded:
            total += math.prod(shape)
    return total


def kv_layout_key(text: TextConfig, layers: Sequence[int], widths: Sequence[int]) -> str:
    """Equal for two subnets iff their KV-owning layers and those layers' widths are equal:
    the K/V a layer writes depends on every layer below it, and consumers write none."""
    owned = [f"{i}:{w}" for i, w in zip(layers, widths, strict=True) if text.owns_kv(i)]
    return "kv-" + hashlib.sha256(",".join(owned).encode()).hexdigest()[:8]


# ---- building and validating one subnet -------------------------------------------------------


def _check_layers(text: TextConfig, name: str, layers: Sequence[Any], what: str) -> list[int]:
    n = text.num_hidden_layers
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise SubnetError(f"subnet {name!r}: {what} must be integers, got {layer!r}")
        if not 0 <= layer < n:
            raise SubnetError(f"subnet {name!r}: {what}: layer {layer} is out of range [0, {n})")
    dups = sorted({layer for layer in layers if layers.count(layer) > 1})
    if dups:
        raise SubnetError(f"subnet {name!r}: {what} lists layers more than once: {dups}")
    return list(layers)


def make_subnet(
    text: TextConfig,
    name: str,
    layers: Sequence[int],
    widths: Sequence[int],
    *,
    title: str | None = None,
    official: bool = False,
    quality: float | None = None,
    table_params_b: float | None = None,
) -> Subnet:
    """Check every rule a subnet must meet on this checkpoint and compute its derived facts."""
    if not isinstance(name, str) or not _SLUG.fullmatch(name):
        raise SubnetError(
            f"subnet {name!r}: invalid name; use lowercase letters, digits, '.', '-' and '_'"
        )
    if not layers:
        raise SubnetError(f"subnet {name!r}: keeps no layers; at least one is required")
    kept = _check_layers(text, name, layers, "kept layers")
    if kept != sorted(kept):
        raise SubnetError(f"subnet {name!r}: kept layers must be in ascending order: {kept}")
    missing = [p for p in text.kv_producers if p not in kept]
    if missing:
        raise SubnetError(
            f"subnet {name!r}: skips KV producer layer(s) {missing}; they must be kept because "
            f"the consumer layers ({text.first_kv_shared_layer}..{text.num_hidden_layers - 1}) "
            "reuse their K/V"
        )
    if len(widths) != len(kept):
        raise SubnetError(
            f"subnet {name!r}: {len(widths)} widths for {len(kept)} kept layers; "
            "give exactly one width per kept layer"
        )
    for layer, width in zip(kept, widths, strict=True):
        full = text.intermediate_size[layer]
        if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= full:
            raise SubnetError(
                f"subnet {name!r}: layer {layer} width {width!r} is not an integer in (0, {full}]"
            )
    widths = list(widths)
    return Subnet(
        name=name,
        title=title if title is not None else name,
        layers=tuple(kept),
        widths=tuple(widths),
        official=official,
        quality=quality,
        table_params_b=table_params_b,
        effective_params=effective_params(text, kept, widths),
        kv_key=kv_layout_key(text, kept, widths),
        kv_layers=tuple(layer for layer in kept if text.owns_kv(layer)),
    )


def _full_subnet(text: TextConfig, title: str = "Full model") -> Subnet:
    return make_subnet(
        text, "full", range(text.num_hidden_layers), text.intermediate_size, title=title
    )


# ---- the official table -----------------------------------------------------------------------


def official_slug(title: str) -> str:
    """The slug of an official row, by rule: "Main model" is "full"; any other row is its size
    label plus its level when it has one ("Config for official E2B Model" -> "e2b",
    "Config for E1.96B (layer-level)" -> "e1.96b-layer"). The label is only a name:
    "E3.79B (block-level)" states 3.74 B."""
    if title.strip().lower() == "main model":
        return "full"
    size = _SIZE.search(title)
    if not size:
        raise SubnetError(f"official subnet {title!r}: no size label like 'E2B' in its name")
    level = _LEVEL.search(title)
    return f"e{size.group(1)}b" + (f"-{level.group(1).lower()}" if level else "")


def parse_official_csv(path: Path) -> list[OfficialRow]:
    path = Path(path)
    if not path.is_file():
        raise SubnetError(f"official subnet table {path}: no such file")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        absent = [c for c in _CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if absent:
            raise SubnetError(f"official subnet table {path}: missing columns {absent}")
        return [_parse_row(path, i, rec) for i, rec in enumerate(reader, start=2)]


def _parse_row(path: Path, line: int, rec: dict[str, str]) -> OfficialRow:
    title = (rec["name"] or "").strip()

    def bad(what: str) -> SubnetError:
        return SubnetError(f"official subnet {title!r} ({path.name} line {line}): {what}")

    name = official_slug(title)
    widths = []
    for item in _list_items(rec["FFN Hidden Dims"], bad, "FFN Hidden Dims"):
        m = _FFN_ITEM.fullmatch(item)
        if not m:
            raise bad(f"FFN width {item.strip()!r} is not 'N' or 'A * B'")
        widths.append(int(m.group(1)) * (int(m.group(2)) if m.group(2) else 1))
    skipped = []
    for item in _list_items(rec["Layers Skipped"] or "[]", bad, "Layers Skipped"):
        if not re.fullmatch(r"\s*\d+\s*", item):
            raise bad(f"skipped layer {item.strip()!r} is not an integer")
        skipped.append(int(item))
    layers = tuple(i for i in range(E4B_LAYERS) if i not in skipped)
    if len(set(skipped)) != len(skipped) or any(s >= E4B_LAYERS for s in skipped):
        raise bad(f"Layers Skipped {skipped} has duplicates or indices beyond {E4B_LAYERS - 1}")
    stated = (rec["# Layers"] or "").strip()
    if not stated.isdigit() or int(stated) != len(widths) or len(widths) != len(layers):
        raise bad(
            f"# Layers {stated!r}, {len(widths)} FFN widths and {len(skipped)} skipped layers "
            f"do not add up to a {E4B_LAYERS}-layer E4B"
        )
    mmlu = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", rec["MMLU PT accuracy"] or "")
    params = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*", rec["# Effective Params (B)"] or "")
    if not mmlu or not params:
        raise bad("MMLU PT accuracy or # Effective Params (B) is not a number")
    return OfficialRow(title, name, layers, tuple(widths), float(params[1]), float(mmlu[1]))


def _list_items(text: str, bad: Callable[[str], SubnetError], column: str) -> list[str]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise bad(f"{column} is not a [...] list")
    inner = text[1:-1].strip()
    return inner.split(",") if inner else []


def _scale(width: int, full_width: int) -> int:
    """E4B units -> this checkpoint's: round half up in exact integers, never below 1."""
    return max(1, (2 * width * full_width + E4B_FULL_WIDTH) // (2 * E4B_FULL_WIDTH))


def _official_subnets(text: TextConfig, path: Path) -> tuple[list[Subnet], list[str]]:
    why = []
    if text.num_hidden_layers != E4B_LAYERS or text.kv_producers != E4B_KV_PRODUCERS:
        why.append(
            f"the checkpoint has {text.num_hidden_layers} layers and KV producers "
            f"{list(text.kv_producers)}, not E4B's {E4B_LAYERS} and {list(E4B_KV_PRODUCERS)}"
        )
    if len(set(text.intermediate_size)) != 1:
        # One scale factor maps the table's uniform 16384 onto the checkpoint only when every
        # layer has the same full width.
        why.append("the checkpoint's layers do not all have the same full FFN width")
    if why:
        return [], [f"official subnets not loaded: {'; '.join(why)}"]
    subnets = []
    for row in parse_official_csv(path):
        widths = [_scale(w, text.full_width) for w in row.widths]
        s = make_subnet(
            text,
            row.name,
            row.layers,
            widths,
            title=row.title,
            official=True,
            quality=row.quality,
            table_params_b=row.params_b,
        )
        if s.name == "full" and s.widths != text.intermediate_size:
            raise SubnetError(f"subnet 'full': row {row.title!r} is not every layer at full width")
        subnets.append(s)
    return subnets, []


# ---- custom subnets ---------------------------------------------------------------------------


def _width_value(name: str, value: Any, full: int, where: str) -> int:
    """An int is absolute; a float in (0, 1] is a fraction of the layer's full width."""
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise SubnetError(f"subnet {name!r}: {where}: fraction {value} is not in (0, 1]")
        return max(1, math.floor(Fraction(value) * full + Fraction(1, 2)))
    if isinstance(value, bool) or not isinstance(value, int):
        raise SubnetError(
            f"subnet {name!r}: {where}: {value!r} is neither a width nor a fraction in (0, 1]"
        )
    return value


def _custom_subnet(text: TextConfig, entry: Any, index: int) -> Subnet:
    if not isinstance(entry, dict) or "name" not in entry:
        raise SubnetError(f"custom subnet #{index + 1}: must be a mapping with a 'name'")
    name = entry["name"]
    unknown = sorted(str(k) for k in entry if k not in _CUSTOM_KEYS)
    if unknown:
        raise SubnetError(f"subnet {name!r}: unknown key(s) {unknown}")
    if "keep_layers" in entry and "skip_layers" in entry:
        raise SubnetError(f"subnet {name!r}: give keep_layers or skip_layers, not both")
    all_layers = range(text.num_hidden_layers)
    if "skip_layers" in entry:
        skip = _check_layers(text, name, _as_list(name, entry["skip_layers"]), "skip_layers")
        layers = [i for i in all_layers if i not in skip]
    else:
        layers = _as_list(name, entry.get("keep_layers", list(all_layers)))
        layers = _check_layers(text, name, layers, "keep_layers")
    if "widths" not in entry:
        raise SubnetError(f"subnet {name!r}: 'widths' is required")
    given = entry["widths"]
    if isinstance(given, list) and len(given) != len(layers):
        raise SubnetError(
            f"subnet {name!r}: {len(given)} widths for {len(layers)} kept layers; "
            "give exactly one width per kept layer"
        )
    values = given if isinstance(given, list) else [given] * len(layers)
    size = text.intermediate_size
    widths = {
        layer: _width_value(name, value, size[layer], "widths")
        for layer, value in zip(layers, values, strict=True)
    }
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SubnetError(f"subnet {name!r}: overrides must map layer index -> width")
    for layer, value in overrides.items():
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise SubnetError(f"subnet {name!r}: unknown key {layer!r} in overrides (not a layer)")
        if layer not in widths:
            raise SubnetError(f"subnet {name!r}: overrides layer {layer}, which is not kept")
        widths[layer] = _width_value(name, value, size[layer], f"overrides[{layer}]")
    quality = entry.get("quality")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int | float)):
        raise SubnetError(f"subnet {name!r}: quality must be a number (percent), got {quality!r}")
    title = entry.get("title")
    return make_subnet(
        text,
        name,
        layers,
        [widths[layer] for layer in layers],
        title=None if title is None else str(title),
        quality=None if quality is None else float(quality),
    )


def _as_list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise SubnetError(f"subnet {name!r}: layer lists must be lists, got {value!r}")
    return value


def parse_custom_yaml(text: TextConfig, path: Path) -> list[Subnet]:
    path = Path(path)
    if not path.is_file():
        raise SubnetError(f"custom subnet file {path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SubnetError(f"custom subnet file {path}: not valid YAML ({e})") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise SubnetError(f"custom subnet file {path}: expected a mapping with key 'subnets'")
    unknown = sorted(str(k) for k in doc if k != "subnets")
    if unknown:
        raise SubnetError(f"custom subnet file {path}: unknown key(s) {unknown}")
    entries = doc.get("subnets") or []
    if not isinstance(entries, list):
        raise SubnetError(f"custom subnet file {path}: 'subnets' must be a list")
    return [_custom_subnet(text, e, i) for i, e in enumerate(entries)]


# ---- the table --------------------------------------------------------------------------------


def load_subnet_table(
    text: TextConfig,
    csv_path: Path | None = DEFAULT_TABLE_CSV,
    custom_path: Path | None = DEFAULT_CUSTOM_YAML,
    measured: MeasuredQuality | None = None,
) -> SubnetTable:
    notes: list[str] = []
    official: list[Subnet] = []
    if csv_path is None:
        notes.append("official subnets not loaded: no table given")
    else:
        official, why = _official_subnets(text, Path(csv_path))
        notes += why
    if not any(s.name == "full" for s in official):
        official.insert(0, _full_subnet(text))
    custom = [] if custom_path is None else parse_custom_yaml(text, Path(custom_path))
    return SubnetTable(official + custom, notes, measured)


def _ranges(layers: Sequence[int]) -> str:
    """[3, 7, 20, 21, 22] -> "3, 7, 20-22"."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def format_table(table: SubnetTable) -> str:
    num_layers = len(table.full.layers)
    # Billions for real checkpoints, millions for dev ones (whose table values stay E4B's).
    unit, scale = ("B", 1e9) if table.full.effective_params >= 1e9 else ("M", 1e6)
    measured = bool(table.measured)
    quality_head = "held-out ppl (score)" if measured else "quality"
    rows = [("name", "layers", f"effective params ({unit})", quality_head, "KV")]
    for s in table:
        skipped = s.skipped(num_layers)
        layers = f"{len(s.layers)}" + (f" (skip {_ranges(skipped)})" if skipped else "")
        params = f"{s.effective_params / scale:.2f}"
        if s.table_params_b is not None:
            params += f" (E4B table: {s.table_params_b:.2f} B)"
        if measured:
            m = table.measured.get(s.name)
            score = table.scores[s.name]
            quality = f"{m.perplexity:.2f} ({score:.3f})" if m else f"- ({score:.3f})"
        else:
            quality = "-" if s.quality is None else f"{s.quality:.1f}"
        rows.append((s.name, layers, params, quality, s.kv_key))
    sizes = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, sizes, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + [f"note: {n}" for n in table.notes])
