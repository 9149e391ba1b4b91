"""A team's data with no code: the ``corpus`` and ``suites`` ports from files.

Corpus adapters (:class:`~flywheel.ports.Corpus`), one per format:

- ``directory`` (:data:`DIRECTORY`): the dataset format, a directory holding
  ``records.jsonl`` and the image files::

      <dir>/records.jsonl     one JSON object per line: id, image (a path relative to <dir>,
                              inside it), rich_caption, raw_caption, tags, split, provenance
      <dir>/<image paths>     the images (any format PIL reads)

  :func:`write_records` writes ``records.jsonl`` atomically.
- ``parquet`` (:data:`PARQUET`): one or more parquet files (a file, a directory or a glob)
  with the same columns, or a team's own column names mapped onto them; the image column a
  relative path or the Hugging Face ``datasets`` image struct ``{bytes, path}``.
- ``hf_datasets`` (:data:`HF_DATASETS`): a directory written by ``Dataset.save_to_disk`` or
  ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``, never from a hub),
  with the same column mapping; a DatasetDict's splits map onto ``train`` and ``pool``.

Items come lazily, in file (or row) order, each validated as it is read: a broken line or row
raises :class:`~flywheel.ports.PortError` naming the file and the line (``records.jsonl:3``,
from 1) or row (``part.parquet: row 2``, from 0 as pyarrow and ``datasets`` count), so
nothing half-read passes for complete. Item images are ``file://`` URIs; an image embedded in a
parquet file or an Arrow dataset has the URI ``parquet://<file>#row=<n>`` or
``hf-datasets://<dir>#split=<name>&row=<n>``, which only its corpus reads back. Images decode
with PIL to RGB tensors ``(3, H, W)`` in [0, 1]; one above ``max_pixels`` (a decompression
bomb) is refused.

Suites adapter ``jsonl`` (:data:`SUITES`, a :class:`~flywheel.ports.PromptSuites`): a JSONL
file per suite, one :class:`~flywheel.ports.SuitePrompt` per line.
"""

from __future__ import annotations

import glob
import io
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args
from urllib.parse import parse_qs, quote, unquote, urlencode, urlparse

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]
import torch
from PIL import Image, ImageOps
from pydantic import Field, ValidationError, field_validator
from torch import Tensor

from flywheel.adapters.base import Adapter, AdapterContext, AdapterSettings
from flywheel.ports import CorpusItem, CorpusSplit, PortError, SuitePrompt
from training.io import atomic_write_text, local_path

RECORDS_FILE = "records.jsonl"
"""The item index of a dataset directory."""

DEFAULT_MAX_PIXELS = 1 << 26
"""Largest image decoded by default (64 Mpx; PIL itself warns above ~89 Mpx)."""

CorpusField = Literal["id", "image", "rich_caption", "raw_caption", "tags", "split", "provenance"]
"""The fields of a :class:`~flywheel.ports.CorpusItem`: the columns a table provides."""

FIELDS: tuple[CorpusField, ...] = get_args(CorpusField)
REQUIRED_FIELDS: frozenset[CorpusField] = frozenset({"id", "image", "rich_caption"})
SPLITS: tuple[CorpusSplit, ...] = get_args(CorpusSplit)

PARQUET_SCHEME = "parquet"
HF_SCHEME = "hf-datasets"
_BATCH_ROWS = 64


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _problems(error: ValidationError) -> str:
    """A pydantic error as one line: ``field: message`` per problem."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {_one_line(e['msg'])}"
        for e in error.errors()
    )


# ---- images -----------------------------------------------------------------------------------


def check_relative_path(value: str) -> str:
    """``value`` if it is a POSIX path relative to a directory that stays inside it (not
    absolute, no ``..``, no backslash, no ``:`` so no URI or drive); ``ValueError``
    otherwise."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value or ":" in value:
        raise ValueError(f"image path {value!r} must be relative, inside the dataset directory")
    return value


def _inside(path: Path, root: Path) -> bool:
    return Path(os.path.normpath(path)).is_relative_to(os.path.normpath(root))


