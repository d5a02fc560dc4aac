"""The package's own rules: configuration at the edge, one reporter, two process gateways.

These read the source, because a stray ``os.environ`` or ``print`` deep in the
engine would work in every test and still break the promise that a caller
(backup_all, a safety copy, a future drill) decides what is read and shown.
"""

import ast
import io
import os

from ai_stack_backup import pipeline
from ai_stack_backup.config import Config
from ai_stack_backup.hostpath import PathSource, PathTarget
from ai_stack_backup.names import safe_name
from ai_stack_backup.report import Reporter
from conftest import SCRIPTS

PACKAGE = os.path.join(SCRIPTS, "ai_stack_backup")


def _modules():
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE, name)) as file:
                yield name, ast.parse(file.read())


def _uses(tree, check):
    return sorted({node.lineno for node in ast.walk(tree) if check(node)})


def test_only_the_edge_reads_the_environment():
    for name, tree in _modules():
        lines = _uses(tree, lambda node: isinstance(node, ast.Attribute)
                      and node.attr in ("environ", "getenv")
                      and isinstance(node.value, ast.Name) and node.value.id == "os")
        assert not lines or name == "cli.py", "%s reads os.environ at lines %s" % (name, lines)


def test_operations_never_print():
    for name, tree in _modules():
        lines = _uses(tree, lambda node: isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Name) and node.func.id == "print")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "write"
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr in ("stdout", "stderr"))))
        assert not lines or name in ("cli.py", "report.py"), \
            "%s prints at lines %s" % (name, lines)


def test_every_process_is_started_by_a_gateway():
    # docker.py: the docker CLI; offsite.py: the operator's copy command and age/gpg.
    for name, tree in _modules():
        lines = _uses(tree, lambda node: isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            alias.name == "subprocess" for alias in node.names))
        assert not lines or name in ("docker.py", "offsite.py"), "%s imports subprocess" % name


def test_a_pipeline_shows_everything_through_its_reporter(tmp_path, capsys):
    source = tmp_path / "notes"
    source.mkdir()
    (source / "a").write_text("alpha")
    status, log = io.StringIO(), io.StringIO()
    reporter = Reporter(status, log)
    config = Config(backup_dir=str(tmp_path / "backups"), threads=1)
    result = pipeline.backup(PathSource(str(source)), str(tmp_path / "backups"), config, reporter)
    target = tmp_path / "restored"
    pipeline.restore(PathTarget(str(target), config), result.path, config, reporter)
    assert capsys.readouterr() == ("", "")
    assert status.getvalue().splitlines() == [
        "Backing up path: %s" % source, "Output: %s" % result.path, "OK",
        "Restoring path: %s" % target, "From: %s" % result.path, "OK"]
    assert log.getvalue() == ""
    assert (target / "a").read_text() == "alpha"
    assert (result.source, result.members) == (safe_name(str(source)), 2)


def test_the_package_docstring_lists_every_module_in_import_order():
    import re
    import ai_stack_backup
    listed = re.search(r"Every module, each importing only\s+modules before it: ([^.]+)\.",
                       ai_stack_backup.__doc__).group(1)
    order = [name.strip() for name in listed.split(",")]
    modules = {name[:-3]: tree for name, tree in _modules() if name != "__init__.py"}
    assert sorted(order) == sorted(modules)
    for position, name in enumerate(order):
        imported = set()
        for node in ast.walk(modules[name]):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {alias.name for alias in node.names}
        later = imported - set(order[:position])
        assert not later, "%s imports %s, listed after it" % (name, sorted(later))
