import json
from pathlib import Path

import pytest

from planner.errors import InputError
from planner.formats import (
    KINDS,
    Plan,
    Profile,
    dump,
    json_schema,
    load_cluster_file,
    load_plan,
    load_profile,
    write_atomic,
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


def _edited_profile(profile_file, edit):
    data = json.loads(profile_file.read_text())
    edit(data)
    profile_file.write_text(json.dumps(data))
    return profile_file


def test_an_edge_given_twice_is_refused(profile_file):
    # one edge per (tensor, consumer): a repeat would send and hold its bytes twice
    _edited_profile(profile_file, lambda d: d["edges"].append(dict(d["edges"][1])))
    with pytest.raises(InputError, match=r"edges\[\d+\] repeats edges\[1\]"):
        load_profile(profile_file)


@pytest.mark.parametrize("name", ["@input", "@loss"])
def test_pseudo_layer_names_are_reserved(profile_file, name):
    def rename(d):
        d["layers"][2]["name"] = name
        d["edges"] = [e for e in d["edges"] if "layers.2" not in (e["src"], e["dst"])]
    _edited_profile(profile_file, rename)
    with pytest.raises(InputError, match=f"layer name '{name}' is reserved"):
        load_profile(profile_file)


def test_tied_bytes_are_at_most_each_members_own(tmp_path):
    # 100 parameter bytes per layer, 100 of them shared by layers 0 and 2: the most there can be
    p = tmp_path / "tied.json"
    dump(chain_profile([1e-3] * 3, param_bytes=100, tied=[([0, 2], 100)]), p)
    assert load_profile(p).tied[0].param_bytes == 100
    for edit, message in [(lambda d: d["tied"][0].update(param_bytes=101), "share 101 parameter bytes"),
                          (lambda d: d["tied"][0]["layers"].append("layers.0"), "names layer 'layers.0' twice"),
                          (lambda d: d["tied"].append({"layers": ["layers.0", "layers.1"], "param_bytes": 1}),
                           "share 101 parameter bytes of layer 'layers.0'")]:
        dump(chain_profile([1e-3] * 3, param_bytes=100, tied=[([0, 2], 100)]), p)
        _edited_profile(p, edit)
        with pytest.raises(InputError, match=message):
            load_profile(p)


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


# ------------------------------------------------------------------ refusals (issue: bad input)

import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from planner.cli import app  # noqa: E402
from planner.formats import MAX_ACTIONS, SolverRecord, check_output  # noqa: E402

PLANS = Path(__file__).resolve().parents[1] / "plans"
PP2 = PLANS / "gpt.cpu2-pp2.json"  # pp=2 dp=1 1f1b: two stages on devices 0 and 1
runner = CliRunner()


def _with_layers(data):
    """The committed plan with the model's layer list it was cut from (older plans lack it)."""
    data.setdefault("layers", [n for st in data["stages"] for n in st["layers"]])
    return data


def _in_two_stages(d):
    d["stages"][1]["layers"].insert(0, d["stages"][0]["layers"][-1])


def _unknown_layer(d):
    d["stages"][1]["layers"].append("no.such.layer")


def _out_of_order(d):
    d["stages"][0]["layers"], d["stages"][1]["layers"] = d["stages"][1]["layers"], d["stages"][0]["layers"]


def _missing(d):
    d["stages"][1]["layers"].pop()


def _negative_device(d):
    d["stages"][0]["devices"] = [-1]


def _shared_device(d):
    d["stages"][1]["devices"] = d["stages"][0]["devices"]


def _unknown_schedule(d):
    d["schedule"]["name"] = "zigzag"


INVALID = {"a layer in two stages": (_in_two_stages, "is in stages"),
           "a layer the model lacks": (_unknown_layer, "which the model lacks"),
           "stages out of order": (_out_of_order, "in order"),
           "layers missing": (_missing, "is in no stage"),
           "devices: [-1]": (_negative_device, "greater than or equal to 0"),
           "two ranks on one device": (_shared_device, "holds both rank 0 and rank 1"),
           "unknown schedule": (_unknown_schedule, "'zigzag' is unknown")}


def _mutant(tmp_path, mutate) -> Path:
    data = _with_layers(json.loads(PP2.read_text()))
    mutate(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_plan_is_refused_on_load(tmp_path, case):
    mutate, message = INVALID[case]
    with pytest.raises(InputError, match=message):
        load_plan(_mutant(tmp_path, mutate))


@pytest.mark.parametrize("case", sorted(INVALID))
@pytest.mark.parametrize("command", [["simulate"], ["check"], ["export", "--format", "torch"]])
def test_invalid_plan_is_refused_by_every_command(tmp_path, case, command):
    mutate, message = INVALID[case]
    p = _mutant(tmp_path, mutate)
    r = runner.invoke(app, [command[0], str(p), *command[1:]])
    assert r.exit_code == 2, r.output
    assert message in r.output and "bad.json" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("case", sorted(INVALID))
def test_execute_refuses_before_starting_workers(tmp_path, case):
    mutate, message = INVALID[case]
    p = _mutant(tmp_path, mutate)
    start = time.monotonic()
    r = runner.invoke(app, ["execute", str(p), "--steps", "1"])
    assert r.exit_code == 2 and message in r.output, r.output
    assert time.monotonic() - start < 15


def test_committed_plans_still_load():
    for p in PLANS.glob("*.json"):
        load_plan(p)
        data = _with_layers(json.loads(p.read_text()))
        assert Plan.model_validate(data, strict=True).layers == data["layers"]


@pytest.mark.parametrize("mode", ["none", "full"])
def test_a_recompute_list_needs_selective(tmp_path, mode):
    def listed(d):
        d["stages"][0]["recompute"] = mode
        d["stages"][0]["recompute_layers"] = d["stages"][0]["layers"][:1]
    with pytest.raises(InputError, match=f"but recompute is '{mode}'"):
        load_plan(_mutant(tmp_path, listed))


@pytest.mark.parametrize("key, value, message", [
    ("schedules", 5, "field provenance.solver.settings.schedules: Input should be a valid list"),
    ("top", "x", "field provenance.solver.settings.top: Input should be a valid integer"),
    ("recompute", "maybe",
     "field provenance.solver.settings.recompute: Input should be 'none', 'full', 'auto' or 'selective'"),
    ("fix_cuts", [15], "fix_cuts [15]: stage starts must increase and lie between 1 and 14"),
    ("fix_cuts", [9, 3], "fix_cuts [9, 3]: stage starts must increase"),
])
def test_saved_solver_settings_are_checked_on_load(tmp_path, key, value, message):
    # check --resolve searches with them again: they must be settings a search can run with
    def saved(d):
        d["provenance"]["solver"]["settings"][key] = value
    with pytest.raises(InputError, match=re.escape(message)):
        load_plan(_mutant(tmp_path, saved))


def test_saved_solver_settings_may_be_absent_or_carry_new_keys(tmp_path):
    def newer(d):
        d["provenance"]["solver"]["settings"]["a_later_option"] = [1]
    settings = load_plan(_mutant(tmp_path, newer)).provenance.solver.settings
    assert settings is not None and settings.model_extra == {"a_later_option": [1]}
    assert load_plan(_mutant(tmp_path, lambda d: d["provenance"].update(solver={}))).provenance.solver == SolverRecord()


def test_schedule_must_match_virtual_stages(tmp_path):
    def v3(d):
        d["schedule"]["name"] = "zb-v"  # two chunks per rank in a V, not one
    with pytest.raises(InputError, match="virtual stages must be 2"):
        load_plan(_mutant(tmp_path, v3))


def test_too_many_microbatches_is_refused_as_solve_refuses(tmp_path):
    from planner.solve.search import MAX_ACTIONS as SOLVE_CAP

    assert MAX_ACTIONS == SOLVE_CAP

    def huge(d):
        d["microbatch"]["count"] = 10**7
        d["microbatch"]["global_batch"] = 10**7 * d["microbatch"]["size"] * d["parallel"]["dp"]
    start = time.monotonic()
    with pytest.raises(InputError, match="use fewer micro-batches"):
        load_plan(_mutant(tmp_path, huge))
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("text, message", [
    ('"fwd_s": Infinity', "stages.0.cost.fwd_s: Infinity is not a finite number"),
    ('"fwd_s": NaN', "stages.0.cost.fwd_s: NaN is not a finite number"),
    ('"fwd_s": 1e400', "stages.0.cost.fwd_s: inf is not a finite number"),
    ('"fwd_s": 1e308', "is not a finite number of at most"),
    ('"fwd_s": ' + "9" * 5000, "is not a finite number of sane size"),
    ('"fwd_s": 9223372036854775808', "is beyond 4611686018427387904 (2^62)"),
])
def test_non_finite_and_huge_numbers_are_refused(tmp_path, text, message):
    text = _replace_first_fwd(PP2.read_text(), text)
    p = tmp_path / "n.json"
    p.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        load_plan(p)


def _replace_first_fwd(text: str, new: str) -> str:
    k = text.index('"fwd_s": ', text.index('"stages"'))
    end = text.index(",", k)
    return text[:k] + new + text[end:]


def test_profile_measurement_beyond_bounds_is_refused(profile_file):
    data = json.loads(profile_file.read_text())
    data["layers"][0]["by_mbs"]["1"]["fwd_s"] = 1e7  # 116 days: a unit mistake
    data["layers"][0]["param_bytes"] = 2**63
    profile_file.write_text(json.dumps(data))
    with pytest.raises(InputError):
        load_profile(profile_file)
    data["layers"][0]["param_bytes"] = 0
    profile_file.write_text(json.dumps(data))
    with pytest.raises(InputError, match="fwd_s: Input should be less than or equal to 1000000"):
        load_profile(profile_file)


def test_deep_nesting_is_one_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="nested deeper"):
        load_plan(p)
    p.write_text('{"kind": "plan", "x": ' + "[" * 500 + "]" * 500 + "}")
    with pytest.raises(InputError, match="nested deeper"):
        load_plan(p)


@pytest.mark.parametrize("path, value", [(("stages", 0, "rank"), "0"),
                                         (("stages", 0, "cost", "param_bytes"), "1114112"),
                                         (("schema_version",), True),
                                         (("stages", 0, "rank"), 0.0)])
def test_types_are_strict(tmp_path, path, value):
    data = json.loads(PP2.read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    p = tmp_path / "s.json"
    p.write_text(json.dumps(data))
    with pytest.raises(InputError):
        load_plan(p)


# ------------------------------------------------------------------------- files and outputs


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        load_plan(fifo)


def test_device_is_refused():
    with pytest.raises(InputError, match="not a regular file"):
        load_plan("/dev/zero")


@pytest.mark.parametrize("args", [["export", "{p}", "-f", "torch", "-o", "{p}"],
                                  ["simulate", "{p}", "--timeline", "{p}"]])
def test_output_equal_to_input_is_refused_and_input_kept(tmp_path, args):
    p = tmp_path / "p.json"
    p.write_text(PP2.read_text())
    before = p.read_bytes()
    r = runner.invoke(app, [a.format(p=p) for a in args])
    assert r.exit_code == 2 and "is also an input" in r.output or "timeline format" in r.output, r.output
    assert p.read_bytes() == before


def test_solve_output_equal_to_profile_is_refused(profile_file):
    before = profile_file.read_bytes()
    r = runner.invoke(app, ["solve", str(profile_file), "--cluster", "h100x2", "-o", str(profile_file)])
    assert r.exit_code == 2 and "is also an input" in r.output, r.output
    assert profile_file.read_bytes() == before


@pytest.mark.parametrize("target, message", [("{dir}", "is a directory"), ("", "give a file name"),
                                             ("{dir}/no/such/x.txt", "does not exist"),
                                             ("/proc/x.txt", "cannot write")])
def test_unwritable_outputs_are_bad_input(tmp_path, target, message):
    out = target.format(dir=tmp_path)
    r = runner.invoke(app, ["export", str(PP2), "-f", "torch", "-o", out])
    assert r.exit_code == 2 and message in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_check_output_leaves_nothing_behind(tmp_path):
    check_output(tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf%", "NaN%"])
def test_check_tolerance_must_be_finite(value):
    r = runner.invoke(app, ["check", str(PP2), "--tolerance", value])
    assert r.exit_code == 2 and "not a finite number" in r.output, r.output
