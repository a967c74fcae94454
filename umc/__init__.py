"""umc: the UltraMem model compiler."""

__version__ = "0.1.0"

from umc.spec import Spec, SpecError, load_spec  # noqa: E402


def compile(spec_or_path, out_dir, **options):
    """Compile a spec (or spec file) into a build directory; returns a ``umc.compiler.Build``.

    Options: passes, disable, dump_after, weights, force, progress (see ``umc.compiler.compile``).
    Imported lazily so ``import umc`` stays light.
    """
    from umc.compiler import compile as compile_spec

    return compile_spec(spec_or_path, out_dir, **options)


def compile_memory_layer(state_dict, config, backend: str = "cpu", **options):
    """The authors' memory layer (tensors and config dict, as ``umc.reference.memory_layer_from_official`` takes
    them) compiled for ``backend``: a torch module with the same ``forward(x)`` (see ``umc.layer``)."""
    from umc.layer import compile_memory_layer as compile_layer

    return compile_layer(state_dict, config, backend, **options)


__all__ = ["Spec", "SpecError", "__version__", "compile", "compile_memory_layer", "load_spec"]
