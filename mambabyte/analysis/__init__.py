"""Interpretability: hooks, extraction of Δ / discrete A / module outputs, the artefact schema, plots.

Submodules: :mod:`.hooks`, :mod:`.extraction`, :mod:`.artefact`, :mod:`.plots` (matplotlib, imported
only when a plot is drawn). Names below are imported on first use, so ``import mambabyte.analysis``
stays cheap.
"""

_LAZY = {
    "extract_module_outputs": ".extraction",
    "extract_discrete_A": ".extraction",
    "extract_input_sim_with_discrete_A": ".extraction",
    "discrete_A_reduced": ".extraction",
    "input_sim_with_discrete_A": ".extraction",
    "prediction_stats": ".extraction",
    "build_artefact": ".artefact",
    "save_artefact": ".artefact",
    "load_artefact": ".artefact",
    "SCHEMA_VERSION": ".artefact",
    "plot_artefact": ".plots",
    "select_modules": ".hooks",
    "hooked": ".hooks",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'mambabyte.analysis' has no attribute {name!r}")
