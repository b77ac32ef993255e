"""Build script: the Python packages always, the CUDA extension `uniformerv2_kernels._C` when it can.

The extension is built when torch is a CUDA build and an nvcc is found; otherwise the package installs
without it and the Triton / reference backends are used. `UNIFORMERV2_BUILD_CUDA=0` skips it,
`UNIFORMERV2_BUILD_CUDA=1` requires it (the build fails loudly if it cannot be made).

Install with `pip install --no-build-isolation -e .` so that the build sees the environment's torch.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"  # A100 and H100 (9.0a enables wgmma/TMA code paths)


# CPU-seconds of one core for the op files' one translation unit and one architecture, from a fast core to
# a slow one. Only used to tell the user roughly how long to wait.
COMPILE_SECONDS_PER_ARCH = (25, 60)
# The generated translation unit that includes every csrc/<op>.cu (see ops_translation_unit).
OPS_UNIT = os.path.join("build", "csrc_ops", "uniformerv2_ops.cu")
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def log(msg):
    print(f"[uniformerv2-kernels setup] {msg}", file=sys.stderr)


def notice(lines):
    """Shows lines to the person running the install. pip keeps a build's output to itself unless the build
    fails or -v is given, so a long compile would otherwise look like a hang: the lines also go straight to
    the controlling terminal when there is one."""
    text = "".join(f"[uniformerv2-kernels setup] {line}\n" for line in lines)
    sys.stderr.write(text)
    sys.stderr.flush()
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(text)
    except OSError:
        pass  # no terminal (CI, a pipe): stderr is all there is


def build_mode():
    value = os.environ.get("UNIFORMERV2_BUILD_CUDA", "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "force"
    return "auto"


def real_nvcc(path):
    """Follow symlinks and wrapper scripts (`exec /usr/local/cuda-X/bin/nvcc "$@"`) to the real nvcc."""
    path = os.path.realpath(path)
    for _ in range(5):
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            return None
        if not head.startswith(b"#!"):
            return path  # a binary: the real compiler
        match = re.search(rb"(/[^\s\"']+/bin/nvcc)\b", head)
        if not match:
            return None
        target = os.path.realpath(match.group(1).decode())
        if target == path or not os.path.exists(target):
            return None
        path = target
    return None


def find_cuda_home():
    """CUDA_HOME, else the toolkit behind the nvcc on PATH, else /usr/local/cuda."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    candidates = []
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(on_path)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        nvcc = real_nvcc(candidate) if os.path.exists(candidate) else None
        if nvcc:
            return os.path.dirname(os.path.dirname(nvcc))
    return None


