"""Fuzzing recipe text: a seeded mutator damages valid recipes in YAML- and expression-aware
ways; loading (and planning, when it loads) must succeed or raise RecipeError/BuildError —
never any other exception. Set FUZZ_SEED to explore other cases; a failure prints its text."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from conftest import EXAMPLES, run_cli

SEEDS = sorted(EXAMPLES.glob("*.yaml"))
EXTRA_SEED = """mergebuild: 1
models:
  a: models/anything-v3.safetensors
  b: {path: models/nai-full.safetensors}
  c: models/nai-sfw.safetensors
base: &base {method: weighted_sum, a: a, b: b, alpha: 0.25}
merges:
  w: {<<: *base, dtype: bf16}
  l: {method: linear, inputs: [a, b, c], weights: [0.5, 0.25, 0.25], cache: true}
  d: {method: add_difference, a: w, b: b, c: c, alpha: 1.0}
  e: "l * 2 - (a + b) / 2"
  k: {method: copy, a: e}
outputs:
  o1: {from: d, path: out/o1.safetensors, dtype: fp16}
  o2: {from: k, path: out/o2.safetensors}
"""
TOKENS = [
    ":", ": ", "-", "- ", "[", "]", "{", "}", ",", "&x ", "*x", "*base", "<<: *base", "'", '"',
    "\t", "\n", "  ", "#", "|", ">", "? ", "%YAML 1.1\n", "---\n", "...\n", "@", "`", "!", "!!str ",
    "!!python/name:os.system ", "!!binary ", "!!set ", "!!float ", "\x00", "\ufeff", "é", "\u202e",
    "1e999", "-1e999", "1e39", "9" * 5000, "-1", "0", ".nan", ".inf", "~", "null", "true", "0x1F",
    "0o17", "1_000", "2001-02-30", "2001-01-01", "(", ")", "*", "/", "+", " - ", "**", "a.b",
    "__import__('os')", "../", "/etc/passwd", "~/x", "out/../../x", "models/nai-sfw.safetensors",
    "method", "weighted_sum", "add_difference", "linear", "copy", "alpha", "weights", "inputs",
    "from", "path", "dtype", "fp16", "fp8", "auto", "cache", "merges", "models", "outputs",
    "mergebuild", "expr", "a", "b", "nai_full", "anything_nsfw",
]  # fmt: skip


def mutate(text: str, rng: random.Random) -> str:
    """Apply 1–4 random edits: token insertions, deletions, line shuffles, truncation..."""
    for _ in range(rng.choice([1, 1, 1, 2, 3, 4])):
        lines = text.split("\n")
        op = rng.randrange(9)
        pos = rng.randrange(len(text) + 1)
        if op == 0:
            text = text[:pos] + rng.choice(TOKENS) + text[pos:]
        elif op == 1:
            text = text[:pos] + text[pos + rng.randint(1, 12) :]
        elif op == 2 and len(lines) > 1:
            i = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines)), lines[i])
            text = "\n".join(lines)
        elif op == 3 and len(lines) > 1:
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif op == 4:
            i = rng.randrange(len(lines))
            lines[i] = " " * rng.choice([0, 1, 2, 3, 4, 8]) + lines[i].lstrip()
            text = "\n".join(lines)
        elif op == 5:
            text = text[:pos]
        elif op == 6:  # replace a word with a token
            words = text.split(" ")
            words[rng.randrange(len(words))] = rng.choice(TOKENS)
            text = " ".join(words)
        elif op == 7:  # replace a number with an extreme one
            i = rng.randrange(len(lines))
            for num in ("0.3", "1.0", "0.5", "0.25", "2"):
                if num in lines[i]:
                    lines[i] = lines[i].replace(num, rng.choice(TOKENS[37:50]), 1)
            text = "\n".join(lines)
        else:
            text = text[:pos] + text[pos:][::-1] if rng.random() < 0.1 else text + text[pos:]
    return text


def cases(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    seeds = [p.read_text() for p in SEEDS] + [EXTRA_SEED]
    return [mutate(rng.choice(seeds), rng) for _ in range(n)]


def fuzz(workdir: Path, cache: Path, n: int, seed: int) -> dict[str, int]:
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.errors import BuildError, RecipeError
    from mergebuild.recipe import load_recipe

    store = CacheStore(cache)
    outcome = {"loaded": 0, "RecipeError": 0, "BuildError": 0}
    failures = []
    for i, text in enumerate(cases(n, seed)):
        recipe = workdir / f"fuzz{i % 7}.yaml"
        recipe.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            loaded = load_recipe(recipe, ("w.alpha=0.5",) if i % 5 == 0 else ())
            Builder(loaded, store).plan()
            outcome["loaded"] += 1
        except RecipeError as e:
            assert str(e).strip(), "an error without a message"
            outcome["RecipeError"] += 1
        except BuildError:
            outcome["BuildError"] += 1
        except Exception as e:
            failures.append(f"case {i} (seed {seed}): {type(e).__name__}: {e}\n{text!r}")
    print(f"\nfuzz: {n} cases, seed {seed}: {outcome}")
    assert not failures, f"{len(failures)} uncaught exceptions:\n" + "\n\n".join(failures[:5])
    return outcome


def test_fuzz_recipe_text(workdir: Path, cache: Path) -> None:
    outcome = fuzz(workdir, cache, n=100, seed=int(os.environ.get("FUZZ_SEED", 2026)))
    assert outcome["RecipeError"] > 0 and outcome["loaded"] > 0  # the mutator explores both


@pytest.mark.slow
def test_fuzz_recipe_text_long(workdir: Path, cache: Path) -> None:
    fuzz(workdir, cache, n=2000, seed=int(os.environ.get("FUZZ_SEED", 1)))


@pytest.mark.parametrize("i", range(6))
def test_fuzzed_recipes_through_cli(workdir: Path, cache: Path, i: int) -> None:
    """A few mutated recipes through the real CLI: exit 0/1/2, never a traceback."""
    text = cases(6, seed=99)[i]
    recipe = workdir / "fuzz.yaml"
    recipe.write_bytes(text.encode("utf-8", "surrogatepass"))
    r = run_cli(recipe, "--dry-run", cache=cache)
    assert r.code in (0, 1, 2) and "Traceback" not in r.err and "unexpected" not in r.err, r.err


# -- structured: well-formed YAML whose values are random (hypothesis) ---------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    st = None

if st is not None:
    NAMES = st.sampled_from(["a", "b", "c", "m", "n", "o", "x-y", "1", "", "__metadata__"])
    SCALARS = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        NAMES,
        st.sampled_from(["a + b", "a*0.5+b*0.5", "(a - b) * 1e40 + a", "a / 0", "fp16", "auto"]),
        st.sampled_from(["models/anything-v3.safetensors", "../x", "/tmp/x", "out/o.safetensors"]),
    )
    VALUES = st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(NAMES | st.text(max_size=6), inner, max_size=4),
        ),
        max_leaves=12,
    )
    FIELDS = st.sampled_from(
        ["method", "a", "b", "c", "alpha", "weights", "inputs", "expr", "dtype", "cache", "bogus"]
    )
    MERGE = st.one_of(
        VALUES,
        st.fixed_dictionaries(
            {"method": st.sampled_from(["weighted_sum", "add_difference", "linear", "copy", "x"])},
            optional={f: VALUES for f in ["a", "b", "c", "alpha", "weights", "inputs", "dtype"]},
        ),
        st.dictionaries(FIELDS, VALUES, max_size=5),
    )
    RECIPES = st.fixed_dictionaries(
        {
            "mergebuild": st.sampled_from([1, 1, 1, 2, "1", None]),
            "models": st.one_of(
                st.dictionaries(
                    NAMES,
                    st.sampled_from(
                        ["models/anything-v3.safetensors", "models/nai-sfw.safetensors", "missing"]
                    )
                    | VALUES,
                    max_size=3,
                ),
                VALUES,
            ),
            "merges": st.one_of(st.dictionaries(NAMES, MERGE, max_size=4), VALUES),
            "outputs": st.one_of(
                st.dictionaries(
                    NAMES,
                    st.fixed_dictionaries(
                        {"from": NAMES, "path": SCALARS}, optional={"dtype": SCALARS}
                    )
                    | VALUES,
                    max_size=2,
                ),
                VALUES,
            ),
        }
    )

    def check_structured(workdir: Path, data: dict) -> None:
        import yaml

        from mergebuild.errors import RecipeError
        from mergebuild.recipe import load_recipe

        recipe = workdir / "structured.yaml"
        recipe.write_text(yaml.safe_dump(data, allow_unicode=True))
        try:
            load_recipe(recipe)
        except RecipeError as e:
            assert str(e).strip()

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=RECIPES)
    def test_structured_fuzz(workdir: Path, data: dict) -> None:
        check_structured(workdir, data)

    @pytest.mark.slow
    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=RECIPES)
    def test_structured_fuzz_long(workdir: Path, data: dict) -> None:
        check_structured(workdir, data)
