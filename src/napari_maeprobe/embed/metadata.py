"""The user's metadata joined onto the images, so its columns reach every observation row.

A per-image table (CSV, TSV or Parquet) is joined on whichever key its own columns allow, found
from the table: the image name, the paths of the image's files, or plate / well / site. A
per-cell table is joined on image and cell id (the label value), or on row order for a crop
stack. Every join says which key it used, and names the rows and images left without a partner.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.schema import RESERVED

#: table formats by file suffix
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".txt": None, ".parquet": "parquet",
                  ".pq": "parquet"}  # fmt: skip
#: column names (lower case, without a ``metadata_`` prefix) read as plate, well and site
PWS_NAMES = {"plate": ("plate", "plate_id", "barcode", "plate_barcode"),
             "well": ("well", "well_id", "well_position"),
             "site": ("site", "field", "fov", "site_id", "field_id")}  # fmt: skip
#: column names (lower case) read as the cell id of a per-cell table
CELL_ID_NAMES = ("cell_id", "label", "cell", "cell_index", "object_number", "objectnumber",
                 "object_id", "nuclei_number_object_number")  # fmt: skip
_SHOWN = 5  # names listed in a message before "..."


@dataclass
class MetadataJoin:
    """How a table was joined: the key, counts, and what found no partner."""

    key: str  # "image name" | "file path" | "plate/well/site" | "row order" | ...
    columns: list[str]  # the table's columns that formed the key
    n_images: int
    n_matched: int
    unmatched_rows: list[str] = field(default_factory=list)  # table rows that matched nothing
    unmatched_images: list[str] = field(default_factory=list)  # images that got no row
    notes: list[str] = field(default_factory=list)
    unit: str = "images"  # what was matched: images, or crops (row order)

    def summary(self, what: str = "metadata") -> str:
        """One line for the user: the key used, the counts, the leftovers (named)."""
        cols = f"{', '.join(self.columns)}; " if self.columns else ""
        line = (f"{what}: joined on {self.key} ({cols}{self.n_matched} of {self.n_images} "
                f"{self.unit} matched)")  # fmt: skip
        if self.unmatched_images:
            line += f"; no row for {_names(self.unmatched_images)}"
        if self.unmatched_rows:
            line += f"; rows that matched no image: {_names(self.unmatched_rows)}"
        for note in self.notes:
            line += f"; {note}"
        return line


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


# --------------------------------------------------------------------------- reading


def read_table(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Read a metadata table (CSV, TSV or Parquet) as text columns, with notes on how.

    Text is read as UTF-8; a file that is not UTF-8 is read as Latin-1 with a note, unless it
    holds NUL or control bytes (UTF-16 or a binary file), which is refused. An empty table is
    refused. Values stay text (``"03"`` keeps its zero), missing cells are NA."""
    path = Path(path)
    if not path.is_file():
        raise MaeprobeInputError(f"metadata table {path} does not exist",
                                 "pass an existing CSV, TSV or Parquet file")  # fmt: skip
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise MaeprobeInputError(
            f"{path}: unknown table format {suffix or '(no suffix)'}",
            "save it as .csv, .tsv or .parquet",
        )
    notes: list[str] = []
    if TABLE_SUFFIXES[suffix] == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise MaeprobeInputError(f"{path} is not a readable Parquet file ({exc})",
                                     "write it again with pandas.DataFrame.to_parquet, or "
                                     "save it as .csv") from None  # fmt: skip
        frame = frame.astype("string")
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            bad = raw[max(0, exc.start - 10) : exc.start + 10]
            if b"\x00" in raw or re.search(rb"[\x80-\x9f]", raw):
                raise MaeprobeInputError(
                    f"{path} is neither UTF-8 nor Latin-1 text (byte {raw[exc.start]:#04x} at "
                    f"offset {exc.start}, near {bad!r}; NUL or control bytes: UTF-16 or binary?)",
                    "save the table as UTF-8 CSV (e.g. 'CSV UTF-8' in a spreadsheet program)",
                ) from None
            text = raw.decode("latin-1")
            notes.append(f"{path.name} is not UTF-8: read as Latin-1 (first odd byte "
                         f"{raw[exc.start]:#04x} at offset {exc.start})")  # fmt: skip
        if "\x00" in text:
            raise MaeprobeInputError(f"{path} holds NUL characters (UTF-16 or a binary file?)",
                                     "save the table as UTF-8 CSV")  # fmt: skip
        sep = TABLE_SUFFIXES[suffix]
        try:
            frame = pd.read_csv(io.StringIO(text), dtype="string", sep=sep,
                                engine="python" if sep is None else "c",
                                skipinitialspace=True)  # fmt: skip
        except pd.errors.EmptyDataError:
            raise MaeprobeInputError(f"metadata table {path} is empty",
                                     "pass a table with a header row and one row per image"
                                     ) from None  # fmt: skip
        except pd.errors.ParserError as exc:
            raise MaeprobeInputError(f"{path} is not a readable table ({exc})",
                                     "save it as comma-separated CSV with one header row"
                                     ) from None  # fmt: skip
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty or len(frame.columns) == 0:
        raise MaeprobeInputError(f"metadata table {path} has no rows",
                                 "pass a table with a header row and one row per image")
    for col in frame.columns:
        frame[col] = frame[col].str.strip()
    return frame, notes


