"""The custom selector's own test, written with reapkit.testing: no process is touched."""

from __future__ import annotations

from pathlib import Path

from custom_selector import BackgroundFirst, Options

from reapkit.testing import FakeProc, make_situation, read_candidates, run_selector

MiB = 1 << 20


def test_never_the_foreground_app_and_the_largest_background_one_first(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.add_process(100, comm="editor", rss=900 * MiB)  # the foreground app
    proc.add_process(101, comm="editor-helper", ppid=100, rss=400 * MiB)
    proc.add_process(200, comm="mail", rss=300 * MiB)
    proc.add_process(300, comm="chat", rss=600 * MiB)
    foreground = tmp_path / "foreground.pid"
    foreground.write_text("100\n")
    selector = BackgroundFirst(Options(str(foreground)))

    # Called as the reaper calls it, its ranking checked as the reaper checks it.
    ranked = run_selector(selector, make_situation(proc), read_candidates(proc))

    assert [r.candidate.comm for r in ranked] == ["chat", "mail"]
    assert ranked[0].reason == "background, RSS 600 MiB"
