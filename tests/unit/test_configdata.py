"""configdata: saved MMEngine configs are read as data; anything that is code is refused in one line."""

import math

import pytest

from cvtk_job import configdata
from cvtk_job.errors import UserError


def test_a_dumped_mmdet_config_reads_back_equal_to_what_mmengine_executes(tmp_path):
    """The real dump of the default model's config: the data reader and mmengine's executor agree."""
    from mmengine.config import Config

    from cvtk_job import mmconfig

    cfg = Config.fromfile(mmconfig.resolve_model(None, "segm"))
    dumped = tmp_path / "x.py"
    cfg.dump(str(dumped))
    executed = Config.fromfile(str(dumped)).to_dict()
    read = configdata.load(dumped.read_text(), "x.py").to_dict()
    assert read == executed
    assert read["model"]["roi_head"]["mask_head"]["num_classes"] == 80


def test_literals_of_every_kind():
    text = ("a = dict(x=1, y=[1, 2.5, -3], z=(1, 2), w={'k': None, 1: True})\n"
            "b = 'text'\nc = -inf\nmodel = dict(type='MaskRCNN')\n")
    found = configdata.parse(text, "c.py")
    assert found["a"] == {"x": 1, "y": [1, 2.5, -3], "z": (1, 2), "w": {"k": None, 1: True}}
    assert found["b"] == "text" and found["c"] == -math.inf


@pytest.mark.parametrize("text, where", [
    ("_x = __import__('os').system('id')\nmodel = dict()\n", "line 1: `__import__('os').system('id')`"),
    ("import os\nmodel = dict()\n", "line 1: `import os` is not a `name = value` line"),
    ("model = dict(type=open('/etc/passwd').read())\n", "line 1: `open('/etc/passwd').read()`"),
    ("model = dict(**other)\n", "only dict(key=value, ...)"),
    ("x = 1\nmodel = dict(lr=0.02 * 2)\n", "line 2: `0.02 * 2`"),
    ("_base_ = ['mmdet::x.py']\nmodel = dict()\n", "inherits other configs (_base_)"),
    ("model = dict(\n", "not a readable config"),
    ("x = 1\n", "no `model = dict(...)`"),
    ("a, b = 1, 2\nmodel = dict()\n", "is not a `name = value` line"),
])
def test_code_is_refused_in_one_line_naming_the_line(text, where):
    with pytest.raises(UserError) as err:
        configdata.parse(text, "w.pth (the config inside it)")
    message = str(err.value)
    assert message.startswith("w.pth (the config inside it): ") and where in message, message
    assert "\n" not in message