def _check_reserved(frame: pd.DataFrame, path: Path, allowed: set[str]) -> None:
    reserved = sorted(set(frame.columns) & (RESERVED - allowed))
    if reserved:
        raise MaeprobeInputError(
            f"{path} has columns that the observation table already defines: "
            f"{', '.join(reserved)}",
            f"rename them in the table (e.g. meta_{reserved[0]})",
        )


# --------------------------------------------------------------------------- keys


def well_key(value: object) -> str | None:
    """A well as ``A01``: from ``A01``, ``a1``, ``A001`` or Phenix's ``r01c01``."""
    s = str(value).strip()
    m = re.fullmatch(r"[rR](\d+)[cC](\d+)", s)
    if m:
        row, col = int(m.group(1)), int(m.group(2))
        if 1 <= row <= 26 * 27:
            letters = ""
            while row:
                row, rem = divmod(row - 1, 26)
                letters = chr(65 + rem) + letters
            return f"{letters}{col:02d}"
        return None
    m = re.fullmatch(r"([A-Za-z]{1,2})0*(\d+)", s)
    return f"{m.group(1).upper()}{int(m.group(2)):02d}" if m else None


def site_key(value: object) -> str | None:
    """A site (field) as a plain integer text: ``3``, ``03``, ``f03``, ``s3`` and 3.0 agree."""
    s = str(value).strip()
    m = re.fullmatch(r"[A-Za-z]*0*(\d+)(\.0+)?", s)
    return str(int(m.group(1))) if m else None


def _pws_columns(frame: pd.DataFrame) -> dict[str, str]:
    found = {}
    for col in frame.columns:
        low = col.lower().removeprefix("metadata_").removeprefix("image_metadata_")
        for key, names in PWS_NAMES.items():
            if low in names and key not in found:
                found[key] = col
    return found


def _image_pws(img: MicroscopyImage) -> dict[str, str | None]:
    obs = img.metadata.get("obs", {}) or {}
    return {
        "plate": str(obs["plate"]).strip() if obs.get("plate") not in (None, "") else None,
        "well": well_key(obs["well"]) if obs.get("well") not in (None, "") else None,
        "site": site_key(obs["site"]) if obs.get("site") not in (None, "") else None,
    }


def _image_files(img: MicroscopyImage) -> set[str]:
    out = set()
    for p in img.source:
        path = Path(p)
        out.add(str(path.resolve()))
        if path.is_dir():  # an OME-Zarr or a folder given as one image
            out.add(str(path.resolve()).rstrip("/"))
    return out


