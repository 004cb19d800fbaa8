"""Run torch and jaxbn side by side and measure how far apart they are.

Three concepts, one module each:

- :mod:`._compare`: the comparison primitive (:func:`compare`, :data:`TOLERANCES`);
- :mod:`._cases`: the single-layer sweep behind ``jaxbn parity`` and the suite
  (:class:`Case`, :func:`run_case`, :func:`builtin_cases`);
- :mod:`._models`: the whole-model harness (:func:`compare_models`), which
  compares a torch model and its Flax port layer by layer.

torch is imported lazily: ``import jaxbn.parity`` works without it, running
a case does not.
"""

from .._torch import to_numpy as to_numpy
from .._torch import to_tensor as to_torch
from ._cases import AFFINE as AFFINE
from ._cases import HEADERS as HEADERS
from ._cases import KINDS as KINDS
from ._cases import PARAMS as PARAMS
from ._cases import QUANTITIES as QUANTITIES
from ._cases import TORCH_NAMES as TORCH_NAMES
from ._cases import TRACKING as TRACKING
from ._cases import Case as Case
from ._cases import CaseResult as CaseResult
from ._cases import Kind as Kind
from ._cases import Options as Options
from ._cases import Step as Step
from ._cases import builtin_cases as builtin_cases
from ._cases import cotangents as cotangents
from ._cases import drifting_batches as drifting_batches
from ._cases import environment as environment
from ._cases import format_table as format_table
from ._cases import jax_step_fn as jax_step_fn
from ._cases import make_pair as make_pair
from ._cases import run as run
from ._cases import run_case as run_case
from ._cases import step_quantities as step_quantities
from ._cases import torch_step as torch_step
from ._cases import torch_tensors as torch_tensors
from ._cases import variables_of as variables_of
from ._compare import TOLERANCES as TOLERANCES
from ._compare import compare as compare
from ._models import LayerDiff as LayerDiff
from ._models import ModelReport as ModelReport
from ._models import compare_models as compare_models
from ._models import randomized as randomized
from ._models import to_ref_layout_inverse as to_ref_layout_inverse

__all__ = [
    "AFFINE",
    "HEADERS",
    "KINDS",
    "PARAMS",
    "QUANTITIES",
    "TOLERANCES",
    "TORCH_NAMES",
    "TRACKING",
    "Case",
    "CaseResult",
    "Kind",
    "LayerDiff",
    "ModelReport",
    "Options",
    "Step",
    "builtin_cases",
    "compare",
    "compare_models",
    "cotangents",
    "drifting_batches",
    "environment",
    "format_table",
    "jax_step_fn",
    "make_pair",
    "randomized",
    "run",
    "run_case",
    "step_quantities",
    "to_numpy",
    "to_ref_layout_inverse",
    "to_torch",
    "torch_step",
    "torch_tensors",
    "variables_of",
]