def decode_image(source: Path | bytes, what: str, *, max_pixels: int) -> Tensor:
    """The image at ``source`` (a file or its bytes), upright (its EXIF orientation applied),
    as RGB ``(3, H, W)`` floats in [0, 1]; :class:`PortError` naming ``what`` when it cannot be
    read, does not decode or has more than ``max_pixels`` pixels (checked from its header,
    before decoding)."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise PortError(
                    "corpus",
                    f"{what}: {width}x{height} pixels is over the limit of {max_pixels} "
                    "(max_pixels; a decompression bomb?)",
                )
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise PortError("corpus", f"{what}: no such image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PortError("corpus", f"{what}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        # What PIL raises on a corrupt file (a truncated, malformed or unknown image).
        raise PortError("corpus", f"{what}: cannot be decoded ({_one_line(exc)})") from None
    pixels = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(torch.float32) / 255.0


# ---- the dataset directory --------------------------------------------------------------------


def _relative_image(root: Path, image: str) -> str:
    """``image`` (a relative path or a ``file://`` URI under ``root``) relative to ``root``."""
    if "://" not in image:
        return check_relative_path(image)
    path = local_path(image)
    if path is None:
        raise ValueError(f"image {image!r}: only file:// URIs and relative paths are written")
    for base in (root.absolute(), root.resolve()):
        if _inside(path, base):
            return Path(os.path.relpath(os.path.normpath(path), base)).as_posix()
    raise ValueError(f"image {image!r} is not inside {root}")


def write_records(
    directory: str | os.PathLike[str], items: Iterable[CorpusItem], *, check_images: bool = True
) -> Path:
    """Write ``items`` as ``<directory>/records.jsonl`` (atomically: a reader sees the old file
    or the new one); returns its path.

    Each item's image is a path relative to ``directory`` or a ``file://`` URI inside it
    (what a :class:`DirectoryCorpus` gives); the images must already be there (checked unless
    ``check_images`` is False). ``ValueError`` on a duplicate id or an image outside.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    lines: list[str] = []
    for number, item in enumerate(items, start=1):
        where = f"item {number} ({item.id!r})"
        if item.id in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(item.id)
        try:
            relative = _relative_image(root, item.image)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if check_images and not (root / relative).is_file():
            raise ValueError(f"{where}: image {relative!r} not found in {root}")
        record = item.model_dump(mode="json")
        record["image"] = relative
        lines.append(json.dumps(record, ensure_ascii=False))
    target = root / RECORDS_FILE
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return target


class DirectoryCorpus:
    """A dataset directory: ``records.jsonl`` and the images it names."""

    def __init__(self, directory: Path, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.directory = directory.absolute()
        self._name = name
        self.max_pixels = max_pixels

    @property
    def name(self) -> str:
        return self._name

    @property
    def records(self) -> Path:
        return self.directory / RECORDS_FILE

    def items(self, split: CorpusSplit) -> Iterator[CorpusItem]:
        """Every item of ``split`` in file order; every line (of either split) is checked."""
        path = self.records
        seen: set[str] = set()
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise PortError("corpus", f"{path}: no such file") from None
        except OSError as exc:
            raise PortError("corpus", f"{path}: cannot be read ({exc.strerror})") from None
        with handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path}:{number}"
                item = self._parse(raw, where)
                if item is None:
                    continue
                if item.id in seen:
                    raise PortError("corpus", f"{where}: duplicate id {item.id!r}")
                seen.add(item.id)
                if item.split == split:
                    yield item

    def _parse(self, raw: bytes, where: str) -> CorpusItem | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PortError("corpus", f"{where}: not UTF-8") from None
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PortError("corpus", f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PortError("corpus", f"{where}: not a JSON object")
        try:
            item = CorpusItem.model_validate(record)
        except ValidationError as exc:
            raise PortError("corpus", f"{where}: {_problems(exc)}") from None
        try:
            relative = check_relative_path(item.image)
        except ValueError as exc:
            raise PortError("corpus", f"{where}: {exc}") from None
        path = self.directory / relative
        if not path.is_file():
            raise PortError("corpus", f"{where}: image {relative!r} not found in {self.directory}")
        return item.model_copy(update={"image": path.as_uri()})

    def image(self, item: CorpusItem) -> Tensor:
        path = local_path(item.image)
        if path is None or not _inside(path, self.directory):
            raise PortError("corpus", f"{item.image}: not an image of dataset {self.name!r}")
        return decode_image(path, f"{item.id} ({path})", max_pixels=self.max_pixels)


# ---- tables (parquet files, Arrow datasets) ---------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class _Table:
    """One table a table corpus reads: a parquet file, or a split of an Arrow dataset."""

    label: str
    """How messages name it (the file or directory)."""
    columns: Sequence[str]
    split: CorpusSplit | None
    """Every row's split (None: the split column's)."""
    base: Path
    """The directory relative image paths are resolved against (and must stay inside)."""
    batches: Callable[[list[str]], Iterator[list[dict[str, Any]]]]
    """The rows of these columns, a batch at a time, in order."""
    embedded_uri: Callable[[int], str]
    """The URI of row ``n``'s embedded image."""


