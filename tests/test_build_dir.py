"""No clobbering, no forged manifests: compile's check-then-act races, targets that must never be
replaced, `eager --save-weights`, manifest format and artifact names, `compile --weights` with extra tensors."""

import ctypes
import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import umc
import umc.compiler
from conftest import SPECS
from umc import fsutil
from umc.cli import main
from umc.compiler import BuildError
from umc.manifest import BUILD_FORMAT, BuildDirError, file_sha256, read_manifest, unlisted_files
from umc.runtime import load

TINY = str(SPECS / "ultramem-tiny.yaml")
EAGER_FAST = ["--batch", "1", "--prompt", "1", "--steps", "0"]


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lower_then(action):
    """A stand-in for umc.compiler.lower that runs ``action`` after the early checks, mid-compile."""
    real = umc.compiler.lower

    def lower(spec):
        action()
        return real(spec)

    return lower


# --- rename_noreplace -------------------------------------------------------------------------


def _occupy(dst: Path, kind: str) -> None:
    """Put something of ``kind`` at ``dst``."""
    if kind == "file":
        dst.write_text("theirs")
    elif kind == "empty directory":
        dst.mkdir()
    else:
        dst.symlink_to(dst.parent / "nowhere")


@pytest.mark.parametrize("kind", ["file", "empty directory", "dangling symlink"])
def test_rename_noreplace_refuses_anything_at_dst(tmp_path, kind):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("new")
    _occupy(dst, kind)
    with pytest.raises(FileExistsError):
        fsutil.rename_noreplace(src, dst)
    assert (src / "a").read_text() == "new"
    assert os.path.lexists(dst) and not (dst.is_dir() and any(dst.iterdir()))
    fsutil.rename_noreplace(src, tmp_path / "free")
    assert (tmp_path / "free" / "a").read_text() == "new" and not src.exists()


def _einval(*args):
    """A renameat2 on a filesystem that does not support RENAME_NOREPLACE."""
    ctypes.set_errno(errno.EINVAL)
    return -1


