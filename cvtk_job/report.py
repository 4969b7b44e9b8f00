"""X.report.html: one self-contained page per run that people open (from S3, a laptop, a mail): the run's
summary, the training and validation curves, the metric tables, the confusion matrix, the count errors and a
gallery of test images with the ground truth beside the predictions, worst counted first.

Every picture is a PNG or JPEG inline (data: URIs); the page has no script, no stylesheet or font to fetch,
and nothing that reaches a network. Plots are matplotlib's (Agg), written from the stats files themselves, so
the page shows the numbers the files hold.
"""

import base64
import html
import io
import math

import numpy as np

GALLERY = 12  # test images shown, worst count error first
GALLERY_WIDTH = 560  # pixels of each side of a gallery pair


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _plt().close(fig)
    return buffer.getvalue()


def _img(data, alt, mime="image/png", width=None):
    size = f' style="max-width:{width}px"' if width else ""
    return (f'<img alt="{html.escape(alt)}"{size} '
            f'src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}">')


def curves(train_rows, valid_rows):
    """Training loss (and validation loss when there is one) per epoch beside the validation mAP."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ax = axes[0]
    xs = [r["epoch"] for r in train_rows]
    ax.plot(xs, [r.get("loss", float("nan")) for r in train_rows], marker="o", label="training loss")
    val_loss = [(r["epoch"], r["val_loss"]) for r in train_rows if r.get("val_loss", -1) != -1]
    if val_loss:
        ax.plot(*zip(*val_loss, strict=True), marker="s", label="validation loss")
    ax.set(title="Loss per epoch", xlabel="epoch", ylabel="loss")
    ax.legend()
    ax = axes[1]
    for key in ("coco/segm_mAP", "coco/bbox_mAP", "coco/segm_mAP_50", "coco/bbox_mAP_50"):
        points = [(r["step"], r[key]) for r in valid_rows if r.get(key, -1) != -1]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=key.split("/")[1])
    ax.set(title="Validation mAP per epoch", xlabel="epoch", ylabel="mAP", ylim=(0, 1))
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no validation set (--valid)", ha="center", va="center", transform=ax.transAxes)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return _png(fig)


def confusion_plot(confusion):
    plt = _plt()
    labels, counts = confusion["labels"], np.array(confusion["counts"])
    size = 1.0 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"Confusion matrix\n(IoU >= {confusion.get('iou', 0.5)}, each class's threshold)")
    top = counts.max() if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    fig.colorbar(image, ax=ax, label="detections / objects")
    fig.tight_layout()
    return _png(fig)


def pr_plot(best_f1):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, row in best_f1.items():
        curve = row["pr_curve"]
        if curve["recall"]:
            line = ax.plot(curve["recall"], curve["precision"], label=name)[0]
            ax.plot([row["recall"]], [row["precision"]], marker="o", color=line.get_color())
    ax.set(title="Precision-recall per class (dot: best F1)", xlabel="recall", ylabel="precision", xlim=(0, 1.02),
           ylim=(0, 1.02))
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def count_plot(counts):
    plt = _plt()
    classes = [c for c in counts["per_class"] if c != "all"]
    n = max(1, len(classes))
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 3.6), squeeze=False)
    for ax, name in zip(axes.flat, classes, strict=False):
        row = counts["per_class"][name]
        true, pred = row["true"], row["predicted"]
        ax.scatter(true, pred, alpha=0.7)
        top = max(true + pred + [1])
        ax.plot([0, top], [0, top], color="grey", linewidth=1, linestyle="--")
        ax.set(title=f"{name}: MAE {row['mae']:.2f}, R² {row['r2']:.2f}", xlabel="true count per image",
               ylabel="predicted count per image")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _table(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def _gallery_images(gt, detections, root, thresholds, counts, task):
    """(file name, ground-truth JPEG, prediction JPEG, count error) of the worst-counted test images."""
    import os

    import cv2
    from pycocotools import mask as mask_utils

    from . import drawing

    classes = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    index = {c["id"]: k for k, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
    per_class = [counts["per_class"][n] for n in classes]
    errors = [sum(abs(c["predicted"][i] - c["true"][i]) for c in per_class) for i in range(len(counts["images"]))]
    order = sorted(range(len(gt["images"])), key=lambda i: -errors[i])[:GALLERY]
    out = []
    for i in order:
        img = gt["images"][i]
        image = cv2.imread(os.path.join(root, img["file_name"]), cv2.IMREAD_COLOR)
        if image is None:
            continue
        height, width = image.shape[:2]
        pair = []
        for records in ([dict(a, score=1.0) for a in gt["annotations"] if a["image_id"] == img["id"]
                         and not a.get("iscrowd")],
                        [a for a in detections if a["image_id"] == img["id"]
                         and a["score"] >= thresholds.get(a["category_id"], 0.0)]):
            found, crops = [], []
            for a in records:
                found.append({"label": index[a["category_id"]], "score": a["score"], "bbox": a["bbox"]})
                seg = a.get("segmentation") if task == "segm" else None
                if seg:
                    rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg, list) or \
                        isinstance(seg.get("counts"), list) else {"size": seg["size"], "counts": seg["counts"]
                                                                  .encode() if isinstance(seg["counts"], str)
                                                                  else seg["counts"]}
                    rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
                    full = mask_utils.decode(rle)
                    x, y, w, h = mask_utils.toBbox(rle)
                    x0, y0 = int(math.floor(x)), int(math.floor(y))
                    crops.append((full[y0:int(math.ceil(y + h)), x0:int(math.ceil(x + w))].astype(bool), x0, y0))
            max_pixels = GALLERY_WIDTH * GALLERY_WIDTH * height / width
            small, shown, crops_, _ = drawing.fit(image, found, crops if task == "segm" else None, max_pixels)
            drawn = drawing.draw(small, shown, classes, crops=crops_)
            pair.append(cv2.imencode(".jpg", drawn, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
        out.append((img["file_name"], pair[0], pair[1], errors[i]))
    return out


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0;display:block;overflow-x:auto}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.pair{display:flex;gap:8px;margin:8px 0}
.pair div{flex:1}.note{color:#555;font-size:0.9em}"""


