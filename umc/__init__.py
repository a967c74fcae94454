"""umc: the UltraMem model compiler."""
from umc.spec import Spec, SpecError, load_spec

__version__ = "0.1.0"
__all__ = ["Spec", "SpecError", "load_spec", "__version__"]
