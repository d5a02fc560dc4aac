"""Rules the test suite keeps (issue 27): speed lives in `make bench`, never in a test; tests
remove only what they created, never by a filter that anything else can match, and never
take back the HOME and BACKUP_DIR of their own that conftest gives them."""

import ast
import os
import re

from conftest import REPOSITORY

FOLDERS = ("tests", "dev", "bench")


def _sources():
    for folder in FOLDERS:
        for name in sorted(os.listdir(os.path.join(REPOSITORY, folder))):
            if name.endswith(".py"):
                path = os.path.join(REPOSITORY, folder, name)
                with open(path) as file:
                    yield os.path.join(folder, name), file.read()


def _is_clock(node):
    """``time.monotonic()``/``time.time()`` or an expression that subtracts from one."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
        return _is_clock(node.left)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
        node.func.attr in ("monotonic", "time", "perf_counter") and \
        isinstance(node.func.value, ast.Name) and node.func.value.id == "time"


def test_no_test_holds_a_duration_against_a_number():
    found = []
    for path, text in _sources():
        if not path.startswith("tests"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Compare):
                sides = [node.left] + node.comparators
                if any(_is_clock(side) and isinstance(side, ast.BinOp) for side in sides) and \
                        any(isinstance(side, ast.Constant) for side in sides):
                    found.append("%s:%d" % (path, node.lineno))
    assert found == [], "durations compared against numbers (use make bench): %s" % found


def test_nothing_is_removed_by_a_filter():
    pattern = re.compile(r'"(rm|rmi|kill|prune)",[^\n]*"--filter"|"(volume|image|container)", '
                         r'"(rm|prune)",[^\n]*"--filter"')
    found = ["%s:%d" % (path, text[:match.start()].count("\n") + 1)
             for path, text in _sources() if path != os.path.join("tests", "test_test_rules.py")
             for match in pattern.finditer(text)]
    assert found == [], "removal by filter: %s" % found


def _undoes_every_patch(tree):
    """The lines that call ``monkeypatch.undo()``: it takes back every patch of the test,
    conftest's own HOME and BACKUP_DIR too, so that what follows writes to the real ones
    (``monkeypatch.context()`` takes back only its own)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
            node.func.attr == "undo" and isinstance(node.func.value, ast.Name) and
            node.func.value.id == "monkeypatch"]


def test_no_test_takes_back_its_own_home_and_backup_folder():
    found = ["%s:%d" % (path, line) for path, text in _sources() if path.startswith("tests")
             for line in _undoes_every_patch(ast.parse(text))]
    assert found == [], "monkeypatch.undo() (use monkeypatch.context()): %s" % found


def test_the_rules_catch_what_they_forbid():
    duration = ast.parse("assert time.monotonic() - started < 60").body[0].test
    assert any(_is_clock(side) for side in [duration.left] + duration.comparators)
    pattern = re.compile(r'"(rm|rmi|kill|prune)",[^\n]*"--filter"')
    assert pattern.search('docker("rmi", "-f", "--filter", "label=x")')
    assert _undoes_every_patch(ast.parse("x = 1\nmonkeypatch.undo()\n")) == [2]
