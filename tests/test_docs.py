"""The README's reading guide and its file references point at code that exists."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes of a file, and the methods of its classes (as Class.method too)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names |= {item.name, f"{node.name}.{item.name}"}
    return names


def test_reading_guide_names_exist():
    readme = (ROOT / "README.md").read_text()
    refs = re.findall(r"`((?:tools/|vosr/)?\w+\.py):([\w.]+)`", readme)
    assert len(refs) >= 20, "the reading guide should map the paper to functions"
    missing = [f"{f}:{n}" for f, n in refs if n not in defined_names(ROOT / f)]
    assert not missing, missing


def test_referenced_files_exist():
    """Paths named in the README and docs/, and their relative links, exist (links resolve from their file)."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for path in re.findall(r"(?<![\w/.])((?:tools|vosr|docs|tests|checkpoints)/[\w./-]+\.(?:py|md|png|csv|txt))", text):
            assert (ROOT / path).exists(), (doc.name, path)
        for target in re.findall(r"\]\(((?!http)[^)#]+)", text):
            assert (doc.parent / target).exists(), (doc.name, target)