def _column_plan(table: _Table, mapping: Mapping[CorpusField, str]) -> dict[CorpusField, str]:
    """Field -> column of ``table``; :class:`PortError` when a required, mapped or (without a
    fixed split) the split column is missing."""
    plan: dict[CorpusField, str] = {}
    for field in FIELDS:
        column = mapping.get(field, field)
        if field == "split" and table.split is not None:
            continue
        if column in table.columns:
            plan[field] = column
        elif field in REQUIRED_FIELDS or field in mapping or field == "split":
            known = ", ".join(table.columns)
            hint = " (or set split)" if field == "split" else ""
            raise PortError(
                "corpus",
                f"{table.label}: no column {column!r} for {field}{hint} (columns: {known})",
            )
    return plan


def _provenance(value: object) -> object:
    if isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return dict(value)  # a parquet map: (key, value) pairs
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}  # a struct's absent keys
    return value


class _TableCorpus:
    """Rows of tables as items: the shared part of the parquet and Arrow dataset corpora."""

    scheme: str

    def __init__(
        self,
        *,
        name: str,
        columns: Mapping[CorpusField, str],
        images: Path | None,
        max_pixels: int,
    ) -> None:
        self._name = name
        self.columns = dict(columns)
        self.images = images.absolute() if images is not None else None
        self.max_pixels = max_pixels

    @property
    def name(self) -> str:
        return self._name

    def _tables(self) -> Iterator[_Table]:
        """The tables, in order (each opened when it is reached)."""
        raise NotImplementedError

    def _embedded(self, uri: str) -> bytes:
        """The bytes of the embedded image ``uri`` names (one of this corpus' rows)."""
        raise NotImplementedError

    def _image_roots(self) -> list[Path]:
        """The directories this corpus' image files are in."""
        raise NotImplementedError

    def items(self, split: CorpusSplit) -> Iterator[CorpusItem]:
        """Every item of ``split`` in table and row order; every row read is checked (with a
        split column, rows of either split)."""
        seen: set[str] = set()
        for table in self._tables():
            if table.split is not None and table.split != split:
                continue
            plan = _column_plan(table, self.columns)
            index = 0
            for batch in table.batches(sorted(set(plan.values()))):
                for row in batch:
                    where = f"{table.label}: row {index}"
                    item = self._item(table, plan, row, index, where)
                    index += 1
                    if item.id in seen:
                        raise PortError("corpus", f"{where}: duplicate id {item.id!r}")
                    seen.add(item.id)
                    if item.split == split:
                        yield item

    def _item(
        self,
        table: _Table,
        plan: Mapping[CorpusField, str],
        row: Mapping[str, Any],
        index: int,
        where: str,
    ) -> CorpusItem:
        record: dict[str, Any] = {}
        for field, column in plan.items():
            value = row[column]
            if value is None and field not in REQUIRED_FIELDS and field != "split":
                continue  # an optional field left empty: its default
            if field == "provenance":
                value = _provenance(value)
            elif field == "id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # an integer id column
            record[field] = value
        if table.split is not None:
            record["split"] = table.split
        record["image"] = self._image_uri(table, record.get("image"), index, where)
        try:
            return CorpusItem.model_validate(record)
        except ValidationError as exc:
            raise PortError("corpus", f"{where}: {_problems(exc)}") from None

    def _image_uri(self, table: _Table, value: object, index: int, where: str) -> str:
        path: object = value
        if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
            if value.get("bytes") is not None:
                return table.embedded_uri(index)
            path = value.get("path")
            if path is None:
                raise PortError("corpus", f"{where}: image has neither bytes nor a path")
        if not isinstance(path, str):
            raise PortError(
                "corpus", f"{where}: image must be a relative path or an image {{bytes, path}}"
            )
        try:
            relative = check_relative_path(path)
        except ValueError as exc:
            raise PortError("corpus", f"{where}: {exc}") from None
        base = self.images if self.images is not None else table.base
        file = base / relative
        if not file.is_file():
            raise PortError("corpus", f"{where}: image {relative!r} not found in {base}")
        return file.as_uri()

    def image(self, item: CorpusItem) -> Tensor:
        what = f"{item.id} ({item.image})"
        if urlparse(item.image).scheme == self.scheme:
            return decode_image(self._embedded(item.image), what, max_pixels=self.max_pixels)
        path = local_path(item.image)
        if path is None or not any(_inside(path, root) for root in self._image_roots()):
            raise PortError("corpus", f"{item.image}: not an image of dataset {self.name!r}")
        return decode_image(path, what, max_pixels=self.max_pixels)


