"""The console script: `lrtrain demo` trains both models, prints the table and writes the rank plot."""
import re

from lrtrain.cli import main


def test_demo_prints_table_and_saves_plot(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--hidden", "128", "--rank", "24", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (dense AdamW|lrtrain DLRT) \| ([\d.]+) \| ([\d,]+) \|", out, re.M)
    assert [r[0] for r in rows] == ["dense AdamW", "lrtrain DLRT"]
    acc = {name: float(a) for name, a, _ in rows}
    params = {name: int(n.replace(",", "")) for name, _, n in rows}
    assert acc["lrtrain DLRT"] > 80 and acc["dense AdamW"] > 80  # 10 classes: chance is 10%
    assert params["lrtrain DLRT"] < params["dense AdamW"]
    png = tmp_path / "ranks.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
