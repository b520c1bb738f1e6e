from supervisor.logs import Printer, RotatingFile
from supervisor import logview
import io


def test_rotation_by_size_keeps_the_configured_backups(tmp_path):
    path = tmp_path / "web.1.log"
    f = RotatingFile(path, max_bytes=4096, backups=2)
    for n in range(400):
        f.write_line("2026-01-01T00:00:00.000+00:00", f"line {n:04d} ".encode() + b"x" * 40)
    f.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["web.1.log", "web.1.log.1", "web.1.log.2"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    assert "line 0399" in path.read_text()


def test_logs_select_and_merge_in_time_order(tmp_path):
    (tmp_path / "web.1.log").write_text("2026-01-01T00:00:01.000+00:00 a1\n2026-01-01T00:00:03.000+00:00 a3\n")
    (tmp_path / "web.2.log").write_text("2026-01-01T00:00:02.000+00:00 b2\n")
    (tmp_path / "other.1.log").write_text("2026-01-01T00:00:00.000+00:00 o\n")
    files = logview.select(tmp_path, "web")
    assert set(files) == {"web.1", "web.2"}
    assert set(logview.select(tmp_path, "web.1")) == {"web.1"}
    out = io.StringIO()
    logview.show(files, 10, False, Printer(out, colour=False))
    texts = [line.split("| ", 1)[1] for line in out.getvalue().splitlines()]
    assert texts == ["a1", "b2", "a3"]
    out = io.StringIO()
    logview.show(files, 2, False, Printer(out, colour=False))
    assert [l.split("| ", 1)[1] for l in out.getvalue().splitlines()] == ["b2", "a3"]


def test_printer_colours_only_when_asked():
    out = io.StringIO()
    Printer(out, colour=True).line("web.1", "hello", "2026-01-01T10:11:12.000+00:00")
    assert out.getvalue().startswith("\033[") and "10:11:12 web.1" in out.getvalue()