def _row_label(frame: pd.DataFrame, i: int, cols: Sequence[str]) -> str:
    """``row N (value)``: the table's line number (the header is line 1) and the first key
    column's value (plate/well/site: all three)."""
    values = [str(frame.iloc[i][c]) for c in cols]
    shown = "/".join(values) if len(values) <= 3 and all(len(v) < 40 for v in values) else values[0]
    return f"row {i + 2} ({shown})"


@dataclass
class _Candidate:
    key: str
    columns: list[str]
    matches: dict[int, list[int]]  # image index -> table rows


def _by_name(frame: pd.DataFrame, images: Sequence[MicroscopyImage]) -> list[_Candidate]:
    names = {img.name: i for i, img in enumerate(images)}
    stems = {}
    for i, img in enumerate(images):  # a name's last part too, when that is unique
        stems.setdefault(img.name.rsplit("/", 1)[-1], []).append(i)
    out = []
    for col in frame.columns:
        matches: dict[int, list[int]] = {}
        for r, v in enumerate(frame[col].tolist()):
            if v is pd.NA or v is None:
                continue
            v = str(v)
            if v in names:
                matches.setdefault(names[v], []).append(r)
            elif "/" not in v and len(stems.get(v, [])) == 1:
                matches.setdefault(stems[v][0], []).append(r)
        if matches:
            out.append(_Candidate("image name", [col], matches))
    return out


def _by_path(
    frame: pd.DataFrame, images: Sequence[MicroscopyImage], root: Path
) -> list[_Candidate]:
    owner, base = {}, {}
    for i, img in enumerate(images):
        for f in _image_files(img):
            owner[f] = i
            base.setdefault(Path(f).name, set()).add(i)
    # a bare file name matches where it names one image's file only (names repeat across plates)
    base = {k: next(iter(v)) for k, v in base.items() if len(v) == 1}
    cols, matches = [], {}
    for col in frame.columns:
        hit = False
        for r, v in enumerate(frame[col].tolist()):
            if v is pd.NA or v is None or not str(v):
                continue
            p = Path(str(v))
            i = owner.get(str((p if p.is_absolute() else root / p).resolve()))
            if i is None and p.name == str(v):
                i = base.get(p.name)
            if i is not None:
                hit = True
                if r not in matches.setdefault(i, []):
                    matches[i].append(r)
        if hit:
            cols.append(col)
    return [_Candidate("file path", cols, matches)] if cols else []


def _by_pws(frame: pd.DataFrame, images: Sequence[MicroscopyImage]) -> list[_Candidate]:
    found = _pws_columns(frame)
    if "well" not in found:
        return []
    keys = [k for k in ("plate", "well", "site") if k in found]
    image_keys = {}
    for i, img in enumerate(images):
        pws = _image_pws(img)
        if all(pws[k] is not None for k in keys):
            image_keys.setdefault(tuple(pws[k] for k in keys), []).append(i)
    norm = {"plate": lambda v: str(v).strip(), "well": well_key, "site": site_key}
    matches: dict[int, list[int]] = {}
    for r in range(len(frame)):
        row = frame.iloc[r]
        key = tuple(norm[k](row[found[k]]) if row[found[k]] is not pd.NA else None for k in keys)
        for i in image_keys.get(key, []):
            matches.setdefault(i, []).append(r)
    return [_Candidate("plate/well/site", [found[k] for k in keys], matches)] if matches else []


def _hint(frame: pd.DataFrame, images: Sequence[MicroscopyImage], root: Path) -> str:
    """The forms that would join, shown with this data's own values."""
    img = images[0]
    forms = [f"a column 'image' with the image names (e.g. {img.name!r})"]
    files = [Path(p) for p in img.source if Path(p).is_file()]
    if files:
        try:
            rel = files[0].resolve().relative_to(root.resolve())
            forms.append(f"a column of file paths relative to the table's folder (e.g. '{rel}')")
        except ValueError:
            forms.append(f"a column of file paths (e.g. '{files[0].resolve()}')")
    pws = _image_pws(img)
    if pws["well"] is not None:
        shown = ", ".join(f"{k} {v!r}" for k, v in pws.items() if v is not None)
        forms.append(f"columns plate, well, site ({shown})")
    return "give the table " + ", or ".join(forms)