@pytest.mark.parametrize("renameat2", [None, _einval], ids=["no-renameat2", "EINVAL"])
def test_rename_noreplace_fallback_checks_under_the_lock(tmp_path, monkeypatch, renameat2):
    monkeypatch.setattr(fsutil, "_renameat2", renameat2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("new")
    dst.mkdir()
    with pytest.raises(FileExistsError):
        fsutil.rename_noreplace(src, dst)
    dst.rmdir()
    with fsutil.exclusive_lock(tmp_path):  # another holder: the fallback must wait for it
        mover = threading.Thread(target=fsutil.rename_noreplace, args=(src, dst))
        mover.start()
        time.sleep(0.3)
        assert not dst.exists()
    mover.join(10)
    assert dst.read_text() == "new" and not src.exists()


def test_lock_holder_can_use_the_fallback_rename(tmp_path, monkeypatch):
    """The lock is re-entrant in its thread: a holder renaming through the fallback does not deadlock."""
    monkeypatch.setattr(fsutil, "_renameat2", None)
    (tmp_path / "src").write_text("new")
    done = threading.Event()

    def rename_while_holding():
        with fsutil.exclusive_lock(tmp_path):
            fsutil.rename_noreplace(tmp_path / "src", tmp_path / "dst")
        done.set()

    threading.Thread(target=rename_while_holding, daemon=True).start()
    assert done.wait(10), "deadlock: the lock holder waited for itself"
    assert (tmp_path / "dst").read_text() == "new"


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_write_new_file_keeps_a_file_that_appears_while_writing(tmp_path, force):
    path = tmp_path / "out.bin"

    def write(tmp):
        tmp.write_bytes(b"ours")
        path.write_bytes(b"theirs")

    with pytest.raises(FileExistsError, match="out.bin (exists|is not ours)"):
        fsutil.write_new_file(path, write, force=force, replaceable=lambda p: False, what="ours")
    assert path.read_bytes() == b"theirs" and list(tmp_path.iterdir()) == [path]


def test_write_new_file_keeps_a_file_that_appears_at_the_last_instant(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    real = fsutil.rename_noreplace

    def someone_is_faster(src, dst):
        path.write_bytes(b"theirs")
        return real(src, dst)

    monkeypatch.setattr(fsutil, "rename_noreplace", someone_is_faster)
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        fsutil.write_new_file(path, lambda tmp: tmp.write_bytes(b"ours"), force=False,
                              replaceable=lambda p: True, what="ours")
    assert path.read_bytes() == b"theirs" and list(tmp_path.iterdir()) == [path]


# --- compile: check and act in one step -------------------------------------------------------


def user_creates(out):
    """A step that makes ``out`` a directory holding a user's file."""
    def create():
        out.mkdir()
        (out / "mine.txt").write_text("user file")

    return create


def test_directory_appearing_mid_compile_is_refused_and_kept(tmp_path, monkeypatch):
    out = tmp_path / "b"
    monkeypatch.setattr(umc.compiler, "lower", lower_then(user_creates(out)))
    with pytest.raises(BuildError, match=r"b exists \(use --force"):
        umc.compile(TINY, out)
    assert files_of(out) == {"mine.txt": b"user file"}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_empty_directory_appearing_mid_compile_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "b"
    monkeypatch.setattr(umc.compiler, "lower", lower_then(out.mkdir))
    with pytest.raises(BuildError, match="exists"):
        umc.compile(TINY, out)
    assert out.is_dir() and not any(out.iterdir())


def test_forced_compile_rechecks_a_directory_that_appeared(tmp_path, monkeypatch):
    out = tmp_path / "b"
    monkeypatch.setattr(umc.compiler, "lower", lower_then(user_creates(out)))
    with pytest.raises(BuildError, match="is not a umc build directory"):
        umc.compile(TINY, out, force=True)
    assert files_of(out) == {"mine.txt": b"user file"}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_file_added_to_a_build_during_a_forced_recompile_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "b"
    umc.compile(TINY, out)
    monkeypatch.setattr(umc.compiler, "lower", lower_then(lambda: (out / "mine.txt").write_text("user file")))
    with pytest.raises(BuildError, match=r"did not write \(mine.txt\)"):
        umc.compile(TINY, out, force=True)
    assert (out / "mine.txt").read_text() == "user file"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_file_added_while_the_old_build_moves_aside_is_put_back(tmp_path, monkeypatch):
    """The last window: after the check under the lock, before the old build moves aside."""
    out = tmp_path / "b"
    umc.compile(TINY, out)
    before = files_of(out)
    real = os.replace

    def write_then_replace(src, dst):
        if Path(src) == out:
            (out / "mine.txt").write_text("user file")
        return real(src, dst)

    monkeypatch.setattr(umc.compiler.os, "replace", write_then_replace)
    with pytest.raises(BuildError, match="did not write"):
        umc.compile(TINY, out, force=True)
    monkeypatch.undo()
    assert files_of(out) == {**before, "mine.txt": b"user file"}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_failed_swap_puts_the_old_build_back_with_the_fallback_rename(tmp_path, monkeypatch):
    out = tmp_path / "b"
    umc.compile(TINY, out)
    before = files_of(out)
    monkeypatch.setattr(fsutil, "_renameat2", None)
    real = os.replace

    def busy_when_moving_in(src, dst):
        if Path(dst) == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(umc.compiler.os, "replace", busy_when_moving_in)
    with pytest.raises(BuildError, match="cannot replace .*busy"):
        umc.compile(TINY, out, force=True)
    monkeypatch.undo()
    assert files_of(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def _compile_together(tmp_path, monkeypatch, force: bool) -> list:
    """Two threads compile into tmp_path/b, held at a barrier until both have lowered and run
    their passes, so they reach the final rename together. Returns each one's Build or exception."""
    barrier = threading.Barrier(2, timeout=60)
    real = umc.compiler.report_markdown

    def together(report):
        barrier.wait()
        return real(report)

    monkeypatch.setattr(umc.compiler, "report_markdown", together)
    outcomes = [None, None]

    def run(i):
        try:
            outcomes[i] = umc.compile(TINY, tmp_path / "b", force=force)
        except Exception as exc:  # the outcome is what the test inspects
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outcomes


def test_concurrent_compiles_without_force_one_wins(tmp_path, monkeypatch):
    outcomes = _compile_together(tmp_path, monkeypatch, force=False)
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], BuildError) and "exists (use --force" in str(errors[0])
    manifest = read_manifest(tmp_path / "b")  # complete: every listed file present with its hash
    assert unlisted_files(tmp_path / "b", manifest) == []
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_concurrent_forced_compiles_take_turns(tmp_path, monkeypatch):
    outcomes = _compile_together(tmp_path, monkeypatch, force=True)
    assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
    read_manifest(tmp_path / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


# --- targets no build may replace -------------------------------------------------------------


def _no_walking(monkeypatch):
    """Make every way of listing a directory fail the test."""

    def walked(*args, **kwargs):
        raise AssertionError("the target was walked")

    for owner, name in ((Path, "rglob"), (Path, "glob"), (Path, "iterdir"), (os, "walk"), (os, "scandir"),
                        (os, "listdir")):
        monkeypatch.setattr(owner, name, walked)


@pytest.mark.parametrize("target, reason", [("root", "the filesystem root"), ("home", "your home directory"),
                                            ("cwd", "the current directory"),
                                            ("ancestor", "an ancestor of the current directory")])
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_obviously_wrong_targets_are_refused_untouched(tmp_path, monkeypatch, tiny_spec, target, reason, force):
    home, work = tmp_path / "home", tmp_path / "work" / "deep"
    home.mkdir()
    work.mkdir(parents=True)
    (home / "notes.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    out = {"root": Path("/"), "home": home, "cwd": Path("."), "ancestor": Path("..")}[target]
    _no_walking(monkeypatch)
    with pytest.raises(BuildError, match=f"is {reason}; umc compile writes only"):
        umc.compile(tiny_spec, out, force=force)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "work"]
    assert files_of(home) == {"notes.txt": b"keep"} and files_of(tmp_path / "work") == {}


def test_cli_refuses_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compile", TINY, "-o", ".", "--force", "--quiet"])
    assert result.exit_code == 2 and "the current directory" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# --- eager --save-weights ---------------------------------------------------------------------


def eager(*args):
    """`umc eager` on the tiny spec, as short a run as it allows."""
    return CliRunner().invoke(main, ["eager", TINY, *EAGER_FAST, *args])


def refused(result, *words):
    """Exit 2 with one line naming what is wrong, no traceback."""
    lines = result.output.strip().splitlines()
    return (result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output
            and all(w in lines[0] for w in words))


def test_save_weights_writes_a_new_file(tmp_path):
    from umc.cli import is_umc_weights_file

    path = tmp_path / "w.safetensors"
    result = eager("--save-weights", str(path))
    assert result.exit_code == 0, result.output
    assert is_umc_weights_file(path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_save_weights_into_a_missing_directory_is_one_line(tmp_path):
    path = tmp_path / "missing" / "w.safetensors"
    assert refused(eager("--save-weights", str(path)), str(path), "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_save_weights_never_overwrites_the_spec(tmp_path, force):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(Path(TINY).read_text())
    before = spec.read_bytes()
    result = CliRunner().invoke(main, ["eager", str(spec), *EAGER_FAST, "--save-weights", str(spec), *force])
    assert refused(result, str(spec)), result.output
    assert spec.read_bytes() == before


def test_save_weights_refuses_foreign_files_even_with_force(tmp_path):
    import torch
    from safetensors.torch import save_file

    foreign = tmp_path / "theirs.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    before = foreign.read_bytes()
    assert refused(eager("--save-weights", str(foreign)), str(foreign), "--force")
    assert refused(eager("--save-weights", str(foreign), "--force"), str(foreign), "not a umc weights file")
    assert foreign.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["theirs.safetensors"]


def test_save_weights_replaces_umc_weights_only_with_force(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    assert eager("--save-weights", str(path), "--seed", "1").exit_code == 0
    first = path.read_bytes()
    assert refused(eager("--save-weights", str(path), "--seed", "2"), str(path), "exists")
    assert path.read_bytes() == first
    result = eager("--save-weights", str(path), "--seed", "2", "--force")
    assert result.exit_code == 0, result.output
    assert path.read_bytes() != first and load_file(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_save_leaves_no_truncated_file(tmp_path, monkeypatch, failure):
    import umc.reference

    path = tmp_path / "w.safetensors"
    assert eager("--save-weights", str(path)).exit_code == 0
    before = path.read_bytes()

    def half_written(model, target):
        Path(target).write_bytes(b"\0" * 100)
        raise failure

    monkeypatch.setattr(umc.reference, "save_weights", half_written)
    for target, force in ((tmp_path / "new.safetensors", []), (path, ["--force"])):
        result = eager("--save-weights", str(target), *force)
        assert result.exit_code != 0
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# --- manifests --------------------------------------------------------------------------------


def edit_manifest(build: Path, change) -> None:
    """Rewrite a build's manifest.json through ``change(manifest)``."""
    path = build / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_records_the_build_format(tmp_path):
    umc.compile(TINY, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["build_format"] == BUILD_FORMAT == 3
    assert {"umc_version", "spec", "spec_sha256", "passes", "artifacts"} <= set(manifest)


@pytest.mark.parametrize("found", [None, 2, 4], ids=["before-formats", "before-ragged", "newer"])
def test_build_of_another_format_is_a_clear_error(tmp_path, found):
    build = tmp_path / "b"
    umc.compile(TINY, build)
    edit_manifest(build, lambda m: m.pop("build_format") if found is None else m.update(build_format=found))
    wanted = (f"{build} was built with umc {umc.__version__} (build format {found or 1}); "
              f"this is umc {umc.__version__} (build format 3): recompile it with umc compile")
    with pytest.raises(BuildDirError) as caught:
        load(build, weights={})
    assert str(caught.value) == wanted
    result = CliRunner().invoke(main, ["verify", str(build)])
    assert result.exit_code == 2 and result.output.strip() == f"error: {wanted}"
    umc.compile(TINY, build, force=True)  # what the message says to do works
    read_manifest(build)


def _forge(build: Path, name: str, target: Path) -> None:
    """List ``name`` in the manifest with the true sha256 of ``target``, so only the name is wrong."""
    digest = file_sha256(target)
    edit_manifest(build, lambda m: m["artifacts"].update({name: digest}))


@pytest.mark.parametrize("name, target, reason", [
    ("ABSOLUTE", "secret.txt", "is absolute"),
    ("../secret.txt", "secret.txt", "'..' component"),
    ("ir/../../secret.txt", "secret.txt", "'..' component"),
    ("ir\\..\\..\\secret.txt", "secret.txt", "backslash"),
    ("", "secret.txt", "is empty"),
    ("./spec.json", "b/spec.json", "not normalized"),
    ("ir//prefill.00-initial.txt", "b/ir/prefill.00-initial.txt", "not normalized"),
])
def test_artifact_names_must_stay_inside_the_build(tmp_path, name, target, reason):
    build = tmp_path / "b"
    umc.compile(TINY, build)
    (tmp_path / "secret.txt").write_text("not the build's")
    name = str(tmp_path / "secret.txt") if name == "ABSOLUTE" else name
    _forge(build, name, tmp_path / target)
    with pytest.raises(BuildDirError) as caught:
        read_manifest(build)
    assert repr(name) in str(caught.value) and reason in str(caught.value)


def test_artifact_resolving_outside_through_a_symlink_is_refused(tmp_path):
    build = tmp_path / "b"
    umc.compile(TINY, build)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("not the build's")
    (build / "link").symlink_to(outside)
    _forge(build, "link/data.txt", outside / "data.txt")
    with pytest.raises(BuildDirError, match="'link/data.txt' resolves outside the build"):
        read_manifest(build)


def test_listed_file_that_is_a_symlink_is_refused(tmp_path):
    build = tmp_path / "b"
    umc.compile(TINY, build)
    spec = build / "spec.json"
    (build / "spec.copy").write_bytes(spec.read_bytes())
    spec.unlink()
    spec.symlink_to("spec.copy")  # same bytes, same hash: only the symlink is wrong
    with pytest.raises(BuildDirError, match="'spec.json' is a symlink"):
        read_manifest(build)


def test_unlisted_files_are_reported(tmp_path):
    build = tmp_path / "b"
    umc.compile(TINY, build)
    assert unlisted_files(build, read_manifest(build)) == []
    (build / "extra.txt").write_text("x")
    (build / "ir" / "notes.md").write_text("x")
    (build / "elsewhere").symlink_to(tmp_path)  # a symlink is listed, never followed
    assert unlisted_files(build, read_manifest(build)) == ["elsewhere", "extra.txt", "ir/notes.md"]


# --- compile --weights ------------------------------------------------------------------------


def _weights_with(tmp_path, tiny_spec, change) -> Path:
    """The tiny model's weights, edited by ``change(tensors)``, saved to tmp_path/w.safetensors."""
    from safetensors.torch import save_file

    from umc.reference import build_model

    tensors = {k: v.contiguous() for k, v in build_model(tiny_spec).state_dict().items()}
    change(tensors)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path


def test_weights_with_an_extra_tensor_fail_at_compile_time(tmp_path, tiny_spec):
    import torch

    def add(tensors):
        tensors["zz.extra"] = torch.zeros(3)
        tensors["aa.extra"] = torch.zeros(3)

    path = _weights_with(tmp_path, tiny_spec, add)
    result = CliRunner().invoke(main, ["compile", TINY, "-o", str(tmp_path / "b"), "--quiet", "--weights", str(path)])
    assert refused(result, str(path), "aa.extra", "not a parameter", "2 extra"), result.output
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_weights_with_a_mismatched_tensor_fail_at_compile_time(tmp_path, tiny_spec):
    import torch

    changed = []

    def to_half(tensors):
        changed.append(sorted(tensors)[0])
        tensors[changed[0]] = tensors[changed[0]].to(torch.float16)

    path = _weights_with(tmp_path, tiny_spec, to_half)
    result = CliRunner().invoke(main, ["compile", TINY, "-o", str(tmp_path / "b"), "--quiet", "--weights", str(path)])
    assert refused(result, str(path), changed[0], "F16"), result.output
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
