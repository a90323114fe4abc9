"""bench.decode_step runs each path on a real checkpoint and writes its table."""

import json

from bench import decode_step


def test_measures_every_path_and_restores_the_default(tiny_dir, tmp_path):
    from model import cpu_decode

    ready = cpu_decode.ready
    rows = decode_step.measure(tiny_dir, batches=[1, 3], contexts=[40], rounds=2)
    assert cpu_decode.ready is ready  # the module is left as it was found
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 40), (3, 40)]
    for r in rows:
        assert all(r[f"{p}_ms"] > 0 for p in decode_step.PATHS) and r["gather_over_flat"] > 0
    decode_step.save(rows, tmp_path, "t", "# header")
    assert json.loads((tmp_path / "t.json").read_text()) == rows
    assert "| 3 | 40 |" in (tmp_path / "t.md").read_text()