def _refuse_nothing(frame: pd.DataFrame, images, path: Path, root: Path) -> None:
    first = ", ".join(f"{c}={frame.iloc[0][c]}" for c in list(frame.columns)[:4])
    raise MaeprobeInputError(
        f"no row of {path} matches any of the {len(images)} images by name, file path or "
        f"plate/well/site (first row: {first}; first image: {images[0].name!r})",
        _hint(frame, images, root),
    )


def _choose(cands: list[_Candidate]) -> _Candidate | None:
    if not cands:
        return None
    order = {"image name": 0, "file path": 1, "plate/well/site": 2}
    return max(cands, key=lambda c: (len(c.matches), -order[c.key]))


def _refuse_duplicates(cand: _Candidate, frame: pd.DataFrame, images, path: Path) -> None:
    dupes = [(i, rows) for i, rows in cand.matches.items() if len(rows) > 1]
    if dupes:
        i, rows = dupes[0]
        raise MaeprobeInputError(
            f"{path}: {len(rows)} rows for image {images[i].name!r} "
            f"({', '.join(_row_label(frame, r, cand.columns) for r in rows[:3])}), "
            f"{len(dupes)} image(s) with duplicate rows",
            f"keep one row per image ({'/'.join(cand.columns)} must be unique)",
        )


# --------------------------------------------------------------------------- joins


def join_metadata(
    images: Sequence[MicroscopyImage], table: str | Path
) -> tuple[list[MicroscopyImage], MetadataJoin]:
    """Join a per-image table onto the images: its columns become observation columns of every
    row of the matched image (merged with what the reader found, e.g. plate/well/site).

    The key is found from the table: a column holding the image names, columns holding paths of
    the images' files (relative to the table's folder, or absolute), or plate / well / site
    columns matched to each image's ``metadata["obs"]``; the key that matches most images wins.
    Refused: a table that matches no image (with the forms that would), two rows for one image,
    and columns that the schema reserves. Path columns used as the key are not copied."""
    path = Path(table)
    frame, notes = read_table(path)
    root = path.resolve().parent
    if not images:
        raise MaeprobeInputError("no images to join metadata onto", "pass images to embed")
    cands = _by_name(frame, images) + _by_path(frame, images, root) + _by_pws(frame, images)
    cand = _choose(cands)
    if cand is None:
        _refuse_nothing(frame, images, path, root)
    _refuse_duplicates(cand, frame, images, path)
    drop = set(cand.columns) if cand.key in ("image name", "file path") else set()
    _check_reserved(frame.drop(columns=sorted(drop)), path, set())
    used = {r for rows in cand.matches.values() for r in rows}
    join = MetadataJoin(
        cand.key, list(cand.columns), len(images), len(cand.matches),
        unmatched_rows=[_row_label(frame, r, cand.columns) for r in range(len(frame))
                        if r not in used],
        unmatched_images=[img.name for i, img in enumerate(images) if i not in cand.matches],
        notes=notes,
    )  # fmt: skip
    keep = [c for c in frame.columns if c not in drop]
    out = []
    for i, img in enumerate(images):
        obs = dict(img.metadata.get("obs", {}) or {})
        if i in cand.matches:
            row = frame.iloc[cand.matches[i][0]]
            obs.update({c: str(row[c]) for c in keep if row[c] is not pd.NA})
        out.append(img.with_data(img.data, metadata={**img.metadata, "obs": obs}))
    return out, join


def _cell_id_column(frame: pd.DataFrame) -> str | None:
    for col in frame.columns:
        if col.lower().removeprefix("metadata_") in CELL_ID_NAMES:
            return col
    return None


