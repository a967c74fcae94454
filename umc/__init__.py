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


__all__ = ["Spec", "SpecError", "__version__", "compile", "load_spec"]
