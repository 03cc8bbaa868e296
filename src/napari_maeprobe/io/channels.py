"""Channel names: where they come from (tables, file names) and picking channels by name."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.image import MicroscopyImage

CHANNEL_TABLE_FILES = ("panel.csv", "channels.csv")
#: columns of a channel table that hold a usable channel name, best first (a ``channel`` column
#: of plain numbers is an index, not a name, and is passed over)
NAME_COLUMNS = ("name", "marker", "channel", "channel_name", "cellprofiler_name", "target", "stain")
#: columns that hold the part of a per-channel file name that names the channel
TOKEN_COLUMNS = ("file_suffix", "file_token", "suffix", "token")
#: channel tokens in file names: ch1, c02, w1, d0 (ImageXpress), channel3, or colour/stain words
CHANNEL_TOKEN = re.compile(
    r"^(ch|c|w|d|channel)\d+$|^(blue|green|red|yellow|far\w*|dapi|hoechst|gfp|rfp|yfp|cfp|"
    r"fitc|tritc|cy\d|dna|rna|er|mito|agp|actin|tubulin|brightfield|bf|phase)$",
    re.IGNORECASE,
)


def find_channel_table(folder: Path, levels_up: int = 2) -> Path | None:
    """The nearest ``panel.csv``/``channels.csv`` in ``folder`` or up to ``levels_up`` parents."""
    folder = Path(folder)
    for candidate in [folder, *list(folder.parents)[:levels_up]]:
        for fname in CHANNEL_TABLE_FILES:
            if (candidate / fname).is_file():
                return candidate / fname
    return None


def _clean_name(value: str, column: str) -> str:
    value = str(value).strip()
    if column == "cellprofiler_name":  # CellProfiler's NamesAndTypes convention: OrigDNA -> DNA
        value = re.sub(r"^Orig(?=[A-Z])", "", value)
    return value


def read_channel_table(path: Path) -> pd.DataFrame:
    """Read a channel table into rows in channel order with a ``name`` column.

    Keeps rows with ``keep == 1`` when there is such a column (the steinbock/IMC ``panel.csv``)
    and sorts by ``channel_index`` when present; the ``name`` comes from the first of
    :data:`NAME_COLUMNS` that the table has.
    """
    table = pd.read_csv(path)
    table.columns = [str(c).strip().lower() for c in table.columns]
    if "keep" in table.columns:
        table = table[table["keep"].fillna(0).astype(int) == 1]
    if "channel_index" in table.columns:
        table = table.sort_values("channel_index")
    token = next((c for c in TOKEN_COLUMNS if c in table.columns), None)
    if token is not None and token != "file_suffix" and "file_suffix" not in table.columns:
        table = table.rename(columns={token: "file_suffix"})
    column = next((c for c in NAME_COLUMNS if c in table.columns and _names_column(table[c])), None)
    if column is None:
        raise MaeprobeInputError(
            f"channel table {path} has no name column (columns: {', '.join(table.columns)})",
            f"add a column named one of: {', '.join(NAME_COLUMNS)}",
        )
    table = table.reset_index(drop=True)
    table["name"] = [_clean_name(v, column) for v in table[column]]
    check_unique_names(list(table["name"]), f"channel table {path}", "rename them in the table")
    return table


def _names_column(values: pd.Series) -> bool:
    """Whether a column holds names (not only numbers, such as a channel index)."""
    text = [str(v).strip() for v in values.dropna()]
    return bool(text) and not all(re.fullmatch(r"\d+(\.0)?", v) for v in text)


def check_unique_names(names: Sequence[str], where: str, fix: str) -> None:
    """Refuse channel names that repeat, naming the repeated ones: two channels with one name
    could not be told apart when picking channels or reading the table."""
    seen: dict[str, int] = {}
    for n in names:
        seen[str(n)] = seen.get(str(n), 0) + 1
    dup = [n for n, k in seen.items() if k > 1]
    if dup:
        raise MaeprobeInputError(
            f"{where}: channel name(s) {', '.join(repr(d) for d in dup)} given to more than one "
            f"channel ({', '.join(str(n) for n in names)})",
            fix,
        )


def names_from_table(path: Path | None, n_channels: int) -> list[str] | None:
    """Channel names of a multichannel file from a table listing its channels in order.

    Used only when the row count matches ``n_channels`` and the table does not describe
    per-channel files (no ``file``/``file_suffix`` column: such a table says nothing about the
    channel order inside a multichannel file).
    """
    if path is None:
        return None
    table = read_channel_table(path)
    if {"file", "file_suffix"} & set(table.columns) or len(table) != n_channels:
        return None
    return list(table["name"])


def order_files_by_table(
    path: Path | None, files: Sequence[Path], tokens: Sequence[str]
) -> tuple[list[int], list[str]] | None:
    """Match per-channel files to a channel table by its ``file`` or ``file_suffix`` column.

    Returns (file indices in table order, their names), or ``None`` when the table does not
    describe exactly these files.
    """
    if path is None:
        return None
    table = read_channel_table(path)
    by_file = "file" in table.columns
    by_suffix = "file_suffix" in table.columns
    order: list[int] = []
    names: list[str] = []
    for _, row in table.iterrows():
        for i, (f, tok) in enumerate(zip(files, tokens)):
            if (by_file and str(row["file"]) == f.name) or (
                by_suffix and str(row["file_suffix"]).lower() == tok.lower()
            ):
                order.append(i)
                names.append(str(row["name"]))
                break
    if sorted(order) != list(range(len(files))):
        return None
    return order, names


def default_names(n_channels: int) -> list[str]:
    """Names used when nothing better is known: ``c0``, ``c1``, ..."""
    return [f"c{i}" for i in range(n_channels)]


def resolve_channel_names(
    image: MicroscopyImage, requested: Sequence[str]
) -> tuple[list[int], list[str]]:
    """Indices of ``requested`` channels (case-insensitive names or integer positions).

    Raises one error listing every requested channel that the image lacks.
    """
    lookup = {n.lower(): i for i, n in enumerate(image.channel_names)}
    indices: list[int] = []
    missing: list[str] = []
    for req in requested:
        key = str(req).strip()
        if key.lower() in lookup:
            indices.append(lookup[key.lower()])
        elif key.isdigit() and int(key) < image.n_channels:
            indices.append(int(key))
        else:
            missing.append(key)
    if missing:
        raise MaeprobeInputError(
            f"{image.name}: channel(s) {', '.join(repr(m) for m in missing)} not found; the image "
            f"has {', '.join(image.channel_names)}",
            "request channels by one of those names (or their 0-based position), or rename the "
            "channels (channel_names=... / --channel-names)",
        )
    if len(set(indices)) != len(indices):
        raise MaeprobeInputError(
            f"{image.name}: the same channel was requested twice ({', '.join(requested)})",
            "list each channel once",
        )
    return indices, [image.channel_names[i] for i in indices]


def select_channels(image: MicroscopyImage, requested: Sequence[str]) -> MicroscopyImage:
    """Pick and order channels by name, e.g. ``["DNA", "ER", "RNA"]``."""
    indices, names = resolve_channel_names(image, requested)
    return image.with_data(image.data[indices], channel_names=names)
