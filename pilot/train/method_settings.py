"""The methods of ``python -m pilot.train`` and the settings that apply to some of them only: shared by the command
line (:mod:`.arguments`), the dataset recipes (:mod:`.recipe_files`) and the resolution (:mod:`.config`)."""
from __future__ import annotations

METHODS = ("dense", "pilot", "spred", "lasso", "str", "gmp")
FACTORISED = ("pilot", "spred")  # the methods that train with FusedPILoTSGD
# The setting that holds each steered method's strength (--target-sparsity starts it from the recipe's integral).
STRENGTH_SETTINGS = {"pilot": "alpha", "spred": "alpha", "lasso": "lasso_lambda", "str": "str_weight_decay"}
# The settings that apply to some methods only, with those methods (every other setting applies to all of them).
METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "alpha": FACTORISED, "beta": ("pilot",), "alpha_schedule": FACTORISED, "factor": FACTORISED,
    "sparsity_signal": FACTORISED, "threshold": FACTORISED, "alpha_update": FACTORISED,
    "accuracy_window": FACTORISED, "lasso_lambda": ("lasso",), "str_init": ("str",), "str_weight_decay": ("str",),
}


def methods_of(setting: str) -> tuple[str, ...]:
    """The methods the setting ``setting`` (a Config field) applies to; the recipes' strength_integral applies to
    the steered methods."""
    if setting == "strength_integral":
        return tuple(STRENGTH_SETTINGS)
    return METHOD_SETTINGS.get(setting, METHODS)
