"""Every project file a comment or doc cites exists in the repository.

Comments justify defaults with measurements and rules; a reader follows the citation
(docs/QUANT_RULES.md, bench/results/<name>.json, the bench script that wrote it), so a
citation of a file that is not committed is a claim nothing stores. Checked: comments and
docstrings under toolkit/, README.md and docs/*.md.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "toolkit" / "cunet_optimize"

# A path of the repository's own, not the tail of another path or URL
# (".../onnx-tensorrt/blob/main/docs/operators.md" is not ours).
_START = r"(?<![\w/.-])"
CITATION = re.compile(_START + r"((?:docs/[\w.-]+\.md)|(?:bench/results/[\w.-]+\.json)|(?:bench/[\w.-]+\.py)"
                      r"|(?:tests/[\w.-]+\.py)|(?:[A-Z][A-Z_]+\.md))")


def comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and every string statement (docstrings) of a module."""
    texts = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            texts.append((node.lineno, node.value.value))
    return texts


def cited_paths(text: str) -> list[str]:
    """Repository paths cited in `text`; a bare NAME.md is a page of docs/ (or README.md)."""
    return [c if "/" in c or c == "README.md" else f"docs/{c}" for c in CITATION.findall(text)]


def missing_citations(root: Path = REPO) -> list[str]:
    missing = []
    for path in sorted((root / "toolkit").rglob("*.py")):
        for line, text in comments_and_docstrings(path.read_text(encoding="utf-8")):
            missing += [f"{path.relative_to(root)}:{line}: {c}" for c in cited_paths(text) if not (root / c).is_file()]
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        missing += [f"{path.relative_to(root)}: {c}" for c in cited_paths(path.read_text(encoding="utf-8"))
                    if not (root / c).is_file()]
    return missing


def test_every_cited_doc_and_bench_result_exists():
    assert missing_citations() == []


def test_the_scan_sees_the_citations_that_matter():
    cited = {c for path in PACKAGE.rglob("*.py")
             for _, text in comments_and_docstrings(path.read_text(encoding="utf-8")) for c in cited_paths(text)}
    assert {"docs/QUANT_RULES.md", "docs/EVAL.md", "docs/CUNET.md"} <= cited
    assert any(c.startswith("bench/results/") for c in cited)


def test_comments_and_docstrings_only_and_foreign_paths_skipped():
    source = '''"""Module doc: docs/A.md."""
x = "a message naming docs/B.md"  # a comment naming bench/results/c.json
def f():
    """Rules in QUANT_RULES.md; operators in github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md."""
'''
    cited = [c for _, text in comments_and_docstrings(source) for c in cited_paths(text)]
    assert sorted(cited) == ["bench/results/c.json", "docs/A.md", "docs/QUANT_RULES.md"]


def test_a_missing_file_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "HERE.md").write_text("see HERE.md and bench/gone.py\n")
    (tmp_path / "README.md").write_text("docs/HERE.md\n")
    (tmp_path / "toolkit").mkdir()
    (tmp_path / "toolkit" / "m.py").write_text('"""docs/HERE.md"""\n# measured: bench/results/gone.json\n')
    assert missing_citations(tmp_path) == ["toolkit/m.py:2: bench/results/gone.json", "docs/HERE.md: bench/gone.py"]
