"""Rewrite a wheel without the files a benchmark never imports, so the peers' wheels fit the GPU
machine's 64 MiB carry: bitsandbytes ships one CUDA library per toolkit (the machine needs one),
Unsloth ships a web UI (``studio/``) that training does not import.

    python benchmarks/trim_wheel.py WHEEL --keep 'bitsandbytes/libbitsandbytes_cuda130.so' \
        --drop 'bitsandbytes/libbitsandbytes_*'
"""

import fnmatch
import zipfile
from pathlib import Path

import fire


def main(wheel: str, drop: str = "", keep: str = "") -> None:
    """Drop the members matching a ``drop`` pattern (comma-separated) unless they match a
    ``keep`` pattern; the wheel's RECORD loses their lines so pip installs it as it is."""
    drops = [p for p in (drop.split(",") if isinstance(drop, str) else drop) if p]
    keeps = [p for p in (keep.split(",") if isinstance(keep, str) else keep) if p]

    def dropped(name: str) -> bool:
        return (any(fnmatch.fnmatch(name, p) for p in drops)
                and not any(fnmatch.fnmatch(name, p) for p in keeps))

    path = Path(wheel)
    trimmed = path.with_suffix(".trimmed")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(trimmed, "w",
                                                          zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if dropped(info.filename):
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "\n".join(l for l in lines if not dropped(l.split(",")[0])).encode() + b"\n"
            target.writestr(info, data)
    before = path.stat().st_size
    trimmed.replace(path)
    print(f"{path.name}: {before / 2**20:.1f} -> {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    fire.Fire(main)
