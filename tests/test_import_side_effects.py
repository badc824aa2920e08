"""Importing peftlab changes nothing about the process: no warning filters, no umask."""

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
