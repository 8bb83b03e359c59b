"""The measured figures in docs/ describe the code (tests/docstamp.py): each
section's stamp names a commit in this history, no covered file changed after
it, and its prose quotes only figures its own tables hold (hand-written prose: what bench/run writes comes from the
run its tables come from). No engine needed;
needs the git history (CI clones main with it)."""

from __future__ import annotations

import pytest

from tests import docstamp
from tests.docstamp import ROOT, SECTIONS, UNSTAMPED, split_sections


def test_the_checkout_has_history():
    problem = docstamp.history_problem()
    assert not problem, problem


@pytest.mark.parametrize("section", SECTIONS, ids=[s.key for s in SECTIONS])
def test_section_is_stamped_and_fresh(section):
    problem = docstamp.history_problem()
    assert not problem, problem
    body = docstamp.section_text(section, (ROOT / section.doc).read_text())
    assert body is not None, f"{section.doc} has no section '## {section.heading}'"
    if not docstamp.table_numbers(body) and not docstamp.prose_figures(body):
        return  # no figures (yet): nothing to go stale; once it has some, it needs its stamp
    stamp = docstamp.read_stamp(body)
    assert stamp is not None, (f"{section.doc} '{section.heading or 'whole document'}' has no 'measured at:' line: "
                               f"measure it ({section.rerun}), then scripts/stamp-docs {section.key} <commit>")
    commit, files = stamp
    assert tuple(files) == section.covers, (f"{section.key}: the stamp covers {files}, tests/docstamp.py says "
                                            f"{list(section.covers)}: scripts/stamp-docs {section.key} {commit}")
    changed = docstamp.changed_since(commit, files)
    assert isinstance(changed, list), f"{section.key}: {changed}"
    assert not changed, (f"{section.doc} '{section.heading or 'whole document'}' was measured at {commit}, and since "
                         f"then {len(changed)} commits changed what it measures ({' '.join(files)}): "
                         + "; ".join(changed[:5]) + f". Re-measure ({section.rerun}), then "
                         f"scripts/stamp-docs {section.key} <that commit>")


@pytest.mark.parametrize("doc", [docstamp.BENCHMARKS, docstamp.RELIABILITY])
def test_every_section_with_figures_is_stamped(doc):
    known = [s.heading for s in SECTIONS if s.doc == doc]
    if "" in known:
        return  # stamped as a whole
    for heading, body in split_sections((ROOT / doc).read_text())[1:]:
        if heading.startswith(UNSTAMPED) or not docstamp.table_numbers(body) and not docstamp.prose_figures(body):
            continue
        assert any(heading.startswith(k) for k in known), \
            f"{doc}: section '## {heading}' holds figures but no entry in tests/docstamp.py SECTIONS says what covers it"


@pytest.mark.parametrize("doc", [docstamp.BENCHMARKS, docstamp.RELIABILITY])
def test_prose_quotes_only_figures_its_tables_hold(doc):
    bad = []
    for heading, body in split_sections(docstamp.hand_written((ROOT / doc).read_text())):
        for figure, line in docstamp.unheld_figures(body):
            bad.append(f"'## {heading}': {figure} in: {line[:100]}")
    assert not bad, f"{doc}: figures in prose that no table of their section holds:\n" + "\n".join(bad)


def test_the_figure_rules(tmp_path):
    body = "| a | 12.19 ms | 0.695 |\n\nThe overlay reaches **0.695**, 12.2 Gbit/s, but 13 ms is not there.\n"
    assert [f for f, _ in docstamp.unheld_figures(body)] == ["13"]
    assert docstamp.prose_figures("`bench/run` on a date, 65 s\n| 3 ms |\n") == []
    assert docstamp.prose_figures("goal under 50 ms; p99 < 2 ms; the 100 MB goal") == []
    assert docstamp.hand_written("a\n<!-- bench:x begin -->\n9 ms\n<!-- bench:x end -->\nb") == "a\n\nb"


def test_stamp_writes_one_line_under_the_heading(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# B\n\n## Socket latency: x\n\ntext\n\n## Throughput\n\nmore\n")
    section = docstamp.by_key("latency")
    docstamp.stamp(section, "abc1234", root=tmp_path)
    docstamp.stamp(section, "def5678", root=tmp_path)  # replaces, never adds
    text = doc.read_text()
    assert text.count("measured at:") == 1
    assert docstamp.read_stamp(docstamp.section_text(section, text)) == ("def5678", list(section.covers))
    assert docstamp.read_stamp(docstamp.section_text(docstamp.by_key("throughput"), text)) is None


def test_the_reliability_stamp_covers_every_test_the_report_runs():
    from tests.reliability_report import TESTS

    assert set(TESTS) <= set(docstamp.by_key("reliability").covers)