def _row_of(uri: str) -> tuple[Path, dict[str, str]]:
    parsed = urlparse(uri)
    fragment = {k: v[-1] for k, v in parse_qs(parsed.fragment).items()}
    return Path(unquote(parsed.path)), fragment


def _row_uri(scheme: str, path: Path, **fragment: str | int) -> str:
    return f"{scheme}://{quote(path.as_posix())}#{urlencode(fragment)}"


class ParquetCorpus(_TableCorpus):
    """Parquet files (read with pyarrow), in path order."""

    scheme = PARQUET_SCHEME

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        columns: Mapping[CorpusField, str] | None = None,
        split: CorpusSplit | None = None,
        images: Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(name=name, columns=columns or {}, images=images, max_pixels=max_pixels)
        self.path = path.absolute()
        self.split = split
        self._known: set[Path] = set()  # the files found the last time they were looked for
        # The row group last read for an embedded image: file, group, column, its values.
        self._group: tuple[Path, int, str, Any] | None = None

    def files(self) -> list[Path]:
        """The parquet files: the file, every ``*.parquet`` under the directory, or the glob's
        matches; sorted. :class:`PortError` when there is none."""
        if any(c in str(self.path) for c in "*?["):
            found = [Path(p) for p in glob.glob(str(self.path), recursive=True)]
            files = sorted(p for p in found if p.is_file())
        elif self.path.is_dir():
            files = sorted(self.path.rglob("*.parquet"))
        else:
            files = [self.path] if self.path.is_file() else []
        if not files:
            raise PortError("corpus", f"{self.path}: no parquet file")
        self._known = set(files)
        return files

    def _is_ours(self, file: Path) -> bool:
        if file not in self._known:
            self.files()  # perhaps written since
        return file in self._known

    def _image_roots(self) -> list[Path]:
        if self.images is not None:
            return [self.images]
        if not self._known:
            self.files()
        return sorted({file.parent for file in self._known})

    def _open(self, file: Path) -> Any:
        try:
            return pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as exc:
            raise PortError("corpus", f"{file}: not a parquet file ({_one_line(exc)})") from None

    def _tables(self) -> Iterator[_Table]:
        for file in self.files():
            yield self._table(file)

    def _table(self, file: Path) -> _Table:
        with self._open(file) as parquet:
            names = list(parquet.schema_arrow.names)

        def batches(columns: list[str]) -> Iterator[list[dict[str, Any]]]:
            with self._open(file) as parquet:
                try:
                    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                        rows: list[dict[str, Any]] = batch.to_pylist()
                        yield rows
                except (OSError, pa.ArrowException) as exc:
                    message = f"{file}: cannot be read ({_one_line(exc)})"
                    raise PortError("corpus", message) from None

        return _Table(
            label=str(file),
            columns=names,
            split=self.split,
            base=file.parent,
            batches=batches,
            embedded_uri=lambda row: _row_uri(PARQUET_SCHEME, file, row=row),
        )

    def _embedded(self, uri: str) -> bytes:
        file, fragment = _row_of(uri)
        if not fragment.get("row", "").isdigit() or not self._is_ours(file):
            raise PortError("corpus", f"{uri}: not an image of dataset {self.name!r}")
        row = int(fragment["row"])
        column = self.columns.get("image", "image")
        with self._open(file) as parquet:
            start = 0
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if row < start + rows:
                    if self._group is None or self._group[:3] != (file, group, column):
                        self._group = (
                            file,
                            group,
                            column,
                            self._read(file, parquet, group, column),
                        )
                    return _image_bytes(self._group[3][row - start].as_py(), uri)
                start += rows
        raise PortError("corpus", f"{uri}: {file} has {start} rows")

    @staticmethod
    def _read(file: Path, parquet: Any, group: int, column: str) -> Any:
        """Column ``column`` of row group ``group`` (its image values)."""
        try:
            return parquet.read_row_group(group, columns=[column]).column(0)
        except (OSError, KeyError, pa.ArrowException) as exc:
            message = f"{file}: row group {group}: {_one_line(exc)}"
            raise PortError("corpus", message) from None


