"""Import torchvision (and what imports it: ``open_clip``, transformers' and diffusers'
modeling code) where torchvision's compiled ops cannot load.

The torchvision wheels available here are CUDA builds; next to the CPU torch their C
extension does not load, and ``import torchvision`` then fails
while registering fake kernels for two ops whose schemas only that extension defines
(``torchvision::nms``, ``torchvision::qnms``). Defining those two schemas lets the
pure-Python parts of torchvision, all that open_clip and transformers use, load. The ops
stay without kernels: calling ``torchvision.ops.nms`` still fails, loudly.

Nothing happens at import of this module. :func:`import_torchvision` first imports
torchvision as is; only when that fails for exactly this reason does it define the missing
schemas and import again, so on a machine whose torchvision matches its torch (the
extension loads and owns the ``torchvision`` op namespace) it changes nothing.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

# The two schemas as torchvision's C extension defines them.
_MISSING_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# The library that owns the stand-in schemas; kept alive for the process, since
# dropping a ``torch.library.Library`` removes what it registered.
_stand_in_library: torch.library.Library | None = None


def import_open_clip() -> ModuleType:
    """Return the ``open_clip`` module, importing torchvision first (see the module doc).

    Idempotent: later calls return the already imported module.
    """
    import_torchvision()
    return importlib.import_module("open_clip")


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module (see the module doc). Call it before importing
    transformers' or diffusers' model classes. Idempotent."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if not _is_missing_op_error(error):
            raise
        # The failed import leaves the submodules it finished in sys.modules; drop them so
        # the second import runs torchvision's initialisation from the start.
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _define_missing_schemas()
        return importlib.import_module("torchvision")


def _is_missing_op_error(error: RuntimeError) -> bool:
    message = str(error)
    return any(f"torchvision::{op} does not exist" in message for op in _MISSING_OP_SCHEMAS)


def _define_missing_schemas() -> None:
    global _stand_in_library
    if _stand_in_library is not None:
        return
    library = torch.library.Library("torchvision", "DEF")  # type: ignore[no-untyped-call]
    for op, schema in _MISSING_OP_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, op):
            library.define(schema)  # type: ignore[no-untyped-call]
    _stand_in_library = library
