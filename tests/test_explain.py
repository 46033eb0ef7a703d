"""`mergebuild explain`: linear forms, flags, block groups, JSON — with no model file present.

Expected coefficients are computed by hand below (plain Python arithmetic on the recipe's
numbers, written out per formula), never by the code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import SRC, run_cli

HEADER = """\
mergebuild: 1
models:
  A: {path: models/a.safetensors}
  B: {path: models/b.safetensors}
  C: {path: models/c.safetensors}
  D: {path: models/d.safetensors}
merges:
"""


def recipe(tmp_path: Path, merges: str, name: str = "r.yaml") -> Path:
    body = textwrap.dedent(merges)
    first = body.split(":", 1)[0]
    out = f"outputs:\n  o: {{from: {first}, path: out/o.safetensors}}\n"
    p = tmp_path / name
    p.write_text(HEADER + textwrap.indent(body, "  ") + out)
    return p


def explain_json(path: Path, *extra: str) -> dict:
    r = run_cli("explain", path, *extra, "--json")
    assert r.code == 0, r.err
    return r.json["nodes"]


def kinds(rep: dict) -> list[tuple[str, str | None]]:
    return [(f["kind"], f.get("term")) for f in rep["flags"]]


def test_merge_order_does_not_change_the_form(tmp_path: Path) -> None:
    one = recipe(
        tmp_path,
        """\
        x: A + (B - C)
        y:
          method: add_difference
          a: x
          b: D
          c: B
          alpha: 1.0
        """,
        "one.yaml",
    )
    two = recipe(
        tmp_path,
        """\
        x: A + (D - B)
        y: x + (B - C)
        """,
        "two.yaml",
    )
    for p in (one, two):
        r = run_cli("explain", p, "y")
        assert r.code == 0, r.err
        assert r.out.splitlines()[0] == "y = A − C + D"
        rep = explain_json(p, "y")["y"]
        assert rep["terms"] == {"A": 1.0, "C": -1.0, "D": 1.0}
        assert kinds(rep) == [("cancels", "B")]  # B goes in and comes back out


def test_seed_example_recipe() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "anything_nsfw_gape.yaml"
    r = run_cli("explain", example)
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "anything_nsfw = anything + 0.3·nai_full − 0.3·nai_sfw",
        "anything_nsfw_gape = anything − 0.7·nai_full − 0.3·nai_sfw + gape",
    ]


def test_chain_of_linear_methods_against_hand_computation(tmp_path: Path) -> None:
    p = recipe(
        tmp_path,
        """\
        w1: {method: weighted_sum, a: A, b: B, alpha: 0.3}
        w2: {method: weighted_sum, a: w1, b: C, alpha: 0.45}
        w3: {method: weighted_sum, a: D, b: w2, alpha: 0.6}
        tr: {method: triple_sum, a: w3, b: A, c: C, alpha: 0.2, beta: 0.1}
        tw: {method: sum_twice, a: tr, b: B, c: D, alpha: 0.25, beta: 0.4}
        av: {method: n_average, models: [tw, A, w1], weights: [3, 1, 2]}
        li: {method: linear, models: [av, D, B], weights: [0.9, 0.35, -0.25]}
        cp: {method: copy, a: li}
        """,
    )
    # by hand, formula by formula
    w1 = {"A": 1 - 0.3, "B": 0.3}
    w2 = {"A": w1["A"] * (1 - 0.45), "B": w1["B"] * (1 - 0.45), "C": 0.45}
    w3 = {"D": 1 - 0.6, "A": w2["A"] * 0.6, "B": w2["B"] * 0.6, "C": w2["C"] * 0.6}
    k = 1 - 0.2 - 0.1
    tr = {"A": w3["A"] * k + 0.2, "B": w3["B"] * k, "C": w3["C"] * k + 0.1, "D": w3["D"] * k}
    s, t = (1 - 0.25) * (1 - 0.4), 0.25 * (1 - 0.4)
    tw = {
        "A": tr["A"] * s,
        "B": tr["B"] * s + t,
        "C": tr["C"] * s,
        "D": tr["D"] * s + 0.4,
    }
    av = {
        "A": (3 * tw["A"] + 1 + 2 * w1["A"]) / 6,
        "B": (3 * tw["B"] + 2 * w1["B"]) / 6,
        "C": 3 * tw["C"] / 6,
        "D": 3 * tw["D"] / 6,
    }
    li = {
        "A": 0.9 * av["A"],
        "B": 0.9 * av["B"] - 0.25,
        "C": 0.9 * av["C"],
        "D": 0.9 * av["D"] + 0.35,
    }
    got = explain_json(p)
    for name, want in [("w1", w1), ("w2", w2), ("w3", w3), ("tr", tr), ("tw", tw)]:
        assert got[name]["terms"] == pytest.approx(want, rel=1e-12), name
        assert got[name]["flags"] == [], name  # every one of them is affine
    assert got["av"]["terms"] == pytest.approx(av, rel=1e-12)
    assert got["li"]["terms"] == pytest.approx(li, rel=1e-12)
    assert got["cp"]["terms"] == got["li"]["terms"]
    assert sum(li.values()) == pytest.approx(1.0)  # 0.9 + 0.35 − 0.25
    assert got["li"]["flags"] == []
    # list(...) keeps the models' declaration order: A, B, C, D
    assert list(got["tw"]["terms"]) == ["A", "B", "C", "D"]


def test_sum_not_one(tmp_path: Path) -> None:
    p = recipe(
        tmp_path,
        """\
        up: {method: linear, models: [A, B], weights: [1.0, 0.5]}
        down: A * 0.4 + B * 0.4
        mean: A * 0.7 + B * 0.3
        tenth: {method: linear, models: [A, B, C], weights: [0.1, 0.2, 0.7]}
        """,
    )
    got = explain_json(p)
    assert kinds(got["up"]) == [("sum_not_one", None)]
    assert got["up"]["flags"][0]["sum"] == pytest.approx(1.5)
    assert kinds(got["down"]) == [("sum_not_one", None)]
    # 0.7 + 0.3 and 0.1 + 0.2 + 0.7 are not exactly 1 as binary fractions: still affine
    assert got["mean"]["flags"] == []
    assert got["tenth"]["flags"] == []
    r = run_cli("explain", p, "up")
    assert "sum to 1.5, not 1" in r.out


def test_cancelled_model(tmp_path: Path) -> None:
    p = recipe(
        tmp_path,
        """\
        d1: A + (B - C)
        d2: d1 + (C - B) * 0.5
        d3: {method: add_difference, a: d1, b: C, c: B, alpha: 1.0}
        kept: {method: weighted_sum, a: A, b: B, alpha: 0.0}
        soup: {method: n_average, models: [A, B, C], weights: [1, 0, 1]}
        """,
    )
    got = explain_json(p)
    assert kinds(got["d1"]) == []
    assert kinds(got["d2"]) == []  # B and C only shrink
    assert kinds(got["d3"]) == [("cancels", "B"), ("cancels", "C")]
    assert got["d3"]["terms"] == {"A": 1.0}
    assert kinds(got["kept"]) == [("cancels", "B")]
    assert kinds(got["soup"]) == [("cancels", "B")]
    assert got["soup"]["terms"] == {"A": 0.5, "C": 0.5}


def test_large_coefficient(tmp_path: Path) -> None:
    p = recipe(
        tmp_path,
        """\
        big: {method: add_difference, a: A, b: B, c: C, alpha: 2.0}
        edge: {method: add_difference, a: A, b: B, c: C, alpha: 1.5}
        neg: {method: linear, models: [A, B], weights: [2.75, -1.75]}
        """,
    )
    got = explain_json(p)
    assert kinds(got["big"]) == [("large", "B"), ("large", "C")]
    assert kinds(got["edge"]) == []  # 1.5 is not above 1.5
    assert kinds(got["neg"]) == [("large", "A"), ("large", "B")]
    assert got["neg"]["terms"] == {"A": 2.75, "B": -1.75}


def test_block_weights_grouped(tmp_path: Path) -> None:
    # BASE, IN00..IN11, M00, OUT00..OUT11: IN00–IN05 and OUT06–OUT11 take 0.2, the rest 0.5
    values = [0.5] + [0.2] * 6 + [0.5] * 6 + [0.5] + [0.5] * 6 + [0.2] * 6
    p = recipe(
        tmp_path,
        f"""\
        mbw: {{method: weighted_sum, a: A, b: B, alpha: {values}}}
        comp: {{method: weighted_sum, a: A, b: C, alpha: {{unet: 0.5, vae: 1.0}}}}
        after: {{method: add_difference, a: mbw, b: D, c: A, alpha: 1.0}}
        """,
    )
    r = run_cli("explain", p)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert "mbw (weighted_sum, varies by block):" in lines
    assert "  IN00–IN05, OUT06–OUT11: 0.8·A + 0.2·B" in lines
    assert "  BASE, IN06–IN11, M00, OUT00–OUT05, text_encoder, vae, other: 0.5·A + 0.5·B" in (lines)
    got = explain_json(p)
    g = got["mbw"]["groups"]
    assert got["mbw"]["terms"] is None and len(g) == 2
    assert g[0]["blocks"][:2] == ["BASE", "IN06"] and g[0]["terms"] == {"A": 0.5, "B": 0.5}
    assert g[1]["label"] == "IN00–IN05, OUT06–OUT11"
    assert g[1]["terms"] == pytest.approx({"A": 0.8, "B": 0.2})
    # unet only for the UNet and components: text encoder and other kept from a (alpha 0)
    c = {x["label"]: x["terms"] for x in got["comp"]["groups"]}
    assert c == {"UNet": {"A": 0.5, "C": 0.5}, "text_encoder, other": {"A": 1.0}, "vae": {"C": 1.0}}
    # a consumer of a block-weighted node varies by block too (A cancels in IN00–IN05 …)
    a = {x["label"]: x["terms"] for x in got["after"]["groups"]}
    assert a["IN00–IN05, OUT06–OUT11"] == pytest.approx({"A": -0.2, "B": 0.2, "D": 1.0})


def test_folded_node_shows_its_form_and_what_cancelled(tmp_path: Path) -> None:
    p = recipe(
        tmp_path,
        """\
        y: {method: add_difference, a: x, b: D, c: B, alpha: 1.0, fold: true}
        x: A + (B - C)
        """,
    )
    r = run_cli("explain", p)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert "y = A − C + D  [folded add_difference: one float32 sum, one rounding]" in lines
    assert "  ! B appears in the graph but its total coefficient is 0" in lines
    assert "x = A + B − C" in lines  # the intermediate node is explained as written
    rep = explain_json(p)
    assert rep["y"]["folded"] is True and rep["y"]["folded_from"] == "add_difference"
    assert rep["y"]["terms"] == {"A": 1.0, "C": -1.0, "D": 1.0}
    assert kinds(rep["y"]) == [("cancels", "B")]
    assert "folded" not in rep["x"]


def test_folded_block_weights_keep_their_groups(tmp_path: Path) -> None:
    """Per-block coefficients survive folding: the same groups, the same hand-computed forms."""
    values = [0.5] + [0.2] * 6 + [0.5] * 6 + [0.5] + [0.5] * 6 + [0.2] * 6
    p = recipe(
        tmp_path,
        f"""\
        after: {{method: add_difference, a: mbw, b: D, c: A, alpha: 1.0, fold: true}}
        mbw: {{method: weighted_sum, a: A, b: B, alpha: {values}, fold: true}}
        comp: {{method: weighted_sum, a: A, b: C, alpha: {{unet: 0.5, vae: 1.0}}, fold: true}}
        """,
    )
    got = explain_json(p)
    a = {x["label"]: x["terms"] for x in got["after"]["groups"]}
    assert a.keys() == {
        "IN00–IN05, OUT06–OUT11",
        "BASE, IN06–IN11, M00, OUT00–OUT05, text_encoder, vae, other",
    }
    assert a["IN00–IN05, OUT06–OUT11"] == pytest.approx({"A": 0.8 - 1, "B": 0.2, "D": 1.0})
    assert a["BASE, IN06–IN11, M00, OUT00–OUT05, text_encoder, vae, other"] == pytest.approx(
        {"A": 0.5 - 1, "B": 0.5, "D": 1.0}
    )
    m = {x["label"]: x["terms"] for x in got["mbw"]["groups"]}
    assert m["IN00–IN05, OUT06–OUT11"] == pytest.approx({"A": 0.8, "B": 0.2})
    c = {x["label"]: x["terms"] for x in got["comp"]["groups"]}
    assert c == {"UNet": {"A": 0.5, "C": 0.5}, "text_encoder, other": {"A": 1.0}, "vae": {"C": 1.0}}
    r = run_cli("explain", p, "after")
    assert "after (folded add_difference, varies by block):" in r.out.splitlines(), r.out


def test_block_weights_flags_per_group(tmp_path: Path) -> None:
    values = [0.0] * 13 + [2.0] * 13
    p = recipe(tmp_path, f"big: {{method: add_difference, a: A, b: B, c: C, alpha: {values}}}\n")
    rep = explain_json(p)["big"]
    assert [(f["kind"], f["term"], f["blocks"]) for f in rep["flags"]] == [
        ("large", "B", "M00, OUT00–OUT11"),
        ("large", "C", "M00, OUT00–OUT11"),
    ]


def test_non_linear_is_opaque(tmp_path: Path) -> None:
    p = recipe(
        tmp_path,
        """\
        tied: {method: ties, base: A, models: [B, C]}
        mix: tied * 0.5 + D * 0.5
        more: mix + (B - A) * 2.0
        """,
    )
    r = run_cli("explain", p)
    assert r.code == 0, r.err
    assert r.out.splitlines()[:2] == ["tied: non-linear (ties)", "mix = 0.5·D + 0.5·tied"]
    got = explain_json(p)
    assert got["tied"] == {
        "method": "ties",
        "linear": False,
        "terms": None,
        "groups": [],
        "flags": [],
    }
    assert got["more"]["terms"] == {"A": -2.0, "B": 2.0, "D": 0.5, "tied": 0.5}
    assert kinds(got["more"]) == [("large", "A"), ("large", "B")]


def test_json_structure(tmp_path: Path) -> None:
    p = recipe(tmp_path, "x: A + (B - C) * 3\ny: x * 0.5 + D * 0.5\n")
    r = run_cli("explain", p, "--json")
    assert r.code == 0, r.err
    data = r.json
    assert list(data) == ["nodes"] and list(data["nodes"]) == ["x", "y"]
    x = data["nodes"]["x"]
    assert set(x) == {"method", "linear", "terms", "form", "groups", "flags"}
    assert x["method"] == "add_difference" and x["linear"] is True
    assert x["form"] == "A + 3·B − 3·C"
    for f in x["flags"]:
        assert set(f) >= {"kind", "message"}
    assert [f["kind"] for f in x["flags"]] == ["large", "large"]
    only = run_cli("explain", p, "y", "--json").json
    assert list(only["nodes"]) == ["y"]


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("nope", "unknown merge node 'nope'"),
        ("xx", "did you mean 'x'"),
        ("A", "'A' is an input model, not a merge node"),
    ],
)
def test_unknown_node(tmp_path: Path, node: str, message: str) -> None:
    p = recipe(tmp_path, "x: A + (B - C)\n")
    r = run_cli("explain", p, node)
    assert r.code != 0
    assert message in r.err and "Traceback" not in r.err
    assert r.out == ""
    j = run_cli("explain", p, node, "--json")
    assert j.code != 0 and message in j.json["error"]


def test_bad_recipe_is_one_message(tmp_path: Path) -> None:
    p = recipe(tmp_path, "x: {method: weighted_sum, a: A, b: Z, alpha: 0.5}\n")
    r = run_cli("explain", p)
    assert r.code != 0 and "Z" in r.err and "Traceback" not in r.err


def test_model_files_are_never_opened(tmp_path: Path) -> None:
    """The recipes above name files that do not exist; here they are FIFOs: any open() for
    reading would block until the timeout."""
    p = recipe(tmp_path, "x: A + (B - C)\n")
    (tmp_path / "models").mkdir()
    for m in "abcd":
        os.mkfifo(tmp_path / "models" / f"{m}.safetensors")
    r = run_cli("explain", p, "--json", timeout=60)
    assert r.code == 0, r.err
    assert r.json["nodes"]["x"]["terms"] == {"A": 1.0, "B": 1.0, "C": -1.0}


def test_no_torch_import(tmp_path: Path) -> None:
    p = recipe(
        tmp_path,
        "x: A + (B - C)\nt: {method: ties, base: A, models: [B, C]}\n"
        "f: {expr: 'x * 0.5 + t * 0.5', fold: true}\n",  # folding reads the recipe only too
    )
    code = (
        "import sys\n"
        "from mergebuild.cli import main\n"
        f"rc = main(['explain', {str(p)!r}])\n"
        "assert rc == 0, rc\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "TORCH False"
    assert "x = A + B − C" in out.stdout


def test_long_chain_no_recursion_limit(tmp_path: Path) -> None:
    """1500 nodes deep: beyond Python's default recursion limit (1000)."""
    merges = ["n0: {method: weighted_sum, a: A, b: B, alpha: 0.5}"]
    for i in range(1, 1500):
        merges.append(f"n{i}: {{method: weighted_sum, a: n{i - 1}, b: {'AB'[i % 2]}, alpha: 0.5}}")
    p = recipe(tmp_path, "\n".join(merges) + "\n")
    a, b = 0.5, 0.5  # by hand: each step halves the chain and adds half of A or B
    for i in range(1, 1500):
        a, b = a / 2 + (0.5 if i % 2 == 0 else 0), b / 2 + (0.5 if i % 2 == 1 else 0)
    rep = explain_json(p, "n1499")["n1499"]
    assert rep["terms"] == pytest.approx({"A": a, "B": b}, rel=1e-12)
    assert rep["flags"] == []


def test_a_swept_node_is_explained_member_by_member(workdir: Path) -> None:
    recipe = workdir / "s.yaml"
    recipe.write_text(
        "mergebuild: 1\nmodels:\n  a: models/anything-v3.safetensors\n"
        "  b: models/nai-full.safetensors\n  c: models/nai-sfw.safetensors\n"
        "merges:\n  n:\n    expr: a + (b - c) * alpha\n    sweep: {alpha: [0.25, 0.5]}\n"
        'outputs:\n  n: {from: n, path: "out/n-{alpha}.safetensors"}\n'
    )
    r = run_cli("explain", recipe, "n", "--json")
    assert r.code == 0, r.err
    nodes = r.json["nodes"]
    assert list(nodes) == ["n[alpha=0.25]", "n[alpha=0.5]"]
    for name, alpha in (("n[alpha=0.25]", 0.25), ("n[alpha=0.5]", 0.5)):
        terms = {m: float(c) for m, c in nodes[name]["terms"].items()}
        assert terms == {"a": 1.0, "b": alpha, "c": -alpha}, terms
