"""The parameter table (ds4bench/harness/params.py): every parameter reaches the spec, the command line,
the cell and the record from its one row."""
from __future__ import annotations

import dataclasses

from ds4bench.harness import params as P
from ds4bench.harness.matrix import MatrixSpec, expand, spec_from_mapping
from ds4bench.harness.record import FIELDS

SAMPLE = {str: "x", int: 3, bool: True, (int, float): 2.5}
VALID = {"ctx": 512, "settle": 0.05}            # values the spec's checks accept


def _value(p):
    if p.choices:
        return p.choices[-1]
    return VALID.get(p.spec, SAMPLE[p.type])


def test_every_parameter_has_its_spec_field_cell_parameter_and_record_column():
    fields = {f.name for f in dataclasses.fields(MatrixSpec)}
    for p in P.PARAMS:
        assert p.spec in P.SPEC_KEYS and p.field in fields, p
        if p.cell:
            assert p.cell in FIELDS, p                     # the record keeps what the cell was run with
    cells, _ = expand(MatrixSpec(), "numpy")
    assert P.CELL_PARAMS <= set(cells[0].params)           # expand gives `ds4bench cell` what it needs
    assert {p.cell for p in P.PARAMS if p.cell} <= set(cells[0].params) | {"model_file"}


def test_every_scalar_reads_from_a_spec_and_from_its_option():
    from ds4bench.cli import build_parser
    from ds4bench.cli_matrix import build_spec
    for p in P.SCALARS:
        if p.spec in ("backend", "engine", "prompts", "variant"):
            continue                                       # values checked against files and presets
        v = _value(p)
        spec = spec_from_mapping({p.spec: v}, "test")
        assert getattr(spec, p.field) == (p.cast(v) if p.cast else v), p
        if p.flag:
            names = P.option_names(p)
            a = build_parser().parse_args(["matrix", "--backend", "numpy", names[0], str(v)])
            assert getattr(build_spec(a)[0], p.field) == (p.cast or p.type)(v), p


def test_axes_take_lists_and_their_options_comma_lists():
    from ds4bench.cli import build_parser
    from ds4bench.cli_matrix import build_spec
    spec = spec_from_mapping({"cache": ["q8", "f32"], "batch": [1, 2]}, "test")
    assert (spec.caches, spec.batches) == (["q8", "f32"], [1, 2])
    a = build_parser().parse_args(["matrix", "--backend", "numpy", "--mode", "q8,f16", "-b", "1,8"])
    spec = build_spec(a)[0]
    assert (spec.caches, spec.batches) == (["q8", "f16"], [1, 8])
    assert [p.flag for p in P.AXES] == ["preset", "model", "cache", "placement", "batch", "nvtx"]