def _image_bytes(value: object, uri: str) -> bytes:
    data = value.get("bytes") if isinstance(value, dict) else None
    if isinstance(data, bytes):
        return data
    raise PortError("corpus", f"{uri}: the row has no embedded image (the file changed?)")


class ArrowDatasetCorpus(_TableCorpus):
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""

    scheme = HF_SCHEME

    def __init__(
        self,
        directory: Path,
        *,
        name: str,
        columns: Mapping[CorpusField, str] | None = None,
        split: CorpusSplit | None = None,
        splits: Mapping[str, CorpusSplit] | None = None,
        images: Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(name=name, columns=columns or {}, images=images, max_pixels=max_pixels)
        self.directory = directory.absolute()
        self._datasets, self._splits = self._load(split, splits)

    def _load(
        self, split: CorpusSplit | None, splits: Mapping[str, CorpusSplit] | None
    ) -> tuple[dict[str, Any], dict[str, CorpusSplit | None]]:
        """The datasets by split name ("" for a lone Dataset) and the corpus split of each."""
        import datasets  # type: ignore[import-untyped,unused-ignore]

        try:
            loaded = datasets.load_from_disk(str(self.directory))
        except (OSError, ValueError) as exc:
            raise PortError(
                "corpus", f"{self.directory}: not a saved dataset ({_one_line(exc)})"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split is not None:
                raise PortError(
                    "corpus", f"{self.directory}: a DatasetDict maps its splits with splits"
                )
            names = list(loaded)
            mapping: dict[str, CorpusSplit | None] = (
                dict(splits) if splits is not None else {s: s for s in SPLITS if s in names}
            )
            missing = [s for s in mapping if s not in names]
            if missing:
                raise PortError(
                    "corpus",
                    f"{self.directory}: no split {missing[0]!r} (splits: {', '.join(names)})",
                )
            found = {s: loaded[s].with_format("arrow") for s in mapping}
            return found, mapping
        if splits is not None:
            raise PortError(
                "corpus", f"{self.directory}: splits maps a DatasetDict's; this is one Dataset"
            )
        return {"": loaded.with_format("arrow")}, {"": split}

    def _tables(self) -> Iterator[_Table]:
        for name, corpus_split in self._splits.items():
            yield self._table(name, corpus_split)

    def _image_roots(self) -> list[Path]:
        return [self.images or self.directory]

    def _table(self, name: str, corpus_split: CorpusSplit | None) -> _Table:
        dataset = self._datasets[name]
        label = str(self.directory / name) if name else str(self.directory)

        def batches(columns: list[str]) -> Iterator[list[dict[str, Any]]]:
            for batch in dataset.select_columns(columns).iter(batch_size=_BATCH_ROWS):
                rows: list[dict[str, Any]] = batch.to_pylist()
                yield rows

        def embedded_uri(row: int) -> str:
            if name:
                return _row_uri(HF_SCHEME, self.directory, split=name, row=row)
            return _row_uri(HF_SCHEME, self.directory, row=row)

        return _Table(
            label=label,
            columns=list(dataset.column_names),
            split=corpus_split,
            base=self.images or self.directory,
            batches=batches,
            embedded_uri=embedded_uri,
        )

    def _embedded(self, uri: str) -> bytes:
        directory, fragment = _row_of(uri)
        name = fragment.get("split", "")
        row = fragment.get("row", "")
        if directory != self.directory or name not in self._datasets or not row.isdigit():
            raise PortError("corpus", f"{uri}: not an image of dataset {self.name!r}")
        dataset = self._datasets[name]
        if int(row) >= len(dataset):
            raise PortError("corpus", f"{uri}: the dataset has {len(dataset)} rows")
        column = self.columns.get("image", "image")
        if column not in dataset.column_names:
            raise PortError("corpus", f"{uri}: the dataset has no column {column!r}")
        return _image_bytes(dataset[int(row)].column(column)[0].as_py(), uri)


# ---- settings and builders --------------------------------------------------------------------


class DirectorySettings(AdapterSettings):
    """``[corpus] adapter = "directory"``: a dataset directory (``records.jsonl``)."""

    path: str = Field(min_length=1)
    """The dataset directory (relative paths: from the project file's directory)."""
    name: str | None = Field(default=None, min_length=1)
    """The dataset's name (its index is kept under it); None: the directory's name."""
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)
    """Largest image decoded, in pixels (width x height); a larger one is refused."""


ColumnMapping = dict[CorpusField, str]


class ParquetSettings(AdapterSettings):
    """``[corpus] adapter = "parquet"``: parquet files with an item per row."""

    path: str = Field(min_length=1)
    """A parquet file, a directory (every ``*.parquet`` under it) or a glob
    (``data/train-*.parquet``, ``**`` allowed); relative: from the project file's directory.
    Files are read in sorted order."""
    name: str | None = Field(default=None, min_length=1)
    """The dataset's name; None: the file's stem, or the directory's name (for a glob: the
    last directory before the pattern)."""
    columns: ColumnMapping = Field(default_factory=dict)
    """Item field -> the column holding it, for the columns named otherwise
    (``{rich_caption = "text", image = "jpg"}``); unmapped fields use their own name. A mapped
    column must exist; ``id``, ``image`` and ``rich_caption`` are required, the others
    optional (a missing one or a null value: the field's default)."""
    split: CorpusSplit | None = None
    """Every row's split (``train`` or ``pool``); None: a ``split`` column (or the column
    ``columns.split`` names) holds it per row."""
    images: str | None = None
    """The directory relative image paths are resolved against (they must stay inside it);
    None: each parquet file's own directory."""
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)
    """Largest image decoded, in pixels (width x height); a larger one is refused."""


