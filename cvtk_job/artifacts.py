"""Every output file: its name (the tutorial's), and a writer that never leaves half a file.

Writers put the content under a temporary name in the same folder and rename it, so a reader (a
user, the S3 sync, a resumed run) sees either the old file or the new one, never a torn one.
"""

import contextlib
import csv
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass

TRAIN_COLUMNS_FIRST = ["epoch", "lr", "data_time", "loss"]
TRAIN_COLUMNS_LAST = ["time", "memory"]


@dataclass(frozen=True)
class TrainOutputs:
    """File names around `--output_weights OUT/X.pth` (upstream cvtk's names)."""

    prefix: str  # OUT/X

    @classmethod
    def from_weights(cls, output_weights):
        root, ext = os.path.splitext(output_weights)
        return cls(root if ext == ".pth" else output_weights)

    weights = property(lambda self: self.prefix + ".pth")
    config = property(lambda self: self.prefix + ".py")
    workspace = property(lambda self: self.prefix)
    train_txt = property(lambda self: self.prefix + ".train_stats.train.txt")
    train_png = property(lambda self: self.prefix + ".train_stats.train.png")
    valid_txt = property(lambda self: self.prefix + ".train_stats.valid.txt")
    valid_png = property(lambda self: self.prefix + ".train_stats.valid.png")
    test_stats = property(lambda self: self.prefix + ".test_stats.json")
    report = property(lambda self: self.prefix + ".report.html")
    done = property(lambda self: self.prefix + ".done.json")
    failed = property(lambda self: self.prefix + ".failed.json")
    test_outputs = property(lambda self: os.path.join(self.prefix, "test_outputs.coco.json"))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # The temporary name keeps the extension: writers such as mmengine's dump pick the format by it.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{os.path.splitext(path)[1]}",
                               dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def _strict(value):
    """JSON has no NaN/inf: pycocotools' -1 stands for 'undefined'."""
    if isinstance(value, float) and not math.isfinite(value):
        return -1.0
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def write_json(path, data, indent=None):
    text = json.dumps(_strict(data), indent=indent, ensure_ascii=False, allow_nan=False)
    write_text(path, text + "\n")


# ---------------------------------------------------------------------------------------------
# Per-epoch statistics (tab-separated, one row per epoch)


def _format(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_tsv(path, rows, columns):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format(row.get(c, "")) for c in columns])


def read_tsv(path):
    """Rows of a stats file as dicts of floats ({} for blanks); [] when there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]


def _keys_in_order(rows):
    """Every key of the rows, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def train_columns(rows):
    """The tutorial's column order: epoch lr data_time loss <losses in model order> time memory."""
    seen = _keys_in_order(rows)
    middle = [k for k in seen if k not in TRAIN_COLUMNS_FIRST + TRAIN_COLUMNS_LAST]
    return [k for k in TRAIN_COLUMNS_FIRST if k in seen] + middle + [k for k in TRAIN_COLUMNS_LAST if k in seen]


def valid_columns(rows):
    seen = _keys_in_order(rows)
    metrics = [k for k in seen if k.startswith("coco/")]
    return metrics + [k for k in ("data_time", "time", "step") if k in seen]


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, no display)


def plot_stats(path, rows, x, title):
    """One titled panel per quantity against `x`; quantities that never have a value are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {x, "step", "epoch", "time", "data_time", "memory", "val_loss"}  # val_loss: on the loss panel
    columns = [c for c in (train_columns(rows) if x == "epoch" else valid_columns(rows))
               if c not in skip and any(row.get(c, -1.0) != -1.0 for row in rows)]
    if not columns:
        return
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    xs = [row.get(x) for row in rows]
    for ax, column in zip(axes.flat, columns, strict=False):
        ys = [row.get(column, float("nan")) for row in rows]
        ax.plot(xs, ys, marker="o", linewidth=1.5, label="training" if column == "loss" else None)
        if column == "loss" and any(row.get("val_loss", -1.0) != -1.0 for row in rows):
            ax.plot(xs, [row.get("val_loss", float("nan")) for row in rows], marker="s", linewidth=1.5,
                    label="validation")
            ax.legend()
        ax.set_title(column)
        ax.set_xlabel("epoch")
        ax.set_ylabel(column.split("/")[-1])
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_train_stats(outputs, rows):
    write_tsv(outputs.train_txt, rows, train_columns(rows))
    plot_stats(outputs.train_png, rows, "epoch", "Training: per-epoch means over every iteration")


def write_valid_stats(outputs, rows):
    write_tsv(outputs.valid_txt, rows, valid_columns(rows))
    plot_stats(outputs.valid_png, rows, "step", "Validation: COCO metrics after each epoch")


# The output contract: a run's done marker lists exactly the files it wrote, with size and SHA-256.


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def done_marker(paths, root):
    """The success record: each output (relative to root) with its size and SHA-256."""
    return {"outputs": [{"path": os.path.relpath(p, root).replace(os.sep, "/"), "size": os.path.getsize(p),
                         "sha256": sha256(p)} for p in sorted(paths) if os.path.isfile(p)]}
