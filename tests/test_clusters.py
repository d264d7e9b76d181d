"""Cluster presets and the --cluster syntax: what is shown, what is refused."""

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app
from planner.clusters import MAX_DEVICES_PER_NODE, from_spec
from planner.errors import InputError
from planner.formats import dump
from planner.synthetic import chain_profile

runner = CliRunner()


def test_one_node_of_9000_gpus_is_refused_with_the_multi_node_spelling():
    with pytest.raises(InputError, match=r"9000 devices in one node .*at most 72.* e\.g\. 1125xh100x8"):
        from_spec("h100x9000")


def test_the_suggestion_keeps_the_device_count():
    with pytest.raises(InputError, match=r"e\.g\. 20xh100x5"):  # 100 = 20 x 5, not 12 x 8
        from_spec("h100x100")


def test_node_size_limit_is_inclusive():
    assert len(from_spec(f"h100x{MAX_DEVICES_PER_NODE}").devices) == 72
    with pytest.raises(InputError, match="73 devices in one node"):
        from_spec("h100x73")
    with pytest.raises(InputError, match="73 devices in one node"):
        from_spec("2xh100x73")
    assert len(from_spec("1125xh100x8").nodes) == 1125


def test_absurd_totals_are_refused():
    with pytest.raises(InputError, match=r"80,000 devices is more than planner handles \(at most 65,536\)"):
        from_spec("10000xh100x8")


def test_a_cluster_file_with_an_implausible_node_is_refused(tmp_path):
    data = json.loads(from_spec("h100x8").model_dump_json())
    data["nodes"][0]["devices"] = data["nodes"][0]["devices"][:1] * 100
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="a node of 100 devices"):
        from_spec(str(path))


def test_solve_refuses_an_implausible_cluster_in_one_line(tmp_path):
    prof = tmp_path / "p.json"
    dump(chain_profile([1e-3] * 4), prof)
    r = runner.invoke(app, ["solve", str(prof), "--cluster", "h100x9000"])
    assert r.exit_code == 2
    assert "NODESxDEVICExCOUNT" in r.output and "Traceback" not in r.output


def test_clusters_shows_memory_speed_and_links():
    r = runner.invoke(app, ["clusters"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    h100 = next(line for line in r.output.splitlines() if "H100-80GB " in line and "GB/s" in line)
    # 81,559 MiB = 79.65 GiB, 1 GiB reserved; NVLink 4 450 GB/s per direction, NDR 50 GB/s
    for text in ("79.65 GiB", "78.65 GiB", "1x", "450 GB/s, 10 us", "50 GB/s, 20 us"):
        assert text in h100, (text, h100)
    cpu2 = next(line for line in r.output.splitlines() if line.startswith("│ cpu2"))
    assert "8.00 GiB" in cpu2 and " 2 " in cpu2
    assert "at most 72 devices a node" in r.output