class HFDatasetsSettings(AdapterSettings):
    """``[corpus] adapter = "hf_datasets"``: a ``save_to_disk`` directory of ``datasets``."""

    path: str = Field(min_length=1)
    """The directory ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote (relative:
    from the project file's directory); loaded with ``datasets.load_from_disk``, offline."""
    name: str | None = Field(default=None, min_length=1)
    """The dataset's name; None: the directory's name."""
    columns: ColumnMapping = Field(default_factory=dict)
    """Item field -> the column holding it, as for ``parquet``; the image column is a
    ``datasets.Image`` feature or a relative path string."""
    split: CorpusSplit | None = None
    """A lone Dataset: every row's split; None: its ``split`` column's. (Not for a
    DatasetDict.)"""
    splits: dict[str, CorpusSplit] | None = None
    """A DatasetDict: its split name -> ``train`` or ``pool`` (``{train = "train", validation =
    "pool"}``; every split named must exist, the others are not read); None: the splits
    named ``train`` and ``pool``, those there are."""
    images: str | None = None
    """The directory relative image paths (of rows without embedded bytes) are resolved
    against (they must stay inside it); None: the dataset directory."""
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)
    """Largest image decoded, in pixels (width x height); a larger one is refused."""


def _default_name(path: Path) -> str:
    parts = path.parts
    for index, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return Path(*parts[:index]).name or "dataset"
    return (path.stem if path.suffix == ".parquet" else path.name) or "dataset"


def build_directory(settings: DirectorySettings, context: AdapterContext) -> DirectoryCorpus:
    """The dataset directory ``settings.path``; :class:`PortError` when it has no
    ``records.jsonl``."""
    directory = context.path(settings.path)
    corpus = DirectoryCorpus(
        directory,
        name=settings.name or directory.absolute().name,
        max_pixels=settings.max_pixels,
    )
    if not corpus.records.is_file():
        raise PortError("corpus", f"{directory}: not a dataset directory (no {RECORDS_FILE})")
    return corpus


def build_parquet(settings: ParquetSettings, context: AdapterContext) -> ParquetCorpus:
    """The parquet files ``settings.path``; :class:`PortError` when there is none."""
    path = context.path(settings.path)
    corpus = ParquetCorpus(
        path,
        name=settings.name or _default_name(path.absolute()),
        columns=settings.columns,
        split=settings.split,
        images=context.path(settings.images) if settings.images is not None else None,
        max_pixels=settings.max_pixels,
    )
    corpus.files()
    return corpus


