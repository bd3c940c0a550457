"""Pytrees of tensors (nested dicts, lists, tuples, NamedTuples) and the tensor names they give.

A tensor's name is its path in the tree: the keys, list positions and
NamedTuple field names from the root, joined by "/". So
`{"params": {"Dense_0": {"kernel": k}}}` names `k` "params/Dense_0/kernel" and
`{"layers": [{"w": w}]}` names `w` "layers/0/w"; a flat dict keeps its keys as
they are ("dense/kernel", torch's "fc1.weight"). Names depend on the tree's
shape, never on the order of its dict keys.
"""

from collections.abc import Callable, Mapping
from typing import Any

from optserve.client.arrays import IndexedSlices
from optserve.client.errors import InvalidArgumentError

SEPARATOR = "/"


def _children(node: Any) -> list[tuple[str, Any]] | None:
    """(key, child) pairs of an inner node, or None for a leaf (an IndexedSlices is a leaf)."""
    if isinstance(node, Mapping):
        return list(node.items())
    if isinstance(node, IndexedSlices):
        return None
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):  # a NamedTuple: its field names
        return list(zip(type(node)._fields, node))
    if isinstance(node, (list, tuple)):
        return [(str(index), child) for index, child in enumerate(node)]
    return None


def _key(key: Any, path: str, field: str) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int)) or key == "":
        raise InvalidArgumentError(f"{field}: key {key!r} under {path or 'the root'!r} must be a non-empty str or "
                                   "an int (keys make the tensor names)")
    return str(key)


def flatten(tree: Any, field: str) -> dict[str, Any]:
    """{path: leaf} of a tree, in the tree's order; InvalidArgumentError naming `field` if no name can be made.

    The root must be an inner node (a lone array has no name); two leaves whose
    paths are equal (`{"a/b": x, "a": {"b": y}}`) are refused.
    """
    if _children(tree) is None:
        raise InvalidArgumentError(f"{field}: must be a dict, list, tuple or NamedTuple of arrays (the keys name "
                                   f"the tensors), got {type(tree).__name__}")
    leaves: dict[str, Any] = {}

    def visit(node: Any, path: str) -> None:
        children = _children(node)
        if children is None:
            if path in leaves:
                raise InvalidArgumentError(f"{field}: two tensors have the path {path!r}")
            leaves[path] = node
            return
        for key, child in children:
            name = _key(key, path, field)
            visit(child, f"{path}{SEPARATOR}{name}" if path else name)

    visit(tree, "")
    return leaves


def unflatten(like: Any, leaf: Callable[[str, Any], Any]) -> Any:
    """A tree of `like`'s structure whose leaves are `leaf(path, like_leaf)`.

    dicts come back as dicts (other mappings as their type when it can be built
    from a dict), lists as lists, tuples and NamedTuples as their own type.
    """

    def build(node: Any, path: str) -> Any:
        children = _children(node)
        if children is None:
            return leaf(path, node)
        built = [(key, build(child, f"{path}{SEPARATOR}{key}" if path else str(key))) for key, child in children]
        if isinstance(node, Mapping):
            try:
                return type(node)(built) if type(node) is not dict else dict(built)
            except TypeError:
                return dict(built)
        if isinstance(node, tuple) and hasattr(type(node), "_fields"):
            return type(node)(*(value for _, value in built))
        return type(node)(value for _, value in built)

    return build(like, "")
