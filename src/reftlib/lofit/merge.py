"""LoFiT's merge: :func:`merge_and_unload` lives in :mod:`reftlib.merge` (it folds any foldable intervention).

Kept so that ``from reftlib.lofit.merge import merge_and_unload`` goes on working.
"""

from ..errors import MergeError
from ..merge import merge_and_unload

__all__ = ["MergeError", "merge_and_unload"]