def build_hf_datasets(settings: HFDatasetsSettings, context: AdapterContext) -> ArrowDatasetCorpus:
    """The saved dataset at ``settings.path`` (loaded now, memory-mapped)."""
    directory = context.path(settings.path)
    return ArrowDatasetCorpus(
        directory,
        name=settings.name or directory.absolute().name,
        columns=settings.columns,
        split=settings.split,
        splits=settings.splits,
        images=context.path(settings.images) if settings.images is not None else None,
        max_pixels=settings.max_pixels,
    )


DIRECTORY: Adapter[DirectorySettings] = Adapter(
    settings=DirectorySettings,
    build=build_directory,
    summary="A dataset directory: records.jsonl (id, image, captions, tags, split) and images.",
)
PARQUET: Adapter[ParquetSettings] = Adapter(
    settings=ParquetSettings,
    build=build_parquet,
    summary="Parquet files, an item per row (image paths or embedded images), columns mapped.",
)
HF_DATASETS: Adapter[HFDatasetsSettings] = Adapter(
    settings=HFDatasetsSettings,
    build=build_hf_datasets,
    summary="A Hugging Face datasets save_to_disk directory, columns and splits mapped.",
)


# ---- prompt suites ----------------------------------------------------------------------------

STANDARD = "standard"
REGRESSION = "regression"


def read_suite(path: Path) -> list[SuitePrompt]:
    """The prompts of the suite JSONL ``path``, validated; :class:`PortError` naming the file
    and line of the first bad one (invalid JSON, a bad prompt, a duplicate id)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PortError("suites", f"{path}: no such file") from None
    except OSError as exc:
        raise PortError("suites", f"{path}: cannot be read ({exc.strerror})") from None
    prompts: list[SuitePrompt] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PortError("suites", f"{where}: not UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PortError("suites", f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PortError("suites", f"{where}: not a JSON object")
        try:
            prompt = SuitePrompt.model_validate(record)
        except ValidationError as exc:
            raise PortError("suites", f"{where}: {_problems(exc)}") from None
        if prompt.id in seen:
            raise PortError("suites", f"{where}: duplicate id {prompt.id!r}")
        seen.add(prompt.id)
        prompts.append(prompt)
    return prompts


class JsonlSuites:
    """Prompt suites from JSONL files, re-read when a file changes."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self.files = dict(files)
        self._cache: dict[str, tuple[tuple[int, int], list[SuitePrompt]]] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def suite(self, name: str) -> list[SuitePrompt]:
        path = self.files[name]  # KeyError: no such suite
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise PortError("suites", f"{path}: no such file") from None
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(name)
        if cached is None or cached[0] != key:
            cached = (key, read_suite(path))
            self._cache[name] = cached
        return list(cached[1])

    def tagged(self, tag: str) -> list[SuitePrompt]:
        """Every prompt with ``tag``, suite by suite (:meth:`names` order), each id once."""
        found: dict[str, SuitePrompt] = {}
        for name in self.files:
            for prompt in self.suite(name):
                if tag in prompt.tags and prompt.id not in found:
                    found[prompt.id] = prompt
        return list(found.values())


class JsonlSuitesSettings(AdapterSettings):
    """``[suites] adapter = "jsonl"``: a JSONL file per suite, a prompt per line."""

    standard: str = Field(min_length=1)
    """The standard suite's file (relative: from the project file's directory)."""
    regression: str = Field(min_length=1)
    """The regression suite's file (it may be empty; the loop compares every candidate on
    it)."""
    extra: dict[str, str] = Field(default_factory=dict)
    """More suites, name -> file (``[suites.extra]`` ``typography = "suites/typo.jsonl"``)."""

    @field_validator("extra")
    @classmethod
    def _extra_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, file in value.items():
            if not name.strip() or name in (STANDARD, REGRESSION):
                raise ValueError(f"suite name {name!r} is empty or taken")
            if not file:
                raise ValueError(f"suite {name!r} has no file")
        return value


def build_suites(settings: JsonlSuitesSettings, context: AdapterContext) -> JsonlSuites:
    """The suites, every file read and checked now (:class:`PortError` on the first bad
    line)."""
    files = {STANDARD: settings.standard, REGRESSION: settings.regression, **settings.extra}
    suites = JsonlSuites({name: context.path(file) for name, file in files.items()})
    for name in suites.names():
        suites.suite(name)
    return suites


SUITES: Adapter[JsonlSuitesSettings] = Adapter(
    settings=JsonlSuitesSettings,
    build=build_suites,
    summary="Prompt suites from JSONL files (standard, regression, more): id, prompt, spec, tags.",
)
