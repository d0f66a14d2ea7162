"""The plugin's contract with a vLLM release, checked from its sources without importing them.

    python -m dspark_vllm.vllm_plugin.contract vllm-0.33.0-....whl     # a downloaded wheel
    python -m dspark_vllm.vllm_plugin.contract .venv/lib/python3.11/site-packages

Every entry of :data:`~.patches.PATCHES` must exist (module, class, attribute) with the leading
parameters its wrapper passes by position (``Patch.params``), and the V1-runner facts the plugin
relies on (:data:`FACTS`) must hold. The sources are parsed with ``ast`` (a CUDA wheel cannot be
imported on a CPU machine), so a release can be checked before anyone installs it: a renamed
symbol or parameter fails naming it. Prints one table; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class SourceTree:
    """Python sources of an installed package tree (a site-packages folder) or of a wheel."""

    def __init__(self, location: str | Path) -> None:
        self.location = Path(location)
        self._zip = zipfile.ZipFile(self.location) if self.location.suffix == ".whl" else None
        self._cache: dict[str, ast.Module | None] = {}

    def read(self, relpath: str) -> str | None:
        if self._zip is not None:
            try:
                return self._zip.read(relpath).decode()
            except KeyError:
                return None
        path = self.location / relpath
        return path.read_text() if path.is_file() else None

    def module(self, dotted: str) -> ast.Module | None:
        """The parsed module ``dotted`` (a ``.py`` file or a package's ``__init__.py``), or None."""
        if dotted not in self._cache:
            base = dotted.replace(".", "/")
            text = self.read(base + ".py")
            if text is None:
                text = self.read(base + "/__init__.py")
            self._cache[dotted] = None if text is None else ast.parse(text)
        return self._cache[dotted]


def _member(node: ast.AST, name: str) -> ast.AST | None:
    """The class, function or assigned name ``name`` defined directly in ``node``'s body."""
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == name:
            return child
        if isinstance(child, ast.AnnAssign) and isinstance(child.target, ast.Name) and child.target.id == name:
            return child
        if isinstance(child, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in child.targets):
            return child
    return None


def _imported_from(module: ast.Module, name: str) -> str | None:
    """The module a ``from X import name`` in ``module`` takes ``name`` from (absolute imports)."""
    for child in module.body:
        if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
            if any((alias.asname or alias.name) == name for alias in child.names):
                return child.module
    return None


def find(tree: SourceTree, dotted: str) -> ast.AST | None:
    """The definition of ``dotted`` (module path, then attribute names), following one re-export."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = tree.module(".".join(parts[:cut]))
        if module is None:
            continue
        node: ast.AST | None = module
        for i, name in enumerate(parts[cut:]):
            found = _member(node, name)
            if found is None and node is module:
                source = _imported_from(module, name)
                if source is not None:
                    return find(tree, ".".join([source, name, *parts[cut + i + 1:]]))
            node = found
            if node is None:
                return None
        return node
    return None


def parameter_names(node: ast.AST) -> list[str] | None:
    """Positional parameter names of a function definition (None for anything else)."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    return [a.arg for a in node.args.posonlyargs + node.args.args]


@dataclass(frozen=True)
class Fact:
    """A fact about vLLM's sources the plugin relies on: ``text`` appears in module ``module``."""

    module: str
    text: str
    reason: str


FACTS: tuple[Fact, ...] = (
    Fact("vllm.config.speculative", '"custom_class"', "speculative method custom_class exists (our proposer's route)"),
    Fact("vllm.v1.worker.gpu_model_runner", 'method == "custom_class"',
         "the V1 runner builds a custom_class proposer (create_custom_proposer)"),
    Fact("vllm.envs", "VLLM_USE_V2_MODEL_RUNNER", "the switch that keeps CUDA on the V1 model runner"),
    Fact("vllm.v1.worker.gpu_model_runner", "self._draft_probs", "the V1 runner hands a proposer's q to verification"),
    Fact("vllm.v1.worker.gpu_model_runner", "self._draft_prob_req_ids", "q rows are looked up by request id"),
    Fact("vllm.v1.worker.gpu_model_runner", "use_aux_hidden_state_outputs", "the target returns aux hidden states"),
    Fact("vllm.v1.worker.gpu_model_runner", "self.drafter.load_model", "the runner hands the target to the proposer"),
    Fact("vllm.ray.ray_env", "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY",
         "Ray workers receive DSPARK_VLLM_* variables when listed there (multi-node TP)"),
)


@dataclass
class Row:
    item: str
    found: bool
    params_ok: bool | None  # None: nothing to compare
    detail: str = ""


def check(location: str | Path) -> list[Row]:
    """Check every manifest entry and fact against the vLLM sources at ``location``."""
    from .patches import PATCHES

    tree = SourceTree(location)
    rows = []
    for patch in PATCHES:
        node = find(tree, patch.symbol)
        if node is None:
            rows.append(Row(patch.symbol, False, None, "not found" + (" (optional group)" if patch.optional else "")))
            continue
        if not patch.params:
            rows.append(Row(patch.symbol, True, None))
            continue
        names = parameter_names(node)
        ok = names is not None and names[: len(patch.params)] == list(patch.params)
        rows.append(Row(patch.symbol, True, ok, "" if ok else f"expected {list(patch.params)}, found {names}"))
    for fact in FACTS:
        module = tree.module(fact.module)
        text = None if module is None else ast.unparse(module)
        present = text is not None and fact.text.replace('"', "'") in text  # ast.unparse quotes with '

        rows.append(Row(f"{fact.module}: {fact.text}", present, None, "" if present else f"missing ({fact.reason})"))
    return rows


def failures(rows: list[Row]) -> list[Row]:
    """Rows that break the contract (an optional group's absence is not a failure)."""
    return [r for r in rows if (not r.found and "optional" not in r.detail) or r.params_ok is False]


def table(rows: list[Row], title: str) -> str:
    lines = [f"vLLM contract: {title}", "| symbol or fact | found | parameters match | note |", "|---|---|---|---|"]
    for r in rows:
        params = "-" if r.params_ok is None else ("yes" if r.params_ok else "NO")
        lines.append(f"| `{r.item}` | {'yes' if r.found else 'NO'} | {params} | {r.detail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a vLLM wheel (.whl) or a folder holding the vllm package (site-packages)")
    args = parser.parse_args(argv)
    rows = check(args.source)
    print(table(rows, str(args.source)))
    bad = failures(rows)
    for r in bad:
        print(f"CONTRACT BROKEN: {r.item}: {r.detail}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
