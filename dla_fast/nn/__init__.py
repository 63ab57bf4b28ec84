"""Drop-in fused modules and accelerate(), the one bridge from the models to the kernels."""
from .accelerate import accelerate, accelerated_modules, restore
from .ida import FusedIDAUp, FusedIDAUpAdd
from .root import FusedRoot

__all__ = ["FusedIDAUp", "FusedIDAUpAdd", "FusedRoot", "accelerate", "accelerated_modules", "restore"]
