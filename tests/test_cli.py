import re

import pytest

import pygeo
from pygeo.cli import main
from pygeo.cli import demo as demo_module


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "## Pullback metric of the decoder" in report and "This section failed" not in report
    assert "## Timings" in report and "| train VAE |" in report
    for figure in ("pullback_volume.png", "pullback_decoded.png"):
        assert f"]({figure})" in report
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The timing table has the baseline and at least one pygeo provider, each with a finite time.
    rows = re.findall(r"^\| (plain PyTorch.*|pygeo .*?) \| (\d+) \| ([\d.]+) \| [\d.]+x \| ([\d.e+-]+) \|$", report,
                      flags=re.M)
    assert rows[0][0].startswith("plain PyTorch") and len(rows) >= 3
    providers = [row[0] for row in rows]
    assert "pygeo fused MLP, torch" in providers and "pygeo generic (jvp + jtj), torch" in providers
    if pygeo.backends()["cpp"].available:
        assert "pygeo fused MLP, cpp" in providers
    # Every provider computes the same metric as the plain-PyTorch baseline (float32 agreement).
    assert all(float(row[3]) < 1e-4 for row in rows), rows


def test_demo_from_idx_files_with_limit(tmp_path, monkeypatch):
    import numpy as np

    from test_data import write_split

    rng = np.random.default_rng(0)
    write_split(tmp_path, "train", rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 10, 60))
    monkeypatch.setattr(demo_module, "SECTIONS", [])
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--out", str(out), "--data-dir", str(tmp_path), "--limit", "50", "--epochs", "1",
                 "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert f"50 digits from MNIST IDX files in {tmp_path}" in report and "trained for 1 of 1 epochs" in report


def test_demo_reports_a_failing_section_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_module, "SECTIONS", ["no_such_section", "pullback"])
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 1
    report = (tmp_path / "report.md").read_text()
    assert "This section failed" in report and "No module named" in report
    assert "## Pullback metric of the decoder" in report


def test_demo_ctrl_c_writes_partial_report(tmp_path, monkeypatch, capsys):
    from pygeo.cli.sections import pullback

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(pullback, "run", interrupted)
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 130
    assert "partial report" in capsys.readouterr().err
    report = (tmp_path / "report.md").read_text()
    assert "Interrupted" in report and "| train VAE |" in report


def test_demo_bad_options(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path), "--device", "tpu"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path), "--epochs", "0"]) == 2
    assert main(["demo", "--quick", "--out", str(tmp_path), "--limit", "5"]) == 2
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["demo", "--quick", "--out", str(a_file)]) == 2
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "many"])
    with pytest.raises(SystemExit):
        main([])


def test_bench_prints_a_row_per_op_with_matching_results(capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--no-progress"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms)" not in line]
    assert len(rows) == 8
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3].split()[0]) > 0
        assert float(cells[5]) < 1e-4  # pygeo's result against the plain-PyTorch one (float32)
    assert main(["bench", "--repeats", "0"]) == 2


def test_info(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "pygeo" in printed and "torch" in printed
    for name in ("torch", "cpp", "cuda", "triton"):
        assert re.search(rf"^{name} +(yes|no)", printed, flags=re.M)


def test_module_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pygeo", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "backend" in result.stdout
