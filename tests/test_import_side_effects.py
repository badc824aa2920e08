"""Importing peftlab changes nothing about the process: no warning filters, no umask; and the
command line answers --help, --version and a refused argument without loading torch."""

import json
import subprocess
import sys

import pytest

# what peftlab imports that installs filters of its own (sympy through dynamo, accelerate)
THIRD_PARTY = "import torch, torch._dynamo, transformers, accelerate.scheduler"


def test_import_installs_no_warning_filters_and_keeps_the_umask():
    code = (
        "import os, warnings; os.umask(0o027)\n"
        f"{THIRD_PARTY}; before = list(warnings.filters)\n"
        "import peftlab, peftlab.cli, peftlab.methods, peftlab.files, peftlab.loop\n"
        "from peftlab.methods import registry; registry.discover()\n"
        "import json; print(json.dumps([os.umask(0o027) == 0o027, warnings.filters == before]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[true, true]", out


def test_files_read_the_umask_without_changing_it(tmp_path):
    import os

    from peftlab import files

    old = os.umask(0o027)
    try:
        assert files.umask() == 0o027 and files.umask() == 0o027
        files.write_text(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("module", ["peftlab.methods.qlora"])
def test_qlora_filters_arrive_with_bitsandbytes_not_with_the_import(module):
    code = (f"import warnings; {THIRD_PARTY}; before = list(warnings.filters); import {module}; "
            "print(warnings.filters == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True", out


def test_help_version_and_a_refused_argument_answer_without_torch():
    code = (
        "import sys, json, contextlib, io\n"
        "from peftlab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:\n"
        "    codes = [main(['--help']), main(['--version']), main(['train', '--help']), main(['compare', '--stepz', '3'])]\n"
        "import peftlab; assert peftlab.__version__\n"
        "print(json.dumps([codes, 'torch' in sys.modules, 'peftlab 0.1.0' in out.getvalue(), err.getvalue()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    codes, torch_loaded, version_shown, err = json.loads(out.strip().splitlines()[-1])
    assert codes == [0, 0, 0, 2] and "No such option: --stepz" in err and version_shown
    assert not torch_loaded  # seconds on a slow machine: the public names import their modules on first use


def test_the_public_names_are_the_functions_whatever_was_imported_first():
    import peftlab.loop
    import peftlab.models

    from peftlab import TrainConfig, load_model, train

    assert train is peftlab.loop.train and load_model is peftlab.models.load and TrainConfig.__name__ == "TrainConfig"
    assert set(peftlab.__all__) <= set(dir(peftlab)) and len(dir(peftlab)) == len(set(dir(peftlab)))
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        peftlab.trian
