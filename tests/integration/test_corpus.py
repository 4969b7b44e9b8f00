"""The trust-boundary corpus: every mistake a user (or a stranger's file) can make, through the real CLI.

Each case is one broken input to `validate`, `train`, `inference` or `evaluate`, locally and on the real
S3 server. The promise checked for every one: exit 2, exactly one error line that names the file (or
argument) and the record, no traceback, nothing written under the output (local folder or S3 prefix),
and, for mistakes that need no data, an answer within 2 s. The legitimate variants that a too-strict
checker would refuse (BOM and CRLF label files, an EXIF-rotated photo whose JSON gives its displayed size)
train, in test_legitimate_variants_train_and_the_dry_run_config_is_the_runs_config.
"""

import io
import json
import time
import uuid
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SPEED, TINY_MODELS, run_cli

pytestmark = pytest.mark.slow
QUICK_S = 2.0
LABELS = "flower\ngreen_fruit\nred_fruit\n"


def _png(path, width, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)


def _rotated_jpeg(path, width, height):
    """A JPEG stored width x height whose EXIF says: turn 90 degrees (viewers show height x width)."""
    im = Image.fromarray(np.full((height, width, 3), 120, np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", exif=exif.tobytes())


def _coco(root):
    """A small valid COCO file (two images on disk) to break one record at a time."""
    _png(root / "images" / "a.png", 32, 24)
    _png(root / "images" / "b.png", 16, 16)
    return {"images": [{"id": 1, "file_name": "images/a.png", "width": 32, "height": 24},
                       {"id": 2, "file_name": "images/b.png", "width": 16, "height": 16}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [2, 2, 10, 8], "area": 80,
                             "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [4, 4, 8, 8], "area": 64,
                             "iscrowd": 0, "segmentation": {"size": [16, 16], "counts": "T2880000000000000l1"}}],
            "categories": [{"id": 0, "name": "flower"}, {"id": 1, "name": "green_fruit"},
                           {"id": 2, "name": "red_fruit"}]}


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _broken_coco(change):
    """A validate case: the sample COCO with one change (a function of the data, or replaced text)."""
    def build(c):
        data = _coco(c.tmp)
        text = change(data)
        path = _write(c.tmp / "broken.json", text if text is not None else data)
        return ["validate", "--label", _write(c.tmp / "label.txt", LABELS), path], path
    return build


def _zip_not_torch(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return path


def _torch_file(path, obj):
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _other_architecture(path):
    import torch

    return _torch_file(path, {"state_dict": {"classifier.weight": torch.zeros(10, 4)}})


def _head_of_four_classes(path):
    import torch

    state = {"roi_head.bbox_head.fc_cls.weight": torch.zeros(5, 8), "roi_head.bbox_head.fc_cls.bias": torch.zeros(5)}
    return _torch_file(path, {"meta": {}, "state_dict": state})


class Ctx:
    def __init__(self, tmp, data, weights, s3=None, bucket=None):
        self.tmp, self.data, self.weights, self.s3, self.bucket = tmp, data, weights, s3, bucket
        self.out = tmp / "out"

    def train(self, **changes):
        args = {"--label": self.data / "label.txt", "--train": self.data / "train" / "segm.json",
                "--output_weights": self.out / "strawberry.pth", "--model": TINY_MODELS["segm"], "--epoch": "1"}
        args.update(changes)
        return ["train", *SPEED, *[x for k, v in args.items() if v is not None for x in (k, v)]]

    def inference(self, **changes):
        args = {"--label": self.data / "label.txt", "--data": self.data / "test" / "images",
                "--model_weights": self.weights, "--output": self.out, "--device": "cpu"}
        args.update(changes)
        return ["inference", *[x for k, v in args.items() if v is not None for x in (k, v)]]

    def s3_uri(self, key):
        return f"s3://{self.bucket}/{key}"

    def put(self, key, body):
        self.s3.client().put_object(Bucket=self.bucket, Key=key, Body=body)
        return self.s3_uri(key)


def _list_file(c, lines):
    return _write(c.tmp / "list.txt", "".join(f"{line}\n" for line in lines))


def _evaluate(c, annotations, iou_type="bbox"):
    gt = c.data / "test" / "segm.json"
    preds = {"images": json.loads(gt.read_text())["images"], "annotations": annotations}
    return ["evaluate", "--gt", gt, "--pred", _write(c.tmp / "pred.json", preds), "--output",
            c.out / "stats.json", "--iou_type", iou_type]


# (id, needs data (False: must answer within QUICK_S), build(ctx) -> argv or (argv, file named), expected text)
LOCAL = [
    # validate: structure
    ("image id is a list", False, _broken_coco(lambda d: d["images"].append(dict(d["images"][1], id=[3]))),
     "image id [3] (images/b.png): an image needs an integer 'id' and a 'file_name'"),
    ("image id is true", False, _broken_coco(lambda d: d["images"].append(dict(d["images"][1], id=True))),
     "image id true (images/b.png): an image needs an integer 'id'"),
    ("annotation image_id is a dict", False, _broken_coco(lambda d: d["annotations"][0].update(image_id={"a": 1})),
     'annotation id 1: image_id {"a": 1} is not in images'),
    ("category_id is a list", False, _broken_coco(lambda d: d["annotations"][0].update(category_id=[0])),
     "annotation id 1 (images/a.png): category_id [0] is not in categories"),
    ("image record is a string", False, _broken_coco(lambda d: d["images"].append("c.png")),
     'image record: "c.png" is not an object'),
    ("category is not an object", False, _broken_coco(lambda d: d["categories"].append(3)),
     "category record: 3 needs an integer 'id' and a 'name'"),
    ("file_name is a number", False, _broken_coco(lambda d: d["images"][0].update(file_name=7)),
     "image id 1 (7): an image needs an integer 'id' and a 'file_name'"),
    ("NaN in a bbox", False, _broken_coco(lambda d: json.dumps(d).replace("[2, 2, 10, 8]", "[2, NaN, 10, 8]")),
     "line 1: NaN is not a JSON number; write finite numbers only"),
    ("Infinity as an area", False, _broken_coco(lambda d: json.dumps(d).replace('"area": 80', '"area": Infinity')),
     "line 1: Infinity is not a JSON number"),
    ("1e400 in a bbox", False, _broken_coco(lambda d: json.dumps(d).replace("[2, 2, 10, 8]", "[2, 2, 1e400, 8]")),
     "annotation id 1 (images/a.png): bbox [2, 2, Infinity, 8] is not [x, y, width, height] of finite numbers"),
    ("polygon holds a string", False, _broken_coco(lambda d: d["annotations"][0].update(segmentation=[[2, 2, "x", 2,
                                                                                                    12, 10]])),
     "annotation id 1 (images/a.png): segmentation polygon 0 is not a list of numbers"),
    ("RLE counts do not decode", False, _broken_coco(lambda d: d["annotations"][1]["segmentation"].update(
        counts="T2~~~")), "annotation id 2 (images/b.png): RLE counts do not decode"),
    ("RLE counts do not cover the image", False, _broken_coco(lambda d: d["annotations"][1]["segmentation"].update(
        counts=[10, 20])), "annotation id 2 (images/b.png): RLE counts cover 30 pixels, not 16x16 = 256"),
    ("iscrowd is 2", False, _broken_coco(lambda d: d["annotations"][0].update(iscrowd=2)),
     "annotation id 1 (images/a.png): iscrowd 2 is not 0 or 1"),
    ("file_name climbs out", False, _broken_coco(lambda d: d["images"][0].update(file_name="../../etc/a.png")),
     "image id 1 (../../etc/a.png): '../../etc/a.png' climbs out of the file's folder with '..'"),
    ("COCO file starts with a BOM", False, _broken_coco(lambda d: "\ufeff" + json.dumps(d)),
     "line 1: starts with a byte-order mark (BOM); save the file as UTF-8 without BOM"),
    ("COCO file is not UTF-8", False, _broken_coco(lambda d: json.dumps(d).replace("flower", "fl\u00f6wer").encode(
        "latin-1")), "line 1: not UTF-8 text (invalid start byte at byte"),
    ("JSON nested too deeply", False, _broken_coco(lambda d: "[" * 100000 + "]" * 100000),
     "file: nested too deeply"),
    ("EXIF photo with its stored size", True, lambda c: _exif_case(c, displayed=False),
     "image id 1 (images/rot.jpg): the JSON says 40x20 but the image file is 20x40"),
    # label files
    ("label file is not UTF-8", False, lambda c: ["validate", "--label", _write(c.tmp / "l.txt", "flower\nbl\xfcte\n"
                                                  .encode("latin-1")), _write(c.tmp / "x.json", _coco(c.tmp))],
     "l.txt: line 2: not UTF-8 text"),
    ("JSON label file with a non-object category", False,
     lambda c: ["validate", "--label", _write(c.tmp / "l.json", {"categories": [{"id": 0, "name": "flower"}, "fruit"]}),
                _write(c.tmp / "x.json", _coco(c.tmp))], 'l.json: categories[1]: "fruit" needs an integer'),
    # train: decided before any download
    ("--lr is not a number", False, lambda c: c.train(**{"--lr": "fast"}), "--lr fast: not a number"),
    ("--lr is not finite", False, lambda c: c.train(**{"--lr": "inf"}), "--lr inf: the learning rate must be"),
    ("--time_limit is not a duration", False, lambda c: c.train(**{"--time_limit": "soon"}),
     "--time_limit 'soon': give a duration"),
    ("--model config does not parse", False,
     lambda c: c.train(**{"--model": _write(c.tmp / "bad.py", "model = dict(\n")}),
     "bad.py: cannot be read as an MMEngine config"),
    ("--model config names an unknown type", True,
     lambda c: c.train(**{"--model": _write(c.tmp / "typo.py", f"_base_ = ['{TINY_MODELS['segm']}']\n"
                                                                "model = dict(type='MaskRCN')\n")}),
     "typo.py: its model does not build (KeyError"),
    ("--model config is no detector", False,
     lambda c: c.train(**{"--model": _write(c.tmp / "x.py", "a = 1\n")}),
     "x.py: has no `model` and `train_dataloader`"),
    ("--output_weights is a folder", False, lambda c: c.train(**{"--output_weights": c.tmp}), "is a folder; name the"),
    ("--valid does not exist", False, lambda c: c.train(**{"--valid": c.tmp / "nope.json"}),
     "--valid " + "{tmp}/nope.json: file not found"),
    ("--resume is a zip but no checkpoint", False,
     lambda c: c.train(**{"--resume": _zip_not_torch(c.tmp / "r.pth")}), "r.pth: not a readable torch checkpoint"),
    ("--resume holds a bare tensor", True, lambda c: c.train(**{"--resume": _tensor_pth(c)}),
     "t.pth: holds a Tensor, not a model checkpoint"),
    ("--pretrained is a zip but no checkpoint", False,
     lambda c: c.train(**{"--pretrained": _zip_not_torch(c.tmp / "p.pth")}), "p.pth: not a readable torch checkpoint"),
    ("--pretrained of another architecture", True,
     lambda c: c.train(**{"--pretrained": _other_architecture(c.tmp / "other.pth")}),
     "other.pth: none of its 1 tensors fits this model"),
    # inference: weights and names checked before any image is read
    ("--output is an existing file", False, lambda c: c.inference(**{"--output": _write(c.tmp / "o.txt", "x")}),
     "o.txt: is an existing file; give a folder"),
    ("weights: a zip but no checkpoint", False,
     lambda c: c.inference(**{"--model_weights": _zip_not_torch(c.tmp / "w.pth")}),
     "w.pth: not a readable torch checkpoint"),
    ("weights: a bare tensor", True, lambda c: c.inference(**{"--model_weights": _tensor_pth(c)}),
     "t.pth: holds a Tensor, not a model checkpoint"),
    ("weights: no state_dict", True, lambda c: c.inference(**{"--model_weights": _torch_file(c.tmp / "n.pth",
                                                                                          {"epoch": 3})}),
     "n.pth: holds no state_dict of tensors"),
    ("weights: a head of another size", True,
     lambda c: c.inference(**{"--model_weights": _head_of_four_classes(c.tmp / "h.pth")}),
     "h.pth: its head predicts 4 classes but the label file lists 3"),
    ("list entry climbs out", True, lambda c: c.inference(**{"--data": _list_file(c, ["../x.jpg"])}),
     "list.txt: line 1: '../x.jpg' climbs out of the file's folder"),
    # evaluate
    ("predictions without image_id", False, lambda c: _evaluate(c, [{"category_id": 0, "bbox": [1, 1, 2, 2],
                                                                    "score": 0.5}]), "image_id must be an integer"),
    ("evaluate --output is a folder", False, lambda c: [*_evaluate(c, [])[:-4], "--output", _mkdir(c.out)],
     "out: is a folder; name the stats file"),
    ("predicted RLE does not decode", False, lambda c: _evaluate(c, [{"image_id": 1, "category_id": 0, "score": 0.5,
                                                                      "bbox": [1, 1, 2, 2], "segmentation": {
                                                                          "size": [4, 4], "counts": "~~"}}], "segm"),
     "RLE counts do not decode"),
]


def _mkdir(path):
    path.mkdir(parents=True)
    return path


def _tensor_pth(c):
    import torch

    return _torch_file(c.tmp / "t.pth", torch.zeros(3))


def _exif_case(c, displayed):
    _rotated_jpeg(c.tmp / "images" / "rot.jpg", 40, 20)  # stored 40x20, shown 20x40
    size = (20, 40) if displayed else (40, 20)
    data = {"images": [{"id": 1, "file_name": "images/rot.jpg", "width": size[0], "height": size[1]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [2, 2, 10, 10], "area": 100,
                             "iscrowd": 0}], "categories": [{"id": 0, "name": "flower"}]}
    return ["validate", "--label", _write(c.tmp / "l.txt", "flower\n"), _write(c.tmp / "rot.json", data)]


S3 = [
    ("S3 key with a '..' segment", False, lambda c: c.train(**{"--label": c.s3_uri("strawberry/../label.txt"),
                                                               "--output_weights": c.s3_uri("out/x.pth")}),
     "strawberry/../label.txt: its key has a '..' segment"),
    ("S3 list file with an absolute entry", True,
     lambda c: c.inference(**{"--data": c.put("lists/abs.txt", b"/etc/hostname.jpg\n"),
                              "--output": c.s3_uri("out/pred")}),
     "lists/abs.txt: '/etc/hostname.jpg' is an absolute path in a file on S3"),
    ("S3 COCO file_name climbs out", True,
     lambda c: c.train(**{"--train": c.put("strawberry/up.json", json.dumps(
         {"images": [{"id": 1, "file_name": "../secret.jpg", "width": 8, "height": 8}], "annotations": [],
          "categories": [{"id": 0, "name": "flower"}]}).encode()), "--output_weights": c.s3_uri("out/x.pth")}),
     "up.json: '../secret.jpg' climbs out of the file's folder"),
    ("S3 without credentials", False, lambda c: (c.train(**{"--label": c.s3_uri("strawberry/label.txt"),
                                                            "--output_weights": c.s3_uri("out/x.pth")}),
                                                 {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}),
     "strawberry/label.txt: no S3 credentials found"),
    ("S3 output of a broken dataset", True, lambda c: c.train(**{
        "--train": c.put("strawberry/train/nan.json", (c.data / "train" / "segm.json").read_text().replace(
            '"area": ', '"area": NaN, "x": ', 1).encode()), "--output_weights": c.s3_uri("out/x.pth")}),
     "strawberry/train/nan.json: line 1: NaN is not a JSON number"),
]


def _check(result, expected, elapsed, quick, out_files):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert expected in errors[0], errors[0]
    assert result.stdout == ""
    assert out_files == [], out_files
    if quick:
        assert elapsed < QUICK_S, f"{elapsed:.2f} s for a mistake that needs no data"


def _run(build, ctx):
    built = build(ctx)
    env = {}
    if isinstance(built, tuple) and isinstance(built[1], dict):
        built, env = built
    argv = built[0] if isinstance(built, tuple) else built
    start = time.monotonic()
    result = run_cli(*argv, env={**ctx.env, **env})
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
def weights(trained_segm):
    return trained_segm


def test_the_corpus_has_at_least_30_cases():
    assert len(LOCAL) + len(S3) >= 30


@pytest.mark.parametrize("name, needs_data, build, expected", LOCAL, ids=[c[0] for c in LOCAL])
def test_local_mistake(tiny_data, weights, tmp_path, name, needs_data, build, expected):
    ctx = Ctx(tmp_path, tiny_data, weights)
    ctx.env = {"CVTK_JOB_CACHE": str(tmp_path / "cache")}
    result, elapsed = _run(build, ctx)
    files = sorted(str(p) for p in ctx.out.rglob("*") if p.is_file()) if ctx.out.exists() else []
    _check(result, expected.replace("{tmp}", str(tmp_path)), elapsed, not needs_data, files)


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_data):
    name = f"corpus-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=name)
    s3_server.upload_tree(tiny_data, name, "strawberry")
    return name


@pytest.mark.parametrize("name, needs_data, build, expected", S3, ids=[c[0] for c in S3])
def test_s3_mistake(s3_server, bucket, tiny_data, weights, tmp_path, name, needs_data, build, expected):
    ctx = Ctx(tmp_path, tiny_data, weights, s3_server, bucket)
    ctx.env = {**s3_server.env(), "CVTK_JOB_CACHE": str(tmp_path / "cache")}
    result, elapsed = _run(build, ctx)
    _check(result, expected, elapsed, not needs_data, s3_server.keys(bucket, "out/"))


def test_exif_rotated_photo_with_its_displayed_size_is_valid(tmp_path):
    argv = _exif_case(Ctx(tmp_path, None, None), displayed=True)
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok\t")


def _legit_dataset(root, data):
    """The tiny sample with a BOM + CRLF label file and one photo stored rotated
    (pixels turned, EXIF orientation 6 turning them back): what phones and Windows tools write."""
    import shutil

    shutil.copytree(data, root, dirs_exist_ok=True)
    (root / "label.txt").write_bytes(b"\xef\xbb\xbf" + LABELS.replace("\n", "\r\n").encode())
    train = root / "train" / "segm.json"
    coco = json.loads(train.read_text())
    first = coco["images"][0]
    path = train.parent / first["file_name"]
    with Image.open(path) as im:
        turned = im.transpose(Image.Transpose.ROTATE_90)  # stored turned; EXIF 6 shows it upright again
        exif = turned.getexif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        turned.save(buf, "JPEG", exif=exif.tobytes())
    path.write_bytes(buf.getvalue())
    return root


def _comparable(config):
    return json.loads(json.dumps(config, default=str))


def test_legitimate_variants_train_and_the_dry_run_config_is_the_runs_config(tiny_data, tmp_path):
    """BOM/CRLF label file, EXIF-rotated photo: accepted and trained; and `--dry_run` prints
    the very config the real run with the same arguments then uses (read back from the X.py it writes)."""
    from cvtk_job import configdata

    data = _legit_dataset(tmp_path / "data", tiny_data)
    out = tmp_path / "out" / "strawberry.pth"
    args = ["train", "--label", data / "label.txt", "--train", data / "train" / "segm.json", "--output_weights", out,
            *SPEED, "--model", TINY_MODELS["det"], "--task", "det", "--epoch", "1"]
    dry = run_cli(*args, "--dry_run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    planned = json.loads(dry.stdout)
    assert planned["plan"]["labels"] == ["flower", "green_fruit", "red_fruit"]

    real = run_cli(*args)
    assert real.returncode == 0, real.stderr[-3000:]
    used = configdata.parse(out.with_suffix(".py").read_text(), "X.py")
    assert _comparable(used) == _comparable(planned["config"])
