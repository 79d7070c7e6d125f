"""Folder and zip archives read through one index, so the same images give the same classes,
order and labels either way, and layout mistakes get one set of explanations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dynify.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


@dataclass
class _Tree:
    """Directories and image files of a folder or zip, as posix paths relative to its top."""

    children: dict[str, set[str]] = field(default_factory=lambda: {"": set()})
    images: dict[str, list[str]] = field(default_factory=dict)

    def add_dir(self, path: str) -> None:
        while path:
            parent, _, name = path.rpartition("/")
            self.children.setdefault(path, set())
            siblings = self.children.setdefault(parent, set())
            if name in siblings:
                return
            siblings.add(name)
            path = parent

    def add_file(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        self.add_dir(parent)
        if name.lower().endswith(IMAGE_EXTENSIONS):
            self.images.setdefault(parent, []).append(name)

    def subdirs(self, path: str) -> list[str]:
        return sorted(self.children.get(path, ()))

    def images_under(self, path: str) -> list[str]:
        prefix = path + "/"
        return sorted(
            _join(d, name)
            for d, names in self.images.items()
            if d == path or d.startswith(prefix)
            for name in names
        )


def _folder_tree(root: Path) -> _Tree:
    """The tree under `root`, following symbolic links only where they stay inside it.

    Each real folder is read once, under the first of its names in sorted order: a link to a
    folder already read (a loop, or a second name for a class) adds nothing, so no image is
    counted twice. A link that leads out of `root`, or nowhere, is refused.
    """
    tree = _Tree()
    top = os.path.realpath(root)
    visited: set[str] = set()
    pending = [("", str(root))]  # depth first, in sorted order: popped from the end
    while pending:
        rel, folder = pending.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        tree.add_dir(rel)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as e:
            raise DataError(f"Cannot list {folder}: {e}. Check the folder's permissions.") from e
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            child = _join(rel, entry.name)
            if entry.is_symlink():
                _check_link(root, child, top)
            if entry.is_dir():
                pending.append((child, entry.path))
            elif entry.is_file():
                tree.add_file(child)
    return tree


def _check_link(root: Path, rel: str, top: str) -> None:
    target = os.path.realpath(root / rel)
    inside = target == top or target.startswith(top.rstrip(os.sep) + os.sep)
    if not inside or not os.path.exists(target):
        where = "outside the folder" if os.path.exists(target) else "nowhere (it is broken)"
        raise DataError(
            f"{root / rel} is a symbolic link that leads {where} ({target}). dynify follows "
            f"links only within {root}, so the data set is what the folder holds. Copy the "
            "files in, remove the link, or point at a folder that contains its target."
        )


def _zip_tree(names: Sequence[str]) -> _Tree:
    tree = _Tree()
    for name in names:
        if _is_hidden(name.rstrip("/")):
            continue
        if name.endswith("/"):
            tree.add_dir(name.rstrip("/"))
        else:
            tree.add_file(name)
    return tree


def _resolve_root(tree: _Tree, split: str | None, where: str) -> str:
    """The directory whose subfolders are the classes: `split` if given, else the unwrapped top.

    `split` may be a full relative path (`cifar10/train`) or any unambiguous tail of one (`train`).
    Without it, single wrapper folders (a zip of `mydata/`) are stepped into.
    """
    if split is not None:
        key = split.strip("/")
        if key in tree.children and key:
            return key
        matches = sorted(d for d in tree.children if d.endswith("/" + key))
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise DataError(
                f"split={split!r} matches several folders in {where}: {', '.join(matches)}. "
                "Pass the full path of the one you mean as split."
            )
        candidates = sorted({d.rpartition("/")[0] for d in tree.images if d})
        hint = (
            f" Folders holding class subfolders: {', '.join(candidates[:10])}."
            if candidates
            else ""
        )
        raise DataError(
            f"{where} has no folder named {split!r}.{hint} Pass one of them as split, or "
            "split=None to use the top level."
        )
    root = ""
    while len(tree.children[root]) == 1 and root not in tree.images:
        child = _join(root, next(iter(tree.children[root])))
        if child in tree.images:
            break
        root = child
    return root


def _index(
    tree: _Tree, root: str, where: str, split_given: bool
) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted subfolder names) and (path, label) samples under `root`."""
    shown = f"{where}/{root}" if root else where
    classes = tree.subdirs(root)
    if not classes:
        if root in tree.images:
            raise DataError(
                f"{shown} holds images but no class subfolders. Put each class's images in its "
                f"own subfolder ({shown}/<class name>/<image>); the sorted folder names give the "
                "label order."
            )
        raise DataError(
            f"{shown} is empty: it has no class subfolders. Point at a folder laid out as "
            "<folder>/<class name>/<image>, one subfolder per class."
        )
    per_class = {c: tree.images_under(_join(root, c)) for c in classes}
    looks_like_splits = not any(_join(root, c) in tree.images for c in classes) and all(
        tree.subdirs(_join(root, c)) for c in classes
    )
    if looks_like_splits and not split_given:
        raise DataError(
            f"{shown} looks like it holds several splits ({', '.join(classes)}), each with "
            f"its own class subfolders. Choose one with split, e.g. split={classes[-1]!r}."
        )
    empty = [c for c, files in per_class.items() if not files]
    if len(empty) == len(classes):
        raise DataError(
            f"{shown} has class subfolders ({', '.join(classes[:10])}) but no images in them. "
            f"Image files must end in one of {', '.join(IMAGE_EXTENSIONS)}."
        )
    if empty:
        raise DataError(
            f"These class folders in {shown} hold no images: {', '.join(empty)}. Remove them or "
            "add images: every subfolder is a class, and an empty class would shift the labels."
        )
    samples = [(path, label) for label, c in enumerate(classes) for path in per_class[c]]
    return classes, samples