def pip_cuda_include_dirs():
    """Headers torch needs beyond the toolkit (cuBLAS, cuSPARSE, ...) ship in the pip `nvidia` packages."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(site, pattern))):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def max_jobs():
    """nvcc on torch headers takes ~2 GiB per job: cap parallel jobs by memory and cores."""
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemAvailable")).split()[1])
        by_memory = max(1, kb // (3 * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_memory = 1
    return str(max(1, min(os.cpu_count() or 1, by_memory)))


def cuda_extension():
    """Returns (ext_modules, cmdclass) for the CUDA extension, or ([], {}) when it is not built."""
    mode = build_mode()
    if mode == "off":
        log("UNIFORMERV2_BUILD_CUDA=0: not building the CUDA extension")
        return [], {}

    def skip(reason):
        if mode == "force":
            raise RuntimeError(f"UNIFORMERV2_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        log(f"not building the CUDA extension: {reason}")
        return [], {}

    try:
        import torch
    except ImportError:
        return skip("torch is not importable in the build environment (use --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip("no nvcc found (set CUDA_HOME)")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ["MAX_JOBS"] = max_jobs()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    op_files = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not op_files:
        return skip("no sources in csrc/")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + [ops_translation_unit(op_files)]
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    arch_count = len([a for a in re.split(r"[;\s,]+", archs) if a])
    jobs = int(os.environ["MAX_JOBS"])
    announce_build(op_files, archs, arch_count, cuda_home, jobs, mode)
    write_build_info(torch, cuda_home, archs)
    ext = CUDAExtension(
        name="uniformerv2_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + pip_cuda_include_dirs(),
        extra_compile_args={
            "cxx": ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            # --threads: the architectures of the one translation unit compile in parallel
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                     f"--threads={max(1, min(jobs, arch_count))}"],
        },
        extra_link_args=[libstdcxx] if (libstdcxx := shared_libstdcxx()) else [],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def ops_translation_unit(op_files):
    """The path of a generated .cu file that includes every csrc/<op>.cu, compiled as ONE translation unit.

    Most of the compile is nvcc parsing the torch headers, once per translation unit and architecture: one
    unit instead of one per op file takes about a third of the CPU time (benchmarks/results/kernel_notes.md).
    The op files stay one op per file; each also compiles alone (benchmarks/cuda_resource_check.py)."""
    text = ("// Generated by setup.py: the op files of csrc/ as one translation unit. Do not edit.\n"
            + "".join(f'#include "{os.path.join(ROOT, f)}"\n' for f in op_files))
    path = os.path.join(ROOT, OPS_UNIT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            unchanged = f.read() == text
    except OSError:
        unchanged = False
    if not unchanged:  # rewriting an unchanged file would make ninja recompile it
        with open(path, "w") as f:
            f.write(text)
    return OPS_UNIT


def announce_build(op_files, archs, arch_count, cuda_home, jobs, mode):
    """Says what is about to be compiled, roughly for how long, and how not to."""
    # nvcc --threads compiles the unit's architectures in parallel, up to the jobs allowed.
    parallel = max(1, min(jobs, arch_count))
    low, high = (seconds * arch_count / parallel / 60 for seconds in COMPILE_SECONDS_PER_ARCH)
    duration = "about a minute" if high < 1.5 else f"roughly {max(1, round(low))}-{round(high)} minutes"
    lines = [
        f"building the CUDA extension uniformerv2_kernels._C: {len(op_files)} op files of csrc/ as one "
        f"translation unit for archs "
        f"{archs} (TORCH_CUDA_ARCH_LIST), {jobs} parallel jobs (MAX_JOBS), CUDA toolkit {cuda_home}",
        f"this takes a while: {duration} with {jobs} job{'s' if jobs > 1 else ''} on otherwise idle "
        "cores, longer on a busy machine; pip shows no progress meanwhile (pip -v shows the compiler)",
    ]
    import torch

    if not torch.cuda.is_available():
        lines.append("no GPU is visible here: the extension is compiled for use on a GPU, it cannot run here")
    if mode == "auto":
        lines.append("to skip it (every op then runs on Triton or the PyTorch reference): "
                     "UNIFORMERV2_BUILD_CUDA=0 pip install --no-build-isolation -e .")
        lines.append("to build only for your GPU, e.g. an H100: TORCH_CUDA_ARCH_LIST=9.0a")
    if building():
        notice(lines)
    else:
        log(lines[0])


def building():
    """Whether this run of setup.py compiles: pip also runs it only to read the metadata, more than once."""
    return any(arg in BUILD_COMMANDS for arg in sys.argv[1:])


def shared_libstdcxx():
    """The libstdc++.so.6 this process (and so torch) runs on, to link the extension against, or None.

    A g++ that cannot find libstdc++.so (seen on the H100 machine: a relocated /opt/gcc wrapper) links a private
    static copy instead; that copy's uninitialised locale makes every TORCH_CHECK message that formats a number
    crash (SIGSEGV in std::ostream::_M_insert<long>) instead of raising. Naming the shared library explicitly
    resolves those symbols from the one torch uses; where g++ finds it anyway this changes nothing.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return None
    if len(paths) != 1:
        return None
    (path,) = paths
    return path if os.path.exists(path) else None


def csrc_digest():
    """uniformerv2_kernels/_sources.py's digest, loaded by path (the package is not importable yet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sources", os.path.join(ROOT, "uniformerv2_kernels", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.csrc_digest(ROOT)


def write_build_info(torch, cuda_home, archs):
    path = os.path.join(ROOT, "uniformerv2_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py when the CUDA extension is built. Do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"CUDA_HOME = {cuda_home!r}\n")
        f.write(f"ARCH_LIST = {archs!r}\n")
        f.write(f"CSRC_SHA256 = {csrc_digest()!r}\n")


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
