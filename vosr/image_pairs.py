"""Pairing image folders by file name, as evaluate.py score, sweep and grid compare them (ours:
plumbing).

An image's key is its path relative to the folder without the extension (its stem in a flat folder),
so out/a.png pairs with hr/a.jpg; a second file of the same key and a file without a partner are
reported.
"""
from pathlib import Path

from vosr.files import find_images


def index_images(root):
    """{key: path} of a folder's images, keyed by relative path without extension; and the
    duplicates."""
    root, found, dupes = Path(root), {}, []
    for p in find_images(root):
        key = p.relative_to(root).with_suffix("").as_posix() if root.is_dir() else p.stem
        if key in found:  # a.png next to a.jpg
            dupes.append(p)
        else:
            found[key] = p
    return found, dupes


def pair_images(sr_dir, hr_dir):
    """Match SR and HR files by relative path without extension (= file stem in flat folders)."""
    sr, sr_dupes = index_images(sr_dir)
    hr, hr_dupes = index_images(hr_dir)
    problems = [
        f"{p}: another file with the same name was used instead" for p in sr_dupes + hr_dupes
    ]
    problems += [
        f"{hr[k]}: no SR image with this name in {sr_dir}" for k in sorted(hr.keys() - sr.keys())
    ]
    problems += [
        f"{sr[k]}: no HR image with this name in {hr_dir}" for k in sorted(sr.keys() - hr.keys())
    ]
    return [(k, sr[k], hr[k]) for k in sorted(sr.keys() & hr.keys())], problems
