import json
from pathlib import Path

import pytest

from planner.errors import InputError
from planner.formats import (
    KINDS, Plan, Profile, dump, json_schema, load_cluster_file, load_plan, load_profile, write_atomic,
)
from planner.synthetic import chain_profile

SCHEMAS = Path(__file__).resolve().parents[1] / "planner" / "schemas"


@pytest.fixture
def profile_file(tmp_path):
    p = tmp_path / "p.json"
    dump(chain_profile([1e-3, 2e-3, 1e-3], mbs=(1, 2)), p)
    return p


def test_profile_round_trip(profile_file):
    prof = load_profile(profile_file)
    assert [layer.name for layer in prof.layers] == ["layers.0", "layers.1", "layers.2"]
    assert prof.mbs_sizes == [1, 2]
    assert prof.layers[1].by_mbs["2"].fwd_s == pytest.approx(4e-3)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(InputError, match="nope.json: no such file"):
        load_profile(tmp_path / "nope.json")


def test_truncated_json_names_file_and_position(profile_file):
    text = profile_file.read_text()
    profile_file.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match=r"p\.json: not valid JSON \(line \d+, column \d+\)"):
        load_profile(profile_file)


def test_empty_file(tmp_path):
    (tmp_path / "e.json").write_text("  \n")
    with pytest.raises(InputError, match="file is empty"):
        load_profile(tmp_path / "e.json")


def test_bad_field_is_named(profile_file):
    data = json.loads(profile_file.read_text())
    data["layers"][1]["by_mbs"]["1"]["fwd_s"] = -1
    profile_file.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"field layers\.1\.by_mbs\.1\.fwd_s: .*greater than or equal to 0"):
        load_profile(profile_file)


def test_unknown_field_is_refused(profile_file):
    data = json.loads(profile_file.read_text())
    data["layers"][0]["fwd_ms"] = 3
    profile_file.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"field layers\.0\.fwd_ms: Extra inputs are not permitted"):
        load_profile(profile_file)


def test_unknown_schema_version_is_refused(profile_file):
    data = json.loads(profile_file.read_text())
    data["schema_version"] = 2
    profile_file.write_text(json.dumps(data))
    with pytest.raises(InputError, match="schema_version 2 is not supported"):
        load_profile(profile_file)


def test_wrong_kind_says_what_it_is(profile_file):
    with pytest.raises(InputError, match="this is a planner profile, not a plan"):
        load_plan(profile_file)


def test_edges_must_go_forward(profile_file):
    data = json.loads(profile_file.read_text())
    data["edges"].append({"src": "layers.2", "dst": "layers.0", "bytes_per_sample": 4})
    profile_file.write_text(json.dumps(data))
    with pytest.raises(InputError, match="topological order"):
        load_profile(profile_file)


def test_cluster_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({
        "name": "mixed", "nodes": [
            {"devices": [{"name": "A100-80GB", "memory_bytes": 80 * 2**30}] * 4},
            {"devices": [{"name": "A100-40GB", "memory_bytes": 40 * 2**30}] * 4}],
        "intra_node": {"bandwidth_bytes_per_s": 3e11, "latency_s": 1e-5},
        "inter_node": {"bandwidth_bytes_per_s": 2.5e10, "latency_s": 2e-5}}))
    c = load_cluster_file(p)
    assert len(c.devices) == 8 and c.node(5) == 1
    assert c.link(0, 3) == c.intra_node and c.link(3, 4) == c.inter_node


def test_cluster_of_several_nodes_needs_an_inter_node_link(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"name": "x", "nodes": [{"devices": [{"name": "g", "memory_bytes": 1}]}] * 2,
                             "intra_node": {"bandwidth_bytes_per_s": 1, "latency_s": 0}}))
    with pytest.raises(InputError, match="needs an inter_node link"):
        load_cluster_file(p)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shipped_schemas_are_current(kind):
    shipped = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    assert shipped == json_schema(kind), "regenerate with: python -m planner.formats"


def test_write_atomic_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "plan.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_profile_and_plan_keys_are_stable():
    # other tools read these names
    assert {"schema_version", "model", "device", "dtype", "layers", "edges"} <= set(Profile.model_fields)
    assert {"schema_version", "model", "cluster", "parallel", "microbatch", "schedule", "stages",
            "predicted", "provenance"} <= set(Plan.model_fields)