def write(path, summary, train_rows, valid_rows, stats=None, gallery=None):
    """The page, written atomically. `summary`: {label: value} of the run; `stats`: test_stats.json's content
    (None: no test yet); `gallery`: `_gallery_images`'s list."""
    from . import artifacts

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(summary.get('run', 'run'))}"
             f" report</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(summary.get('run', 'run'))}: report</h1>",
             _table(["", ""], [(k, v) for k, v in summary.items()])]
    if train_rows:
        parts += ["<h2>Curves</h2>", _img(curves(train_rows, valid_rows), "training and validation curves")]
    if valid_rows:
        keys = [k for k in valid_rows[-1] if k.startswith("coco/") or k == "val_loss"]
        parts += ["<h2>Validation per epoch</h2>",
                  _table(["epoch", *keys], [(int(r["step"]), *(r.get(k, -1.0) for k in keys)) for r in valid_rows])]
    if stats:
        keys = list(stats["stats"])
        parts += [f"<h2>Test metrics</h2><p class='note'>COCO metrics; every AP at {stats.get('max_dets', 100)} "
                  "detections per image; -1: no object of that size.</p>",
                  _table(["", *keys], [("all", *stats["stats"].values())]
                         + [(name, *(row[k] for k in keys)) for name, row in stats["class_stats"].items()])]
        best = stats.get("best_f1") or {}
        parts += [f"<h2>Per class at the F1-optimal threshold</h2><p class='note'>Detections matched at IoU >= "
                  f"{stats.get('match_iou', 0.5)}; the threshold is the score that maximises F1 (inference "
                  "--score_threshold auto uses it).</p>",
                  _table(["class", "threshold", "precision", "recall", "F1", "objects", "detections"],
                         [(n, r["threshold"], r["precision"], r["recall"], r["f1"], r["objects"], r["detections"])
                          for n, r in best.items()]),
                  _img(pr_plot(best), "precision-recall curves")]
        confusion = stats.get("confusion_matrix")
        if confusion:
            labels = confusion["labels"]
            parts += ["<h2>Confusion matrix</h2><p class='note'>Rows: true class; columns: predicted class. The "
                      "background row counts detections of nothing, the background column objects nothing "
                      "detected.</p>",
                      _table(["true \\ predicted", *labels],
                             [(labels[i], *row) for i, row in enumerate(confusion["counts"])]),
                      _img(confusion_plot(dict(confusion, iou=stats.get("match_iou", 0.5))), "confusion matrix")]
        counts = stats.get("counts")
        if counts:
            parts += ["<h2>Counts per image</h2><p class='note'>Predicted vs true number of objects per test "
                      "image, at each class's threshold.</p>",
                      _table(["class", "MAE", "RMSE", "R²"],
                             [(n, r["mae"], r["rmse"], r["r2"]) for n, r in counts["per_class"].items()]),
                      _img(count_plot(counts), "count scatter")]
    if gallery:
        parts.append("<h2>Test images: ground truth (left) and predictions (right), worst counted first</h2>")
        for name, truth, predicted, error in gallery:
            parts.append(f"<p class='note'>{html.escape(name)}: count off by {error}</p><div class='pair'>"
                         f"<div>{_img(truth, name + ' ground truth', 'image/jpeg', GALLERY_WIDTH)}</div>"
                         f"<div>{_img(predicted, name + ' predictions', 'image/jpeg', GALLERY_WIDTH)}</div></div>")
    parts.append("</body></html>")
    artifacts.write_text(path, "\n".join(parts))


def gallery(gt, detections, root, stats, task):
    """The gallery for `write` from test_stats.json's content (thresholds and counts) and the detections."""
    names = {c["name"]: c["id"] for c in gt["categories"]}
    thresholds = {names[n]: r["threshold"] for n, r in (stats.get("best_f1") or {}).items() if n in names}
    return _gallery_images(gt, detections, root, thresholds, stats["counts"], task)
