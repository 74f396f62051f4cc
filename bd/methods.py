"""The registry of methods: what each method is called, drawn in, tested under and used for.

Every other part asks this registry (as timm's ``register_model`` / ``list_models`` serve timm):
the training defaults (``training.methods``), the evaluation's default sweeps
(``evaluation.missing_kinds``), the tables' reference and baseline rows, the figures' labels,
colours and default method lists, the workflow's targets and the heatmap's model, and the config
schema's list of method names. The model classes themselves are registered in
:mod:`bd.mil.models` under the same names (a test checks that the two registries agree).
Light imports only: the Snakefile imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Roles in the paper's tables.
ROLES = ("reference", "baseline", "compared", "proposed", "variant")
# BD's distillation directions (Table II): name -> (M->S, S->M) switched on. The choices of
# training.directions and ablations.directions and the switches of bd.mil.distillation (which
# reads them as bd.mil.base.DIRECTIONS); here, without torch, for the Snakefile's light imports.
DIRECTIONS = {"none": (False, False), "m2s": (True, False), "s2m": (False, True), "both": (True, True)}


@dataclass(frozen=True)
class Method:
    """One method of the paper and how the workflow uses it."""

    name: str
    label: str  # in tables and legends
    colour: str  # matplotlib colour in every figure
    role: str  # reference: single-modality (Table I at 0 % only); baseline: the change columns are against it
    missing_kinds: tuple[str, ...] = ("clinical",)  # the conditions it answers: modalities its sweeps remove
    default: bool = True  # trained by default (``training.methods``)
    figures: dict[str, int] = field(default_factory=dict)  # figure or target -> position in its default list

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"method {self.name}: unknown role {self.role!r} (known: {ROLES})")


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method | None:
    """The method registered under ``name``, or None for an unknown name."""
    return _METHODS.get(name)


def list_methods(*, role: str | None = None, figure: str | None = None, default: bool | None = None) -> list[str]:
    """Method names in registration order, or in a figure's order when ``figure`` is given."""
    found = [m for m in _METHODS.values()
             if (role is None or m.role == role) and (default is None or m.default == default)
             and (figure is None or figure in m.figures)]
    if figure is not None:
        found.sort(key=lambda m: m.figures[figure])
    return [m.name for m in found]


def label_of(name: str) -> str:
    """The method's label in tables and legends (the name itself for an unregistered one)."""
    method = get_method(name)
    return method.label if method else name


def colour_of(name: str, i: int = 0) -> str:
    """The method's colour; the i-th colour of matplotlib's cycle for an unregistered one."""
    method = get_method(name)
    return method.colour if method else f"C{i % 10}"


def default_missing_kinds() -> dict[str, list[str]]:
    """``evaluation.missing_kinds`` by default: the methods tested under more than missing clinical data."""
    return {m.name: list(m.missing_kinds) for m in _METHODS.values() if m.missing_kinds != ("clinical",)}


# Filling is green as in the paper's Fig. 4; BD red; the rest from a qualitative palette.
# figures: fig1 (AUC vs clinical missing rate), wsi_missing (Fig. 4 a/b), analysis (Fig. 5 a),
# heatmaps (the first trained one draws the attention heatmaps).
register_method(Method("image_only", "image only", "tab:blue", "reference",
                       figures={"fig1": 0, "analysis": 0, "heatmaps": 2}))
register_method(Method("clinical_only", "clinical only", "tab:purple", "reference",
                       missing_kinds=("clinical", "slide"), figures={"wsi_missing": 2}))
register_method(Method("filling", "Filling", "tab:green", "baseline", missing_kinds=("clinical", "slide"),
                       figures={"fig1": 1, "wsi_missing": 1, "heatmaps": 1}))
register_method(Method("ae", "AE", "tab:olive", "compared", figures={"heatmaps": 4}))
register_method(Method("ensemble", "Ensemble", "tab:orange", "compared", figures={"heatmaps": 3}))
register_method(Method("smil", "SMIL", "tab:brown", "compared", figures={"heatmaps": 5}))
register_method(Method("bd", "BD", "tab:red", "proposed", figures={"fig1": 2, "heatmaps": 0}))
register_method(Method("bd_wsi", "BD (slide missing)", "tab:red", "variant", missing_kinds=("slide",),
                       default=False, figures={"wsi_missing": 0}))
register_method(Method("modality_dropout", "modality dropout", "tab:cyan", "compared", figures={"fig1": 3}))
