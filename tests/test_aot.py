"""Ahead-of-time compilation of the generated kernels for A100 (sm_80) and H100 (sm_90) without a GPU: PTX and
cubins written into the build and listed in its manifest, what each kernel uses reported, and a kernel that
needs more shared memory than a target has refused by name. The compiler runs in its own process, without
Triton's interpreter."""

import json

import pytest
from click.testing import CliRunner

import umc
import umc.kernels.aot
from conftest import SPECS
from umc.cli import main
from umc.compiler import BuildError

TINY = str(SPECS / "ultramem-tiny.yaml")


@pytest.fixture(scope="module")
def aot_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "b"
    result = CliRunner().invoke(main, ["compile", TINY, "-o", str(out), "--quiet", "--target", "sm_80,sm_90"])
    assert result.exit_code == 0, result.output
    return out


def test_ptx_and_cubins_for_each_target(aot_build):
    manifest = json.loads((aot_build / "manifest.json").read_text())
    report = json.loads((aot_build / "report.json").read_text())
    assert len(report["kernels"]) == 3
    for name, entry in report["kernels"].items():
        for cc, marker in ((80, ".target sm_80"), (90, ".target sm_90a")):
            ptx = (aot_build / "kernels" / f"{name}.sm_{cc}.ptx").read_text()
            assert marker in ptx and f"kernels/{name}.sm_{cc}.cubin" in manifest["artifacts"]
            use = entry["targets"][f"sm_{cc}"]
            assert use["registers"] > 0 and use["num_warps"] == 4 and use["ptx_version"]
            assert use["shared_bytes"] <= umc.kernels.aot.SHARED_LIMITS[cc]
            assert use["global_scratch_bytes"] == use["profile_scratch_bytes"] == 0
    assert "| sm_90 |" in (aot_build / "report.md").read_text()


def test_ptx_version_is_chosen_and_recorded(tmp_path):
    build = umc.compile(TINY, tmp_path / "b", targets=(80,), ptx_version=80)
    assert all(k["targets"]["sm_80"]["ptx_version"] == "8.0" for k in build.report["kernels"].values())
    assert ".version 8.0" in next((build.path / "kernels").glob("*.sm_80.ptx")).read_text()


def test_too_much_shared_memory_is_an_error_naming_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setitem(umc.kernels.aot.SHARED_LIMITS, 80, 100)
    with pytest.raises(BuildError, match=r"kernel \w+_[0-9a-f]{12} needs \d+ bytes of shared memory per block, more than "
                                         r"sm_80 has \(100\); it was specialized for \{"):
        umc.compile(TINY, tmp_path / "b", targets=(80,))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, message", [(["--target", "sm_75"], "unknown target 'sm_75'"),
                                           (["--ptx-version", "80"], "needs --target")])
def test_bad_target_options_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(main, ["compile", TINY, "-o", str(tmp_path / "b"), *args])
    assert result.exit_code == 2 and message in result.output