def join_cell_metadata(
    images: Sequence, table: str | Path
) -> tuple[list, MetadataJoin]:
    """Join a per-cell table onto the images' cells: its columns become observation columns of
    each cell's rows. For a crop stack (one input), the table's rows are its crops in order
    (same number of rows); otherwise the table needs a cell id column (``cell_id``, ``label``,
    ...: the label value) and, with several images, a column naming the image (its name or
    one of its file paths). The per-cell values are kept in ``metadata["cell_obs"]`` (a frame
    indexed by cell id)."""
    from napari_maeprobe.io.crops import CropStack

    path = Path(table)
    frame, notes = read_table(path)
    root = path.resolve().parent
    images = list(images)
    if any(isinstance(im, CropStack) for im in images):
        if len(images) != 1:
            raise MaeprobeInputError(
                "a per-cell table in row order fits one crop stack, but several inputs were given",
                "embed each crop stack on its own with its --cell-metadata table",
            )
        stack = images[0]
        if len(frame) != stack.n_crops:
            raise MaeprobeInputError(
                f"{path} has {len(frame)} rows but the crop stack {stack.name} has "
                f"{stack.n_crops} crops",
                "give one row per crop, in the stack's order",
            )
        _check_reserved(frame, path, set())
        cells = frame.copy()
        cells.index = pd.Index(range(stack.n_crops), name="cell_id")
        n = stack.n_crops
        join = MetadataJoin("row order", [], n, n, notes=notes, unit=f"crops of {stack.name}")
        return [stack.with_cell_obs(cells)], join
    id_col = _cell_id_column(frame)
    if id_col is None:
        raise MaeprobeInputError(
            f"{path} has no cell id column (columns: {', '.join(frame.columns)})",
            "add a column 'cell_id' with each cell's label value in the label image",
        )
    rest = frame.drop(columns=[id_col])
    if len(images) == 1 and not (_by_name(rest, images) or _by_path(rest, images, root)):
        cand = _Candidate("cell id", [], {0: list(range(len(frame)))})
    else:
        cand = _choose(_by_name(rest, images) + _by_path(rest, images, root) +
                       _by_pws(rest, images))  # fmt: skip
        if cand is None:
            _refuse_nothing(rest, images, path, root)
    ids = pd.to_numeric(frame[id_col], errors="coerce")
    if ids.isna().any() or (ids % 1 != 0).any() or (ids < 1).any():
        r = int(ids[ids.isna() | (ids % 1 != 0) | (ids < 1)].index[0])
        raise MaeprobeInputError(
            f"{path}: {id_col} {frame.iloc[r][id_col]!r} on row {r + 2} is not a cell label "
            "(a positive whole number)",
            "give each cell's label value in the label image",
        )
    drop = set(cand.columns) | {id_col}
    keep = [c for c in frame.columns if c not in drop]
    _check_reserved(frame[keep], path, set())
    out, used = [], set()
    for i, img in enumerate(images):
        rows = cand.matches.get(i, [])
        used.update(rows)
        cells = frame.iloc[rows][keep].copy()
        cells.index = pd.Index(ids.iloc[rows].astype(int).to_numpy(), name="cell_id")
        dup = cells.index[cells.index.duplicated()]
        if len(dup):
            raise MaeprobeInputError(
                f"{path}: {len(dup)} cell id(s) appear twice for image {img.name!r}, e.g. "
                f"{id_col} {int(dup[0])}",
                f"keep one row per image and {id_col}",
            )
        out.append(img.with_data(img.data, metadata={**img.metadata, "cell_obs": cells}))
    join = MetadataJoin(
        f"{cand.key} + {id_col}" if cand.columns else id_col, list(cand.columns) + [id_col],
        len(images), sum(1 for i in range(len(images)) if cand.matches.get(i)),
        unmatched_rows=[_row_label(frame, r, [id_col]) for r in range(len(frame))
                        if r not in used],
        unmatched_images=[img.name for i, img in enumerate(images) if not cand.matches.get(i)],
        notes=notes,
    )  # fmt: skip
    return out, join
