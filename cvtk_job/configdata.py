"""MMEngine configs read as data: a saved config is parsed, never run.

`mmengine.Config.fromfile` and `Config.fromstring` execute the file: a weights file whose config
string (or a `.py` from a shared bucket) starts with `__import__('os').system(...)` would run that
command. A config that MMEngine saved (`Config.dump`, `pretty_text`: cvtk-job's `X.py` and the config
inside its weights, upstream cvtk's `X.py` and the `meta.cfg` of its MMEngine checkpoints) is nothing
but `name = value` lines whose values are dicts, lists, tuples, strings, numbers, booleans and None,
so it is read with `ast` and anything else is refused in one line.

Only a config the user names with `train --model my.py` is executed, as the user's own code (it may
inherit with `_base_`); that goes through `Config.fromfile` in `mmconfig`, not here.
"""

import ast
import math

from .errors import UserError

# Names a dumped config can hold besides literals: `float('inf')` is written as `inf`.
_NAMES = {"inf": math.inf, "nan": math.nan}


class _NotData(Exception):
    def __init__(self, node, why):
        super().__init__(why)
        self.node, self.why = node, why


def _value(node):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_value(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _NotData(node, "`**` unpacking is code")
        keys = [_value(k) for k in node.keys]
        if not all(isinstance(k, (str, int, float, bool, type(None))) for k in keys):
            raise _NotData(node, "dict keys must be plain values")
        return dict(zip(keys, (_value(v) for v in node.values), strict=True))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        if node.args or any(k.arg is None for k in node.keywords):
            raise _NotData(node, "only dict(key=value, ...) is read")
        return {k.arg: _value(k.value) for k in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    raise _NotData(node, "it is code, not a value")


def parse(text, name):
    """The `name = value` lines of a saved MMEngine config → a plain dict; code is refused."""
    hint = ("cvtk-job reads saved configs as data and never runs them: pass the config that training "
            "wrote (X.py beside X.pth), whose values are all plain")
    try:
        tree = ast.parse(text, filename=name)
    except (SyntaxError, ValueError) as err:
        raise UserError(f"{name}: line {getattr(err, 'lineno', '?')}: not a readable config "
                        f"({getattr(err, 'msg', err)}); {hint}") from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring or a stray literal
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if not isinstance(target, ast.Name):
            raise UserError(f"{name}: line {node.lineno}: `{ast.unparse(node)[:60]}` is not a `name = value` "
                            f"line; {hint}")
        if target.id == "_base_":
            raise UserError(f"{name}: line {node.lineno}: inherits other configs (_base_), which only a run "
                            f"can resolve; {hint}")
        try:
            found[target.id] = _value(node.value)
        except _NotData as err:
            raise UserError(f"{name}: line {err.node.lineno}: `{ast.unparse(err.node)[:60]}`: {err.why}; "
                            f"{hint}") from None
    if not isinstance(found.get("model"), dict):
        raise UserError(f"{name}: no `model = dict(...)` in it: not an MMDetection config; {hint}")
    return found


def load(text, name):
    """A saved config's text → an mmengine Config, without executing anything."""
    from mmengine.config import Config

    return Config(parse(text, name))
