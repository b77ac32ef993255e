"""Registers, spills and shared memory of every CUDA C++ kernel in csrc/, from ptxas (no GPU needed).

Compiles each csrc/*.cu alone with nvcc for the given architectures (default sm_90a, the H100 target of the
extension build) and ``-Xptxas -v``, with the flags setup.py uses, and prints one row per kernel
instantiation: registers, stack frame, spill stores / loads (bytes) and static shared memory. A kernel that
spills runs slower (local memory); none should. The companion of ``aot_compile_check.py`` (the Triton kernels).

    python benchmarks/cuda_resource_check.py                 # sm_90a
    python benchmarks/cuda_resource_check.py --arch 90a,80 --files layer_norm,ffn
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def setup_helpers() -> dict:
    """setup.py's toolkit discovery (find_cuda_home, pip_cuda_include_dirs) without running setup()."""
    path = os.path.join(ROOT, "setup.py")
    src = open(path).read().split("\next_modules, cmdclass = cuda_extension()")[0]
    namespace = {"__file__": path}
    exec(compile(src, path, "exec"), namespace)
    return namespace


def nvcc_command(source: str, arch: str, out: str) -> list[str]:
    helpers = setup_helpers()
    cuda_home = helpers["find_cuda_home"]()
    if cuda_home is None:
        raise SystemExit("no nvcc: put it on PATH or set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    import torch.utils.cpp_extension as ext

    try:
        includes = ext.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=True)
        includes = ext.include_paths(cuda=True)
    includes += helpers["pip_cuda_include_dirs"]()
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    flags = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-std=c++20", "-Xptxas", "-v",
             f"-gencode=arch=compute_{arch},code=sm_{arch}", "-D_GLIBCXX_USE_CXX11_ABI=1"]
    return [nvcc, "-c", source, "-o", out, *flags, "-I" + os.path.join(ROOT, "csrc"), *("-I" + i for i in includes)]


def parse(log: str) -> list[dict]:
    """One row per kernel from ptxas -v output (entry line, then its properties and register lines)."""
    rows, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = dict(mangled=m.group(1), arch=m.group(2))
            rows.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif current is not None and (m := _REGS.search(line)):
            smem = _SMEM.search(line)
            current.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() if shutil.which("c++filt") else []
    for row, name in zip(rows, names or [r["mangled"] for r in rows]):
        # void uniformerv2_cuda::(anonymous namespace)::ln_fwd_kernel<c10::Half, 8>(...) -> ln_fwd_kernel<Half, 8>
        name = name.replace("(anonymous namespace)::", "").replace("c10::", "").split("(")[0]
        row["name"] = re.sub(r"^(void )?([\w]+::)*", "", name)
    return rows


def compile_one(job):
    source, arch, tmp = job
    out = os.path.join(tmp, f"{os.path.basename(source)}.{arch}.o")
    proc = subprocess.run(nvcc_command(source, arch, out), capture_output=True, text=True)
    return source, arch, proc.returncode, proc.stdout + proc.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90a", help="comma separated: 90a, 80, ... (default 90a)")
    ap.add_argument("--files", default="", help="csrc/<name>.cu to compile, comma separated (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    names = [n for n in args.files.split(",") if n]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    if names:
        sources = [s for s in sources if os.path.basename(s)[:-3] in names]
    import tempfile

    failed, spilled, total = [], 0, 0
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        jobs = [(s, a, tmp) for s in sources for a in args.arch.split(",")]
        for source, arch, rc, log in pool.map(compile_one, jobs):
            name = os.path.basename(source)
            if rc != 0:
                failed.append(name)
                print(f"{name} sm_{arch}: nvcc FAILED\n{log[-2000:]}")
                continue
            print(f"\n{name} (sm_{arch})")
            print(f"  {'kernel':<70} {'regs':>5} {'stack':>6} {'spill st/ld':>12} {'static smem':>12}")
            for r in parse(log):
                total += 1
                spills = r.get("spill_st", 0) + r.get("spill_ld", 0)
                spilled += spills > 0
                print(f"  {r['name'][:70]:<70} {r.get('regs', '?'):>5} {r.get('stack', 0):>6} "
                      f"{r.get('spill_st', 0):>5}/{r.get('spill_ld', 0):<6} {r.get('smem', 0):>12}"
                      + ("  SPILLS" if spills else ""))
    print(f"\n{total} kernel instantiations, {spilled} with register spills, {len(failed)} files failed to compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
